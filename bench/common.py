"""Shared helpers for the benchmarks: a local control plane, the operator as a subprocess, its
/metrics, /proc usage of a process, percentiles, results (JSON + PNG chart) and a table print.

Every benchmark starts its own control plane in a temporary directory (so runs never share
state) and stops it, and the operator, in `finally` blocks: also on Ctrl-C and SIGTERM
(`handle_sigterm` makes both unwind as KeyboardInterrupt).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import matplotlib
from kubernetes import client, watch
from prometheus_client.parser import text_string_to_metric_families

from devcluster import envtest
from workorder_operator import lifecycle
from workorder_operator.kube import Conflict, WorkOrders, api_client
from workorder_operator.model import GROUP, PLURAL, VERSION, WorkOrder, order_body, utcnow

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
WORK_TYPE = "bench"
T = TypeVar("T")


# --- process hygiene ----------------------------------------------------------------------------


def handle_sigterm() -> None:
    """Make SIGTERM (and SIGINT, even when started in the background with it ignored) unwind as
    KeyboardInterrupt, so every `finally` stops what the benchmark started."""

    def raise_interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_interrupt)
        signal.signal(signal.SIGINT, raise_interrupt)


def main_of(
    run: Callable[[argparse.Namespace], object],
    description: str,
    quick_help: str,
    options: Callable[[argparse.ArgumentParser], object] | None = None,
) -> int:
    """The command line of one benchmark: `python bench/NAME.py [--quick] [its own options]`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if options is not None:
        options(parser)
    args = parser.parse_args()
    handle_sigterm()
    try:
        run(args)
    except KeyboardInterrupt:
        print("interrupted: everything the benchmark started is stopped", file=sys.stderr)
        return 130
    return 0


@contextlib.contextmanager
def thread_pool(workers: int, prefix: str) -> Iterator[ThreadPoolExecutor]:
    """A pool that, on an exception (Ctrl-C), drops queued work instead of finishing it."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix=prefix)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def run_all(pool: ThreadPoolExecutor, fn: Callable[[int], T], n: int) -> list[T]:
    """fn(0..n-1) on the pool; results in order; the first error is raised."""
    futures: list[Future[T]] = [pool.submit(fn, i) for i in range(n)]
    return [f.result() for f in futures]


# --- the control plane --------------------------------------------------------------------------


@dataclass
class Cluster:
    plane: envtest.ControlPlane
    directory: Path
    api: client.ApiClient

    @property
    def kubeconfig(self) -> str:
        return str(self.plane.kubeconfig)

    def client(self, pool: int = 4) -> client.ApiClient:
        """A new API client (own connection pool), like a separate process would have."""
        return api_client(self.kubeconfig, pool=pool)

    def namespace(self, name: str) -> str:
        client.CoreV1Api(self.api).create_namespace({"metadata": {"name": name}})
        return name


@contextlib.contextmanager
def control_plane(name: str) -> Iterator[Cluster]:
    """etcd + kube-apiserver + kube-controller-manager in a temp dir, with the WorkOrder CRD.
    Stopped (and the directory removed) on the way out, whatever happens."""
    directory = Path(tempfile.mkdtemp(prefix=f"wo-bench-{name}-"))
    plane = envtest.ControlPlane(directory / "cp")
    try:
        started = time.monotonic()
        plane.start()
        api = api_client(str(plane.kubeconfig), pool=64)
        envtest.install_crds(api, envtest.workorder_crds(REPO / "crds"))
        log(f"control plane ready in {time.monotonic() - started:.1f}s ({directory})")
        yield Cluster(plane, directory, api)
    finally:
        plane.stop()
        shutil.rmtree(directory, ignore_errors=True)


# --- the operator -------------------------------------------------------------------------------


class Operator:
    """The operator as a subprocess (single replica, all namespaces, no build agent, /metrics on)."""

    def __init__(
        self, cluster: Cluster, name: str, concurrency: int | None = None, namespaces: Sequence[str] = ()
    ) -> None:
        self.cluster = cluster
        self.name = name
        self.port = envtest.free_port()
        self.log_path = cluster.directory / "operator.log"
        args = [
            sys.executable, "-m", "workorder_operator.main", "--kubeconfig", cluster.kubeconfig,
            "--no-leader-election", "--no-build-agent", "--metrics-port", str(self.port), "--metrics-insecure",
        ]  # fmt: skip
        args += [f"--namespace={ns}" for ns in namespaces] or ["--all-namespaces"]
        if concurrency is not None:
            args += ["--concurrency", str(concurrency)]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Seconds from start until /readyz answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(OSError), urllib.request.urlopen(self.url("/readyz"), timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - self.started
            time.sleep(0.1)
        raise RuntimeError(f"operator not ready after {timeout:.0f}s; log: {self.log_path}")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"operator exited with {self.proc.returncode}:\n{tail}")

    def metrics(self) -> Metrics:
        with urllib.request.urlopen(self.url("/metrics"), timeout=10) as resp:
            return Metrics(resp.read().decode())

    def usage(self) -> tuple[float, float]:
        return proc_usage(self.pid)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s; keeps a copy of the log under bench/results/."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            RESULTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.log_path, RESULTS / f"{self.name}-operator.log")


@contextlib.contextmanager
def operator(
    cluster: Cluster, name: str, *, wait: bool = True, concurrency: int | None = None, namespaces: Sequence[str] = ()
) -> Iterator[Operator]:
    """`namespaces`: the ones it watches (empty: all)."""
    op = Operator(cluster, name, concurrency, namespaces)
    try:
        if wait:
            op.wait_ready()
        yield op
    finally:
        op.stop()


class Metrics:
    """One scrape of a /metrics page (the operator's, or the API server's: `apiserver_metrics`)."""

    def __init__(self, text: str) -> None:
        self.samples: list[tuple[str, dict[str, str], float]] = [
            (s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]

    def sum(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples whose labels include `labels`."""
        return sum(v for n, lab, v in self.samples if n == name and all(lab.get(k) == x for k, x in labels.items()))

    def by(self, name: str, *keys: str) -> dict[tuple[str, ...], float]:
        """A metric's samples summed by the values of the labels `keys`."""
        out: dict[tuple[str, ...], float] = {}
        for n, labels, v in self.samples:
            if n == name:
                key = tuple(labels.get(k, "") for k in keys)
                out[key] = out.get(key, 0.0) + v
        return out


def apiserver_metrics(cluster: Cluster) -> Metrics:
    """The API server's own /metrics (requests by verb and resource, watch events, its CPU)."""
    resp = cluster.api.rest_client.request("GET", f"{cluster.api.configuration.host}/metrics", _request_timeout=(5, 60))
    resp.read()
    return Metrics(resp.data.decode())


def metric_delta(before: Metrics, after: Metrics, name: str, *keys: str) -> dict[tuple[str, ...], float]:
    """How much each series of a counter grew between two scrapes (series that did not grow left out)."""
    old = before.by(name, *keys)
    return {k: v - old.get(k, 0.0) for k, v in after.by(name, *keys).items() if v - old.get(k, 0.0) > 0}


# --- measuring ----------------------------------------------------------------------------------


def proc_usage(pid: int) -> tuple[float, float]:
    """(CPU seconds used so far, user + system, all threads; RSS in MB) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return cpu, proc_status_mb(pid, "VmRSS")


def proc_status_mb(pid: int, key: str) -> float:
    """A memory figure of /proc/PID/status (VmRSS, VmHWM: peak RSS) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return math.nan


class CpuMeter:
    """CPU seconds used by the parts of the system over an interval: this process (the load
    generator: agents, creators, watches), the operator, kube-apiserver and etcd. On a shared
    2-core machine this says which of them ran out of CPU."""

    def __init__(self, cluster: Cluster, op: Operator | None = None) -> None:
        self.pids = {"bench": os.getpid()}
        if op is not None:
            self.pids["operator"] = op.pid
        for name in ("kube-apiserver", "etcd"):
            if name in cluster.plane.processes:
                self.pids[name] = cluster.plane.processes[name].pid
        self._start = self._sample()

    def _sample(self) -> tuple[float, dict[str, float]]:
        out = {"machine": machine_busy_seconds()}
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                out[name] = proc_usage(pid)[0]
        return time.monotonic(), out

    def stop(self) -> dict[str, float]:
        """{part: cores used on average} since construction; "machine": every process on the
        machine (so machine - the parts = other load); "wall_s": the interval."""
        (t0, start), (t1, end) = self._start, self._sample()
        wall = max(t1 - t0, 1e-9)
        shares = {name: round((end[name] - start[name]) / wall, 3) for name in start if name in end}
        return {**shares, "wall_s": round(wall, 3)}


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle (all cores), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values, default=math.nan),
        "mean": statistics.fmean(values) if values else math.nan,
    }


def machine() -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text().split()
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), platform.processor())
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "ram_gb": round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 1024 / 1024, 1),
        "cpu": model,
        "loadavg_at_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "kubernetes": envtest.K8S_VERSION,
        "etcd": envtest.ETCD_VERSION,
        "commit": commit.stdout.strip(),
    }


def log(message: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {message}", flush=True)


# --- orders -------------------------------------------------------------------------------------


def bench_order(name: str, **spec: Any) -> dict[str, Any]:
    return order_body(name, **{"workType": WORK_TYPE, "yamlContent": "x: 1\n", **spec})


def create_order(api: client.ApiClient, namespace: str, name: str, **spec: Any) -> WorkOrder:
    """Create an order; the answer already reads Pending (CRD defaults)."""
    return WorkOrder.from_body(WorkOrders(api, "bench").create(bench_order(name, **spec), namespace))


def cas(orders: WorkOrders, order: WorkOrder, make: Callable[[WorkOrder], lifecycle.StatusWrite]) -> WorkOrder:
    """A status compare-and-swap that re-reads and tries again on a lost race (the operator may
    write first, e.g. its initialise)."""
    for _ in range(10):
        try:
            return WorkOrder.from_body(orders.write_status(order, make(order)))
        except (Conflict, lifecycle.TransitionError):
            order = WorkOrder.from_body(orders.get(order.namespace, order.name))
    raise RuntimeError(f"cannot write {order.key}: 10 lost races in a row")


class CountingWorkOrders(WorkOrders):
    """WorkOrders that counts status writes by transition, lost races (Conflict) and wins."""

    def __init__(self, api: client.ApiClient, field_manager: str, on_write: Callable[[str, WorkOrder, bool], None]):
        super().__init__(api, field_manager)
        self.on_write = on_write

    def write_status(self, order: WorkOrder, write: lifecycle.StatusWrite) -> dict[str, Any]:
        try:
            body = super().write_status(order, write)
        except Conflict:
            self.on_write(write.transition, order, False)
            raise
        self.on_write(write.transition, order, True)
        return body


class PhaseWatch:
    """A watch on one namespace's orders that records when each is first seen in `phase`
    (with a field selector, so only those events travel)."""

    def __init__(self, api: client.ApiClient, namespace: str, phase: str, names: Iterable[str] | None = None) -> None:
        self.api, self.namespace, self.phase = api, namespace, phase
        self.only: set[str] | None = set(names) if names is not None else None
        self.seen: dict[str, float] = {}  # name -> time.time() when first seen
        self.seen_dt: dict[str, dt.datetime] = {}
        self.after: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        objects = client.CustomObjectsApi(api)
        listing = objects.list_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, field_selector=f"status.phase={phase}", limit=1
        )
        self._version = listing["metadata"]["resourceVersion"]
        self._thread = threading.Thread(target=self._run, name=f"watch-{namespace}-{phase}", daemon=True)
        self._thread.start()

    def allow(self, name: str, after: WorkOrder | None = None) -> None:
        """Count `name` from now on (when constructed with names=[]); with `after`, only a version
        newer than that one (a late event of an older version must not count)."""
        with self._lock:
            if self.only is not None:
                self.only.add(name)
            if after is not None:
                self.after[name] = int(after.resource_version)

    def _run(self) -> None:
        objects = client.CustomObjectsApi(self.api)
        while not self._stop.is_set():
            self._watch = watch.Watch()
            try:
                for event in self._watch.stream(
                    objects.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL,
                    field_selector=f"status.phase={self.phase}", resource_version=self._version,
                    timeout_seconds=300, allow_watch_bookmarks=True,
                ):  # fmt: skip
                    now, now_dt = time.time(), utcnow()
                    body = event["object"]
                    if event["type"] == "ERROR":
                        raise RuntimeError(f"watch error: {body.get('message')}")
                    self._version = body["metadata"]["resourceVersion"]
                    if event["type"] not in ("ADDED", "MODIFIED"):
                        continue
                    name = body["metadata"]["name"]
                    version = int(body["metadata"]["resourceVersion"])
                    with self._lock:
                        if (
                            name not in self.seen
                            and (self.only is None or name in self.only)
                            and version > self.after.get(name, 0)
                        ):
                            self.seen[name] = now
                            self.seen_dt[name] = now_dt
                    if self._stop.is_set():
                        return
            except Exception as exc:
                if self._stop.is_set():
                    return
                log(f"watch of {self.phase} orders in {self.namespace} interrupted ({exc}); resuming")
                time.sleep(0.5)

    def count(self) -> int:
        with self._lock:
            return len(self.seen)

    def wait(self, count: int, timeout: float, on_progress: Callable[[], None] | None = None) -> bool:
        end = time.monotonic() + timeout
        while self.count() < count:
            if time.monotonic() > end:
                return False
            if on_progress is not None:
                on_progress()
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()


def list_orders(api: client.ApiClient, namespace: str, field_selector: str = "") -> list[WorkOrder]:
    """Every order of a namespace (paged, so a big namespace does not need one huge answer)."""
    objects = client.CustomObjectsApi(api)
    out: list[WorkOrder] = []
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"limit": 500, "field_selector": field_selector}
        if token:
            kwargs["_continue"] = token
        page = objects.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, **kwargs)
        out += [WorkOrder.from_body(b) for b in page["items"]]
        token = page["metadata"].get("continue")
        if not token:
            return out


# --- results ------------------------------------------------------------------------------------


@dataclass
class Headline:
    """One figure for the summary table: value against a target (None: no target)."""

    name: str
    value: float | str
    unit: str
    target: str = ""
    met: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "unit": self.unit, "target": self.target, "met": self.met}


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.2) -> tuple[Figure, Any]:
    """A figure with `ncols` axes side by side (PNG only: the Agg backend, no display needed)."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, axes[0]


def write_results(
    name: str, quick: bool, data: dict[str, Any], headlines: list[Headline], fig: Figure
) -> dict[str, Any]:
    """bench/results/NAME.json and NAME.png; returns the whole record."""
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "quick": quick,
        "date": utcnow().isoformat(timespec="seconds"),
        "machine": machine(),
        "headlines": [h.as_dict() for h in headlines],
        **data,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    when = utcnow().strftime("%Y-%m-%d %H:%M UTC")
    fig.suptitle(f"{name}{' (quick)' if quick else ''} — {when}, {record['machine']['nproc']} cores")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    plt.close(fig)
    print_headlines(name, headlines)
    print(f"results: {RESULTS / (name + '.json')}, chart: {RESULTS / (name + '.png')}", flush=True)
    return record


def fmt(value: float | str, unit: str = "") -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if isinstance(value, int):
        return f"{value:,} {unit}".strip()
    if unit in ("%",):
        return f"{value:.2f}%"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}".strip() if unit not in ("", "%") else text


def table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]], left: int = 1) -> None:
    """A short aligned table: the first `left` columns aligned left, the others right."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        aligned = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  " + "  ".join(aligned))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))


def print_headlines(name: str, headlines: list[Headline]) -> None:
    table(
        f"{name}:",
        ["figure", "value", "target", "met"],
        [
            [h.name, fmt(h.value, h.unit), h.target or "-", {True: "yes", False: "NO", None: "-"}[h.met]]
            for h in headlines
        ],
    )
