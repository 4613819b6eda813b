"""The operator's command line, each option shown doing what it says on the real control plane:
the namespaces it watches, the built-in build agent's switches, the event rate limit, and
metrics with two replicas.

No build ever finishes in these tests: without Shipwright's controller a Build is never
registered, with it a BuildRun never ends (nobody plays Tekton here), so a build attempt stays
busy for as long as a test needs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client

from devcluster.envtest import free_port
from tests.conftest import Cluster
from tests.support import Agent, OperatorProcess, create_order, sample, scrape, wait_for
from tests.tekton import KANIKO_BUILD
from workorder_operator.engine import EVENT_BURST
from workorder_operator.model import WorkOrder, parse_time

Start = Callable[..., OperatorProcess]


@pytest.fixture
def start(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[Start]:
    """Start operators with extra options (each stopped after the test, even on failure)."""
    started: list[OperatorProcess] = []

    def run(*options: str, scope: tuple[str, ...] = ("--all-namespaces",)) -> OperatorProcess:
        op = OperatorProcess(
            cluster.kubeconfig, tmp_path / f"operator-{len(started)}.log", *scope,
            f"--leader-election-namespace={namespace}", *options,
        )  # fmt: skip
        started.append(op)
        op.start()
        return op

    yield run
    for op in started:
        op.stop()


def agent(cluster: Cluster) -> Agent:
    return Agent(cluster.api, str(uuid.uuid4()))


def initialised(a: Agent, namespace: str, name: str) -> WorkOrder | None:
    order = a.read(namespace, name)
    return order if "conditions" in order.raw_status else None


def test_the_operator_watches_only_the_namespaces_it_is_given(
    cluster: Cluster, namespace: str, other_namespace: str, start: Start
) -> None:
    start(scope=("-n", namespace))
    a = agent(cluster)
    # The ignored namespace's claim is older and as short: a watching operator expires it first.
    create_order(cluster.api, other_namespace, "ignored", claimTimeoutSeconds=1)
    a.claim(a.read(other_namespace, "ignored"))
    create_order(cluster.api, namespace, "watched", claimTimeoutSeconds=1)
    a.claim(a.read(namespace, "watched"))
    wait_for(lambda: a.read(namespace, "watched").status.phase == "Pending", timeout=15, what="the watched expiry")
    create_order(cluster.api, other_namespace, "new-ignored")
    create_order(cluster.api, namespace, "new-watched")
    wait_for(lambda: initialised(a, namespace, "new-watched"), timeout=20, what="initialisation in the namespace")
    assert a.read(other_namespace, "ignored").status.phase == "Claimed"
    assert "conditions" not in a.read(other_namespace, "new-ignored").raw_status


def test_without_the_build_agent_build_orders_wait_for_an_external_agent(
    cluster: Cluster, namespace: str, start: Start
) -> None:
    op = start("--no-build-agent")
    create_order(cluster.api, namespace, "app", workType="build", yamlContent=KANIKO_BUILD.format(name="app"))
    a = agent(cluster)
    # Initialised after the grace in which any agent could have claimed it: nobody did.
    order = wait_for(lambda: initialised(a, namespace, "app"), timeout=20, what="the order to be initialised")
    assert (order.status.phase, order.status.attempt) == ("Pending", 0)
    assert "taking build orders" not in op.log()
    external = a.claim(order)
    assert (external.status.phase, external.status.claimed_by) == ("Claimed", a.identity.id)


def test_build_concurrency_bounds_the_builds_in_flight(cluster: Cluster, namespace: str, start: Start) -> None:
    # Nothing finishes a build here (no Tekton: a BuildRun never ends; without Shipwright's
    # controller a Build is never registered), so a build attempt keeps its slot.
    start("--build-concurrency", "1", "--build-registration-timeout", "600")
    for name in ("b1", "b2"):
        create_order(cluster.api, namespace, name, workType="build", yamlContent=KANIKO_BUILD.format(name=name))
    a = agent(cluster)

    def phases() -> dict[str, str | None]:
        return {n: a.read(namespace, n).status.phase for n in ("b1", "b2")}

    wait_for(lambda: "Claimed" in phases().values(), timeout=30, what="one build to be claimed")
    now = phases()
    waiting = next((n for n, p in now.items() if p == "Pending"), None)
    assert waiting is not None, f"two builds at once with --build-concurrency 1: {now}"
    # The waiting build gets no conditions (the live build agent will take it), so a sentinel no
    # agent takes tells the time: once the operator initialised it, the grace in which any agent
    # could have claimed has passed, and the build agent, busy with the other, did not.
    create_order(cluster.api, namespace, "sentinel", workType="nobody-runs-this")
    wait_for(lambda: initialised(a, namespace, "sentinel"), timeout=30, what="the sentinel to be initialised")
    assert initialised(a, namespace, waiting) is None
    assert sorted(str(p) for p in phases().values()) == ["Claimed", "Pending"]
    assert a.read(namespace, waiting).status.attempt == 0


@contextlib.contextmanager
def shipwright_stopped(cluster: Cluster) -> Iterator[None]:
    """Shipwright's APIs served, its controller not running (it crashed, or is being upgraded):
    Builds are stored but never registered."""
    if not cluster.shipwright:
        yield  # never started here
        return
    if cluster.plane is None:
        pytest.skip("stops Shipwright's controller: only on our own control plane")
    cluster.plane.stop_shipwright()
    try:
        yield
    finally:
        cluster.plane.start_shipwright()


def test_build_registration_timeout(cluster: Cluster, namespace: str, start: Start) -> None:
    start("--build-registration-timeout", "3")
    a = agent(cluster)
    with shipwright_stopped(cluster):
        create_order(
            cluster.api,
            namespace,
            "b1",
            workType="build",
            yamlContent=KANIKO_BUILD.format(name="b1"),
            backoffSeconds=600,
        )
        order = wait_for(
            lambda: (o := a.read(namespace, "b1")).status.phase == "RetryPending" and o, timeout=30, what="the timeout"
        )
    assert order.status.last_error == "Build 'b1' not registered within 3s: is the Shipwright controller running?"
    # The attempt waited the timeout out, no less.
    (entry,) = order.raw_status["history"]
    assert parse_time(entry["finishedAt"]) - parse_time(entry["claimedAt"]) >= dt.timedelta(seconds=3)


def test_events_are_rate_limited_and_the_dropped_ones_counted(
    cluster: Cluster, namespace: str, start: Start, tmp_path: Path
) -> None:
    # Expiries that fall due while no operator runs are all acted on at its start: a burst of
    # Warning events, more than the burst allowance.
    total = int(EVENT_BURST) * 4
    a = agent(cluster)

    def create_and_claim(part: int) -> None:
        for i in range(part, total, 4):
            create_order(cluster.api, namespace, f"e-{i:03d}", workType="events", claimTimeoutSeconds=1)
            a.claim(a.read(namespace, f"e-{i:03d}"))

    workers = [threading.Thread(target=create_and_claim, args=(p,), name=f"test-create-{p}") for p in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    port = free_port()
    # Only this namespace: orders other tests leave elsewhere in the shared cluster must not spend
    # the event budget or count as dropped here; nor may NoMatchingAgent warnings on the expired
    # orders (no agent takes them) once they wait longer than the unschedulable grace.
    start(f"--metrics-port={port}", "--metrics-insecure", "--unschedulable-grace=0", scope=("--namespace", namespace))
    core = client.CoreV1Api(cluster.api)

    def expired() -> int:
        text = scrape(port)[1]
        return int(sample(text, "workorder_expirations_total", type="events"))

    wait_for(lambda: expired() == total, timeout=120, interval=0.5, what=f"all {total} expiries")

    def posted() -> int:
        return sum(e.reason == "Expire" for e in core.list_namespaced_event(namespace).items)

    def dropped() -> int:
        return int(sample(scrape(port)[1], "workorder_events_dropped_total"))

    # Every expiry either posted its event or counted it as dropped. Events are posted in the
    # background by one thread (in order), one API call each: on a loaded machine that takes a while.
    wait_for(lambda: posted() + dropped() == total, timeout=120, interval=0.5, what="posted + dropped == expiries")
    assert dropped() >= 1
    assert posted() >= EVENT_BURST


def test_two_replicas_count_each_transition_once(cluster: Cluster, namespace: str, start: Start) -> None:
    ports = [free_port(), free_port()]
    ops = [start(f"--metrics-port={p}", "--metrics-insecure") for p in ports]
    wait_for(lambda: sum(sample(scrape(p)[1], "workorder_leader") for p in ports) == 1, timeout=30, what="a leader")
    a = agent(cluster)
    for name in ("c1", "c2", "c3"):
        create_order(cluster.api, namespace, name, workType="counted")
        a.complete(a.claim(a.read(namespace, name)))
    create_order(cluster.api, namespace, "x1", workType="counted", claimTimeoutSeconds=1)
    a.claim(a.read(namespace, "x1"))

    def counts(transition: str) -> list[float]:
        return [
            sample(scrape(p)[1], "workorder_transitions_total", transition=transition, type="counted") for p in ports
        ]

    wait_for(lambda: sum(counts("expire")) >= 1, timeout=20, what="the expiry to be counted")
    # Both replicas watch (the standby keeps its cache warm); only the leader counts.
    wait_for(lambda: sum(counts("complete")) >= 3, timeout=20, what="the completions to be counted")
    assert sum(counts("claim")) == 4
    assert sum(counts("complete")) == 3
    assert sum(counts("expire")) == 1
    assert min(counts("claim")) == 0, "the standby counted too"
    assert len(ops) == 2
