"""Throughput and the cost of one completed order, ours against the minimal protocol.

For K = 1, 4 and 16 (2,000 orders each; --quick: 200; --orders N), in one run on one control plane:

- minimal: the protocol's floor. K threads of a plain client each create an order, claim it and
  complete it with the contract's smallest JSON patches (CONTRACT.md, "Writing an agent in any
  language": test uid, phase, attempt (claimedBy); set the transition's fields). Nothing watches
  its namespace but the benchmark's own Completed watch; the operator does not watch it.
- ours: K SDK agents, each its own process (bench/bench_agent.py: `Agent.run`, handler returning
  "ok", concurrency 1), take orders that a creator pool of K threads creates, with the operator
  watching their namespace (conditions, events, deadlines). From the first create to the moment
  the benchmark's Completed watch (field selector status.phase=Completed) sees the last one.

Per completed order, for both: API requests by verb and resource (the API server's own /metrics,
`apiserver_request_total`, before and after), watch events the API server sent, CPU milliseconds
of kube-apiserver, etcd, the operator, the agents and the benchmark process (/proc), bytes of
each status-write request body, and the claim conflict rate (lost claim CAS / all claim CAS).
Targets: API-server CPU per completed order at K = 16 within 1.25x of the minimal protocol's, and
at most 3.3 requests per completed order. Also orders/s and ours / minimal.

Usage: python bench/throughput.py [--quick] [--orders N]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import (
    RESULTS,
    Cluster,
    CpuMeter,
    Headline,
    Metrics,
    Operator,
    PhaseWatch,
    apiserver_metrics,
    bench_order,
    control_plane,
    list_orders,
    log,
    main_of,
    metric_delta,
    new_figure,
    operator,
    proc_usage,
    run_all,
    summary,
    table,
    thread_pool,
    write_results,
)
from kubernetes import client

from workorder_operator.kube import WorkOrders
from workorder_operator.model import GROUP, PLURAL, VERSION, format_time, utcnow

NAME = "throughput"
KS = (1, 4, 16)
TARGET_K = 16
TARGET_CPU_RATIO = 1.25
TARGET_REQUESTS = 3.3
TARGET_RATIO = 0.7
QUEUE_NS, MINIMAL_NS = "queue", "minimal"
# What the queue itself asks of the API server; other resources (the controller manager's leases,
# ...) are background, reported apart.
QUEUE_RESOURCES = ("workorders", "events")
# A phase's window ends once the operator has been idle (at most IDLE_CPU_S of CPU) this long.
SETTLE_S = 1.5
IDLE_CPU_S = 0.02
AGENT = Path(__file__).resolve().parent / "bench_agent.py"


# --- measuring one phase ------------------------------------------------------------------------


class Window:
    """API-server metrics and CPU of every part over one measured phase."""

    def __init__(self, cluster: Cluster, op: Operator, agents: Sequence[subprocess.Popen[bytes]] = ()) -> None:
        self.cluster, self.op, self.agents = cluster, op, list(agents)
        self.before = apiserver_metrics(cluster)
        self.agents_cpu = self._agents_cpu()
        self.cpu = CpuMeter(cluster, op)

    def _agents_cpu(self) -> float:
        total = 0.0
        for proc in self.agents:
            with contextlib.suppress(OSError):
                total += proc_usage(proc.pid)[0]
        return total

    def close(self, completed: int) -> dict[str, Any]:
        """Per completed order: requests, watch events, CPU ms of each part. Waits (at most 30 s)
        until the operator is idle: it posts its events after the fact. Scrapes of the API
        server's /metrics (about 45 ms of its CPU each) stay outside the measured window."""
        samples = [(time.monotonic(), self.op.usage()[0])]
        while samples[-1][0] - samples[0][0] < 30:
            time.sleep(0.5)
            samples.append((time.monotonic(), self.op.usage()[0]))
            recent = [cpu for t, cpu in samples if t >= samples[-1][0] - SETTLE_S]
            if samples[-1][0] - samples[0][0] >= SETTLE_S and recent[-1] - recent[0] <= IDLE_CPU_S:
                break
        wall = self.cpu.stop()
        agents_s = self._agents_cpu() - self.agents_cpu
        return cost(self.before, apiserver_metrics(self.cluster), wall, agents_s, completed)


def cost(before: Metrics, after: Metrics, cores: dict[str, float], agents_s: float, n: int) -> dict[str, Any]:
    requests = metric_delta(before, after, "apiserver_request_total", "verb", "resource", "subresource", "code")
    by_call: Counter[str] = Counter()
    by_code: Counter[str] = Counter()
    background = 0.0
    for (verb, resource, sub, code), count in requests.items():
        if resource not in QUEUE_RESOURCES:
            background += count
            continue
        by_call[f"{verb} {resource}{'/' + sub if sub else ''}"] += int(count)
        by_code[f"{verb} {resource}{'/' + sub if sub else ''} {code}"] += int(count)
    watch_by_resource = metric_delta(before, after, "apiserver_watch_events_total", "resource")
    watch_events = sum(watch_by_resource.values())
    watch_bytes = sum(metric_delta(before, after, "apiserver_watch_events_sizes_sum", "resource").values())
    wall = cores["wall_s"]
    cpu_ms = {part: 1000 * cores.get(part, 0.0) * wall / n for part in ("kube-apiserver", "etcd", "operator", "bench")}
    cpu_ms["agents"] = 1000 * agents_s / n
    return {
        "requests_per_order": sum(by_call.values()) / n,
        "requests_by_call": {k: v / n for k, v in sorted(by_call.items())},
        "requests_by_call_and_code": dict(sorted(by_code.items())),
        "background_requests": background,
        "watch_events_per_order": watch_events / n,
        "watch_events_by_resource": {r: v / n for (r,), v in watch_by_resource.items()},
        "watch_bytes_per_order": watch_bytes / n,
        "cpu_ms_per_order": cpu_ms,
        "cores_used": cores,
    }


# --- the minimal protocol -----------------------------------------------------------------------


def minimal_patches(uid: str, agent: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The contract's smallest claim and complete (CONTRACT.md, an agent in any language)."""
    now = format_time(utcnow())
    claim = [
        {"op": "test", "path": "/metadata/uid", "value": uid},
        {"op": "test", "path": "/status/phase", "value": "Pending"},
        {"op": "test", "path": "/status/attempt", "value": 0},
        {"op": "replace", "path": "/status/phase", "value": "Claimed"},
        {"op": "add", "path": "/status/claimedBy", "value": agent},
        {"op": "add", "path": "/status/claimedAt", "value": now},
        {"op": "replace", "path": "/status/attempt", "value": 1},
    ]
    complete = [
        {"op": "test", "path": "/metadata/uid", "value": uid},
        {"op": "test", "path": "/status/phase", "value": "Claimed"},
        {"op": "test", "path": "/status/claimedBy", "value": agent},
        {"op": "test", "path": "/status/attempt", "value": 1},
        {"op": "replace", "path": "/status/phase", "value": "Completed"},
        {"op": "add", "path": "/status/completedAt", "value": now},
        {"op": "add", "path": "/status/result", "value": "ok"},
    ]
    return claim, complete


def minimal(cluster: Cluster, op: Operator, n: int, k: int) -> dict[str, Any]:
    """create -> claim -> complete per order by a plain client, K threads with a client each."""
    agent = str(uuid.uuid4())
    clients = [cluster.client(pool=2) for _ in range(k)]
    indexes = itertools.count()
    status_bytes: list[int] = []
    completed = PhaseWatch(cluster.api, MINIMAL_NS, "Completed")
    created_at: dict[str, float] = {}

    def worker(w: int) -> None:
        objects = client.CustomObjectsApi(clients[w])
        orders = WorkOrders(clients[w], "bench-minimal")
        while (i := next(indexes)) < n:
            name = f"m-{k}-{i}"
            created_at[name] = time.time()
            uid = orders.create(bench_order(name), MINIMAL_NS)["metadata"]["uid"]
            for patch in minimal_patches(uid, agent):
                status_bytes.append(len(json.dumps(patch).encode()))
                objects.patch_namespaced_custom_object_status(
                    GROUP, VERSION, MINIMAL_NS, PLURAL, name, patch, _content_type="application/json-patch+json"
                )

    try:
        window = Window(cluster, op)
        started = time.time()
        with thread_pool(k, "minimal") as pool:
            run_all(pool, worker, k)
        if not completed.wait(n, timeout=60):
            raise RuntimeError(f"minimal K={k}: the watch saw only {completed.count()} of {n} Completed")
        seconds = max(completed.seen.values()) - started
        measured = window.close(n)
    finally:
        completed.stop()
    return {
        "orders": n,
        "seconds": seconds,
        "orders_per_s": n / seconds,
        "create_to_completed_s": summary([completed.seen[name] - t for name, t in created_at.items()]),
        "claim_conflict_rate": 0.0,
        "bytes_per_status_write": sum(status_bytes) / len(status_bytes),
        **measured,
    }


# --- ours: agents as processes, the operator watching -------------------------------------------


def start_agents(cluster: Cluster, k: int, namespace: str = QUEUE_NS) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """K agent processes (bench/bench_agent.py) taking orders in `namespace`."""
    agents = []
    for a in range(k):
        stats = cluster.directory / f"agent-k{k}-{a}.json"
        with open(cluster.directory / f"agent-k{k}-{a}.log", "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, str(AGENT), "--kubeconfig", cluster.kubeconfig, "--namespace", namespace,
                 "--stats", str(stats)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        agents.append((proc, stats))
    return agents


def stop_agents(agents: list[tuple[subprocess.Popen[bytes], Path]]) -> tuple[Counter[str], Counter[str]]:
    """SIGTERM each (it releases nothing: all are idle), then collect their write counts."""
    for proc, _ in agents:
        if proc.poll() is None:
            proc.terminate()
    writes: Counter[str] = Counter()
    size: Counter[str] = Counter()
    for proc, stats in agents:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(stats.read_text())
            writes.update(data["writes"])
            size.update(data["bytes"])
    return writes, size


def watches(cluster: Cluster) -> float:
    """WorkOrder watches open at the API server now."""
    return apiserver_metrics(cluster).sum("apiserver_longrunning_requests", resource="workorders", verb="WATCH")


def profile_apiserver(cluster: Cluster, seconds: int, out: Path) -> threading.Thread:
    """A CPU profile of kube-apiserver (its /debug/pprof) over the next `seconds`, in the background;
    `go tool pprof -top OUT` reads it."""

    def take() -> None:
        try:
            resp = cluster.api.rest_client.request(
                "GET", f"{cluster.api.configuration.host}/debug/pprof/profile?seconds={seconds}",
                _request_timeout=(5, seconds + 30),
            )  # fmt: skip
            resp.read()
            out.write_bytes(resp.data)
        except Exception as exc:  # a profile is a bonus: never fail the run for it
            log(f"API-server profile failed: {exc}")

    thread = threading.Thread(target=take, name="pprof", daemon=True)
    thread.start()
    return thread


def ours(cluster: Cluster, op: Operator, n: int, k: int, profile: int = 0) -> dict[str, Any]:
    """K agent processes, a creator pool of K threads, the operator running. `profile`: take a
    CPU profile of the API server over that many seconds from the first create."""
    open_before = watches(cluster)
    agents = start_agents(cluster, k)
    completed = PhaseWatch(cluster.api, QUEUE_NS, "Completed")
    created_at: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 120
        while watches(cluster) < open_before + k + 1:  # each agent's watch, and the benchmark's
            if time.monotonic() > deadline or any(p.poll() is not None for p, _ in agents):
                raise RuntimeError(f"K={k}: the agents did not all start watching; logs in {cluster.directory}")
            time.sleep(0.2)
        creator = cluster.client(pool=k)
        orders = WorkOrders(creator, "bench")
        window = Window(cluster, op, [p for p, _ in agents])

        def create(i: int) -> None:
            name = f"e-{k}-{i}"
            created_at[name] = time.time()
            orders.create(bench_order(name), QUEUE_NS)

        profiling = profile_apiserver(cluster, profile, RESULTS / f"{NAME}-apiserver-k{k}.pprof") if profile else None
        started = time.time()
        with thread_pool(k, "creator") as pool:
            run_all(pool, create, n)

        def alive() -> None:
            op.check_alive()
            if any(p.poll() is not None for p, _ in agents):
                raise RuntimeError(f"K={k}: an agent exited; logs in {cluster.directory}")

        if not completed.wait(n, timeout=120 + n * 0.6, on_progress=alive):
            raise RuntimeError(f"ours K={k}: only {completed.count()} of {n} orders Completed in time")
        seconds = max(completed.seen.values()) - started
        measured = window.close(n)
        _, rss = op.usage()
        if profiling is not None:
            profiling.join()
    finally:
        completed.stop()
        writes, size = stop_agents(agents)
    claims = writes["claim_won"] + writes["claim_lost"]
    status_writes = sum(writes.values())
    return {
        "orders": n,
        "seconds": seconds,
        "orders_per_s": n / seconds,
        "create_to_completed_s": summary([completed.seen[name] - t for name, t in created_at.items()]),
        "claim_attempts": claims,
        "claim_conflict_rate": writes["claim_lost"] / claims if claims else 0.0,
        "agent_writes": dict(writes),
        "bytes_per_status_write": sum(size.values()) / status_writes if status_writes else 0.0,
        "bytes_by_transition": {key: size[key] / writes[key] for key in writes if writes[key]},
        "operator_rss_mb": rss,
        **measured,
    }


def clean(cluster: Cluster, op: Operator) -> None:
    """Delete every order so the next K starts from an empty store (and an idle operator)."""
    objects = client.CustomObjectsApi(cluster.api)
    for ns in (QUEUE_NS, MINIMAL_NS):
        objects.delete_collection_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        left = sum(len(list_orders(cluster.api, ns)) for ns in (QUEUE_NS, MINIMAL_NS))
        if left == 0 and op.metrics().sum("workorder_orders") == 0:
            return
        time.sleep(0.5)
    raise RuntimeError("orders not deleted after 120s")


# --- the run ------------------------------------------------------------------------------------


def run(quick: bool, orders: int | None = None, profile: int = 0) -> dict[str, Any]:
    """`orders`: per K (default 2,000, quick 200); `profile`: seconds of API-server CPU profile
    to take from the start of each of our runs (bench/results/throughput-apiserver-kK.pprof)."""
    n = orders or (200 if quick else 2000)
    per_k: dict[str, Any] = {}
    with control_plane(NAME) as cluster:
        cluster.namespace(QUEUE_NS)
        cluster.namespace(MINIMAL_NS)
        with operator(cluster, NAME, namespaces=[QUEUE_NS]) as op:
            for k in KS:
                log(f"K={k}: minimal protocol, {n} orders (create, claim, complete by a plain client) ...")
                floor = minimal(cluster, op, n, k)
                log(f"K={k}: {floor['orders_per_s']:.1f} orders/s; ours with {k} agent processes ...")
                ours_k = ours(cluster, op, n, k, profile)
                ratio = ours_k["orders_per_s"] / floor["orders_per_s"]
                log(f"K={k}: {ours_k['orders_per_s']:.1f} orders/s, ratio {ratio:.2f}")
                per_k[str(k)] = {"minimal": floor, "ours": ours_k, "ratio": ratio}
                clean(cluster, op)
    report(per_k, n)
    return write_results(NAME, quick, {"orders_per_k": n, "per_k": per_k}, headlines(per_k), chart(per_k, n))


def _cpu(r: dict[str, Any], part: str) -> float:
    return float(r["cpu_ms_per_order"][part])


def report(per_k: dict[str, Any], n: int) -> None:
    table(
        f"throughput, {n} orders per K",
        ["K", "ours /s", "minimal /s", "ratio", "ours p50 s", "ours p99 s", "claim conflicts"],
        [
            [
                k, r["ours"]["orders_per_s"], r["minimal"]["orders_per_s"], f"{r['ratio']:.2f}",
                r["ours"]["create_to_completed_s"]["p50"], r["ours"]["create_to_completed_s"]["p99"],
                f"{100 * r['ours']['claim_conflict_rate']:.0f}%",
            ]
            for k, r in per_k.items()
        ],
    )  # fmt: skip
    parts = ["kube-apiserver", "etcd", "operator", "agents", "bench"]
    table(
        "cost per completed order (CPU ms; requests and watch events at the API server; status-write bytes)",
        ["run", *parts, "requests", "watch events", "write bytes"],
        [
            [f"{half} K={k}", *(f"{_cpu(r[half], p):.1f}" for p in parts), f"{r[half]['requests_per_order']:.2f}",
             f"{r[half]['watch_events_per_order']:.1f}", f"{r[half]['bytes_per_status_write']:.0f}"]
            for k, r in per_k.items()
            for half in ("minimal", "ours")
        ],
    )  # fmt: skip
    calls = sorted({c for r in per_k.values() for half in ("minimal", "ours") for c in r[half]["requests_by_call"]})
    table(
        "requests per completed order, by call",
        ["call", *(f"{half} K={k}" for k in per_k for half in ("minimal", "ours"))],
        [
            [c, *(f"{r[h]['requests_by_call'].get(c, 0):.2f}" for r in per_k.values() for h in ("minimal", "ours"))]
            for c in calls
        ],
    )  # fmt: skip


def headlines(per_k: dict[str, Any]) -> list[Headline]:
    out = []
    for key, r in per_k.items():
        target = int(key) == TARGET_K
        cpu_ratio = _cpu(r["ours"], "kube-apiserver") / _cpu(r["minimal"], "kube-apiserver")
        requests = r["ours"]["requests_per_order"]
        out += [
            Headline(
                f"API-server CPU ms per order, ours / minimal, K={key}",
                f"{_cpu(r['ours'], 'kube-apiserver'):.1f} / {_cpu(r['minimal'], 'kube-apiserver'):.1f} "
                f"= {cpu_ratio:.2f}x", "", f"<= {TARGET_CPU_RATIO}x" if target else "",
                cpu_ratio <= TARGET_CPU_RATIO if target else None,
            ),
            Headline(
                f"API requests per order, ours (minimal), K={key}",
                f"{requests:.2f} ({r['minimal']['requests_per_order']:.2f})", "",
                f"<= {TARGET_REQUESTS}" if target else "", requests <= TARGET_REQUESTS if target else None,
            ),
            Headline(f"claim conflict rate, K={key}", 100 * r["ours"]["claim_conflict_rate"], "%"),
            Headline(
                f"orders/s ours / minimal, K={key}",
                f"{r['ours']['orders_per_s']:.1f} / {r['minimal']['orders_per_s']:.1f} = {r['ratio']:.2f}", "",
                f">= {TARGET_RATIO}" if target else "", r["ratio"] >= TARGET_RATIO if target else None,
            ),
        ]  # fmt: skip
    return out


def chart(per_k: dict[str, Any], n: int) -> Any:
    fig, (cpu_ax, req_ax) = new_figure(ncols=2, width=6.5)
    ks = list(per_k)
    x = range(len(ks))
    for ax, title, value in (
        (cpu_ax, "API-server CPU ms per completed order", lambda r: _cpu(r, "kube-apiserver")),
        (req_ax, "API requests per completed order", lambda r: r["requests_per_order"]),
    ):
        ours_v = [value(per_k[k]["ours"]) for k in ks]
        floor_v = [value(per_k[k]["minimal"]) for k in ks]
        ax.bar([i - 0.2 for i in x], ours_v, 0.4, label="ours (SDK agents + operator)", color="tab:blue")
        ax.bar([i + 0.2 for i in x], floor_v, 0.4, label="minimal protocol (create, claim, complete)", color="tab:gray")
        for i in x:
            for dx, v in ((-0.2, ours_v[i]), (0.2, floor_v[i])):
                ax.annotate(f"{v:.1f}", (i + dx, v), textcoords="offset points", xytext=(0, 2), ha="center",
                            fontsize=8)  # fmt: skip
        ax.set_xticks(list(x), [f"K = {k}" for k in ks])
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, max(ours_v + floor_v) * 1.25)
        ax.legend(loc="upper left", fontsize=8)
    req_ax.axhline(TARGET_REQUESTS, color="tab:red", linestyle=":", linewidth=1)
    cpu_ax.set_ylabel(f"per completed order ({n} orders per K)")
    return fig


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--orders", type=int, help="orders per K")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="S",
        help="take an S-second CPU profile of kube-apiserver during each of our runs (go tool pprof -top FILE)",
    )  # fmt: skip


def main() -> int:
    return main_of(lambda args: run(args.quick, args.orders, args.profile), __doc__.split("\n")[0],
                   "200 orders per K instead of 2,000", options)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
