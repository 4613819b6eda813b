"""No gaps in fencing and failover, on the real control plane: uid fencing across delete and
re-create, leadership flapping through a burst of deadlines, TTL deletion as a compare-and-swap,
a minimal agent in "any language" (kubectl and JSON Patch) with `kubectl wait`, resumed claims,
the single-namespace build agent, and a frozen API server (SIGSTOP) under two operators."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config, watch

from tests.conftest import Cluster
from tests.support import Agent, OperatorProcess, RunningAgent, create_order, leader_of, replicas, wait_for
from tests.tekton import KANIKO_BUILD
from workorder_operator import envtest, lifecycle
from workorder_operator.agent import Agent as SdkAgent
from workorder_operator.agent import Claim, ClaimLost
from workorder_operator.engine import Engine
from workorder_operator.kube import OPERATOR_MANAGER, WorkOrders, api_client
from workorder_operator.model import GROUP, PLURAL, VERSION, WorkOrder, format_time, parse_time, utcnow

AGENT_ID = "7d3a9c1e-4b2f-4e8a-9c6d-5f1e2a3b4c5d"


def read(cluster: Cluster, namespace: str, name: str) -> WorkOrder:
    return WorkOrder.from_body(WorkOrders(cluster.api, "test").get(namespace, name))


def gone(cluster: Cluster, namespace: str, name: str) -> bool:
    try:
        WorkOrders(cluster.api, "test").get(namespace, name)
    except Exception:
        return True
    return False


# --- item 1: every status write tests the uid ---------------------------------------------------


def test_a_handle_of_a_deleted_order_cannot_complete_its_recreated_namesake(cluster: Cluster, namespace: str) -> None:
    agent = SdkAgent(cluster.api, AGENT_ID, namespace=namespace)
    create_order(cluster.api, namespace, "x")
    old = agent.claim(read(cluster, namespace, "x"))
    assert old is not None and old.attempt == 1

    client.CustomObjectsApi(cluster.api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "x")
    wait_for(lambda: gone(cluster, namespace, "x"), timeout=15, what="x deleted")
    create_order(cluster.api, namespace, "x")
    new = agent.claim(read(cluster, namespace, "x"))
    assert new is not None and new.attempt == 1  # same name, same agent, same attempt: only the uid differs

    with pytest.raises(ClaimLost):
        old.complete("result of the deleted order")
    order = read(cluster, namespace, "x")
    assert order.status.phase == "Claimed" and order.status.result is None
    new.complete("fresh")
    assert read(cluster, namespace, "x").status.result == "fresh"


# --- item 9: conditions are the operator's backstop ---------------------------------------------


def kubectl(cluster: Cluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kubectl", "--kubeconfig", str(cluster.kubeconfig), *args], capture_output=True, text=True, timeout=timeout
    )


def status_patch(cluster: Cluster, namespace: str, name: str, ops: list[dict[str, Any]]) -> None:
    out = kubectl(
        cluster, "patch", "workorder", name, "-n", namespace, "--subresource=status", "--type=json", "-p",
        json.dumps(ops),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr


def test_a_minimal_agent_writing_only_the_spec_fields_gets_conditions_and_kubectl_wait_returns(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    """The agent is kubectl and JSON Patch: exactly what README "A minimal agent in any language"
    says, nothing from this project's code."""
    create_order(cluster.api, namespace, "raw")
    uid = read(cluster, namespace, "raw").uid
    now = format_time(utcnow())
    status_patch(cluster, namespace, "raw", [
        {"op": "test", "path": "/metadata/uid", "value": uid},
        {"op": "test", "path": "/status/phase", "value": "Pending"},
        {"op": "test", "path": "/status/attempt", "value": 0},
        {"op": "replace", "path": "/status/phase", "value": "Claimed"},
        {"op": "add", "path": "/status/claimedBy", "value": AGENT_ID},
        {"op": "add", "path": "/status/claimedAt", "value": now},
        {"op": "replace", "path": "/status/attempt", "value": 1},
    ])  # fmt: skip
    status_patch(cluster, namespace, "raw", [
        {"op": "test", "path": "/metadata/uid", "value": uid},
        {"op": "test", "path": "/status/phase", "value": "Claimed"},
        {"op": "test", "path": "/status/claimedBy", "value": AGENT_ID},
        {"op": "test", "path": "/status/attempt", "value": 1},
        {"op": "replace", "path": "/status/phase", "value": "Completed"},
        {"op": "add", "path": "/status/completedAt", "value": format_time(utcnow())},
        {"op": "add", "path": "/status/result", "value": "sha256:abc"},
    ])  # fmt: skip
    waited = kubectl(
        cluster, "wait", "--for=condition=Succeeded", "workorder/raw", "-n", namespace, "--timeout=60s", timeout=90
    )
    assert waited.returncode == 0, waited.stderr
    status = read(cluster, namespace, "raw").raw_status
    assert status["observedGeneration"] == 1
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Succeeded": "True", "Reconciling": "False", "Stalled": "False",
    }  # fmt: skip
    # The agent's own fields are as it wrote them.
    assert status["result"] == "sha256:abc" and status["claimedBy"] == AGENT_ID and status["attempt"] == 1


# --- item 3: TTL deletion is a compare-and-swap -------------------------------------------------


def test_an_order_requeued_just_as_its_ttl_falls_due_is_not_deleted(cluster: Cluster, namespace: str) -> None:
    """The engine runs in the test (its clock is the test's); the API server is real, so the
    delete's preconditions are the API server's own."""
    agent = Agent(cluster.api, AGENT_ID)
    create_order(cluster.api, namespace, "ttl", ttlSecondsAfterFinished=30)
    failed = agent.fail(agent.claim(agent.read(namespace, "ttl")), "broken", retryable=False)
    assert failed.status.phase == "Failed"
    seen = WorkOrders(cluster.api, "test").get(namespace, "ttl")  # what the engine saw last
    admin = WorkOrders(cluster.api, "kubectl-workorder")
    admin.write_status(failed, lifecycle.requeue(failed, utcnow()))  # the watch has not told the engine yet
    events: list[str] = []

    async def main() -> None:
        clock = [utcnow()]
        engine = Engine(
            WorkOrders(api_client(str(cluster.kubeconfig)), OPERATOR_MANAGER),
            post_event=lambda _o, _kind, reason, _message: events.append(reason),
            clock=lambda: clock[0],
        )
        try:
            engine.observe("MODIFIED", seen)
            clock[0] += dt.timedelta(seconds=31)
            engine.scheduler.run_due()
            await asyncio.wait_for(engine.scheduler.idle(), 30)
        finally:
            engine._event_pool.shutdown(wait=True)
            engine.close()

    asyncio.run(main())
    assert not gone(cluster, namespace, "ttl"), "the requeued order was deleted"
    assert read(cluster, namespace, "ttl").status.phase == "Pending"
    assert "Deleted" not in events


# --- item 2: a flapping leader handles each deadline exactly once -------------------------------


class Feed:
    """What kopf does for the operator: list, then watch, and hand every event to the engine (on
    its loop)."""

    def __init__(self, cluster: Cluster, namespace: str, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        self.api = api_client(str(cluster.kubeconfig))
        self.namespace, self.engine, self.loop = namespace, engine, loop
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="test-feed", daemon=True)

    def _run(self) -> None:
        objects = client.CustomObjectsApi(self.api)
        listing = objects.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
        for body in listing["items"]:
            self.loop.call_soon_threadsafe(self.engine.observe, None, body)
        version = listing["metadata"]["resourceVersion"]
        while not self.stop.is_set():
            for event in watch.Watch().stream(
                objects.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL,
                resource_version=version, timeout_seconds=1,
            ):  # fmt: skip
                version = event["object"]["metadata"]["resourceVersion"]
                self.loop.call_soon_threadsafe(self.engine.observe, event["type"], event["object"])

    def __enter__(self) -> Feed:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(10)


def test_leadership_flapping_through_a_burst_of_deadlines_handles_each_exactly_once(
    cluster: Cluster, namespace: str
) -> None:
    agent = Agent(cluster.api, AGENT_ID)
    names = [f"burst-{i}" for i in range(40)]
    for name in names:
        create_order(cluster.api, namespace, name, claimTimeoutSeconds=2)
    for name in names:
        agent.claim(agent.read(namespace, name))  # all fall due within about a second of each other

    async def main() -> None:
        rng = random.Random(11)
        engine = Engine(WorkOrders(api_client(str(cluster.kubeconfig), pool=8), OPERATOR_MANAGER), concurrency=4)
        with Feed(cluster, namespace, engine, asyncio.get_running_loop()):
            try:
                for _ in range(50):  # about 6 s of losing and regaining leadership
                    engine.lead()
                    await asyncio.sleep(rng.uniform(0, 0.15))
                    await engine.follow()
                    await asyncio.sleep(rng.uniform(0, 0.08))
                engine.lead()  # leader for good
                for _ in range(600):
                    orders = await asyncio.to_thread(lambda: [agent.read(namespace, n) for n in names])
                    if all(o.status.phase == "Pending" for o in orders):
                        break
                    await asyncio.sleep(0.05)
            finally:
                await engine.follow()
                engine.close()

    asyncio.run(main())
    for name in names:
        order = agent.read(namespace, name)
        assert order.status.phase == "Pending", f"{name} is still {order.status.phase}"
        outcomes = [h["outcome"] for h in order.raw_status["history"]]
        assert outcomes == ["Expired"], f"{name}: {outcomes}"


# --- item 8: a resumed claim is renewed at once -------------------------------------------------


@pytest.mark.usefixtures("no_threads_left")
def test_a_resumed_claim_is_renewed_before_its_work_goes_on(cluster: Cluster, namespace: str) -> None:
    create_order(cluster.api, namespace, "long", claimTimeoutSeconds=30)
    first = SdkAgent(api_client(str(cluster.kubeconfig)), AGENT_ID, namespace=namespace)
    claimed = first.claim(read(cluster, namespace, "long"))
    assert claimed is not None and claimed.order.status.renewed_at is None
    # The agent restarts (a new process with the same id) and resumes the claim it holds.
    seen: list[WorkOrder] = []

    def handler(claim: Claim) -> str:
        seen.append(read(cluster, namespace, "long"))
        return "resumed"

    restarted = SdkAgent(api_client(str(cluster.kubeconfig)), AGENT_ID, namespace=namespace)
    running = RunningAgent(restarted, handler, resume=True).start()
    try:
        wait_for(lambda: read(cluster, namespace, "long").status.phase == "Completed", timeout=30)
    finally:
        running.join()
    assert seen[0].status.renewed_at is not None, "the resumed claim was not renewed before the work went on"
    assert seen[0].status.attempt == 1


# --- item 11: single-namespace mode applies to the build agent ----------------------------------


def test_a_single_namespace_operator_builds_only_in_its_namespace(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    core = client.CoreV1Api(cluster.api)
    other = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace({"metadata": {"name": other, "labels": {"workorder.dev/test": "true"}}})
    op = OperatorProcess(
        cluster.kubeconfig, tmp_path / "operator.log", "--namespace", namespace,
        f"--leader-election-namespace={namespace}", "--build-registration-timeout=600",
    )  # fmt: skip
    try:
        # The other namespace's order is older: an agent listing cluster-wide takes it first.
        create_order(cluster.api, other, "elsewhere", workType="build", yamlContent=KANIKO_BUILD.format(name="b"))
        op.start()
        create_order(cluster.api, namespace, "mine", workType="build", yamlContent=KANIKO_BUILD.format(name="b"))
        wait_for(lambda: read(cluster, namespace, "mine").status.phase == "Claimed", timeout=30, what="mine claimed")
        assert read(cluster, other, "elsewhere").status.phase == "Pending"
        assert read(cluster, other, "elsewhere").status.claimed_by is None
    finally:
        op.stop()
        core.delete_namespace(other)


# --- item 4: a frozen API server and two operators ----------------------------------------------

AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Request
    resources: [{group: coordination.k8s.io, resources: [leases]}]
    verbs: [create, update, patch]
  - level: Metadata
    resources: [{group: workorder.dev, resources: [workorders, workorders/status]}]
    verbs: [create, update, patch, delete]
  - level: None
"""
LEASE_SECONDS = 15  # LeaseConfig's default lease duration, what the operators run with
FREEZE_SECONDS = 20  # longer than the lease


@pytest.fixture
def audited_plane(tmp_path: Path) -> Iterator[tuple[envtest.ControlPlane, Path]]:
    """A control plane of this test's own (it is frozen, and its API server keeps an audit log:
    the server's own record of who wrote what, when)."""
    if os.environ.get("TEST_KUBECONFIG"):
        pytest.skip("freezes the API server process: needs the local control plane")
    plane = envtest.ControlPlane(tmp_path / "plane")
    plane.start()
    try:
        policy, audit = tmp_path / "audit-policy.yaml", tmp_path / "audit.log"
        policy.write_text(AUDIT_POLICY)
        plane.args["kube-apiserver"] += [
            f"--audit-policy-file={policy}", f"--audit-log-path={audit}", "--audit-log-format=json",
            "--audit-log-mode=blocking",
        ]  # fmt: skip
        plane.restart(down=0)
        api = config.new_client_from_config(str(plane.kubeconfig))
        envtest.install_crds(api, envtest.workorder_crds() + envtest.shipwright_crds())
        yield plane, audit
    finally:
        plane.stop()


def writes_outside_the_lease(audit: Path, identity: str) -> list[str]:
    """Every successful write to a WorkOrder by this operator that the API server made later than
    LEASE_SECONDS after the renewTime of this operator's latest successful lease write before it."""
    agent = f"{OPERATOR_MANAGER}/{identity}"
    leases: list[tuple[dt.datetime, dt.datetime]] = []  # (server time of the write, renewTime written)
    bad = []
    for line in audit.read_text().splitlines():
        e = json.loads(line)
        if not e.get("userAgent", "").startswith(agent) or e.get("stage") != "ResponseComplete":
            continue
        if e.get("responseStatus", {}).get("code", 500) >= 300:
            continue
        at = parse_time(e["stageTimestamp"])
        resource = e["objectRef"]["resource"]
        if resource == "leases":
            renewed = (e.get("requestObject") or {}).get("spec", {}).get("renewTime")
            if renewed:
                leases.append((at, parse_time(renewed)))
        elif resource == "workorders":
            valid = [r for written, r in leases if written <= at]
            if not valid or at > max(valid) + dt.timedelta(seconds=LEASE_SECONDS):
                bad.append(f"{e['verb']} {e['objectRef'].get('name')} at {e['stageTimestamp']}, lease {valid[-1:]}")
    return bad


def test_a_frozen_api_server_the_old_leader_writes_nothing_after_its_lease_ran_out(
    audited_plane: tuple[envtest.ControlPlane, Path], tmp_path: Path
) -> None:
    plane, audit = audited_plane
    api = config.new_client_from_config(str(plane.kubeconfig))
    namespace = "frozen"
    client.CoreV1Api(api).create_namespace({"metadata": {"name": namespace}})
    ops = replicas(plane.kubeconfig, namespace, tmp_path)
    try:
        old = wait_for(lambda: leader_of(ops), timeout=60, what="one leader")
        agent = Agent(api, AGENT_ID)
        names = [f"o-{i}" for i in range(12)]
        for i, name in enumerate(names):
            create_order(api, namespace, name, claimTimeoutSeconds=4 + i % 4)
            agent.claim(agent.read(namespace, name))
        # Every claim falls due while the API server is frozen: the leader tries to expire them
        # then, and its lease runs out before the server answers again.
        pid = plane.processes["kube-apiserver"].pid
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(FREEZE_SECONDS)  # the scenario itself: a freeze longer than the lease
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(
            lambda: all(agent.read(namespace, n).status.phase == "Pending" for n in names),
            timeout=90, interval=0.5, what="every claim expired after the freeze",
        )  # fmt: skip
        for name in names:
            assert [h["outcome"] for h in agent.read(namespace, name).raw_status["history"]] == ["Expired"]
    finally:
        for op in ops:
            op.stop()
    for op in ops:
        assert writes_outside_the_lease(audit, op.identity) == [], f"{op.identity} wrote outside its lease"
    assert "could not renew it in time" in old.log(), "the old leader never stepped down"
    # The check has something to check: the operators' writes are in the audit log.
    assert any(
        f"{OPERATOR_MANAGER}/{op.identity}" in line and '"workorders"' in line
        for op in ops
        for line in audit.read_text().splitlines()
    )
