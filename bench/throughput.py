"""End-to-end throughput: work orders per second from create to Completed, against the ceiling.

For K = 1, 4 and 16 (2,000 orders each; --quick: 200), with the operator running:

- end to end: K SDK agents (`Agent.run(handler -> "ok", concurrency=1)`, each in its own thread
  with its own API client) take orders that a separate creator pool of K threads creates. Measured
  from the first create to the moment our own watch (field selector status.phase=Completed) sees
  the last order Completed.
- ceiling: the same kind of client doing only the API writes one order needs (create, the claim
  patch and the complete patch on the create's answer: `lifecycle.claim`/`complete` through
  `WorkOrders.write_status`; no watch, no operator work needed), as fast as it can with K threads.

The ratio end-to-end / ceiling says how much of what the API server can do the queue delivers
(target >= 0.7 at K = 16). Both halves run in the same run on the same control plane, K by K.

Usage: python bench/throughput.py [--quick]
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Any

from common import (
    Cluster,
    CountingWorkOrders,
    CpuMeter,
    Headline,
    Operator,
    PhaseWatch,
    control_plane,
    create_order,
    list_orders,
    log,
    main_of,
    new_figure,
    operator,
    run_all,
    summary,
    table,
    thread_pool,
    write_results,
)
from kubernetes import client

from workorder_operator import lifecycle
from workorder_operator.agent import Agent, Claim
from workorder_operator.kube import WorkOrders
from workorder_operator.model import GROUP, PLURAL, VERSION, WorkOrder, utcnow
from workorder_operator.targeting import AgentIdentity

NAME = "throughput"
KS = (1, 4, 16)
TARGET_RATIO = 0.7
TARGET_K = 16


def ceiling(cluster: Cluster, op: Operator, namespace: str, n: int, k: int) -> dict[str, Any]:
    """create -> claim -> complete per order, K threads, each with its own client."""
    identity = AgentIdentity(str(uuid.uuid4()))
    clients = [WorkOrders(cluster.client(pool=2), "bench-ceiling") for _ in range(k)]
    indexes = itertools.count()
    latencies: list[float] = []

    def worker(w: int) -> None:
        orders = clients[w]
        while (i := next(indexes)) < n:
            began = time.monotonic()
            order = create_order(orders.api, namespace, f"c-{i}")
            order = WorkOrder.from_body(orders.write_status(order, lifecycle.claim(order, identity, utcnow())))
            orders.write_status(order, lifecycle.complete(order, identity.id, order.status.attempt, "ok", utcnow()))
            latencies.append(time.monotonic() - began)

    cpu = CpuMeter(cluster, op)
    started = time.monotonic()
    with thread_pool(k, "ceiling") as pool:
        run_all(pool, worker, k)
    seconds = time.monotonic() - started
    return {
        "orders": n,
        "seconds": seconds,
        "orders_per_s": n / seconds,
        "order_latency_s": summary(latencies),
        "cores_used": cpu.stop(),
    }


def end_to_end(cluster: Cluster, op: Operator, namespace: str, n: int, k: int) -> dict[str, Any]:
    """K SDK agents, a creator pool of K, the operator running; first create to last Completed."""
    stop = threading.Event()
    writes: Counter[str] = Counter()
    lock = threading.Lock()

    def on_write(transition: str, _order: WorkOrder, won: bool) -> None:
        with lock:
            writes[f"{transition}_{'won' if won else 'lost'}"] += 1

    def handler(_claim: Claim) -> str:
        return "ok"

    threads = []
    for a in range(k):
        agent = Agent(cluster.client(pool=4), work_types=["bench"], namespace=namespace)
        agent.orders = CountingWorkOrders(agent.api, agent.orders.field_manager, on_write)
        thread = threading.Thread(
            target=agent.run, args=(handler,), kwargs={"concurrency": 1, "stop": stop}, name=f"agent-{a}", daemon=True
        )
        threads.append(thread)
    completed = PhaseWatch(cluster.api, namespace, "Completed")
    created_at: dict[str, float] = {}
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # the agents list and start their watches (not measured)
        creator = cluster.client(pool=k)
        cpu = CpuMeter(cluster, op)

        def create(i: int) -> None:
            name = f"e-{i}"
            created_at[name] = time.time()
            create_order(creator, namespace, name)

        started = time.time()
        with thread_pool(k, "creator") as pool:
            run_all(pool, create, n)
        created_s = time.time() - started
        finished = completed.wait(n, timeout=120 + n * 0.6, on_progress=op.check_alive)
        cores = cpu.stop()
        _, rss = op.usage()
    finally:
        stop.set()
        completed.stop()
    for thread in threads:
        thread.join(15)
    if not finished:
        raise RuntimeError(f"e2e K={k}: only {completed.count()} of {n} orders Completed in time")
    seconds = max(completed.seen.values()) - started
    claims = writes["claim_won"] + writes["claim_lost"]
    return {
        "orders": n,
        "seconds": seconds,
        "orders_per_s": n / seconds,
        "create_seconds": created_s,
        "create_to_completed_s": summary([completed.seen[name] - t for name, t in created_at.items()]),
        "claim_attempts": claims,
        "claim_conflict_rate": writes["claim_lost"] / claims if claims else 0.0,
        "writes": dict(writes),
        "cores_used": cores,
        "operator_rss_mb": rss,
    }


def clean(cluster: Cluster, op: Operator, namespaces: list[str]) -> None:
    """Delete every order so the next K starts from an empty store (and an idle operator)."""
    objects = client.CustomObjectsApi(cluster.api)
    for ns in namespaces:
        objects.delete_collection_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        left = sum(len(list_orders(cluster.api, ns)) for ns in namespaces)
        if left == 0 and op.metrics().sum("workorder_orders") == 0:
            return
        time.sleep(0.5)
    raise RuntimeError("orders not deleted after 120s")


def run(quick: bool) -> dict[str, Any]:
    n = 200 if quick else 2000
    per_k: dict[str, Any] = {}
    with control_plane(NAME) as cluster, operator(cluster, NAME) as op:
        for k in KS:
            ce_ns, e2e_ns = cluster.namespace(f"ceiling-k{k}"), cluster.namespace(f"e2e-k{k}")
            log(f"K={k}: ceiling, {n} orders (create, claim, complete) ...")
            ceil = ceiling(cluster, op, ce_ns, n, k)
            log(f"K={k}: {ceil['orders_per_s']:.1f} orders/s; end to end with {k} agents ...")
            e2e = end_to_end(cluster, op, e2e_ns, n, k)
            log(f"K={k}: {e2e['orders_per_s']:.1f} orders/s, ratio {e2e['orders_per_s'] / ceil['orders_per_s']:.2f}")
            per_k[str(k)] = {"ceiling": ceil, "e2e": e2e, "ratio": e2e["orders_per_s"] / ceil["orders_per_s"]}
            clean(cluster, op, [ce_ns, e2e_ns])
    table(
        f"throughput, {n} orders per K (orders/s)",
        ["K", "e2e", "ceiling", "ratio", "e2e p50 s", "e2e p99 s", "claim conflicts"],
        [
            [
                k, r["e2e"]["orders_per_s"], r["ceiling"]["orders_per_s"], f"{r['ratio']:.2f}",
                r["e2e"]["create_to_completed_s"]["p50"], r["e2e"]["create_to_completed_s"]["p99"],
                f"{100 * r['e2e']['claim_conflict_rate']:.0f}%",
            ]
            for k, r in per_k.items()
        ],
    )  # fmt: skip
    parts = ["operator", "kube-apiserver", "etcd", "bench", "machine"]
    table(
        "cores used (machine: every process, other test runs included)",
        ["run", *parts],
        [
            [f"{half} K={k}", *(f"{r[half]['cores_used'].get(p, 0):.2f}" for p in parts)]
            for k, r in per_k.items()
            for half in ("ceiling", "e2e")
        ],
    )
    headlines = []
    for key, r in per_k.items():
        headlines.append(Headline(f"e2e orders/s, K={key}", r["e2e"]["orders_per_s"], "/s"))
        headlines.append(Headline(f"ceiling orders/s, K={key}", r["ceiling"]["orders_per_s"], "/s"))
        target = int(key) == TARGET_K
        headlines.append(
            Headline(
                f"e2e / ceiling, K={key}", r["ratio"], "", f">= {TARGET_RATIO}" if target else "",
                r["ratio"] >= TARGET_RATIO if target else None,
            )
        )  # fmt: skip
    return write_results(NAME, quick, {"orders_per_k": n, "per_k": per_k}, headlines, chart(per_k, n))


def chart(per_k: dict[str, Any], n: int) -> Any:
    fig, (ax,) = new_figure(width=7)
    ks = list(per_k)
    x = range(len(ks))
    e2e = [per_k[k]["e2e"]["orders_per_s"] for k in ks]
    ceil = [per_k[k]["ceiling"]["orders_per_s"] for k in ks]
    ax.bar([i - 0.2 for i in x], e2e, 0.4, label="end to end (agents + operator)", color="tab:blue")
    ax.bar([i + 0.2 for i in x], ceil, 0.4, label="ceiling (create + claim + complete writes)", color="tab:gray")
    for i in x:
        for dx, value in ((-0.2, e2e[i]), (0.2, ceil[i])):
            ax.annotate(f"{value:.0f}", (i + dx, value), textcoords="offset points", xytext=(0, 2), ha="center",
                        fontsize=8)  # fmt: skip
    for i, k in enumerate(ks):
        ax.annotate(
            f"{per_k[k]['ratio']:.2f}x", (i, max(e2e[i], ceil[i])), textcoords="offset points", xytext=(0, 14),
            ha="center", fontweight="bold", color="tab:green" if per_k[k]["ratio"] >= TARGET_RATIO else "tab:red",
        )  # fmt: skip
    ax.set_xticks(list(x), [f"K = {k}" for k in ks])
    ax.set_ylabel("work orders per second")
    ax.set_title(f"{n} orders per K; e2e/ceiling ratio annotated (target >= {TARGET_RATIO} at K = {TARGET_K})")
    ax.set_ylim(0, max(e2e + ceil) * 1.2)
    ax.legend(loc="upper left")
    return fig


def main() -> int:
    return main_of(run, __doc__.split("\n")[0], "200 orders per K instead of 2,000")


if __name__ == "__main__":
    sys.exit(main())
