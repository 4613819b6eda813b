"""kopf wiring: settings, login, and watch events into the engine. No decisions here."""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import kopf
from aiohttp import web

from workorder_operator import metrics
from workorder_operator.buildagent import BuildAgent, BuildAgentConfig
from workorder_operator.engine import Engine
from workorder_operator.kube import OPERATOR_MANAGER, WorkOrders, api_client, post_event
from workorder_operator.leader import LeaderElection, LeaseConfig
from workorder_operator.model import GROUP, PLURAL, VERSION


@dataclass
class Options:
    """What the command line chose (set before kopf starts)."""

    kubeconfig: str | None = None
    context: str | None = None
    concurrency: int = 32
    # The namespaces watched (empty: all).
    namespaces: tuple[str, ...] = ()
    build_agent: BuildAgentConfig | None = field(default_factory=BuildAgentConfig)
    metrics_port: int = 0
    # None: no leader election (a single replica).
    lease: LeaseConfig | None = None
    identity: str = field(default_factory=lambda: os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}")
    # How often every replica lists what exists (metadata only) to forget orders deleted while
    # its watch was down.
    resync_seconds: float = 300.0


OPTIONS = Options()


@dataclass
class _State:
    engine: Engine | None = None
    build_agent: BuildAgent | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    metrics: web.AppRunner | None = None
    ready: bool = False


STATE = _State()


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """Log kopf in with the same credentials as our own client (honours --kubeconfig/--context)."""
    cfg = api_client(OPTIONS.kubeconfig, OPTIONS.context).configuration
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
async def startup(*, settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> None:
    # Our own marks, not kopf's zalando.org defaults. The engine needs none of them (it uses
    # event handlers only, so kopf keeps no per-object state), but if a future handler makes
    # kopf persist something, it lands under our group.
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

    # The user agent names the replica, so the API server's audit log tells replicas apart. No
    # silent retries: a leader's write is sent when it decided to send it, or not at all.
    user_agent = f"{OPERATOR_MANAGER}/{OPTIONS.identity}"
    api = api_client(
        OPTIONS.kubeconfig, OPTIONS.context, pool=OPTIONS.concurrency, retries=False, user_agent=user_agent
    )
    if OPTIONS.build_agent is not None:
        STATE.build_agent = BuildAgent(
            api_client(OPTIONS.kubeconfig, OPTIONS.context, user_agent=user_agent), OPTIONS.build_agent,
            OPERATOR_MANAGER,
        )  # fmt: skip
    election = None if OPTIONS.lease is None else LeaderElection(api, OPTIONS.lease, OPTIONS.identity)
    engine = Engine(
        WorkOrders(api, OPERATOR_MANAGER),
        post_event=partial(post_event, api),
        reject=STATE.build_agent.rejection if STATE.build_agent else None,
        concurrency=OPTIONS.concurrency,
        budget=election.remaining if election is not None else None,
        namespaces=OPTIONS.namespaces,
    )
    STATE.engine = engine
    if STATE.build_agent is not None:
        STATE.build_agent.post = engine.event
    STATE.tasks.append(asyncio.create_task(engine.resync_forever(OPTIONS.resync_seconds)))
    metrics.track_engine(engine.tracked_orders, lambda: len(engine.scheduler))
    if OPTIONS.metrics_port:
        STATE.metrics = await metrics.serve(OPTIONS.metrics_port, lambda: STATE.ready)
    # Every replica watches (its cache stays warm for a fast takeover); only the leader acts.
    if election is None:
        await _lead()
    else:
        STATE.tasks.append(asyncio.create_task(election.run(_lead, _follow)))
    STATE.ready = True
    logger.info("workorder engine started")


async def _lead() -> None:
    assert STATE.engine is not None
    metrics.LEADER.set(1)
    STATE.engine.lead()
    if STATE.build_agent is not None:
        STATE.build_agent.start()


async def _follow() -> None:
    metrics.LEADER.set(0)
    if STATE.engine is not None:
        await STATE.engine.follow()
    if STATE.build_agent is not None:
        await asyncio.to_thread(STATE.build_agent.close)


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    STATE.ready = False
    await _follow()
    for task in STATE.tasks:
        task.cancel()
    await asyncio.gather(*STATE.tasks, return_exceptions=True)
    STATE.tasks.clear()
    if STATE.engine is not None:
        STATE.engine.close()
    if STATE.metrics is not None:
        await STATE.metrics.cleanup()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def workorder_event(*, event: kopf.RawEvent, **_: Any) -> None:
    # async on purpose: kopf runs sync handlers in a thread pool, a hop per watch event we do not need.
    if STATE.engine is not None:
        STATE.engine.observe(event.get("type"), dict(event["object"]))
