"""The executors registry: content checks go to the executor of the order's work type, only for
orders its agent would take; one executor per work type."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.unit.orders import make_order
from workorder_operator.agent import Claim
from workorder_operator.executor import AgentConfig, Executor, ExecutorAgent, Executors, Waiting
from workorder_operator.model import WorkOrder

AGENT = "0b5c5d8e-3f5a-4c8e-9d7a-5e6f7a8b9c0d"
OTHER = "6f1c2a9e-0000-4000-8000-000000000001"


class Picky:
    work_type = "picky"

    def check(self, order: WorkOrder) -> str | None:
        return None if "ok" in order.spec.yaml_content else "not ok"

    def waiting(self) -> Waiting | None:
        return None

    def run(self, claim: Claim, stopped: Callable[[], bool]) -> str:
        return "done"

    def cancel(self, claim: Claim) -> None:
        pass


def registry() -> Executors:
    return Executors([ExecutorAgent(None, Picky(), AgentConfig(id=AGENT, labels=("picky",)))])


def test_an_executor_satisfies_the_protocol() -> None:
    assert isinstance(Picky(), Executor)


def test_content_is_checked_by_the_executor_of_its_work_type() -> None:
    executors = registry()
    assert executors.runs("picky") and not executors.runs("backup")
    assert executors.check(make_order({"workType": "picky", "yamlContent": "bad: 1"})) == "not ok"
    assert executors.check(make_order({"workType": "picky", "yamlContent": "ok: 1"})) is None
    assert executors.check(make_order({"workType": "backup", "yamlContent": "bad: 1"})) is None


def test_an_order_targeted_at_someone_else_is_not_the_executors_to_reject() -> None:
    order = make_order({"workType": "picky", "yamlContent": "bad: 1", "targeting": {"agentIds": [OTHER]}})
    assert registry().check(order) is None
    mine = make_order({"workType": "picky", "yamlContent": "bad: 1", "targeting": {"labels": ["picky"]}})
    assert registry().check(mine) == "not ok"


def test_one_executor_per_work_type() -> None:
    executors = registry()
    with pytest.raises(ValueError, match="picky"):
        executors.register(ExecutorAgent(None, Picky(), AgentConfig(id=OTHER)))
