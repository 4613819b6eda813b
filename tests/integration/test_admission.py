"""The API server refuses illegal status writes (deploy/admission.yaml), whoever sends them.

Agents here are real identities (client certificates) with only the agent's rights; every
illegal write is sent with the real client and must come back refused with a readable message,
and every legal one must still pass."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from tests.conftest import Cluster
from tests.support import API_ERRORS, OperatorProcess, admission_policies, bind_rules, create_order, wait_for
from workorder_operator import lifecycle
from workorder_operator.agent import Agent, Claim, ClaimLost
from workorder_operator.kube import WorkOrders
from workorder_operator.lifecycle import StatusWrite
from workorder_operator.model import WorkOrder, format_time, utcnow

REPO = Path(__file__).resolve().parents[2]
AGENT_RULES = [
    {"apiGroups": ["workorder.dev"], "resources": ["workorders"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["workorder.dev"], "resources": ["workorders/status"], "verbs": ["get", "patch"]},
]


@pytest.fixture(scope="module")
def policy(cluster: Cluster) -> Iterator[None]:
    with admission_policies(cluster.kubeconfig, REPO / "deploy" / "base" / "admission.yaml"):
        yield


def identity(cluster: Cluster, namespace: str, user: str, groups: tuple[str, ...] = ()) -> client.ApiClient:
    rbac = client.RbacAuthorizationV1Api(cluster.api)
    name = f"agent-{user.replace(':', '-')}"[:60]
    try:
        rbac.create_namespaced_role(namespace, {"metadata": {"name": "agent"}, "rules": AGENT_RULES})
    except API_ERRORS as exc:
        if exc.status != 409:
            raise
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "agent"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    })  # fmt: skip
    return config.new_client_from_config(str(cluster.user_kubeconfig(user, groups)))


def refused(write: Callable[[], Any], *words: str) -> str:
    """The write must be refused by the policy; returns its message."""
    with pytest.raises(API_ERRORS) as err:
        write()
    assert err.value.status in (403, 422), err.value
    message = str(json.loads(err.value.body)["message"])
    assert "workorder-status-transitions" in message, message
    for word in words:
        assert word in message, message
    return message


def raw_write(api: client.ApiClient, order: WorkOrder, status: dict[str, Any]) -> None:
    """A status write that bypasses the lifecycle's own checks (as a buggy or hostile agent would)."""
    WorkOrders(api, "rogue").write_status(order, StatusWrite("rogue", {"/status": order.raw_status}, status))


@pytest.fixture
def alice(cluster: Cluster, namespace: str, policy: None) -> Agent:
    return Agent(identity(cluster, namespace, "alice"), str(uuid.uuid4()), namespace=namespace)


@pytest.fixture
def bob(cluster: Cluster, namespace: str, policy: None) -> Agent:
    return Agent(identity(cluster, namespace, "bob"), str(uuid.uuid4()), namespace=namespace)


def wait_until_enforced(cluster: Cluster, namespace: str, alice: Agent) -> None:
    """A new policy takes a moment to load: probe with a write it must refuse."""
    create_order(cluster.api, namespace, "probe")

    def enforced() -> bool:
        # Pending stays Pending (a write that slips through before the policy loads leaves the
        # probe usable), but something changes: an agent may not do that.
        order = WorkOrder.from_body(alice.orders.get(namespace, "probe"))
        try:
            raw_write(alice.api, order, {**order.raw_status, "lastError": f"probe {uuid.uuid4()}"})
        except API_ERRORS as exc:
            return exc.status in (403, 422) and "workorder-status-transitions" in (exc.body or "")
        return False

    wait_for(enforced, timeout=20, interval=0.5, what="the admission policy to be enforced")


def test_the_legal_life_of_an_order_passes(cluster: Cluster, namespace: str, alice: Agent) -> None:
    wait_until_enforced(cluster, namespace, alice)
    create_order(cluster.api, namespace, "legal", maxRetries=1, backoffSeconds=1)
    claim = alice.claim(WorkOrder.from_body(alice.orders.get(namespace, "legal")))
    assert claim is not None
    assert claim.order.raw_status["claimedByUser"] == "alice"
    claim.renew()
    claim.fail("first try failed")  # RetryPending, retryCount 1
    order = WorkOrder.from_body(alice.orders.get(namespace, "legal"))
    assert order.status.phase == "RetryPending" and order.status.retry_count == 1
    ops = WorkOrders(cluster.api, "test")  # the operator's move (exempt): due
    ops.write_status(order, lifecycle.due(order, utcnow() + dt.timedelta(hours=1)))
    claim = alice.claim(WorkOrder.from_body(alice.orders.get(namespace, "legal")))
    assert claim is not None
    claim.release("maintenance")
    claim = alice.claim(WorkOrder.from_body(alice.orders.get(namespace, "legal")))
    assert claim is not None
    claim.fail("gave up", retryable=False)
    failed = WorkOrder.from_body(alice.orders.get(namespace, "legal"))
    assert failed.status.phase == "Failed" and failed.status.retry_count == 1
    # Requeue is an admin's move (tests/integration/test_tenancy.py shows an agent refused).
    bind_rules(cluster.api, namespace, "lead", [{"apiGroups": ["workorder.dev"], "resources": ["workorders"],
                                                 "verbs": ["update"]}, *AGENT_RULES])  # fmt: skip
    lead = WorkOrders(identity(cluster, namespace, "lead"), "lead")
    wait_for(lambda: _requeued(lead, failed), timeout=20, what="the lead's requeue to be allowed")
    claim = alice.claim(WorkOrder.from_body(alice.orders.get(namespace, "legal")))
    assert claim is not None
    claim.complete("done")
    assert WorkOrder.from_body(alice.orders.get(namespace, "legal")).status.phase == "Completed"


def _lead_may_update(api: client.ApiClient, namespace: str) -> bool:
    attrs = {"verb": "update", "group": "workorder.dev", "resource": "workorders", "namespace": namespace}
    review = client.AuthorizationV1Api(api).create_self_subject_access_review({"spec": {"resourceAttributes": attrs}})
    return bool(review.status.allowed)


def _requeued(orders: WorkOrders, failed: WorkOrder) -> bool:
    try:
        orders.write_status(failed, lifecycle.requeue(failed, utcnow()))
    except API_ERRORS as exc:
        if "admin transition" in (exc.body or ""):
            return False  # the lead's RBAC has not reached the authorizer yet
        raise
    return True


def test_another_identity_cannot_act_on_a_claim(cluster: Cluster, namespace: str, alice: Agent, bob: Agent) -> None:
    wait_until_enforced(cluster, namespace, alice)
    create_order(cluster.api, namespace, "mine")
    claim = alice.claim(WorkOrder.from_body(alice.orders.get(namespace, "mine")))
    assert claim is not None
    order = claim.order
    # Bob knows alice's agent id and the attempt: the compare-and-swap guards would pass, the policy does not.
    for make in (
        lambda: lifecycle.complete(order, claim.agent.id, order.status.attempt, "stolen", utcnow()),
        lambda: lifecycle.renew(order, claim.agent.id, order.status.attempt, utcnow()),
        lambda: lifecycle.fail(order, claim.agent.id, order.status.attempt, "sabotage", utcnow()),
        lambda: lifecycle.release(order, claim.agent.id, order.status.attempt, utcnow()),
    ):
        refused(lambda m=make: bob.orders.write_status(order, m()), "belongs to alice", "not to bob")  # type: ignore[misc]
    assert WorkOrder.from_body(alice.orders.get(namespace, "mine")).raw_status == order.raw_status


def test_illegal_writes_are_refused_with_a_readable_reason(cluster: Cluster, namespace: str, alice: Agent) -> None:
    wait_until_enforced(cluster, namespace, alice)
    create_order(cluster.api, namespace, "target", maxRetries=2)
    pending = WorkOrder.from_body(alice.orders.get(namespace, "target"))
    now = utcnow()
    legal = lifecycle.claim(pending, alice.identity, now, "alice").status

    refused(lambda: raw_write(alice.api, pending, {**pending.raw_status, "phase": "Completed"}), "Pending -> Completed")
    refused(lambda: raw_write(alice.api, pending, {**legal, "attempt": pending.status.attempt + 2}), "attempt")
    refused(lambda: raw_write(alice.api, pending, {**legal, "claimedByUser": "bob"}), "claimedByUser")
    refused(
        lambda: raw_write(alice.api, pending, {k: v for k, v in legal.items() if k != "claimedByUser"}), "claimedByUser"
    )
    refused(lambda: raw_write(alice.api, pending, {**legal, "retryCount": 5}), "retryCount")

    claim = alice.claim(pending)
    assert claim is not None
    held = claim.order
    failed_twice = lifecycle.fail(held, alice.id, held.status.attempt, "x", utcnow()).status
    refused(lambda: raw_write(alice.api, held, {**failed_twice, "retryCount": 2}), "retryCount")
    renewed = lifecycle.renew(held, alice.id, held.status.attempt, utcnow()).status
    refused(
        lambda: raw_write(alice.api, held, {**renewed, "history": [{"attempt": 9, "outcome": "Succeeded"}]}), "renewal"
    )
    refused(lambda: raw_write(alice.api, held, {**renewed, "attempt": 7}), "attempt")

    # Retries beyond maxRetries: the order must be Failed instead.
    create_order(cluster.api, namespace, "nomore", maxRetries=0)
    zero = WorkOrder.from_body(alice.orders.get(namespace, "nomore"))
    zclaim = alice.claim(zero)
    assert zclaim is not None
    forced = lifecycle.fail(zclaim.order, alice.id, zclaim.attempt, "x", utcnow()).status
    sneaky = {**forced, "phase": "RetryPending", "retryCount": 1, "nextRetryAfter": forced["updatedAt"]}
    refused(lambda: raw_write(alice.api, zclaim.order, sneaky), "maxRetries")

    # Requeue is not an agent's move at all; an admin's must reset retries and keep the attempt.
    zclaim.fail("final", retryable=False)
    failed = WorkOrder.from_body(alice.orders.get(namespace, "nomore"))
    requeued = lifecycle.requeue(failed, utcnow()).status
    refused(lambda: raw_write(alice.api, failed, requeued), "admin transition", "alice may not update")
    bind_rules(cluster.api, namespace, "lead", [{"apiGroups": ["workorder.dev"], "resources": ["workorders"],
                                                 "verbs": ["update"]}, *AGENT_RULES])  # fmt: skip
    lead = identity(cluster, namespace, "lead")
    wait_for(lambda: _lead_may_update(lead, namespace), timeout=20, what="the lead's RBAC")
    refused(lambda: raw_write(lead, failed, {**requeued, "retryCount": 3}), "retryCount 0")
    refused(lambda: raw_write(lead, failed, {**requeued, "attempt": failed.status.attempt + 1}), "attempt unchanged")


def test_holders_of_the_operate_verb_are_not_bound_by_the_agent_rules(
    cluster: Cluster, namespace: str, alice: Agent, bob: Agent
) -> None:
    """The operator is recognised by RBAC (the virtual verb `operate`), not by a ServiceAccount name:
    installed in any namespace, its expire/due/reject writes pass."""
    wait_until_enforced(cluster, namespace, alice)
    operator_rules = [*AGENT_RULES, {"apiGroups": ["workorder.dev"], "resources": ["workorders"], "verbs": ["operate"]}]
    bind_rules(cluster.api, namespace, "some-operator", operator_rules)
    operator_api = config.new_client_from_config(str(cluster.user_kubeconfig("some-operator")))
    create_order(cluster.api, namespace, "expiring", claimTimeoutSeconds=1)
    claim = alice.claim(WorkOrder.from_body(alice.orders.get(namespace, "expiring")))
    assert claim is not None
    order = WorkOrder.from_body(alice.orders.get(namespace, "expiring"))
    later = utcnow() + dt.timedelta(seconds=2)
    # Without `operate`, an expiry of alice's claim is refused ...
    refused(lambda: bob.orders.write_status(order, lifecycle.expire(order, later)), "belongs to alice")
    # ... and passes for the holder of `operate` (once its RBAC reaches the authorizer).
    wait_for(lambda: _expired(WorkOrders(operator_api, "workorder-operator"), order, later), timeout=20)
    assert WorkOrder.from_body(alice.orders.get(namespace, "expiring")).status.phase == "Pending"
    with pytest.raises(ClaimLost):
        claim.complete("late")


def _expired(orders: WorkOrders, order: WorkOrder, at: dt.datetime) -> bool:
    try:
        orders.write_status(order, lifecycle.expire(order, at))
    except API_ERRORS as exc:
        if "workorder-status-transitions" in (exc.body or ""):
            return False
        raise
    return True


# --- the record: who held the claim, what happened before, when a retry falls due ----------------


def forged(write: StatusWrite, **changes: Any) -> StatusWrite:
    """A legal transition's write (its own guards) with some fields changed (None removes one)."""
    status = {k: v for k, v in {**write.status, **changes}.items() if v is not None}
    return StatusWrite(write.transition, write.guards, status)


def claim_of(agent: Agent, namespace: str, name: str) -> Claim:
    claim = agent.claim(WorkOrder.from_body(agent.orders.get(namespace, name)))
    assert claim is not None
    return claim


def claimed_by(agent: Agent, namespace: str, name: str) -> WorkOrder:
    return claim_of(agent, namespace, name).order


def test_a_holder_cannot_rewrite_who_held_the_claim(cluster: Cluster, namespace: str, alice: Agent) -> None:
    wait_until_enforced(cluster, namespace, alice)
    create_order(cluster.api, namespace, "who", maxRetries=3)
    held = claimed_by(alice, namespace, "who")
    a, now = held.status.attempt, utcnow()
    someone = str(uuid.uuid4())
    ends = {
        "complete": lifecycle.complete(held, alice.id, a, "ok", now),
        "fail (retry)": lifecycle.fail(held, alice.id, a, "boom", now),
        "fail (final)": lifecycle.fail(held, alice.id, a, "boom", now, retryable=False),
        "release": lifecycle.release(held, alice.id, a, now),
    }
    for what, write in ends.items():
        for forgery in ({"claimedBy": someone}, {"claimedByUser": "bob"}, {"claimedAt": format_time(now)}):
            refused(lambda w=write, f=forgery: alice.orders.write_status(held, forged(w, **f)),  # type: ignore[misc]
                    "stay as the claim set them", "user alice")  # fmt: skip
        if what in ("complete", "fail (final)"):  # the terminal record keeps its holder
            refused(lambda w=write: alice.orders.write_status(held, forged(w, claimedBy=None)),  # type: ignore[misc]
                    "claimedBy")  # fmt: skip
            refused(lambda w=write: alice.orders.write_status(held, forged(w, claimedByUser=None)),  # type: ignore[misc]
                    "claimedByUser")  # fmt: skip
    done = alice.orders.write_status(held, ends["complete"])["status"]
    assert (done["phase"], done["claimedBy"], done["claimedByUser"]) == ("Completed", alice.id, "alice")


def test_a_holder_may_only_add_the_entry_of_the_attempt_that_ends(
    cluster: Cluster, namespace: str, alice: Agent
) -> None:
    wait_until_enforced(cluster, namespace, alice)
    create_order(cluster.api, namespace, "past", maxRetries=3)
    claim_of(alice, namespace, "past").release("first")
    held = claimed_by(alice, namespace, "past")  # attempt 2; history: attempt 1 released
    a, now = held.status.attempt, utcnow()
    write = lifecycle.complete(held, alice.id, a, "ok", now)
    first, entry = write.status["history"]
    rewrites = {
        "emptied": [],
        "earlier entry rewritten": [{**first, "outcome": "Succeeded", "message": "all fine"}, entry],
        "earlier entry dropped": [entry],
        "two entries added": [first, entry, {**entry, "finishedAt": format_time(now)}],
        "entry put first": [entry, first],
    }
    for what, history in rewrites.items():
        message = refused(lambda h=history: alice.orders.write_status(held, forged(write, history=h)))  # type: ignore[misc]
        assert "status.history" in message, (what, message)
    lies = {
        "another attempt": {"attempt": a + 5},
        "another agent": {"agent": str(uuid.uuid4())},
        "another claim time": {"claimedAt": format_time(now)},
        "another outcome": {"outcome": "Expired"},
    }
    for what, lie in lies.items():
        history = [first, {**entry, **lie}]
        message = refused(lambda h=history: alice.orders.write_status(held, forged(write, history=h)))  # type: ignore[misc]
        assert f"the new entry is the one of attempt {a}" in message and "outcome Succeeded" in message, (what, message)
    # A holder that keeps no history (a minimal agent) passes, and so does the real entry.
    assert alice.orders.write_status(held, write)["status"]["history"] == [first, entry]


def test_a_full_history_window_slides_by_one(cluster: Cluster, namespace: str, alice: Agent) -> None:
    wait_until_enforced(cluster, namespace, alice)
    create_order(cluster.api, namespace, "long")
    pending = WorkOrder.from_body(alice.orders.get(namespace, "long"))
    # The operator's move (exempt): ten attempts on the record, as after a long life.
    past = [{"attempt": i, "outcome": "Released"} for i in range(1, lifecycle.HISTORY_LIMIT + 1)]
    WorkOrders(cluster.api, "test").write_status(
        pending, StatusWrite("seed", {}, {**pending.raw_status, "history": past, "attempt": lifecycle.HISTORY_LIMIT})
    )
    held = claimed_by(alice, namespace, "long")
    write = lifecycle.release(held, alice.id, held.status.attempt, utcnow())
    assert write.status["history"][:-1] == past[1:]  # the oldest drops out of the window
    refused(lambda: alice.orders.write_status(held, forged(write, history=[*past[5:], write.status["history"][-1]])),
            "status.history")  # fmt: skip
    assert alice.orders.write_status(held, write)["status"]["history"][:-1] == past[1:]


def test_a_claim_or_completion_keeps_the_record_of_earlier_failures(
    cluster: Cluster, namespace: str, alice: Agent
) -> None:
    wait_until_enforced(cluster, namespace, alice)
    create_order(cluster.api, namespace, "scars", maxRetries=3)
    claim_of(alice, namespace, "scars").fail("disk full")
    waiting = WorkOrder.from_body(alice.orders.get(namespace, "scars"))
    WorkOrders(cluster.api, "test").write_status(waiting, lifecycle.due(waiting, utcnow() + dt.timedelta(hours=1)))
    pending = WorkOrder.from_body(alice.orders.get(namespace, "scars"))
    assert pending.raw_status["lastError"] == "disk full"
    write = lifecycle.claim(pending, alice.identity, utcnow(), "alice")
    for wipe in ({"lastError": None}, {"lastErrorAt": None}, {"lastError": "nothing happened"}, {"history": []}):
        refused(lambda w=wipe: alice.orders.write_status(pending, forged(write, **w)),  # type: ignore[misc]
                "a claim keeps the record of earlier attempts")  # fmt: skip
    held = WorkOrder.from_body(alice.orders.write_status(pending, write))
    assert held.raw_status["lastError"] == "disk full"
    done = lifecycle.complete(held, alice.id, held.status.attempt, "ok", utcnow())
    refused(lambda: alice.orders.write_status(held, forged(done, lastError=None)), "change only when an attempt fails")
    assert alice.orders.write_status(held, done)["status"]["lastError"] == "disk full"


def test_a_forged_next_retry_after_does_not_park_the_order(
    cluster: Cluster, namespace: str, alice: Agent, operator: OperatorProcess
) -> None:
    """The API server takes any nextRetryAfter (CEL has no clock); the operator decides when the
    retry falls due from the spec: here 2 s after the failure (backoffSeconds 1, retry 1)."""
    wait_until_enforced(cluster, namespace, alice)
    create_order(cluster.api, namespace, "parked", maxRetries=3, backoffSeconds=1)
    held = claimed_by(alice, namespace, "parked")
    write = lifecycle.fail(held, alice.id, held.status.attempt, "boom", utcnow())
    failed = alice.orders.write_status(held, forged(write, nextRetryAfter="9999-12-31T23:59:59.000000Z"))
    assert failed["status"]["phase"] == "RetryPending"
    due = wait_for(lambda: _phase(alice, namespace, "parked", "Pending"), timeout=15, interval=0.2,
                   what="the forged retry to fall due by the spec")  # fmt: skip
    assert due.status.retry_count == 1 and due.status.next_retry_after is None


def _phase(agent: Agent, namespace: str, name: str, phase: str) -> WorkOrder | None:
    order = WorkOrder.from_body(agent.orders.get(namespace, name))
    return order if order.status.phase == phase else None


def test_an_admin_requeues_an_order_waiting_for_its_retry_an_agent_does_not(
    cluster: Cluster, namespace: str, alice: Agent
) -> None:
    wait_until_enforced(cluster, namespace, alice)
    create_order(cluster.api, namespace, "stuck", maxRetries=3, backoffSeconds=3600)
    claim = alice.claim(WorkOrder.from_body(alice.orders.get(namespace, "stuck")))
    assert claim is not None
    claim.fail("boom")
    waiting = WorkOrder.from_body(alice.orders.get(namespace, "stuck"))
    assert waiting.status.phase == "RetryPending"
    refused(lambda: alice.orders.write_status(waiting, lifecycle.requeue(waiting, utcnow())),
            "requeue (RetryPending -> Pending) is an admin transition", "alice may not update")  # fmt: skip
    bind_rules(cluster.api, namespace, "lead", [{"apiGroups": ["workorder.dev"], "resources": ["workorders"],
                                                 "verbs": ["update"]}, *AGENT_RULES])  # fmt: skip
    lead = WorkOrders(identity(cluster, namespace, "lead"), "lead")
    wait_for(lambda: _requeued(lead, waiting), timeout=20, what="the lead's requeue to be allowed")
    requeued = WorkOrder.from_body(alice.orders.get(namespace, "stuck"))
    assert (requeued.status.phase, requeued.status.retry_count, requeued.status.attempt) == ("Pending", 0, 1)
    assert requeued.raw_status["lastError"] == "boom"
