"""Who may claim (SPEC.md, Targeting): no targeting admits all, otherwise any match admits."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.orders import AGENT_A, AGENT_B, make_order
from workorder_operator.model import Targeting
from workorder_operator.targeting import AgentIdentity, admits


def targeting(**fields: Any) -> Targeting:
    """Targeting as the API returns it (camelCase)."""
    return Targeting.model_validate(fields)


PLAIN = AgentIdentity(AGENT_A)
GPU = AgentIdentity(AGENT_B, labels=("gpu", "linux"), annotations={"zone": "eu-1", "tier": "gold"})


def test_no_targeting_admits_every_agent() -> None:
    assert admits(None, PLAIN)
    assert admits(None, GPU)


def test_targeting_is_parsed_from_the_spec() -> None:
    order = make_order({"targeting": {"agentIds": [AGENT_B], "labels": ["gpu"], "annotations": {"zone": "eu-1"}}})
    assert order.spec.targeting == Targeting(agent_ids=[AGENT_B], labels=["gpu"], annotations={"zone": "eu-1"})
    assert make_order().spec.targeting is None


@pytest.mark.parametrize("empty", [{}, {"agentIds": [], "labels": [], "annotations": {}}])
def test_empty_targeting_admits_every_agent(empty: dict[str, Any]) -> None:
    assert admits(targeting(**empty), PLAIN)
    assert admits(targeting(**empty), GPU)


def test_agent_id_in_list_is_admitted_others_are_not() -> None:
    t = targeting(agentIds=[AGENT_A])
    assert admits(t, PLAIN)
    assert not admits(t, GPU)


def test_a_shared_label_admits() -> None:
    t = targeting(labels=["arm64", "gpu"])
    assert admits(t, GPU)
    assert not admits(t, PLAIN)
    assert not admits(t, AgentIdentity(AGENT_A, labels=("GPU",)))  # exact match, case-sensitive


def test_annotation_with_the_same_value_admits() -> None:
    assert admits(targeting(annotations={"zone": "eu-1"}), GPU)


def test_same_annotation_key_with_another_value_does_not_admit() -> None:
    assert not admits(targeting(annotations={"zone": "us-2"}), GPU)
    assert not admits(targeting(annotations={"zone": "us-2"}), PLAIN)


def test_annotation_value_matching_another_key_does_not_admit() -> None:
    assert not admits(targeting(annotations={"region": "eu-1"}), GPU)


def test_any_one_criterion_admits_or_semantics() -> None:
    t = targeting(agentIds=[AGENT_A], labels=["gpu"], annotations={"tier": "gold"})
    assert admits(t, PLAIN)  # by id only
    assert admits(t, AgentIdentity(AGENT_B, labels=("gpu",)))  # by label only
    assert admits(t, AgentIdentity(AGENT_B, annotations={"tier": "gold"}))  # by annotation only
    assert not admits(t, AgentIdentity(AGENT_B, labels=("cpu",), annotations={"tier": "silver"}))


def test_one_matching_annotation_of_several_admits() -> None:
    t = targeting(annotations={"zone": "us-2", "tier": "gold"})
    assert admits(t, GPU)
