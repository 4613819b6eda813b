"""Hub and spoke: a build agent in another cluster (`workorder-build-agent`) takes `build` orders
from the hub and builds them in its own cluster, with two real control planes in one run.

The hub is the session's control plane (the WorkOrder CRD, the operator with its built-in build
agent, labelled `shipwright`). The spoke is a second control plane started for this module only
(always stopped) with Shipwright's real controller; tests/tekton.py plays Tekton's part there.
The agent runs as its own process with the least privilege deploy/ gives it: in the spoke
deploy/agent is applied for real and the agent runs with nothing but its ServiceAccount's token;
in the hub the rules of `workorder-agent` and `workorder-agent-events` are bound in the test's
namespace only.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config

from devcluster import envtest
from tests.conftest import Cluster
from tests.support import REPO, OperatorProcess, admission_policies, bind_rules, create_order, wait_for
from tests.tekton import KANIKO_BUILD, Tekton, shipwright_object
from workorder_operator.build import HUB_OPT_IN_LABEL, hub_label
from workorder_operator.kube import WorkOrders
from workorder_operator.model import WorkOrder
from workorder_operator.shipwright import BUILDRUNS, BUILDS, GROUP, HUB_ANNOTATION, ORDER_UID_LABEL, VERSION

DIGEST = "sha256:0e1f0e1f0e1f0e1f0e1f0e1f0e1f0e1f0e1f0e1f0e1f0e1f0e1f0e1f0e1f0e1f"
HUB_NAME = "hub-under-test"
SPOKE_LABEL = "cluster=eu-1"
AGENT_ID = "3d8e4f1a-5b6c-4d7e-8f90-a1b2c3d4e5f6"
DEPLOY_AGENT = REPO / "deploy" / "agent"


@dataclass
class Spoke:
    plane: envtest.ControlPlane
    api: client.ApiClient


@pytest.fixture(scope="module")
def spoke(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spoke]:
    """A second control plane with Shipwright's controller, for this module only."""
    if envtest.shipwright_binary() is None:
        pytest.skip("needs Shipwright's controller: run `make binaries`")
    plane = envtest.ControlPlane(tmp_path_factory.mktemp("spoke"))
    try:
        plane.start()
        plane.start_shipwright()
        api = config.new_client_from_config(str(plane.kubeconfig))
        try:
            yield Spoke(plane, api)
        finally:
            api.close()
    finally:
        plane.stop()


@pytest.fixture(scope="module")
def spoke_identity(spoke: Spoke) -> Path:
    """deploy/agent applied to the spoke for real; a kubeconfig with its ServiceAccount's token."""
    if shutil.which("kubectl") is None:
        pytest.skip("needs kubectl (with kustomize) on PATH")
    applied = subprocess.run(
        ["kubectl", f"--kubeconfig={spoke.plane.kubeconfig}", "apply", "--server-side", "-k", str(DEPLOY_AGENT)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    assert "PodSecurity" not in applied.stderr, applied.stderr  # the pod meets the namespace's `restricted`
    core = client.CoreV1Api(spoke.api)
    token = core.create_namespaced_service_account_token(
        "workorder-build-agent", "workorder-system", {"spec": {"expirationSeconds": 3600}}
    ).status.token
    path = spoke.plane.directory / "build-agent.kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "spoke",
        "clusters": [{"name": "spoke", "cluster": {"server": spoke.plane.url,
                                                   "certificate-authority": str(spoke.plane.pki.ca_cert)}}],
        "users": [{"name": "build-agent", "user": {"token": token}}],
        "contexts": [{"name": "spoke", "context": {"cluster": "spoke", "user": "build-agent"}}],
    }))  # fmt: skip
    # RBAC reaches the authorizer through an informer: wait until the new binding is seen.
    review = {"spec": {"resourceAttributes": {"verb": "create", "group": GROUP, "resource": BUILDS}}}
    agent_api = config.new_client_from_config(str(path))
    try:
        deadline = time.monotonic() + 20
        while not client.AuthorizationV1Api(agent_api).create_self_subject_access_review(review).status.allowed:
            assert time.monotonic() < deadline, "the build agent's ClusterRoleBinding never took effect"
            time.sleep(0.1)
    finally:
        agent_api.close()
    return path


def rules(path: Path, name: str) -> list[dict[str, Any]]:
    """The rules of ClusterRole `name` in a deploy/ file: what the tests bind is what ships."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    role = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == name)
    found: list[dict[str, Any]] = role["rules"]
    return found


@pytest.fixture
def spoke_namespace(spoke: Spoke, namespace: str) -> Iterator[str]:
    """The test's namespace in the spoke too (builds run in the namespace of the order's name),
    opened to this hub's builds by the spoke's admin."""
    core = client.CoreV1Api(spoke.api)
    core.create_namespace({"metadata": {"name": namespace, "labels": {HUB_OPT_IN_LABEL: hub_label(HUB_NAME)}}})
    try:
        yield namespace
    finally:
        with contextlib.suppress(client.ApiException):  # a test may have deleted it
            core.delete_namespace(namespace)


@pytest.fixture
def build_agent(
    cluster: Cluster,
    spoke_identity: Path,
    namespace: str,
    spoke_namespace: str,
    operator: OperatorProcess,
    tmp_path: Path,
) -> Iterator[OperatorProcess]:
    """The spoke's build agent, labelled cluster=eu-1, with only the rights deploy/ gives it. The
    hub's `operator` runs its built-in build agent (label `shipwright`) all the while."""
    hub_user = f"eu-1-agent-{namespace}"
    hub_rules = rules(REPO / "deploy/base/rbac-users.yaml", "workorder-agent")
    hub_rules += rules(REPO / "deploy/agent/hub/rbac.yaml", "workorder-agent-events")
    bind_rules(cluster.api, namespace, hub_user, hub_rules)
    with OperatorProcess(
        spoke_identity, tmp_path / "build-agent.log",
        f"--hub-kubeconfig={cluster.user_kubeconfig(hub_user)}", f"--hub-name={HUB_NAME}", f"--id={AGENT_ID}",
        f"--label={SPOKE_LABEL}", "-n", namespace, "--cleanup-interval=1",
        command=("-m", "workorder_operator.standalone"), ready=b"taking build orders",
    ).running() as agent:  # fmt: skip
        yield agent


def order_of(cluster: Cluster, namespace: str, name: str) -> WorkOrder:
    return WorkOrder.from_body(WorkOrders(cluster.api, "test").get(namespace, name))


def build_order(cluster: Cluster, namespace: str, name: str, build: str, label: str) -> WorkOrder:
    body = create_order(cluster.api, namespace, name, workType="build", yamlContent=KANIKO_BUILD.format(name=build),
                        targeting={"labels": [label]})  # fmt: skip
    return WorkOrder.from_body(body)


def completed(cluster: Cluster, namespace: str, name: str) -> WorkOrder | None:
    order = order_of(cluster, namespace, name)
    return order if order.status.phase == "Completed" else None


def names(api: client.ApiClient, namespace: str, plural: str) -> set[str]:
    items = client.CustomObjectsApi(api).list_namespaced_custom_object(GROUP, VERSION, namespace, plural)["items"]
    return {o["metadata"]["name"] for o in items}


def test_an_order_for_the_spoke_is_built_there_and_completed_in_the_hub(
    cluster: Cluster, spoke: Spoke, namespace: str, build_agent: OperatorProcess
) -> None:
    # Under the hub's admission policies, as a production hub runs: the spoke agent is an agent
    # like any other there (its claims carry its hub identity, only it may act on them).
    with admission_policies(cluster.kubeconfig, REPO / "deploy" / "base" / "admission.yaml"):
        build_order(cluster, namespace, "for-us-2", "us-app", "cluster=us-2")
        ours = build_order(cluster, namespace, "for-eu-1", "eu-app", SPOKE_LABEL)

        Tekton(spoke.api, namespace).finish("for-eu-1-1", DIGEST)
        done = wait_for(lambda: completed(cluster, namespace, "for-eu-1"), 60, what="for-eu-1 Completed in the hub")
        assert done.status.result == DIGEST
        assert [h.agent for h in done.status.history] == [AGENT_ID]

        # Built in the spoke, marked as the hub's order's (no owner reference: its owner is elsewhere).
        run = shipwright_object(spoke.api, namespace, BUILDRUNS, "for-eu-1-1")
        assert run is not None
        assert run["metadata"]["labels"][ORDER_UID_LABEL] == ours.uid
        assert run["metadata"]["annotations"][HUB_ANNOTATION] == HUB_NAME
        assert all(r["kind"] != "WorkOrder" for r in run["metadata"].get("ownerReferences") or [])
        assert names(spoke.api, namespace, BUILDS) == {"eu-app"}
        # Nothing of it in the hub (whose own build agent, labelled `shipwright`, took neither order).
        assert names(cluster.api, namespace, BUILDS) == set()
        assert names(cluster.api, namespace, BUILDRUNS) == set()

        # The order targeted elsewhere is left alone.
        left = order_of(cluster, namespace, "for-us-2")
        assert (left.status.phase, left.status.attempt, left.status.claimed_by, left.status.history) == (
            "Pending", 0, None, [],
        )  # fmt: skip
        assert "for-us-2" not in build_agent.log()


def test_deleting_the_hub_order_deletes_its_builds_in_the_spoke(
    cluster: Cluster, spoke: Spoke, namespace: str, build_agent: OperatorProcess
) -> None:
    objects = client.CustomObjectsApi(spoke.api)
    # Someone else's BuildRun carrying an order-uid label but not this hub's mark: never touched.
    foreign = objects.create_namespaced_custom_object(GROUP, VERSION, namespace, BUILDRUNS, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "BuildRun",
        "metadata": {"name": "someone-elses", "labels": {ORDER_UID_LABEL: str(uuid.uuid4())}},
        "spec": {"build": {"name": "whatever"}},
    })  # fmt: skip
    build_order(cluster, namespace, "short-lived", "short-app", SPOKE_LABEL)
    tekton = Tekton(spoke.api, namespace)
    tekton.start(tekton.wait_taskrun("short-lived-1", timeout=60))

    WorkOrders(cluster.api, "test").delete(order_of(cluster, namespace, "short-lived"))

    def gone() -> bool:
        return not names(spoke.api, namespace, BUILDS) and names(spoke.api, namespace, BUILDRUNS) == {"someone-elses"}

    wait_for(gone, 60, what="the deleted order's Build and BuildRun deleted in the spoke")
    kept = shipwright_object(spoke.api, namespace, BUILDRUNS, "someone-elses")
    assert kept is not None and kept["metadata"]["uid"] == foreign["metadata"]["uid"]


def test_a_build_name_someone_else_holds_in_the_spoke_is_never_taken_over(
    cluster: Cluster, spoke: Spoke, namespace: str, build_agent: OperatorProcess
) -> None:
    objects = client.CustomObjectsApi(spoke.api)
    theirs = yaml.safe_load(KANIKO_BUILD.format(name="prod-app"))
    theirs = objects.create_namespaced_custom_object(GROUP, VERSION, namespace, BUILDS, theirs)
    build_order(cluster, namespace, "grab", "prod-app", SPOKE_LABEL)

    def failed() -> WorkOrder | None:
        order = order_of(cluster, namespace, "grab")
        return order if order.status.phase == "Failed" else None

    order = wait_for(failed, 60, what="grab Failed in the hub")
    assert order.status.last_error is not None and order.status.last_error.startswith("BuildNameTaken")
    events = client.CoreV1Api(cluster.api).list_namespaced_event(namespace).items
    assert any(e.reason == "Reject" and e.involved_object.name == "grab" for e in events)
    after = shipwright_object(spoke.api, namespace, BUILDS, "prod-app")
    assert after is not None
    assert after["metadata"]["uid"] == theirs["metadata"]["uid"]
    assert after["metadata"].get("labels", {}).get(ORDER_UID_LABEL) is None
    assert HUB_ANNOTATION not in (after["metadata"].get("annotations") or {})
    assert names(spoke.api, namespace, BUILDRUNS) == set()


def test_an_agent_restarted_mid_build_resumes_the_same_buildrun(
    cluster: Cluster, spoke: Spoke, namespace: str, build_agent: OperatorProcess
) -> None:
    build_order(cluster, namespace, "resumed", "resumed-app", SPOKE_LABEL)
    tekton = Tekton(spoke.api, namespace)
    taskrun = tekton.wait_taskrun("resumed-1", timeout=60)
    tekton.start(taskrun)
    build_agent.stop()  # SIGTERM: the claim and the BuildRun are left to be resumed
    build_agent.start()
    tekton.succeed(taskrun, DIGEST, 1024)

    done = wait_for(lambda: completed(cluster, namespace, "resumed"), 60, what="resumed Completed in the hub")
    assert done.status.result == DIGEST and done.status.attempt == 1
    assert names(spoke.api, namespace, BUILDRUNS) == {"resumed-1"}


def test_without_the_namespace_in_the_spoke_the_order_says_so(
    cluster: Cluster, spoke: Spoke, namespace: str, build_agent: OperatorProcess
) -> None:
    core = client.CoreV1Api(spoke.api)
    core.delete_namespace(namespace)

    def gone() -> bool:
        return namespace not in {n.metadata.name for n in core.list_namespace().items}

    wait_for(gone, 60, what=f"namespace {namespace} gone from the spoke")
    create_order(cluster.api, namespace, "nowhere", workType="build", maxRetries=0,
                 yamlContent=KANIKO_BUILD.format(name="nowhere-app"), targeting={"labels": [SPOKE_LABEL]})  # fmt: skip

    def failed() -> WorkOrder | None:
        order = order_of(cluster, namespace, "nowhere")
        return order if order.status.phase == "Failed" else None

    order = wait_for(failed, 60, what="nowhere Failed in the hub")
    assert f"namespace {namespace!r} does not exist in the cluster the builds run in" in (order.status.last_error or "")


@pytest.mark.parametrize("labels", [{}, {HUB_OPT_IN_LABEL: "another-hub"}], ids=["no-label", "another-hub"])
def test_a_spoke_namespace_that_did_not_opt_in_to_the_hub_builds_nothing(
    cluster: Cluster, spoke: Spoke, namespace: str, build_agent: OperatorProcess, labels: dict[str, str]
) -> None:
    """Another team owns the namespace of that name in the spoke: the hub tenant's order builds
    nothing there (no Build, no BuildRun, none of its Secrets used) and says what the spoke's
    admin would do to open it."""
    core = client.CoreV1Api(spoke.api)
    core.patch_namespace(namespace, {"metadata": {"labels": {HUB_OPT_IN_LABEL: labels.get(HUB_OPT_IN_LABEL)}}})
    create_order(cluster.api, namespace, "closed", workType="build", maxRetries=0,
                 yamlContent=KANIKO_BUILD.format(name="closed-app"), targeting={"labels": [SPOKE_LABEL]})  # fmt: skip

    def failed() -> WorkOrder | None:
        order = order_of(cluster, namespace, "closed")
        return order if order.status.phase == "Failed" else None

    error = wait_for(failed, 60, what="closed Failed in the hub").status.last_error or ""
    assert f"namespace {namespace!r} of the cluster the builds run in has not opted in" in error, error
    assert f"kubectl label namespace {namespace} {HUB_OPT_IN_LABEL}={HUB_NAME}" in error, error
    assert names(spoke.api, namespace, BUILDS) == set() and names(spoke.api, namespace, BUILDRUNS) == set()
