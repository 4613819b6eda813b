"""Plays Tekton's part next to the real Shipwright controller: no kubelet runs here, so no Tekton
controller could run a TaskRun's pod. Everything up to the TaskRun (Build registration, BuildRun
validation, the TaskRun itself, cancellation) is Shipwright's own; this writes only what Tekton
would write into the TaskRun Shipwright created (and, for failures Shipwright reads from the pod,
the labelled Pod with the status a kubelet would report), through the real CRDs' and the Pod API's
status subresources. Shipwright then turns it into the BuildRun's status by itself."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kubernetes import client

from tests.support import wait_for
from workorder_operator.model import format_time, utcnow
from workorder_operator.shipwright import GROUP, VERSION

KANIKO_BUILD = """\
apiVersion: shipwright.io/v1beta1
kind: Build
metadata:
  name: {name}
spec:
  source:
    type: Git
    git:
      url: https://github.com/shipwright-io/sample-go
    contextDir: docker-build
  strategy:
    name: kaniko
    kind: ClusterBuildStrategy
  retention:
    atBuildDeletion: true
  output:
    image: registry.example.com/build-examples/{name}
"""

TEKTON, TEKTON_VERSION, TASKRUNS = "tekton.dev", "v1", "taskruns"
# The label Shipwright puts on its TaskRuns and Pods (its caches see only Pods that carry it).
BUILDRUN_LABEL = "buildrun.shipwright.io/name"
# The TaskRun results Shipwright's strategies write and its controller copies to status.output.
DIGEST_RESULT, SIZE_RESULT = "shp-image-digest", "shp-image-size"
# Shipwright's step results for failure details, in a failed step's termination message.
ERROR_REASON_RESULT, ERROR_MESSAGE_RESULT = "shp-error-reason", "shp-error-message"


@dataclass(frozen=True)
class Step:
    """One step container as the kubelet reports it when it ended."""

    name: str  # the step's name without Tekton's "step-" prefix
    exit_code: int = 0
    reason: str = "Completed"  # "Error", "OOMKilled", ...
    results: tuple[tuple[str, str], ...] = ()  # what the step wrote to its termination message


def shipwright_object(api: client.ApiClient, namespace: str, plural: str, name: str) -> dict[str, Any] | None:
    """A Build or BuildRun as Shipwright left it, or None."""
    try:
        obj: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, name
        )
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return obj


class Tekton:
    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.objects = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.namespace = namespace

    def taskruns(self, buildrun: str) -> list[dict[str, Any]]:
        """The TaskRuns Shipwright created for a BuildRun."""
        items: list[dict[str, Any]] = self.objects.list_namespaced_custom_object(
            TEKTON, TEKTON_VERSION, self.namespace, TASKRUNS, label_selector=f"{BUILDRUN_LABEL}={buildrun}"
        )["items"]
        return items

    def taskrun(self, buildrun: str) -> dict[str, Any] | None:
        runs = self.taskruns(buildrun)
        return runs[0] if runs else None

    def _status(self, taskrun: str, status: dict[str, Any]) -> None:
        self.objects.patch_namespaced_custom_object_status(
            TEKTON, TEKTON_VERSION, self.namespace, TASKRUNS, taskrun, {"status": status},
            _content_type="application/merge-patch+json",
        )  # fmt: skip

    @staticmethod
    def _condition(status: str, reason: str, message: str) -> list[dict[str, str]]:
        return [{"type": "Succeeded", "status": status, "reason": reason, "message": message,
                 "lastTransitionTime": format_time(utcnow())}]  # fmt: skip

    @staticmethod
    def pod_name(taskrun: str) -> str:
        return f"{taskrun}-pod"

    def wait_taskrun(self, buildrun: str, timeout: float = 30) -> str:
        """The name of the TaskRun Shipwright creates for a BuildRun, once it exists."""
        taskrun = wait_for(lambda: self.taskrun(buildrun), timeout=timeout, what=f"Shipwright's TaskRun for {buildrun}")
        name: str = taskrun["metadata"]["name"]
        return name

    def finish(self, buildrun: str, digest: str, size: int = 8_388_608) -> None:
        """Run a BuildRun's TaskRun to success once Shipwright has made it."""
        taskrun = self.wait_taskrun(buildrun)
        self.start(taskrun)
        self.succeed(taskrun, digest, size)

    def start(self, taskrun: str) -> None:
        """Tekton picked the TaskRun up: a pod, a start time, Succeeded=Unknown/Running."""
        self._status(taskrun, {
            "podName": self.pod_name(taskrun), "startTime": format_time(utcnow()),
            "conditions": self._condition("Unknown", "Running", "Not all Steps in the Task have finished executing"),
        })  # fmt: skip

    def progress(self, taskrun: str, message: str) -> None:
        """A new message on the Running condition (Shipwright copies it to the BuildRun)."""
        self._status(taskrun, {"conditions": self._condition("Unknown", "Running", message)})

    def succeed(self, taskrun: str, digest: str, size: int) -> None:
        """All steps done; the strategy wrote the image digest and size as TaskRun results."""
        self._status(taskrun, {
            "completionTime": format_time(utcnow()),
            "conditions": self._condition("True", "Succeeded", "All Steps have completed executing"),
            "results": [{"name": DIGEST_RESULT, "type": "string", "value": digest},
                        {"name": SIZE_RESULT, "type": "string", "value": str(size)}],
        })  # fmt: skip

    def fail(self, taskrun: str, reason: str, message: str, steps: tuple[Step, ...] = ()) -> None:
        """Tekton's verdict: Succeeded=False with its reason (Failed, TaskRunTimeout, ...)."""
        self._status(taskrun, {
            "completionTime": format_time(utcnow()),
            "conditions": self._condition("False", reason, message),
            "steps": [self._step_state(s) for s in steps],
        })  # fmt: skip

    def cancelled(self, taskrun: str) -> None:
        """Tekton's answer to spec.status TaskRunCancelled."""
        self.fail(taskrun, "TaskRunCancelled", f'TaskRun "{taskrun}" was cancelled. TaskRun cancelled as requested')

    @staticmethod
    def _step_state(step: Step) -> dict[str, Any]:
        terminated: dict[str, Any] = {"exitCode": step.exit_code, "reason": step.reason}
        if step.results:
            terminated["message"] = json.dumps([{"key": k, "value": v, "type": 1} for k, v in step.results])
        return {"name": step.name, "container": f"step-{step.name}", "terminated": terminated}

    def pod(self, taskrun: str, buildrun: str, steps: tuple[Step, ...], *, evicted: str = "") -> str:
        """The TaskRun's pod as a kubelet leaves it: one container per step, each terminated as
        given (or the whole pod evicted with that message). Labelled as Tekton labels it, which is
        how Shipwright's cache finds it."""
        name = self.pod_name(taskrun)
        self.core.create_namespaced_pod(self.namespace, {
            "metadata": {"name": name, "labels": {BUILDRUN_LABEL: buildrun, "tekton.dev/taskRun": taskrun}},
            "spec": {"containers": [{"name": f"step-{s.name}", "image": "registry.example.com/step"} for s in steps]},
        })  # fmt: skip
        now = format_time(utcnow())
        statuses = [
            {"name": f"step-{s.name}", "image": "registry.example.com/step", "imageID": "", "ready": False,
             "restartCount": 0, "state": {"terminated": {"exitCode": s.exit_code, "reason": s.reason,
                                                         "startedAt": now, "finishedAt": now}}}
            for s in steps
        ]  # fmt: skip
        status: dict[str, Any] = {"phase": "Failed", "containerStatuses": statuses}
        if evicted:
            status.update(reason="Evicted", message=evicted)
        self.core.patch_namespaced_pod_status(name, self.namespace, {"status": status})
        return name
