"""Adapter for the Kubernetes API: WorkOrder reads and compare-and-swap status writes.

Uses the official `kubernetes` client (synchronous; async callers run it in threads).
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from workorder_operator.lifecycle import StatusWrite
from workorder_operator.model import GROUP, PLURAL, VERSION, WorkOrder, format_time, utcnow

log = logging.getLogger(__name__)

OPERATOR_MANAGER = "workorder-operator"


class Conflict(Exception):
    """A compare-and-swap lost: the stored object no longer matches what the write was based on."""


class NotFound(Exception):
    """The order does not exist (any more)."""


def api_client(kubeconfig: str | None = None, context: str | None = None, pool: int = 32) -> client.ApiClient:
    """A client for the kubeconfig (or in-cluster config), with a connection pool for `pool` threads."""
    configuration = client.Configuration()
    if kubeconfig is None and context is None:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
    else:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    configuration.connection_pool_maxsize = pool
    return client.ApiClient(configuration)


def json_patch(write: StatusWrite) -> list[dict[str, Any]]:
    """The wire form of a status write: `test` every guard, then set the whole status.

    The API server applies the patch to the latest stored object inside its own optimistic
    update loop, so tests and write are one atomic step."""
    ops: list[dict[str, Any]] = [{"op": "test", "path": p, "value": v} for p, v in write.guards.items()]
    ops.append({"op": "add", "path": "/status", "value": write.status})
    return ops


def _is_lost_race(exc: ApiException) -> bool:
    if exc.status == 409:
        return True
    # A failed JSON Patch `test` is answered 422 "the server rejected our request" with no
    # causes; a real validation error always lists its causes (the fields at fault).
    if exc.status != 422:
        return False
    try:
        details = json.loads(exc.body or "{}").get("details") or {}
    except ValueError:
        return False
    return not details.get("causes")


def explain(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except ValueError:
        return str(exc.reason)


class WorkOrders:
    """WorkOrder reads and writes in any namespace."""

    def __init__(self, api: client.ApiClient, field_manager: str) -> None:
        self.api = api
        self.objects = client.CustomObjectsApi(api)
        self.field_manager = field_manager

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        try:
            body: dict[str, Any] = self.objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                raise NotFound(f"workorder {namespace}/{name} not found") from exc
            raise
        return body

    def list(
        self, namespace: str | None = None, field_selector: str = "", label_selector: str = ""
    ) -> tuple[list[dict[str, Any]], str]:
        """All matching orders and the list's resourceVersion (to start a watch from)."""
        kwargs = {"field_selector": field_selector, "label_selector": label_selector}
        if namespace:
            result = self.objects.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, **kwargs)
        else:
            result = self.objects.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kwargs)
        return list(result["items"]), str(result["metadata"]["resourceVersion"])

    def write_status(self, order: WorkOrder, write: StatusWrite) -> dict[str, Any]:
        """Perform a status compare-and-swap; raise Conflict when a guard no longer holds."""
        try:
            body: dict[str, Any] = self.objects.patch_namespaced_custom_object_status(
                GROUP, VERSION, order.namespace, PLURAL, order.name, json_patch(write),
                field_manager=self.field_manager, _content_type="application/json-patch+json",
            )  # fmt: skip
        except ApiException as exc:
            if exc.status == 404:
                raise NotFound(f"workorder {order.key} not found") from exc
            if _is_lost_race(exc):
                raise Conflict(f"{write.transition} of {order.key} lost a race: {explain(exc)}") from exc
            raise
        return body

    def delete(self, order: WorkOrder) -> None:
        """Delete exactly this order (uid precondition: never a newer one of the same name)."""
        try:
            self.objects.delete_namespaced_custom_object(
                GROUP, VERSION, order.namespace, PLURAL, order.name,
                body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=order.uid)),
            )  # fmt: skip
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise


def post_event(api: client.ApiClient, order: WorkOrder, kind: str, reason: str, message: str) -> None:
    """A core/v1 Event on the order (what `kubectl describe` and `kubectl events` show).
    Best effort: an event that cannot be posted is logged, never fatal."""
    now = format_time(utcnow())
    body = {
        "metadata": {"name": f"{order.name}.{uuid.uuid4().hex[:12]}", "namespace": order.namespace},
        "involvedObject": {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "WorkOrder", "name": order.name,
            "namespace": order.namespace, "uid": order.uid, "resourceVersion": order.resource_version,
        },
        "type": kind, "reason": reason, "message": message[:1024],
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        "source": {"component": OPERATOR_MANAGER}, "reportingComponent": OPERATOR_MANAGER,
        "reportingInstance": OPERATOR_MANAGER,
    }  # fmt: skip
    try:
        client.CoreV1Api(api).create_namespaced_event(order.namespace, body)
    except ApiException as exc:
        log.warning("%s: cannot post event %s: %s", order.key, reason, explain(exc))
