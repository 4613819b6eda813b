"""Chaos: the queue keeps its promises when processes die, the control plane goes away, and input is hostile.

1. The operator is SIGKILLed at random moments (seeded) while 300 orders flow through a pool of SDK
   agents that fail some attempts and an agent that abandons claims: every order ends where its
   history says, every attempt ran at most once and was counted once.
2. etcd and kube-apiserver restart mid-run (a control plane of this module's own): the operator
   process and an SDK agent ride it out, orders created before, during and after complete, and
   expiries still happen afterwards.
3. A `kubectl workorder agent run` holding claims is SIGKILLed with its commands: its claims expire,
   another agent finishes them, and nothing of the dead agent's lands late.
4. Bad input against the real API server and the running operator: refused with the field named,
   or a Failed order with a clear reason; the operator keeps serving throughout, without a Traceback.

The tests at the end reproduce product bugs these tests found (now fixed): they guard against regressions.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from devcluster import envtest
from tests.conftest import Cluster
from tests.support import CRDS, KILLABLE_WORK, OperatorProcess, create_order, sample, scrape, wait_for
from tests.support import Agent as Claimer
from tests.support import RunningAgent as Running
from tests.tekton import KANIKO_BUILD
from workorder_operator import lifecycle
from workorder_operator.agent import Agent, Claim, Failure
from workorder_operator.build import ContentError, parse_content
from workorder_operator.errors import Refused, WorkOrderError
from workorder_operator.kube import Conflict, WorkOrders, api_client
from workorder_operator.model import GROUP, PLURAL, VERSION, WorkOrder, utcnow
from workorder_operator.shipwright import BUILDRUNS, BUILDS

STARTED = "workorder engine started"
TERMINAL = ("Completed", "Failed")

# --- helpers ----------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("no_threads_left")


def orders_in(api: client.ApiClient, namespace: str) -> dict[str, WorkOrder]:
    items = client.CustomObjectsApi(api).list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
    return {b["metadata"]["name"]: WorkOrder.from_body(b) for b in items}


def read(api: client.ApiClient, namespace: str, name: str) -> WorkOrder:
    return WorkOrder.from_body(WorkOrders(api, "chaos-reader").get(namespace, name))


def phase_is(api: client.ApiClient, namespace: str, name: str, *phases: str) -> WorkOrder | None:
    order = read(api, namespace, name)
    return order if order.status.phase in phases else None


def outcomes(order: WorkOrder) -> list[str]:
    return [h["outcome"] for h in order.raw_status.get("history", [])]


def restart_operator(operator: OperatorProcess) -> None:
    """Start a killed operator again and wait for *this* start (OperatorProcess.start's own wait
    already sees the previous start's line in the shared log)."""
    starts = operator.log().count(STARTED)
    operator.start()
    wait_for(lambda: operator.log().count(STARTED) > starts, timeout=30, what="the operator to start again")


def delete_orders(api: client.ApiClient, namespace: str, *names: str) -> None:
    """Delete and wait until gone: orders a later test's operator (all namespaces) must never see."""
    objects = client.CustomObjectsApi(api)
    for name in names:
        with contextlib.suppress(client.ApiException):
            objects.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def gone() -> bool:
        left = orders_in(api, namespace)
        return not any(n in left for n in names)

    wait_for(gone, timeout=30, what=f"orders {names} to be deleted")


def admin_status(api: client.ApiClient, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
    """An admin's merge patch of the status subresource."""
    result: dict[str, Any] = client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, {"status": status}, _content_type="application/merge-patch+json"
    )
    return result


@contextlib.contextmanager
def running(
    kubeconfig: Path, namespace: str, handler: Callable[[Claim], str | None], **options: Any
) -> Iterator[Agent]:
    """An SDK agent (own API client) running `handler` for the duration of the block."""
    api = api_client(str(kubeconfig))
    agent = Agent(api, namespace=namespace, work_types=options.pop("work_types", ()))
    runner = Running(agent, handler, **options).start()
    try:
        yield agent
    finally:
        try:
            runner.join()
        finally:
            api.close()


def assert_still_serving(cluster: Cluster, namespace: str, operator: OperatorProcess) -> None:
    """The operator still expires a stale claim, and a normal order created now is claimed by an
    SDK agent and completed; its log holds no Traceback."""
    create_order(cluster.api, namespace, "canary-expiry", workType="canary", claimTimeoutSeconds=2)
    abandoner = Claimer(cluster.api, str(uuid.uuid4()))
    abandoner.claim(abandoner.read(namespace, "canary-expiry"))
    expired = wait_for(
        lambda: phase_is(cluster.api, namespace, "canary-expiry", "Pending"), timeout=15, what="the canary expiry"
    )
    assert outcomes(expired) == ["Expired"]
    create_order(cluster.api, namespace, "canary-normal", workType="canary")
    with running(cluster.kubeconfig, namespace, lambda c: f"served {c.name}", work_types=["canary"]):
        for name in ("canary-normal", "canary-expiry"):
            done = wait_for(
                lambda n=name: phase_is(cluster.api, namespace, n, "Completed"),  # type: ignore[misc]
                timeout=15,
                what=f"{name} to complete",
            )
            assert done.status.result == f"served {name}"
    assert operator.proc is not None and operator.proc.poll() is None, "the operator exited"
    log = operator.log()
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 2000) :][:6000]


# --- 1. the operator is killed again and again while orders flow ------------------------------

ORDERS = 300
MAX_RETRIES = 2
SEED = 1729


def kind_of(i: int) -> str:
    """What the agents' handler does with order i (deterministic, so the end state is known)."""
    if i % 7 == 0:
        return "fatal"  # every attempt fails for good
    if i % 11 == 0:
        return "doomed"  # every attempt fails retryably: Failed once the retries are used up
    if i % 3 == 0:
        return "flaky"  # the first attempt that reaches the agents fails retryably, the next succeeds
    if i % 13 == 0:
        return "slow"  # runs past the claim timeout: only renewal keeps the claim
    return "ok"


EXPECTED = {  # kind -> (final phase, retryCount)
    "fatal": ("Failed", 0),
    "doomed": ("Failed", MAX_RETRIES),
    "flaky": ("Completed", 1),
    "slow": ("Completed", 0),
    "ok": ("Completed", 0),
}


def abandoned_first(i: int) -> bool:
    """Orders whose first claim a flaky agent takes and abandons (it never renews, never reports)."""
    return i % 5 == 0


@dataclass
class Ledger:
    """What the agents did, by (order, attempt)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    executions: Counter[tuple[str, int]] = field(default_factory=Counter)
    executor: dict[tuple[str, int], str] = field(default_factory=dict)
    abandoned: dict[tuple[str, int], str] = field(default_factory=dict)

    def handler(self, claim: Claim) -> str:
        key = (claim.name, claim.attempt)
        with self.lock:
            self.executions[key] += 1
            self.executor[key] = claim.agent.id
        kind = kind_of(int(claim.name.split("-")[1]))
        time.sleep(random.Random(f"{key}").uniform(0, 0.15))
        if kind == "fatal":
            raise Failure("permanent: the input is broken", retryable=False)
        if kind == "doomed":
            raise Failure("transient: still broken")
        if kind == "flaky" and claim.order.status.retry_count == 0:
            raise Failure("transient: try again")
        if kind == "slow":
            time.sleep(3.5)  # longer than claimTimeoutSeconds (2-3): Agent.run renews in the background
        return f"done {claim.name} attempt {claim.attempt}"


def check_order(i: int, order: WorkOrder, ledger: Ledger, pool: set[str], flaky_id: str) -> list[str]:
    """Everything the end state of one order must satisfy; returns what does not hold."""
    name, s, raw = order.name, order.status, order.raw_status
    history = raw.get("history", [])
    problems: list[str] = []

    def bad(what: str) -> None:
        problems.append(f"{name} ({kind_of(i)}): {what}; status {json.dumps(raw, default=str)[:1500]}")

    phase, retries = EXPECTED[kind_of(i)]
    if s.phase != phase:
        bad(f"phase {s.phase}, expected {phase}")
    if s.retry_count != retries:
        bad(f"retryCount {s.retry_count}, expected {retries}")
    if s.attempt >= lifecycle.HISTORY_LIMIT:
        bad(f"attempt {s.attempt} reached the history limit: the test cannot check it")
    # One history entry per attempt, in order: no attempt lost, none counted twice.
    if [h["attempt"] for h in history] != list(range(1, s.attempt + 1)):
        bad(f"history attempts {[h['attempt'] for h in history]} for attempt {s.attempt}")
    kinds = [h["outcome"] for h in history]
    if (kinds[-1:] == ["Succeeded"]) != (s.phase == "Completed"):
        bad(f"last outcome {kinds[-1:]} but phase {s.phase}")
    if s.phase == "Failed" and kinds[-1:] != ["Failed"]:
        bad("Failed without a failed last attempt")
    if s.phase == "Failed" and not (s.retry_count == MAX_RETRIES or "permanent" in (s.result or "")):
        bad("Failed with retries left and a retryable last failure")
    failed = kinds.count("Failed")
    if s.retry_count != failed - (1 if s.phase == "Failed" else 0):
        bad(f"retryCount {s.retry_count} but {failed} failed attempts")
    if kinds.count("Succeeded") > 1 or "Released" in kinds:
        bad(f"outcomes {kinds}")
    for h in history:
        key = (name, h["attempt"])
        if h["outcome"] in ("Succeeded", "Failed"):
            if ledger.executions[key] != 1 or h.get("agent") != ledger.executor.get(key):
                bad(f"attempt {key[1]} {h['outcome']} by {h.get('agent')}, but executed {ledger.executions[key]}x")
        elif h["outcome"] == "Expired":
            by_flaky = ledger.abandoned.get(key) == h.get("agent") == flaky_id
            by_pool = h.get("agent") in pool and ledger.executions[key] == 1
            if not (by_flaky or by_pool):
                bad(f"attempt {key[1]} expired, agent {h.get('agent')}, not one abandoned or run")
    for (n, attempt), count in ledger.executions.items():
        if n == name and (count != 1 or attempt > s.attempt):
            bad(f"attempt {attempt} executed {count}x (order at attempt {s.attempt})")
    for (n, attempt), agent in ledger.abandoned.items():
        if n == name and not any(h["attempt"] == attempt and h["outcome"] == "Expired" for h in history):
            bad(f"abandoned attempt {attempt} of {agent} did not expire")
    return problems


def test_operator_killed_at_random_moments_while_300_orders_flow(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    rng = random.Random(SEED)
    ledger = Ledger()
    flaky_api = api_client(str(cluster.kubeconfig))
    flaky = Agent(flaky_api, namespace=namespace)
    creating_error: list[BaseException] = []
    stop_creating = threading.Event()

    def create_all() -> None:
        """The order flow. The flaky agent claims each designated order straight from the create
        response (ahead of the pool's watch) and abandons it."""
        try:
            for i in range(ORDERS):
                if stop_creating.is_set():
                    return
                body = create_order(
                    flaky_api, namespace, f"o-{i:03d}", workType="chaos", claimTimeoutSeconds=2 + i % 2,
                    backoffSeconds=1, maxRetries=MAX_RETRIES,
                )  # fmt: skip
                if abandoned_first(i):
                    claim = flaky.claim(WorkOrder.from_body(body))
                    if claim is not None:
                        with ledger.lock:
                            ledger.abandoned[(claim.name, claim.attempt)] = flaky.id
                time.sleep(0.05)
        except BaseException as exc:
            creating_error.append(exc)

    apis = [api_client(str(cluster.kubeconfig)) for _ in range(3)]
    pool = [Agent(api, namespace=namespace, work_types=["chaos"]) for api in apis]
    runners = [Running(a, ledger.handler, concurrency=3, shutdown_grace=5).start() for a in pool]
    creator = threading.Thread(target=create_all, name="chaos-creator", daemon=True)
    kills = rng.randint(4, 6)
    started = time.monotonic()
    try:
        creator.start()
        for _ in range(kills):
            time.sleep(rng.uniform(1, 4))
            operator.kill()
            time.sleep(rng.uniform(0.5, 2))
            restart_operator(operator)
        creator.join(120)
        assert not creator.is_alive(), "creating the orders took over 2 minutes"
        assert not creating_error, f"creating orders failed: {creating_error[0]!r}"
        chaos_seconds = time.monotonic() - started

        # Settle with the operator running: nothing may stay Pending, Claimed or RetryPending.
        deadline = time.monotonic() + 120
        while True:
            orders = orders_in(cluster.api, namespace)
            stuck = {n: o.status.phase for n, o in orders.items() if o.status.phase not in TERMINAL}
            if len(orders) == ORDERS and not stuck:
                break
            assert time.monotonic() < deadline, f"not settled 120s after the chaos ({len(orders)} orders): {stuck}"
            time.sleep(0.5)
        for r in runners:
            assert r.error is None, f"an agent's run() failed: {r.error!r}"
    finally:
        stop_creating.set()
        creator.join(30)
        for r in runners:
            r.stop.set()
        for r in runners:
            r.join()
        for api in [*apis, flaky_api]:
            api.close()

    pool_ids = {a.id for a in pool}
    problems = [p for i in range(ORDERS) for p in check_order(i, orders[f"o-{i:03d}"], ledger, pool_ids, flaky.id)]
    assert not problems, f"{len(problems)} problems, the first ones:\n" + "\n".join(problems[:15])
    # The chaos was real: abandoned claims expired across operator restarts, and the restarts happened.
    assert len(ledger.abandoned) >= 20, f"the flaky agent abandoned only {len(ledger.abandoned)} claims"
    expired = sum(outcomes(o).count("Expired") for o in orders.values())
    assert expired >= len(ledger.abandoned)
    assert operator.log().count(STARTED) == kills + 1
    assert operator.proc is not None and operator.proc.poll() is None
    assert "Traceback" not in operator.log()
    print(f"{kills} kills in {chaos_seconds:.0f}s; {expired} expiries; {sum(ledger.executions.values())} executions")


# --- 2. etcd and kube-apiserver restart mid-run ------------------------------------------------


@dataclass
class RestartRun:
    """What happened around `ControlPlane.restart(down=3)` (recorded once, asserted by three tests)."""

    orders: dict[str, WorkOrder] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    creates_refused: int = 0
    create_errors: list[str] = field(default_factory=list)
    operator_pid: tuple[int, int] = (0, 0)
    operator_alive: bool = False
    operator_starts: int = 0
    operator_log: str = ""
    expired: WorkOrder | None = None
    expired_then_completed: WorkOrder | None = None
    in_flight: WorkOrder | None = None
    problems: list[str] = field(default_factory=list)


def _create_retrying(api: client.ApiClient, namespace: str, name: str, run: RestartRun, deadline: float) -> None:
    """Create, retrying through the outage; a 409 means an earlier try got through before its answer was lost."""
    while True:
        try:
            create_order(api, namespace, name, workType="chaos", claimTimeoutSeconds=5)
            return
        except WorkOrderError as exc:
            if exc.status == 409:
                return
            if time.monotonic() > deadline:
                raise
            run.creates_refused += 1
        except Exception:  # connection refused / reset / TLS: the API server is away
            if time.monotonic() > deadline:
                raise
            run.creates_refused += 1
        time.sleep(0.3)


def _restart_scenario(root: Path, run: RestartRun) -> None:
    plane = envtest.ControlPlane(root / "plane")
    plane.start()
    api = config.new_client_from_config(str(plane.kubeconfig))
    op: OperatorProcess | None = None
    gate = threading.Event()
    ns = "chaos"

    def handler(claim: Claim) -> str:
        if claim.name == "in-flight":
            gate.wait(60)  # returns while the control plane is down: its completion meets the outage
            return "finished during the outage"
        time.sleep(0.2)
        return "ok"

    def all_completed() -> bool:
        orders = orders_in(api, ns)
        return all(n in orders and orders[n].status.phase == "Completed" for n in run.names)

    try:
        envtest.install_crds(api, envtest.workorder_crds(CRDS))
        client.CoreV1Api(api).create_namespace({"metadata": {"name": ns}})
        op = OperatorProcess(
            plane.kubeconfig, root / "operator.log", "--all-namespaces", f"--leader-election-namespace={ns}"
        )
        op.start()
        assert op.proc is not None
        pid = op.proc.pid
        with running(plane.kubeconfig, ns, handler, concurrency=2, work_types=["chaos"]):
            before = [f"before-{k}" for k in range(8)]
            for name in before:
                create_order(api, ns, name, workType="chaos", claimTimeoutSeconds=5)
            create_order(api, ns, "in-flight", workType="chaos", claimTimeoutSeconds=600)
            for name in before:
                wait_for(lambda n=name: phase_is(api, ns, n, "Completed"), timeout=30, what=name)  # type: ignore[misc]
            wait_for(lambda: phase_is(api, ns, "in-flight", "Claimed"), timeout=30, what="in-flight claimed")

            during = [f"during-{k}" for k in range(12)]

            def create_during() -> None:
                deadline = time.monotonic() + 120
                try:
                    for name in during:
                        _create_retrying(api, ns, name, run, deadline)
                        time.sleep(0.5)
                except Exception as exc:
                    run.create_errors.append(repr(exc))

            creator = threading.Thread(target=create_during, name="chaos-during", daemon=True)
            restarter = threading.Thread(target=plane.restart, kwargs={"down": 3}, name="chaos-restart", daemon=True)
            creator.start()
            time.sleep(1.0)  # a few orders go in before the outage
            restarter.start()
            # stop() pops each process once it has exited, etcd last: then the whole plane is down.
            wait_for(lambda: "etcd" not in plane.processes, timeout=60, interval=0.02, what="the plane to stop")
            gate.set()  # the in-flight handler returns now, with 3 s of outage ahead
            restarter.join(120)
            assert not restarter.is_alive(), "the control plane did not come back within 2 minutes"
            creator.join(120)
            after = [f"after-{k}" for k in range(8)]
            for name in after:
                create_order(api, ns, name, workType="chaos", claimTimeoutSeconds=5)
            run.names = before + during + after

            # Expiries still happen after the restart: a 2 s claim of an agent that walks away.
            create_order(api, ns, "expiry", workType="expiry", claimTimeoutSeconds=2)
            walker = Claimer(api, str(uuid.uuid4()))
            walker.claim(walker.read(ns, "expiry"))
            try:
                run.expired = wait_for(lambda: phase_is(api, ns, "expiry", "Pending"), timeout=20, what="expiry")
                finisher = Claimer(api, str(uuid.uuid4()))
                run.expired_then_completed = finisher.complete(finisher.claim(run.expired), "after the expiry")
            except AssertionError as exc:
                run.problems.append(str(exc))
            try:
                wait_for(all_completed, timeout=60, interval=0.5, what="every order of the run to complete")
            except AssertionError as exc:
                run.problems.append(str(exc))
            with contextlib.suppress(AssertionError):
                wait_for(lambda: phase_is(api, ns, "in-flight", "Completed"), timeout=4)
            run.orders = orders_in(api, ns)
            run.in_flight = run.orders.get("in-flight")
        run.operator_pid = (pid, op.proc.pid if op.proc else 0)
        run.operator_alive = op.proc is not None and op.proc.poll() is None
    finally:
        gate.set()
        if op is not None:
            op.stop()
            run.operator_log = op.log()
            run.operator_starts = run.operator_log.count(STARTED)
        api.close()
        plane.stop()


@pytest.fixture(scope="module")
def restart_run(tmp_path_factory: pytest.TempPathFactory) -> RestartRun:
    """The scenario runs once, on a control plane of its own that is gone before the tests look."""
    run = RestartRun()
    _restart_scenario(tmp_path_factory.mktemp("restart"), run)
    return run


def test_operator_and_agent_ride_out_an_api_server_and_etcd_restart(restart_run: RestartRun) -> None:
    run = restart_run
    assert not run.create_errors, run.create_errors
    assert run.creates_refused > 0, "no create met the outage: the restart did not happen mid-run"
    assert not run.problems, run.problems
    not_done = {n: run.orders[n].status.phase if n in run.orders else "missing" for n in run.names}
    not_done = {n: p for n, p in not_done.items() if p != "Completed"}
    assert not not_done, f"orders not Completed after the restart: {not_done}"
    for name in run.names:
        order = run.orders[name]
        assert order.status.result == "ok"
        assert outcomes(order)[-1] == "Succeeded" and order.status.retry_count == 0
    # The same operator process, never restarted, still acting: it expired a claim after the outage.
    assert run.operator_pid[0] == run.operator_pid[1] and run.operator_alive
    assert run.operator_starts == 1
    assert run.expired is not None and outcomes(run.expired) == ["Expired"]
    assert run.expired_then_completed is not None
    assert run.expired_then_completed.status.phase == "Completed"
    assert run.expired_then_completed.status.attempt == 2


def test_a_completion_that_meets_the_outage_is_not_lost(restart_run: RestartRun) -> None:
    order = restart_run.in_flight
    assert order is not None
    assert order.status.phase == "Completed", f"in-flight is {order.status.phase}: {order.raw_status}"
    assert order.status.result == "finished during the outage" and order.status.attempt == 1


def test_an_api_outage_leaves_no_traceback_in_the_operator_log(restart_run: RestartRun) -> None:
    log = restart_run.operator_log
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 300) :][:2000]


# --- 3. an agent holding claims is killed -----------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def _agent_run(kubeconfig: Path, namespace: str, agent_id: str, workdir: Path, who: str) -> subprocess.Popen[str]:
    env = dict(os.environ, KUBECONFIG=str(kubeconfig))
    out = open(workdir / f"agent-{who}.out", "w")  # noqa: SIM115 - the child owns it
    try:
        return subprocess.Popen(
            ["kubectl", "workorder", "agent", "run", "-n", namespace, "--id", agent_id, "--type", "script",
             "--concurrency", "3", "--shutdown-grace", "1", "--",
             sys.executable, str(workdir / "work.py"), str(workdir), who],
            stdout=out, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
        )  # fmt: skip
    finally:
        out.close()


@pytest.mark.skipif(shutil.which("kubectl-workorder") is None, reason="plugin not on PATH (make test)")
def test_an_agent_killed_while_holding_claims_loses_them_to_another(
    cluster: Cluster, namespace: str, operator: OperatorProcess, tmp_path: Path
) -> None:
    (tmp_path / "work.py").write_text(KILLABLE_WORK)
    a_id, b_id = str(uuid.uuid4()), str(uuid.uuid4())
    names = [f"job-{k}" for k in range(4)]
    for name in names:
        create_order(cluster.api, namespace, name, workType="script", claimTimeoutSeconds=3, maxRetries=2)
    agent_a = _agent_run(cluster.kubeconfig, namespace, a_id, tmp_path, "A")
    agent_b: subprocess.Popen[str] | None = None
    children: list[int] = []
    try:

        def a_holds_three() -> list[WorkOrder] | None:
            held = [o for o in orders_in(cluster.api, namespace).values() if o.status.claimed_by == a_id]
            pids = list(tmp_path.glob("*.pid"))
            return held if len(held) == 3 and len(pids) == 3 else None

        held = wait_for(a_holds_three, timeout=30, what="agent A to hold 3 claims with their commands running")
        children = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
        time.sleep(1.2)  # A renews at least once: the claims are live, not merely taken
        # kill -9 the agent, its process group, and its commands (each runs in a session of its own).
        os.killpg(agent_a.pid, signal.SIGKILL)
        agent_a.wait(10)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        wait_for(lambda: not any(_alive(p) for p in children), timeout=10, what="A's commands to die")
        killed_at = time.monotonic()

        agent_b = _agent_run(cluster.kubeconfig, namespace, b_id, tmp_path, "B")
        for name in names:
            wait_for(
                lambda n=name: phase_is(cluster.api, namespace, n, "Completed"),  # type: ignore[misc]
                timeout=30,
                what=f"{name} to be completed by agent B",
            )
        took = time.monotonic() - killed_at

        # A's stale claims can never land: a completion of A's attempt is refused and changes nothing.
        orders = WorkOrders(cluster.api, "agent-a-ghost")
        for stale in held:
            with pytest.raises(Conflict):
                orders.write_status(stale, lifecycle.complete(stale, a_id, stale.status.attempt, "late", utcnow()))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(agent_a.pid, signal.SIGKILL)
        agent_a.wait(10)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        if agent_b is not None:
            agent_b.send_signal(signal.SIGTERM)
            try:
                agent_b.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(agent_b.pid, signal.SIGKILL)
                agent_b.wait()
    assert agent_b.returncode == 0, (tmp_path / "agent-B.out").read_text()

    final = orders_in(cluster.api, namespace)
    executions = Counter(tuple(line.split()) for line in (tmp_path / "executions.log").read_text().splitlines())
    held_names = {o.name for o in held}
    for name in names:
        order = final[name]
        history = order.raw_status["history"]
        assert order.status.result == "done by B" and order.status.retry_count == 0
        if name in held_names:
            assert [(h["attempt"], h["outcome"], h["agent"]) for h in history] == [
                (1, "Expired", a_id),
                (2, "Succeeded", b_id),
            ], history
            assert a_id in history[0]["message"]
            assert executions[("A", name, "1")] == 1 and executions[("B", name, "2")] == 1
        else:
            assert [(h["attempt"], h["outcome"], h["agent"]) for h in history] == [(1, "Succeeded", b_id)]
            assert executions[("B", name, "1")] == 1
    assert sum(executions.values()) == 3 + 4, executions
    # Settled: nothing of A's arrives later.
    time.sleep(1)
    assert {n: o.raw_status for n, o in orders_in(cluster.api, namespace).items()} == {
        n: o.raw_status for n, o in final.items()
    }
    assert took < 20, f"A's claims took {took:.1f}s to be taken over and completed"
    assert "Traceback" not in operator.log()


# --- 4. bad input -----------------------------------------------------------------------------

BOMB = "\n".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"{chr(98 + k)}: &{chr(98 + k)} [" + ", ".join([f"*{chr(97 + k)}"] * 9) + "]" for k in range(8)]
)
BUILD = "apiVersion: shipwright.io/v1beta1\nkind: Build\nmetadata:\n  name: {name}\n"
# A document of a disallowed kind just under the 256 KiB limit (one long scalar: cheap to parse).
HUGE = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: huge\nstringData:\n  blob: " + "x" * 261_000 + "\n"
HOSTILE = [
    ("bomb", BOMB, "YAML aliases are not allowed"),
    ("huge", HUGE, "kind Secret"),
    ("deep", "[" * 1500 + "]" * 1500, "nested too deeply"),
    ("many-documents", "---\na: 1\n" * 60, "more than 50 documents"),
    ("control-character", "kind: Build\x07\n", "special characters are not allowed"),
    ("python-tag", "!!python/object/apply:os.system ['touch /tmp/workorder-chaos-pwned']\n", "could not determine"),
    ("binary", BUILD.format(name="bin") + "spec:\n  x: !!binary aGVsbG8=\n", "cannot be sent to the API as JSON"),
    ("nan", BUILD.format(name="nan") + "spec:\n  x: .nan\n", "cannot be sent to the API as JSON"),
    ("list", "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: sneaky}}\n",
     "kind List"),
    ("scalar", "just words\n", "is a string, not a mapping"),
    ("nothing", "---\n# only a comment\n---\n", "nothing to build"),
    ("second-namespace", BUILD.format(name="one") + "---\n" + BUILD.format(name="two") + "  namespace: default\n",
     'names namespace "default"'),
    ("ref-other-namespace",
     "apiVersion: workorder.dev/v1alpha1\nkind: WorkOrder\nmetadata: {name: x, namespace: kube-system}\n"
     "spec: {buildRef: {name: b}}\n", 'names namespace "kube-system"'),
    ("ref-traversal", "apiVersion: workorder.dev/v1alpha1\nkind: WorkOrder\nmetadata: {name: x}\n"
     "spec: {buildRef: {name: ../../etc}}\n", "is not a valid Build name"),
]  # fmt: skip
# Raw request bodies: the API takes JSON; invalid UTF-8 bytes and a lone surrogate escape.
RAW = [
    ("not-utf8", b"apiVersion: shipwright.io/v1beta1\\nkind: Build\\nmetadata:\\n  name: app\xff\xfe\\n"),
    ("surrogate", b"apiVersion: shipwright.io/v1beta1\\nkind: Build\\nmetadata:\\n  name: app\\ud800\\n"),
]


def _post_raw(api: client.ApiClient, namespace: str, name: str, content: bytes) -> Any:
    body = (
        b'{"apiVersion":"workorder.dev/v1alpha1","kind":"WorkOrder","metadata":{"name":"' + name.encode() + b'"},'
        b'"spec":{"workType":"build","maxRetries":5,"yamlContent":"' + content + b'"}}'
    )
    url = f"{api.configuration.host}/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
    return api.rest_client.pool_manager.request(
        "POST", url, body=body, headers={"Content-Type": "application/json"}, timeout=30
    )


def test_hostile_build_content_fails_each_order_clearly_while_the_operator_serves(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    for case, content, _ in HOSTILE:
        create_order(cluster.api, namespace, case, workType="build", yamlContent=content, maxRetries=5)
    # The API server does not refuse bytes that are not UTF-8 (nor a lone surrogate): it stores U+FFFD.
    for case, content in RAW:
        answer = _post_raw(cluster.api, namespace, case, content)
        assert answer.status == 201, answer.data[:500]
        stored = read(cluster.api, namespace, case).spec.yaml_content
        assert "name: app\ufffd" in stored, repr(stored)
    expected = [(case, said) for case, _, said in HOSTILE] + [(case, "is not a valid name") for case, _ in RAW]
    for case, said in expected:
        failed = wait_for(
            lambda c=case: phase_is(cluster.api, namespace, c, *TERMINAL),  # type: ignore[misc]
            timeout=30,
            what=f"{case} to be refused",
        )
        assert failed.status.phase == "Failed", (case, failed.raw_status)
        assert said in (failed.status.result or ""), (case, failed.status.result)
        assert failed.status.retry_count == 0 and failed.status.attempt <= 1, (case, failed.raw_status)
    # Nothing was created with the operator's privileges, here or elsewhere.
    objects = client.CustomObjectsApi(cluster.api)
    core = client.CoreV1Api(cluster.api)
    for plural in (BUILDS, BUILDRUNS):
        assert objects.list_namespaced_custom_object("shipwright.io", "v1beta1", namespace, plural)["items"] == []
    for ns in (namespace, "default", "kube-system"):
        assert "sneaky" not in [c.metadata.name for c in core.list_namespaced_config_map(ns).items]
        assert "huge" not in [s.metadata.name for s in core.list_namespaced_secret(ns).items]
    assert not Path("/tmp/workorder-chaos-pwned").exists()
    assert_still_serving(cluster, namespace, operator)


def test_yaml_content_over_256_kib_is_refused_naming_the_field(cluster: Cluster, namespace: str) -> None:
    create_order(cluster.api, namespace, "at-limit", yamlContent="x" * 262_144)
    with pytest.raises(Refused) as err:
        create_order(cluster.api, namespace, "over-limit", workType="build", yamlContent="x" * 262_145)
    assert err.value.status == 422
    message = json.loads(err.value.body)["message"]
    assert "spec.yamlContent" in message and "262144" in message, message
    assert "over-limit" not in orders_in(cluster.api, namespace)


NOW = "2030-01-01T00:00:00.000000Z"
MALFORMED_STATUS = [
    ({"phase": "Bogus"}, "status.phase"),
    ({"attempt": -1}, "status.attempt"),
    ({"retryCount": -3}, "status.retryCount"),
    ({"attempt": "1"}, "status.attempt"),
    ({"claimedAt": "not-a-time"}, "status.claimedAt"),
    ({"nextRetryAfter": "2030-01-01T25:00:00Z"}, "status.nextRetryAfter"),
    ({"history": [{"attempt": 1, "outcome": "Maybe"}]}, "status.history[0].outcome"),
    ({"history": [{"outcome": "Failed"}]}, "status.history[0].attempt"),
    ({"history": [{"attempt": 1, "outcome": "Failed"}] * 21}, "status.history"),
    ({"history": "all good"}, "status.history"),
    ({"claimedBy": "x" * 37}, "status.claimedBy"),
    ({"result": "r" * 16_385}, "status.result"),
    ({"conditions": [{"type": "Succeeded", "status": "Perhaps", "reason": "R", "message": "",
                      "lastTransitionTime": NOW}]}, "status.conditions[0].status"),
    ({"conditions": [{"type": "Succeeded"}]}, "status.conditions[0].reason"),
]  # fmt: skip


def test_malformed_status_writes_are_refused_naming_the_field(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    create_order(cluster.api, namespace, "target")
    # After the operator's initialise (its only write), so that nothing else changes the status.
    before = wait_for(
        lambda: (o := read(cluster.api, namespace, "target")).raw_status.get("conditions") and o, timeout=15
    )
    objects = client.CustomObjectsApi(cluster.api)
    for status, field_path in MALFORMED_STATUS:
        with pytest.raises(client.ApiException) as merge:
            admin_status(cluster.api, namespace, "target", status)
        # The same write as a JSON Patch, the way agents and the operator write.
        with pytest.raises(client.ApiException) as patch:
            objects.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, "target",
                [{"op": "add", "path": "/status", "value": {**before.raw_status, **status}}],
                _content_type="application/json-patch+json",
            )  # fmt: skip
        for err in (merge.value, patch.value):
            assert err.status == 422, (status, err.status, err.body)
            message = json.loads(err.body)["message"]
            assert field_path in message, (status, message)
    after = read(cluster.api, namespace, "target")
    assert after.raw_status == before.raw_status and after.resource_version == before.resource_version
    assert_still_serving(cluster, namespace, operator)


# --- product bugs these tests found (fixed; kept as regression tests) ----------------------------

# Timestamps the API server's date-time format accepts but Python cannot read (year 0; a separator
# other than T). Go's strfmt checks `^..:..:..(.[0-9]+)?(z|[+-]..:..)$` after the date, with an
# unescaped `.`, and parses the date with time.Parse, which takes year 0000.
ODD_TIME = "0000-01-01T00:00:00Z"


def test_the_api_server_accepts_timestamps_python_cannot_read(cluster: Cluster, namespace: str) -> None:
    """The premise of the two tests below (so they cannot pass for the wrong reason)."""
    create_order(cluster.api, namespace, "odd")
    try:
        for stamp in (ODD_TIME, "2030-01-01T00:00:00x5Z"):
            admin_status(cluster.api, namespace, "odd", {"lastErrorAt": stamp})
            with pytest.raises(ValueError):
                read(cluster.api, namespace, "odd")
    finally:
        delete_orders(cluster.api, namespace, "odd")


def test_one_order_with_an_odd_timestamp_does_not_stop_agents_taking_the_others(
    cluster: Cluster, namespace: str
) -> None:
    create_order(cluster.api, namespace, "poison", workType="chaos")
    admin_status(cluster.api, namespace, "poison", {"phase": "Pending", "lastErrorAt": ODD_TIME})
    create_order(cluster.api, namespace, "normal", workType="chaos")
    try:
        with running(cluster.kubeconfig, namespace, lambda c: "ok", work_types=["chaos"]):
            wait_for(lambda: phase_is(cluster.api, namespace, "normal", "Completed"), timeout=6, what="normal")
    finally:
        delete_orders(cluster.api, namespace, "poison")


def test_an_odd_timestamp_on_some_claimed_order_does_not_stop_the_build_agent(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    create_order(cluster.api, namespace, "poison")
    admin_status(
        cluster.api, namespace, "poison",
        {"phase": "Claimed", "claimedBy": str(uuid.uuid4()), "attempt": 1, "claimedAt": ODD_TIME},
    )  # fmt: skip
    op = OperatorProcess(
        cluster.kubeconfig, tmp_path / "operator.log", "--all-namespaces", f"--leader-election-namespace={namespace}"
    )
    try:
        op.start()
        create_order(cluster.api, namespace, "app", workType="build", yamlContent=KANIKO_BUILD.format(name="app"))
        objects = client.CustomObjectsApi(cluster.api)

        def applied() -> bool:
            try:
                objects.get_namespaced_custom_object("shipwright.io", "v1beta1", namespace, BUILDS, "app")
            except client.ApiException:
                return False
            return True

        wait_for(applied, timeout=8, what="the build agent to apply the Build")
        assert "Traceback" not in op.log()
    finally:
        op.stop()
        delete_orders(cluster.api, namespace, "poison")


def test_a_far_future_timestamp_does_not_crash_the_operators_event_handler(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    far = "9999-12-31T23:59:59Z"
    port = envtest.free_port()
    op = OperatorProcess(
        cluster.kubeconfig, tmp_path / "operator.log", "--all-namespaces",
        f"--leader-election-namespace={namespace}", f"--metrics-port={port}", "--metrics-insecure",
    )  # fmt: skip
    create_order(cluster.api, namespace, "far-claim", workType="far-future")
    create_order(cluster.api, namespace, "far-ttl", workType="far-future", ttlSecondsAfterFinished=60)
    try:
        op.start()
        admin_status(
            cluster.api, namespace, "far-claim",
            {"phase": "Claimed", "claimedBy": str(uuid.uuid4()), "attempt": 1, "claimedAt": NOW, "renewedAt": far},
        )  # fmt: skip
        admin_status(cluster.api, namespace, "far-ttl", {"phase": "Completed", "completedAt": far})

        # The engine has taken both far-dated versions in (it tracks them by phase, metrics say
        # so) and armed their deadlines in the same step: a crash would be in the log by now.
        def tracked() -> bool:
            text = scrape(port)[1]
            return all(
                sample(text, "workorder_orders", phase=p, type="far-future") == 1 for p in ("Claimed", "Completed")
            )

        wait_for(tracked, timeout=30, what="the operator to track both far-dated orders")
        log = op.log()
        assert "Traceback" not in log, log[max(0, log.index("Traceback") - 300) :][:3000]
        # Neither far deadline is due: the claim is not expired, the finished order not deleted.
        assert phase_is(cluster.api, namespace, "far-claim", "Claimed")
        assert phase_is(cluster.api, namespace, "far-ttl", "Completed")
        assert_still_serving(cluster, namespace, op)
    finally:
        op.stop()
        delete_orders(cluster.api, namespace, "far-claim", "far-ttl")


FLOW = "[" + "a," * 131_000 + "]"  # 262 KB of YAML: seconds of pure-Python parsing


def test_parsing_huge_build_content_does_not_stall_deadlines(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    # How long one parse takes on this machine now: a stalled event loop would be at least this late.
    started = time.monotonic()
    with pytest.raises(ContentError):
        parse_content(FLOW, namespace)
    parse_seconds = time.monotonic() - started
    create_order(cluster.api, namespace, "canary", claimTimeoutSeconds=2)
    walker = Claimer(cluster.api, str(uuid.uuid4()))
    walker.claim(walker.read(namespace, "canary"))
    claimed = time.monotonic()
    huge = [f"huge-{k}" for k in range(2)]
    try:
        for name in huge:
            create_order(cluster.api, namespace, name, workType="build", yamlContent=FLOW, maxRetries=0)
        wait_for(lambda: phase_is(cluster.api, namespace, "canary", "Pending"), timeout=60, what="the canary expiry")
        late = time.monotonic() - claimed - 2
        # Parsing on the event loop would delay the expiry by about two parses (two orders).
        assert late < max(2.5, parse_seconds), f"the 2 s claim expired {late:.1f}s late ({parse_seconds:.1f}s a parse)"
    finally:
        for name in huge:  # parsed: now gone, so that no later operator parses them again
            wait_for(lambda n=name: phase_is(cluster.api, namespace, n, *TERMINAL), timeout=60)  # type: ignore[misc]
        delete_orders(cluster.api, namespace, *huge)


def test_a_build_the_api_server_refuses_fails_at_once_with_its_reason(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    content = KANIKO_BUILD.format(name="typo").replace("    name: kaniko\n", "    name: 5\n")
    create_order(cluster.api, namespace, "typo", workType="build", yamlContent=content, maxRetries=2, backoffSeconds=1)
    order = wait_for(
        lambda: phase_is(cluster.api, namespace, "typo", "RetryPending", "Failed"), timeout=20, what="an outcome"
    )
    text = order.status.last_error or ""
    assert order.status.phase == "Failed" and order.status.retry_count == 0, order.raw_status
    assert "spec.strategy.name" in text and "HTTP response headers" not in text, text


def test_a_build_document_cannot_set_finalizers_with_the_operators_rights(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    content = KANIKO_BUILD.format(name="pinned").replace(
        "  name: pinned\n", "  name: pinned\n  finalizers: [example.com/never-removed]\n"
    )
    create_order(cluster.api, namespace, "pinned", workType="build", yamlContent=content, maxRetries=0)
    objects = client.CustomObjectsApi(cluster.api)

    def outcome() -> tuple[str, Any] | None:
        order = read(cluster.api, namespace, "pinned")
        if order.status.phase == "Failed":
            return ("failed", order.status.result)
        try:
            build = objects.get_namespaced_custom_object("shipwright.io", "v1beta1", namespace, BUILDS, "pinned")
        except client.ApiException:
            return None
        return ("applied", build["metadata"].get("finalizers"))

    try:
        kind, detail = wait_for(outcome, timeout=20, what="the build order to be refused or applied")
        if kind == "failed":
            assert "finalizers" in (detail or ""), detail
        else:
            assert not detail, f"the Build was applied with finalizers {detail}"
    finally:
        with contextlib.suppress(client.ApiException):
            objects.patch_namespaced_custom_object(
                "shipwright.io", "v1beta1", namespace, BUILDS, "pinned", {"metadata": {"finalizers": None}},
                _content_type="application/merge-patch+json",
            )  # fmt: skip
