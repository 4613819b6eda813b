"""Operations: metrics and health endpoints, and high availability (two replicas, one leader)."""

from __future__ import annotations

import ipaddress
import re
import time
import uuid
from pathlib import Path

from kubernetes import client, config

from devcluster.envtest import free_port
from tests.conftest import Cluster
from tests.support import (
    REPO,
    Agent,
    OperatorProcess,
    applied,
    bind,
    create_order,
    leader_of,
    replicas,
    sample,
    scrape,
    wait_allowed,
    wait_for,
)
from workorder_operator.leader import LeaseConfig

RBAC_USERS = REPO / "deploy" / "base" / "rbac-users.yaml"


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
        f"--leader-election-namespace={namespace}", f"--metrics-port={port}", "--metrics-insecure",
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


def type_labels(text: str, prefix: str) -> set[str]:
    """The `type` label values starting with `prefix` (or "_other") in a scrape."""
    found = set(re.findall(r'type="([^"]*)"', text))
    return {t for t in found if t.startswith(prefix) or t == "_other"}


def series_of_all(text: str) -> list[str]:
    """The samples of a scrape that carry a `type` label."""
    return [line for line in text.splitlines() if not line.startswith("#") and 'type="' in line]


def series_of(text: str, work_type: str) -> int:
    """How many samples of a scrape carry type=`work_type`."""
    return sum(f'type="{work_type}"' in line for line in series_of_all(text))


def test_throwaway_work_types_leave_no_series(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    """A tenant (workorder-edit) creates orders of 200 work types, an agent (workorder-agent)
    claims them all (so every per-type family gets its series), the tenant deletes them: none of
    their series is left, and a new type gets a label of its own again. While they live, at most
    --metrics-max-types of them have series of their own, the rest share type="_other", so the
    series are bounded by the cap whatever the tenant creates."""
    port = free_port()
    op = OperatorProcess(
        cluster.kubeconfig, tmp_path / "operator.log", f"--namespace={namespace}",
        f"--leader-election-namespace={namespace}", f"--metrics-port={port}", "--metrics-insecure",
        "--metrics-max-types=50", "--no-build-agent",
    )  # fmt: skip
    with applied(cluster.kubeconfig, RBAC_USERS), op.running():
        bind(cluster.api, namespace, "workorder-edit", "tenant")
        bind(cluster.api, namespace, "workorder-agent", "agent")
        tenant = config.new_client_from_config(str(cluster.user_kubeconfig("tenant")))
        agent_api = config.new_client_from_config(str(cluster.user_kubeconfig("agent")))
        wait_allowed(tenant, "deletecollection", "workorders", namespace)
        wait_allowed(agent_api, "patch", "workorders/status", namespace)
        wait_for(lambda: sample(scrape(port)[1], "workorder_leader") == 1, timeout=30, what="leadership")
        a = Agent(agent_api, str(uuid.uuid4()))
        create_order(tenant, namespace, "sentinel", workType="sentinel")
        wait_for(lambda: "conditions" in a.read(namespace, "sentinel").raw_status, timeout=30, what="the watch")
        for i in range(200):
            create_order(tenant, namespace, f"t-{i}", workType=f"throwaway-{i}")
        for i in range(200):
            a.claim(a.read(namespace, f"t-{i}"))

        def all_claims_counted() -> str | None:
            text = scrape(port)[1]
            claims = sum(
                float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("workorder_transitions_total{") and 'transition="claim"' in line
                and ('type="throwaway-' in line or 'type="_other"' in line)
            )  # fmt: skip
            return text if claims == 200 else None

        text = wait_for(all_claims_counted, timeout=60, interval=0.5, what="200 claims counted")
        labels = type_labels(text, "throwaway-")
        # The sentinel took one of the 50 slots.
        assert len(labels) == 50 and "_other" in labels, sorted(labels)
        assert sample(text, "workorder_orders", phase="Claimed", type="_other") == 151
        # _other has as many series as one claimed type: at most 50 types' and _other's in all.
        per_type = series_of(text, "_other")
        assert per_type == series_of(text, "throwaway-0") > 0
        assert len(series_of_all(text)) <= (50 + 1) * per_type
        client.CustomObjectsApi(tenant).delete_collection_namespaced_custom_object(
            "workorder.dev", "v1alpha1", namespace, "workorders"
        )
        # Every order is gone (the sentinel too), so no type label remains at all.
        text = wait_for(
            lambda: (lambda s: s if not series_of_all(s) else None)(scrape(port)[1]),
            timeout=60, interval=0.5, what="every type's series gone",
        )  # fmt: skip
        assert "throwaway-" not in text and "_other" not in text
        # The families themselves stay (their HELP and TYPE lines), without series.
        assert "# TYPE workorder_transitions_total counter" in text
        # The slots came back: a new type has series of its own.
        create_order(tenant, namespace, "later", workType="later")
        wait_for(lambda: sample(scrape(port)[1], "workorder_orders", phase="Pending", type="later") == 1,
                 timeout=30, what="a label of its own")  # fmt: skip


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
