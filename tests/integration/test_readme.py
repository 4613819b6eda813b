"""README.md walked as written: its Usage and agent sections (and the kubectl-only agent of
docs/CONTRACT.md) are extracted from the documents themselves and run by bash on the real control
plane, so the README cannot drift from the product.

Two lines of Usage set up a user's terminals and are played by the test instead: `make -C $REPO run`
(the test's control plane and a real operator process) and the KUBECONFIG export (the test's
kubeconfig). Everything else runs as written, in the order written, in a scratch directory."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cluster
from tests.support import OperatorProcess, kubectl, wait_for
from workorder_operator.kube import NotFound, WorkOrders
from workorder_operator.model import WorkOrder

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="the README's commands use kubectl")

REPO = Path(__file__).resolve().parents[2]
PLAYED = {
    "make -C $REPO run": "",
    "export KUBECONFIG=$REPO/.local/kubeconfig": "",  # the test's kubeconfig is in the environment
}


def sh_block(document: Path, heading: str) -> str:
    """The first ```sh block after `heading`, without trailing comments."""
    text = document.read_text()
    start = text.index(f"\n{heading}\n")
    match = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    assert match, f"no sh block under {heading} in {document.name}"
    return match.group(1)


def played(block: str) -> str:
    """The block with the lines the test plays itself blanked (each must be there as written)."""
    lines = block.splitlines()
    for line, replacement in PLAYED.items():
        matching = [i for i, text in enumerate(lines) if text.split("#")[0].strip() == line]
        assert matching, f"README no longer has `{line}`: update PLAYED"
        for i in matching:
            lines[i] = replacement
    return "\n".join(lines) + "\n"


@pytest.fixture
def env(cluster: Cluster, tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, KUBECONFIG=str(cluster.kubeconfig), REPO=str(REPO))


@pytest.fixture
def default_namespace_clean(cluster: Cluster) -> Iterator[None]:
    """The README works in the `default` namespace: leave no order of ours there."""
    yield
    kubectl(cluster.kubeconfig, "delete", "wo", "--all", "-n", "default", "--ignore-not-found", "--wait=false")


def bash(script: str, cwd: Path, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_usage_runs_as_written(
    cluster: Cluster, operator: OperatorProcess, env: dict[str, str], tmp_path: Path,
    default_namespace_clean: None,
) -> None:  # fmt: skip
    out = bash(played(sh_block(REPO / "README.md", "## Usage")), tmp_path, env)
    assert out.returncode == 0, f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    assert "workorder.workorder.dev/nightly-backup condition met" in out.stdout
    assert "backed-up" in out.stdout.splitlines()
    # `kubectl workorder agents` listed the agent while it ran, Live.
    assert any(line.split()[1:2] == ["backup"] and line.split()[-1] == "Live" for line in out.stdout.splitlines())
    order = WorkOrder.from_body(WorkOrders(cluster.api, "test").get("default", "nightly-backup"))
    assert order.status.phase == "Completed" and order.status.result == "backed-up"


def test_turn_a_script_into_an_agent_as_written(
    cluster: Cluster, operator: OperatorProcess, env: dict[str, str], tmp_path: Path,
    default_namespace_clean: None,
) -> None:  # fmt: skip
    lines = [line for line in sh_block(REPO / "README.md", "### Turn a script into an agent").splitlines() if line]
    *setup, agent = lines
    assert agent.startswith("kubectl workorder agent run"), agent
    out = bash("\n".join(setup), tmp_path, env)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "backup.sh").exists(), "the script lands in the scratch directory"
    name = out.stdout.split()[0].split("/")[-1]
    proc = subprocess.Popen(["bash", "-c", agent], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        done = wait_for(lambda: _completed(cluster, name), timeout=60, what=f"{name} to be completed by the agent")
        assert (done.status.result or "").startswith("sha256:")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "backing up database: orders" in output


def test_the_kubectl_only_agent_of_the_contract_as_written(
    cluster: Cluster, operator: OperatorProcess, env: dict[str, str], tmp_path: Path,
    default_namespace_clean: None,
) -> None:  # fmt: skip
    kubectl(cluster.kubeconfig, "apply", "-n", "default", "-f", "-", stdin=(
        "apiVersion: workorder.dev/v1alpha1\nkind: WorkOrder\nmetadata: {name: nightly-backup}\n"
        "spec: {workType: backup, yamlContent: 'database: orders'}\n"))  # fmt: skip
    block = sh_block(REPO / "docs" / "CONTRACT.md", "## Writing an agent in any language")
    out = bash(block, tmp_path, env)
    assert out.returncode == 0, f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    assert "condition met" in out.stdout
    order = WorkOrder.from_body(WorkOrders(cluster.api, "test").get("default", "nightly-backup"))
    assert order.status.phase == "Completed" and order.status.result == "sha256:feed"


@pytest.mark.skipif(shutil.which("kubectl-workorder") is None, reason="plugin not on PATH (make test)")
def test_the_kubectl_only_presence_of_the_contract_as_written(
    cluster: Cluster, env: dict[str, str], tmp_path: Path
) -> None:
    block = sh_block(REPO / "docs" / "CONTRACT.md", "## Agent presence: the Lease")
    out = bash(block, tmp_path, env)
    assert out.returncode == 0, f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    listed = [
        line.split() for line in out.stdout.splitlines() if line.startswith("6f1c2a9e-0000-4000-8000-000000000001")
    ]
    assert listed and listed[0][1] == "backup" and listed[0][-1] == "Live", out.stdout
    assert 'lease.coordination.k8s.io "workorder-agent-6f1c2a9e-0000-4000-8000-000000000001" deleted' in out.stdout


def _completed(cluster: Cluster, name: str) -> WorkOrder | None:
    try:
        order = WorkOrder.from_body(WorkOrders(cluster.api, "test").get("default", name))
    except NotFound:
        return None
    return order if order.status.phase == "Completed" else None
