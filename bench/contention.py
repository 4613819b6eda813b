"""Contention: 16 agents racing for the same orders, and the proof of exactly-once execution.

2,000 orders (--quick: 300) are created up front (the operator running, and done initialising
them) before 16 SDK agents start (`Agent.run`, concurrency 1, each in its own thread with its own
API client and its own watch). Every agent offers itself the same candidates in the same order
(priority, then age), so they all race for the same order and all but one lose each race.

Measured: claims per second (all orders claimed, from the agents' start to the last winning
claim), the conflict rate (lost claim compare-and-swaps / all claim compare-and-swaps, counted
at `WorkOrders.write_status`), and the proof that every (order, attempt) ran exactly once: the
handler records each execution in a thread-safe dict; none may run twice, none may be missing,
every order must end Completed with `attempt` equal to the number of claims it got.

Usage: python bench/contention.py [--quick]
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from typing import Any

from common import (
    CountingWorkOrders,
    CpuMeter,
    Headline,
    PhaseWatch,
    control_plane,
    create_order,
    list_orders,
    log,
    main_of,
    new_figure,
    operator,
    run_all,
    table,
    thread_pool,
    write_results,
)

from workorder_operator.agent import Agent, Claim
from workorder_operator.model import Phase, WorkOrder

NAME = "contention"
AGENTS = 16
CREATORS = 16


def run(quick: bool) -> dict[str, Any]:
    n = 300 if quick else 2000
    lock = threading.Lock()
    executions: Counter[tuple[str, int]] = Counter()
    claims_won: Counter[str] = Counter()
    attempts = {"won": 0, "lost": 0}
    claim_times: list[float] = []  # time.time() of each winning claim
    stop = threading.Event()

    def on_write(transition: str, order: WorkOrder, won: bool) -> None:
        if transition != "claim":
            return
        with lock:
            attempts["won" if won else "lost"] += 1
            if won:
                claims_won[order.name] += 1
                claim_times.append(time.time())

    def handler(claim: Claim) -> str:
        with lock:
            executions[(claim.name, claim.attempt)] += 1
        return "ok"

    with control_plane(NAME) as cluster, operator(cluster, NAME) as op:
        ns = cluster.namespace("contention")
        creator = cluster.client(pool=CREATORS)
        log(f"creating {n} orders ...")
        with thread_pool(CREATORS, "creator") as pool:
            run_all(pool, lambda i: create_order(creator, ns, f"c-{i:05d}"), n)
        # Let the operator initialise them all first: only the agents' races are measured.
        deadline = time.monotonic() + 120
        while any("conditions" not in o.raw_status for o in list_orders(cluster.api, ns)):
            if time.monotonic() > deadline:
                raise RuntimeError("the operator did not initialise the orders within 120s")
            time.sleep(1.0)
        completed = PhaseWatch(cluster.api, ns, "Completed")
        threads = []
        for a in range(AGENTS):
            agent = Agent(cluster.client(pool=4), work_types=["bench"], namespace=ns)
            agent.orders = CountingWorkOrders(agent.api, agent.orders.field_manager, on_write)
            threads.append(
                threading.Thread(
                    target=agent.run, args=(handler,), kwargs={"concurrency": 1, "stop": stop},
                    name=f"agent-{a}", daemon=True,
                )
            )  # fmt: skip
        log(f"{AGENTS} agents racing for {n} orders ...")
        try:
            cpu = CpuMeter(cluster, op)
            started = time.time()
            for thread in threads:
                thread.start()
            finished = completed.wait(n, timeout=120 + n * 0.5, on_progress=op.check_alive)
            cores = cpu.stop()
        finally:
            stop.set()
            completed.stop()
        for thread in threads:
            thread.join(15)
        final = list_orders(cluster.api, ns)
    # --- the proof -------------------------------------------------------------------------------
    twice = sorted(f"{name}#{attempt} ran {count}x" for (name, attempt), count in executions.items() if count > 1)
    expected = {(o.name, o.status.attempt) for o in final}
    missing = sorted(f"{name}#{attempt}" for name, attempt in expected - set(executions))
    unexpected = sorted(f"{name}#{attempt}" for name, attempt in set(executions) - expected)
    not_completed = sorted(o.name for o in final if o.status.phase != Phase.COMPLETED)
    attempt_mismatch = sorted(
        f"{o.name}: attempt {o.status.attempt}, claimed {claims_won[o.name]}x"
        for o in final
        if o.status.attempt != claims_won[o.name]
    )
    problems = {
        "executed_twice": twice,
        "missing": missing,
        "unexpected": unexpected,
        "not_completed": not_completed,
        "attempt_mismatch": attempt_mismatch,
    }
    exactly_once = finished and len(final) == n and not any(problems.values())
    # --- figures ---------------------------------------------------------------------------------
    total = attempts["won"] + attempts["lost"]
    last_claim = max(claim_times, default=started)
    claim_s = last_claim - started
    data: dict[str, Any] = {
        "orders": n,
        "agents": AGENTS,
        "claims_won": attempts["won"],
        "claims_lost": attempts["lost"],
        "conflict_rate": attempts["lost"] / total if total else 0.0,
        "claim_seconds": claim_s,
        "claims_per_s": attempts["won"] / claim_s if claim_s > 0 else float("nan"),
        "claim_attempts_per_s": total / claim_s if claim_s > 0 else float("nan"),
        "completed_seconds": max(completed.seen.values(), default=started) - started,
        "executions": sum(executions.values()),
        "exactly_once": exactly_once,
        "problems": {k: v[:20] for k, v in problems.items()},
        "problem_counts": {k: len(v) for k, v in problems.items()},
        "cores_used": cores,
        "claim_timeline_s": sorted(t - started for t in claim_times),
    }
    table(
        f"contention: {AGENTS} agents, {n} orders",
        ["figure", "value"],
        [
            ["claims/s", data["claims_per_s"]],
            ["claim attempts/s (won + lost)", data["claim_attempts_per_s"]],
            ["conflict rate (lost / all claim attempts)", f"{100 * data['conflict_rate']:.1f}%"],
            ["claims won / lost", f"{attempts['won']} / {attempts['lost']}"],
            ["all Completed after (s)", data["completed_seconds"]],
            ["executions (order, attempt)", data["executions"]],
            ["exactly once", "yes" if exactly_once else f"NO: {data['problem_counts']}"],
        ],
    )
    headlines = [
        Headline(f"claims/s, {AGENTS} agents racing", data["claims_per_s"], "/s"),
        Headline("claim conflict rate", 100 * data["conflict_rate"], "%"),
        Headline(
            "each (order, attempt) executed exactly once", "yes" if exactly_once else "NO", "", "yes", exactly_once
        ),
    ]
    record = write_results(NAME, quick, data, headlines, chart(data))
    if not exactly_once:
        raise AssertionError(f"exactly-once violated: {data['problem_counts']} (see {NAME}.json)")
    return record


def chart(d: dict[str, Any]) -> Any:
    fig, (timeline, bars) = new_figure(ncols=2)
    times = d["claim_timeline_s"]
    timeline.plot(times, range(1, len(times) + 1), color="tab:blue")
    timeline.set_xlabel("seconds since the agents started")
    timeline.set_ylabel("orders claimed")
    timeline.set_title(f"{d['agents']} agents, {d['orders']} orders: {d['claims_per_s']:.1f} claims/s")
    bars.bar(["won", "lost"], [d["claims_won"], d["claims_lost"]], color=["tab:green", "tab:red"])
    bars.set_title(f"claim compare-and-swaps: conflict rate {100 * d['conflict_rate']:.1f}%")
    bars.set_ylabel("claim attempts")
    verdict = "exactly once: yes" if d["exactly_once"] else "exactly once: VIOLATED"
    bars.annotate(
        verdict, (0.04, 0.95), xycoords="axes fraction", ha="left", va="top", fontweight="bold",
        color="tab:green" if d["exactly_once"] else "tab:red", bbox={"facecolor": "white", "edgecolor": "gray"},
    )  # fmt: skip
    return fig


def main() -> int:
    return main_of(lambda args: run(args.quick), __doc__.split("\n")[0], "300 orders instead of 2,000")


if __name__ == "__main__":
    sys.exit(main())
