"""Who may claim (SPEC.md, Targeting): no targeting admits all, otherwise any match admits."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.unit.orders import AGENT_A, AGENT_B, make_order
from workorder_operator.agent import Agent
from workorder_operator.buildagent import DEFAULT_AGENT_ID
from workorder_operator.model import Targeting
from workorder_operator.targeting import AgentIdentity, admits, check_agent_id


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


# --- issue 17: agent ids are UUIDs wherever they are accepted ------------------------------------


@pytest.mark.parametrize("good", ["6f1c2a4e-8d3b-4f7a-9e21-5c0b7d9a1e34", "6F1C2A4E-8D3B-4F7A-9E21-5C0B7D9A1E34",
                                  "6f1c2a4e8d3b4f7a9e215c0b7d9a1e34"])  # fmt: skip
def test_an_agent_id_is_what_the_api_servers_uuid_format_accepts(good: str) -> None:
    assert check_agent_id(good) == good


BAD_IDS = ["notauuid", "", "6f1c2a4e-8d3b-4f7a-9e21-5c0b7d9a1e34-abcdefghij", "{6f1c2a4e-8d3b-4f7a-9e21-5c0b7d9a1e34}",
           "6f1c2a4e-8d3b-4f7a-9e21-5c0b7d9a1e3g"]  # fmt: skip


@pytest.mark.parametrize("bad", BAD_IDS)
def test_anything_else_is_refused_naming_the_field(bad: str) -> None:
    with pytest.raises(ValueError, match=f"^--id {re.escape(repr(bad))} is not a UUID"):
        check_agent_id(bad, "--id")


def test_the_refusal_says_how_to_make_a_uuid() -> None:
    with pytest.raises(ValueError) as refused:
        check_agent_id("build-bot")
    assert str(refused.value) == (
        "agent id 'build-bot' is not a UUID (agent ids are UUIDs, e.g. 6f1c2a4e-8d3b-4f7a-9e21-5c0b7d9a1e34; "
        "uuidgen or cat /proc/sys/kernel/random/uuid makes one)"
    )


def test_the_sdk_and_the_operator_refuse_a_non_uuid_agent_id() -> None:
    with pytest.raises(ValueError, match=r"^Agent id 'build-bot' is not a UUID"):
        Agent(None, "build-bot")  # type: ignore[arg-type]
    assert Agent(None).id  # type: ignore[arg-type]  # none given: a new UUID
    from workorder_operator import main

    with pytest.raises(SystemExit) as exit_:
        main.parse_args(["--build-agent-id", "build-bot"])
    assert exit_.value.code == 2
    assert main.parse_args([]).build_agent_id == DEFAULT_AGENT_ID
