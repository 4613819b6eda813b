"""Run the benchmarks in sequence (each on its own local control plane) and summarise them.

    python bench/run.py                 # all six, full sizes (what `make bench` runs)
    python bench/run.py --quick         # small sizes: a smoke run of a few minutes
    python bench/run.py --only scale    # one of them (repeatable)

Results: bench/results/NAME.json and NAME.png per benchmark, and bench/results/summary.md (the
headline figures as a Markdown table, ready for bench/README.md). Exits 1 if a benchmark failed
(an error, or the exactly-once proof of `contention`), not for a missed target.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import contention
import deadlines
import guards
import scale
import throughput
from common import RESULTS, fmt, handle_sigterm, log, machine, table

from workorder_operator.model import utcnow

BENCHMARKS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "throughput": throughput.run,
    "deadlines": deadlines.run,
    "lowload": deadlines.run_low_load,
    "scale": scale.run,
    "contention": contention.run,
    "guards": guards.run,
}


def markdown(records: dict[str, dict[str, Any]], quick: bool, failed: list[str], m: dict[str, Any]) -> str:
    lines = [
        f"Run of {utcnow():%Y-%m-%d %H:%M} UTC{' (quick sizes)' if quick else ''}: {m['nproc']} cores, "
        f"{m['ram_gb']} GB RAM ({m['cpu']}), load average {m['loadavg_at_start']:.1f}, "
        f"Kubernetes {m['kubernetes']}, etcd {m['etcd']}, commit {m['commit']}.",
        "",
        "| benchmark | figure | value | target | met |",
        "|---|---|---|---|---|",
    ]
    for name, record in records.items():
        for h in record["headlines"]:
            met = {True: "yes", False: "**no**", None: ""}[h["met"]]
            lines.append(f"| {name} | {h['name']} | {fmt(h['value'], h['unit'])} | {h['target']} | {met} |")
    lines += [f"| {name} | failed (see its output) | | | **no** |" for name in failed]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument(
        "--only", action="append", choices=list(BENCHMARKS), metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}",
    )  # fmt: skip
    args = parser.parse_args()
    handle_sigterm()
    selected = args.only or list(BENCHMARKS)
    at_start = machine()
    records: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    for name in selected:
        log(f"=== {name}{' (quick)' if args.quick else ''} ===")
        started = time.monotonic()
        try:
            records[name] = BENCHMARKS[name](args.quick)
        except KeyboardInterrupt:
            print("interrupted: the control plane and the operator are stopped", file=sys.stderr)
            return 130
        except Exception:
            traceback.print_exc()
            failed.append(name)
        log(f"=== {name}: {'failed' if name in failed else 'done'} in {time.monotonic() - started:.0f}s ===")
    rows = [
        [
            name,
            h["name"],
            fmt(h["value"], h["unit"]),
            h["target"] or "-",
            {True: "yes", False: "NO", None: "-"}[h["met"]],
        ]
        for name, record in records.items()
        for h in record["headlines"]
    ]
    table("summary", ["benchmark", "figure", "value", "target", "met"], rows, left=2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "summary.md").write_text(markdown(records, args.quick, failed, at_start))
    print(f"\nsummary: {RESULTS / 'summary.md'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
