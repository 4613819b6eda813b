"""README's "Write your own executor", run as written: a script that embeds the operator with one
more executor (`echo`) beside the built-in `build`, as its own process on the real control plane."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cluster
from tests.support import REPO, OperatorProcess, create_order, wait_for
from workorder_operator.kube import WorkOrders
from workorder_operator.model import Phase, WorkOrder


def readme_example() -> str:
    section = (REPO / "README.md").read_text().split("## Write your own executor", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1, "the section shows one Python example"
    return str(blocks[0])


@pytest.fixture
def echo_operator(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    script = tmp_path / "my_operator.py"
    script.write_text(readme_example())
    with OperatorProcess(
        cluster.kubeconfig, tmp_path / "operator.log", "-n", namespace, "--no-leader-election",
        command=(str(script),),
    ).running() as proc:  # fmt: skip
        yield proc


def test_the_readme_executor_runs_its_orders_and_rejects_content_it_cannot_run(
    cluster: Cluster, namespace: str, echo_operator: OperatorProcess
) -> None:
    orders = WorkOrders(cluster.api, "test")
    create_order(cluster.api, namespace, "hi", workType="echo", yamlContent="message: hello\n")
    create_order(cluster.api, namespace, "mute", workType="echo", yamlContent="nothing: here\n")

    def finished(name: str) -> WorkOrder | None:
        order = WorkOrder.from_body(orders.get(namespace, name))
        return order if order.status.phase in (Phase.COMPLETED, Phase.FAILED) else None

    hi = wait_for(lambda: finished("hi"), timeout=30, what="the echo order to finish")
    assert (hi.status.phase, hi.status.result) == (Phase.COMPLETED, "HELLO"), echo_operator.log()
    assert hi.status.claimed_by == "0b5c5d8e-3f5a-4c8e-9d7a-5e6f7a8b9c0d", "run by the example's own agent"
    mute = wait_for(lambda: finished("mute"), timeout=30, what="the content check to fail the order")
    # Rejected at initialise, or, when the agent claimed it first, by that attempt: never retried.
    assert (mute.status.phase, mute.status.retry_count) == (Phase.FAILED, 0), echo_operator.log()
    assert mute.status.result == "yamlContent needs a `message`"
