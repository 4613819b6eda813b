"""Executors: work types the operator runs itself, as plug-ins.

An `Executor` knows one work type: whether an order's content can run (checked once, when the
operator initialises the order: content it cannot run makes the order Failed at once), how to
run one attempt of a claimed order (also an attempt found claimed after a restart: resume it),
and how to cancel an attempt whose claim was lost. Everything else is the same for every
executor and lives here, in `ExecutorAgent`: an ordinary SDK agent (its own id, labels and
annotations, so targeting decides whether it or an external agent takes an order) per watched
namespace, claims, renewals, resuming held claims, and waiting (with a condition and a Warning
event on each order) while the executor says it cannot run yet.

The operator receives its executors as an `Executors` registry (main.py builds it; the engine
asks it for content checks, the handlers start and stop it with leadership). The Shipwright
build executor (buildagent.py) is the first; README's "Write your own executor" shows a second.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from workorder_operator import fleet, lifecycle
from workorder_operator.agent import Agent, Claim, ClaimLost
from workorder_operator.errors import Conflict, NotFound, WorkOrderError
from workorder_operator.kube import ApiClient, post_event
from workorder_operator.model import WorkOrder, utcnow
from workorder_operator.targeting import admits

log = logging.getLogger(__name__)


class Interrupted(WorkOrderError):
    """Raised by `Executor.run` once `stopped()`: the claim was lost (the host then calls
    `cancel`) or the operator is stopping (the claim and the work are left to be resumed)."""


@dataclass(frozen=True)
class Waiting:
    """Why an executor cannot run anything yet (its API is not installed, ...): a condition
    reason (CamelCase) and a message for the orders that wait."""

    reason: str
    message: str


@runtime_checkable
class Executor(Protocol):
    """One work type the operator runs itself."""

    @property
    def work_type(self) -> str:
        """The `spec.workType` this executor runs."""
        ...

    def check(self, order: WorkOrder) -> str | None:
        """At initialise: why this order's content can never run (the order is Failed at once
        with it), or None. Pure and quick: no API calls."""
        ...

    def waiting(self) -> Waiting | None:
        """Before taking orders, and again every `AgentConfig.discovery_interval` while it is not
        None: why nothing can run yet. May call the API."""
        ...

    def run(self, claim: Claim, stopped: Callable[[], bool]) -> str:
        """Run (or, after a restart, resume) the attempt `claim` holds; the result on success.
        Raise `errors.Failure` to fail it, `Interrupted` once `stopped()` (the claim was lost, or
        the operator stops). The host renews the claim meanwhile."""
        ...

    def cancel(self, claim: Claim) -> None:
        """The attempt's claim is lost (expired and re-claimed, or the order deleted): stop
        whatever the attempt started outside (best effort; never someone else's work)."""
        ...


@dataclass
class AgentConfig:
    """How an executor's agent presents itself and how much it runs at once."""

    # Its agent UUID: targeting by agentIds, and the claims it finds again after a restart.
    id: str
    # Its labels and annotations, for targeting.
    labels: Sequence[str] = ()
    annotations: dict[str, str] = field(default_factory=dict)
    # Attempts run at once (per watched namespace).
    concurrency: int = 4
    # The namespaces the operator watches (empty: all): the agent claims only there.
    namespaces: tuple[str, ...] = ()
    # How often to ask `Executor.waiting` again while it says nothing can run.
    discovery_interval: float = 5.0
    # Where the agent announces itself (None: its namespace, else `default`), and its presence
    # lease's term (fleet.py).
    presence_namespace: str | None = None
    lease_duration: float = fleet.LEASE_SECONDS
    # Whether waiting orders are told why (a condition and an event). An agent in a spoke cluster
    # does not: another spoke may well run them, and the hub's admission policy allows agents
    # only the claim transitions.
    mark_waiting: bool = True


class ExecutorAgent:
    """Runs one executor as an SDK agent (one per watched namespace) while this replica leads."""

    def __init__(self, api: ApiClient, executor: Executor, config: AgentConfig) -> None:
        self.api = api
        self.executor = executor
        self.config = config
        self.agents = [
            Agent(api, config.id, work_types=[executor.work_type], labels=config.labels,
                  annotations=config.annotations, namespace=namespace, lease_duration=config.lease_duration,
                  presence_namespace=config.presence_namespace)
            for namespace in config.namespaces or (None,)
        ]  # fmt: skip
        self.agent = self.agents[0]
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def work_type(self) -> str:
        return self.executor.work_type

    def start(self) -> None:
        """Start taking orders (again, after a `close`: each leadership term starts it)."""
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"{self.work_type}-agent", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 15.0) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def rejection(self, order: WorkOrder) -> str | None:
        """For the engine's initialise step: why an order this agent would take cannot run."""
        if order.spec.work_type != self.work_type or not admits(order.spec.targeting, self.agent.identity):
            return None
        return self.executor.check(order)

    def execute(self, claim: Claim) -> str:
        """The SDK handler: one attempt, and what an interruption means."""
        try:
            return self.executor.run(claim, lambda: claim.lost.is_set() or self.stop.is_set())
        except Interrupted:
            if claim.lost.is_set():
                self.executor.cancel(claim)
                raise ClaimLost(f"{claim.order.key}: claim lost during attempt {claim.attempt}") from None
            # The operator is stopping: leave the claim and the work be; the next leader resumes.
            claim.detach()
            return ""

    # --- the loop -------------------------------------------------------------------------------

    def _main(self) -> None:
        while not self.stop.is_set():
            try:
                waiting = self.executor.waiting()
                if waiting is None:
                    log.info("%s agent %s taking %s orders", self.work_type, self.agent.id, self.work_type)
                    self._run_agents()
                    return
                if self.config.mark_waiting:
                    self._mark_waiting(waiting)
                else:
                    log.warning("%s agent: %s; looking again in %.0fs", self.work_type, waiting.message,
                                self.config.discovery_interval)  # fmt: skip
            except WorkOrderError as exc:  # the API server is away, or refuses
                log.warning("%s agent: %s; starting again in %.0fs", self.work_type, exc,
                            self.config.discovery_interval)  # fmt: skip
            except Exception:  # a bug: never let the agent die with the operator still running
                log.exception("%s agent loop failed; starting again", self.work_type)
            self.stop.wait(self.config.discovery_interval)

    def _run_agents(self) -> None:
        # One presence lease for all of them (one agent id), in the presence namespace.
        with self.agent.present(self.config.namespaces, others=self.agents[1:]):
            self._run_each()

    def _run_each(self) -> None:
        def run(agent: Agent) -> None:
            agent.run(self.execute, concurrency=self.config.concurrency, stop=self.stop, resume=True, announce=False)

        threads = [
            threading.Thread(target=run, args=(a,), name=f"{self.work_type}-agent-{a.namespace}", daemon=True)
            for a in self.agents[1:]
        ]
        for thread in threads:
            thread.start()
        try:
            run(self.agent)
        finally:
            self.stop.set()
            for thread in threads:
                thread.join()

    def _mark_waiting(self, waiting: Waiting) -> None:
        """Say on each waiting order, once, why nothing happens to it."""
        for order in (o for agent in self.agents for o in agent.candidates()):
            if any(c.reason == waiting.reason for c in order.status.conditions):
                continue
            try:
                self.agent.orders.write_status(
                    order, lifecycle.waiting(order, waiting.reason, waiting.message, utcnow())
                )
            except (Conflict, NotFound):  # claimed or changed meanwhile: the next round looks again
                continue
            post_event(self.api, order, "Warning", waiting.reason, waiting.message)


class Executors:
    """The registry of executors the operator runs, one per work type."""

    def __init__(self, agents: Sequence[ExecutorAgent] = ()) -> None:
        self._agents: dict[str, ExecutorAgent] = {}
        for agent in agents:
            self.register(agent)

    def register(self, agent: ExecutorAgent) -> None:
        if agent.work_type in self._agents:
            raise ValueError(f"two executors for work type {agent.work_type!r}")
        self._agents[agent.work_type] = agent

    def get(self, work_type: str) -> ExecutorAgent | None:
        return self._agents.get(work_type)

    def __iter__(self) -> Iterator[ExecutorAgent]:
        return iter(self._agents.values())

    def __len__(self) -> int:
        return len(self._agents)

    def runs(self, work_type: str) -> bool:
        return work_type in self._agents

    def check(self, order: WorkOrder) -> str | None:
        """Why the operator cannot run this order's content (None: it can, or it is not ours to run)."""
        agent = self._agents.get(order.spec.work_type)
        return agent.rejection(order) if agent is not None else None

    def post_events_through(self, sink: Callable[[WorkOrder, str, str, str], None]) -> None:
        """Point the executors that post events of their own (a `post` attribute) at `sink`."""
        for agent in self:
            if hasattr(agent.executor, "post"):
                agent.executor.post = sink

    def start(self) -> None:
        for agent in self:
            agent.start()

    def close(self) -> None:
        for agent in self:
            agent.close()
