"""Adapter for the Shipwright Build API (shipwright.io/v1beta1): Builds, BuildRuns, discovery.

Raises the error tree (`kube.translated` maps every API answer), never `ApiException`.

Whose a Build or BuildRun is (`Ownership`): in the order's own cluster an owner reference to the
WorkOrder, so garbage collection deletes it with the order. In a spoke cluster (the order lives
in the hub) an owner reference cannot work: garbage collection is per cluster, and the spoke's
would delete an object whose owner it cannot find. There the order's uid label and the hub's name
in an annotation say whose it is, and the agent deletes what belongs to orders the hub no longer
has (`marked`, `delete`; the build agent's sweep)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kubernetes import client, watch

from workorder_operator.build import label_value
from workorder_operator.errors import Conflict, NotFound, Refused, Transient, WorkOrderError
from workorder_operator.kube import list_pages, timeout, translated, watch_timeout
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


class NotOurs(Refused):
    """An object we need by name exists and belongs to someone else (another order, another
    attempt, a person): it is never taken over, changed or reported as ours."""


# In a spoke: the hub the order lives in, and the order's whole name (the label is cut to fit).
HUB_ANNOTATION = "workorder.dev/hub"
ORDER_NAME_ANNOTATION = "workorder.dev/order-name"


def owner_reference(order: WorkOrder) -> dict[str, Any]:
    """Owned by the WorkOrder, so deleting it garbage-collects Builds and BuildRuns. Not a
    controller reference: Shipwright sets its own controller reference on BuildRuns."""
    return {"apiVersion": API_VERSION, "kind": KIND, "name": order.name, "uid": order.uid}


@dataclass(frozen=True)
class Ownership:
    """How a Build or BuildRun says which order it belongs to (module docstring).

    `hub` None: the order is in this cluster (an owner reference). Otherwise the name of the hub
    the order lives in: the `workorder.dev/order-uid` label and the `workorder.dev/hub`
    annotation, both required to match, so an agent never takes an object of another hub's
    order (or a person's) for its own."""

    hub: str | None = None

    def mark(self, metadata: dict[str, Any], order: WorkOrder) -> dict[str, Any]:
        """`metadata` with this order's mark added (the caller's labels and annotations kept)."""
        if self.hub is None:
            return {**metadata, "ownerReferences": [owner_reference(order)]}
        return {
            **metadata,
            "labels": {**(metadata.get("labels") or {}), ORDER_UID_LABEL: order.uid},
            "annotations": {
                **(metadata.get("annotations") or {}), HUB_ANNOTATION: self.hub, ORDER_NAME_ANNOTATION: order.name,
            },
        }  # fmt: skip

    def owns(self, obj: dict[str, Any], order: WorkOrder) -> bool:
        meta = obj.get("metadata", {})
        if self.hub is None:
            return any(ref.get("uid") == order.uid for ref in meta.get("ownerReferences") or [])
        return self.ours(obj) and (meta.get("labels") or {}).get(ORDER_UID_LABEL) == order.uid

    def ours(self, obj: dict[str, Any]) -> bool:
        """Marked by an agent of this hub (spoke only), for whichever order."""
        annotations = obj.get("metadata", {}).get("annotations") or {}
        return self.hub is not None and annotations.get(HUB_ANNOTATION) == self.hub

    def describe(self, obj: dict[str, Any]) -> str:
        """Whose the object says it is, for messages."""
        meta = obj.get("metadata", {})
        refs = meta.get("ownerReferences") or []
        owners = [f"{r.get('kind')} {r.get('name')} (uid {r.get('uid')})" for r in refs]
        uid = (meta.get("labels") or {}).get(ORDER_UID_LABEL)
        if self.hub is not None and uid:
            hub = (meta.get("annotations") or {}).get(HUB_ANNOTATION) or "no hub"
            owners.append(f"order uid {uid} of hub {hub}")
        return ", ".join(owners) or "no owner"


class Shipwright:
    def __init__(self, api: client.ApiClient, field_manager: str, ownership: Ownership | None = None) -> None:
        self.api = api
        self.objects = client.CustomObjectsApi(api)
        self.field_manager = field_manager
        self.ownership = ownership or Ownership()

    def installed(self) -> bool:
        """Whether the cluster serves shipwright.io/v1beta1 (discovery, not a guess from errors)."""
        try:
            with translated():
                groups = client.ApisApi(self.api).get_api_versions(_request_timeout=timeout()).groups or []
        except WorkOrderError as exc:
            log.warning("API discovery failed: %s", exc.reason or exc)
            return False
        return any(g.name == GROUP and any(v.version == VERSION for v in g.versions) for g in groups)

    def apply_build(self, order: WorkOrder, build: dict[str, Any]) -> dict[str, Any]:
        """One Build of the order in its namespace, owned by the order: created if absent, brought
        back to the order's content if it is the order's own (a retry, a restarted operator).
        A Build of that name that the order did not create raises NotOurs and is left untouched:
        an order can never take over (or, through garbage collection, delete) someone's Build."""
        name = build["metadata"]["name"]
        body = {**build, "metadata": self.ownership.mark({**build["metadata"], "namespace": order.namespace}, order)}
        existing = self.get(BUILDS, order.namespace, name)
        if existing is None:
            created = self._create(BUILDS, order.namespace, body)
            if created is not None:
                return created
            existing = self.get(BUILDS, order.namespace, name)  # created by someone else meanwhile
            if existing is None:
                raise NotOurs(f"Build {name!r} was created and deleted by someone else while we created it")
        if not self.ownership.owns(existing, order):
            raise NotOurs(
                f"Build {name!r} already exists in namespace {order.namespace!r} and is not this order's "
                f"(owned by {self.ownership.describe(existing)}); rename the Build in yamlContent"
            )
        try:
            # No force: if someone else has since changed a field we set, refuse rather than overwrite.
            with translated():
                applied: dict[str, Any] = self.objects.patch_namespaced_custom_object(
                    GROUP, VERSION, order.namespace, BUILDS, name, body,
                    field_manager=self.field_manager, _content_type="application/apply-patch+yaml",
                    _request_timeout=timeout(),
                )  # fmt: skip
        except Conflict:
            raise NotOurs(f"Build {name!r} was changed by someone else since this order created it") from None
        return applied

    def _create(self, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Create the object; None if one of that name exists already (whose it is, the caller finds out)."""
        try:
            with translated():
                created: dict[str, Any] = self.objects.create_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    namespace,
                    plural,
                    body,
                    field_manager=self.field_manager,
                    _request_timeout=timeout(),
                )
        except Conflict:
            return None
        return created

    def namespace_labels(self, namespace: str) -> dict[str, str] | None:
        """The labels of a namespace of the builds' cluster; None when it does not exist."""
        try:
            with translated():
                ns = client.CoreV1Api(self.api).read_namespace(namespace, _request_timeout=timeout())
        except NotFound:
            return None
        return dict(ns.metadata.labels or {})

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            with translated():
                obj: dict[str, Any] = self.objects.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, plural, name, _request_timeout=timeout()
                )
        except NotFound:
            return None
        return obj

    def ensure_buildrun(self, order: WorkOrder, attempt: int, name: str, build_name: str) -> dict[str, Any]:
        """The attempt's BuildRun: created once, found again after a restart. An existing BuildRun
        of that name is adopted only if it is this order's (owner uid) and this attempt's (label):
        a leftover of a deleted order of the same name, or one planted by someone, raises NotOurs
        and never lends its outcome."""
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "BuildRun",
            "metadata": self.ownership.mark({
                "name": name,
                "namespace": order.namespace,
                "labels": {
                    ORDER_LABEL: label_value(order.name), ORDER_UID_LABEL: order.uid, ATTEMPT_LABEL: str(attempt),
                },
            }, order),
            "spec": {"build": {"name": build_name}},
        }  # fmt: skip
        created = self._create(BUILDRUNS, order.namespace, body)
        if created is not None:
            return created
        existing = self.get(BUILDRUNS, order.namespace, name)
        if existing is None:  # deleted between our create and get: try once more
            return self.ensure_buildrun(order, attempt, name, build_name)
        labels = existing["metadata"].get("labels") or {}
        if not self.ownership.owns(existing, order) or labels.get(ATTEMPT_LABEL) != str(attempt):
            raise NotOurs(
                f"BuildRun {name!r} already exists and is not attempt {attempt} of this order "
                f"(owned by {self.ownership.describe(existing)}, attempt label {labels.get(ATTEMPT_LABEL)!r})"
            )
        return existing

    def cancel_buildrun(self, order: WorkOrder, attempt: int, name: str) -> bool:
        """Cancel the attempt's BuildRun if it is ours (never someone else's of the same name);
        whether a cancel was written. Guarded by resourceVersion, re-read on a conflict."""
        for _ in range(3):
            run = self.get(BUILDRUNS, order.namespace, name)
            labels = (run or {}).get("metadata", {}).get("labels") or {}
            if run is None or not self.ownership.owns(run, order) or labels.get(ATTEMPT_LABEL) != str(attempt):
                return False  # gone already (garbage-collected with its order), or not ours
            patch = {"metadata": {"resourceVersion": run["metadata"]["resourceVersion"]},
                     "spec": {"state": "BuildRunCanceled"}}  # fmt: skip
            try:
                with translated():
                    self.objects.patch_namespaced_custom_object(
                        GROUP, VERSION, order.namespace, BUILDRUNS, name, patch,
                        field_manager=self.field_manager, _content_type="application/merge-patch+json",
                        _request_timeout=timeout(),
                    )  # fmt: skip
                return True
            except NotFound:
                return False
            except Conflict:
                continue
        return False

    def marked(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Every Build or BuildRun an agent of this hub made (spoke only), in `namespace` or all."""
        if self.ownership.hub is None:
            return []
        pages = list_pages(self.objects, (GROUP, VERSION, plural), namespace, 500, label_selector=ORDER_UID_LABEL)
        return [obj for page in pages for obj in page if self.ownership.ours(obj)]

    def delete(self, plural: str, obj: dict[str, Any]) -> bool:
        """Delete exactly this object (preconditions: its uid and resourceVersion), so one that was
        replaced or changed since it was read is left alone; whether it was deleted."""
        meta = obj["metadata"]
        options = {"preconditions": {"uid": meta["uid"], "resourceVersion": meta["resourceVersion"]},
                   "propagationPolicy": "Background"}  # fmt: skip
        try:
            with translated():
                self.objects.delete_namespaced_custom_object(
                    GROUP, VERSION, meta["namespace"], plural, meta["name"], body=options, _request_timeout=timeout()
                )
        except (NotFound, Conflict):
            return False
        return True

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
                for event in self._watch_slice(plural, namespace, name, version):
                    obj = dict(event["object"])
                    if event["type"] == "ERROR":
                        version = None
                        break
                    if event["type"] == "DELETED":
                        return None
                    version = obj["metadata"]["resourceVersion"]
                    if done(obj):
                        return obj
            except Transient as exc:
                if exc.status == 410:
                    version = None
                elif exc.status is None:  # API server restarting: keep watching
                    log.warning("watch of %s %s/%s interrupted (%s); retrying", plural, namespace, name, exc)
                    time.sleep(1)
                else:
                    raise
        return None

    def _watch_slice(self, plural: str, namespace: str, name: str, version: str) -> Iterator[dict[str, Any]]:
        with translated():
            yield from watch.Watch().stream(
                self.objects.list_namespaced_custom_object, GROUP, VERSION, namespace, plural,
                field_selector=f"metadata.name={name}", resource_version=version,
                timeout_seconds=WATCH_SLICE_SECONDS, _request_timeout=watch_timeout(WATCH_SLICE_SECONDS),
            )  # fmt: skip
