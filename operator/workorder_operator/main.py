"""`workorder-operator`: run the operator."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import kopf

from workorder_operator import handlers


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
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    handlers.OPTIONS.kubeconfig = args.kubeconfig
    handlers.OPTIONS.context = args.context
    handlers.OPTIONS.concurrency = args.concurrency
    kopf.configure(verbose=args.verbose)
    if not args.verbose:
        # kopf logs every handled watch event at INFO: thousands of lines an hour that say nothing.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kopf.run(clusterwide=not args.namespace, namespaces=args.namespace, standalone=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
