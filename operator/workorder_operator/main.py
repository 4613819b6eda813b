"""`workorder-operator`: run the operator."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

try:
    import kopf
except ImportError as exc:  # the base install is the SDK and CLI only: say what to install, not a traceback
    sys.exit(f"workorder-operator needs its dependencies: pip install 'workorder-operator[operator]' ({exc})")

from workorder_operator import handlers
from workorder_operator.buildagent import DEFAULT_AGENT_ID, BuildExecutor, build_agent_config
from workorder_operator.buildagent import add_options as add_build_options
from workorder_operator.executor import AgentConfig, Executor, ExecutorAgent, Executors
from workorder_operator.kube import OPERATOR_MANAGER, api_client
from workorder_operator.settings import LeaseConfig, Settings
from workorder_operator.targeting import check_agent_id

FULL_FORMAT = "[%(asctime)s] %(name)s [%(levelname)-8.8s] %(message)s"


def _agent_id(text: str) -> str:
    try:
        return check_agent_id(text, "")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).strip()) from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="workorder-operator", description="Run the WorkOrder operator (expiry, retries, conditions, TTL)."
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch only this namespace (repeatable)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then $KUBECONFIG, ~/.kube/config)")
    parser.add_argument("--context", help="kubeconfig context to use")
    parser.add_argument("--concurrency", type=int, default=32, help="API calls in flight at once (default 32)")
    parser.add_argument(
        "--list-page-size", type=int, default=500,
        help="orders per list request at start-up and after a broken watch (limit/continue; default 500)",
    )  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--log-format", choices=["plain", "full", "json"], default="full", help="log line format")
    parser.add_argument(
        "--metrics-port", type=int, default=0, help="serve /metrics, /healthz and /readyz on this port (0: off)"
    )
    parser.add_argument(
        "--metrics-address",
        default="127.0.0.1",
        help="address the metrics port listens on (default 127.0.0.1: this machine only; in a pod: 0.0.0.0)",
    )
    parser.add_argument(
        "--metrics-insecure", action="store_true",
        help="serve the metrics port over plain HTTP and let anyone scrape it (local development only; default: "
        "HTTPS, and /metrics needs a bearer token allowed to get /metrics, e.g. bound to workorder-metrics-reader)",
    )  # fmt: skip
    parser.add_argument(
        "--metrics-cert-dir", help="directory with tls.crt and tls.key for the metrics port (default: self-signed)"
    )
    parser.add_argument(
        "--metrics-auth-cache-seconds", type=float, default=60.0,
        help="reuse the API server's answer for a scrape's token this long (refusals at most 10 s; default 60)",
    )  # fmt: skip
    parser.add_argument(
        "--metrics-auth-cache-size", type=int, default=256, help="answers for tokens kept at most (default 256)"
    )
    parser.add_argument(
        "--metrics-max-types", type=int, default=100,
        help="live work types with series of their own; the rest share type=\"_other\" (default 100)",
    )  # fmt: skip
    ha = parser.add_argument_group("high availability (a Lease elects the one replica that acts)")
    ha.add_argument("--no-leader-election", action="store_true", help="act at once, alone (a single replica)")
    ha.add_argument(
        "--leader-election-namespace",
        default=os.environ.get("POD_NAMESPACE") or "default",
        help="namespace of the Lease (default: $POD_NAMESPACE, else default)",
    )
    ha.add_argument("--leader-election-name", default="workorder-operator", help="name of the Lease")
    fleet = parser.add_argument_group("fleet (agents announce themselves with presence Leases)")
    fleet.add_argument(
        "--presence-namespace",
        help="where the operator's own agents (the build agent) announce themselves "
        "(default: the leader election namespace)",
    )
    fleet.add_argument(
        "--presence-grace", type=float, default=2.0,
        help="seconds past a presence lease's term before its agent is lost and its claims expire (default 2)",
    )  # fmt: skip
    fleet.add_argument(
        "--unschedulable-grace", type=float, default=30.0,
        help="mark a Pending order no live agent can take for this long Schedulable=False (default 30; 0: never)",
    )  # fmt: skip
    fleet.add_argument(
        "--scheduling-interval", type=float, default=5.0,
        help="seconds between two looks for unschedulable orders (default 5; each writes at most 50 marks)",
    )  # fmt: skip
    build = parser.add_argument_group("built-in build agent (runs `build` orders with Shipwright)")
    build.add_argument("--no-build-agent", action="store_true", help="leave build orders to external agents")
    build.add_argument(
        "--build-agent-id", default=DEFAULT_AGENT_ID, type=_agent_id, help="its agent UUID, for targeting"
    )
    build.add_argument("--build-agent-label", action="append", help="its labels (repeatable; default: shipwright)")
    build.add_argument("--build-agent-annotation", action="append", default=[], help="its annotations KEY=VALUE")
    add_build_options(build)
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        kubeconfig=args.kubeconfig,
        context=args.context,
        concurrency=args.concurrency,
        list_page_size=args.list_page_size,
        namespaces=tuple(args.namespace),
        metrics_port=args.metrics_port,
        metrics_address=args.metrics_address,
        metrics_secure=not args.metrics_insecure,
        metrics_cert_dir=args.metrics_cert_dir,
        metrics_auth_cache_seconds=args.metrics_auth_cache_seconds,
        metrics_auth_cache_entries=args.metrics_auth_cache_size,
        metrics_max_types=args.metrics_max_types,
        lease=None if args.no_leader_election else LeaseConfig(args.leader_election_namespace,
                                                               args.leader_election_name),
        presence_namespace=args.presence_namespace or args.leader_election_namespace,
        presence_grace=args.presence_grace,
        unschedulable_grace=args.unschedulable_grace,
        scheduling_interval=args.scheduling_interval,
    )  # fmt: skip


def executors_from(
    args: argparse.Namespace, settings: Settings, extra: Sequence[tuple[Executor, AgentConfig]] = ()
) -> Executors:
    """The executors this operator runs: the Shipwright build executor unless --no-build-agent,
    and `extra` (each with its agent's config; in the watched namespaces unless it names its own)."""
    executors = Executors()
    api = api_client(settings.kubeconfig, settings.context, user_agent=f"{OPERATOR_MANAGER}/{settings.identity}")
    for executor, config in extra:
        config = config if config.namespaces else dataclasses.replace(config, namespaces=settings.namespaces)
        if config.presence_namespace is None:
            config = dataclasses.replace(config, presence_namespace=settings.presence_namespace)
        executors.register(ExecutorAgent(api, executor, config))
    if not args.no_build_agent:
        config = build_agent_config(
            id=args.build_agent_id,
            labels=tuple(args.build_agent_label or ("shipwright",)),
            annotations=dict(a.split("=", 1) for a in args.build_agent_annotation if "=" in a),
            concurrency=args.build_concurrency,
            # Single-namespace mode holds for the build agent too: it lists, watches and claims
            # only in the namespaces the operator watches.
            namespaces=settings.namespaces,
            presence_namespace=settings.presence_namespace,
        )
        executor = BuildExecutor(
            api, OPERATOR_MANAGER, registration_timeout=args.build_registration_timeout,
            buildrun_start_timeout=args.buildrun_start_timeout,
        )  # fmt: skip
        executors.register(ExecutorAgent(api, executor, config))
    return executors


def main(argv: Sequence[str] | None = None, executors: Sequence[tuple[Executor, AgentConfig]] = ()) -> int:
    """Run the operator (until SIGTERM). `executors`: more work types it runs itself, beside
    the built-in `build` (README: "Write your own executor")."""
    args = parse_args(argv)
    settings = settings_from(args)
    registry = executors_from(args, settings, executors)
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()], log_refkey="workorder")
    if args.log_format == "full":
        # kopf's full format cuts logger names at 20 characters (workorder_operator.e): keep them whole.
        for handler in logging.getLogger().handlers:
            if handler.formatter is not None:
                handler.setFormatter(type(handler.formatter)(FULL_FORMAT))
    if not args.verbose:
        # kopf logs every handled watch event at INFO: thousands of lines an hour that say nothing.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kopf.run(
        clusterwide=not args.namespace, namespaces=args.namespace, standalone=True,
        memo=handlers.memo(settings, registry),
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
