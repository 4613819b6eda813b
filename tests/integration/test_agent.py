"""The agent SDK (`Agent`, `Claim`, `Failure`, `ClaimLost`, `Agent.run`) against the real API server.

What a user of the SDK would notice: which orders an agent is offered and in which order, that
every order is worked exactly once however many agents race for it, that a long task keeps its
claim, that a stale handle can never touch a re-claimed order, what a handler's outcome does to
the order, how fast a new order is picked up, and that stopping an agent gives its work back.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from kubernetes import client

from tests.conftest import Cluster
from tests.support import OperatorProcess, create_order, wait_for
from tests.support import RunningAgent as Running
from workorder_operator.agent import Agent, Claim, ClaimLost, Failure
from workorder_operator.kube import Page, WorkOrders, api_client
from workorder_operator.model import GROUP, PLURAL, VERSION, WorkOrder, utcnow

Handler = Callable[[Claim], str | None]


# --- helpers --------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("no_threads_left")


@pytest.fixture
def make_agent(cluster: Cluster, namespace: str) -> Iterator[Callable[..., Agent]]:
    """Agents confined to the test's namespace, each with its own API client (closed afterwards)."""
    apis: list[client.ApiClient] = []

    def make(**kwargs: Any) -> Agent:
        api = api_client(str(cluster.kubeconfig))
        apis.append(api)
        return Agent(api, namespace=namespace, **kwargs)

    yield make
    for api in apis:
        api.close()


def read(cluster: Cluster, namespace: str, name: str) -> WorkOrder:
    return WorkOrder.from_body(WorkOrders(cluster.api, "test-reader").get(namespace, name))


def phase_is(cluster: Cluster, namespace: str, name: str, phase: str) -> WorkOrder | None:
    order = read(cluster, namespace, name)
    return order if order.status.phase == phase else None


def all_orders(cluster: Cluster, namespace: str) -> list[WorkOrder]:
    items = client.CustomObjectsApi(cluster.api).list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    return [WorkOrder.from_body(b) for b in items["items"]]


def names(orders: list[WorkOrder]) -> list[str]:
    return [o.name for o in orders]


def claim_all(agent: Agent) -> list[Claim]:
    """Everything this agent can get, one `claim_next` at a time (bounded: never loops forever)."""
    claims: list[Claim] = []
    for _ in range(50):
        claim = agent.claim_next()
        if claim is None:
            return claims
        claims.append(claim)
    raise AssertionError("claim_next never ran dry")


def history_outcomes(order: WorkOrder) -> list[str]:
    return [h["outcome"] for h in order.raw_status.get("history", [])]


@contextlib.contextmanager
def running(agent: Agent, handler: Handler, join_timeout: float = 20, **options: Any) -> Iterator[Running]:
    """An agent running for the duration of the block; always stopped and joined."""
    runner = Running(agent, handler, **options).start()
    try:
        yield runner
    finally:
        runner.stop.set()
        runner.join(join_timeout)


def echo(claim: Claim) -> str:
    return f"done by {claim.agent.id}"


# --- targeting ------------------------------------------------------------------------------------


def test_targeting_decides_who_is_offered_and_who_can_claim(
    cluster: Cluster, namespace: str, make_agent: Callable[..., Agent]
) -> None:
    by_id = make_agent()
    gpu = make_agent(labels=["ssd", "gpu"])
    eu = make_agent(annotations={"zone": "eu-1", "tier": "gold"})
    plain = make_agent(labels=["ssd"], annotations={"zone": "us-1"})
    stranger = str(uuid.uuid4())

    create_order(cluster.api, namespace, "t-id", targeting={"agentIds": [by_id.id]})
    create_order(cluster.api, namespace, "t-label", targeting={"labels": ["gpu"]})
    create_order(cluster.api, namespace, "t-annotation", targeting={"annotations": {"zone": "eu-1"}})
    create_order(cluster.api, namespace, "t-other-zone", targeting={"annotations": {"zone": "us-2"}})
    # OR: any one of the three admits.
    create_order(
        cluster.api, namespace, "t-any",
        targeting={"agentIds": [by_id.id], "labels": ["gpu"], "annotations": {"zone": "eu-1"}},
    )  # fmt: skip
    create_order(cluster.api, namespace, "t-open")
    create_order(cluster.api, namespace, "t-open-empty", targeting={})
    create_order(
        cluster.api, namespace, "t-nobody",
        targeting={"agentIds": [stranger], "labels": ["cpu"], "annotations": {"zone": "ap-3", "tier": "silver"}},
    )  # fmt: skip

    open_to_all = {"t-open", "t-open-empty"}
    expected = {
        by_id: {"t-id", "t-any"} | open_to_all,
        gpu: {"t-label", "t-any"} | open_to_all,
        eu: {"t-annotation", "t-any"} | open_to_all,
        plain: open_to_all,
    }
    for agent, wanted in expected.items():
        assert set(names(agent.candidates())) == wanted, agent.identity

    # An agent that is not admitted cannot take the order even when it asks for it by name.
    for name in ("t-id", "t-label", "t-annotation", "t-other-zone", "t-any", "t-nobody"):
        assert plain.claim(read(cluster, namespace, name)) is None, name
        assert read(cluster, namespace, name).status.attempt == 0, name
    assert eu.claim(read(cluster, namespace, "t-other-zone")) is None  # same key, other value

    # Each agent takes everything it may, the least privileged first: nobody gets a foreign order.
    taken: dict[str, str] = {}
    for agent in (plain, by_id, gpu, eu):
        for claim in claim_all(agent):
            assert claim.name in expected[agent], (claim.name, agent.identity)
            assert claim.name not in taken
            taken[claim.name] = agent.id
    assert set(taken) == {"t-id", "t-label", "t-annotation", "t-any", "t-open", "t-open-empty"}
    assert taken["t-id"] == by_id.id
    assert taken["t-label"] == gpu.id
    assert taken["t-annotation"] == eu.id
    for name, agent_id in taken.items():
        order = read(cluster, namespace, name)
        assert (order.status.phase, order.status.claimed_by, order.status.attempt) == ("Claimed", agent_id, 1)
    for name in ("t-other-zone", "t-nobody"):
        order = read(cluster, namespace, name)
        assert (order.status.phase, order.status.attempt, order.status.claimed_by) == ("Pending", 0, None)


# --- offer order ----------------------------------------------------------------------------------


def create_in_one_second(cluster: Cluster, namespace: str, specs: dict[str, dict[str, Any]]) -> None:
    """Create the orders so that they share one creationTimestamp (1 s resolution): if a second
    boundary falls between them, delete them and try again."""
    objects = client.CustomObjectsApi(cluster.api)

    def absent(name: str) -> bool:
        try:
            objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except client.ApiException as exc:
            return exc.status == 404
        return False

    for _ in range(10):
        created = [create_order(cluster.api, namespace, name, **spec) for name, spec in specs.items()]
        if len({c["metadata"]["creationTimestamp"] for c in created}) == 1:
            return
        for name in specs:
            objects.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        for name in specs:
            wait_for(lambda n=name: absent(n), timeout=10, what=f"{name} to be deleted")  # type: ignore[misc]
    raise AssertionError(f"could not create {list(specs)} within one second")


def test_orders_are_offered_by_priority_then_oldest_first(
    cluster: Cluster, namespace: str, make_agent: Callable[..., Agent]
) -> None:
    # Names run against age, so a name tie-break alone would give the wrong order. Creation
    # timestamps have a resolution of one second: orders whose age must count are 1.1 s apart,
    # and the two whose name must decide are made in the same second.
    create_order(cluster.api, namespace, "a-low", priority=-1)
    create_order(cluster.api, namespace, "z-old", priority=0)
    time.sleep(1.1)
    create_order(cluster.api, namespace, "m-mid", priority=0)
    time.sleep(1.1)
    create_order(cluster.api, namespace, "a-new", priority=0)
    create_in_one_second(cluster, namespace, {"y-high": {"priority": 7}, "b-high": {"priority": 7}})
    expected = ["b-high", "y-high", "z-old", "m-mid", "a-new", "a-low"]

    agent = make_agent()
    assert names(agent.candidates()) == expected
    assert [c.name for c in claim_all(agent)] == expected
    assert agent.candidates() == []


def test_a_running_agent_lists_in_pages_and_claims_in_offer_order_with_each_order_s_content(
    cluster: Cluster, namespace: str, make_agent: Callable[..., Agent]
) -> None:
    """More orders than one page: the agent claims from the first page on (the API lists by name:
    the first page holds the lowest priorities here), and once the listing is in, in offer order.
    It keeps no content per order, yet its handler sees each order's yamlContent."""
    created = [
        create_order(cluster.api, namespace, f"o-{i:02d}", priority=i // 2, yamlContent=f"order: {i}\n")
        for i in range(11)
    ]
    offer = [c["metadata"]["name"] for c in sorted(created, key=lambda c: (
        -c["spec"]["priority"], c["metadata"]["creationTimestamp"], c["metadata"]["name"]))]  # fmt: skip
    seen: list[tuple[str, str]] = []

    def handler(claim: Claim) -> str:
        seen.append((claim.order.name, claim.order.spec.yaml_content))
        if len(seen) == 1:  # the first claim may come before the last page: let the listing finish
            time.sleep(1.5)
        return "ok"

    agent = make_agent(page_size=3)
    with running(agent, handler):
        wait_for(lambda: len(seen) == len(created), timeout=30, what="every order handled")
    assert sorted(seen) == [(f"o-{i:02d}", f"order: {i}\n") for i in range(11)]
    rest = [name for name, _ in seen[1:]]
    assert rest == [name for name in offer if name != seen[0][0]], "after the listing: offer order"


# --- work types -----------------------------------------------------------------------------------


def test_an_agent_sees_only_its_work_types(cluster: Cluster, namespace: str, make_agent: Callable[..., Agent]) -> None:
    for name, work_type in (("t1", "test"), ("b1", "backup"), ("d1", "deploy"), ("b2", "backup"), ("x1", "lint")):
        create_order(cluster.api, namespace, name, workType=work_type)
    one = make_agent(work_types=["backup"])  # narrowed by the server (field selector)
    several = make_agent(work_types=["backup", "deploy"])  # filtered by the agent
    anything = make_agent()
    assert set(names(one.candidates())) == {"b1", "b2"}
    assert set(names(several.candidates())) == {"b1", "b2", "d1"}
    assert set(names(anything.candidates())) == {"t1", "b1", "d1", "b2", "x1"}

    assert {c.name for c in claim_all(one)} == {"b1", "b2"}
    assert {c.name for c in claim_all(several)} == {"d1"}
    assert read(cluster, namespace, "t1").status.phase == "Pending"

    # The run loop takes the same view: only its types, whatever else is pending.
    worked: list[str] = []

    def work(claim: Claim) -> str:
        worked.append(claim.name)
        return "ok"

    with running(make_agent(work_types=["lint", "deploy"]), work) as runner:
        create_order(cluster.api, namespace, "d2", workType="deploy")
        create_order(cluster.api, namespace, "t2", workType="test")
        for name in ("x1", "d2"):
            wait_for(lambda n=name: phase_is(cluster, namespace, n, "Completed"), timeout=10, what=name)  # type: ignore[misc]
        time.sleep(1)  # time enough to (wrongly) take t1 or t2 as well
        runner.stop.set()
    assert sorted(worked) == ["d2", "x1"]
    for name in ("t1", "t2"):
        order = read(cluster, namespace, name)
        assert (order.status.phase, order.status.attempt) == ("Pending", 0), name


# --- many agents ----------------------------------------------------------------------------------


def test_eight_agents_race_over_500_orders_each_runs_exactly_once(
    cluster: Cluster,
    namespace: str,
    operator: OperatorProcess,
    make_agent: Callable[..., Agent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    total, creators = 500, 4
    lock = threading.Lock()
    executions: dict[tuple[str, int], list[str]] = defaultdict(list)

    def handler(claim: Claim) -> str:
        assert claim.order.status.claimed_by == claim.agent.id
        with lock:
            executions[(claim.name, claim.attempt)].append(claim.agent.id)
        time.sleep(random.uniform(0, 0.005))
        return claim.agent.id

    def create(part: int) -> None:
        for i in range(part, total, creators):
            create_order(cluster.api, namespace, f"o-{i:03d}", priority=i % 3)

    caplog.set_level(logging.WARNING, logger="workorder_operator.agent")
    agents = [make_agent() for _ in range(8)]
    runners = [Running(a, handler, concurrency=2, shutdown_grace=5) for a in agents]
    creating = [threading.Thread(target=create, args=(p,), name=f"test-create-{p}") for p in range(creators)]
    try:
        for runner in runners:
            runner.start()
        for thread in creating:  # the orders arrive while the agents already run
            thread.start()
        for thread in creating:
            thread.join(60)

        def completed() -> bool:
            return sum(o.status.phase == "Completed" for o in all_orders(cluster, namespace)) == total

        # Throughput is a benchmark (make bench); here the bound only keeps a stuck run short.
        wait_for(completed, timeout=120, interval=0.5, what=f"all {total} orders Completed")
    finally:
        for runner in runners:
            runner.stop.set()
        for thread in creating:
            thread.join(10)
        for runner in runners:
            runner.join(20)

    orders = all_orders(cluster, namespace)
    assert len(orders) == total
    assert {(o.name, o.status.attempt) for o in orders} == set(executions), "an order was lost or run again"
    doubles = {key: who for key, who in executions.items() if len(who) != 1}
    assert not doubles, f"{len(doubles)} (order, attempt) executed more than once, e.g. {list(doubles.items())[:3]}"
    for order in orders:
        (executor,) = executions[(order.name, 1)]
        assert order.status.phase == "Completed"
        assert order.status.claimed_by == executor
        assert order.status.result == executor
        assert history_outcomes(order) == ["Succeeded"]
    assert len({who[0] for who in executions.values()}) > 1, "one agent did all the work"
    complaints = [r.getMessage() for r in caplog.records if r.name.startswith("workorder_operator.agent")]
    assert not complaints, "the agents complained"


# --- claims over time -----------------------------------------------------------------------------


def test_renewal_keeps_a_long_task_claimed_past_its_timeout(
    cluster: Cluster, namespace: str, operator: OperatorProcess, make_agent: Callable[..., Agent]
) -> None:
    create_order(cluster.api, namespace, "long", claimTimeoutSeconds=2)
    calls: list[int] = []

    def slow(claim: Claim) -> str:
        calls.append(claim.attempt)
        time.sleep(5)  # 2.5 claim timeouts
        return "sha256:feed"

    agent = make_agent()
    with running(agent, slow):
        done = wait_for(lambda: phase_is(cluster, namespace, "long", "Completed"), timeout=20)
    assert calls == [1]
    assert done.status.attempt == 1
    assert done.status.result == "sha256:feed"
    assert done.status.claimed_by == agent.id
    assert done.status.renewed_at is not None
    assert history_outcomes(done) == ["Succeeded"]  # never Expired
    assert done.status.last_error is None


def test_a_stale_handle_is_refused_after_its_claim_expired(
    cluster: Cluster, namespace: str, operator: OperatorProcess, make_agent: Callable[..., Agent]
) -> None:
    create_order(cluster.api, namespace, "stale", claimTimeoutSeconds=1)
    first, second = make_agent(), make_agent()
    stale = first.claim_next()
    assert stale is not None and stale.attempt == 1
    expired = wait_for(lambda: phase_is(cluster, namespace, "stale", "Pending"), timeout=10)
    assert history_outcomes(expired) == ["Expired"]
    fresh = second.claim_next()
    assert fresh is not None and fresh.attempt == 2
    before = read(cluster, namespace, "stale")

    moves: list[Callable[[], None]] = [
        lambda: stale.complete("too late"),
        stale.renew,
        lambda: stale.fail("too late", retryable=False),
        stale.release,
    ]
    for move in moves:
        with pytest.raises(ClaimLost) as lost:
            move()
        message = str(lost.value)
        assert "lost" in message and f"{namespace}/stale" in message, message

    after = read(cluster, namespace, "stale")
    assert after.resource_version == before.resource_version
    assert after.raw_status == before.raw_status
    assert (after.status.phase, after.status.claimed_by, after.status.attempt) == ("Claimed", second.id, 2)
    fresh.complete("on time")  # the live claim is untouched
    assert read(cluster, namespace, "stale").status.result == "on time"


# --- handler outcomes -----------------------------------------------------------------------------


def test_handler_outcomes_decide_the_phase(cluster: Cluster, namespace: str, make_agent: Callable[..., Agent]) -> None:
    def handler(claim: Claim) -> str | None:
        if claim.name == "fatal":
            raise Failure("bad input", retryable=False)
        if claim.name == "retryable":
            raise Failure("try later")
        if claim.name == "crash":
            raise RuntimeError("disk full")
        if claim.name == "silent":
            return None
        return "sha256:abc"

    for name in ("fatal", "retryable", "crash", "silent", "ok"):
        create_order(cluster.api, namespace, name, maxRetries=3, backoffSeconds=600)
    with running(make_agent(), handler):
        for name, phase in (
            ("fatal", "Failed"),
            ("retryable", "RetryPending"),
            ("crash", "RetryPending"),
            ("silent", "Completed"),
            ("ok", "Completed"),
        ):
            wait_for(lambda n=name, p=phase: phase_is(cluster, namespace, n, p), timeout=10, what=f"{name} {phase}")  # type: ignore[misc]

    fatal = read(cluster, namespace, "fatal")
    assert fatal.status.result == "bad input"
    assert fatal.status.retry_count == 0
    assert history_outcomes(fatal) == ["Failed"]
    retryable = read(cluster, namespace, "retryable")
    assert retryable.status.retry_count == 1
    assert retryable.status.last_error == "try later"
    crash = read(cluster, namespace, "crash")
    assert crash.status.retry_count == 1
    assert crash.status.last_error is not None and "disk full" in crash.status.last_error
    assert crash.status.next_retry_after is not None
    assert history_outcomes(crash) == ["Failed"]
    ok = read(cluster, namespace, "ok")
    assert ok.status.result == "sha256:abc"
    assert history_outcomes(ok) == ["Succeeded"]
    assert read(cluster, namespace, "silent").status.result == ""


# --- the run loop ---------------------------------------------------------------------------------


def test_a_running_agent_claims_a_new_order_at_once(
    cluster: Cluster, namespace: str, make_agent: Callable[..., Agent]
) -> None:
    with running(make_agent(work_types=["backup"]), echo):
        # Warm-up: once this one is done the agent is past its first list and watching.
        create_order(cluster.api, namespace, "warm-up", workType="backup")
        wait_for(lambda: phase_is(cluster, namespace, "warm-up", "Completed"), timeout=10)
        latencies = []
        for i in range(3):
            time.sleep(0.7)  # let the loop go idle
            sent = utcnow()
            create_order(cluster.api, namespace, f"new-{i}", workType="backup")
            order = wait_for(lambda n=f"new-{i}": phase_is(cluster, namespace, n, "Completed"), timeout=10)  # type: ignore[misc]
            assert order.status.claimed_at is not None
            latencies.append((order.status.claimed_at - sent).total_seconds())
    # The watch brings a new order at once (there is no polling to fall back on); the latency
    # target itself is a benchmark (make bench), this bound only has to hold on a loaded machine.
    assert max(latencies) < 5.0, latencies


def test_a_watch_answered_410_gone_lists_again_and_goes_on(
    cluster: Cluster, namespace: str, make_agent: Callable[..., Agent], caplog: pytest.LogCaptureFixture
) -> None:
    """The API server forgets old resourceVersions (410 Gone): the agent lists again, quietly.

    The first list is made to answer with resourceVersion 1, a version the server has long
    forgotten, so the real API server answers the watch with 410 (we only play the passing of time)."""
    agent = make_agent()
    real_pages = agent.orders.pages
    versions: list[str] = []

    def forgetful_first(*args: Any, **kwargs: Any) -> Iterator[Page]:
        first = not versions
        for page in real_pages(*args, **kwargs):
            yield Page(page, "1") if first else page
        versions.append(page.resource_version)

    agent.orders.pages = forgetful_first  # type: ignore[method-assign]
    caplog.set_level(logging.INFO, logger="workorder_operator.agent")
    with running(agent, echo):
        wait_for(lambda: len(versions) >= 2, timeout=15, what="a second list after the 410")
        create_order(cluster.api, namespace, "after-gone")
        wait_for(lambda: phase_is(cluster, namespace, "after-gone", "Completed"), timeout=15, what="the new order")
    complaints = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not complaints, "a 410 is routine, not a warning or a back-off"


def test_stopping_an_agent_releases_the_work_of_a_handler_that_does_not_finish(
    cluster: Cluster, namespace: str, make_agent: Callable[..., Agent]
) -> None:
    create_order(cluster.api, namespace, "stuck")
    started, gate = threading.Event(), threading.Event()
    returned: list[str] = []

    def stuck(claim: Claim) -> str:
        started.set()
        gate.wait(30)  # ignores the stop: outlives any grace
        returned.append(claim.name)
        return "finished after all"

    runner = Running(make_agent(), stuck, shutdown_grace=1).start()
    try:
        assert started.wait(10), "the handler never ran"
        assert read(cluster, namespace, "stuck").status.phase == "Claimed"
        stopped = time.monotonic()
        runner.stop.set()
        runner.join(5)  # the grace, then release: run() returns although the handler still runs
        assert time.monotonic() - stopped >= 1.0  # the handler had its grace
        assert not returned
        released = read(cluster, namespace, "stuck")
        assert (released.status.phase, released.status.claimed_by) == ("Pending", None)
        assert released.status.attempt == 1
        assert released.status.retry_count == 0
        assert history_outcomes(released) == ["Released"]
    finally:
        gate.set()
        runner.join(10)
    # The late return of the handler does not complete the order it no longer holds.
    wait_for(lambda: returned, timeout=5)
    time.sleep(0.5)
    assert read(cluster, namespace, "stuck").raw_status == released.raw_status


def test_stopping_an_idle_agent_returns_at_once_and_leaves_nothing_behind(
    cluster: Cluster, namespace: str, make_agent: Callable[..., Agent]
) -> None:
    before = set(threading.enumerate())
    runner = Running(make_agent(), echo).start()
    # Two orders worked one after the other: the agent is past its first list and watching.
    for name in ("one", "two"):
        create_order(cluster.api, namespace, name)
        wait_for(lambda n=name: phase_is(cluster, namespace, n, "Completed"), timeout=10)  # type: ignore[misc]
    time.sleep(0.5)  # idle
    stopped = time.monotonic()
    runner.stop.set()
    runner.join(5)
    assert time.monotonic() - stopped < 2
    # Its watch ends with it (while its API client is still open: nothing else would end it).
    wait_for(
        lambda: not [t for t in threading.enumerate() if t not in before and t.is_alive()],
        timeout=2,
        what="the agent's threads to end",
    )


# --- API outages ----------------------------------------------------------------------------------


class Relay:
    """A TCP relay in front of the API server that can be cut, as a network outage or an API server
    restart would, and restored. TLS passes through untouched (the serving certificate names 127.0.0.1)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.up, self.closing = threading.Event(), threading.Event()
        self.up.set()
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        self.threads: list[threading.Thread] = []
        self._spawn(self._accept)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name="test-relay", daemon=True)
        with self.lock:
            self.threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self.up.is_set():
                conn.close()  # the API server is "down": the TLS handshake fails
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                conn.close()
                continue
            conn.settimeout(None)
            upstream.settimeout(None)
            with self.lock:
                self.sockets |= {conn, upstream}
            self._spawn(self._pump, conn, upstream)
            self._spawn(self._pump, upstream, conn)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self.lock:
                self.sockets -= {source, sink}
            source.close()
            sink.close()

    def cut(self) -> None:
        """Drop every connection and refuse new ones until `restore`."""
        self.up.clear()
        with self.lock:
            sockets = list(self.sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.closing.set()
        self.cut()
        self.listener.close()
        with self.lock:
            threads = list(self.threads)
        for thread in threads:
            thread.join(5)

    def kubeconfig(self, original: Path, path: Path) -> Path:
        config = yaml.safe_load(original.read_text())
        for entry in config["clusters"]:
            entry["cluster"]["server"] = f"https://127.0.0.1:{self.port}"
        path.write_text(yaml.safe_dump(config))
        return path


def test_the_run_loop_rides_out_an_api_outage(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    server = urlsplit(config["clusters"][0]["cluster"]["server"])
    assert server.hostname is not None and server.port is not None
    relay = Relay((server.hostname, server.port))
    api = api_client(str(relay.kubeconfig(cluster.kubeconfig, tmp_path / "relayed-kubeconfig")))
    busy, gate = threading.Event(), threading.Event()

    def handler(claim: Claim) -> str | None:
        if claim.name == "before":
            claim.complete("done before the outage")
            busy.set()
            gate.wait(20)  # holds the only worker until the API is unreachable
            return None
        return "done after the outage"

    runner = Running(Agent(api, namespace=namespace), handler, concurrency=1)
    try:
        runner.start()
        create_order(cluster.api, namespace, "before")
        assert busy.wait(10), "the first order was never worked"
        create_order(cluster.api, namespace, "after")
        time.sleep(1)  # the agent has seen it, but its only worker is busy
        relay.cut()
        gate.set()  # the worker frees up: the loop goes for "after" while the API is unreachable
        time.sleep(3)
        assert runner.error is None, f"run() gave up during the outage: {runner.error!r}"
        assert runner.thread.is_alive(), "run() returned during the outage"
        relay.restore()
        after = wait_for(lambda: phase_is(cluster, namespace, "after", "Completed"), timeout=20)
        assert after.status.result == "done after the outage"
        assert after.status.attempt == 1
        assert read(cluster, namespace, "before").status.result == "done before the outage"
    finally:
        gate.set()
        relay.restore()
        runner.stop.set()
        runner.thread.join(20)
        relay.close()
        api.close()
    runner.join(0)
