"""Tenants don't trust each other: every attack of a least-privileged identity on the operator's wider
rights, driven as that identity (client certificates, ServiceAccount tokens) against the real API
server with the real admission policies of deploy/, and seen refused with a readable message or
harmless. Shipwright's real controller registers the Builds and runs the BuildRuns; only Tekton's
part (finishing a TaskRun) is played, by tests/tekton.py: no kubelet runs here."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config

from tests.conftest import Cluster
from tests.support import (
    API_ERRORS,
    OperatorProcess,
    admission_policies,
    applied,
    bind_rules,
    create_order,
    kubectl,
    refused_by,
    wait_for,
)
from tests.tekton import KANIKO_BUILD, Tekton, shipwright_object
from workorder_operator import lifecycle
from workorder_operator.agent import Agent
from workorder_operator.errors import Refused
from workorder_operator.kube import WorkOrders
from workorder_operator.model import GROUP, PLURAL, VERSION, WorkOrder, utcnow
from workorder_operator.shipwright import BUILDRUNS, BUILDS

REPO = Path(__file__).resolve().parents[2]
BASE_POLICIES = REPO / "deploy" / "base" / "admission.yaml"
TARGETING_POLICY = REPO / "deploy" / "overlays" / "enforced-targeting" / "targeting.yaml"
DIGEST = "sha256:" + "ab" * 32
FAKE_DIGEST = "sha256:" + "66" * 32

AGENT_RULES = [
    {"apiGroups": [GROUP], "resources": ["workorders"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [GROUP], "resources": ["workorders/status"], "verbs": ["get", "patch"]},
]
CREATOR_RULES = [{"apiGroups": [GROUP], "resources": ["workorders"], "verbs": ["get", "list", "create", "delete"]}]
BUILD_RIGHTS = [
    {"apiGroups": ["shipwright.io"], "resources": ["builds", "buildruns"], "verbs": ["create", "get", "list"]}
]


def can(api: client.ApiClient, verb: str, resource: str, namespace: str, group: str = GROUP, name: str = "") -> bool:
    attrs = {"verb": verb, "group": group, "resource": resource, "namespace": namespace, "name": name}
    review = {"spec": {"resourceAttributes": attrs}}
    return bool(client.AuthorizationV1Api(api).create_self_subject_access_review(review).status.allowed)


def user(
    cluster: Cluster, namespace: str, name: str, rules: list[dict[str, Any]], *, wait: tuple[str, str, str]
) -> client.ApiClient:
    """An identity with exactly `rules` in `namespace`, once the authorizer sees them (`wait`: verb,
    group, resource that must be allowed)."""
    bind_rules(cluster.api, namespace, name, rules)
    api = config.new_client_from_config(str(cluster.user_kubeconfig(name)))
    verb, group, resource = wait
    wait_for(lambda: can(api, verb, resource, namespace, group), timeout=20, what=f"{name} may {verb} {resource}")
    return api


def build_body(name: str, content: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "WorkOrder",
        "metadata": {"name": name},
        "spec": {"workType": "build", "yamlContent": content, "backoffSeconds": 1},
    }


def create_as(api: client.ApiClient, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body
    )
    return result


def order_of(cluster: Cluster, namespace: str, name: str) -> WorkOrder:
    return WorkOrder.from_body(WorkOrders(cluster.api, "test").get(namespace, name))


def phase(cluster: Cluster, namespace: str, name: str, *wanted: str) -> WorkOrder | None:
    order = order_of(cluster, namespace, name)
    return order if order.status.phase in wanted else None


@pytest.fixture(scope="module")
def policies(cluster: Cluster) -> Iterator[None]:
    with admission_policies(cluster.kubeconfig, BASE_POLICIES):
        yield


@pytest.fixture
def creator(cluster: Cluster, namespace: str, policies: None) -> client.ApiClient:
    """A tenant who may create orders, Builds and BuildRuns in the namespace, and nothing else."""
    api = user(cluster, namespace, "dev", CREATOR_RULES + BUILD_RIGHTS, wait=("create", "shipwright.io", "buildruns"))
    # The policy loads asynchronously: wait until it refuses someone without build rights.
    stranger = user(cluster, namespace, "stranger", CREATOR_RULES, wait=("create", GROUP, "workorders"))

    def enforced() -> bool:
        name = f"probe-{uuid.uuid4().hex[:6]}"
        try:
            create_as(stranger, namespace, build_body(name, KANIKO_BUILD.format(name="probe")))
        except API_ERRORS as exc:
            return exc.status == 403 and "workorder-executor-rights" in (exc.body or "")
        client.CustomObjectsApi(cluster.api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        return False

    wait_for(enforced, timeout=30, interval=0.5, what="the executor-rights policy to be enforced")
    return api


# --- 1. the creator's own rights --------------------------------------------------------------


def test_a_build_order_needs_its_creators_own_build_rights(cluster: Cluster, namespace: str, creator: Any) -> None:
    tenant = user(cluster, namespace, "tenant", CREATOR_RULES, wait=("create", GROUP, "workorders"))
    content = KANIKO_BUILD.format(name="app")
    message = refused_by(
        lambda: create_as(tenant, namespace, build_body("app", content)),
        "workorder-executor-rights",
        "tenant may not create builds.shipwright.io",
        f"in namespace {namespace}",
    )
    assert "spec.workType build" in message
    # The seed system's form, a WorkOrder document naming an existing Build, runs it with the
    # operator's rights just the same: refused alike.
    build_ref = "apiVersion: workorder.dev/v1alpha1\nkind: WorkOrder\nspec:\n  buildRef:\n    name: prod-app\n"
    refused_by(
        lambda: create_as(tenant, namespace, build_body("by-ref", build_ref)),
        "workorder-executor-rights",
        "tenant may not create builds.shipwright.io",
    )
    # Work the operator does not run needs no more than the right to create orders.
    create_as(tenant, namespace, {**build_body("backup", "db: x"), "spec": {"workType": "backup", "yamlContent": "x"}})
    # One right granted: the refusal names only the other.
    bind_rules(cluster.api, namespace, "tenant", [{"apiGroups": ["shipwright.io"], "resources": ["builds"],
                                                   "verbs": ["create"]}])  # fmt: skip
    wait_for(lambda: can(tenant, "create", "builds", namespace, "shipwright.io"), timeout=20)
    refused_by(
        lambda: create_as(tenant, namespace, build_body("app", content)),
        "workorder-executor-rights",
        "tenant may not create buildruns.shipwright.io",
    )
    # Both: admitted.
    create_as(creator, namespace, build_body("app", content))


# --- 2. no Build takeover -----------------------------------------------------------------------

PROD_BUILD = {
    "apiVersion": "shipwright.io/v1beta1",
    "kind": "Build",
    "metadata": {"name": "prod-app"},
    "spec": {
        "source": {"type": "Git", "git": {"url": "https://git.example.com/platform/prod-app"}},
        "strategy": {"name": "kaniko", "kind": "ClusterBuildStrategy"},
        "output": {"image": "registry.example.com/prod/app", "pushSecret": "prod-push"},
    },
}
ATTACK = """\
apiVersion: shipwright.io/v1beta1
kind: Build
metadata:
  name: prod-app
spec:
  source:
    type: Git
    git:
      url: https://git.example.com/attacker/evil
  strategy:
    name: kaniko
    kind: ClusterBuildStrategy
  output:
    image: registry.example.com/prod/app
"""


def test_an_order_never_takes_over_an_existing_build(
    cluster: Cluster, namespace: str, creator: client.ApiClient, operator: OperatorProcess
) -> None:
    objs = client.CustomObjectsApi(cluster.api)
    objs.create_namespaced_custom_object("shipwright.io", "v1beta1", namespace, BUILDS, PROD_BUILD)

    # Shipwright's controller registers it first (its own status write); after that, nobody writes.
    def registered() -> dict[str, Any] | None:
        build = shipwright_object(cluster.api, namespace, BUILDS, "prod-app")
        return build if build and (build.get("status") or {}).get("registered") else None

    before = wait_for(registered, timeout=30, what="Shipwright's registration")
    create_as(creator, namespace, {**build_body("takeover", ATTACK), "spec": {
        "workType": "build", "yamlContent": ATTACK, "maxRetries": 3}})  # fmt: skip
    failed = wait_for(lambda: phase(cluster, namespace, "takeover", "Failed"), timeout=30, what="the order to fail")
    assert (failed.status.result or "").startswith("BuildNameTaken: Build 'prod-app' already exists")
    assert failed.status.retry_count == 0, "a taken name is final: no retry can help"
    after = objs.get_namespaced_custom_object("shipwright.io", "v1beta1", namespace, BUILDS, "prod-app")
    assert after["spec"] == before["spec"]
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"], "nothing was written"
    assert not after["metadata"].get("ownerReferences"), "the order must never own (and so garbage-collect) it"
    assert shipwright_object(cluster.api, namespace, BUILDRUNS, "takeover-1") is None


def test_two_orders_with_one_build_name_do_not_clash(
    cluster: Cluster, namespace: str, creator: client.ApiClient, operator: OperatorProcess
) -> None:
    cluster.need_shipwright()
    content = KANIKO_BUILD.format(name="shared")
    create_as(creator, namespace, build_body("first", content))
    wait_for(lambda: shipwright_object(cluster.api, namespace, BUILDS, "shared"), timeout=30,
             what="the first order's Build")  # fmt: skip
    first_uid = order_of(cluster, namespace, "first").uid
    create_as(creator, namespace, build_body("second", content))
    failed = wait_for(lambda: phase(cluster, namespace, "second", "Failed"), timeout=30)
    assert "BuildNameTaken" in (failed.status.result or "") and "WorkOrder first" in (failed.status.result or "")
    shared = shipwright_object(cluster.api, namespace, BUILDS, "shared")
    owners = [r["uid"] for r in shared["metadata"]["ownerReferences"]]  # type: ignore[index]
    assert owners == [first_uid]
    # The first order is unharmed and completes.
    Tekton(cluster.api, namespace).finish("first-1", DIGEST)
    assert wait_for(lambda: phase(cluster, namespace, "first", "Completed"), timeout=30).status.result == DIGEST


def test_a_build_order_never_tells_its_readers_whether_a_secret_exists(
    cluster: Cluster, namespace: str, creator: client.ApiClient, operator: OperatorProcess
) -> None:
    """The creator may create Builds and BuildRuns but not read Secrets; the Build names a push
    Secret that does not exist. Shipwright refuses it saying so; the order's record and events
    (read by everyone who may read orders) say only that a reference was refused, and where
    someone who may read Builds finds Shipwright's message."""
    cluster.need_shipwright()
    assert not can(creator, "get", "secrets", namespace, group="")
    content = KANIKO_BUILD.format(name="pushes").replace(
        "  output:\n", "  output:\n    pushSecret: team-registry-creds\n"
    )
    create_as(creator, namespace, build_body("probe", content))
    failed = wait_for(lambda: phase(cluster, namespace, "probe", "Failed"), timeout=60, what="the refused build")
    told = [failed.status.result or "", failed.status.last_error or ""]
    told += [e.message or "" for e in client.CoreV1Api(cluster.api).list_namespaced_event(namespace).items]
    for text in told:
        assert "team-registry-creds" not in text and "SecretRef" not in text and "not found" not in text, text
    assert "ReferenceRefused" in told[0] and f"kubectl get builds.shipwright.io pushes -n {namespace}" in told[0]
    # Shipwright's own message is where its own RBAC guards it: in the Build's status.
    registered = shipwright_object(cluster.api, namespace, BUILDS, "pushes") or {}
    assert "team-registry-creds" in (registered.get("status") or {}).get("message", "")


# --- 3. only its own BuildRun -------------------------------------------------------------------


def test_a_buildrun_that_is_not_the_attempts_own_never_lends_its_outcome(
    cluster: Cluster, namespace: str, creator: client.ApiClient, operator: OperatorProcess
) -> None:
    cluster.need_shipwright()
    # A finished BuildRun with the name attempt 1 will use, not owned by the order: what a deleted
    # order of the same name leaves until garbage collection, or what a neighbour can plant.
    planted = {
        "apiVersion": "shipwright.io/v1beta1", "kind": "BuildRun",
        "metadata": {"name": "reuse-1", "labels": {"workorder.dev/attempt": "1"}},
        "spec": {"build": {"name": "reuse-build"}},
    }  # fmt: skip
    client.CustomObjectsApi(cluster.api).create_namespaced_custom_object(
        "shipwright.io", "v1beta1", namespace, BUILDRUNS, planted
    )
    # Its finished state is the planter's to write (Shipwright's controller does not look at it again).
    client.CustomObjectsApi(cluster.api).patch_namespaced_custom_object_status(
        "shipwright.io", "v1beta1", namespace, BUILDRUNS, "reuse-1",
        {"status": {"completionTime": "2026-01-01T00:00:00Z", "output": {"digest": FAKE_DIGEST},
                    "conditions": [{"type": "Succeeded", "status": "True", "reason": "Succeeded",
                                    "message": "planted", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}},
        _content_type="application/merge-patch+json",
    )  # fmt: skip
    create_as(creator, namespace, build_body("reuse", KANIKO_BUILD.format(name="reuse-build")))
    retried = wait_for(lambda: phase(cluster, namespace, "reuse", "RetryPending", "Claimed", "Completed")
                       if "BuildRunNameTaken" in (order_of(cluster, namespace, "reuse").status.last_error or "")
                       else None, timeout=30, what="attempt 1 to fail on the foreign BuildRun")  # fmt: skip
    assert retried.status.result != FAKE_DIGEST
    run = wait_for(lambda: shipwright_object(cluster.api, namespace, BUILDRUNS, "reuse-2"), timeout=30,
                   what="attempt 2's own BuildRun")  # fmt: skip
    assert run["metadata"]["labels"]["workorder.dev/order-uid"] == retried.uid
    Tekton(cluster.api, namespace).finish("reuse-2", DIGEST)
    done = wait_for(lambda: phase(cluster, namespace, "reuse", "Completed"), timeout=30)
    assert done.status.result == DIGEST and done.status.attempt == 2
    planted_now = shipwright_object(cluster.api, namespace, BUILDRUNS, "reuse-1") or {}
    assert "state" not in planted_now.get("spec", {}), "someone else's run is never cancelled"


# --- 4. requeue is an admin transition; attempt never decreases ---------------------------------


def test_only_editors_requeue_and_attempt_never_decreases(cluster: Cluster, namespace: str, policies: None) -> None:
    agent_api = user(cluster, namespace, "worker", AGENT_RULES, wait=("patch", GROUP, "workorders/status"))
    editor_api = user(
        cluster, namespace, "lead", [{"apiGroups": [GROUP], "resources": ["workorders", "workorders/status"],
                                      "verbs": ["get", "update", "patch"]}], wait=("update", GROUP, "workorders"),
    )  # fmt: skip
    agent = Agent(agent_api, namespace=namespace)
    wait_transitions_enforced(cluster, namespace, agent)
    create_order(cluster.api, namespace, "loop", maxRetries=0)
    claim = wait_for(lambda: agent.claim(WorkOrder.from_body(agent.orders.get(namespace, "loop"))), timeout=10)
    claim.fail("broken", retryable=False)
    failed = WorkOrder.from_body(agent.orders.get(namespace, "loop"))
    assert failed.status.phase == "Failed"
    refused_by(
        lambda: agent.orders.write_status(failed, lifecycle.requeue(failed, utcnow())),
        "workorder-status-transitions", "requeue (Failed -> Pending) is an admin transition", "worker may not update",
    )  # fmt: skip
    # Resetting the fencing token is refused for everyone, cluster admins and the operator included.
    rewind = lifecycle.requeue(failed, utcnow())
    rewound = lifecycle.StatusWrite("rewind", rewind.guards, {**rewind.status, "attempt": 0})
    with pytest.raises(Refused) as err:
        WorkOrders(cluster.api, "admin").write_status(failed, rewound)
    assert err.value.status == 422 and "status.attempt never decreases" in json.loads(err.value.body)["message"]
    requeued = WorkOrders(editor_api, "lead").write_status(failed, lifecycle.requeue(failed, utcnow()))
    assert requeued["status"]["phase"] == "Pending" and requeued["status"]["attempt"] == 1
    again = wait_for(lambda: agent.claim(WorkOrder.from_body(agent.orders.get(namespace, "loop"))), timeout=10)
    assert again.attempt == 2, "a requeued order's next claim gets a new fencing token"
    again.release()


def wait_transitions_enforced(cluster: Cluster, namespace: str, agent: Agent) -> None:
    """A new policy takes a moment to load: probe with a write it must refuse (a Pending order's
    lastError changed by an agent), which leaves the probe usable if it slips through."""
    create_order(cluster.api, namespace, "probe")

    def enforced() -> bool:
        probe = WorkOrder.from_body(agent.orders.get(namespace, "probe"))
        write = lifecycle.StatusWrite("probe", {}, {**probe.raw_status, "lastError": uuid.uuid4().hex})
        try:
            agent.orders.write_status(probe, write)
        except Refused as exc:
            return "workorder-status-transitions" in (exc.body or "")
        return False

    wait_for(enforced, timeout=30, interval=0.5, what="the transitions policy to be enforced")


# --- 5. targeting enforced by the API server (overlay) ------------------------------------------


@pytest.fixture
def targeting(cluster: Cluster, policies: None) -> Iterator[None]:
    with admission_policies(cluster.kubeconfig, TARGETING_POLICY):
        yield


def sa_client(cluster: Cluster, namespace: str, name: str) -> client.ApiClient:
    """A client authenticated as a ServiceAccount, with a token from the TokenRequest API."""
    token = client.CoreV1Api(cluster.api).create_namespaced_service_account_token(
        name, namespace, {"spec": {"expirationSeconds": 3600}}
    )
    source = config.new_client_from_config(str(cluster.kubeconfig)).configuration
    cfg = client.Configuration()
    cfg.host = source.host
    cfg.ssl_ca_cert = source.ssl_ca_cert
    cfg.api_key = {"authorization": f"Bearer {token.status.token}"}
    return client.ApiClient(cfg)


def test_enforced_targeting_with_the_worked_example(cluster: Cluster, targeting: None) -> None:
    example = REPO / "examples" / "enforced-targeting.yaml"
    # The example binds deploy/'s workorder-agent role.
    with applied(cluster.kubeconfig, REPO / "deploy" / "base" / "rbac-users.yaml", example):
        gpu_api, arm_api = sa_client(cluster, "jobs", "gpu-agent"), sa_client(cluster, "jobs", "arm-agent")
        for api, label in ((gpu_api, "gpu"), (arm_api, "arm")):
            wait_for(lambda a=api, lb=label: can(a, "target", "agentlabels", "jobs", name=lb), timeout=20)  # type: ignore[misc]
        for name, targeting_ in (("for-gpu", {"labels": ["gpu"]}), ("for-arm", {"labels": ["arm"]}),
                                 ("for-anyone", None)):  # fmt: skip
            create_order(cluster.api, "jobs", name, **({"targeting": targeting_} if targeting_ else {}))
        # The gpu agent claims to carry label arm: the SDK believes it, the API server does not.
        liar = Agent(gpu_api, labels=["gpu", "arm"], namespace="jobs")

        def read(name: str) -> WorkOrder:
            return WorkOrder.from_body(liar.orders.get("jobs", name))

        wait_targeting_enforced(cluster, liar, "jobs", {"labels": ["arm"]})
        msg = refused_by(
            lambda: liar.claim(read("for-arm")), "workorder-claim-targeting",
            "system:serviceaccount:jobs:gpu-agent holds none of this order's targets", "labels [arm]",
        )  # fmt: skip
        assert "verb target" in msg
        assert read("for-arm").status.phase == "Pending"
        assert liar.claim(read("for-gpu")) is not None
        assert liar.claim(read("for-anyone")) is not None
        honest_arm = Agent(arm_api, labels=["arm"], namespace="jobs")
        assert honest_arm.claim(read("for-arm")) is not None


def test_enforced_targeting_by_agent_id_and_annotation(cluster: Cluster, namespace: str, targeting: None) -> None:
    agent_id = str(uuid.uuid4())
    rules = [
        *AGENT_RULES,
        {"apiGroups": [GROUP], "resources": ["agents"], "resourceNames": [agent_id], "verbs": ["target"]},
        {"apiGroups": [GROUP], "resources": ["agentannotations"], "resourceNames": ["zone=eu-1"], "verbs": ["target"]},
    ]
    api = user(cluster, namespace, "eu-agent", rules, wait=("patch", GROUP, "workorders/status"))
    wait_for(lambda: can(api, "target", "agents", namespace, name=agent_id), timeout=20)
    create_order(cluster.api, namespace, "by-id", targeting={"agentIds": [agent_id]})
    create_order(cluster.api, namespace, "by-id-2", targeting={"agentIds": [agent_id]})
    create_order(cluster.api, namespace, "by-zone", targeting={"annotations": {"zone": "eu-1"}})
    create_order(cluster.api, namespace, "other-zone", targeting={"annotations": {"zone": "us-1"}})
    me = Agent(api, agent_id, annotations={"zone": "eu-1"}, namespace=namespace)
    impostor = Agent(api, str(uuid.uuid4()), annotations={"zone": "us-1"}, namespace=namespace)

    def read(name: str) -> WorkOrder:
        return WorkOrder.from_body(me.orders.get(namespace, name))

    wait_targeting_enforced(cluster, impostor, namespace, {"annotations": {"zone": "us-1"}})
    refused_by(lambda: impostor.claim(read("other-zone")), "workorder-claim-targeting", "annotations [zone=us-1]")
    assert me.claim(read("by-id")) is not None
    assert me.claim(read("by-zone")) is not None
    # The right to target agent id X does not let the identity claim as agent Y.
    wrong_id = lifecycle.claim(read("by-id-2"), me.identity, utcnow(), "eu-agent")
    wrong_id = lifecycle.StatusWrite(
        wrong_id.transition, wrong_id.guards, {**wrong_id.status, "claimedBy": str(uuid.uuid4())}
    )
    refused_by(lambda: me.orders.write_status(read("by-id-2"), wrong_id), "workorder-claim-targeting")


def wait_targeting_enforced(cluster: Cluster, agent: Agent, namespace: str, targeting: dict[str, Any]) -> None:
    """A new policy takes a moment to load: probe with claims it must refuse, each on a fresh order
    (a claim that slips through before the policy loads changes nothing else). `targeting`: what the
    agent claims to hold and RBAC does not grant it."""

    def enforced() -> bool:
        name = f"probe-{uuid.uuid4().hex[:6]}"
        create_order(cluster.api, namespace, name, targeting=targeting)
        probe = WorkOrder.from_body(agent.orders.get(namespace, name))
        try:
            held = agent.orders.write_status(probe, lifecycle.claim(probe, agent.identity, utcnow(), agent.user))
        except Refused as exc:
            return "workorder-claim-targeting" in (exc.body or "")
        finally:
            client.CustomObjectsApi(cluster.api).delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name
            )
        return not held

    wait_for(enforced, timeout=30, interval=0.5, what="the targeting policy to be enforced")


# --- 6 + 7. installed anywhere, run with nothing but its own rights -----------------------------


def _overlay(tmp: Path, namespace: str, base: Path) -> Path:
    tmp.mkdir()
    (tmp / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": namespace, "resources": [os.path.relpath(base, tmp)],  # kustomize wants it relative
    }))  # fmt: skip
    return tmp


def test_least_privilege_operator_installed_in_any_namespace_runs_the_whole_life(
    cluster: Cluster, namespace: str, tmp_path: Path, policies: None
) -> None:
    """deploy/ applied into a namespace of our choosing (kustomize `namespace:`), admission policies
    included; the operator runs with nothing but its ServiceAccount's token; agents and the order's
    creator are least-privileged identities. Every transition of the contract happens."""
    ops = f"ops-{uuid.uuid4().hex[:6]}"
    overlay = _overlay(tmp_path / "overlay", ops, REPO / "deploy")
    rendered = kubectl(cluster.kubeconfig, "kustomize", str(overlay))
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    # Nothing runs pods here: apply everything but the workload objects; the CRD is installed already
    # (and must outlive this test). On the way out, delete only what did not exist before.
    applied = [d for d in docs if d["kind"] not in ("Deployment", "Service", "PodDisruptionBudget",
                                                    "CustomResourceDefinition")]  # fmt: skip
    manifest = tmp_path / "install.yaml"
    manifest.write_text(yaml.safe_dump_all(applied))
    existing = set(kubectl(cluster.kubeconfig, "get", "-f", str(manifest), "-o", "name", "--ignore-not-found").split())
    created = tmp_path / "created.yaml"
    op: OperatorProcess | None = None
    try:
        names = kubectl(cluster.kubeconfig, "apply", "--server-side", "-o", "name", "-f", str(manifest)).split()
        created.write_text(yaml.safe_dump_all([d for d, n in zip(applied, names, strict=True) if n not in existing]))
        # The targeting overlay renders and the server accepts all of it in that namespace too (dry run).
        targeting = _overlay(tmp_path / "targeting", ops, REPO / "deploy" / "overlays" / "enforced-targeting")
        kubectl(cluster.kubeconfig, "apply", "--server-side", "--dry-run=server", "-k", str(targeting))
        token = (
            client.CoreV1Api(cluster.api)
            .create_namespaced_service_account_token("workorder-operator", ops, {"spec": {"expirationSeconds": 3600}})
            .status.token
        )
        kubeconfig = tmp_path / "operator-kubeconfig"
        admin = yaml.safe_load(cluster.kubeconfig.read_text())
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "clusters": admin["clusters"],
            "users": [{"name": "sa", "user": {"token": token}}],
            "contexts": [{"name": "sa", "context": {"cluster": admin["clusters"][0]["name"], "user": "sa"}}],
            "current-context": "sa",
        }))  # fmt: skip
        sa_api = config.new_client_from_config(str(kubeconfig))
        review = client.AuthenticationV1Api(sa_api).create_self_subject_review({})
        assert review.status.user_info.username == f"system:serviceaccount:{ops}:workorder-operator"
        assert not can(sa_api, "create", "workorders", namespace), "the operator never creates orders"

        creator = user(cluster, namespace, "dev", CREATOR_RULES + BUILD_RIGHTS, wait=("create", GROUP, "workorders"))
        worker = Agent(user(cluster, namespace, "worker", AGENT_RULES, wait=("patch", GROUP, "workorders/status")),
                       namespace=namespace)  # fmt: skip

        op = OperatorProcess(kubeconfig, tmp_path / "operator.log", "--all-namespaces",
                             f"--leader-election-namespace={ops}")  # fmt: skip
        op.start()
        lease = wait_for(lambda: _lease(cluster, ops), timeout=30, what="the operator to lead")
        assert lease.spec.holder_identity == op.identity

        def read(name: str) -> WorkOrder:
            return WorkOrder.from_body(worker.orders.get(namespace, name))

        # Expiry of an abandoned claim, then a failure, a due retry, success and TTL deletion.
        create_as(creator, namespace, {"apiVersion": f"{GROUP}/{VERSION}", "kind": "WorkOrder",
                                       "metadata": {"name": "life"},
                                       "spec": {"workType": "test", "yamlContent": "x", "claimTimeoutSeconds": 1,
                                                "backoffSeconds": 1, "ttlSecondsAfterFinished": 1}})  # fmt: skip
        assert worker.claim(read("life")) is not None
        expired = wait_for(lambda: (o := read("life")).status.phase == "Pending" and o.status.attempt == 1 and o,
                           timeout=30, what="the claim to expire")  # fmt: skip
        assert "expired" in (expired.status.last_error or "")
        claim = worker.claim(expired)
        assert claim is not None
        claim.fail("flaky")
        due = wait_for(lambda: (o := read("life")).status.phase == "Pending" and o.status.retry_count == 1 and o,
                       timeout=30, what="the retry to fall due")  # fmt: skip
        claim = worker.claim(due)
        assert claim is not None
        claim.complete("done")
        wait_for(lambda: _gone(cluster, namespace, "life"), timeout=30, what="TTL deletion")

        # A build order: Build and BuildRun created with the operator's own rights.
        cluster.need_shipwright()
        create_as(creator, namespace, build_body("img", KANIKO_BUILD.format(name="img-build")))
        Tekton(cluster.api, namespace).finish("img-1", DIGEST)
        done = wait_for(lambda: phase(cluster, namespace, "img", "Completed"), timeout=30)
        assert done.status.result == DIGEST
        log = op.log()
        assert "Forbidden" not in log and " 403" not in log, log[-3000:]
    finally:
        if op is not None:
            op.stop()
        if created.exists():
            kubectl(cluster.kubeconfig, "delete", "--ignore-not-found", "--wait=false", "-f", str(created))


def _lease(cluster: Cluster, namespace: str) -> Any:
    try:
        lease = client.CoordinationV1Api(cluster.api).read_namespaced_lease("workorder-operator", namespace)
    except client.ApiException:
        return None
    return lease if lease.spec.holder_identity else None


def _gone(cluster: Cluster, namespace: str, name: str) -> bool:
    try:
        WorkOrders(cluster.api, "test").get(namespace, name)
    except Exception as exc:
        return type(exc).__name__ == "NotFound"
    return False
