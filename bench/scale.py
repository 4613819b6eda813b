"""Scale: the operator starting on a big queue, and its idle cost.

10,000 orders (--quick: 1,000) with 1 KB of yamlContent each are created by a pool of 16 while the
operator is NOT running: half Pending (initialised, as a running operator would have left them),
half Claimed with long timeouts (nothing falls due). Then the operator starts and we measure:

- startup: seconds from starting the process until /metrics shows every order tracked
  (sum of workorder_orders == total) and every claim deadline armed
  (workorder_deadlines_armed >= number of Claimed orders); target < 60 s;
- idle: its RSS and CPU (share of one core) over 30 s (--quick: 10 s) with nothing due, after
  5 s to settle; targets < 300 MB and < 2 %.

Usage: python bench/scale.py [--quick]
"""

from __future__ import annotations

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
    operator,
    proc_status_mb,
    run_all,
    table,
    thread_pool,
    write_results,
)

from workorder_operator import lifecycle
from workorder_operator.kube import OPERATOR_MANAGER, WorkOrders
from workorder_operator.model import utcnow
from workorder_operator.targeting import AgentIdentity

NAME = "scale"
CREATORS = 16
TARGET_STARTUP_S = 60.0
TARGET_RSS_MB = 300.0
TARGET_CPU_PCT = 2.0
SETTLE_S = 5.0
CONTENT = "payload: " + "x" * 1015 + "\n"  # 1 KB of yamlContent


def run(quick: bool) -> dict[str, Any]:
    n, window = (1000, 10.0) if quick else (10000, 30.0)
    claimed_n = n // 2
    agent = AgentIdentity(str(uuid.uuid4()))
    with control_plane(NAME) as cluster:
        ns = cluster.namespace("scale")
        api = cluster.client(pool=CREATORS)
        agents, initialiser = WorkOrders(api, "bench-agent"), WorkOrders(api, OPERATOR_MANAGER)

        def one(i: int) -> None:
            order = create_order(api, ns, f"s-{i:05d}", yamlContent=CONTENT, claimTimeoutSeconds=86400)
            if i % 2:
                cas(agents, order, lambda o: lifecycle.claim(o, agent, utcnow()))
            else:  # what the operator writes on a new order nobody claims within a second
                cas(initialiser, order, lambda o: lifecycle.initialise(o, utcnow()))

        log(f"creating {n} orders (1 KB each; {claimed_n} Claimed, {n - claimed_n} Pending), {CREATORS} threads ...")
        started = time.monotonic()
        with thread_pool(CREATORS, "creator") as pool:
            run_all(pool, one, n)
        create_s = time.monotonic() - started
        log(f"created in {create_s:.1f}s ({2 * n / create_s:.0f} writes/s); starting the operator ...")

        with operator(cluster, NAME, wait=False) as op:
            ready_s = op.wait_ready(timeout=300)
            startup_s, polls = float("nan"), 0
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                op.check_alive()
                m = op.metrics()
                polls += 1
                tracked, armed = m.sum("workorder_orders"), m.sum("workorder_deadlines_armed")
                if tracked == n and armed >= claimed_n:
                    startup_s = time.monotonic() - op.started
                    break
                time.sleep(0.25)
            else:
                raise RuntimeError(f"operator tracks {tracked:.0f} of {n} orders, {armed:.0f} deadlines armed")
            _, rss_started = op.usage()
            log(f"all {n} orders tracked and {armed:.0f} deadlines armed after {startup_s:.1f}s; idle for {window}s")
            time.sleep(SETTLE_S)
            cpu0, _ = op.usage()
            t0 = time.monotonic()
            time.sleep(window)
            cpu1, rss = op.usage()
            elapsed = time.monotonic() - t0
            peak = proc_status_mb(op.pid, "VmHWM")
            final = op.metrics()
            phases = {
                lab["phase"]: v for name, lab, v in final.samples if name == "workorder_orders" and "phase" in lab
            }
    idle_cpu_pct = 100 * (cpu1 - cpu0) / elapsed
    data = {
        "orders": n,
        "claimed": claimed_n,
        "content_bytes": len(CONTENT),
        "create_seconds": create_s,
        "ready_s": ready_s,
        "startup_s": startup_s,
        "metrics_polls": polls,
        "deadlines_armed": final.sum("workorder_deadlines_armed"),
        "orders_by_phase": phases,
        "rss_after_startup_mb": rss_started,
        "idle_window_s": elapsed,
        "idle_cpu_pct_of_core": idle_cpu_pct,
        "idle_rss_mb": rss,
        "peak_rss_mb": peak,
    }
    table(
        f"scale: {n} orders of 1 KB, half Claimed",
        ["figure", "value", "target"],
        [
            ["startup: all tracked + armed (s)", startup_s, f"< {TARGET_STARTUP_S:.0f}"],
            ["  of which /readyz (s)", ready_s, ""],
            ["idle CPU (% of a core)", f"{idle_cpu_pct:.2f}", f"< {TARGET_CPU_PCT:.0f}"],
            ["idle RSS (MB)", rss, f"< {TARGET_RSS_MB:.0f}"],
            ["peak RSS (MB)", peak, ""],
        ],
    )
    headlines = [
        Headline("startup to all deadlines armed", startup_s, "s", f"< {TARGET_STARTUP_S:.0f} s",
                 startup_s < TARGET_STARTUP_S),
        Headline("idle RSS", rss, "MB", f"< {TARGET_RSS_MB:.0f} MB", rss < TARGET_RSS_MB),
        Headline("idle CPU", idle_cpu_pct, "%", f"< {TARGET_CPU_PCT:.0f}% of a core", idle_cpu_pct < TARGET_CPU_PCT),
        Headline("peak RSS", peak, "MB"),
    ]  # fmt: skip
    return write_results(NAME, quick, data, headlines, chart(data))


def chart(d: dict[str, Any]) -> Any:
    fig, axes = new_figure(ncols=3, width=3.6)
    panels = [
        ("startup to all armed (s)", [("startup", d["startup_s"]), ("/readyz", d["ready_s"])], TARGET_STARTUP_S),
        ("RSS (MB)", [("idle", d["idle_rss_mb"]), ("peak", d["peak_rss_mb"])], TARGET_RSS_MB),
        ("idle CPU (% of a core)", [("idle", d["idle_cpu_pct_of_core"])], TARGET_CPU_PCT),
    ]
    for ax, (title, bars, target) in zip(axes, panels, strict=True):
        colors = ["tab:green" if value < target else "tab:red" for _, value in bars]
        ax.bar([b for b, _ in bars], [v for _, v in bars], color=colors, width=0.6)
        for i, (_, value) in enumerate(bars):
            ax.annotate(f"{value:.3g}", (i, value), textcoords="offset points", xytext=(0, 3), ha="center")
        ax.axhline(target, color="tab:red", linestyle="--", label=f"target < {target:g}")
        ax.set_ylim(0, max(target, *(v for _, v in bars)) * 1.25)
        ax.set_title(title)
        ax.legend(loc="upper right", fontsize=8)
    axes[0].set_xlabel(f"{d['orders']:,} orders, {d['claimed']:,} Claimed")
    return fig


def main() -> int:
    return main_of(run, __doc__.split("\n")[0], "1,000 orders and a 10 s idle window")


if __name__ == "__main__":
    sys.exit(main())
