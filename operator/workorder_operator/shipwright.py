"""Adapter for the Shipwright Build API (shipwright.io/v1beta1): Builds, BuildRuns, discovery."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from workorder_operator.kube import timeout, watch_timeout
from workorder_operator.model import API_VERSION, KIND, WorkOrder

log = logging.getLogger(__name__)

GROUP, VERSION = "shipwright.io", "v1beta1"
BUILDS, BUILDRUNS = "builds", "buildruns"
ORDER_LABEL = "workorder.dev/order"
ATTEMPT_LABEL = "workorder.dev/attempt"
# How long one watch request lasts before we look at `stop` again (a lost claim is noticed by then).
WATCH_SLICE_SECONDS = 2


def owner_reference(order: WorkOrder) -> dict[str, Any]:
    """Owned by the WorkOrder, so deleting it garbage-collects Builds and BuildRuns. Not a
    controller reference: Shipwright sets its own controller reference on BuildRuns."""
    return {"apiVersion": API_VERSION, "kind": KIND, "name": order.name, "uid": order.uid}


class Shipwright:
    def __init__(self, api: client.ApiClient, field_manager: str) -> None:
        self.api = api
        self.objects = client.CustomObjectsApi(api)
        self.field_manager = field_manager

    def installed(self) -> bool:
        """Whether the cluster serves shipwright.io/v1beta1 (discovery, not a guess from errors)."""
        try:
            groups = client.ApisApi(self.api).get_api_versions(_request_timeout=timeout()).groups or []
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            log.warning("API discovery failed: %s", getattr(exc, "reason", None) or exc)
            return False
        return any(g.name == GROUP and any(v.version == VERSION for v in g.versions) for g in groups)

    def apply_build(self, order: WorkOrder, build: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply of one Build in the order's namespace, owned by the order."""
        body = {
            **build,
            "metadata": {
                **build["metadata"],
                "namespace": order.namespace,
                "ownerReferences": [owner_reference(order)],
            },
        }
        applied: dict[str, Any] = self.objects.patch_namespaced_custom_object(
            GROUP, VERSION, order.namespace, BUILDS, build["metadata"]["name"], body,
            field_manager=self.field_manager, force=True, _content_type="application/apply-patch+yaml",
        )  # fmt: skip
        return applied

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self.objects.get_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, _request_timeout=timeout()
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    def ensure_buildrun(self, order: WorkOrder, name: str, build_name: str) -> dict[str, Any]:
        """The attempt's BuildRun: created once, found again after a restart."""
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "BuildRun",
            "metadata": {
                "name": name,
                "namespace": order.namespace,
                "labels": {ORDER_LABEL: order.name, ATTEMPT_LABEL: str(order.status.attempt)},
                "ownerReferences": [owner_reference(order)],
            },
            "spec": {"build": {"name": build_name}},
        }
        try:
            created: dict[str, Any] = self.objects.create_namespaced_custom_object(
                GROUP, VERSION, order.namespace, BUILDRUNS, body, field_manager=self.field_manager
            )
            return created
        except ApiException as exc:
            if exc.status != 409:
                raise
        existing = self.get(BUILDRUNS, order.namespace, name)
        if existing is None:  # deleted between our create and get: try once more
            return self.ensure_buildrun(order, name, build_name)
        return existing

    def cancel_buildrun(self, namespace: str, name: str) -> None:
        try:
            self.objects.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, BUILDRUNS, name, {"spec": {"state": "BuildRunCanceled"}},
                field_manager=self.field_manager, _content_type="application/merge-patch+json",
                _request_timeout=timeout(),
            )  # fmt: skip
        except ApiException as exc:
            if exc.status != 404:  # gone already (garbage-collected with its order): nothing to cancel
                raise

    def wait_for(
        self,
        plural: str,
        namespace: str,
        name: str,
        done: Callable[[dict[str, Any]], bool],
        stopped: Callable[[], bool],
    ) -> dict[str, Any] | None:
        """Watch one object until `done(obj)`; None if it is deleted or `stopped()`.

        A watch from the last seen resourceVersion, in short slices so `stopped` is looked at
        within WATCH_SLICE_SECONDS; 410 Gone and dropped connections just start a new slice."""
        version = None
        while not stopped():
            if version is None:
                obj = self.get(plural, namespace, name)
                if obj is None:
                    return None
                if done(obj):
                    return obj
                version = obj["metadata"]["resourceVersion"]
            try:
                for event in watch.Watch().stream(
                    self.objects.list_namespaced_custom_object, GROUP, VERSION, namespace, plural,
                    field_selector=f"metadata.name={name}", resource_version=version,
                    timeout_seconds=WATCH_SLICE_SECONDS, _request_timeout=watch_timeout(WATCH_SLICE_SECONDS),
                ):  # fmt: skip
                    obj = dict(event["object"])
                    if event["type"] == "ERROR":
                        version = None
                        break
                    if event["type"] == "DELETED":
                        return None
                    version = obj["metadata"]["resourceVersion"]
                    if done(obj):
                        return obj
            except ApiException as exc:
                if exc.status != 410:
                    raise
                version = None
            except (urllib3.exceptions.HTTPError, OSError) as exc:  # API server restarting: keep watching
                log.warning("watch of %s %s/%s interrupted (%s); retrying", plural, namespace, name, exc)
                time.sleep(1)
        return None
