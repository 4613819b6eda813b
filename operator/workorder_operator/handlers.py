"""kopf wiring: settings, login, and watch events into the engine. No decisions here."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import kopf

from workorder_operator.engine import Engine
from workorder_operator.kube import OPERATOR_MANAGER, WorkOrders, api_client, post_event
from workorder_operator.model import GROUP, PLURAL, VERSION


@dataclass
class Options:
    """What the command line chose (set before kopf starts)."""

    kubeconfig: str | None = None
    context: str | None = None
    concurrency: int = 32


OPTIONS = Options()


@dataclass
class _State:
    engine: Engine | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


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
async def startup(
    *, settings: kopf.OperatorSettings, logger: logging.Logger | logging.LoggerAdapter[Any], **_: Any
) -> None:
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
    # A single operator for now: no peering objects to install.
    settings.peering.standalone = True

    api = api_client(OPTIONS.kubeconfig, OPTIONS.context, pool=OPTIONS.concurrency)
    engine = Engine(
        WorkOrders(api, OPERATOR_MANAGER), post_event=partial(post_event, api), concurrency=OPTIONS.concurrency
    )
    STATE.engine = engine
    STATE.tasks.append(asyncio.create_task(engine.run()))
    logger.info("workorder engine started")


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    for task in STATE.tasks:
        task.cancel()
    await asyncio.gather(*STATE.tasks, return_exceptions=True)
    STATE.tasks.clear()
    if STATE.engine is not None:
        STATE.engine.close()


@kopf.on.event(GROUP, VERSION, PLURAL)
def workorder_event(*, event: kopf.RawEvent, **_: Any) -> None:
    if STATE.engine is not None:
        STATE.engine.observe(event.get("type"), dict(event["object"]))
