"""Unit-test helpers: WorkOrders built from API-shaped bodies, and a tiny stand-in for the API
server's JSON Patch handling (`test` ops, then `add /status`), so tests can run transitions end
to end and see which writes the server would refuse."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

from workorder_operator.kube import json_patch
from workorder_operator.lifecycle import StatusWrite
from workorder_operator.model import WorkOrder

CREATED = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.UTC)
# Sub-second on purpose: timestamps keep microseconds.
NOW = dt.datetime(2024, 5, 1, 12, 30, 0, 250000, tzinfo=dt.UTC)

ORDER_UID = "3f0d6a4e-8a43-4a35-9a55-0d5f2f8e7b11"
AGENT_A = "5b8e0c0e-1d2f-4c3b-8a9e-7f6d5c4b3a21"
AGENT_B = "9c1f2e3d-4b5a-4697-8877-665544332211"

YAML = "apiVersion: shipwright.io/v1beta1\nkind: Build\nmetadata:\n  name: app\n"

# What the API server stores for a new order before anyone writes its status (CRD defaults).
CRD_DEFAULT_STATUS: dict[str, Any] = {
    "phase": "Pending",
    "reason": "Pending",
    "attempt": 0,
    "retryCount": 0,
    "observedGeneration": 0,
}


def order_body(
    spec: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
    *,
    name: str = "wo-1",
    namespace: str = "team-a",
    uid: str = ORDER_UID,
    resource_version: str = "100",
    created: dt.datetime = CREATED,
    managed_fields: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A WorkOrder as the API returns it: spec defaults applied, status as given (CRD defaults
    when None)."""
    full_spec: dict[str, Any] = {
        "workType": "build",
        "yamlContent": YAML,
        "maxRetries": 3,
        "backoffSeconds": 60,
        "claimTimeoutSeconds": 3600,
        "priority": 0,
    }
    full_spec.update(spec or {})
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": uid,
        "resourceVersion": resource_version,
        "generation": 1,
        "creationTimestamp": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if managed_fields is not None:
        metadata["managedFields"] = managed_fields
    return {
        "apiVersion": "workorder.dev/v1alpha1",
        "kind": "WorkOrder",
        "metadata": metadata,
        "spec": full_spec,
        "status": copy.deepcopy(CRD_DEFAULT_STATUS if status is None else status),
    }


def make_order(spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None, **kw: Any) -> WorkOrder:
    return WorkOrder.from_body(order_body(spec, status, **kw))


class GuardFailed(Exception):
    """The server refused the patch: a `test` op did not hold (HTTP 422)."""


def _resolve(doc: Any, pointer: str) -> Any:
    for token in pointer.lstrip("/").split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(doc, list):
            doc = doc[int(token)]
        elif isinstance(doc, dict) and token in doc:
            doc = doc[token]
        else:
            raise GuardFailed(f"{pointer}: no such path")
    return doc


def store(body: dict[str, Any], write: StatusWrite) -> dict[str, Any]:
    """Apply a status write to a stored body as the API server would: every `test` must hold,
    then the status is replaced and the resource version moves on."""
    stored = copy.deepcopy(body)
    for op in json_patch(write):
        if op["op"] == "test":
            if _resolve(stored, op["path"]) != op["value"]:
                raise GuardFailed(f"test {op['path']} == {op['value']!r} failed")
        elif op["op"] == "add" and op["path"] == "/status":
            stored["status"] = copy.deepcopy(op["value"])
        else:
            raise AssertionError(f"unexpected patch op {op}")
    stored["metadata"]["resourceVersion"] = str(int(stored["metadata"]["resourceVersion"]) + 1)
    return stored


def read(body: dict[str, Any]) -> WorkOrder:
    return WorkOrder.from_body(body)


class MemoryOrders:
    """The WorkOrder adapter (`kube.WorkOrders`) over an in-memory store with the API server's
    compare-and-swap rules, for engine tests. Every change is queued as a watch event the test
    delivers when it chooses (a watch is always a little late). `hold_replies()` makes writes
    happen at once but their replies wait until `answer()`: the lost or late reply."""

    def __init__(self, bodies: list[dict[str, Any]] = ()) -> None:  # type: ignore[assignment]
        import threading

        self.bodies = {(b["metadata"]["namespace"], b["metadata"]["name"]): copy.deepcopy(b) for b in bodies}
        self.events: list[tuple[str, dict[str, Any]]] = []
        # (transition, uid) of every write that took effect, in order; "delete" for deletions.
        self.done: list[tuple[str, str]] = []
        self.budgets: list[float | None] = []
        self._lock = threading.Lock()
        self._replies = threading.Event()
        self._replies.set()
        self.waiting = 0

    def _key(self, order: WorkOrder) -> tuple[str, str]:
        return (order.namespace, order.name)

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        from workorder_operator.kube import NotFound

        with self._lock:
            body = self.bodies.get((namespace, name))
            if body is None:
                raise NotFound(f"{namespace}/{name}")
            return copy.deepcopy(body)

    def write_status(self, order: WorkOrder, write: StatusWrite, budget: float | None = None) -> dict[str, Any]:
        from workorder_operator.kube import Conflict, NotFound

        with self._lock:
            self.budgets.append(budget)
            body = self.bodies.get(self._key(order))
            if body is None:
                raise NotFound(order.key)
            try:
                stored = store(body, write)
            except GuardFailed as exc:
                raise Conflict(str(exc)) from exc
            self.bodies[self._key(order)] = stored
            self.done.append((write.transition, order.uid))
            self.events.append(("MODIFIED", copy.deepcopy(stored)))
        self._reply()
        return copy.deepcopy(stored)

    def delete(self, order: WorkOrder, budget: float | None = None) -> None:
        from workorder_operator.kube import Conflict, NotFound

        with self._lock:
            body = self.bodies.get(self._key(order))
            if body is None:
                raise NotFound(order.key)
            meta = body["metadata"]
            if meta["uid"] != order.uid or meta["resourceVersion"] != order.resource_version:
                raise Conflict(f"delete of {order.key}: precondition failed")
            del self.bodies[self._key(order)]
            self.done.append(("delete", order.uid))
            self.events.append(("DELETED", copy.deepcopy(body)))
        self._reply()

    def list_versions(self, namespace: str | None = None) -> tuple[dict[str, str], str]:
        with self._lock:
            found = {b["metadata"]["uid"]: ns for (ns, _), b in self.bodies.items() if namespace in (None, ns)}
            latest = max((int(b["metadata"]["resourceVersion"]) for b in self.bodies.values()), default=0)
            return found, str(latest)

    def change(self, body: dict[str, Any]) -> dict[str, Any]:
        """Someone else (an agent, an admin) writes this body now; its event is queued."""
        with self._lock:
            key = (body["metadata"]["namespace"], body["metadata"]["name"])
            stored = copy.deepcopy(body)
            previous = self.bodies.get(key)
            rv = int(previous["metadata"]["resourceVersion"]) + 1 if previous else 1
            stored["metadata"]["resourceVersion"] = str(rv)
            self.bodies[key] = stored
            self.events.append(("MODIFIED", copy.deepcopy(stored)))
            return copy.deepcopy(stored)

    def take_events(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            events, self.events = self.events, []
            return events

    def hold_replies(self) -> None:
        self._replies.clear()

    def answer(self) -> None:
        self._replies.set()

    def _reply(self) -> None:
        with self._lock:
            self.waiting += 1
        self._replies.wait()
        with self._lock:
            self.waiting -= 1
