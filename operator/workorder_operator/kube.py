"""The adapter for the WorkOrder API: every WorkOrder call (create, get, list, watch, status
write, delete) and the one mapping of API answers to the error tree (`api_error`).

Uses the official `kubernetes` client (synchronous; async callers run it in threads). Nothing
above this module sees an `ApiException`: `WorkOrders` raises `errors.WorkOrderError` kinds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from workorder_operator.errors import Conflict, NotFound, Refused, Transient, WorkOrderError
from workorder_operator.lifecycle import StatusWrite
from workorder_operator.model import GROUP, PLURAL, VERSION, WorkOrder, format_time, utcnow

log = logging.getLogger(__name__)

OPERATOR_MANAGER = "workorder-operator"

# Every API call is bounded in time: one stuck connection must never block a worker (or a leader
# that then keeps acting after its standby took over). Connect covers TCP and TLS; read is the
# longest silence accepted from the server. A watch asks the server to end it after
# `timeoutSeconds` and gives up on it WATCH_GRACE later.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
WATCH_GRACE = 30.0
# A watch whose caller names no server-side timeout: the server's own limit is under 30 minutes.
WATCH_READ_TIMEOUT = 1800.0 + WATCH_GRACE

Timeout = tuple[float, float]
# The client type callers hand in (they need not import `kubernetes` for it).
ApiClient: TypeAlias = client.ApiClient
# Ask for a list of metadata only (no spec, no status).
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"


class Page(list[dict[str, Any]]):
    """One answer of a paged list: its objects, and the list's resourceVersion (every page of
    one listing is a consistent snapshot at the first page's version: a watch from the last
    page's version misses nothing)."""

    def __init__(self, items: list[dict[str, Any]], resource_version: str) -> None:
        super().__init__(items)
        self.resource_version = resource_version


def timeout(total: float | None = None) -> Timeout:
    """(connect, read) for one request; with `total`, both together stay within it."""
    if total is None:
        return (CONNECT_TIMEOUT, READ_TIMEOUT)
    return (min(CONNECT_TIMEOUT, total / 2), total / 2)


def watch_timeout(server_seconds: float) -> Timeout:
    """For a watch the server ends after `server_seconds`."""
    return (CONNECT_TIMEOUT, server_seconds + WATCH_GRACE)


_WATCH = re.compile(r"[?&]watch=(true|1)\b", re.IGNORECASE)
_SERVER_TIMEOUT = re.compile(r"[?&]timeoutSeconds=(\d+)")


class TimedApiClient(client.ApiClient):  # type: ignore[misc]
    """An ApiClient that gives every request connect and read timeouts when its caller set none,
    so no code path, ours or the client library's, can wait forever."""

    def call_api(  # type: ignore[no-untyped-def]
        self, method, url, header_params=None, body=None, post_params=None, _request_timeout=None
    ):
        if _request_timeout is None:
            if _WATCH.search(url):
                server = _SERVER_TIMEOUT.search(url)
                _request_timeout = (
                    watch_timeout(float(server.group(1))) if server else (CONNECT_TIMEOUT, WATCH_READ_TIMEOUT)
                )
            else:
                _request_timeout = timeout()
        return super().call_api(method, url, header_params, body, post_params, _request_timeout)


__all__ = ["Conflict", "NotFound", "Refused", "Transient", "WorkOrderError"]  # re-exported: one tree

# Statuses that say "later, maybe": throttled, or the server (or what is behind it) is not well.
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})


def _body(exc: ApiException) -> dict[str, Any]:
    try:
        body = json.loads(exc.body or "{}")
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def api_error(exc: BaseException, *, json_patch_test: bool = False) -> WorkOrderError | None:
    """THE mapping of an API answer to the error tree; None for anything that is not one (a bug).

    404 NotFound; 409 Conflict, and for a JSON Patch with `test`s (`json_patch_test`) a 422
    without causes too (a failed `test`: a real validation error always lists the fields at
    fault); no answer at all, 410 Gone, 429 and 5xx Transient (except a 500 that is a schema
    error, "failed to create typed patch object", which repeats forever); every other answer
    Refused."""
    if isinstance(exc, WorkOrderError):
        return exc
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        return Transient(f"{type(exc).__name__}: {exc}")
    if not isinstance(exc, ApiException):
        return None
    body = _body(exc)
    details = body.get("details") or {}
    status = exc.status or None
    text = explain(exc)
    kw: dict[str, Any] = {
        "status": status, "reason": str(body.get("reason") or exc.reason or ""), "details": details,
        "body": str(exc.body or ""),
    }  # fmt: skip
    if status is None or status == 410:
        return Transient(text, **kw)
    if status == 404:
        return NotFound(text, **kw)
    if status == 409 or (json_patch_test and status == 422 and not details.get("causes")):
        return Conflict(text, **kw)
    if status in TRANSIENT_STATUSES and "typed" not in (exc.body or ""):
        return Transient(text, **kw)
    return Refused(text, **kw)


@contextlib.contextmanager
def translated(*, json_patch_test: bool = False, **messages: str) -> Iterator[None]:
    """Raise API errors as the error tree (`api_error`). `messages`: the text to use per kind, by
    class name (`NotFound="workorder a/b not found"`)."""
    try:
        yield
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
        mapped = api_error(exc, json_patch_test=json_patch_test)
        assert mapped is not None
        text = messages.get(type(mapped).__name__)
        if text is not None:
            mapped = type(mapped)(
                text, status=mapped.status, reason=mapped.reason, details=mapped.details, body=mapped.body
            )
        raise mapped from exc


def api_client(
    kubeconfig: str | None = None,
    context: str | None = None,
    pool: int = 32,
    *,
    retries: bool = True,
    user_agent: str | None = None,
) -> client.ApiClient:
    """A client for the kubeconfig (or in-cluster config), with a connection pool for `pool`
    threads and timeouts on every request. `retries=False`: no silent urllib3 retries, for
    callers whose writes must not be sent later than they decided (the leader's)."""
    configuration = client.Configuration()
    if kubeconfig is None and context is None:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
    else:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    configuration.connection_pool_maxsize = pool
    if not retries:
        configuration.retries = False
    api = TimedApiClient(configuration)
    if user_agent:
        api.user_agent = user_agent
    return api


# A kubeconfig that cannot be used (missing, malformed, no such context).
KubeconfigError = config.ConfigException


def kubeconfig_namespace(kubeconfig: str | None = None, context: str | None = None) -> str:
    """The namespace of the kubeconfig's current (or named) context; "default" when it names none."""
    try:
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
        if context:
            active = next(c for c in contexts if c["name"] == context)
        return str(active["context"].get("namespace") or "default")
    except (config.ConfigException, OSError, StopIteration, TypeError, KeyError):
        return "default"


def json_patch(write: StatusWrite) -> list[dict[str, Any]]:
    """The wire form of a status write: `test` every guard, then set the whole status.

    The API server applies the patch to the latest stored object inside its own optimistic
    update loop, so tests and write are one atomic step."""
    ops: list[dict[str, Any]] = [{"op": "test", "path": p, "value": v} for p, v in write.guards.items()]
    ops.append({"op": "add", "path": "/status", "value": write.status})
    return ops


def explain(exc: ApiException) -> str:
    """The API server's own message for a refusal."""
    return str(_body(exc).get("message") or exc.reason)


class WorkOrders:
    """WorkOrder reads and writes in any namespace."""

    def __init__(self, api: client.ApiClient, field_manager: str) -> None:
        self.api = api
        self.objects = client.CustomObjectsApi(api)
        self.field_manager = field_manager

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        with translated(NotFound=f"workorder {namespace}/{name} not found"):
            body: dict[str, Any] = self.objects.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=timeout()
            )
        return body

    def list(
        self, namespace: str | None = None, field_selector: str = "", label_selector: str = ""
    ) -> tuple[list[dict[str, Any]], str]:
        """All matching orders and the list's resourceVersion (to start a watch from)."""
        return list_objects(
            self.objects, (GROUP, VERSION, PLURAL), namespace, field_selector=field_selector,
            label_selector=label_selector,
        )  # fmt: skip

    def pages(self, namespace: str | None = None, field_selector: str = "", limit: int = 500) -> Iterator[Page]:
        """The matching orders, `limit` at a time (limit and continue: the first page comes at
        once however many orders there are; 0: all in one answer). In the API's order: by
        namespace, then name."""
        return list_pages(self.objects, (GROUP, VERSION, PLURAL), namespace, limit, field_selector=field_selector)

    def list_versions(self, namespace: str | None = None) -> tuple[dict[str, str], str]:
        """uid -> namespace of every order (metadata only: no content), and the list's
        resourceVersion: what exists, cheaply, for forgetting what does not."""
        path = f"/apis/{GROUP}/{VERSION}" + (f"/namespaces/{namespace}" if namespace else "") + f"/{PLURAL}"
        found: dict[str, str] = {}
        token = ""
        while True:
            query: list[tuple[str, Any]] = [("limit", 500)] + ([("continue", token)] if token else [])
            request = self.api.param_serialize(
                "GET", path, query_params=query, auth_settings=["BearerToken"], header_params={"Accept": METADATA_LIST}
            )
            with translated():
                page: Any = self.api.call_api(*request, _request_timeout=timeout())
                page.read()
            body = json.loads(page.data or b"{}")
            for item in body.get("items") or []:
                meta = item.get("metadata") or {}
                if meta.get("uid"):
                    found[meta["uid"]] = meta.get("namespace", "")
            token = (body.get("metadata") or {}).get("continue") or ""
            if not token:
                return found, str((body.get("metadata") or {}).get("resourceVersion", ""))

    def watch(
        self, namespace: str | None, field_selector: str = "", resource_version: str = "", timeout_seconds: int = 300
    ) -> OrderWatch:
        """One watch request from `resource_version` (from `list`): iterate it for events."""
        return watch_objects(
            self.objects, (GROUP, VERSION, PLURAL), namespace, resource_version, timeout_seconds,
            field_selector=field_selector,
        )  # fmt: skip

    def create(self, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        """Create an order (`order_body` builds one) in `namespace` or its own metadata.namespace."""
        ns = namespace or body.get("metadata", {}).get("namespace") or "default"
        with translated():
            created: dict[str, Any] = self.objects.create_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, body, field_manager=self.field_manager, _request_timeout=timeout()
            )
        return created

    def write_status(self, order: WorkOrder, write: StatusWrite, budget: float | None = None) -> dict[str, Any]:
        """Perform a status compare-and-swap; raise Conflict when a guard no longer holds.
        `budget`: seconds within which the request must be over, sent or not."""
        try:
            with translated(json_patch_test=True, NotFound=f"workorder {order.key} not found"):
                body: dict[str, Any] = self.objects.patch_namespaced_custom_object_status(
                    GROUP, VERSION, order.namespace, PLURAL, order.name, json_patch(write),
                    field_manager=self.field_manager, _content_type="application/json-patch+json",
                    _request_timeout=timeout(budget),
                )  # fmt: skip
        except Conflict as exc:
            raise Conflict(
                f"{write.transition} of {order.key} lost a race: {exc}", status=exc.status, body=exc.body
            ) from exc
        return body

    def delete(self, order: WorkOrder, budget: float | None = None) -> None:
        """Delete exactly this version of this order: a compare-and-swap on uid and
        resourceVersion, so neither a newer order of the same name nor a changed one (requeued
        just now) is deleted. Raises Conflict or NotFound when there is nothing to delete."""
        preconditions = client.V1Preconditions(uid=order.uid, resource_version=order.resource_version)
        try:
            with translated(NotFound=f"workorder {order.key} not found"):
                self.objects.delete_namespaced_custom_object(
                    GROUP, VERSION, order.namespace, PLURAL, order.name,
                    body=client.V1DeleteOptions(preconditions=preconditions), _request_timeout=timeout(budget),
                )  # fmt: skip
        except Conflict as exc:
            raise Conflict(f"delete of {order.key} lost a race: {exc}", status=exc.status, body=exc.body) from exc


def list_objects(
    objects: client.CustomObjectsApi, kind: tuple[str, str, str], namespace: str | None, **selectors: str
) -> tuple[list[dict[str, Any]], str]:
    """Every object of `kind` (group, version, plural) matching the selectors, in `namespace` or
    all, and the list's resourceVersion (to start a watch from)."""
    group, version, plural = kind
    with translated():
        if namespace:
            result = objects.list_namespaced_custom_object(
                group, version, namespace, plural, **selectors, _request_timeout=timeout()
            )
        else:
            result = objects.list_cluster_custom_object(group, version, plural, **selectors, _request_timeout=timeout())
    return list(result["items"]), str(result["metadata"]["resourceVersion"])


def list_pages(
    objects: client.CustomObjectsApi, kind: tuple[str, str, str], namespace: str | None, limit: int, **selectors: str
) -> Iterator[Page]:
    """The objects of `kind` matching the selectors, `limit` at a time (limit and continue: the
    first page comes at once however many there are; 0: all in one answer)."""
    group, version, plural = kind
    token = ""
    while True:
        kwargs: dict[str, Any] = {**selectors, "_request_timeout": timeout()}
        if limit:
            kwargs["limit"] = limit
        if token:
            kwargs["_continue"] = token
        with translated():
            if namespace:
                page = objects.list_namespaced_custom_object(group, version, namespace, plural, **kwargs)
            else:
                page = objects.list_cluster_custom_object(group, version, plural, **kwargs)
        meta = page.get("metadata") or {}
        yield Page(list(page.get("items") or []), str(meta.get("resourceVersion", "")))
        token = meta.get("continue") or ""
        if not token:
            return


def watch_objects(
    objects: client.CustomObjectsApi,
    kind: tuple[str, str, str],
    namespace: str | None,
    resource_version: str,
    timeout_seconds: int,
    **selectors: str,
) -> OrderWatch:
    """One watch request over objects of `kind` from `resource_version` (from `list_objects`)."""
    group, version, plural = kind
    kwargs: dict[str, Any] = {
        **selectors, "resource_version": resource_version, "timeout_seconds": timeout_seconds,
        "allow_watch_bookmarks": True,
    }  # fmt: skip
    if namespace:
        return OrderWatch(objects.list_namespaced_custom_object, (group, version, namespace, plural), kwargs)
    return OrderWatch(objects.list_cluster_custom_object, (group, version, plural), kwargs)


def keep_watching(stop: threading.Event, what: str, list_and_watch: Callable[[], None]) -> None:
    """Run `list_and_watch` (a list, then watches from it until it is too old) again and again
    until `stop`; after an error (an API server restart, a dropped connection) again after a
    backoff from 0.2 s, doubling to 5 s while the errors go on."""
    backoff = 0.2
    while not stop.is_set():
        try:
            list_and_watch()
            backoff = 0.2
        except Exception as exc:
            if stop.is_set():
                return
            log.warning("watch of %s interrupted (%s); reconnecting in %.1fs", what, exc, backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)


class OrderWatch:
    """One watch over WorkOrders (or, for `presence`, presence leases): iterate for (event type,
    object); `stop()` from any thread.
    Ends when the server ends the request, or at 410 Gone (`gone` is then True: the
    resourceVersion is too old, list again). Other errors are raised as the error tree."""

    def __init__(self, lister: Any, args: tuple[str, ...], kwargs: dict[str, Any]) -> None:
        self._watch = watch.Watch()
        self._call = (lister, args, kwargs)
        self.gone = False

    def stop(self) -> None:
        self._watch.stop()

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        lister, args, kwargs = self._call
        with translated():
            try:
                for event in self._watch.stream(lister, *args, **kwargs):
                    body: dict[str, Any] = event["object"]
                    if event["type"] == "ERROR":
                        raise ApiException(status=body.get("code"), reason=body.get("message"))
                    yield str(event["type"]), body
            except ApiException as exc:
                if exc.status != 410:
                    raise
                self.gone = True


def whoami(api: client.ApiClient) -> str:
    """This client's Kubernetes username (a SelfSubjectReview); "" when the answer has none."""
    with translated():
        review = client.AuthenticationV1Api(api).create_self_subject_review({}, _request_timeout=timeout())
    try:
        return str(review.status.user_info.username)
    except AttributeError:
        return ""


@dataclass(frozen=True)
class Access:
    """What the API server said of a bearer token and one request: whether the token is valid
    (`authenticated`), whose it is (`user`), and whether they may make the request."""

    authenticated: bool
    allowed: bool = False
    user: str = ""
    reason: str = ""


class AccessReviews:
    """Authentication and authorization of a request to the operator's own endpoints by the API
    server, as every Kubernetes component delegates it: a TokenReview (authentication.k8s.io/v1)
    says who a bearer token is, a SubjectAccessReview (authorization.k8s.io/v1) whether they may
    make a non-resource request (`get /metrics`). Needs `create` on both (rbac-operator.yaml)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.authentication = client.AuthenticationV1Api(api)
        self.authorization = client.AuthorizationV1Api(api)

    def review(self, token: str, path: str, verb: str) -> Access:
        """Who `token` is and whether they may `verb` `path`. Raises the error tree (the review
        itself refused or unanswered), never for a token that is simply not valid."""
        with translated():
            answer = self.authentication.create_token_review(
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}},
                _request_timeout=timeout(),
            )
        status = answer.status
        user = getattr(status, "user", None)
        if status is None or not status.authenticated or user is None or not user.username:
            return Access(False, reason=str(getattr(status, "error", "") or ""))
        spec: dict[str, Any] = {
            "user": user.username, "groups": list(user.groups or []), "extra": dict(user.extra or {}),
            "nonResourceAttributes": {"path": path, "verb": verb},
        }  # fmt: skip
        if user.uid:
            spec["uid"] = user.uid
        with translated():
            decision = self.authorization.create_subject_access_review(
                {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec},
                _request_timeout=timeout(),
            )
        allowed = bool(decision.status is not None and decision.status.allowed)
        reason = str(getattr(decision.status, "reason", "") or "")
        return Access(True, allowed, str(user.username), reason)


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
        # eventTime (microseconds) and no second-precision lastTimestamp: `kubectl events` sorts
        # by it, so a claim and the failure a moment later are listed in the order they happened.
        "eventTime": now, "action": reason,
        "source": {"component": OPERATOR_MANAGER}, "reportingComponent": OPERATOR_MANAGER,
        "reportingInstance": OPERATOR_MANAGER,
    }  # fmt: skip
    try:
        client.CoreV1Api(api).create_namespaced_event(order.namespace, body, _request_timeout=timeout())
    except ApiException as exc:
        log.warning("%s: cannot post event %s: %s", order.key, reason, explain(exc))
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        log.warning("%s: cannot post event %s: %s", order.key, reason, exc)
