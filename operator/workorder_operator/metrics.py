"""Prometheus metrics and the health endpoints, served on one port (--metrics-port).

Counters count what this replica saw while it was the leader, so two replicas never count the
same transition twice. Phase changes are seen in the watch, so agents' transitions (claims,
completions, failures) are counted as well as the operator's own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from workorder_operator import lifecycle
from workorder_operator.model import Outcome, Phase, WorkOrder

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

_TRANSITIONS = {
    (Phase.PENDING, Phase.CLAIMED): "claim",
    (Phase.CLAIMED, Phase.COMPLETED): "complete",
    (Phase.CLAIMED, Phase.RETRY_PENDING): "fail",
    (Phase.CLAIMED, Phase.FAILED): "fail",
    (Phase.RETRY_PENDING, Phase.PENDING): "due",
    (Phase.PENDING, Phase.FAILED): "reject",
}


def record_change(before: WorkOrder, after: WorkOrder) -> None:
    """Count one observed phase change (before -> after of the same order)."""
    old, new = before.status.phase, after.status.phase
    if old is None or new is None or old == new:
        return
    kind = after.spec.work_type
    name = "requeue" if lifecycle.requeued(before, after) else _TRANSITIONS.get((old, new))
    if (old, new) == (Phase.CLAIMED, Phase.PENDING):
        history = after.status.history
        name = "expire" if history and history[-1].outcome == Outcome.EXPIRED else "release"
    TRANSITIONS.labels(name or f"{old}->{new}", kind).inc()
    if name == "expire":
        EXPIRATIONS.labels(kind).inc()
    if new == Phase.RETRY_PENDING:
        RETRIES.labels(kind).inc()
    if new == Phase.FAILED:
        FAILURES.labels(kind).inc()
    if name == "claim" and after.status.claimed_at:
        since = before.status.updated_at or before.created_at
        CLAIM_WAIT.labels(kind).observe(max(0.0, (after.status.claimed_at - since).total_seconds()))
    if old == Phase.CLAIMED and before.status.claimed_at and after.status.updated_at:
        RUN_TIME.labels(kind, name or str(new)).observe(
            max(0.0, (after.status.updated_at - before.status.claimed_at).total_seconds())
        )


class EngineState(Collector):
    """Counted at scrape time from what the engine tracks: workorder_orders{phase,type} and
    workorder_deadlines_armed (deadlines the scheduler holds)."""

    def __init__(self, orders: Callable[[], Iterable[WorkOrder]], armed: Callable[[], int]) -> None:
        self._orders = orders
        self._armed = armed

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("workorder_orders", "WorkOrders by phase and type", labels=["phase", "type"])
        counts = Counter((str(o.status.phase or Phase.PENDING), o.spec.work_type) for o in self._orders())
        for (phase, kind), n in sorted(counts.items()):
            family.add_metric([phase, kind], n)
        yield family
        yield GaugeMetricFamily("workorder_deadlines_armed", "Deadlines the operator waits for", value=self._armed())


def track_engine(orders: Callable[[], Iterable[WorkOrder]], armed: Callable[[], int]) -> None:
    REGISTRY.register(EngineState(orders, armed))


async def serve(port: int, ready: Callable[[], bool], host: str) -> web.AppRunner:
    """/metrics, /healthz (the process answers) and /readyz (started and watching)."""

    async def metrics(_: web.Request) -> web.Response:
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
    await web.TCPSite(runner, host, port).start()
    return runner
