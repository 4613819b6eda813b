"""Build orders: the operator's built-in agent runs the Shipwright Builds embedded in yamlContent,
against Shipwright's real controller (v0.20.13, started with the test control plane).

Shipwright registers the Builds, validates the BuildRuns, creates and cancels the TaskRuns and
writes every BuildRun status these tests read. Only Tekton's part is played (tests/tekton.py): no
kubelet runs here, so nothing could run a TaskRun's pod; the stand-in writes the TaskRun status
(and, for failures Shipwright reads from the pod, the labelled Pod's status) that Tekton and the
kubelet would write."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from devcluster import envtest
from tests.conftest import Cluster
from tests.support import Agent, OperatorProcess, create_order, wait_for
from tests.tekton import ERROR_MESSAGE_RESULT, ERROR_REASON_RESULT, KANIKO_BUILD, Step, Tekton, shipwright_object
from workorder_operator import lifecycle
from workorder_operator.build import PERMANENT_REASONS, buildrun_name
from workorder_operator.kube import Conflict, WorkOrders
from workorder_operator.model import WorkOrder, utcnow
from workorder_operator.shipwright import BUILDRUNS, BUILDS, GROUP, VERSION

DIGEST = "sha256:3f1c0ffee0ddba11c0ffee0ddba11c0ffee0ddba11c0ffee0ddba11c0ffee0d"
SIZE = 31_415_926


def order_of(cluster: Cluster, namespace: str, name: str) -> WorkOrder:
    return WorkOrder.from_body(WorkOrders(cluster.api, "test").get(namespace, name))


def phase(cluster: Cluster, namespace: str, name: str, *wanted: str) -> WorkOrder | None:
    order = order_of(cluster, namespace, name)
    return order if order.status.phase in wanted else None


def build_order(cluster: Cluster, namespace: str, name: str, content: str, **spec: Any) -> None:
    create_order(cluster.api, namespace, name, workType="build", yamlContent=content, **spec)


def reject_event(cluster: Cluster, namespace: str, name: str, said: str) -> str:
    """The Warning `Reject` event a refused build leaves, with its reason (issue 17)."""

    def find() -> str | None:
        events = client.CoreV1Api(cluster.api).list_namespaced_event(namespace).items
        return next((e.message for e in events if e.involved_object.name == name and e.reason == "Reject"
                     and e.type == "Warning" and said in e.message), None)  # fmt: skip

    return wait_for(find, timeout=15, what=f"a Reject event on {name} saying {said!r}")


def get(cluster: Cluster, namespace: str, plural: str, name: str) -> dict[str, Any] | None:
    return shipwright_object(cluster.api, namespace, plural, name)


def succeeded(buildrun: dict[str, Any] | None) -> dict[str, Any]:
    conditions = ((buildrun or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == "Succeeded"), {})


@dataclass
class Running:
    """A build order whose attempt's BuildRun runs: Shipwright made its TaskRun, Tekton started it."""

    cluster: Cluster
    namespace: str
    order: str
    buildrun: str
    taskrun: str
    tekton: Tekton

    def buildrun_status(self) -> dict[str, Any]:
        return (get(self.cluster, self.namespace, BUILDRUNS, self.buildrun) or {}).get("status") or {}

    def settle(self, message: str) -> None:
        """Let Shipwright see what was just written to the Pod before the TaskRun fails: a new
        message on the Running TaskRun that Shipwright copies to the BuildRun shows it has handled
        an event that came after (its Pod and TaskRun caches are fed by separate watches)."""
        self.tekton.progress(self.taskrun, message)
        wait_for(lambda: succeeded(get(self.cluster, self.namespace, BUILDRUNS, self.buildrun)).get("message")
                 == message, timeout=30, what="Shipwright to copy the TaskRun's progress")  # fmt: skip


def run_build(cluster: Cluster, namespace: str, name: str, attempt: int = 1, create: bool = True,
              build: str = "", **spec: Any) -> Running:  # fmt: skip
    """Create the order (unless `create` is False) with the Build `build` (default `<name>-build`) and
    wait until its attempt's TaskRun runs."""
    cluster.need_shipwright()
    if create:
        build_order(cluster, namespace, name, KANIKO_BUILD.format(name=build or f"{name}-build"), **spec)
    buildrun = buildrun_name(name, attempt)
    tekton = Tekton(cluster.api, namespace)
    taskrun = tekton.wait_taskrun(buildrun)
    tekton.start(taskrun)
    running = Running(cluster, namespace, name, buildrun, taskrun, tekton)
    wait_for(lambda: succeeded(get(cluster, namespace, BUILDRUNS, buildrun)).get("status") == "Unknown",
             timeout=30, what="Shipwright to report the BuildRun running")  # fmt: skip
    return running


def test_build_succeeds_with_the_image_digest(cluster: Cluster, namespace: str, operator: OperatorProcess) -> None:
    run = run_build(cluster, namespace, "app")
    built = get(cluster, namespace, BUILDS, "app-build")
    assert built is not None
    assert built["status"]["registered"] == "True" and built["status"]["reason"] == "Succeeded"
    owner = built["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "WorkOrder" and owner["name"] == "app" and not owner.get("controller")
    assert any(m["manager"] == "workorder-operator" for m in built["metadata"]["managedFields"])
    br = get(cluster, namespace, BUILDRUNS, "app-1")
    assert br is not None and br["spec"]["build"]["name"] == "app-build"
    uid = order_of(cluster, namespace, "app").uid
    ours = {"workorder.dev/order": "app", "workorder.dev/order-uid": uid, "workorder.dev/attempt": "1"}
    labels = br["metadata"]["labels"]
    assert ours.items() <= labels.items()
    assert labels["build.shipwright.io/name"] == "app-build"  # Shipwright's controller adds its own
    # Ours, and (retention.atBuildDeletion) the controller reference Shipwright adds from the Build.
    assert any(o["kind"] == "WorkOrder" and o["uid"] == uid for o in br["metadata"]["ownerReferences"])
    assert order_of(cluster, namespace, "app").status.phase == "Claimed"
    run.tekton.succeed(run.taskrun, DIGEST, SIZE)
    done = wait_for(lambda: phase(cluster, namespace, "app", "Completed"), timeout=30)
    assert done.status.result == DIGEST and done.status.attempt == 1
    output = run.buildrun_status()["output"]
    assert output == {"digest": DIGEST, "size": SIZE}


def test_an_order_name_longer_than_a_label_value_builds(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    # Names may be 253 long; label values (Shipwright copies the BuildRun's name into one) only 63.
    name = "a-very-long-order-name-" + "x" * 80
    run = run_build(cluster, namespace, name, build="long-build")
    assert len(run.buildrun) <= 63
    run.tekton.succeed(run.taskrun, DIGEST, SIZE)
    done = wait_for(lambda: phase(cluster, namespace, name, "Completed"), timeout=30)
    assert done.status.result == DIGEST and done.status.retry_count == 0


STRATEGY = "    name: kaniko\n    kind: ClusterBuildStrategy\n"
OUTPUT = "  output:\n"
# (reason Shipwright registers, what to change in the Build, what the message names)
UNREGISTERED = [
    ("ClusterBuildStrategyNotFound", (STRATEGY, "    name: no-such-strategy\n    kind: ClusterBuildStrategy\n"),
     "no-such-strategy"),
    ("BuildStrategyNotFound", (STRATEGY, "    name: kaniko\n    kind: BuildStrategy\n"), "kaniko"),
    # Whether a Secret exists is withheld (issue 24): the order says where to look, with one's own rights.
    ("ReferenceRefused", (OUTPUT, "  output:\n    pushSecret: no-such-secret\n"),
     "kubectl get builds.shipwright.io bad-build"),
]  # fmt: skip


@pytest.mark.parametrize(("reason", "change", "named"), UNREGISTERED, ids=[c[0] for c in UNREGISTERED])
def test_registration_failure_fails_the_order_with_shipwrights_reason(
    cluster: Cluster, namespace: str, operator: OperatorProcess, reason: str, change: tuple[str, str], named: str
) -> None:
    cluster.need_shipwright()
    content = KANIKO_BUILD.format(name="bad-build").replace(*change)
    build_order(cluster, namespace, "badbuild", content, maxRetries=3)
    failed = wait_for(lambda: phase(cluster, namespace, "badbuild", "Failed", "RetryPending"), timeout=30)
    assert failed.status.phase == "Failed" and failed.status.retry_count == 0
    assert reason in (failed.status.result or ""), failed.status.result
    assert named in (failed.status.result or "")
    assert get(cluster, namespace, BUILDRUNS, "badbuild-1") is None
    assert named in reject_event(cluster, namespace, "badbuild", reason)  # issue 17: the refusal says why
    if reason == "ReferenceRefused":
        assert "no-such-secret" not in (failed.status.result or "") and "NotFound" not in (failed.status.result or "")


@dataclass(frozen=True)
class FailureCase:
    id: str
    tekton_reason: str  # the TaskRun's Succeeded reason Tekton writes
    pod: tuple[Step, ...] = ()  # the Pod the kubelet leaves, if Shipwright reads one
    evicted: str = ""
    steps: tuple[Step, ...] = ()  # the TaskRun's step states
    shipwright_reason: str = ""  # what Shipwright makes of it
    said: tuple[str, ...] = ()  # what the order's error must say


DETAILS = ((ERROR_REASON_RESULT, "GitRemotePrivate"), (ERROR_MESSAGE_RESULT, "the repository is private"))
FAILED_STEP = (Step("source-default", 1, "Error", DETAILS),)
RETRYABLE = [
    FailureCase("timeout", "TaskRunTimeout", shipwright_reason="BuildRunTimeout", said=("failed to finish within",)),
    FailureCase("failed-step", "Failed", pod=FAILED_STEP, steps=FAILED_STEP, shipwright_reason="Failed",
                said=("GitRemotePrivate", "the repository is private")),
    FailureCase("evicted", "Failed", pod=(Step("build-and-push", 137, "Error"),),
                evicted="The node was low on resource: memory.", shipwright_reason="PodEvicted",
                said=("low on resource",)),
    FailureCase("out-of-memory", "Failed", pod=(Step("build-and-push", 137, "OOMKilled"),),
                steps=(Step("build-and-push", 137, "OOMKilled"),), shipwright_reason="StepOutOfMemory",
                said=("out-of-memory", "step-build-and-push")),
    # A Tekton reason Shipwright passes through as it is: not in our table, so retried.
    FailureCase("image-pull", "TaskRunImagePullFailed", shipwright_reason="TaskRunImagePullFailed",
                said=("TaskRunImagePullFailed",)),
]  # fmt: skip


def fail_taskrun(run: Running, case: FailureCase) -> None:
    if case.pod:
        run.tekton.pod(run.taskrun, run.buildrun, case.pod, evicted=case.evicted)
        run.settle(f"{case.id}: the pod has ended")
    run.tekton.fail(run.taskrun, case.tekton_reason, f"TaskRun {run.taskrun} ended: {case.id}", case.steps)


@pytest.mark.parametrize("case", RETRYABLE, ids=[c.id for c in RETRYABLE])
def test_retryable_failures_as_shipwright_reports_them(
    cluster: Cluster, namespace: str, operator: OperatorProcess, case: FailureCase
) -> None:
    run = run_build(cluster, namespace, "flaky", backoffSeconds=3600)
    fail_taskrun(run, case)
    retried = wait_for(lambda: phase(cluster, namespace, "flaky", "RetryPending", "Failed"), timeout=30)
    status = run.buildrun_status()
    assert succeeded({"status": status})["reason"] == case.shipwright_reason, status
    assert case.shipwright_reason not in PERMANENT_REASONS
    assert retried.status.phase == "RetryPending", retried.status.last_error
    for text in case.said:
        assert text in (retried.status.last_error or ""), retried.status.last_error
    if case.id == "failed-step":  # Shipwright read the step's termination message
        assert status["failureDetails"]["reason"] == "GitRemotePrivate"


def test_a_buildrun_per_attempt_until_one_succeeds(cluster: Cluster, namespace: str, operator: OperatorProcess) -> None:
    run = run_build(cluster, namespace, "again", backoffSeconds=1)
    fail_taskrun(run, RETRYABLE[0])
    wait_for(lambda: phase(cluster, namespace, "again", "RetryPending"), timeout=30)
    second = run_build(cluster, namespace, "again", attempt=2, create=False)
    assert second.taskrun != run.taskrun
    second.tekton.succeed(second.taskrun, DIGEST, SIZE)
    done = wait_for(lambda: phase(cluster, namespace, "again", "Completed"), timeout=30)
    assert done.status.attempt == 2 and done.status.retry_count == 1 and done.status.result == DIGEST
    assert succeeded(get(cluster, namespace, BUILDRUNS, "again-1"))["reason"] == "BuildRunTimeout"


def test_vulnerabilities_found_fail_the_order_for_good(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    run = run_build(cluster, namespace, "vulnerable", maxRetries=3)
    scan = (Step("image-processing", 22, "Error"),)
    fail_taskrun(run, FailureCase("vulnerable", "Failed", pod=scan, steps=scan))
    failed = wait_for(lambda: phase(cluster, namespace, "vulnerable", "Failed", "RetryPending"), timeout=30)
    assert succeeded({"status": run.buildrun_status()})["reason"] == "VulnerabilitiesFound"
    assert "VulnerabilitiesFound" in PERMANENT_REASONS
    assert failed.status.phase == "Failed" and failed.status.retry_count == 0
    assert "VulnerabilitiesFound" in (failed.status.result or "")


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
    objects = client.CustomObjectsApi(cluster.api)
    assert objects.list_namespaced_custom_object(GROUP, VERSION, namespace, BUILDRUNS)["items"] == []
    if case == "othernamespace":
        assert get(cluster, "kube-system", BUILDS, "x") is None


def cancelled_taskrun(run: Running) -> dict[str, Any] | None:
    taskrun = run.tekton.taskrun(run.buildrun)
    return taskrun if taskrun and taskrun["spec"].get("status") == "TaskRunCancelled" else None


def test_claim_loss_cancels_the_buildrun_and_shipwright_its_taskrun(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    run = run_build(cluster, namespace, "lost", claimTimeoutSeconds=3)
    # Take the claim away as an expiry would (as if the build agent had stopped renewing), and
    # let another agent claim the order: the build agent's next renewal finds the claim gone.
    orders = WorkOrders(cluster.api, "test")
    order = order_of(cluster, namespace, "lost")
    orders.write_status(order, lifecycle.expire(order, utcnow() + dt.timedelta(hours=1)))
    thief = Agent(cluster.api, "11111111-1111-4111-8111-111111111111")
    with contextlib.suppress(Conflict, lifecycle.TransitionError):
        # The build agent itself may claim attempt 2 first: attempt 1's claim is just as lost.
        thief.claim(thief.read(namespace, "lost"))
    wait_for(lambda: cancelled_taskrun(run), timeout=30, what="Shipwright to cancel the TaskRun")
    assert (get(cluster, namespace, BUILDRUNS, "lost-1") or {})["spec"]["state"] == "BuildRunCanceled"
    run.tekton.cancelled(run.taskrun)
    wait_for(lambda: succeeded(get(cluster, namespace, BUILDRUNS, "lost-1")).get("status") == "False",
             timeout=30, what="the BuildRun to end cancelled")  # fmt: skip
    assert succeeded(get(cluster, namespace, BUILDRUNS, "lost-1"))["reason"] == "BuildRunCanceled"
    assert order_of(cluster, namespace, "lost").status.attempt == 2
    assert "state" not in (get(cluster, namespace, BUILDRUNS, "lost-2") or {}).get("spec", {})


def test_deleting_the_order_stops_the_build_and_collects_everything(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    run = run_build(cluster, namespace, "gone")
    client.CustomObjectsApi(cluster.api).delete_namespaced_custom_object(
        "workorder.dev", "v1alpha1", namespace, "workorders", "gone"
    )

    def collected() -> bool:
        return (get(cluster, namespace, BUILDRUNS, "gone-1") is None and get(cluster, namespace, BUILDS, "gone-build")
                is None and run.tekton.taskrun("gone-1") is None)  # fmt: skip

    # The TaskRun goes with the BuildRun Shipwright made it for (Tekton would then remove its pod).
    wait_for(collected, timeout=60, what="garbage collection of Build, BuildRun and TaskRun")
    assert "Traceback" not in operator.log()


def test_operator_restart_mid_build_resumes_the_same_buildrun(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    run = run_build(cluster, namespace, "resume")
    operator.kill()
    operator.start()
    run.tekton.succeed(run.taskrun, DIGEST, SIZE)
    done = wait_for(lambda: phase(cluster, namespace, "resume", "Completed"), timeout=30)
    assert done.status.attempt == 1 and done.status.result == DIGEST
    assert get(cluster, namespace, BUILDRUNS, "resume-2") is None
    assert len(run.tekton.taskruns("resume-1")) == 1


@pytest.fixture
def impatient_operator(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    with OperatorProcess(
        cluster.kubeconfig, tmp_path / "operator.log", "--all-namespaces", f"--leader-election-namespace={namespace}",
        "--buildrun-start-timeout=3",
    ).running() as proc:  # fmt: skip
        yield proc


def test_a_buildrun_that_never_starts_is_cancelled_and_retried(
    cluster: Cluster, namespace: str, impatient_operator: OperatorProcess
) -> None:
    cluster.need_shipwright()
    # Shipwright makes the TaskRun, but no Tekton ever reports on it: no condition, ever.
    build_order(cluster, namespace, "stuck", KANIKO_BUILD.format(name="stuck-build"), backoffSeconds=3600)
    tekton = Tekton(cluster.api, namespace)
    wait_for(lambda: tekton.taskrun("stuck-1"), timeout=30, what="Shipwright's TaskRun")
    retried = wait_for(lambda: phase(cluster, namespace, "stuck", "RetryPending", "Failed"), timeout=30)
    assert retried.status.phase == "RetryPending"
    assert "BuildRunNotStarted" in (retried.status.last_error or ""), retried.status.last_error
    assert (get(cluster, namespace, BUILDRUNS, "stuck-1") or {})["spec"]["state"] == "BuildRunCanceled"
    taskrun = wait_for(lambda: (tr := tekton.taskrun("stuck-1")) and tr["spec"].get("status") == "TaskRunCancelled",
                       timeout=30, what="Shipwright to cancel the TaskRun")  # fmt: skip
    assert taskrun


def test_without_shipwright_build_orders_wait_then_run_once_it_is_installed(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    plane = cluster.plane
    if plane is None:
        pytest.skip("removes and reinstalls the Shipwright CRDs: only on our own control plane")
    cluster.need_shipwright()
    ext = client.ApiextensionsV1Api(cluster.api)
    crds = envtest.shipwright_crds()
    plane.stop_shipwright()  # it would only retry its watches while its APIs are gone
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
        # backoffSeconds 1: if the agent takes the order in the moment the reinstalled CRDs are in
        # discovery but not served yet (a 404, a retryable failure), its next attempt runs at once.
        build_order(cluster, namespace, "waits", KANIKO_BUILD.format(name="waits-build"), backoffSeconds=1)

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
        plane.start_shipwright()  # reinstalls the CRDs first
    try:

        def running_attempt() -> int | None:
            o = order_of(cluster, namespace, "waits")
            if o.status.phase != "Claimed":
                return None
            started = get(cluster, namespace, BUILDRUNS, buildrun_name("waits", o.status.attempt))
            return o.status.attempt if started else None

        attempt = wait_for(running_attempt, timeout=60, what="an attempt of waits to run its BuildRun")
        run = run_build(cluster, namespace, "waits", attempt=attempt, create=False)
        run.tekton.succeed(run.taskrun, DIGEST, SIZE)
        wait_for(lambda: phase(cluster, namespace, "waits", "Completed"), timeout=30)
    finally:
        op.stop()
