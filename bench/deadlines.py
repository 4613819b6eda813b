"""Deadline precision of the operator under a burst, against the API server's own ceiling.

1. expiry:    1,000 claims whose deadlines fall within the same second (--quick: 100).
2. due:       1,000 retries due within the same second (--quick: 100).
   The orders are created first, each with a timeout (backoff) from a range of whole seconds;
   then each one's clock (the claim, or the failure) is started at the planned moment that puts
   its deadline at a spread-out fraction of the same target second.
3. reference: the same number of plain status compare-and-swaps (the shape of the operator's
              expire write: test uid and resourceVersion, then set the status; Claimed -> Pending) issued all at
              once by one client with the operator's concurrency (32 threads). What the API server
              can do with such a burst: compare the lateness of 1 and 2 with it.

Lateness is measured from the deadline an agent would compute (claimedAt + claimTimeoutSeconds,
or nextRetryAfter) to the moment the benchmark's own watch sees the order Pending: it includes
the operator's write and the watch delivery, not just its decision. For the reference, the
"deadline" is the moment the burst starts. Target: p99 <= 0.5 s.

With --low-load, instead: precision when the server is not the limit. 100 claim expiries and 100
due retries spread over 100 s (--quick: 20 over 20 s), and at the same time one idle SDK agent
process picking up 100 orders created one by one over the same 100 s: p99 lateness (target
<= 0.1 s) and pickup latency, create sent -> our watch sees it Claimed (targets p50 <= 0.05 s,
p99 <= 0.2 s). Results in deadlines-lowload.json/png.

Usage: python bench/deadlines.py [--quick] [--low-load]
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import (
    Cluster,
    CpuMeter,
    Headline,
    Operator,
    PhaseWatch,
    bench_order,
    cas,
    control_plane,
    create_order,
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
from throughput import start_agents, stop_agents, watches

from workorder_operator import lifecycle
from workorder_operator.kube import WorkOrders
from workorder_operator.model import WorkOrder, utcnow
from workorder_operator.targeting import AgentIdentity

NAME = "deadlines"
LOW_LOAD = "deadlines-lowload"
TARGET_P99 = 0.5
LOW_LOAD_P99 = 0.1
PICKUP_P50, PICKUP_P99 = 0.05, 0.2
# At low load the first clocks start only after the preparation's own writes are digested (the
# operator initialises the prepared orders 5 s after their creation): otherwise the first
# deadlines measure that burst, not low load.
LOW_LOAD_SETTLE_S = 10.0
OPERATOR_CONCURRENCY = 32  # the operator's default --concurrency
PREPARE_THREADS = 16
AGENT = AgentIdentity(str(uuid.uuid4()))

# Timeouts and backoffs are whole seconds and their clock starts when the claim (or the failure)
# is written. So each order gets a timeout from a range of seconds, and its clock is started at
# the planned moment `target + fraction - seconds`: every deadline lands in [target, target + 1 s)
# (plus one write's latency), whatever the time it took to create the orders.
ARM_PER_SECOND = 40  # clocks started per second: well within what even a busy server answers
MIN_SECONDS = 3


@dataclass
class Kind:
    """How to prepare an order whose deadline is `seconds` after its clock starts (`setup`),
    and the write that starts the clock (`arm`), returning the order and its deadline."""

    setup: Callable[[WorkOrders, str, str, int], WorkOrder]
    arm: Callable[[WorkOrders, WorkOrder], tuple[WorkOrder, dt.datetime]]


def _expiry_setup(orders: WorkOrders, namespace: str, name: str, seconds: int) -> WorkOrder:
    return create_order(orders.api, namespace, name, claimTimeoutSeconds=seconds)


def _expiry_arm(orders: WorkOrders, order: WorkOrder) -> tuple[WorkOrder, dt.datetime]:
    """The claim: it expires claimTimeoutSeconds after claimedAt."""
    claimed = cas(orders, order, lambda o: lifecycle.claim(o, AGENT, utcnow()))
    assert claimed.status.claimed_at is not None
    return claimed, claimed.status.claimed_at + dt.timedelta(seconds=claimed.spec.claim_timeout_seconds)


def _due_setup(orders: WorkOrders, namespace: str, name: str, seconds: int) -> WorkOrder:
    order = create_order(orders.api, namespace, name, backoffSeconds=seconds, maxBackoffSeconds=seconds)
    return cas(orders, order, lambda o: lifecycle.claim(o, AGENT, utcnow()))


def _due_arm(orders: WorkOrders, order: WorkOrder) -> tuple[WorkOrder, dt.datetime]:
    """The failure: retry 1 is due after the backoff (capped by maxBackoffSeconds to `seconds`)."""
    failed = cas(orders, order, lambda o: lifecycle.fail(o, AGENT.id, o.status.attempt, "bench", utcnow()))
    assert failed.status.next_retry_after is not None
    return failed, failed.status.next_retry_after


EXPIRY = Kind(_expiry_setup, _expiry_arm)
DUE = Kind(_due_setup, _due_arm)


def burst(
    cluster: Cluster, op: Operator, namespace: str, n: int, kind: Kind, spread: float = 1.0, settle: float = 0.0
) -> dict[str, Any]:
    """Prepare n orders whose deadlines fall within one second (`spread`: that many seconds) and
    measure how late our watch sees each of them Pending. `settle`: seconds more between the
    preparation and the first clock started."""
    orders = WorkOrders(cluster.client(pool=PREPARE_THREADS), "bench-agent")
    window = max(2, math.ceil(n / ARM_PER_SECOND))
    seconds = [MIN_SECONDS + i * window // n for i in range(n)]
    with thread_pool(PREPARE_THREADS, "prepare") as pool:
        prepared = run_all(pool, lambda i: kind.setup(orders, namespace, f"o-{i}", seconds[i]), n)
    target = math.ceil(time.time() + 1 + settle) + max(seconds)
    # Fractions of the target second, spread evenly and independent of the timeout.
    plan = sorted((target + (i * 7919 % n) / n * spread - seconds[i], i) for i in range(n))
    queue = iter(plan)
    pending = PhaseWatch(cluster.api, namespace, "Pending", names=[])
    deadlines: dict[str, dt.datetime] = {}
    armed_late: list[float] = []

    def arm(_: int) -> None:
        for at, i in queue:  # shared: each worker takes the next planned moment
            time.sleep(max(0.0, at - time.time()))
            armed_late.append(time.time() - at)
            order, deadline = kind.arm(orders, prepared[i])
            deadlines[order.name] = deadline
            pending.allow(order.name, after=order)

    try:
        with thread_pool(PREPARE_THREADS, "arm") as pool:
            arming = [pool.submit(arm, w) for w in range(PREPARE_THREADS)]
            time.sleep(max(0.0, target - 1 - time.time()))
            cpu = CpuMeter(cluster, op)  # from a second before the target to the last order seen Pending
            for future in arming:
                future.result()
        pending.wait(n, timeout=max(0.0, target + spread - time.time()) + 60, on_progress=op.check_alive)
        cores = cpu.stop()
    finally:
        pending.stop()
    late = [(pending.seen_dt[k] - deadlines[k]).total_seconds() for k in deadlines if k in pending.seen_dt]
    offsets = [d.timestamp() - target for d in deadlines.values()]
    return {
        "lateness_s": summary(late),
        "lateness_values": sorted(late),
        "deadline_spread_s": max(offsets) - min(offsets),
        "deadline_after_target_s": summary(offsets),
        "clock_started_late_s": summary(armed_late),
        "missed": n - len(late),
        "cores_used": cores,
    }


def reference(cluster: Cluster, op: Operator, namespace: str, n: int) -> dict[str, Any]:
    """n claimed orders (long timeouts: the operator leaves them alone), then n status CAS writes
    at once from 32 threads sharing one client, as the operator's API pool does."""
    preparer = WorkOrders(cluster.client(pool=PREPARE_THREADS), "bench-agent")

    def one(i: int) -> WorkOrder:
        order = create_order(preparer.api, namespace, f"r-{i}", claimTimeoutSeconds=86400)
        return cas(preparer, order, lambda o: lifecycle.claim(o, AGENT, utcnow()))

    with thread_pool(PREPARE_THREADS, "prepare") as pool:
        claimed = run_all(pool, one, n)
    pending = PhaseWatch(cluster.api, namespace, "Pending", names=[])
    for order in claimed:
        pending.allow(order.name, after=order)
    time.sleep(1.0)  # let the preparation's watch events drain
    writer = WorkOrders(cluster.client(pool=OPERATOR_CONCURRENCY), "bench-reference")
    done: dict[str, float] = {}

    def write(i: int) -> None:
        order = claimed[i]
        # The operator's write shape: guard the uid and the resourceVersion it read, then set the status.
        new = lifecycle.release(order, AGENT.id, order.status.attempt, utcnow(), "reference").status
        guards = {"/metadata/uid": order.uid, "/metadata/resourceVersion": order.resource_version}
        writer.write_status(order, lifecycle.StatusWrite("reference", guards, new))
        done[order.name] = time.time()

    try:
        cpu = CpuMeter(cluster, op)
        started, started_dt = time.time(), utcnow()
        with thread_pool(OPERATOR_CONCURRENCY, "reference") as pool:
            run_all(pool, write, n)
        seconds = time.time() - started
        pending.wait(n, timeout=60)
        cores = cpu.stop()
    finally:
        pending.stop()
    seen = [(t - started_dt).total_seconds() for t in pending.seen_dt.values()]
    return {
        "writes": n,
        "concurrency": OPERATOR_CONCURRENCY,
        "burst_seconds": seconds,
        "writes_per_s": n / seconds,
        "answered_after_s": summary([t - started for t in done.values()]),
        "lateness_s": summary(seen),
        "lateness_values": sorted(seen),
        "missed": n - len(seen),
        "cores_used": cores,
    }


def run(quick: bool) -> dict[str, Any]:
    n = 100 if quick else 1000
    with control_plane(NAME) as cluster, operator(cluster, NAME) as op:
        for ns in ("expiry", "due", "reference"):
            cluster.namespace(ns)
        log(f"expiry: {n} claims expiring within one second ...")
        expiry = burst(cluster, op, "expiry", n, EXPIRY)
        log(f"due: {n} retries due within one second ...")
        due = burst(cluster, op, "due", n, DUE)
        log(f"reference: {n} status CAS writes at once, {OPERATOR_CONCURRENCY} threads ...")
        ref = reference(cluster, op, "reference", n)
    rows = [("expiry", expiry), ("due", due), ("reference burst", ref)]
    table(
        f"deadline lateness, {n} deadlines in one second (s; target p99 <= {TARGET_P99})",
        ["burst", "n", "p50", "p90", "p99", "max", "missed"],
        [[k, r["lateness_s"]["n"], *(r["lateness_s"][p] for p in ("p50", "p90", "p99", "max")), r["missed"]]
         for k, r in rows],
    )  # fmt: skip
    print(
        f"reference: {n} CAS writes in {ref['burst_seconds']:.2f}s ({ref['writes_per_s']:.0f}/s); "
        f"deadline spread expiry {expiry['deadline_spread_s']:.2f}s, due {due['deadline_spread_s']:.2f}s"
    )
    cores_table(rows)
    headlines = []
    for key, r in (("expiry", expiry), ("due", due)):
        p99 = r["lateness_s"]["p99"]
        headlines += [
            Headline(f"{key} lateness p50", r["lateness_s"]["p50"], "s"),
            Headline(f"{key} lateness p99", p99, "s", f"<= {TARGET_P99} s", p99 <= TARGET_P99 and r["missed"] == 0),
            Headline(f"{key} lateness max", r["lateness_s"]["max"], "s"),
        ]
    headlines += [
        Headline("reference: burst p99 (seen Pending)", ref["lateness_s"]["p99"], "s"),
        Headline("reference: burst duration", ref["burst_seconds"], "s"),
    ]
    data = {"deadlines": n, "expiry": expiry, "due": due, "reference": ref}
    return write_results(NAME, quick, data, headlines, chart(expiry, due, ref, n))


def pickup(cluster: Cluster, namespace: str, n: int, spread: float) -> dict[str, Any]:
    """One idle SDK agent process; n orders created one by one over `spread` seconds: how long from
    sending the create until our watch sees the order Claimed."""
    open_before = watches(cluster)
    agents = start_agents(cluster, 1, namespace)
    claimed = PhaseWatch(cluster.api, namespace, "Claimed")
    created_at: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 120
        while watches(cluster) < open_before + 2:  # the agent's watch and ours
            if time.monotonic() > deadline or agents[0][0].poll() is not None:
                raise RuntimeError(f"pickup: the agent did not start watching; log in {cluster.directory}")
            time.sleep(0.2)
        creator = WorkOrders(cluster.client(pool=1), "bench")
        started = time.time()
        for i in range(n):
            time.sleep(max(0.0, started + i * spread / n - time.time()))
            name = f"p-{i}"
            created_at[name] = time.time()
            creator.create(bench_order(name), namespace)
        if not claimed.wait(n, timeout=60):
            raise RuntimeError(f"pickup: only {claimed.count()} of {n} orders seen Claimed")
    finally:
        claimed.stop()
        stop_agents(agents)
    latency = [claimed.seen[k] - t for k, t in created_at.items()]
    return {"pickup_s": summary(latency), "pickup_values": sorted(latency)}


def run_low_load(quick: bool) -> dict[str, Any]:
    """Precision when the server is not the limit: n expiries, n due retries and n pickups spread
    over `spread` seconds, all three at once (about 3 writes a second)."""
    n, spread = (20, 20.0) if quick else (100, 100.0)
    with control_plane(LOW_LOAD) as cluster, operator(cluster, LOW_LOAD) as op:
        for ns in ("expiry", "due", "pickup"):
            cluster.namespace(ns)
        log(f"low load: {n} expiries, {n} due retries and {n} pickups, each spread over {spread:.0f}s ...")
        with thread_pool(3, "low-load") as pool:
            expiry_f = pool.submit(burst, cluster, op, "expiry", n, EXPIRY, spread, LOW_LOAD_SETTLE_S)
            due_f = pool.submit(burst, cluster, op, "due", n, DUE, spread, LOW_LOAD_SETTLE_S)
            pick_f = pool.submit(pickup, cluster, "pickup", n, spread)
            expiry, due, pick = expiry_f.result(), due_f.result(), pick_f.result()
    rows = [("expiry", expiry["lateness_s"]), ("due", due["lateness_s"]), ("pickup", pick["pickup_s"])]
    table(
        f"low load: {n} of each over {spread:.0f}s (s)",
        ["figure", "n", "p50", "p90", "p99", "max"],
        [[k, r["n"], *(r[p] for p in ("p50", "p90", "p99", "max"))] for k, r in rows],
    )
    headlines = []
    for key, r in (("expiry", expiry), ("due", due)):
        p99 = r["lateness_s"]["p99"]
        headlines.append(
            Headline(f"low load: {key} lateness p99", p99, "s", f"<= {LOW_LOAD_P99} s",
                     p99 <= LOW_LOAD_P99 and r["missed"] == 0)
        )  # fmt: skip
    p50, p99 = pick["pickup_s"]["p50"], pick["pickup_s"]["p99"]
    headlines += [
        Headline("low load: pickup (create -> Claimed) p50", p50, "s", f"<= {PICKUP_P50} s", p50 <= PICKUP_P50),
        Headline("low load: pickup (create -> Claimed) p99", p99, "s", f"<= {PICKUP_P99} s", p99 <= PICKUP_P99),
    ]
    fig, (ax,) = new_figure(width=7)
    for label, values, color in (
        ("claims expiring", expiry["lateness_values"], "tab:blue"),
        ("retries due", due["lateness_values"], "tab:orange"),
        ("pickup: create -> Claimed", pick["pickup_values"], "tab:green"),
    ):
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=label, color=color)
    ax.axhline(0.99, color="tab:red", linestyle=":", linewidth=0.8)
    ax.set_xlabel("seconds (lateness after the deadline; pickup after the create)")
    ax.set_ylabel("share of orders")
    ax.set_title(f"low load: {n} of each spread over {spread:.0f} s", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    data = {"orders": n, "spread_s": spread, "expiry": expiry, "due": due, "pickup": pick}
    return write_results(LOW_LOAD, quick, data, headlines, fig)


def cores_table(rows: list[tuple[str, dict[str, Any]]]) -> None:
    parts = ["operator", "kube-apiserver", "etcd", "bench", "machine"]
    table(
        "cores used during each burst (machine: every process, other test runs included)",
        ["burst", *parts],
        [[k, *(f"{r['cores_used'].get(p, 0):.2f}" for p in parts)] for k, r in rows],
    )


def chart(expiry: dict[str, Any], due: dict[str, Any], ref: dict[str, Any], n: int) -> Any:
    fig, (cdf, hist) = new_figure(ncols=2)
    series = [
        ("claims expiring", expiry["lateness_values"], "tab:blue"),
        ("retries due", due["lateness_values"], "tab:orange"),
        ("reference: CAS burst (32 threads)", ref["lateness_values"], "tab:gray"),
    ]
    for label, values, color in series:
        if values:
            cdf.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=label, color=color)
    top = max((max(v) for _, v, _ in series if v), default=1.0)
    bins = [top * i / 40 for i in range(41)]
    for label, values, color in series:
        hist.hist(values, bins=bins, alpha=0.5, label=label, color=color)
    for ax in (cdf, hist):
        ax.axvline(TARGET_P99, color="tab:red", linestyle="--", label=f"target p99 <= {TARGET_P99} s")
        ax.set_xlabel("seconds after the deadline until seen Pending")
    cdf.axhline(0.99, color="tab:red", linestyle=":", linewidth=0.8)
    cdf.set_ylabel("share of orders")
    cdf.set_title(f"CDF, {n} deadlines within one second")
    hist.set_ylabel("orders")
    hist.set_title("histogram")
    cdf.legend(loc="lower right", fontsize=8)
    return fig


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--low-load", action="store_true",
        help="instead: 100 expiries, 100 due retries and 100 pickups spread over 100 s (quick: 20 over 20 s)",
    )  # fmt: skip


def main() -> int:
    return main_of(lambda args: (run_low_load if args.low_load else run)(args.quick), __doc__.split("\n")[0],
                   "100 deadlines per burst instead of 1,000", options)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
