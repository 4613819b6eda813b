"""Operations: metrics and health endpoints, and high availability (two replicas, one leader)."""

from __future__ import annotations

import ipaddress
import time
import uuid
from pathlib import Path

from kubernetes import client

from devcluster.envtest import free_port
from tests.conftest import Cluster
from tests.support import Agent, OperatorProcess, create_order, leader_of, replicas, sample, scrape, wait_for
from workorder_operator.leader import LeaseConfig


def listening_on(port: int) -> set[str]:
    """The IPv4 addresses a socket listens on at `port` (from /proc/net/tcp: state 0A is LISTEN)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(str(ipaddress.IPv4Address(bytes.fromhex(address)[::-1])))
    return found


def test_metrics_count_what_happened(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    port = free_port()
    op = OperatorProcess(
        cluster.kubeconfig, tmp_path / "operator.log", "--all-namespaces",
        f"--leader-election-namespace={namespace}", f"--metrics-port={port}",
    )  # fmt: skip
    try:
        op.start()
        assert scrape(port, "/healthz")[0] == 200
        # By default only this machine can reach it (a pod asks for 0.0.0.0 with --metrics-address).
        assert listening_on(port) == {"127.0.0.1"}
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


def lease_renewals(cluster: Cluster, namespace: str, count: int) -> list[str]:
    """Wait until the operators' Lease has been renewed `count` times; its renewTimes."""
    leases = client.CoordinationV1Api(cluster.api)
    seen: list[str] = []

    def renewed() -> bool:
        spec = leases.read_namespaced_lease("workorder-operator", namespace).spec
        if not seen or seen[-1] != str(spec.renew_time):
            seen.append(str(spec.renew_time))
        return len(seen) > count

    wait_for(renewed, timeout=30, interval=0.2, what=f"{count} renewals of the Lease")
    return seen


def test_two_replicas_one_acts_and_the_other_takes_over(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    ops = replicas(cluster.kubeconfig, namespace, tmp_path)
    try:
        first = wait_for(lambda: leader_of(ops), timeout=30, what="one leader")
        standby = next(o for o in ops if o is not first)
        # Several renewals by the leader (each read back here): the standby, which reads the Lease
        # as often, must still not lead.
        renewals = lease_renewals(cluster, namespace, 3)
        assert "is the leader" not in standby.log(), renewals

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
        # The standby takes over only once it has seen the Lease unrenewed for leaseDuration on its
        # own clock; the dead leader renewed at most one renewal period (plus a slow loop) before
        # the kill. A standby that ignored the Lease would lead within a renewal period.
        lease = LeaseConfig(namespace)
        assert takeover >= lease.lease_duration - 2 * lease.retry_period - 1, takeover
        create_order(cluster.api, namespace, "after", claimTimeoutSeconds=1)
        a.claim(a.read(namespace, "after"))
        wait_for(
            lambda: a.read(namespace, "after").status.phase == "Pending", timeout=10, what="expiry by the new leader"
        )
        wait_for(lambda: "after: expire" in standby.log(), timeout=10, what="the new leader's expiry log line")
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
