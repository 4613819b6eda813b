"""What the operator's compare-and-swap guard costs the API server: the whole status it read
against the resourceVersion it read, in the same run.

The operator's writes (initialise, expire, due, conditions) guard "nothing changed since I read
it". It used to `test` the whole status it read (so each write carried the status twice); it now
tests `/metadata/resourceVersion`, which every write moves. Both shapes are issued here as expire
writes (Claimed -> Pending, the operator's biggest) on freshly claimed orders, with 32 threads
(the operator's concurrency), in alternating rounds so that other load on the machine falls on
both alike. Per write: request bytes and kube-apiserver CPU milliseconds (/proc).

Usage: python bench/guards.py [--quick]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import uuid
from typing import Any

from common import (
    Headline,
    cas,
    control_plane,
    create_order,
    log,
    main_of,
    new_figure,
    proc_usage,
    run_all,
    table,
    thread_pool,
    write_results,
)

from workorder_operator import lifecycle
from workorder_operator.kube import WorkOrders, json_patch
from workorder_operator.model import WorkOrder, utcnow
from workorder_operator.targeting import AgentIdentity

NAME = "guards"
THREADS = 32
SHAPES = ("whole status", "resourceVersion")


def expire_write(order: WorkOrder, shape: str) -> lifecycle.StatusWrite:
    """The operator's expire of this claim, guarded the old way or the new way."""
    write = lifecycle.expire(order, utcnow())
    if shape == "whole status":
        return lifecycle.StatusWrite(write.transition, {"/metadata/uid": order.uid, "/status": order.raw_status},
                                     write.status, write.message)  # fmt: skip
    return write


def run(quick: bool) -> dict[str, Any]:
    n, rounds = (100, 2) if quick else (250, 4)
    agent = AgentIdentity(str(uuid.uuid4()))
    per_shape: dict[str, list[dict[str, float]]] = {shape: [] for shape in SHAPES}
    with control_plane(NAME) as cluster:
        ns = cluster.namespace("guards")
        api = cluster.client(pool=THREADS)
        agents, operator = WorkOrders(api, "bench-agent"), WorkOrders(api, "workorder-operator")
        apiserver = cluster.plane.processes["kube-apiserver"].pid
        for r in range(rounds):
            for shape in SHAPES if r % 2 == 0 else reversed(SHAPES):
                with thread_pool(THREADS, "prepare") as pool:
                    claimed = run_all(
                        pool,
                        lambda i, r=r, shape=shape: cas(
                            agents,
                            create_order(api, ns, f"g-{r}-{shape[0]}-{i}", claimTimeoutSeconds=1),
                            lambda o: lifecycle.claim(o, agent, utcnow()),
                        ),
                        n,
                    )
                time.sleep(1.2)  # every claim is past its 1 s timeout
                writes = [expire_write(order, shape) for order in claimed]
                size = statistics.fmean(len(json.dumps(json_patch(w)).encode()) for w in writes)
                cpu0, t0 = proc_usage(apiserver)[0], time.monotonic()
                with thread_pool(THREADS, "expire") as pool:
                    run_all(pool, lambda i, c=claimed, w=writes: operator.write_status(c[i], w[i]), n)
                cpu, seconds = proc_usage(apiserver)[0] - cpu0, time.monotonic() - t0
                per_shape[shape].append(
                    {"cpu_ms_per_write": 1000 * cpu / n, "bytes": size, "writes_per_s": n / seconds}
                )
                log(f"round {r + 1}/{rounds}, {shape}: {1000 * cpu / n:.2f} ms API-server CPU per write, "
                    f"{size:.0f} bytes, {n / seconds:.0f} writes/s")  # fmt: skip
    med = {
        shape: {key: statistics.median(x[key] for x in rows) for key in rows[0]} for shape, rows in per_shape.items()
    }
    table(
        f"operator expire writes, {n} per round, {rounds} rounds per shape (medians)",
        ["guard", "API-server CPU ms / write", "bytes / write", "writes/s"],
        [[s, m["cpu_ms_per_write"], m["bytes"], m["writes_per_s"]] for s, m in med.items()],
    )
    old, new = med["whole status"], med["resourceVersion"]
    headlines = [
        Headline(
            "API-server CPU ms per expire write, whole status -> resourceVersion",
            f"{old['cpu_ms_per_write']:.2f} -> {new['cpu_ms_per_write']:.2f}",
            "",
        ),
        Headline(
            "bytes per expire write, whole status -> resourceVersion", f"{old['bytes']:.0f} -> {new['bytes']:.0f}", ""
        ),
    ]
    fig, (ax,) = new_figure(width=6)
    ax.bar(list(med), [m["cpu_ms_per_write"] for m in med.values()], color=["tab:gray", "tab:blue"])
    ax.set_ylabel("kube-apiserver CPU ms per expire write (median of rounds)")
    ax.set_title("the operator's guard: whole status vs resourceVersion", fontsize=10)
    return write_results(NAME, quick, {"writes_per_round": n, "rounds": per_shape, "medians": med}, headlines, fig)


def main() -> int:
    return main_of(lambda args: run(args.quick), __doc__.split("\n")[0], "100 writes per round, 2 rounds per shape")


if __name__ == "__main__":
    sys.exit(main())
