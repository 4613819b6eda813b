"""`workorder-build-agent`: the Shipwright build agent as its own process.

It takes `build` orders from one cluster (the hub: `--hub-kubeconfig`, where the WorkOrders
live; claims, status and events go there) and runs their Builds and BuildRuns in its own cluster
(the spoke: in-cluster config or `--kubeconfig`), as the operator's built-in build agent does in
one cluster. Without `--hub-kubeconfig` the orders are in its own cluster too (beside an operator
started with `--no-build-agent`). Targeting decides which orders it takes: its id, `--label`s and
`--annotation`s (e.g. `--label cluster=eu-1`).

In a spoke, every `--cleanup-interval` seconds it deletes the Builds and BuildRuns of orders the
hub no longer has (`BuildExecutor.sweep`): garbage collection cannot follow an owner in another
cluster. Needs the operator's dependencies: `pip install 'workorder-operator[operator]'`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

try:
    from workorder_operator.buildagent import BuildExecutor, build_agent_config
    from workorder_operator.buildagent import add_options as add_build_options
except ImportError as exc:  # the base install is the SDK and CLI only: say what to install, not a traceback
    sys.exit(f"workorder-build-agent needs the operator's dependencies: pip install 'workorder-operator[operator]' "
             f"({exc})")  # fmt: skip

from workorder_operator import fleet
from workorder_operator.executor import ExecutorAgent
from workorder_operator.kube import ApiClient, KubeconfigError, WorkOrders, api_client
from workorder_operator.targeting import check_agent_id

log = logging.getLogger(__name__)

MANAGER = "workorder-build-agent"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=MANAGER,
        description="Run `build` orders with Shipwright: orders from the hub cluster, builds in this one.",
    )
    hub = parser.add_argument_group("the hub: where the WorkOrders live (default: this cluster)")
    hub.add_argument("--hub-kubeconfig", help="kubeconfig of the hub cluster")
    hub.add_argument("--hub-context", help="context of --hub-kubeconfig to use")
    hub.add_argument(
        "--hub-name",
        help="the hub's name on this cluster's Builds and BuildRuns (default: the hub's API server URL); keep it "
        "stable: builds are recognised by it after a restart",
    )
    own = parser.add_argument_group("this cluster: where the builds run")
    own.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then $KUBECONFIG, ~/.kube/config)")
    own.add_argument("--context", help="kubeconfig context to use")
    agent = parser.add_argument_group("the agent")
    agent.add_argument(
        "--id",
        default=os.environ.get("WORKORDER_AGENT_ID") or None,
        help="its agent UUID (default: $WORKORDER_AGENT_ID); stable across restarts (its claims are resumed by it) "
        "and unique in the fleet",
    )
    agent.add_argument("--label", action="append", default=[], help="its labels, for targeting (repeatable)")
    agent.add_argument("--annotation", action="append", default=[], help="its annotations KEY=VALUE (repeatable)")
    scope = agent.add_mutually_exclusive_group()
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="take orders in every namespace (default)")
    scope.add_argument(
        "-n", "--namespace", action="append", default=[],
        help="take orders only in this namespace of the hub (repeatable); builds run in the namespace of the "
        "same name here",
    )  # fmt: skip
    add_build_options(agent)
    agent.add_argument(
        "--presence-namespace",
        help="the hub namespace where it announces itself with its presence Lease (default: its first -n "
        "namespace, else default)",
    )
    agent.add_argument(
        "--lease-duration", type=float, default=fleet.LEASE_SECONDS,
        help="term of its presence Lease (default 30): once it lapses, the hub's operator expires its claims",
    )  # fmt: skip
    agent.add_argument(
        "--cleanup-interval", type=float, default=60.0,
        help="seconds between two looks for builds whose hub order is gone (deleted here then; default 60)",
    )  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if not args.id:
        parser.error("--id (or $WORKORDER_AGENT_ID) is required: a UUID, stable across restarts, one per agent")
    try:
        args.id = check_agent_id(args.id, "--id")
    except ValueError as exc:
        parser.error(str(exc))
    annotations = {}
    for text in args.annotation:
        key, sep, value = text.partition("=")
        if not sep or not key:
            parser.error(f"--annotation: expected KEY=VALUE, got {text!r}")
        annotations[key] = value
    args.annotation = annotations
    if args.hub_kubeconfig is None and (args.hub_context or args.hub_name):
        parser.error("--hub-context and --hub-name need --hub-kubeconfig")
    if not fleet.MIN_LEASE_SECONDS <= args.lease_duration <= fleet.MAX_LEASE_SECONDS:
        parser.error(f"--lease-duration: between {fleet.MIN_LEASE_SECONDS} and {fleet.MAX_LEASE_SECONDS} seconds")
    for flag in ("build_concurrency", "cleanup_interval"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    return args


def _clients(args: argparse.Namespace) -> tuple[ApiClient, ApiClient | None, str | None]:
    """The hub's client, this cluster's (None: it is the hub) and the hub's name."""
    user_agent = f"{MANAGER}/{args.id}"
    own = api_client(args.kubeconfig, args.context, user_agent=user_agent)
    if args.hub_kubeconfig is None:
        return own, None, None
    hub = api_client(args.hub_kubeconfig, args.hub_context, user_agent=user_agent)
    return hub, own, args.hub_name or str(hub.configuration.host)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="[%(asctime)s] %(name)s [%(levelname)-8.8s] %(message)s",
    )
    try:
        hub, spoke, hub_name = _clients(args)
    except (KubeconfigError, OSError) as exc:
        log.error("no usable kubeconfig: %s", exc)
        return 3
    executor = BuildExecutor(
        hub, MANAGER, registration_timeout=args.build_registration_timeout,
        buildrun_start_timeout=args.buildrun_start_timeout, spoke=spoke, hub=hub_name,
    )  # fmt: skip
    config = build_agent_config(
        id=args.id, labels=tuple(args.label), annotations=args.annotation, concurrency=args.build_concurrency,
        namespaces=tuple(args.namespace), mark_waiting=spoke is None,
        presence_namespace=args.presence_namespace or (args.namespace[0] if args.namespace else "default"),
        lease_duration=args.lease_duration,
    )  # fmt: skip
    agent = ExecutorAgent(hub, executor, config)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    where = f"orders from hub {hub_name}, builds in this cluster" if spoke is not None else "orders and builds here"
    log.info("%s %s: %s (labels %s)", MANAGER, args.id, where, list(config.labels))
    agent.start()
    orders = WorkOrders(hub, MANAGER)
    try:
        while not stop.is_set():
            if spoke is not None:
                try:
                    executor.sweep(lambda ns: set(orders.list_versions(ns)[0]), config.namespaces)
                except Exception as exc:  # the spoke's API is away: the next round looks again
                    log.warning("looking for builds of deleted orders failed: %s", exc)
            stop.wait(args.cleanup_interval)
    finally:
        log.info("%s %s stopping: claims in flight are left to be resumed", MANAGER, args.id)
        agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
