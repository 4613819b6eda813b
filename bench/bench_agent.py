"""One benchmark agent as its own process, as in a real cluster: the SDK's `Agent.run` with a handler
that returns "ok" at once (concurrency 1, one API client).

    python bench/bench_agent.py --kubeconfig K --namespace NS --work-type bench --stats OUT.json

It counts its own status writes (by transition, won or lost) and the bytes of their request
bodies, and writes them to `--stats` when it is stopped (SIGTERM or SIGINT). Started and stopped
by bench/throughput.py; its CPU time is read from /proc by the benchmark.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from workorder_operator import lifecycle
from workorder_operator.agent import Agent, Claim
from workorder_operator.errors import Conflict
from workorder_operator.kube import WorkOrders, api_client, json_patch
from workorder_operator.model import WorkOrder


class CountingWorkOrders(WorkOrders):
    """Status writes by transition (`claim_won`, `claim_lost`, ...) and their request bytes."""

    def __init__(self, base: WorkOrders) -> None:
        super().__init__(base.api, base.field_manager)
        self.writes: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self._lock = threading.Lock()

    def write_status(
        self, order: WorkOrder, write: lifecycle.StatusWrite, budget: float | None = None
    ) -> dict[str, Any]:
        size = len(json.dumps(json_patch(write)).encode())
        try:
            body = super().write_status(order, write, budget)
        except Conflict:
            self._count(f"{write.transition}_lost", size)
            raise
        self._count(f"{write.transition}_won", size)
        return body

    def _count(self, key: str, size: int) -> None:
        with self._lock:
            self.writes[key] += 1
            self.bytes[key] += size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--work-type", default="bench")
    parser.add_argument("--stats", required=True, type=Path)
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    agent = Agent(api_client(args.kubeconfig, pool=4), work_types=[args.work_type], namespace=args.namespace)
    counting = CountingWorkOrders(agent.orders)
    agent.orders = counting

    def handler(_claim: Claim) -> str:
        return "ok"

    print("started", flush=True)
    # In a thread, so the main thread stays free to receive the signal.
    runner = threading.Thread(target=agent.run, args=(handler,), kwargs={"stop": stop}, daemon=True)
    runner.start()
    while runner.is_alive() and not stop.wait(0.2):
        pass
    runner.join(15)
    args.stats.write_text(json.dumps({"writes": dict(counting.writes), "bytes": dict(counting.bytes)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
