"""kopf wiring: settings, login, start-up and clean-up of the engine and its feeds. No decisions here.

Nothing is a module global: main.py hands the settings (`settings.Settings`) and the executors
registry (`executor.Executors`) to kopf as its `memo`; the handlers read them from there and keep
what they start (engine, tasks, metrics server) in the memo's `State`, shared by every copy kopf
makes of the memo.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import kopf
from aiohttp import web

from workorder_operator import metrics
from workorder_operator.engine import Engine, OrderFeed, PresenceFeed
from workorder_operator.executor import Executors
from workorder_operator.kube import OPERATOR_MANAGER, AccessReviews, WorkOrders, api_client, post_event
from workorder_operator.leader import LeaderElection
from workorder_operator.model import GROUP
from workorder_operator.presence import PresenceLeases
from workorder_operator.settings import Settings


@dataclass
class State:
    """What the handlers started, for the ones that stop it."""

    engine: Engine | None = None
    presence: PresenceFeed | None = None
    orders: OrderFeed | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    metrics: web.AppRunner | None = None
    ready: bool = False


def memo(settings: Settings, executors: Executors) -> kopf.Memo:
    """kopf's memo for `kopf.run(memo=...)`: what every handler receives."""
    return kopf.Memo(settings=settings, executors=executors, state=State())


@kopf.on.login()
def login(*, memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """Log kopf in with the same credentials as our own client (honours --kubeconfig/--context)."""
    settings: Settings = memo.settings
    cfg = api_client(settings.kubeconfig, settings.context).configuration
    keys: dict[str, str] = cfg.api_key or {}
    scheme, _sep, value = (keys.get("authorization") or keys.get("BearerToken") or "").partition(" ")
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
        scheme=scheme or None,
        token=value or None,
    )


@kopf.on.startup()
async def startup(*, memo: kopf.Memo, settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> None:
    # Our own marks, not kopf's zalando.org defaults. The engine needs none of them (kopf
    # watches nothing: the engine's feeds do), but if a future handler makes kopf persist
    # something, it lands under our group.
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Events are for transitions a person cares about (the engine posts them); never log lines.
    settings.posting.loggers = False
    # Ask the server to end each watch after 5 minutes (it then resumes from the last
    # resourceVersion) and give up on a silent connection shortly after: a half-dead TCP
    # connection must not leave the operator blind.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    # One API call never hangs the operator for kopf's default of 5 minutes.
    settings.networking.request_timeout = 30
    settings.networking.connect_timeout = 10
    # We know our one resource: no watching of all CRDs and namespaces (and no RBAC for it).
    settings.scanning.disabled = True
    # High availability is a Lease (leader.py), not kopf peering: no peering objects.
    settings.peering.standalone = True

    ours: Settings = memo.settings
    executors: Executors = memo.executors
    state: State = memo.state
    # The user agent names the replica, so the API server's audit log tells replicas apart. No
    # silent retries: a leader's write is sent when it decided to send it, or not at all.
    api = api_client(
        ours.kubeconfig, ours.context, pool=ours.concurrency, retries=False,
        user_agent=f"{OPERATOR_MANAGER}/{ours.identity}",
    )  # fmt: skip
    election = None if ours.lease is None else LeaderElection(api, ours.lease, ours.identity)
    engine = Engine(
        WorkOrders(api, OPERATOR_MANAGER),
        post_event=partial(post_event, api),
        executors=executors,
        concurrency=ours.concurrency,
        budget=election.remaining if election is not None else None,
        namespaces=ours.namespaces,
        presence_grace=ours.presence_grace,
        unschedulable_grace=ours.unschedulable_grace,
        scheduling_writes=ours.scheduling_writes,
    )
    state.engine = engine
    # Every replica follows the agents' presence leases too (a warm view for a fast takeover).
    state.presence = PresenceFeed(engine, PresenceLeases(api, OPERATOR_MANAGER), also=(ours.presence_namespace,))
    state.presence.start()
    state.tasks.append(asyncio.create_task(engine.scheduling_forever(ours.scheduling_interval)))
    # Executors tell refusals through the engine's rate-limited events.
    executors.post_events_through(engine.event)
    metrics.limit_types(ours.metrics_max_types)
    metrics.track_engine(engine.tracked_orders, lambda: len(engine.scheduler))
    if ours.metrics_port:
        guard, tls = None, None
        if ours.metrics_secure:
            # Scrapes are authenticated and authorized by the API server; the probes are not.
            reviews = AccessReviews(api_client(ours.kubeconfig, ours.context, pool=4, user_agent=OPERATOR_MANAGER))
            guard = metrics.AccessCache(reviews, ours.metrics_auth_cache_seconds, ours.metrics_auth_cache_entries)
            tls = await asyncio.to_thread(metrics.tls_context, ours.metrics_cert_dir)
        elif ours.metrics_address not in ("127.0.0.1", "localhost", "::1"):
            logger.warning("--metrics-insecure on %s: anyone who reaches the port reads the metrics",
                           ours.metrics_address)  # fmt: skip
        state.metrics = await metrics.serve(
            ours.metrics_port, lambda: state.ready, ours.metrics_address, guard=guard, tls=tls
        )
    # Every replica watches (its cache stays warm for a fast takeover); only the leader acts.
    if election is None:
        await _lead(state, executors)
    else:
        state.tasks.append(asyncio.create_task(election.run(partial(_lead, state, executors),
                                                            partial(_follow, state, executors))))  # fmt: skip
    # Our own paged list-then-watch rather than a kopf watch handler: kopf lists everything in
    # one request and holds it all at once (1.6 GB and 5 minutes at 100,000 orders).
    state.orders = OrderFeed(engine, ours.list_page_size)
    state.orders.start()
    state.ready = True
    logger.info("workorder engine started")


async def _lead(state: State, executors: Executors) -> None:
    assert state.engine is not None
    metrics.LEADER.set(1)
    state.engine.lead()
    executors.start()


async def _follow(state: State, executors: Executors) -> None:
    metrics.LEADER.set(0)
    if state.engine is not None:
        await state.engine.follow()
    if len(executors):
        await asyncio.to_thread(executors.close)


@kopf.on.cleanup()
async def cleanup(*, memo: kopf.Memo, **_: Any) -> None:
    state: State = memo.state
    state.ready = False
    await _follow(state, memo.executors)
    for task in state.tasks:
        task.cancel()
    await asyncio.gather(*state.tasks, return_exceptions=True)
    state.tasks.clear()
    for feed in (state.orders, state.presence):
        if feed is not None:
            feed.stop()
    if state.engine is not None:
        state.engine.close()
    if state.metrics is not None:
        await state.metrics.cleanup()
