"""Operations: metrics and health endpoints, and high availability (two replicas, one leader)."""

from __future__ import annotations

import re
import time
import urllib.request
import uuid
from pathlib import Path

from tests.conftest import Cluster
from tests.support import Agent, OperatorProcess, create_order, leader_of, replicas, wait_for
from workorder_operator.envtest import free_port


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text format (0 if absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_what_happened(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    port = free_port()
    op = OperatorProcess(
        cluster.kubeconfig, tmp_path / "operator.log", "--all-namespaces",
        f"--leader-election-namespace={namespace}", f"--metrics-port={port}",
    )  # fmt: skip
    try:
        op.start()
        assert scrape(port, "/healthz")[0] == 200
        wait_for(lambda: scrape(port, "/readyz")[0] == 200, timeout=10, what="readiness")
        wait_for(lambda: sample(scrape(port)[1], "workorder_leader") == 1, timeout=10, what="leadership")
        a = Agent(cluster.api, str(uuid.uuid4()))
        # Transitions are counted from the watch: make sure it runs (the operator initialises a sentinel).
        create_order(cluster.api, namespace, "sentinel", workType="sentinel")
        wait_for(lambda: "conditions" in a.read(namespace, "sentinel").raw_status, timeout=30, what="the watch")
        for name in ("m1", "m2"):
            create_order(cluster.api, namespace, name, workType="metrics")
            a.complete(a.claim(a.read(namespace, name)))
        create_order(cluster.api, namespace, "m3", workType="metrics", backoffSeconds=600)
        a.fail(a.claim(a.read(namespace, "m3")), "flaky")
        create_order(cluster.api, namespace, "m4", workType="metrics", claimTimeoutSeconds=1)
        a.claim(a.read(namespace, "m4"))
        wait_for(lambda: a.read(namespace, "m4").status.phase == "Pending", timeout=10, what="m4 to expire")

        def settled() -> str | None:
            text = scrape(port)[1]
            return text if sample(text, "workorder_expirations_total", type="metrics") == 1 else None

        text = wait_for(settled, timeout=10, what="the expiry to be counted")
        assert sample(text, "workorder_transitions_total", transition="claim", type="metrics") == 4
        assert sample(text, "workorder_transitions_total", transition="complete", type="metrics") == 2
        assert sample(text, "workorder_transitions_total", transition="fail", type="metrics") == 1
        assert sample(text, "workorder_transitions_total", transition="expire", type="metrics") == 1
        assert sample(text, "workorder_retries_total", type="metrics") == 1
        assert sample(text, "workorder_orders", phase="Completed", type="metrics") == 2
        assert sample(text, "workorder_orders", phase="RetryPending", type="metrics") == 1
        assert sample(text, "workorder_orders", phase="Pending", type="metrics") == 1
        assert sample(text, "workorder_deadlines_armed") >= 1  # m3's retry is armed
        assert sample(text, "workorder_run_seconds_count", type="metrics", outcome="complete") == 2
        assert sample(text, "workorder_claim_wait_seconds_count", type="metrics") == 4
    finally:
        op.stop()


def test_two_replicas_one_acts_and_the_other_takes_over(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    ops = replicas(cluster.kubeconfig, namespace, tmp_path)
    try:
        first = wait_for(lambda: leader_of(ops), timeout=30, what="one leader")
        standby = next(o for o in ops if o is not first)
        time.sleep(3)  # several renewal rounds: the standby must still not lead
        assert "is the leader" not in standby.log()

        a = Agent(cluster.api, str(uuid.uuid4()))
        create_order(cluster.api, namespace, "before", claimTimeoutSeconds=1)
        a.claim(a.read(namespace, "before"))
        wait_for(lambda: a.read(namespace, "before").status.phase == "Pending", timeout=10)
        # The status is visible before the log line is written: wait for the line.
        wait_for(lambda: "before: expire" in first.log(), timeout=5, what="the leader's expiry log line")
        assert "before: expire" not in standby.log()

        first.kill()  # kill -9: no hand-over, the lease must run out
        killed = time.monotonic()
        wait_for(lambda: "is the leader" in standby.log(), timeout=60, what="the standby to take over")
        takeover = time.monotonic() - killed
        assert takeover < 60
        create_order(cluster.api, namespace, "after", claimTimeoutSeconds=1)
        a.claim(a.read(namespace, "after"))
        wait_for(
            lambda: a.read(namespace, "after").status.phase == "Pending", timeout=10, what="expiry by the new leader"
        )
        assert "after: expire" in standby.log()
    finally:
        for op in ops:
            op.stop()


def test_a_cleanly_stopped_leader_hands_over_at_once(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    ops = replicas(cluster.kubeconfig, namespace, tmp_path)
    try:
        first = wait_for(lambda: leader_of(ops), timeout=30, what="one leader")
        standby = next(o for o in ops if o is not first)
        first.stop()  # SIGTERM: releases the lease
        stopped = time.monotonic()
        wait_for(lambda: "is the leader" in standby.log(), timeout=20, what="the standby to take over")
        assert time.monotonic() - stopped < 8
    finally:
        for op in ops:
            op.stop()
