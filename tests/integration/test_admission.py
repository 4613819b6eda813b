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
from tests.support import admission_policies, bind_rules, create_order, wait_for
from workorder_operator import lifecycle
from workorder_operator.agent import Agent, ClaimLost
from workorder_operator.kube import WorkOrders
from workorder_operator.lifecycle import StatusWrite
from workorder_operator.model import WorkOrder, utcnow

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
    except client.ApiException as exc:
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
    with pytest.raises(client.ApiException) as err:
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
        except client.ApiException as exc:
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
    except client.ApiException as exc:
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
    except client.ApiException as exc:
        if "workorder-status-transitions" in (exc.body or ""):
            return False
        raise
    return True
