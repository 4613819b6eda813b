"""Adapter for the Shipwright Build API (shipwright.io/v1beta1): Builds, BuildRuns, discovery."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from workorder_operator.build import label_value
from workorder_operator.kube import timeout, watch_timeout
from workorder_operator.model import API_VERSION, KIND, WorkOrder

log = logging.getLogger(__name__)

GROUP, VERSION = "shipwright.io", "v1beta1"
BUILDS, BUILDRUNS = "builds", "buildruns"
# The order's name (cut to fit a label value: names may be 253 long), its uid (always fits: select
# by this one) and the attempt.
ORDER_LABEL = "workorder.dev/order"
ORDER_UID_LABEL = "workorder.dev/order-uid"
ATTEMPT_LABEL = "workorder.dev/attempt"
# How long one watch request lasts before we look at `stop` again (a lost claim is noticed by then).
WATCH_SLICE_SECONDS = 2


class NotOurs(Exception):
    """An object we need by name exists and belongs to someone else (another order, another
    attempt, a person): it is never taken over, changed or reported as ours."""


def owned_by(obj: dict[str, Any], order: WorkOrder) -> bool:
    return any(ref.get("uid") == order.uid for ref in obj.get("metadata", {}).get("ownerReferences") or [])


def _owners(obj: dict[str, Any]) -> str:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return ", ".join(f"{r.get('kind')} {r.get('name')} (uid {r.get('uid')})" for r in refs) or "no owner"


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
        """One Build of the order in its namespace, owned by the order: created if absent, brought
        back to the order's content if it is the order's own (a retry, a restarted operator).
        A Build of that name that the order did not create raises NotOurs and is left untouched:
        an order can never take over (or, through garbage collection, delete) someone's Build."""
        name = build["metadata"]["name"]
        body = {
            **build,
            "metadata": {
                **build["metadata"],
                "namespace": order.namespace,
                "ownerReferences": [owner_reference(order)],
            },
        }
        existing = self.get(BUILDS, order.namespace, name)
        if existing is None:
            try:
                created: dict[str, Any] = self.objects.create_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    order.namespace,
                    BUILDS,
                    body,
                    field_manager=self.field_manager,
                    _request_timeout=timeout(),
                )
                return created
            except ApiException as exc:
                if exc.status != 409:
                    raise
            existing = self.get(BUILDS, order.namespace, name)  # created by someone else meanwhile
            if existing is None:
                raise NotOurs(f"Build {name!r} was created and deleted by someone else while we created it")
        if not owned_by(existing, order):
            raise NotOurs(
                f"Build {name!r} already exists in namespace {order.namespace!r} and is not this order's "
                f"(owned by {_owners(existing)}); rename the Build in yamlContent"
            )
        try:
            # No force: if someone else has since changed a field we set, refuse rather than overwrite.
            applied: dict[str, Any] = self.objects.patch_namespaced_custom_object(
                GROUP, VERSION, order.namespace, BUILDS, name, body,
                field_manager=self.field_manager, _content_type="application/apply-patch+yaml",
                _request_timeout=timeout(),
            )  # fmt: skip
        except ApiException as exc:
            if exc.status != 409:
                raise
            raise NotOurs(f"Build {name!r} was changed by someone else since this order created it") from None
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

    def ensure_buildrun(self, order: WorkOrder, attempt: int, name: str, build_name: str) -> dict[str, Any]:
        """The attempt's BuildRun: created once, found again after a restart. An existing BuildRun
        of that name is adopted only if it is this order's (owner uid) and this attempt's (label):
        a leftover of a deleted order of the same name, or one planted by someone, raises NotOurs
        and never lends its outcome."""
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "BuildRun",
            "metadata": {
                "name": name,
                "namespace": order.namespace,
                "labels": {
                    ORDER_LABEL: label_value(order.name), ORDER_UID_LABEL: order.uid, ATTEMPT_LABEL: str(attempt),
                },
                "ownerReferences": [owner_reference(order)],
            },
            "spec": {"build": {"name": build_name}},
        }  # fmt: skip
        try:
            created: dict[str, Any] = self.objects.create_namespaced_custom_object(
                GROUP,
                VERSION,
                order.namespace,
                BUILDRUNS,
                body,
                field_manager=self.field_manager,
                _request_timeout=timeout(),
            )
            return created
        except ApiException as exc:
            if exc.status != 409:
                raise
        existing = self.get(BUILDRUNS, order.namespace, name)
        if existing is None:  # deleted between our create and get: try once more
            return self.ensure_buildrun(order, attempt, name, build_name)
        labels = existing["metadata"].get("labels") or {}
        if not owned_by(existing, order) or labels.get(ATTEMPT_LABEL) != str(attempt):
            raise NotOurs(
                f"BuildRun {name!r} already exists and is not attempt {attempt} of this order "
                f"(owned by {_owners(existing)}, attempt label {labels.get(ATTEMPT_LABEL)!r})"
            )
        return existing

    def cancel_buildrun(self, order: WorkOrder, attempt: int, name: str) -> bool:
        """Cancel the attempt's BuildRun if it is ours (never someone else's of the same name);
        whether a cancel was written. Guarded by resourceVersion, re-read on a conflict."""
        for _ in range(3):
            run = self.get(BUILDRUNS, order.namespace, name)
            labels = (run or {}).get("metadata", {}).get("labels") or {}
            if run is None or not owned_by(run, order) or labels.get(ATTEMPT_LABEL) != str(attempt):
                return False  # gone already (garbage-collected with its order), or not ours
            patch = {"metadata": {"resourceVersion": run["metadata"]["resourceVersion"]},
                     "spec": {"state": "BuildRunCanceled"}}  # fmt: skip
            try:
                self.objects.patch_namespaced_custom_object(
                    GROUP, VERSION, order.namespace, BUILDRUNS, name, patch,
                    field_manager=self.field_manager, _content_type="application/merge-patch+json",
                    _request_timeout=timeout(),
                )  # fmt: skip
                return True
            except ApiException as exc:
                if exc.status == 404:
                    return False
                if exc.status != 409:
                    raise
        return False

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
