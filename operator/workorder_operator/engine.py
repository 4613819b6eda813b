"""The queue engine: keeps every order's stored status true to its deadlines.

Fed by watch events (`observe`), it asks the lifecycle what the operator must do next for each
order and when (`lifecycle.plan`), arms one scheduler for all of them, and at each deadline
performs the transition as a compare-and-swap. A lost race is normal: it re-reads the order and
decides again. Nothing here is persisted: on start-up the initial listing re-arms everything
from the stored status, so a restart loses nothing; every replica keeps tracking orders, and a
replica that becomes the leader re-arms every tracked order from its stored status (`lead`).
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, TypeVar

from workorder_operator import fleet, lifecycle, metrics
from workorder_operator.errors import Conflict, NotFound
from workorder_operator.fleet import Sighting
from workorder_operator.kube import OPERATOR_MANAGER, OrderWatch, Page, WorkOrders, keep_watching
from workorder_operator.lifecycle import Action, StatusWrite, TransitionError
from workorder_operator.model import Phase, Spec, Status, WorkOrder, utcnow
from workorder_operator.presence import PresenceLeases
from workorder_operator.scheduler import DeadlineScheduler

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# After an unexpected API error, try the same order again this much later.
ERROR_RETRY_SECONDS = 5.0
# A leader writes only while its lease is sure to outlive the request by this much.
MIN_WRITE_SECONDS = 1.0
# Parsing content (up to 256 KiB of YAML per order) has its own threads: a burst of big build
# orders never delays an expiry or a retry.
CONTENT_WORKERS = 2
# Events cost an API write each, as much as a transition: in a burst (1,000 claims expiring in
# the same second) they are capped so they never halve the transition rate; the rest are dropped
# (the status and its history still say everything). Each kind has its own budget: Warnings
# (failures, expiries, rejections: what a person must see) 10 a second; routine Normal events
# (claims, completions, releases) 2 a second, so at full throughput (25 orders a second here)
# they cost 0.08 requests per order, not 0.4, and never use up the Warnings' budget. A quiet
# queue still gets every event (the burst allowance).
EVENTS_PER_SECOND = {"Warning": 10.0, "Normal": 2.0}
EVENT_BURST = 50.0
# How long the operator remembers a deleted presence lease: a claim of its agent that the order
# watch brings only later is still expired for it.
GONE_MEMORY = dt.timedelta(minutes=10)

# (order, type, reason, message) -> posted as a Kubernetes Event on the order (blocking I/O).
EventSink = Callable[[WorkOrder, str, str, str], None]


class ContentChecks(Protocol):
    """What the engine asks of the executors registry (`executor.Executors`)."""

    def runs(self, work_type: str) -> bool:
        """Whether the operator itself runs orders of this work type."""
        ...

    def check(self, order: WorkOrder) -> str | None:
        """Why the operator cannot run this order's content (None: it can). May take seconds."""
        ...


@dataclass
class _Tracked:
    order: WorkOrder
    # When this operator first saw the current claim or renewal (our clock).
    first_seen: dt.datetime | None
    sign_of_life: tuple[Any, ...]
    # When this operator first saw the current sign of life, whenever that was (start-up listing
    # included): agent timestamps later than this by more than a tolerance are not believed.
    seen_at: dt.datetime
    # Why the operator cannot run this order's content (found when it first saw the content).
    rejection: str | None = None


def _rv(order: WorkOrder) -> int:
    try:
        return int(order.resource_version)
    except ValueError:
        return -1


# Strings of the stored status up to this long are shared between orders (`_interned`).
INTERNED_LENGTH = 200
# Beyond this many different specs, the engine stops sharing them (and starts afresh).
SHARED_SPECS = 10_000


def _compact(order: WorkOrder, specs: dict[str, Spec]) -> WorkOrder:
    """The order as the engine keeps it: 100,000 orders must fit in a small memory budget (a typed
    WorkOrder is about 13 KB). Without its content (never needed after the first look) and
    without the typed conditions and history (each condition is a model of 1.6 KB): decisions
    read them from `raw_status`, which every transition builds on and which stays whole. The spec
    left is shared with every order of an equal one (`specs`: most orders of a queue have the
    same retries, timeouts and targeting)."""
    spec = order.spec.model_copy(update={"yaml_content": ""})
    key = spec.model_dump_json()
    if len(specs) >= SHARED_SPECS and key not in specs:
        specs.clear()
    spec = specs.setdefault(key, spec)
    status = order.status.model_copy(update={"conditions": [], "history": []})
    return order.model_copy(update={"spec": spec, "status": status, "raw_status": _interned(order.raw_status)})


def _interned(value: Any) -> Any:
    """A copy of parsed JSON whose keys and short strings are interned: every order's status
    repeats the same keys, condition types, reasons and messages, which a JSON parser makes anew
    for each order."""
    if isinstance(value, dict):
        return {sys.intern(k): _interned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_interned(v) for v in value]
    if isinstance(value, str) and len(value) <= INTERNED_LENGTH:
        return sys.intern(value)
    return value


class Engine:
    def __init__(
        self,
        orders: WorkOrders,
        *,
        post_event: EventSink | None = None,
        executors: ContentChecks | None = None,
        concurrency: int = 32,
        clock: Callable[[], dt.datetime] = utcnow,
        budget: Callable[[], float | None] | None = None,
        namespaces: Sequence[str] = (),
        presence_grace: float = fleet.GRACE_SECONDS,
        unschedulable_grace: float = 30.0,
        scheduling_writes: int = 50,
        types: metrics.TypeLabels = metrics.TYPES,
    ) -> None:
        """`executors`: the work types the operator runs itself, whose content is checked at
        initialise. `budget`: seconds left in which a write must be over (the leader's lease),
        None for no limit. `namespaces`: the ones watched (empty: all), for `resync`.
        `presence_grace`: beyond a presence lease's term, before its agent counts as lost.
        `unschedulable_grace`, `scheduling_writes`: see `scheduling_pass` (grace 0: off).
        `types`: the metrics' type labels, told of every order tracked and forgotten."""
        self.orders = orders
        self.presence_grace = presence_grace
        self.unschedulable_grace = unschedulable_grace
        self.scheduling_writes = scheduling_writes
        # Presence leases by namespace/name, the leases of each agent id, and the claims each
        # agent id holds (order uids): a change of presence re-arms exactly its agent's claims.
        self._sightings: dict[str, Sighting] = {}
        self._leases_of: dict[str, set[str]] = {}
        self._claims_of: dict[str, set[str]] = {}
        self._claimant: dict[str, str] = {}
        # Pending orders no live agent could take, since when (schedulability passes).
        self._unmatched: dict[str, dt.datetime] = {}
        # What the last pass judged against (`fleet.takers_key` of the live agents), and the orders
        # a pass must judge even if those agents stay the same: changed since (`_track`), waiting
        # for their grace to run out, or with a mark left unwritten (the write cap, a failed write).
        self._judged_against: frozenset[tuple[Any, ...]] | None = None
        self._to_judge: set[str] = set()
        # New orders left without conditions because a live agent would take them (`_fire`):
        # initialised after all if the agents change so that none would.
        self._awaiting_agent: set[str] = set()
        self.clock = clock
        self._budget = budget
        self.namespaces = tuple(namespaces)
        self.scheduler = DeadlineScheduler(self._fire, concurrency=concurrency, clock=clock)
        # Made inside kopf's running loop: the loop worker threads call back into.
        self._loop = asyncio.get_running_loop()
        # The API workers serve transitions only.
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="workorder-api")
        self._content_pool = ThreadPoolExecutor(max_workers=CONTENT_WORKERS, thread_name_prefix="workorder-content")
        # Events go through their own pool so a burst of them never queues ahead of transitions;
        # one thread, so they are posted (and timestamped) in the order they happened.
        self._event_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="workorder-events")
        self._post_event = post_event
        self._event_budgets = {kind: _Budget(rate, EVENT_BURST) for kind, rate in EVENTS_PER_SECOND.items()}
        self._event_lock = threading.Lock()
        # Content the operator itself cannot run: a reason to fail the order at initialisation.
        self._executors = executors
        self._tracked: dict[str, _Tracked] = {}
        self._types = types
        # Compacted specs, shared by the tracked orders that have an equal one (`_compact`).
        self._specs: dict[str, Spec] = {}
        # Orders whose content is being (or was) checked for rejection, so each is parsed once.
        self._checking: set[str] = set()
        # Count transitions in metrics (only the leader does, so replicas never double-count).
        self.counting = False
        self._acting: asyncio.Task[None] | None = None

    # --- input ----------------------------------------------------------------------------------

    def observe(self, event_type: str | None, body: dict[str, Any]) -> None:
        """A watch event (or a fresh read): remember the order and arm its next deadline."""
        try:
            self._observe(event_type, body)
        except Exception:  # one order we cannot handle must never stop the others
            log.exception("workorder %s/%s: cannot process it; ignoring this version", *_name(body))

    def _observe(self, event_type: str | None, body: dict[str, Any]) -> None:
        uid = body.get("metadata", {}).get("uid")
        if not uid:
            return
        if event_type == "DELETED" or body["metadata"].get("deletionTimestamp"):
            self.forget(uid)
            return
        try:
            order = WorkOrder.from_body(body, OPERATOR_MANAGER)
        except (KeyError, ValueError) as exc:
            # The API server validates orders, so this is an object we cannot read: skip it, loudly.
            log.error("workorder %s/%s: unreadable (%s); ignoring it", *_name(body), exc)
            return
        previous = self._tracked.get(uid)
        if previous is not None and _rv(order) < _rv(previous.order):
            return  # an older version than one we already hold (our own write's answer came first)
        # Tracked first, so its work type is live in the metrics' type labels when it is counted.
        tracked = self._track(order, previous, previous.rejection if previous else None)
        if self.counting:
            before = previous.order if previous is not None else None
            if before is None and event_type == "ADDED":
                # A new order whose first sight is already past Pending (an agent was faster than
                # our watch): count from the state every order is born in.
                before = order.model_copy(update={"status": Status(phase=Phase.PENDING), "raw_status": {}})
            if before is not None:
                metrics.record_change(before, order, self._types)
                # Every status change passes here, whoever wrote it (agents, admins, our own
                # writes), so the leader tells each order's whole story in Events, once.
                for note in lifecycle.story(before, order):
                    self.event(order, note.type, note.reason, note.message)
        if (
            self._executors is not None
            and lifecycle.needs_initialise(order)
            and uid not in self._checking
            and self._executors.runs(order.spec.work_type)
        ):
            # Parsing content can take seconds (256 KiB of YAML): never on the event loop.
            self._checking.add(uid)
            asyncio.get_running_loop().run_in_executor(self._content_pool, self._check_content, order)
        self._arm(tracked)

    def _check_content(self, order: WorkOrder) -> None:
        """In a worker thread: why the operator cannot run this order's content, if it cannot."""
        assert self._executors is not None
        try:
            rejection = self._executors.check(order)
        except Exception:
            log.exception("%s: content check failed", order.key, extra=order.logref)
            return
        if rejection is not None:
            self._loop.call_soon_threadsafe(self._rejected, order.uid, rejection)

    def _rejected(self, uid: str, rejection: str) -> None:
        tracked = self._tracked.get(uid)
        if tracked is not None:
            tracked.rejection = rejection
            self._arm(tracked)

    def _arm(self, tracked: _Tracked) -> None:
        plan = self._plan(tracked)
        if plan.at is None:
            self.scheduler.cancel(tracked.order.uid)
        else:
            self.scheduler.schedule(tracked.order.uid, plan.at)

    def tracked_orders(self) -> Iterator[WorkOrder]:
        return (t.order for t in list(self._tracked.values()))

    def forget(self, uid: str) -> None:
        gone = self._tracked.pop(uid, None)
        if gone is not None:
            self._types.gone(gone.order.spec.work_type)
        self._checking.discard(uid)
        self._unmatched.pop(uid, None)
        self._to_judge.discard(uid)
        self._awaiting_agent.discard(uid)
        self._index_claim(uid, None)
        self.scheduler.cancel(uid)

    def _index_claim(self, uid: str, order: WorkOrder | None) -> None:
        """Keep `_claims_of` true: which agent id holds this order's claim, if any."""
        holder = order.status.claimed_by if order is not None and order.status.phase == Phase.CLAIMED else None
        holder = holder.lower() if holder else None
        before = self._claimant.get(uid)
        if before == holder:
            return
        if before is not None:
            held = self._claims_of.get(before, set())
            held.discard(uid)
            if not held:
                self._claims_of.pop(before, None)
            del self._claimant[uid]
        if holder is not None:
            self._claims_of.setdefault(holder, set()).add(uid)
            self._claimant[uid] = holder

    # --- presence -------------------------------------------------------------------------------

    def observe_presence(self, event_type: str | None, body: dict[str, Any]) -> None:
        """A watch event on a presence lease: remember when this renewal was first seen (or that
        the lease is gone) and re-arm the claims of its agent."""
        meta = body.get("metadata") or {}
        key = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
        before = self._sightings.get(key)
        now = self.clock()
        if event_type == "DELETED":
            if before is not None and before.gone_at is None:
                log.info("agent %s: presence lease %s deleted", before.presence.agent.id, key)
                self._sightings[key] = Sighting(before.presence, before.seen_at, now)
                self._rearm_agent(before.presence.agent.id)
            return
        try:
            presence = fleet.parse_lease(body)
        except ValueError as exc:
            log.warning("presence lease %s: unreadable (%s); ignoring it", key, exc)
            return
        if before is not None and before.gone_at is None and fleet.same_renewal(before.presence, presence):
            self._sightings[key] = Sighting(presence, before.seen_at)
        else:
            if before is None or before.gone_at is not None:
                log.info("agent %s announced (%s, user %s)", presence.agent.id, key, presence.user or "unknown")
            self._sightings[key] = Sighting(presence, now)
        agent = presence.agent.id.lower()
        self._leases_of.setdefault(agent, set()).add(key)
        if before is not None and before.presence.agent.id.lower() != agent:
            self._rearm_agent(before.presence.agent.id)
        self._rearm_agent(agent)

    def presence_listed(self, bodies: Sequence[dict[str, Any]], namespace: str | None = None) -> None:
        """A fresh listing of the presence leases of `namespace` (None: all): what it lacks was
        deleted while the watch was down."""
        listed = set()
        for body in bodies:
            meta = body.get("metadata") or {}
            listed.add(f"{meta.get('namespace', '')}/{meta.get('name', '')}")
            self.observe_presence("ADDED", body)
        for key, sighting in list(self._sightings.items()):
            in_scope = namespace is None or sighting.presence.namespace == namespace
            if in_scope and key not in listed and sighting.gone_at is None:
                self.observe_presence("DELETED", {"metadata": {"namespace": sighting.presence.namespace,
                                                               "name": sighting.presence.name}})  # fmt: skip

    def _rearm_agent(self, agent_id: str) -> None:
        for uid in list(self._claims_of.get(agent_id.lower(), ())):
            tracked = self._tracked.get(uid)
            if tracked is not None:
                self._arm(tracked)

    def _agent_sightings(self, agent_id: str) -> list[Sighting]:
        keys = self._leases_of.get(agent_id.lower(), set())
        return [self._sightings[k] for k in keys if k in self._sightings]

    def _holder_lost_at(self, order: WorkOrder) -> tuple[dt.datetime, Sighting] | None:
        if order.status.phase != Phase.CLAIMED or not order.status.claimed_by:
            return None
        return fleet.holder_lost_at(order, self._agent_sightings(order.status.claimed_by), self.presence_grace)

    def live_agents(self) -> list[fleet.Presence]:
        return fleet.live(self._sightings.values(), self.clock(), self.presence_grace)

    def _forget_gone(self, now: dt.datetime) -> None:
        for key, sighting in list(self._sightings.items()):
            if sighting.gone_at is not None and now - sighting.gone_at > GONE_MEMORY:
                del self._sightings[key]
                leases = self._leases_of.get(sighting.presence.agent.id.lower(), set())
                leases.discard(key)
                if not leases:
                    self._leases_of.pop(sighting.presence.agent.id.lower(), None)

    # --- unschedulable orders -------------------------------------------------------------------

    async def scheduling_pass(self) -> int:
        """Mark Pending orders that no live agent could take for `unschedulable_grace`
        (Schedulable=False, reason NoMatchingAgent, a Warning event), and clear the mark of those
        one can take now. Bounded: one look over what is tracked (in memory), writes only where
        the mark changes, at most `scheduling_writes` of them (oldest first; the next pass does
        the rest). Returns how many writes landed.

        Idle costs nothing: while the live agents would take the same orders as at the last pass,
        only the orders that changed since, or that wait for their grace or a write, are judged
        again (every tracked one otherwise: 100,000 orders take seconds of CPU). When the agents
        change, new orders left without conditions for them are initialised if none would take
        them now."""
        now = self.clock()
        self._forget_gone(now)
        agents = self.live_agents()
        against = fleet.takers_key(agents)
        agents_changed, self._judged_against = against != self._judged_against, against
        if agents_changed:
            for uid in list(self._awaiting_agent):
                tracked = self._tracked.get(uid)
                if tracked is not None and not fleet.anyone_takes(tracked.order, agents):
                    self._awaiting_agent.discard(uid)
                    self._arm(tracked)  # initialised now: no live agent would take it any more
        if self.unschedulable_grace <= 0:
            return 0
        judge = list(self._tracked) if agents_changed else list(self._to_judge)
        self._to_judge = set()
        changes: list[tuple[dt.datetime, WorkOrder, bool]] = []
        for uid in judge:
            tracked = self._tracked.get(uid)
            if tracked is None:
                continue
            order = tracked.order
            since, change = fleet.scheduling(order, agents, self._unmatched.get(uid), now, self.unschedulable_grace)
            if since is None:
                self._unmatched.pop(uid, None)
            else:
                self._unmatched[uid] = since
            if change is not None:
                changes.append((order.created_at, order, change))
            elif since is not None and not fleet.unschedulable(order):
                self._to_judge.add(uid)  # its grace is running: judged again until it is marked
        changes.sort(key=lambda c: (c[0], c[1].key))
        # Each order with a change stays to judge until its write lands (and its new version,
        # coming back through `_track`, is judged once more: nothing left to change then).
        self._to_judge.update(order.uid for _, order, _ in changes)
        written = 0
        for _, order, schedulable in changes[: self.scheduling_writes]:
            budget = self._write_budget()
            if budget is not None and budget < MIN_WRITE_SECONDS:
                break  # the lease is about to lapse: the next pass (or leader) does it
            message = fleet.no_agent_message(order, agents)
            try:
                write = lifecycle.scheduling(order, now, None if schedulable else (fleet.NO_MATCHING_AGENT, message))
                body = await self._api(self.orders.write_status, order, write, budget)
            except (Conflict, NotFound) as exc:  # changed meanwhile: the next pass looks again
                log.debug("%s: %s", order.key, exc, extra=order.logref)
                continue
            except Exception as exc:  # the API server is away: the next pass tries again
                log.warning("%s: marking schedulability failed: %s", order.key, exc, extra=order.logref)
                break
            written += 1
            if schedulable:
                log.info("%s: an agent can take it now (Schedulable mark cleared)", order.key, extra=order.logref)
            else:
                log.info("%s: unschedulable: %s", order.key, message, extra=order.logref)
                self.event(order, "Warning", fleet.NO_MATCHING_AGENT, message)
            self.observe("MODIFIED", body)
        return written

    async def scheduling_forever(self, interval: float) -> None:
        """`scheduling_pass` every `interval` seconds while this replica acts."""
        while True:
            await asyncio.sleep(interval)
            if not self.acting:
                continue
            try:
                await self.scheduling_pass()
            except Exception:  # a bug in one pass must not end the next ones
                log.exception("scheduling pass failed")

    def forget_missing(self, existing: dict[str, str], list_version: str, namespace: str | None = None) -> int:
        """After a fresh listing (uid -> namespace of what exists at `list_version`), forget the
        orders of `namespace` (None: all) that no longer exist: deleted while the watch was
        down, their DELETED event never came. An order seen at a newer version than the listing
        was created after it and stays. Returns how many were forgotten."""
        try:
            listed = int(list_version)
        except ValueError:
            return 0
        gone = [
            uid
            for uid, t in list(self._tracked.items())
            if uid not in existing and (namespace is None or t.order.namespace == namespace) and _rv(t.order) <= listed
        ]
        for uid in gone:
            log.info("%s: no longer exists; forgetting it", self._tracked[uid].order.key)
            self.forget(uid)
        return len(gone)

    def _track(self, order: WorkOrder, previous: _Tracked | None, rejection: str | None) -> _Tracked:
        s = order.status
        sign = (s.phase, s.claimed_by, s.attempt, s.claimed_at, s.renewed_at)
        seen_at = previous.seen_at if previous is not None and previous.sign_of_life == sign else self.clock()
        if s.phase == Phase.CLAIMED and (previous is None or previous.sign_of_life != sign):
            for what, mark in (("claimedAt", s.claimed_at), ("renewedAt", s.renewed_at)):
                if lifecycle.agent_time(mark, seen_at) != mark:
                    log.warning(
                        "%s: %s %s is ahead of the operator's clock; counting from when it was seen (%s)",
                        order.key, what, order.raw_status.get(what), seen_at.isoformat(), extra=order.logref,
                    )  # fmt: skip
        first_seen = None
        if s.phase == Phase.CLAIMED:
            # Startup listing: no first sight to speak of; the server-side write time covers it.
            if previous is None:
                first_seen = None
            elif previous.sign_of_life == sign:
                first_seen = previous.first_seen
            else:
                first_seen = self.clock()
                mark = max((t for t in (s.claimed_at, s.renewed_at) if t is not None), default=first_seen)
                log.debug(
                    "%s: claim sign of life seen %.3fs after the agent's mark",
                    order.key,
                    (first_seen - mark).total_seconds(),
                    extra=order.logref,
                )
        tracked = _Tracked(_compact(order, self._specs), first_seen, sign, seen_at, rejection)
        if order.uid not in self._tracked:
            self._types.seen(order.spec.work_type)
        self._tracked[order.uid] = tracked
        self._to_judge.add(order.uid)
        if not lifecycle.needs_initialise(order):
            self._awaiting_agent.discard(order.uid)
        self._index_claim(order.uid, order)
        return tracked

    # --- deadlines ------------------------------------------------------------------------------

    def lead(self) -> None:
        """Start acting (leadership gained): re-arm every tracked order from its stored status,
        so nothing a previous term left half-done is lost, then run the timer."""
        if self._acting is not None:
            return
        self.counting = True
        for tracked in list(self._tracked.values()):
            self._arm(tracked)
        self._acting = asyncio.create_task(self.scheduler.run())

    async def follow(self) -> None:
        """Stop acting (leadership lost): the timer and its callbacks stop before this returns;
        their deadlines stay armed for the next term."""
        self.counting = False
        acting, self._acting = self._acting, None
        if acting is not None:
            acting.cancel()
            await asyncio.gather(acting, return_exceptions=True)

    @property
    def acting(self) -> bool:
        return self._acting is not None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._content_pool.shutdown(wait=False, cancel_futures=True)
        self._event_pool.shutdown(wait=False, cancel_futures=True)

    async def _api(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def _write_budget(self) -> float | None:
        return self._budget() if self._budget is not None else None

    async def _fire(self, uid: str) -> None:
        tracked = self._tracked.get(uid)
        if tracked is None:
            return
        order, now = tracked.order, self.clock()
        plan = self._plan(tracked)
        if plan.action is None or plan.at is None:
            return
        if plan.at > now:
            self.scheduler.schedule(uid, plan.at)
            return
        budget = self._write_budget()
        if budget is not None and budget < MIN_WRITE_SECONDS:
            # The lease may lapse before the request is over: leave it to the next renewal (or
            # to the next leader) rather than risk a write after someone else took over.
            log.debug("%s: %s deferred: the lease is about to lapse", order.key, plan.action, extra=order.logref)
            self.scheduler.schedule(uid, now + dt.timedelta(seconds=MIN_WRITE_SECONDS))
            return
        awaited = plan.action == Action.INITIALISE and tracked.rejection is None
        if awaited and fleet.anyone_takes(order, self.live_agents()):
            # A live agent would take it: its claim writes the conditions, and a write now would
            # cost the API server a request per order of every backlog.
            self._awaiting_agent.add(uid)
            return
        try:
            if plan.action == Action.DELETE:
                await self._delete(order, budget)
                return
            lost = self._holder_lost_at(order) if plan.action == Action.EXPIRE else None
            why = fleet.lost_reason(lost[1], self.presence_grace) if lost is not None and now >= lost[0] else None
            write = self._transition(plan.action, order, tracked, now, why)
            body = await self._api(self.orders.write_status, order, write, budget)
        except TransitionError as exc:
            log.debug("%s: %s", order.key, exc, extra=order.logref)
            return
        except NotFound:
            self.forget(uid)
            return
        except Conflict as exc:
            # Someone wrote first (an agent claimed, renewed, completed, ...). The watch brings
            # that newer version and `observe` decides again; reading it here would only add load.
            log.debug("%s", exc, extra=order.logref)
            return
        except Exception as exc:  # an API hiccup must not lose the deadline
            log.warning(
                "%s: %s failed (%s); retrying in %.0fs", order.key, plan.action, exc, ERROR_RETRY_SECONDS,
                extra=order.logref,
            )  # fmt: skip
            self.scheduler.schedule(uid, now + dt.timedelta(seconds=ERROR_RETRY_SECONDS))
            return
        log.info("%s: %s (%s)", order.key, write.transition, write.message, extra=order.logref)
        self.observe("MODIFIED", body)  # which posts its event, as for everyone's transitions
        if why is not None:
            self.event(order, "Warning", "AgentLost", f"{why}; its claim (attempt {order.status.attempt}) expired "
                       f"at once, whatever claimTimeoutSeconds ({order.spec.claim_timeout_seconds}s)")  # fmt: skip

    async def _delete(self, order: WorkOrder, budget: float | None) -> None:
        """TTL: delete this very version; if it changed meanwhile (requeued just as its TTL fell
        due), read it again and plan again. The event says Deleted only for a real deletion."""
        try:
            await self._api(self.orders.delete, order, budget)
        except Conflict as exc:
            log.info("%s: not deleted (%s); looking again", order.key, exc, extra=order.logref)
            try:
                body = await self._api(self.orders.get, order.namespace, order.name)
            except NotFound:
                self.forget(order.uid)
                return
            if body.get("metadata", {}).get("uid") != order.uid:
                self.forget(order.uid)  # a new order of the same name: the watch brings it
                return
            self.observe(None, body)
            return
        log.info("%s: deleted (ttlSecondsAfterFinished reached)", order.key, extra=order.logref)
        self.event(order, "Normal", "Deleted", "ttlSecondsAfterFinished reached")

    def _transition(
        self, action: Action, order: WorkOrder, tracked: _Tracked, now: dt.datetime, lost: str | None = None
    ) -> StatusWrite:
        if action == Action.INITIALISE:
            return lifecycle.initialise(order, now, tracked.rejection)
        if action == Action.CONDITIONS:
            return lifecycle.sync_conditions(order, now)
        if action == Action.EXPIRE:
            return lifecycle.expire(order, now, tracked.first_seen, tracked.seen_at, lost)
        return lifecycle.due(order, now, tracked.seen_at)

    def _plan(self, tracked: _Tracked) -> lifecycle.Plan:
        lost = self._holder_lost_at(tracked.order)
        return lifecycle.plan(
            tracked.order, tracked.first_seen, rejected=tracked.rejection is not None, seen_at=tracked.seen_at,
            agent_lost_at=lost[0] if lost is not None else None,
        )  # fmt: skip

    def event(self, order: WorkOrder, kind: str, reason: str, message: str) -> None:
        """Posted in the background and rate-limited: an event is never worth delaying a deadline.
        Thread-safe (the build agent posts its refusals here too, under the same limit)."""
        if self._post_event is None:
            return
        with self._event_lock:
            allowed = self._event_budgets.get(kind, self._event_budgets["Normal"]).take(time.monotonic())
        if not allowed:
            metrics.EVENTS_DROPPED.inc()
            log.debug("%s: event %s dropped (rate limit)", order.key, reason, extra=order.logref)
            return
        self._event_pool.submit(self._post_event, order, kind, reason, message)


@dataclass
class _Budget:
    """A token bucket: `rate` a second, at most `burst` at once."""

    rate: float
    burst: float
    tokens: float = -1.0
    refilled: float = 0.0

    def take(self, now: float) -> bool:
        if self.tokens < 0:  # the first call: a full bucket
            self.tokens, self.refilled = self.burst, now
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.refilled) * self.rate)
        self.refilled = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class _Feed:
    """A thread per scope (each watched namespace, or all) that lists, then watches from the
    list's resourceVersion, and lists again after 410 Gone or a broken connection; what it reads
    reaches the engine on the event loop, in the order it was read (`_post`)."""

    what = ""

    def __init__(self, engine: Engine, scopes: Sequence[str | None]) -> None:
        self.engine = engine
        self._loop = asyncio.get_running_loop()
        self._stop = threading.Event()
        self._watches: list[OrderWatch] = []
        # Calls for the loop, drained in batches: one wake-up of the loop per burst of events,
        # not one per event.
        self._queue: collections.deque[tuple[Callable[..., object], tuple[Any, ...]]] = collections.deque()
        self._draining = False
        self._threads = [
            threading.Thread(target=self._run, args=(ns,), name=f"{self.what}-watch-{ns or 'all'}", daemon=True)
            for ns in scopes
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for watch in list(self._watches):
            watch.stop()

    def _run(self, namespace: str | None) -> None:
        keep_watching(self._stop, self.what, lambda: self._list_and_watch(namespace))

    def _list_and_watch(self, namespace: str | None) -> None:
        raise NotImplementedError

    def _watch(self, namespace: str | None, version: str, open_watch: Callable[[str], OrderWatch],
               on_event: Callable[[str, dict[str, Any]], None]) -> None:  # fmt: skip
        """Watch from `version` until stopped, resuming where each watch ended; returns at
        410 Gone (too old: the caller lists again)."""
        while not self._stop.is_set():
            watch = open_watch(version)
            self._watches.append(watch)
            try:
                for kind, body in watch:
                    version = body.get("metadata", {}).get("resourceVersion", version)
                    if kind != "BOOKMARK":
                        self._post(on_event, kind, body)
            finally:
                self._watches.remove(watch)
            if watch.gone:
                return

    def _post(self, fn: Callable[..., object], *args: Any) -> None:
        # No event is lost between the two: `_drain` clears the flag before it empties the queue.
        self._queue.append((fn, args))
        if not self._draining:
            self._draining = True
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self._draining = False
        while self._queue:
            fn, args = self._queue.popleft()
            fn(*args)

    def _posted(self, fn: Callable[..., object], *args: Any) -> None:
        """`_post`, and wait until the loop has run it (or we stop): a listing thread never
        runs more than a page ahead of the engine, so a big listing never piles up in memory."""
        done = threading.Event()

        def call() -> None:
            try:
                fn(*args)
            finally:
                done.set()

        self._post(call)
        while not done.wait(1.0):
            if self._stop.is_set() or self._loop.is_closed():
                return


class OrderFeed(_Feed):
    """Feeds the engine the WorkOrders of the watched namespaces (all, or each named one). The
    listing is paged (`page_size` orders per request, limit and continue), each page handed to
    the engine before the next is asked for: start-up on 100,000 orders holds one page of raw
    objects at a time, not all of them. A listing after the first (410 Gone, a reconnect) also
    forgets the orders that no longer exist: deleted while the watch was down."""

    what = "workorders"

    def __init__(self, engine: Engine, page_size: int = 500) -> None:
        super().__init__(engine, list(engine.namespaces) or [None])
        self.page_size = page_size

    def _list_and_watch(self, namespace: str | None) -> None:
        existing: dict[str, str] = {}
        version = ""
        for page in self.engine.orders.pages(namespace, limit=self.page_size):
            for body in page:
                meta = body.get("metadata", {})
                existing[meta.get("uid", "")] = meta.get("namespace", "")
            version = page.resource_version
            self._posted(self._listed, page)
            if self._stop.is_set():
                return
        self._posted(self.engine.forget_missing, existing, version, namespace)
        del existing
        self._watch(
            namespace, version, lambda rv: self.engine.orders.watch(namespace, resource_version=rv),
            self.engine.observe,
        )  # fmt: skip

    def _listed(self, page: Page) -> None:
        for body in page:
            self.engine.observe(None, body)


class PresenceFeed(_Feed):
    """Feeds the engine the presence leases of the watched namespaces (all, or each named one);
    what vanished between two listings counts as deleted."""

    what = "presence"

    def __init__(self, engine: Engine, leases: PresenceLeases, also: Sequence[str] = ()) -> None:
        """`also`: namespaces to follow besides the engine's, when it watches some only (the
        presence namespace, where the operator's own agents announce themselves)."""
        super().__init__(engine, list(dict.fromkeys((*engine.namespaces, *also))) if engine.namespaces else [None])
        self.leases = leases

    def _list_and_watch(self, namespace: str | None) -> None:
        bodies, version = self.leases.list(namespace)
        self._post(self.engine.presence_listed, bodies, namespace)
        self._watch(namespace, version, lambda rv: self.leases.watch(namespace, rv), self.engine.observe_presence)


def _name(body: dict[str, Any]) -> tuple[str, str]:
    meta = body.get("metadata", {})
    return meta.get("namespace", "?"), meta.get("name", "?")
