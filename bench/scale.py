"""Scale: the operator starting on a big queue, its idle cost, an agent and the CLI on it, and
what etcd holds.

10,000 orders (--quick: 1,000; --orders N, e.g. 100000) with 1 KB of yamlContent each are created
by a pool of 16 while the operator is NOT running: half Pending (initialised, as a running operator
would have left them), half Claimed with long timeouts (nothing falls due). Then:

- storage: etcd's db size before and after the creation (and after a compaction and defrag), the
  stored object's size, and a full LIST of the namespace (seconds, bytes);
- startup: seconds from starting the operator until /metrics shows every order tracked
  (sum of workorder_orders == total) and every claim deadline armed
  (workorder_deadlines_armed >= number of Claimed orders); target < 60 s (100,000 orders: < 120 s);
- idle: its RSS and CPU (share of one core) over 30 s (--quick: 10 s) with nothing due (an agent
  that takes the orders is announced, so none is marked unschedulable), after 5 s to settle;
  targets < 300 MB (100,000 orders: < 600 MB) and < 2 %;
- agent: the Claimed half is released (every order Pending), then one SDK agent process
  (bench/bench_agent.py) starts: seconds to its first claim (target < 10 s) and its RSS then and
  10 s later (target < 300 MB);
- CLI: `kubectl workorder list` on the namespace: seconds to its first order line (target < 2 s)
  and to the end.

--only-agent: only the agent and the CLI part, on a namespace of only Pending orders (no operator:
the orders are initialised as it would have left them), in bench/results/scale-agent.json.

Usage: python bench/scale.py [--quick | --orders N] [--only-agent]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from common import (
    REPO,
    RESULTS,
    Cluster,
    Headline,
    Metrics,
    Operator,
    PhaseWatch,
    cas,
    control_plane,
    create_order,
    log,
    main_of,
    new_figure,
    operator,
    proc_status_mb,
    proc_usage,
    run_all,
    summary,
    table,
    thread_pool,
    write_results,
)
from kubernetes import client

from workorder_operator import fleet, lifecycle
from workorder_operator.kube import OPERATOR_MANAGER, WorkOrders
from workorder_operator.model import GROUP, PLURAL, VERSION, utcnow
from workorder_operator.presence import PresenceLeases
from workorder_operator.targeting import AgentIdentity

NAME = "scale"
CREATORS = 16
# Targets by size: (orders at least, startup s, idle RSS MB).
TARGETS = [(100_000, 120.0, 600.0), (0, 60.0, 300.0)]
TARGET_CPU_PCT = 2.0
TARGET_AGENT_CLAIM_S = 10.0
TARGET_AGENT_RSS_MB = 300.0
AGENT_WATCH_S = 10.0
# --only-agent: memory also this long after the first claim (10 s is before an agent has listed 100,000).
AGENT_SETTLE_S = 60.0
AGENT_GIVE_UP_S = 180.0
TARGET_CLI_FIRST_S = 2.0
SETTLE_S = 5.0
# Beyond this many (--api-orders), orders are copies written straight into etcd (EtcdCopies).
API_ORDERS = 10_000
CONTENT = "payload: " + "x" * 1015 + "\n"  # 1 KB of yamlContent


def name_of(i: int) -> str:
    return f"s-{i:06d}"


def run(quick: bool, orders: int | None = None, api_orders: int = API_ORDERS) -> dict[str, Any]:
    n = orders or (1000 if quick else 10000)
    window = 10.0 if quick else 30.0
    target_startup_s, target_rss_mb = next((s, r) for least, s, r in TARGETS if n >= least)
    claimed_n = n // 2
    agent = AgentIdentity(str(uuid.uuid4()))
    data: dict[str, Any] = {"orders": n, "claimed": claimed_n, "content_bytes": len(CONTENT)}
    with control_plane(NAME) as cluster:
        ns = cluster.namespace("scale")
        api = cluster.client(pool=CREATORS)
        agents, initialiser = WorkOrders(api, "bench-agent"), WorkOrders(api, OPERATOR_MANAGER)

        def one(i: int) -> None:
            order = create_order(api, ns, name_of(i), yamlContent=CONTENT, claimTimeoutSeconds=86400)
            if i % 2:
                cas(agents, order, lambda o: lifecycle.claim(o, agent, utcnow()))
            else:  # what the operator writes on a new order nobody claims within a second
                cas(initialiser, order, lambda o: lifecycle.initialise(o, utcnow()))

        etcd_before = etcd_metrics(cluster)
        api_n = min(n, max(api_orders, 2))
        log(f"creating {api_n} orders (1 KB each; half Claimed, half Pending), {CREATORS} threads ...")
        create_s = in_pool(one, api_n, "created")
        data.update(create_seconds=create_s, created_through_api=api_n, api_writes_per_s=2 * api_n / create_s)
        log(f"created in {create_s:.1f}s ({2 * api_n / create_s:.0f} writes/s)")
        etcd_api = etcd_metrics(cluster)
        copies = EtcdCopies(cluster, ns)
        if api_n < n:
            log(f"writing {n - api_n} copies of s-000000 (Pending) and s-000001 (Claimed) into etcd ...")
            templates = copies.read(name_of(0)), copies.read(name_of(1))

            def copy(i: int) -> None:
                body = json.loads(json.dumps(templates[i % 2]))
                body["metadata"].update(name=name_of(i), uid=str(uuid.uuid4()))
                copies.write(name_of(i), body)

            data["copy_seconds"] = in_pool(copy, range(api_n, n), "copied")
        log("measuring storage ...")
        data["storage"] = storage(cluster, ns, n, etcd_before, (api_n, etcd_api))
        so_far(data)

        # An agent that takes these orders is announced (a presence lease for its whole run), as
        # agents are in a cluster: with none, the operator is not idle but busy marking every
        # Pending order unschedulable (50 writes per 5 s pass; 8 % of a core at 10,000 orders).
        PresenceLeases(api, "bench-agent").put(ns, fleet.lease_body(
            agent, work_types=(), user="", namespaces=(ns,), duration=3600, now=utcnow(), acquired=True))  # fmt: skip
        log("starting the operator ...")
        with operator(cluster, NAME, wait=False) as op:
            data["ready_s"] = op.wait_ready(timeout=600)
            startup_s, polls, scrape_timeouts = float("nan"), 0, 0
            deadline = time.monotonic() + 1200
            tracked = armed = 0.0
            scrapes: list[float] = []
            while time.monotonic() < deadline:
                op.check_alive()
                asked = time.monotonic()
                try:
                    m = op.metrics()
                except OSError:  # busy with the start-up listing: /metrics shares its event loop
                    scrape_timeouts += 1
                    continue
                scrapes.append(time.monotonic() - asked)
                polls += 1
                tracked, armed = m.sum("workorder_orders"), m.sum("workorder_deadlines_armed")
                if tracked == n and armed >= claimed_n:
                    startup_s = time.monotonic() - op.started
                    break
                # A scrape counts every tracked order (0.4 s at 100,000 on a busy loop): polling
                # must not become the operator's main work.
                time.sleep(max(0.25, 9 * scrapes[-1]))
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
            final = op.metrics()
            data.update(
                startup_s=startup_s,
                metrics_polls=polls,
                metrics_scrape_timeouts=scrape_timeouts,
                metrics_scrape_s=summary(scrapes),
                deadlines_armed=final.sum("workorder_deadlines_armed"),
                orders_by_phase={
                    lab["phase"]: v for name, lab, v in final.samples if name == "workorder_orders" and "phase" in lab
                },
                rss_after_startup_mb=rss_started,
                idle_window_s=elapsed,
                idle_cpu_pct_of_core=100 * (cpu1 - cpu0) / elapsed,
                idle_rss_mb=rss,
                peak_rss_mb=proc_status_mb(op.pid, "VmHWM"),
            )
            log(f"operator idle: RSS {rss:.0f} MB, CPU {data['idle_cpu_pct_of_core']:.2f} %; all to Pending ...")

            pending_status = copies.read(name_of(0))["status"]

            def release(i: int) -> None:  # the stored status of a Pending order (see RELEASE)
                body = copies.read(name_of(i))
                copies.write(name_of(i), {**body, "status": pending_status})

            release_s = in_pool(release, range(1, n, 2), "set Pending")
            data["release_seconds"] = release_s
            while pending(op) < n:
                op.check_alive()
                time.sleep(2)
            data["operator_rss_all_pending_mb"] = op.usage()[1]
            log(f"all {n} orders Pending ({release_s:.0f}s); starting one SDK agent ...")
            so_far(data)
            data["agent"] = agent_start(cluster, api, ns)
            so_far(data)
            data["operator_rss_after_agent_mb"] = op.usage()[1]
        log("`kubectl workorder list` ...")
        data["cli"] = cli_list(cluster, ns)
    report(data, target_startup_s, target_rss_mb)
    return write_results(NAME, quick, data, headlines(data, target_startup_s, target_rss_mb), chart(data))


def run_agent_only(quick: bool, orders: int | None = None, api_orders: int = API_ORDERS) -> dict[str, Any]:
    """The agent and CLI part alone: every order Pending (initialised), no operator running."""
    n = orders or (1000 if quick else 10000)
    data: dict[str, Any] = {"orders": n, "content_bytes": len(CONTENT), "only_agent": True}
    with control_plane(NAME) as cluster:
        ns = cluster.namespace("scale")
        api = cluster.client(pool=CREATORS)
        initialiser = WorkOrders(api, OPERATOR_MANAGER)

        def one(i: int) -> None:
            order = create_order(api, ns, name_of(i), yamlContent=CONTENT, claimTimeoutSeconds=86400)
            cas(initialiser, order, lambda o: lifecycle.initialise(o, utcnow()))

        api_n = min(n, max(api_orders, 1))
        log(f"creating {api_n} Pending orders (1 KB each), {CREATORS} threads ...")
        data["create_seconds"] = in_pool(one, api_n, "created")
        data["created_through_api"] = api_n
        if api_n < n:
            log(f"writing {n - api_n} copies of s-000000 (Pending) into etcd ...")
            copies = EtcdCopies(cluster, ns)
            template = copies.read(name_of(0))

            def copy(i: int) -> None:
                body = json.loads(json.dumps(template))
                body["metadata"].update(name=name_of(i), uid=str(uuid.uuid4()))
                copies.write(name_of(i), body)

            data["copy_seconds"] = in_pool(copy, range(api_n, n), "copied")
        data["listed"] = listed(api, ns, n)
        log(f"{data['listed']} of {n} orders listed; starting one SDK agent ...")
        data["agent"] = agent_start(cluster, api, ns, settle_s=AGENT_SETTLE_S)
        log("`kubectl workorder list` ...")
        data["cli"] = cli_list(cluster, ns)
    a, c = data["agent"], data["cli"]
    table(
        f"scale, agent only: {n} Pending orders of 1 KB",
        ["figure", "value", "target"],
        [
            ["agent: first claim (s)", a["first_claim_s"], f"< {TARGET_AGENT_CLAIM_S:.0f}"],
            ["agent: RSS at first claim / 10 s later (MB)",
             f"{a['rss_at_first_claim_mb']:.0f} / {a['rss_later_mb']:.0f}", f"< {TARGET_AGENT_RSS_MB:.0f}"],
            ["agent: peak RSS (MB)", a["peak_rss_mb"], ""],
            ["agent: claims 10 s after the first", a["claims_later"], ""],
            [f"agent: RSS / peak RSS (MB), claims {AGENT_SETTLE_S:.0f} s after the first",
             f"{a['rss_settled_mb']:.0f} / {a['peak_rss_settled_mb']:.0f}, {a['claims_settled']}", ""],
            ["CLI list: first order line / all (s)", f"{c['first_order_s']:.2f} / {c['total_s']:.1f}",
             f"< {TARGET_CLI_FIRST_S:.0f}"],
        ],
    )  # fmt: skip
    return write_results(f"{NAME}-agent", quick, data, agent_headlines(data), agent_chart(data))


def listed(api: Any, ns: str, n: int, timeout: float = 120) -> int:
    """How many orders a list shows, once it shows all `n` (etcd copies reach the API server's
    cache through its watch) or `timeout` has passed."""
    objects = client.CustomObjectsApi(api)
    deadline = time.monotonic() + timeout
    while True:
        page = objects.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, limit=1)
        count = len(page.get("items") or []) + int((page.get("metadata") or {}).get("remainingItemCount") or 0)
        if count >= n or time.monotonic() > deadline:
            return count
        time.sleep(1)


def agent_headlines(d: dict[str, Any]) -> list[Headline]:
    a, c = d["agent"], d["cli"]
    rss = max(a["rss_at_first_claim_mb"], a["rss_later_mb"], a.get("rss_settled_mb", 0.0))
    return [
        Headline("agent: first claim", a["first_claim_s"], "s", f"< {TARGET_AGENT_CLAIM_S:.0f} s",
                 a["first_claim_s"] < TARGET_AGENT_CLAIM_S),
        Headline(f"agent: RSS (at first claim, 10 s, {AGENT_SETTLE_S:.0f} s later)", rss, "MB",
                 f"< {TARGET_AGENT_RSS_MB:.0f} MB", rss < TARGET_AGENT_RSS_MB),
        Headline("agent: peak RSS", a.get("peak_rss_settled_mb", a["peak_rss_mb"]), "MB"),
        Headline("CLI list: first order line", c["first_order_s"], "s", f"< {TARGET_CLI_FIRST_S:.0f} s",
                 c["first_order_s"] < TARGET_CLI_FIRST_S),
    ]  # fmt: skip


def agent_chart(d: dict[str, Any]) -> Any:
    a = d["agent"]
    panels = [
        ("first claim / first line (s)", [("agent", a["first_claim_s"]), ("CLI list", d["cli"]["first_order_s"])],
         TARGET_AGENT_CLAIM_S),
        ("agent RSS (MB)", [("1st claim", a["rss_at_first_claim_mb"]), ("+10 s", a["rss_later_mb"]),
                            ("peak", a["peak_rss_mb"])], TARGET_AGENT_RSS_MB),
    ]  # fmt: skip
    return bar_panels(panels, f"{d['orders']:,} Pending orders")


def so_far(data: dict[str, Any]) -> None:
    """The figures so far, in bench/results/scale-so-far.json: a 100,000-order run takes long."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}-so-far.json").write_text(json.dumps(data, indent=2, default=str) + "\n")


def pending(op: Operator) -> float:
    """Pending orders by the operator's count (0 while a scrape times out: its loop is busy)."""
    try:
        return op.metrics().sum("workorder_orders", phase="Pending")
    except OSError:
        return 0.0


def in_pool(fn: Any, items: int | range, done: str) -> float:
    """fn over items (0..n-1, or a range) on the creator pool, logging progress every 10 %; seconds."""
    todo = range(items) if isinstance(items, int) else items
    started, step = time.monotonic(), max(1, len(todo) // 10)
    with thread_pool(CREATORS, "creator") as pool:
        for first in range(0, len(todo), step):
            run_all(pool, lambda k, first=first: fn(todo[first + k]), min(step, len(todo) - first))
            elapsed = time.monotonic() - started
            log(f"  {done} {first + step if first + step < len(todo) else len(todo)} of {len(todo)} in {elapsed:.0f}s")
    return time.monotonic() - started


# --- storage ------------------------------------------------------------------------------------


def etcd_url(cluster: Cluster) -> str:
    arg = next(a for a in cluster.plane.args["etcd"] if a.startswith("--listen-client-urls="))
    return arg.split("=", 1)[1]


def etcd_metrics(cluster: Cluster) -> dict[str, float]:
    with urllib.request.urlopen(etcd_url(cluster) + "/metrics", timeout=30) as resp:
        m = Metrics(resp.read().decode())
    return {
        "db_total_bytes": m.sum("etcd_mvcc_db_total_size_in_bytes"),
        "db_in_use_bytes": m.sum("etcd_mvcc_db_total_size_in_use_in_bytes"),
        "keys": m.sum("etcd_debugging_mvcc_keys_total"),
    }


def etcd_call(cluster: Cluster, path: str, body: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """etcd's JSON gateway (its v3 API over HTTP)."""
    request = urllib.request.Request(
        etcd_url(cluster) + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
        return answer


class EtcdCopies:
    """Orders read and written straight in etcd, as the API server stores them (JSON under
    /registry/workorder.dev/workorders/NS/NAME; the API server's watch sees every write). The API
    server takes about 150 writes a second here, so 100,000 orders (create + claim or initialise)
    would take 20-30 minutes: the first API_ORDERS are made through the API (and measured), the
    rest are copies of two of them with their own name and uid (the operator, the agent and the
    CLI cannot tell them apart). Putting the claimed half back to Pending, before the agent starts,
    is the same kind of write (the stored status of a Pending order)."""

    def __init__(self, cluster: Cluster, ns: str) -> None:
        self.host = etcd_url(cluster).removeprefix("http://")
        self.ns = ns
        self._local = threading.local()

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        conn = getattr(self._local, "conn", None)
        if conn is None:  # one kept-alive connection per thread
            conn = self._local.conn = http.client.HTTPConnection(self.host, timeout=60)
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        answer: dict[str, Any] = json.loads(resp.read())
        if resp.status != 200:
            raise RuntimeError(f"etcd {path}: {resp.status} {answer}")
        return answer

    def _key(self, name: str) -> str:
        return base64.b64encode(f"/registry/{GROUP}/{PLURAL}/{self.ns}/{name}".encode()).decode()

    def read(self, name: str) -> dict[str, Any]:
        found = self._call("/v3/kv/range", {"key": self._key(name)})
        body: dict[str, Any] = json.loads(base64.b64decode(found["kvs"][0]["value"]))
        return body

    def write(self, name: str, body: dict[str, Any]) -> None:
        value = base64.b64encode(json.dumps(body, separators=(",", ":")).encode()).decode()
        self._call("/v3/kv/put", {"key": self._key(name), "value": value})


def storage(
    cluster: Cluster, ns: str, n: int, before: dict[str, float], through_api: tuple[int, dict[str, float]]
) -> dict[str, Any]:
    """What etcd holds per order (after the orders made through the API: with their history of
    writes; after a compaction and defrag: what stays), the stored and the served object, and a
    full LIST's cost."""
    api_n, after = through_api
    key = f"/registry/{GROUP}/{PLURAL}/{ns}/s-000001"
    found = etcd_call(cluster, "/v3/kv/range", {"key": base64.b64encode(key.encode()).decode()})
    stored = len(base64.b64decode(found["kvs"][0]["value"]))
    revision = int(found["header"]["revision"])
    served = api_get(cluster, f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}/s-000001")[1]
    apiserver_pid = cluster.plane.processes["kube-apiserver"].pid
    rss0 = proc_usage(apiserver_pid)[1]
    list_s, list_bytes, list_status = api_get(cluster, f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}")
    rss1 = proc_usage(apiserver_pid)[1]
    log(f"  full LIST: HTTP {list_status}, {list_s:.1f}s, {list_bytes / 1e6:.0f} MB; compacting etcd ...")
    etcd_call(cluster, "/v3/kv/compaction", {"revision": str(revision), "physical": True})
    etcd_call(cluster, "/v3/maintenance/defragment", {})
    compacted = etcd_metrics(cluster)
    quota = next(a for a in cluster.plane.args["etcd"] if a.startswith("--quota-backend-bytes="))
    quota_bytes = int(quota.split("=", 1)[1])
    per_order = (compacted["db_total_bytes"] - before["db_total_bytes"]) / n
    return {
        "etcd_before": before,
        "etcd_after_api_orders": after,
        "etcd_after_compact_defrag": compacted,
        "etcd_db_bytes_per_order_created": (after["db_total_bytes"] - before["db_total_bytes"]) / api_n,
        "etcd_db_bytes_per_order_compacted": per_order,
        "etcd_value_bytes": stored,
        "api_object_bytes": served,
        "etcd_quota_bytes": quota_bytes,
        "orders_to_quota_compacted": int((quota_bytes - before["db_total_bytes"]) / per_order) if per_order > 0 else 0,
        "full_list_s": list_s,
        "full_list_bytes": list_bytes,
        "full_list_http_status": list_status,
        "apiserver_rss_before_list_mb": rss0,
        "apiserver_rss_after_list_mb": rss1,
        "apiserver_peak_rss_mb": proc_status_mb(apiserver_pid, "VmHWM"),
    }


def api_get(cluster: Cluster, path: str) -> tuple[float, int, int]:
    """(seconds, bytes, HTTP status) of one GET, the answer read but not parsed."""
    started = time.monotonic()
    resp = cluster.api.rest_client.request(
        "GET", cluster.api.configuration.host + path, headers={"Accept": "application/json"}, _request_timeout=(5, 600)
    )
    size = len(resp.read())
    return time.monotonic() - started, size, int(resp.status)


# --- an agent and the CLI on the big queue --------------------------------------------------------


def agent_start(cluster: Cluster, api: Any, ns: str, settle_s: float = 0.0) -> dict[str, Any]:
    """One SDK agent process on a queue of only Pending orders: its first claim, its memory;
    with `settle_s`, its memory again that long after the first claim."""
    claimed = PhaseWatch(api, ns, "Claimed")
    workdir = Path(tempfile.mkdtemp(prefix="scale-agent-", dir=cluster.directory))
    stats = workdir / "stats.json"
    args = [
        sys.executable, str(REPO / "bench" / "bench_agent.py"), "--kubeconfig", cluster.kubeconfig,
        "--namespace", ns, "--work-type", "bench", "--stats", str(stats),
    ]  # fmt: skip
    with open(workdir / "agent.log", "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    started = time.monotonic()
    out_: dict[str, Any] = {}
    try:
        while claimed.count() == 0:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"agent exited with {proc.returncode}: {(workdir / 'agent.log').read_text()[-3000:]}"
                )
            if time.monotonic() - started > AGENT_GIVE_UP_S:
                break  # measured as missed (no claim), its memory all the same
            time.sleep(0.02)
        out_["first_claim_s"] = time.monotonic() - started if claimed.count() else float("nan")
        cpu0, out_["rss_at_first_claim_mb"] = proc_usage(proc.pid)
        log(f"  first claim after {out_['first_claim_s']:.1f}s (RSS {out_['rss_at_first_claim_mb']:.0f} MB)")
        time.sleep(AGENT_WATCH_S)
        cpu1, out_["rss_later_mb"] = proc_usage(proc.pid)
        out_.update(
            later_s=AGENT_WATCH_S,
            cpu_cores_later=(cpu1 - cpu0) / AGENT_WATCH_S,
            claims_later=claimed.count(),
            peak_rss_mb=proc_status_mb(proc.pid, "VmHWM"),
        )
        if settle_s > AGENT_WATCH_S:
            time.sleep(settle_s - AGENT_WATCH_S)
            out_.update(settled_s=settle_s, rss_settled_mb=proc_usage(proc.pid)[1], claims_settled=claimed.count(),
                        peak_rss_settled_mb=proc_status_mb(proc.pid, "VmHWM"))  # fmt: skip
            log(f"  {settle_s:.0f}s after the first claim: RSS {out_['rss_settled_mb']:.0f} MB, "
                f"peak {out_['peak_rss_settled_mb']:.0f} MB, {out_['claims_settled']} claims")  # fmt: skip
    finally:
        claimed.stop()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with_stats = json.loads(stats.read_text()) if stats.exists() else {}
    out_["writes"] = with_stats.get("writes", {})
    return out_


def cli_list(cluster: Cluster, ns: str) -> dict[str, Any]:
    """`kubectl workorder list -n NS`: seconds to its first order line (the one after the header)
    and to the end."""
    plugin = Path(sys.executable).parent / "kubectl-workorder"
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(plugin), "list", "-n", ns, "--kubeconfig", cluster.kubeconfig],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    first, lines = float("nan"), 0
    try:
        for _line in proc.stdout:
            lines += 1
            if lines == 2:
                first = time.monotonic() - started
                log(f"  first order line after {first:.2f}s")
        proc.wait(600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    error = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr is not None else ""
    if proc.returncode:
        log(f"  kubectl workorder list exited with {proc.returncode}: {error}")
    return {
        "first_order_s": first, "total_s": time.monotonic() - started, "lines": lines,
        "exit_code": proc.returncode, "stderr": error,
    }  # fmt: skip


# --- results ------------------------------------------------------------------------------------


def headlines(d: dict[str, Any], target_startup_s: float, target_rss_mb: float) -> list[Headline]:
    a, c, st = d["agent"], d["cli"], d["storage"]
    return [
        Headline("startup to all deadlines armed", d["startup_s"], "s", f"< {target_startup_s:.0f} s",
                 d["startup_s"] < target_startup_s),
        Headline("idle RSS", d["idle_rss_mb"], "MB", f"< {target_rss_mb:.0f} MB", d["idle_rss_mb"] < target_rss_mb),
        Headline("idle CPU", d["idle_cpu_pct_of_core"], "%", f"< {TARGET_CPU_PCT:.0f}% of a core",
                 d["idle_cpu_pct_of_core"] < TARGET_CPU_PCT),
        Headline("peak RSS", d["peak_rss_mb"], "MB"),
        Headline("agent: first claim", a["first_claim_s"], "s", f"< {TARGET_AGENT_CLAIM_S:.0f} s",
                 a["first_claim_s"] < TARGET_AGENT_CLAIM_S),
        Headline("agent: RSS (at first claim, 10 s later)", max(a["rss_at_first_claim_mb"], a["rss_later_mb"]), "MB",
                 f"< {TARGET_AGENT_RSS_MB:.0f} MB",
                 max(a["rss_at_first_claim_mb"], a["rss_later_mb"]) < TARGET_AGENT_RSS_MB),
        Headline("CLI list: first order line", c["first_order_s"], "s", f"< {TARGET_CLI_FIRST_S:.0f} s",
                 c["first_order_s"] < TARGET_CLI_FIRST_S),
        Headline("etcd bytes per order (compacted)", st["etcd_db_bytes_per_order_compacted"], "B"),
        Headline("full LIST", st["full_list_s"], "s"),
    ]  # fmt: skip


def report(d: dict[str, Any], target_startup_s: float, target_rss_mb: float) -> None:
    a, c, st = d["agent"], d["cli"], d["storage"]
    table(
        f"scale: {d['orders']} orders of 1 KB, half Claimed",
        ["figure", "value", "target"],
        [
            ["create (s)", d["create_seconds"], ""],
            ["startup: all tracked + armed (s)", d["startup_s"], f"< {target_startup_s:.0f}"],
            ["  of which /readyz (s)", d["ready_s"], ""],
            ["idle CPU (% of a core)", f"{d['idle_cpu_pct_of_core']:.2f}", f"< {TARGET_CPU_PCT:.0f}"],
            ["idle RSS (MB)", d["idle_rss_mb"], f"< {target_rss_mb:.0f}"],
            ["peak RSS (MB)", d["peak_rss_mb"], ""],
            ["agent: first claim (s)", a["first_claim_s"], f"< {TARGET_AGENT_CLAIM_S:.0f}"],
            ["agent: RSS at first claim / 10 s later (MB)",
             f"{a['rss_at_first_claim_mb']:.0f} / {a['rss_later_mb']:.0f}", f"< {TARGET_AGENT_RSS_MB:.0f}"],
            ["CLI list: first order line / all (s)", f"{c['first_order_s']:.2f} / {c['total_s']:.1f}",
             f"< {TARGET_CLI_FIRST_S:.0f}"],
            ["etcd db bytes per order: created / compacted",
             f"{st['etcd_db_bytes_per_order_created']:.0f} / {st['etcd_db_bytes_per_order_compacted']:.0f}", ""],
            ["stored value / API object (bytes)", f"{st['etcd_value_bytes']} / {st['api_object_bytes']}", ""],
            ["full LIST (s, MB)", f"{st['full_list_s']:.1f}, {st['full_list_bytes'] / 1e6:.0f}", ""],
            ["orders to etcd quota (compacted)", st["orders_to_quota_compacted"], ""],
        ],
    )  # fmt: skip


def chart(d: dict[str, Any]) -> Any:
    target_startup_s, target_rss_mb = next((s, r) for least, s, r in TARGETS if d["orders"] >= least)
    a = d["agent"]
    panels = [
        ("startup to all armed (s)", [("startup", d["startup_s"]), ("/readyz", d["ready_s"])], target_startup_s),
        ("operator RSS (MB)", [("idle", d["idle_rss_mb"]), ("peak", d["peak_rss_mb"])], target_rss_mb),
        ("idle CPU (% of a core)", [("idle", d["idle_cpu_pct_of_core"])], TARGET_CPU_PCT),
        ("agent: first claim (s)", [("agent", a["first_claim_s"]), ("CLI list", d["cli"]["first_order_s"])],
         TARGET_AGENT_CLAIM_S),
        ("agent RSS (MB)", [("1st claim", a["rss_at_first_claim_mb"]), ("+10 s", a["rss_later_mb"])],
         TARGET_AGENT_RSS_MB),
    ]  # fmt: skip
    return bar_panels(panels, f"{d['orders']:,} orders, {d['claimed']:,} Claimed")


def bar_panels(panels: list[tuple[str, list[tuple[str, float]], float]], xlabel: str) -> Any:
    """One bar chart per (title, [(bar, value)], target): green under the target, red over it."""
    fig, axes = new_figure(ncols=len(panels), width=3.6)
    for ax, (title, bars, target) in zip(axes, panels, strict=True):
        colors = ["tab:green" if value < target else "tab:red" for _, value in bars]
        ax.bar([b for b, _ in bars], [v for _, v in bars], color=colors, width=0.6)
        for i, (_, value) in enumerate(bars):
            ax.annotate(f"{value:.3g}", (i, value), textcoords="offset points", xytext=(0, 3), ha="center")
        ax.axhline(target, color="tab:red", linestyle="--", label=f"target < {target:g}")
        ax.set_ylim(0, max(target, *(v for _, v in bars)) * 1.25)
        ax.set_title(title)
        ax.legend(loc="upper right", fontsize=8)
    axes[0].set_xlabel(xlabel)
    return fig


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--orders", type=int, help="this many orders (default 10,000; e.g. 100000)")
    parser.add_argument(
        "--api-orders", type=int, default=API_ORDERS, help="how many are created through the API (the rest: copies)"
    )
    parser.add_argument(
        "--only-agent", action="store_true", help="only the agent and CLI part (every order Pending, no operator)"
    )


def main() -> int:
    def chosen(args: argparse.Namespace) -> dict[str, Any]:
        only = run_agent_only if args.only_agent else run
        return only(args.quick, args.orders, args.api_orders)

    return main_of(chosen, __doc__.split("\n")[0], "1,000 orders and a 10 s idle window", options)


if __name__ == "__main__":
    sys.exit(main())
