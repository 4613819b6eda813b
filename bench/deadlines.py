"""Deadline precision and idle cost of the operator, on a local control plane it starts itself.

1. expiry: 1,000 claims whose deadlines fall in the same second; lateness of each expiry.
2. due:    1,000 retries due in the same second; lateness of each return to Pending.
3. idle:   10,000 orders (1 KB of content; half Pending, half Claimed with long timeouts), nothing
           due: the operator's CPU (share of one core) and RSS.

Lateness is measured from the deadline an agent would compute (claimedAt + claimTimeoutSeconds, or
nextRetryAfter) to the moment the benchmark's own watch sees the order Pending: it includes the
write and the watch delivery, not just the decision. Usage: python bench/deadlines.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client, watch

from workorder_operator import envtest, lifecycle
from workorder_operator.kube import WorkOrders, api_client
from workorder_operator.model import GROUP, PLURAL, VERSION, WorkOrder, utcnow
from workorder_operator.targeting import AgentIdentity

RESULTS = Path(__file__).parent / "results"
AGENT = AgentIdentity(str(uuid.uuid4()))


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values),
        "mean": statistics.fmean(values),
    }


class PendingWatch:
    """Records when each order of a namespace is first seen Pending after `arm(name)`."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.api, self.namespace = api, namespace
        self.armed: set[str] = set()
        self.seen: dict[str, dt.datetime] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def arm(self, name: str) -> None:
        self.armed.add(name)

    def _run(self) -> None:
        objects = client.CustomObjectsApi(self.api)
        while not self._stop:
            w = watch.Watch()
            for event in w.stream(
                objects.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL, timeout_seconds=60
            ):
                body = event["object"]
                name = body["metadata"]["name"]
                if name in self.armed and name not in self.seen and body.get("status", {}).get("phase") == "Pending":
                    self.seen[name] = utcnow()
                if self._stop:
                    w.stop()

    def wait(self, count: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        while len(self.seen) < count and time.monotonic() < end:
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop = True


def create(api: client.ApiClient, namespace: str, name: str, **spec: Any) -> WorkOrder:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "WorkOrder",
        "metadata": {"name": name},
        "spec": {"workType": "bench", "yamlContent": "x: 1\n", **spec},
    }
    created = client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    return WorkOrder.from_body(created)


def write(orders: WorkOrders, order: WorkOrder, fn: Callable[[WorkOrder], lifecycle.StatusWrite]) -> WorkOrder:
    for _ in range(10):  # the operator's initialise may race us: re-read and try again
        try:
            return WorkOrder.from_body(orders.write_status(order, fn(order)))
        except Exception:
            order = WorkOrder.from_body(orders.get(order.namespace, order.name))
    raise RuntimeError(f"cannot write {order.key}")


def bench_burst(
    api: client.ApiClient, namespace: str, n: int, lead: float, prepare: Callable[[WorkOrders, str, int], dt.datetime]
) -> dict[str, float]:
    """Prepare n orders whose deadlines fall within one second, `lead` seconds from now, and
    measure how late each is seen Pending. `prepare(orders, name, seconds_left)` returns the deadline."""
    orders = WorkOrders(api, "bench-agent")
    target = time.time() + lead
    pending = PendingWatch(api, namespace)
    deadlines: dict[str, dt.datetime] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        name = f"o-{i}"
        deadline = prepare(orders, name, math.ceil(target - time.time()))
        with lock:
            deadlines[name] = deadline
        pending.arm(name)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(n)))
    spread = (max(deadlines.values()) - min(deadlines.values())).total_seconds()
    pending.wait(n, timeout=lead + 60)
    pending.stop()
    late = [(pending.seen[k] - deadlines[k]).total_seconds() for k in deadlines if k in pending.seen]
    result = summary(late)
    result["deadline_spread_s"] = spread
    result["missed"] = n - len(late)
    return result


def claim_expiring(api: client.ApiClient, namespace: str) -> Callable[[WorkOrders, str, int], dt.datetime]:
    """A claim whose timeout makes it expire at the common target second."""

    def prepare(orders: WorkOrders, name: str, seconds: int) -> dt.datetime:
        order = create(api, namespace, name, claimTimeoutSeconds=seconds)
        claimed = write(orders, order, lambda o: lifecycle.claim(o, AGENT, utcnow()))
        return claimed.status.claimed_at + dt.timedelta(seconds=seconds)  # type: ignore[operator]

    return prepare


def retry_due(api: client.ApiClient, namespace: str) -> Callable[[WorkOrders, str, int], dt.datetime]:
    """A failed attempt whose backoff (capped by maxBackoffSeconds) ends at the common target second."""

    def prepare(orders: WorkOrders, name: str, seconds: int) -> dt.datetime:
        order = create(api, namespace, name, backoffSeconds=seconds, maxBackoffSeconds=seconds)
        claimed = write(orders, order, lambda o: lifecycle.claim(o, AGENT, utcnow()))
        failed = write(orders, claimed, lambda o: lifecycle.fail(o, AGENT.id, o.status.attempt, "bench", utcnow()))
        return failed.status.next_retry_after  # type: ignore[return-value]

    return prepare


def proc_usage(pid: int) -> tuple[float, float]:
    """(CPU seconds used so far, RSS in MB) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss_kb = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS")
    )
    return cpu, rss_kb / 1024


def bench_idle(api: client.ApiClient, namespace: str, n: int, operator_pid: int, window: float) -> dict[str, float]:
    orders = WorkOrders(api, "bench-agent")
    content = "payload: " + "x" * 1000 + "\n"

    def one(i: int) -> None:
        order = create(api, namespace, f"idle-{i}", yamlContent=content, claimTimeoutSeconds=86400)
        if i % 2:
            write(orders, order, lambda o: lifecycle.claim(o, AGENT, utcnow()))

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(n)))
    created_s = time.monotonic() - started
    # Let the operator finish initialising every order before measuring idleness.
    objects = client.CustomObjectsApi(api)
    while True:
        items = objects.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        if all("conditions" in (o.get("status") or {}) for o in items):
            break
        time.sleep(2)
    time.sleep(5)
    cpu0, _ = proc_usage(operator_pid)
    time.sleep(window)
    cpu1, rss = proc_usage(operator_pid)
    return {"orders": n, "create_s": created_s, "idle_cpu_pct_of_core": 100 * (cpu1 - cpu0) / window, "rss_mb": rss}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    burst, idle_n, window = (100, 1000, 10.0) if args.quick else (1000, 10000, 30.0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wo-bench-") as tmp:
        plane = envtest.ControlPlane(Path(tmp) / "cp")
        plane.start()
        op: subprocess.Popen[bytes] | None = None
        try:
            api = api_client(str(plane.kubeconfig), pool=32)
            envtest.install_crds(api, envtest.workorder_crds())
            core = client.CoreV1Api(api)
            for ns in ("expiry", "due", "idle"):
                core.create_namespace({"metadata": {"name": ns}})
            log = open(Path(tmp) / "operator.log", "wb")  # noqa: SIM115
            op = subprocess.Popen(
                [sys.executable, "-m", "workorder_operator.main", "--kubeconfig", str(plane.kubeconfig), "-A"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            time.sleep(3)
            results: dict[str, Any] = {"date": utcnow().isoformat(), "machine": f"{os.cpu_count()} cores"}
            print(f"expiry: {burst} claims expiring within one second ...", flush=True)
            results["expiry"] = bench_burst(api, "expiry", burst, max(20.0, burst / 25), claim_expiring(api, "expiry"))
            print(f"due: {burst} retries due within one second ...", flush=True)
            results["due"] = bench_burst(api, "due", burst, max(25.0, burst / 15), retry_due(api, "due"))
            print(f"idle: {idle_n} orders, nothing due ...", flush=True)
            results["idle"] = bench_idle(api, "idle", idle_n, op.pid, window)
        finally:
            if op is not None:
                op.terminate()
                op.wait(20)
            plane.stop()
    out = RESULTS / "deadlines.json"
    out.write_text(json.dumps(results, indent=2))
    print()
    print(f"{'deadline lateness (s)':<24}{'n':>6}{'p50':>9}{'p99':>9}{'max':>9}  target p99 <= 0.5")
    for key in ("expiry", "due"):
        r = results[key]
        print(f"{key:<24}{r['n']:>6}{r['p50']:>9.3f}{r['p99']:>9.3f}{r['max']:>9.3f}  missed {r['missed']}")
    idle = results["idle"]
    print(
        f"idle at {idle['orders']} orders: CPU {idle['idle_cpu_pct_of_core']:.2f}% of a core (target < 2%), "
        f"RSS {idle['rss_mb']:.0f} MB (target < 300 MB)"
    )
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
