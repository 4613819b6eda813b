"""The queue engine against the real API server: transitions, compare-and-swap, deadlines, restarts."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from kubernetes import client

from tests.conftest import Cluster
from tests.support import DEFAULT_STATUS, Agent, OperatorProcess, create_order, wait_for
from workorder_operator.kube import Conflict
from workorder_operator.model import GROUP, PLURAL, VERSION, WorkOrder, parse_time


def agent(cluster: Cluster, **identity: object) -> Agent:
    return Agent(cluster.api, str(uuid.uuid4()), **identity)


def phase_is(a: Agent, ns: str, name: str, phase: str) -> WorkOrder | None:
    order = a.read(ns, name)
    return order if order.status.phase == phase else None


def condition(order: WorkOrder, ctype: str) -> dict[str, object]:
    return next(c for c in order.raw_status["conditions"] if c["type"] == ctype)


def test_new_order_is_pending_at_once_and_initialised_by_operator(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    created = create_order(cluster.api, namespace, "init")
    # CRD defaults: claimable the moment it exists, before the operator has looked at it.
    assert created["status"] == DEFAULT_STATUS
    a = agent(cluster)
    order = wait_for(lambda: (o := a.read(namespace, "init")).raw_status.get("conditions") and o)
    assert condition(order, "Succeeded")["status"] == "Unknown"
    assert condition(order, "Reconciling")["status"] == "True"
    assert condition(order, "Stalled")["status"] == "False"
    assert order.raw_status["observedGeneration"] == 1


def test_two_concurrent_claimers_exactly_one_wins(cluster: Cluster, namespace: str) -> None:
    create_order(cluster.api, namespace, "race")
    agents = [agent(cluster) for _ in range(2)]
    snapshot = agents[0].read(namespace, "race")
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def claim(a: Agent) -> None:
        barrier.wait()
        try:
            a.claim(snapshot)
            outcomes.append("won")
        except Conflict:
            outcomes.append("lost")

    threads = [threading.Thread(target=claim, args=(a,)) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["lost", "won"]
    order = agents[0].read(namespace, "race")
    assert order.status.attempt == 1
    assert order.status.claimed_by in {a.identity.id for a in agents}


def test_fail_with_retries_left_waits_exact_backoff_then_operator_makes_it_pending(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    create_order(cluster.api, namespace, "retry", backoffSeconds=1, maxRetries=3)
    a = agent(cluster)
    failed = a.fail(a.claim(a.read(namespace, "retry")), "disk full")
    assert failed.status.phase == "RetryPending"
    assert failed.status.retry_count == 1
    assert failed.status.next_retry_after is not None and failed.status.last_error_at is not None
    assert failed.status.next_retry_after - failed.status.last_error_at == dt.timedelta(seconds=2)  # 1 * 2^1
    pending = wait_for(lambda: phase_is(a, namespace, "retry", "Pending"), timeout=10)
    lateness = (pending.status.updated_at - failed.status.next_retry_after).total_seconds()  # type: ignore[operator]
    # Never early; late only by the operator's reaction time (a loaded machine's included).
    assert 0 <= lateness < 5, lateness
    # Second failure: 1 * 2^2 = 4 s.
    again = a.fail(a.claim(pending), "disk still full")
    assert again.status.retry_count == 2
    assert again.status.next_retry_after - again.status.last_error_at == dt.timedelta(seconds=4)  # type: ignore[operator]


def test_max_retries_zero_fails_at_once(cluster: Cluster, namespace: str) -> None:
    create_order(cluster.api, namespace, "once", maxRetries=0)
    a = agent(cluster)
    order = a.fail(a.claim(a.read(namespace, "once")), "exit 1")
    assert order.status.phase == "Failed"
    assert order.status.retry_count == 0
    assert condition(order, "Succeeded")["status"] == "False"
    assert condition(order, "Stalled")["status"] == "True"


def test_non_retryable_failure_goes_straight_to_failed(cluster: Cluster, namespace: str) -> None:
    create_order(cluster.api, namespace, "fatal", maxRetries=5)
    a = agent(cluster)
    order = a.fail(a.claim(a.read(namespace, "fatal")), "bad input", retryable=False)
    assert order.status.phase == "Failed"
    assert order.status.result == "bad input"
    assert order.raw_status["history"][-1]["outcome"] == "Failed"


def test_expiry_returns_to_pending_and_refuses_the_late_completion(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    create_order(cluster.api, namespace, "slow", claimTimeoutSeconds=2)
    a = agent(cluster)
    claimed = a.claim(a.read(namespace, "slow"))
    expired = wait_for(lambda: phase_is(a, namespace, "slow", "Pending"), timeout=10)
    assert expired.status.retry_count == 0
    assert a.identity.id in (expired.status.last_error or "")
    assert expired.raw_status["history"][-1]["outcome"] == "Expired"
    assert expired.status.claimed_by is None
    with pytest.raises(Conflict):
        a.complete(claimed, "too late")
    assert a.read(namespace, "slow").raw_status == expired.raw_status  # nothing changed
    core = client.CoreV1Api(cluster.api)
    wait_for(
        lambda: any(
            e.reason == "Expire" and e.type == "Warning" and e.involved_object.name == "slow"
            for e in core.list_namespaced_event(namespace).items
        ),
        timeout=5,
        what="an Expire event",
    )


def test_renewal_keeps_the_claim_past_its_timeout(cluster: Cluster, namespace: str, operator: OperatorProcess) -> None:
    create_order(cluster.api, namespace, "long", claimTimeoutSeconds=2)
    a = agent(cluster)
    order = a.claim(a.read(namespace, "long"))
    for _ in range(5):  # 5 s of work, renewed every second
        time.sleep(1)
        order = a.renew(order)
    done = a.complete(order, "sha256:abc")
    assert done.status.phase == "Completed"
    assert done.status.result == "sha256:abc"


def test_operator_restart_loses_nothing(cluster: Cluster, namespace: str, operator: OperatorProcess) -> None:
    """Deadlines that pass while the operator is down are acted on right after it comes back."""
    a = agent(cluster)
    create_order(cluster.api, namespace, "warm", claimTimeoutSeconds=3)
    claimed_before = a.claim(a.read(namespace, "warm"))
    operator.kill()
    create_order(cluster.api, namespace, "cold", claimTimeoutSeconds=2)
    a.claim(a.read(namespace, "cold"))
    create_order(cluster.api, namespace, "retry", backoffSeconds=1)
    a.fail(a.claim(a.read(namespace, "retry")))
    time.sleep(3.5)  # every deadline passes while nobody watches
    operator.start()
    started = time.monotonic()
    for name in ("warm", "cold", "retry"):
        wait_for(lambda n=name: phase_is(a, namespace, n, "Pending"), timeout=10, what=name)  # type: ignore[misc]
    assert time.monotonic() - started < 5
    warm = a.read(namespace, "warm")
    assert warm.status.attempt == claimed_before.status.attempt  # expired, not counted as a retry
    assert warm.status.retry_count == 0


def test_operator_starting_on_more_orders_than_one_page_acts_on_all(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    """The start-up listing is paged (limit and continue): every page reaches the engine, and the
    watch goes on from the listing's version (an order claimed after start-up expires too)."""
    a = agent(cluster)
    for i in range(7):
        create_order(cluster.api, namespace, f"o{i}", claimTimeoutSeconds=2)
        a.claim(a.read(namespace, f"o{i}"))
    with OperatorProcess(
        cluster.kubeconfig, tmp_path / "operator.log", "-n", namespace, "--no-leader-election",
        "--no-build-agent", "--list-page-size=2",
    ).running():  # fmt: skip
        for i in range(7):
            wait_for(lambda n=f"o{i}": phase_is(a, namespace, n, "Pending"), timeout=15, what=f"o{i}")  # type: ignore[misc]
        create_order(cluster.api, namespace, "late", claimTimeoutSeconds=1)
        a.claim(a.read(namespace, "late"))
        wait_for(lambda: phase_is(a, namespace, "late", "Pending"), timeout=15, what="late expired")


def test_ttl_deletes_finished_orders(cluster: Cluster, namespace: str, operator: OperatorProcess) -> None:
    ttl = 3
    create_order(cluster.api, namespace, "ttl", ttlSecondsAfterFinished=ttl)
    create_order(cluster.api, namespace, "kept")  # no TTL: stays
    a = agent(cluster)
    done = a.complete(a.claim(a.read(namespace, "ttl")))
    a.complete(a.claim(a.read(namespace, "kept")))
    assert done.status.phase == "Completed"  # the precondition: deleted because it finished
    assert done.status.completed_at is not None
    objects = client.CustomObjectsApi(cluster.api)

    def gone() -> dt.datetime | None:
        items = objects.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        # Read the clock after the answer: the deletion happened before this moment.
        return None if "ttl" in {o["metadata"]["name"] for o in items} else dt.datetime.now(dt.UTC)

    gone_by = wait_for(gone, timeout=ttl + 15, what="the order to be deleted")
    # Not before its TTL ran out, counted from completedAt (the operator's clock is this machine's).
    assert gone_by >= done.status.completed_at + dt.timedelta(seconds=ttl), (gone_by, done.status.completed_at)
    core = client.CoreV1Api(cluster.api)
    wait_for(
        lambda: any(
            e.reason == "Deleted" and e.involved_object.name == "ttl" and "ttlSecondsAfterFinished" in e.message
            for e in core.list_namespaced_event(namespace).items
        ),
        timeout=10,
        what="a Deleted event",
    )
    assert a.read(namespace, "kept").status.phase == "Completed"


def kubectl(cluster: Cluster, *args: str) -> str:
    out = subprocess.run(
        ["kubectl", "--kubeconfig", str(cluster.kubeconfig), *args], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_printer_columns_and_kubectl_wait(cluster: Cluster, namespace: str, operator: OperatorProcess) -> None:
    # REASON from the first read of a new order, before the operator or any agent has written anything.
    create_order(cluster.api, namespace, "newborn")
    first = kubectl(cluster, "get", "wo", "newborn", "-n", namespace, "-o", "wide").splitlines()
    assert first[1][first[0].index("REASON") :].split() == ["Pending"], first  # the last column
    create_order(cluster.api, namespace, "shown", backoffSeconds=600)
    a = agent(cluster)
    a.fail(a.claim(a.read(namespace, "shown")), "flaky")
    table = kubectl(cluster, "get", "wo", "-n", namespace)
    header, row = table.splitlines()[0], next(r for r in table.splitlines() if r.startswith("shown"))
    assert header.split() == ["NAME", "TYPE", "PHASE", "CLAIMED-BY", "RETRIES", "AGE"]
    assert row.split()[:3] == ["shown", "test", "RetryPending"]
    wide = kubectl(cluster, "get", "workorders", "-n", namespace, "-o", "wide")
    assert "NEXT-RETRY" in wide and "REASON" in wide and "<invalid>" not in wide and "RetryBackoff" in wide
    assert "shown" in kubectl(cluster, "get", "workqueue", "-n", namespace)  # category

    create_order(cluster.api, namespace, "waited")
    waiter = subprocess.Popen(
        ["kubectl", "--kubeconfig", str(cluster.kubeconfig), "wait", "-n", namespace,
         "--for=condition=Succeeded", "wo/waited", "--timeout=30s"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(1)
        a.complete(a.claim(a.read(namespace, "waited")))
        out, err = waiter.communicate(timeout=40)
    finally:
        waiter.kill()
    assert waiter.returncode == 0, err
    assert "condition met" in out


def test_field_selectors_find_pending_orders_of_a_type(cluster: Cluster, namespace: str) -> None:
    create_order(cluster.api, namespace, "t1")
    create_order(cluster.api, namespace, "b1", workType="backup")
    a = agent(cluster)
    a.claim(a.read(namespace, "t1"))
    create_order(cluster.api, namespace, "t2")
    found = client.CustomObjectsApi(cluster.api).list_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, field_selector="spec.workType=test,status.phase=Pending"
    )
    assert [o["metadata"]["name"] for o in found["items"]] == ["t2"]


INVALID_SPECS = [
    ({"workType": ""}, "spec.workType"),
    ({"workType": "has space"}, "spec.workType"),
    ({"workType": "x" * 51}, "spec.workType"),
    ({"yamlContent": ""}, "spec.yamlContent"),
    ({"yamlContent": "   \n"}, "spec.yamlContent"),
    ({"maxRetries": -1}, "spec.maxRetries"),
    ({"maxRetries": 101}, "spec.maxRetries"),
    ({"backoffSeconds": 0}, "spec.backoffSeconds"),
    ({"claimTimeoutSeconds": 0}, "spec.claimTimeoutSeconds"),
    ({"maxBackoffSeconds": 0}, "spec.maxBackoffSeconds"),
    ({"backoffSeconds": 100, "maxBackoffSeconds": 50}, "spec.maxBackoffSeconds"),
    ({"ttlSecondsAfterFinished": -1}, "spec.ttlSecondsAfterFinished"),
    ({"targeting": {"agentIds": ["not-a-uuid"]}}, "spec.targeting.agentIds"),
    ({"targeting": {"labels": ["two words"]}}, "spec.targeting.labels"),
    ({"targeting": {"labels": ["x" * 65]}}, "spec.targeting.labels"),
    ({"targeting": {"annotations": {"zone": "a b"}}}, "spec.targeting.annotations"),
    ({"targeting": {"annotations": {"k" * 65: "v"}}}, "spec.targeting.annotations"),
    ({"priority": "high"}, "spec.priority"),
    ({"unknownField": 1}, "spec.unknownField"),
]


@pytest.mark.parametrize(("spec", "field"), INVALID_SPECS, ids=[f for _, f in INVALID_SPECS])
def test_invalid_specs_are_refused_naming_the_field(
    cluster: Cluster, namespace: str, spec: dict[str, object], field: str
) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "WorkOrder",
        "metadata": {"name": "bad"},
        "spec": {"workType": "test", "yamlContent": "a: 1", **spec},
    }
    with pytest.raises(client.ApiException) as err:
        client.CustomObjectsApi(cluster.api).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body, field_validation="Strict"
        )
    assert err.value.status in (400, 422)
    message = json.loads(err.value.body)["message"]
    assert field in message, message


def test_spec_is_immutable(cluster: Cluster, namespace: str) -> None:
    create_order(cluster.api, namespace, "fixed")
    with pytest.raises(client.ApiException) as err:
        client.CustomObjectsApi(cluster.api).patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "fixed", {"spec": {"priority": 5}}
        )
    assert err.value.status == 422
    assert "immutable" in json.loads(err.value.body)["message"]


def test_missing_spec_is_refused(cluster: Cluster, namespace: str) -> None:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "WorkOrder", "metadata": {"name": "empty"}}
    with pytest.raises(client.ApiException) as err:
        client.CustomObjectsApi(cluster.api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    assert "spec" in json.loads(err.value.body)["message"]


def test_status_timestamps_are_rfc3339_with_subseconds(cluster: Cluster, namespace: str) -> None:
    create_order(cluster.api, namespace, "ts")
    a = agent(cluster)
    order = a.claim(a.read(namespace, "ts"))
    stamp = order.raw_status["claimedAt"]
    assert stamp.endswith("Z") and "." in stamp
    assert parse_time(stamp).tzinfo is not None


def test_kubectl_events_tell_the_whole_story_of_an_order(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    """Issue 17: claimed by whom, failed (retryable, with the error), retry due, claimed again,
    completed; and a refused order says why. Read with a real `kubectl events --for`."""
    from workorder_operator.agent import Agent as SdkAgent

    def told(name: str, count: int) -> list[str] | None:
        out = kubectl(cluster, "events", "-n", namespace, "--for", f"workorder/{name}", "-o", "json")
        items = json.loads(out)["items"] if out.strip().startswith("{") else []  # else "No events found."
        lines = [f"{e['type']} {e['reason']}: {e['message']}" for e in items]
        return lines if len(lines) >= count else None

    # Transitions made while no operator leads are in the status history, not in events: first
    # make sure this one leads and watches (its Reject of an order it will not run proves both).
    create_order(cluster.api, namespace, "refused", workType="build", yamlContent="kind: ConfigMap\n")
    # Refused at initialisation ("rejected: ...") or, when the build agent claimed it first, by the
    # build agent ("build refused: ..."): either way a Reject with the reason.
    wait_for(
        lambda: any(s.startswith("Warning Reject: ") and "kind ConfigMap" in s for s in told("refused", 1) or []),
        timeout=30,
        what="a Reject event on wo/refused",
    )

    create_order(cluster.api, namespace, "story", backoffSeconds=1)
    sdk = SdkAgent(cluster.api, str(uuid.uuid4()), namespace=namespace)
    first = sdk.claim(WorkOrder.from_body(sdk.orders.get(namespace, "story")))
    assert first is not None
    first.fail("disk full")
    second = wait_for(lambda: sdk.claim_next(), timeout=15, what="the retry to fall due")
    second.complete("sha256:abc")

    story = wait_for(lambda: told("story", 5), timeout=15, what="five events on wo/story")
    user = sdk.user
    assert any(s.startswith("Normal Claim: attempt 1 claimed by agent " + sdk.id + f" (user {user})") for s in story)
    assert any(
        s.startswith("Warning Fail: attempt 1 of agent") and "retryable" in s and "disk full" in s for s in story
    )
    assert any(s.startswith("Normal Due: retry 1 of 3 due") for s in story)
    assert any(s.startswith("Normal Claim: attempt 2 claimed by agent " + sdk.id) for s in story)
    assert any(s == f"Normal Complete: attempt 2 completed by agent {sdk.id}: result sha256:abc" for s in story)
    assert len(story) == 5, story  # once each: no replica, no echo of our own write posts twice
    # Log lines name their logger in full (kopf's format cut it to 20 characters: workorder_operator.e).
    assert "] workorder_operator.engine [INFO    ]" in operator.log(), operator.log()[-2000:]
    # The plain table a person reads says the same.
    assert "attempt 2 completed" in kubectl(cluster, "events", "-n", namespace, "--for", "wo/story")
