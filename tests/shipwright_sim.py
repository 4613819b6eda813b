"""Plays the Shipwright controller's part in tests (no Tekton or nodes here): it writes the status
fields the real controller writes, through the real CRDs' status subresources."""

from __future__ import annotations

from typing import Any

from kubernetes import client

from workorder_operator.model import format_time, utcnow
from workorder_operator.shipwright import BUILDRUNS, BUILDS, GROUP, VERSION

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


class Shipwright:
    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.objects = client.CustomObjectsApi(api)
        self.namespace = namespace

    def get(self, plural: str, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self.objects.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, plural, name
            )
            return obj
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _status(self, plural: str, name: str, status: dict[str, Any]) -> None:
        self.objects.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, plural, name, {"status": status},
            _content_type="application/merge-patch+json",
        )  # fmt: skip

    def register(self, name: str, ok: bool = True, reason: str = "Succeeded", message: str = "") -> None:
        self._status(BUILDS, name, {
            "registered": "True" if ok else "False",
            "reason": reason,
            "message": message or ("All validations succeeded" if ok else "validation failed"),
        })  # fmt: skip

    def succeed(self, name: str, digest: str) -> None:
        now = format_time(utcnow())
        self._status(BUILDRUNS, name, {
            "startTime": now, "completionTime": now,
            "conditions": [{"type": "Succeeded", "status": "True", "reason": "Succeeded",
                            "message": "All Steps have completed executing", "lastTransitionTime": now}],
            "output": {"digest": digest, "size": 12345},
        })  # fmt: skip

    def fail(self, name: str, reason: str, message: str, details: dict[str, str] | None = None) -> None:
        now = format_time(utcnow())
        status: dict[str, Any] = {
            "startTime": now, "completionTime": now,
            "conditions": [{"type": "Succeeded", "status": "False", "reason": reason, "message": message,
                            "lastTransitionTime": now}],
        }  # fmt: skip
        if details:
            status["failureDetails"] = details
        self._status(BUILDRUNS, name, status)

    def run(self, name: str) -> None:
        """Running: the Succeeded condition is Unknown."""
        now = format_time(utcnow())
        self._status(BUILDRUNS, name, {
            "startTime": now,
            "conditions": [{"type": "Succeeded", "status": "Unknown", "reason": "Running",
                            "message": "Not all Steps in the Task have finished executing", "lastTransitionTime": now}],
        })  # fmt: skip
