"""Build orders: the operator's built-in agent runs the Shipwright Builds embedded in yamlContent.

The CRDs are Shipwright's real ones, so every object the operator writes passes their schema; the
controller's part is played by tests/shipwright_sim.py."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest
from kubernetes import client

from tests.conftest import Cluster
from tests.shipwright_sim import KANIKO_BUILD, Shipwright
from tests.support import Agent, OperatorProcess, create_order, wait_for
from workorder_operator import envtest, lifecycle
from workorder_operator.kube import WorkOrders
from workorder_operator.model import WorkOrder, utcnow
from workorder_operator.shipwright import BUILDRUNS, BUILDS

DIGEST = "sha256:3f1c0ffee0ddba11c0ffee0ddba11c0ffee0ddba11c0ffee0ddba11c0ffee0d"


def order_of(cluster: Cluster, namespace: str, name: str) -> WorkOrder:
    return WorkOrder.from_body(WorkOrders(cluster.api, "test").get(namespace, name))


def phase(cluster: Cluster, namespace: str, name: str, wanted: str) -> WorkOrder | None:
    order = order_of(cluster, namespace, name)
    return order if order.status.phase == wanted else None


def build_order(cluster: Cluster, namespace: str, name: str, content: str, **spec: Any) -> None:
    create_order(cluster.api, namespace, name, workType="build", yamlContent=content, **spec)


def reject_event(cluster: Cluster, namespace: str, name: str, said: str) -> str:
    """The Warning `Reject` event a refused build leaves, with its reason (issue 17)."""

    def find() -> str | None:
        events = client.CoreV1Api(cluster.api).list_namespaced_event(namespace).items
        return next((e.message for e in events if e.involved_object.name == name and e.reason == "Reject"
                     and e.type == "Warning" and said in e.message), None)  # fmt: skip

    return wait_for(find, timeout=15, what=f"a Reject event on {name} saying {said!r}")


def exists(sw: Shipwright, plural: str, name: str) -> dict[str, Any] | None:
    return sw.get(plural, name)


def running_build(cluster: Cluster, namespace: str, name: str, **spec: Any) -> Shipwright:
    """A build order whose Build `<name>-build` is registered and whose BuildRun `<name>-1` runs."""
    sw = Shipwright(cluster.api, namespace)
    build_order(cluster, namespace, name, KANIKO_BUILD.format(name=f"{name}-build"), **spec)
    wait_for(lambda: exists(sw, BUILDS, f"{name}-build"), timeout=15, what="the Build to be applied")
    sw.register(f"{name}-build")
    wait_for(lambda: exists(sw, BUILDRUNS, f"{name}-1"), timeout=15, what="the attempt's BuildRun")
    sw.run(f"{name}-1")
    return sw


def test_build_succeeds_with_the_image_digest(cluster: Cluster, namespace: str, operator: OperatorProcess) -> None:
    sw = Shipwright(cluster.api, namespace)
    build_order(cluster, namespace, "app", KANIKO_BUILD.format(name="app-build"))
    built = wait_for(lambda: exists(sw, BUILDS, "app-build"), timeout=15, what="the Build to be applied")
    owner = built["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "WorkOrder" and owner["name"] == "app" and not owner.get("controller")
    assert any(m["manager"] == "workorder-operator" for m in built["metadata"]["managedFields"])
    sw.register("app-build")
    run = wait_for(lambda: exists(sw, BUILDRUNS, "app-1"), timeout=15, what="the attempt's BuildRun")
    assert run["spec"]["build"]["name"] == "app-build"
    uid = order_of(cluster, namespace, "app").uid
    ours = {"workorder.dev/order": "app", "workorder.dev/order-uid": uid, "workorder.dev/attempt": "1"}
    assert ours.items() <= run["metadata"]["labels"].items()  # Shipwright's controller adds its own
    assert run["metadata"]["ownerReferences"][0]["uid"] == uid
    assert order_of(cluster, namespace, "app").status.phase == "Claimed"
    sw.run("app-1")
    sw.succeed("app-1", DIGEST)
    done = wait_for(lambda: phase(cluster, namespace, "app", "Completed"), timeout=15)
    assert done.status.result == DIGEST
    assert done.status.attempt == 1


def test_retryable_failure_then_success_with_a_new_buildrun(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    sw = Shipwright(cluster.api, namespace)
    build_order(cluster, namespace, "flaky", KANIKO_BUILD.format(name="flaky-build"), backoffSeconds=1)
    wait_for(lambda: exists(sw, BUILDS, "flaky-build"), timeout=15)
    sw.register("flaky-build")
    wait_for(lambda: exists(sw, BUILDRUNS, "flaky-1"), timeout=15)
    sw.fail("flaky-1", "PodEvicted", "The node was low on resource: memory.")
    retried = wait_for(lambda: phase(cluster, namespace, "flaky", "RetryPending"), timeout=15)
    assert "PodEvicted" in (retried.status.last_error or "")
    wait_for(lambda: exists(sw, BUILDRUNS, "flaky-2"), timeout=20, what="a new BuildRun for attempt 2")
    sw.succeed("flaky-2", DIGEST)
    done = wait_for(lambda: phase(cluster, namespace, "flaky", "Completed"), timeout=15)
    assert done.status.attempt == 2 and done.status.retry_count == 1 and done.status.result == DIGEST


def test_non_retryable_failure_fails_the_order(cluster: Cluster, namespace: str, operator: OperatorProcess) -> None:
    sw = Shipwright(cluster.api, namespace)
    build_order(cluster, namespace, "nostrategy", KANIKO_BUILD.format(name="ns-build"), maxRetries=5)
    wait_for(lambda: exists(sw, BUILDS, "ns-build"), timeout=15)
    sw.register("ns-build")
    wait_for(lambda: exists(sw, BUILDRUNS, "nostrategy-1"), timeout=15)
    why = "clusterBuildStrategy kaniko does not exist"
    sw.fail(
        "nostrategy-1", "ClusterBuildStrategyNotFound", why, {"reason": "ClusterBuildStrategyNotFound", "message": why}
    )
    failed = wait_for(lambda: phase(cluster, namespace, "nostrategy", "Failed"), timeout=15)
    assert "ClusterBuildStrategyNotFound" in (failed.status.result or "")
    assert failed.status.retry_count == 0


def test_registration_failure_fails_with_shipwrights_reason(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    sw = Shipwright(cluster.api, namespace)
    build_order(cluster, namespace, "badbuild", KANIKO_BUILD.format(name="bad-build"))
    wait_for(lambda: exists(sw, BUILDS, "bad-build"), timeout=15)
    sw.register("bad-build", ok=False, reason="BuildStrategyNotFound", message="buildStrategy kaniko does not exist")
    failed = wait_for(lambda: phase(cluster, namespace, "badbuild", "Failed"), timeout=15)
    assert "BuildStrategyNotFound" in (failed.status.result or "")
    assert "kaniko does not exist" in (failed.status.result or "")
    assert exists(sw, BUILDRUNS, "badbuild-1") is None
    assert "kaniko does not exist" in reject_event(cluster, namespace, "badbuild", "BuildStrategyNotFound")


CONFIGMAP = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: sneaky\ndata:\n  a: b\n"
REJECTED = [
    ("configmap", CONFIGMAP, "kind ConfigMap"),
    ("secret", "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\nstringData:\n  p: x\n", "kind Secret"),
    ("strategy", "apiVersion: shipwright.io/v1beta1\nkind: ClusterBuildStrategy\nmetadata:\n  name: evil\n",
     "kind ClusterBuildStrategy"),
    ("buildrun", "apiVersion: shipwright.io/v1beta1\nkind: BuildRun\nmetadata:\n  name: r\n", "kind BuildRun"),
    ("v1alpha1", KANIKO_BUILD.format(name="old").replace("v1beta1", "v1alpha1"), "apiVersion"),
    ("noname", "apiVersion: shipwright.io/v1beta1\nkind: Build\nmetadata: {}\nspec: {}\n", "metadata.name"),
    ("unparsable", "kind: Build\nmetadata: [unclosed\n", "not valid YAML"),
    ("mixed", KANIKO_BUILD.format(name="ok-build") + "---\n" + CONFIGMAP, "document 2"),
    ("othernamespace", KANIKO_BUILD.format(name="x").replace("  name: x\n", "  name: x\n  namespace: kube-system\n"),
     "kube-system"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "content", "said"), REJECTED, ids=[r[0] for r in REJECTED])
def test_content_the_operator_must_not_run_fails_at_once(
    cluster: Cluster, namespace: str, operator: OperatorProcess, case: str, content: str, said: str
) -> None:
    build_order(cluster, namespace, "bad", content, maxRetries=5)
    failed = wait_for(lambda: phase(cluster, namespace, "bad", "Failed"), timeout=15)
    assert said in (failed.status.result or ""), failed.status.result
    assert failed.status.retry_count == 0
    reject_event(cluster, namespace, "bad", said)
    core = client.CoreV1Api(cluster.api)
    assert "sneaky" not in [c.metadata.name for c in core.list_namespaced_config_map(namespace).items]
    sw = Shipwright(cluster.api, namespace)
    assert sw.objects.list_namespaced_custom_object("shipwright.io", "v1beta1", namespace, BUILDRUNS)["items"] == []
    if case == "othernamespace":
        assert Shipwright(cluster.api, "kube-system").get(BUILDS, "x") is None


def test_claim_loss_cancels_the_buildrun(cluster: Cluster, namespace: str, operator: OperatorProcess) -> None:
    sw = running_build(cluster, namespace, "lost", claimTimeoutSeconds=3)
    # Take the claim away as an expiry would (as if the build agent had stopped renewing), and
    # let another agent claim the order: the build agent's next renewal finds the claim gone.
    orders = WorkOrders(cluster.api, "test")
    order = order_of(cluster, namespace, "lost")
    far = utcnow() + dt.timedelta(hours=1)
    orders.write_status(order, lifecycle.expire(order, far))
    thief = Agent(cluster.api, "11111111-1111-4111-8111-111111111111")
    thief.claim(thief.read(namespace, "lost"))
    cancelled = wait_for(
        lambda: (br := exists(sw, BUILDRUNS, "lost-1")) and br["spec"].get("state") == "BuildRunCanceled" and br,
        timeout=15, what="the BuildRun to be cancelled",
    )  # fmt: skip
    assert cancelled is not None
    assert order_of(cluster, namespace, "lost").status.claimed_by == thief.identity.id


def test_deleting_the_order_cancels_and_collects_build_and_buildrun(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    sw = running_build(cluster, namespace, "gone")
    client.CustomObjectsApi(cluster.api).delete_namespaced_custom_object(
        "workorder.dev", "v1alpha1", namespace, "workorders", "gone"
    )
    wait_for(lambda: exists(sw, BUILDRUNS, "gone-1") is None and exists(sw, BUILDS, "gone-build") is None,
             timeout=60, what="garbage collection of Build and BuildRun")  # fmt: skip
    assert "Traceback" not in operator.log()


def test_operator_restart_mid_build_resumes_the_same_buildrun(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    sw = running_build(cluster, namespace, "resume")
    operator.kill()
    time.sleep(1)
    operator.start()
    time.sleep(2)
    sw.succeed("resume-1", DIGEST)
    done = wait_for(lambda: phase(cluster, namespace, "resume", "Completed"), timeout=20)
    assert done.status.attempt == 1 and done.status.result == DIGEST
    assert exists(sw, BUILDRUNS, "resume-2") is None


def test_without_shipwright_build_orders_wait_then_run_once_it_is_installed(
    cluster: Cluster, namespace: str, tmp_path: Any
) -> None:
    if cluster.plane is None:
        pytest.skip("removes and reinstalls the Shipwright CRDs: only on our own control plane")
    ext = client.ApiextensionsV1Api(cluster.api)
    crds = envtest.shipwright_crds()
    for crd in crds:
        ext.delete_custom_resource_definition(crd["metadata"]["name"])

    def api_gone() -> bool:
        groups = client.ApisApi(cluster.api).get_api_versions().groups or []
        return not any(g.name == "shipwright.io" for g in groups)

    wait_for(api_gone, timeout=60, what="the Shipwright API to disappear")
    op = OperatorProcess(
        cluster.kubeconfig, tmp_path / "operator.log", "--all-namespaces", f"--leader-election-namespace={namespace}"
    )
    try:
        op.start()
        build_order(cluster, namespace, "waits", KANIKO_BUILD.format(name="waits-build"))

        def marked() -> WorkOrder | None:
            o = order_of(cluster, namespace, "waits")
            conds = {c["type"]: c for c in o.raw_status.get("conditions", [])}
            return o if conds.get("Reconciling", {}).get("reason") == "ShipwrightNotInstalled" else None

        waiting = wait_for(marked, timeout=20, what="the ShipwrightNotInstalled condition")
        assert waiting.status.phase == "Pending"
        core = client.CoreV1Api(cluster.api)
        wait_for(
            lambda: any(
                e.reason == "ShipwrightNotInstalled" and e.type == "Warning"
                for e in core.list_namespaced_event(namespace).items
            ),
            timeout=10,
            what="a ShipwrightNotInstalled warning event",
        )
    finally:
        envtest.install_crds(cluster.api, crds)
    try:
        sw = Shipwright(cluster.api, namespace)
        wait_for(lambda: exists(sw, BUILDS, "waits-build"), timeout=30, what="the build to start after install")
        sw.register("waits-build")
        wait_for(lambda: exists(sw, BUILDRUNS, "waits-1"), timeout=15)
        sw.succeed("waits-1", DIGEST)
        wait_for(lambda: phase(cluster, namespace, "waits", "Completed"), timeout=15)
    finally:
        op.stop()
