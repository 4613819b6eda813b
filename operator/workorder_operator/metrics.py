"""Prometheus metrics and the health endpoints, served on one port (--metrics-port).

Counters count what this replica saw while it was the leader, so two replicas never count the
same transition twice. Phase changes are seen in the watch, so agents' transitions (claims,
completions, failures) are counted as well as the operator's own.

The `type` label is bounded (`TypeLabels`): every replica, leader or standby, counts the live
orders of each work type from the engine's feed (a view of what exists, not a count of
transitions, so both replicas keep it), and a type's series go from every family when its last
order goes. At most `--metrics-max-types` live types have series of their own; the others share
type="_other" while they live. So the series are bounded by the cap, whatever tenants create.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import ipaddress
import logging
import ssl
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol, TypeVar

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from workorder_operator import lifecycle
from workorder_operator.errors import Transient, WorkOrderError
from workorder_operator.kube import Access
from workorder_operator.model import Outcome, Phase, WorkOrder

log = logging.getLogger(__name__)

M = TypeVar("M", bound=MetricWrapperBase)

REGISTRY = CollectorRegistry(auto_describe=True)

_DURATIONS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)

TRANSITIONS = PromCounter(
    "workorder_transitions_total",
    "Phase changes of WorkOrders, by transition",
    ["transition", "type"],
    registry=REGISTRY,
)
EXPIRATIONS = PromCounter("workorder_expirations_total", "Claims that expired", ["type"], registry=REGISTRY)
RETRIES = PromCounter("workorder_retries_total", "Failed attempts that will be retried", ["type"], registry=REGISTRY)
FAILURES = PromCounter("workorder_failures_total", "Orders that ended Failed", ["type"], registry=REGISTRY)
CLAIM_WAIT = Histogram(
    "workorder_claim_wait_seconds", "From Pending to claimed", ["type"], buckets=_DURATIONS, registry=REGISTRY
)
RUN_TIME = Histogram(
    "workorder_run_seconds", "From claimed to the attempt's end", ["type", "outcome"], buckets=_DURATIONS,
    registry=REGISTRY,
)  # fmt: skip
BUILD_OUTCOMES = PromCounter(
    "workorder_build_outcomes_total", "Attempts of the built-in build agent, by outcome", ["outcome"], registry=REGISTRY
)
EVENTS_DROPPED = PromCounter(
    "workorder_events_dropped_total", "Kubernetes Events not posted (rate limit)", registry=REGISTRY
)
LEADER = Gauge("workorder_leader", "1 while this replica is the leader", registry=REGISTRY)

# The `type` label of the live work types beyond the cap (`TypeLabels`).
OTHER = "_other"
# Live work types with series of their own, unless --metrics-max-types says otherwise: at about
# 36 series a type, 100 types are some 3,600 series (a few MB in the operator and in Prometheus),
# more work types than a queue usually has.
MAX_TYPES = 100


class TypeLabels:
    """The `type` label values in use, bounded, and the series made with each.

    The engine reports every order it starts and stops tracking (`seen`, `gone`); an order's
    work type never changes. A type's first live order gives it a label of its own while fewer
    than `cap` types have one, else it counts under OTHER until its last order goes (a type
    keeps the label it got for as long as it lives, so its series never split). When a type's
    last order goes, every series made under its label (`labels`) is removed, and OTHER's when
    the last type counted under it goes. Kept by every replica: it follows what exists."""

    def __init__(self, cap: int = MAX_TYPES) -> None:
        self.cap = cap
        self._live: Counter[str] = Counter()
        self._own: set[str] = set()
        self._overflow: set[str] = set()
        # label value -> the (family, label values) of every series made under it.
        self._series: dict[str, set[tuple[MetricWrapperBase, tuple[str, ...]]]] = {}
        self._lock = threading.Lock()

    def seen(self, work_type: str) -> None:
        """One more live order of `work_type`."""
        with self._lock:
            self._live[work_type] += 1
            if self._live[work_type] == 1:
                (self._own if len(self._own) < self.cap else self._overflow).add(work_type)

    def gone(self, work_type: str) -> None:
        """One live order of `work_type` fewer: its series go with its last order."""
        with self._lock:
            left = self._live[work_type] - 1
            if left > 0:
                self._live[work_type] = left
                return
            self._live.pop(work_type, None)
            if work_type in self._own:
                self._own.discard(work_type)
                self._drop(work_type)
            elif work_type in self._overflow:
                self._overflow.discard(work_type)
                if not self._overflow:
                    self._drop(OTHER)

    def label(self, work_type: str) -> str:
        """The `type` label value of `work_type`'s series."""
        with self._lock:
            return work_type if work_type in self._own else OTHER

    def labels(self, family: M, label: str, *values: str) -> M:
        """`family.labels(*values)`, remembered under `label` (what `label()` gave) for removal."""
        with self._lock:
            self._series.setdefault(label, set()).add((family, values))
        return family.labels(*values)

    def live(self) -> dict[str, int]:
        """Live orders by work type (for tests and debugging)."""
        with self._lock:
            return dict(self._live)

    def _drop(self, label: str) -> None:
        for family, values in self._series.pop(label, ()):
            with contextlib.suppress(KeyError):
                family.remove(*values)


TYPES = TypeLabels()


def limit_types(cap: int) -> None:
    """Set the cap of live types with series of their own (--metrics-max-types)."""
    TYPES.cap = max(0, cap)


_TRANSITIONS = {
    (Phase.PENDING, Phase.CLAIMED): "claim",
    (Phase.CLAIMED, Phase.COMPLETED): "complete",
    (Phase.CLAIMED, Phase.RETRY_PENDING): "fail",
    (Phase.CLAIMED, Phase.FAILED): "fail",
    (Phase.RETRY_PENDING, Phase.PENDING): "due",
    (Phase.PENDING, Phase.FAILED): "reject",
}


def record_change(before: WorkOrder, after: WorkOrder, types: TypeLabels = TYPES) -> None:
    """Count one observed phase change (before -> after of the same order, which the engine
    tracks: its type is live in `types`)."""
    old, new = before.status.phase, after.status.phase
    if old is None or new is None or old == new:
        return
    kind = types.label(after.spec.work_type)
    name = "requeue" if lifecycle.requeued(before, after) else _TRANSITIONS.get((old, new))
    if (old, new) == (Phase.CLAIMED, Phase.PENDING):
        history = after.status.history
        name = "expire" if history and history[-1].outcome == Outcome.EXPIRED else "release"
    types.labels(TRANSITIONS, kind, name or f"{old}->{new}", kind).inc()
    if name == "expire":
        types.labels(EXPIRATIONS, kind, kind).inc()
    if new == Phase.RETRY_PENDING:
        types.labels(RETRIES, kind, kind).inc()
    if new == Phase.FAILED:
        types.labels(FAILURES, kind, kind).inc()
    if name == "claim" and after.status.claimed_at:
        since = before.status.updated_at or before.created_at
        types.labels(CLAIM_WAIT, kind, kind).observe(max(0.0, (after.status.claimed_at - since).total_seconds()))
    if old == Phase.CLAIMED and before.status.claimed_at and after.status.updated_at:
        types.labels(RUN_TIME, kind, kind, name or str(new)).observe(
            max(0.0, (after.status.updated_at - before.status.claimed_at).total_seconds())
        )


class EngineState(Collector):
    """Counted at scrape time from what the engine tracks: workorder_orders{phase,type} and
    workorder_deadlines_armed (deadlines the scheduler holds)."""

    def __init__(
        self, orders: Callable[[], Iterable[WorkOrder]], armed: Callable[[], int], types: TypeLabels = TYPES
    ) -> None:
        self._orders = orders
        self._armed = armed
        self._types = types

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("workorder_orders", "WorkOrders by phase and type", labels=["phase", "type"])
        label = self._types.label
        counts = Counter((str(o.status.phase or Phase.PENDING), label(o.spec.work_type)) for o in self._orders())
        for (phase, kind), n in sorted(counts.items()):
            family.add_metric([phase, kind], n)
        yield family
        yield GaugeMetricFamily("workorder_deadlines_armed", "Deadlines the operator waits for", value=self._armed())


def track_engine(orders: Callable[[], Iterable[WorkOrder]], armed: Callable[[], int]) -> None:
    REGISTRY.register(EngineState(orders, armed))


# --- the secure endpoint ------------------------------------------------------------------------

# What a scrape of /metrics asks to do, in the API server's terms (a non-resource URL).
METRICS_PATH = "/metrics"
METRICS_VERB = "get"
# Refusals are kept for at most this long (a new RoleBinding takes effect soon).
REFUSAL_SECONDS = 10.0
# Reviews in flight at once: a flood of scrapes with new tokens waits here, one API call each.
REVIEWS_IN_FLIGHT = 4


class Reviews(Protocol):
    """What the secure endpoint asks the API server (`kube.AccessReviews`)."""

    def review(self, token: str, path: str, verb: str) -> Access:
        """Who `token` is (TokenReview) and whether they may `verb` `path` (SubjectAccessReview).
        Blocking; raises the error tree."""
        ...


class AccessCache:
    """The API server's answers for bearer tokens, kept briefly (as controller-runtime's
    delegating authenticator and authorizer do): an allowed scrape for `ttl` seconds, a refused
    one for at most REFUSAL_SECONDS; at most `entries` answers, the least recently used go
    first. Keyed by the token's SHA-256: the tokens themselves are never kept. Errors (the API
    server unreachable) are not kept."""

    def __init__(
        self, reviews: Reviews, ttl: float = 60.0, entries: int = 256, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._reviews = reviews
        self.ttl = ttl
        self.entries = max(1, entries)
        self._clock = clock
        self._answers: OrderedDict[bytes, tuple[float, Access]] = OrderedDict()
        self._in_flight = asyncio.Semaphore(REVIEWS_IN_FLIGHT)

    async def check(self, token: str) -> Access:
        key = hashlib.sha256(token.encode()).digest()
        kept = self._kept(key)
        if kept is not None:
            return kept
        async with self._in_flight:
            kept = self._kept(key)  # answered while this one waited
            if kept is not None:
                return kept
            access = await asyncio.to_thread(self._reviews.review, token, METRICS_PATH, METRICS_VERB)
        keep = self.ttl if access.allowed else min(self.ttl, REFUSAL_SECONDS)
        if keep > 0:
            self._answers[key] = (self._clock() + keep, access)
            self._answers.move_to_end(key)
            while len(self._answers) > self.entries:
                self._answers.popitem(last=False)
        return access

    def __len__(self) -> int:
        return len(self._answers)

    def _kept(self, key: bytes) -> Access | None:
        kept = self._answers.get(key)
        if kept is None:
            return None
        if kept[0] <= self._clock():
            del self._answers[key]
            return None
        self._answers.move_to_end(key)
        return kept[1]


def bearer_token(header: str) -> str:
    """The token of an `Authorization: Bearer <token>` header; "" for anything else."""
    scheme, _sep, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def authorize(guard: AccessCache, header: str) -> web.Response | None:
    """None if the scrape may go on, else the answer: 401 without a valid token, 403 for an
    identity that may not get /metrics, 503/500 when the API server could not say."""
    token = bearer_token(header)
    unauthorized = {"WWW-Authenticate": 'Bearer realm="workorder-operator"'}
    if not token:
        return web.Response(status=401, text="Unauthorized: a bearer token is required\n", headers=unauthorized)
    try:
        access = await guard.check(token)
    except Transient as exc:
        log.warning("cannot review a scrape's token: %s", exc)
        return web.Response(status=503, text="Authentication failed: the API server did not answer\n")
    except WorkOrderError as exc:
        log.error("cannot review a scrape's token: %s", exc)
        return web.Response(status=500, text="Authentication failed\n")
    if not access.authenticated:
        return web.Response(status=401, text="Unauthorized\n", headers=unauthorized)
    if not access.allowed:
        log.debug("scrape by %s refused: %s", access.user, access.reason)
        return web.Response(status=403, text=f"Forbidden: {access.user} may not get {METRICS_PATH}\n")
    return None


CERT_NAME, KEY_NAME = "tls.crt", "tls.key"


def self_signed() -> tuple[bytes, bytes]:
    """A new self-signed certificate (PEM) for localhost and 127.0.0.1, and its key: scrapes are
    encrypted; who the server is, a scraper knows from where it connects (as for the kubelet's
    and kube-controller-manager's own self-signed serving certificates)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "workorder-operator")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def tls_context(cert_dir: str | None) -> ssl.SSLContext:
    """TLS for the metrics port: tls.crt and tls.key of `cert_dir` (read once, at start), or a
    self-signed certificate made now when no directory is given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_dir:
        context.load_cert_chain(Path(cert_dir) / CERT_NAME, Path(cert_dir) / KEY_NAME)
        return context
    cert, key = self_signed()
    # ssl loads key pairs from files only: a private directory, gone once they are loaded.
    with tempfile.TemporaryDirectory(prefix="workorder-tls-") as tmp:
        (Path(tmp) / CERT_NAME).write_bytes(cert)
        (Path(tmp) / KEY_NAME).write_bytes(key)
        context.load_cert_chain(Path(tmp) / CERT_NAME, Path(tmp) / KEY_NAME)
    return context


async def serve(
    port: int,
    ready: Callable[[], bool],
    host: str,
    *,
    guard: AccessCache | None = None,
    tls: ssl.SSLContext | None = None,
) -> web.AppRunner:
    """/metrics, /healthz (the process answers) and /readyz (started and watching). With `guard`,
    a scrape of /metrics needs a bearer token the API server accepts, of an identity that may
    get /metrics; the probes never need one. With `tls`, over HTTPS."""

    async def metrics(request: web.Request) -> web.Response:
        if guard is not None:
            refusal = await authorize(guard, request.headers.get("Authorization", ""))
            if refusal is not None:
                return refusal
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(text="ok") if ready() else web.Response(status=503, text="starting")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=tls).start()
    return runner
