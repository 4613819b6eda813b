"""The agent SDK: take WorkOrders and report back, with the claim protocol handled for you.

    from workorder_operator.agent import Agent
    from workorder_operator.kube import api_client

    agent = Agent(api_client(), id="6f1c2a4e-...", work_types=["backup"], labels=["zone-a"])
    claim = agent.claim_next()              # highest priority, oldest first; None if nothing is free
    if claim:
        with claim.renewing():              # heartbeats in the background while the work runs
            digest = do_the_work(claim.order.spec.yaml_content)
        claim.complete(digest)              # or claim.fail("why", retryable=False), claim.release()

    agent.run(handler, concurrency=4)       # or: a watch-driven loop that does all of the above

`run` lists the Pending orders in pages and claims once the first page is in: until the listing
is done, the offer order (priority high first, then oldest) is best effort, among the orders seen
so far; after it, exact. It keeps no order's content until it claims that order.

Every write is a compare-and-swap made by `lifecycle` (guarded by phase, claimedBy and the
attempt number, the fencing token), so a stale handle can never touch a re-claimed order: it
raises `ClaimLost` instead.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from workorder_operator import fleet, lifecycle, offer
from workorder_operator.errors import Conflict, Failure, NotFound, Transient, WorkOrderError
from workorder_operator.kube import ApiClient, OrderWatch, WorkOrders, api_error, keep_watching, whoami
from workorder_operator.lifecycle import StatusWrite, TransitionError
from workorder_operator.model import Phase, WorkOrder, utcnow
from workorder_operator.offer import Candidate, Offer
from workorder_operator.presence import PresenceLeases
from workorder_operator.targeting import AgentIdentity, admits, check_agent_id

log = logging.getLogger(__name__)

# The most candidates a contended agent spreads its claim attempts over, and how many races it may
# lose in a row before it waits for its watch to catch up (its view of Pending orders is stale).
CLAIM_WINDOW_MAX = 32
LOST_RACES_PER_ROUND = 2
# How long a starting agent waits for its first look at its peers before it claims anything.
PEERS_FIRST_LOOK_SECONDS = 5.0
# Orders per list request (limit/continue): the first page is claimable at once, however long the queue.
PAGE_SIZE = 500


__all__ = ["Agent", "Claim", "ClaimLost", "Failure"]


class ClaimLost(Conflict):
    """The claim this handle holds is gone (expired and re-claimed, released, finished, deleted)."""


def readable(bodies: list[dict[str, Any]]) -> list[WorkOrder]:
    """The orders that parse; one with a status we cannot read (the API server accepts dates like
    year 0000) is skipped with a warning instead of blocking every other order."""
    orders = []
    for body in bodies:
        try:
            orders.append(WorkOrder.from_body(body))
        except (KeyError, ValueError, TypeError) as exc:
            meta = body.get("metadata", {})
            log.warning("workorder %s/%s: unreadable (%s); skipping it", meta.get("namespace"), meta.get("name"), exc)
    return orders


def order_sort_key(order: WorkOrder) -> tuple[int, Any, str]:
    """The offer order: priority high first, then oldest first (name breaks ties)."""
    return offer.sort_key(order)


class Claim:
    """A claimed order. Thread-safe: the background renewal and the worker may share it."""

    def __init__(self, agent: Agent, order: WorkOrder) -> None:
        self.agent = agent
        self.order = order
        self.attempt = order.status.attempt
        self.done = False
        # Set when background renewal finds the claim gone: long work should stop.
        self.lost = threading.Event()
        self._lost: str | None = None  # why the claim is gone, for every later call on this handle
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.order.name

    def renew(self) -> None:
        self._write("renew", lambda o, now: lifecycle.renew(o, self.agent.id, self.attempt, now), final=False)

    def complete(self, result: str = "") -> None:
        self._write("complete", lambda o, now: lifecycle.complete(o, self.agent.id, self.attempt, result, now))

    def fail(self, error: str, *, retryable: bool = True) -> None:
        self._write(
            "fail", lambda o, now: lifecycle.fail(o, self.agent.id, self.attempt, error, now, retryable=retryable)
        )

    def release(self, reason: str = "") -> None:
        self._write("release", lambda o, now: lifecycle.release(o, self.agent.id, self.attempt, now, reason))

    def detach(self) -> None:
        """Stop handling this claim without a word to the API: it stays held (and expires unless
        renewed). For agents that resume their claims after a restart (`Agent.run(resume=True)`):
        an agent that left a claim behind keeps its presence lease when it stops (its successor
        of the same id renews it), so the claim is not expired the moment it leaves."""
        with self._lock:
            self.done = True
            self.agent.left_behind = True

    def _write(self, what: str, make: Callable[[WorkOrder, Any], StatusWrite], *, final: bool = True) -> None:
        with self._lock:
            if self.done:
                raise ClaimLost(self._lost or f"{self.order.key}: attempt {self.attempt} is already finished")
            # An API outage must not lose a finished attempt: keep trying while the claim can
            # still be ours (it cannot outlive its timeout anyway).
            give_up = time.monotonic() + min(max(self.order.spec.claim_timeout_seconds, 30), 300)
            races = 0
            pause = 0.5
            while True:
                try:
                    body = self.agent.orders.write_status(self.order, make(self.order, utcnow()))
                except (Conflict, TransitionError) as exc:
                    # Our copy may just be old; the guards say whether the claim is still ours.
                    races += 1
                    if races > 3:
                        raise ClaimLost(f"{self.order.key}: {what} kept losing races; giving up") from exc
                    self._refresh(what, exc)
                    continue
                except NotFound as exc:
                    raise self._lose(f"{self.order.key}: {what} failed: the order was deleted") from exc
                except Transient as exc:
                    if time.monotonic() + pause > give_up:
                        raise
                    log.warning("%s: %s failed (%s); trying again in %.1fs", self.order.key, what, exc, pause,
                                extra=self.order.logref)  # fmt: skip
                    time.sleep(pause)
                    pause = min(pause * 2, 10.0)
                    continue
                self.order = WorkOrder.from_body(body)
                self.done = final
                return

    def _refresh(self, what: str, cause: Exception) -> None:
        try:
            fresh = WorkOrder.from_body(self.agent.orders.get(self.order.namespace, self.order.name))
        except NotFound as exc:
            raise self._lose(f"{self.order.key}: {what} failed: the order was deleted") from exc
        s = fresh.status
        if (
            fresh.uid != self.order.uid
            or s.phase != Phase.CLAIMED
            or s.claimed_by != self.agent.id
            or s.attempt != self.attempt
        ):
            now = f"{s.phase}" + (f", attempt {s.attempt} of agent {s.claimed_by}" if s.claimed_by else "")
            raise self._lose(
                f"{self.order.key}: {what} refused: the claim of attempt {self.attempt} is lost (order is now {now}"
                + (f"; {s.last_error}" if s.last_error and s.phase != Phase.CLAIMED else "")
                + ")"
            ) from cause
        self.order = fresh

    def _lose(self, message: str) -> ClaimLost:
        self.done = True
        self._lost = message
        return ClaimLost(message)

    @contextlib.contextmanager
    def renewing(self, interval: float | None = None) -> Iterator[threading.Event]:
        """Renew in the background every `interval` seconds (default: a third of the claim
        timeout, so two renewals can fail before the claim expires). Yields an Event that is set
        when the claim is lost, so long work can stop early."""
        every = interval or max(0.2, self.order.spec.claim_timeout_seconds / 3)
        stop, lost = threading.Event(), self.lost

        def loop() -> None:
            while not stop.wait(every):
                try:
                    self.renew()
                except ClaimLost as exc:
                    log.warning("%s", exc, extra=self.order.logref)
                    lost.set()
                    return
                except Exception as exc:  # a blip: the next tick tries again, well before expiry
                    log.warning(
                        "%s: renew failed (%s); trying again in %.1fs",
                        self.order.key,
                        exc,
                        every,
                        extra=self.order.logref,
                    )

        thread = threading.Thread(target=loop, name=f"renew-{self.name}", daemon=True)
        thread.start()
        try:
            yield lost
        finally:
            stop.set()
            thread.join()


class Agent:
    """An agent identity and what it takes: work types, namespace (None: all)."""

    def __init__(
        self,
        api: ApiClient,
        id: str | None = None,
        *,
        work_types: Sequence[str] = (),
        labels: Sequence[str] = (),
        annotations: dict[str, str] | None = None,
        namespace: str | None = None,
        field_manager: str = "workorder-agent",
        lease_duration: float = fleet.LEASE_SECONDS,
        presence_namespace: str | None = None,
        steal_delay: float | None = fleet.STEAL_DELAY_SECONDS,
        page_size: int = PAGE_SIZE,
    ) -> None:
        """`lease_duration`: the term of this agent's presence lease (`run` announces it; renewed
        every third of it); once it lapses, the operator expires this agent's claims at once.
        `presence_namespace`: where it announces itself (default: its namespace; for an
        all-namespaces agent, `default`). `steal_delay`: `run` divides the queue with the other live
        agents it sees there (rendezvous hashing, `fleet.divide`): it tries the orders it ranks first,
        then those that waited longer than this for their first-ranked agent; None: no division.
        `page_size`: orders per list request (limit/continue); `run` claims once the first page is in."""
        self.api = api
        agent_id = check_agent_id(id, "Agent id") if id is not None else str(uuid.uuid4())
        self.identity = AgentIdentity(agent_id, tuple(labels), dict(annotations or {}))
        self.work_types = tuple(work_types)
        self.namespace = namespace
        if not fleet.MIN_LEASE_SECONDS <= lease_duration <= fleet.MAX_LEASE_SECONDS:
            raise ValueError(
                f"lease_duration {lease_duration!r}: between {fleet.MIN_LEASE_SECONDS} and "
                f"{fleet.MAX_LEASE_SECONDS} seconds"
            )
        self.lease_duration = lease_duration
        self.presence_namespace = presence_namespace or namespace or "default"
        self.leases = PresenceLeases(api, field_manager)
        # A claim was detached (left held for a successor to resume): keep the lease on stopping.
        self.left_behind = False
        self.steal_delay = steal_delay
        # The live agents `run` sees (presence leases in its presence namespace), if it looks, and
        # this agent's rank for each order among them (by order uid; for `_ranks_of` agents).
        self.peers: Peers | None = None
        self._ranks: dict[str, int] = {}
        self._ranks_of: tuple[str, ...] = ()
        # One field manager for all agents of a kind (the SDK's, the plugin's): managedFields stays
        # one entry however many agents write.
        self.orders = WorkOrders(api, field_manager)
        self._user: str | None = None
        # How many of the oldest candidates the run loop spreads its attempts over (grows on lost races).
        self._window = 1
        self.page_size = page_size

    @property
    def id(self) -> str:
        return self.identity.id

    @property
    def user(self) -> str | None:
        """This agent's Kubernetes username (asked once, with a SelfSubjectReview): recorded in
        each claim, so the admission policy lets only this identity act on it."""
        if self._user is None:
            try:
                self._user = whoami(self.api)
            except WorkOrderError as exc:
                if isinstance(exc, Transient) and exc.status is None:
                    raise  # no answer at all: ask again next time
                log.warning("cannot tell this agent's Kubernetes username (%s); claims will not record it", exc)
                self._user = ""
        return self._user or None

    # --- presence -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def present(self, namespaces: Sequence[str] | None = None, others: Sequence[Agent] = ()) -> Iterator[None]:
        """Announced for the duration: this agent's presence lease, renewed in the background
        (`run` does this itself). `namespaces`: where it takes orders (default: its namespace, or
        every one). On the way out the lease is deleted (a clean stop), unless a claim was left
        behind (`Claim.detach`, also by `others` of the same id) for a successor to resume."""
        beat = Heartbeat(self, namespaces)
        beat.start()
        try:
            yield
        finally:
            beat.stop(withdraw=not any(a.left_behind for a in (self, *others)))

    # --- finding and claiming -------------------------------------------------------------------

    def _selector(self) -> str:
        """Narrow server-side: Pending, and the work type when there is exactly one (selectors cannot OR)."""
        selector = f"status.phase={Phase.PENDING}"
        if len(self.work_types) == 1:
            selector += f",spec.workType={self.work_types[0]}"
        return selector

    def takes_type(self, order: WorkOrder) -> bool:
        return not self.work_types or order.spec.work_type in self.work_types

    def takes(self, order: WorkOrder) -> bool:
        return (
            order.status.phase == Phase.PENDING
            and self.takes_type(order)
            and admits(order.spec.targeting, self.identity)
        )

    def candidates(self) -> list[WorkOrder]:
        """Claimable orders, in offer order (each with its content: for a short queue; `run`
        keeps only what it needs of each)."""
        pages = self.orders.pages(self.namespace, self._selector(), self.page_size)
        orders = [o for page in pages for o in readable(page) if self.takes(o)]
        return sorted(orders, key=order_sort_key)

    def claim(self, order: WorkOrder) -> Claim | None:
        """Claim this order; None if another agent was faster (that is normal)."""
        try:
            body = self.orders.write_status(order, lifecycle.claim(order, self.identity, utcnow(), self.user))
        except (Conflict, NotFound):  # another agent was faster, or the order is gone
            return None
        except Transient:
            # The reply is lost, not necessarily the write: if the order now holds exactly the
            # claim we asked for, it is ours; left alone it would stay orphaned for a whole timeout.
            adopted = self._adopt(order)
            if adopted is None:
                raise
            return adopted
        return Claim(self, WorkOrder.from_body(body))

    def _adopt(self, order: WorkOrder) -> Claim | None:
        try:
            fresh = WorkOrder.from_body(self.orders.get(order.namespace, order.name))
        except Exception as exc:
            log.warning("%s: claim outcome unknown (%s)", order.key, exc, extra=order.logref)
            return None
        s = fresh.status
        if (
            fresh.uid == order.uid
            and s.phase == Phase.CLAIMED
            and s.claimed_by == self.id
            and s.attempt == order.status.attempt + 1
        ):
            log.info("%s: the reply to our claim was lost; adopting attempt %d", order.key, s.attempt,
                     extra=order.logref)  # fmt: skip
            return Claim(self, fresh)
        return None

    def held(self) -> list[Claim]:
        """Handles on the claims this agent id holds now: after a restart, resume them."""
        held = []
        for page in self.orders.pages(self.namespace, f"status.phase={Phase.CLAIMED}", self.page_size):
            # Only ours are parsed: the others' may be many.
            ours = [b for b in page if (b.get("status") or {}).get("claimedBy") == self.id]
            held += [Claim(self, o) for o in readable(ours) if self.takes_type(o)]
        return held

    def claim_next(self, candidates: Sequence[WorkOrder] | None = None) -> Claim | None:
        """The first candidate this agent wins, trying the next on each lost race."""
        for order in candidates if candidates is not None else self.candidates():
            claim = self.claim(order)
            if claim is not None:
                return claim
        return None

    # --- the run loop ---------------------------------------------------------------------------

    def run(
        self,
        handler: Callable[[Claim], str | None],
        *,
        concurrency: int = 1,
        stop: threading.Event | None = None,
        shutdown_grace: float = 10.0,
        resume: bool = False,
        announce: bool = True,
    ) -> None:
        """Take orders until `stop` is set: a watch on Pending orders wakes the loop at once.

        For each claim, `handler(claim)` runs in a worker thread with background renewal. Its
        return value completes the order (the result); `Failure` fails it (retryable or not); any
        other exception fails it as retryable. A handler may also finish the claim itself.
        On stop, no new orders are claimed; in-flight handlers get `shutdown_grace` seconds to
        finish, then their orders are released, so nothing stays claimed by an agent that left.
        `resume`: first take up the claims this agent id already holds (a restarted agent whose
        work can continue, e.g. a build it only has to keep watching). `announce`: hold a presence
        lease meanwhile (`present`; False when the caller announces this agent itself).
        """
        with self.present() if announce else contextlib.nullcontext():
            self._run(handler, concurrency, stop or threading.Event(), shutdown_grace, resume)

    def _run(
        self,
        handler: Callable[[Claim], str | None],
        concurrency: int,
        stop: threading.Event,
        shutdown_grace: float,
        resume: bool,
    ) -> None:
        pending = PendingOrders(self, stop)
        pending.start()
        if self.steal_delay is not None:
            self.peers = Peers(self, stop)
            self.peers.start()
            # Dividing before the first look at the peers would take their share at start-up.
            self.peers.ready.wait(PEERS_FIRST_LOOK_SECONDS)
        in_flight: dict[str, tuple[Claim, Future[None]]] = {}
        pool = ThreadPoolExecutor(concurrency, thread_name_prefix="workorder-work")
        try:
            for held in self.held() if resume else ():
                log.info("%s: resuming attempt %d", held.order.key, held.attempt, extra=held.order.logref)
                in_flight[held.order.key] = (held, pool.submit(self._work, held, handler, resumed=True))
            while not stop.is_set():
                # Cleared before looking, so a watch event or a finished worker from now on wakes us.
                pending.changed.clear()
                for key in [k for k, (_, f) in in_flight.items() if f.done()]:
                    del in_flight[key]
                try:
                    claim = self._claim_from(pending) if len(in_flight) < concurrency else None
                except Exception as exc:  # the API server is unreachable or failing: wait, do not give up
                    log.warning("claiming failed (%s); trying again in 1s", exc)
                    stop.wait(1.0)
                    continue
                if claim is not None:
                    future = pool.submit(self._work, claim, handler)
                    future.add_done_callback(lambda _: pending.changed.set())  # a free slot: claim the next
                    in_flight[claim.order.key] = (claim, future)
                    continue
                pending.changed.wait(0.5)
        finally:
            stop.set()
            pending.stop()
            if self.peers is not None:
                self.peers.stop()
            # Not waited for: a handler still running after the grace is left behind (its order released).
            pool.shutdown(wait=False)
            deadline = time.monotonic() + shutdown_grace
            for claim, future in in_flight.values():
                with contextlib.suppress(Exception):
                    future.result(timeout=max(0.0, deadline - time.monotonic()))
                if not claim.done:
                    with contextlib.suppress(ClaimLost):
                        claim.release("agent shutting down")
                        log.info("%s: released (agent shutting down)", claim.order.key, extra=claim.order.logref)

    def _divided(self, candidates: Iterable[Candidate], waiting: int) -> list[Candidate]:
        """The first candidates (in offer order, read lazily) in the order this agent should try
        them, given the agents it sees; `waiting`: how many candidates there are in all."""
        # A claim round tries a few of the first candidates (see _spread, _claim_from).
        limit = CLAIM_WINDOW_MAX + 1
        if self.peers is None or self.steal_delay is None:
            return list(itertools.islice(candidates, limit))
        me = fleet.Presence(
            namespace=self.presence_namespace, name=fleet.lease_name(self.id), agent=self.identity,
            work_types=self.work_types, user=self._user or "",
            namespaces=() if self.namespace is None else (self.namespace,), duration=self.lease_duration,
            renew_time=None,
        )  # fmt: skip
        peers = self.peers.live()
        seen = tuple(sorted(p.key for p in peers))
        if seen != self._ranks_of:  # another set of agents ranks orders anew
            self._ranks, self._ranks_of = {}, seen
        if len(self._ranks) > 4 * waiting + 1024:  # forget orders long gone
            self._ranks = {}
        return fleet.divide(candidates, me, peers, utcnow(), self.steal_delay, limit=limit, ranks=self._ranks,
                            facts=lambda c: c.facts)  # fmt: skip

    def _claim_from(self, pending: PendingOrders) -> Claim | None:
        for lost, candidate in enumerate(self._spread(pending.choose(self._divided))):
            if lost >= LOST_RACES_PER_ROUND:
                # Others are taking what we see: marching down a stale list only loses more races.
                # A short, random pause lets our watch catch up and the racers drift apart.
                time.sleep(random.uniform(0.01, 0.04))
                return None
            # Parsed only now, for the claim write; the reply (the claim's order) has the content.
            claim = self.claim(candidate.order())
            # Won or lost, this version is no longer Pending; the watch brings it back if it is again.
            pending.discard(candidate)
            if claim is not None:
                self._window = max(1, self._window // 2)
                return claim
            self._window = min(CLAIM_WINDOW_MAX, self._window * 2)
        return None

    def _spread(self, candidates: list[Candidate]) -> list[Candidate]:
        """Candidates in offer order, except that after lost races the first few of the same
        priority are tried in random order: many agents stop all racing for the one oldest order.
        Uncontended, the window is 1 and the order is strict. `candidates`: the few `_divided` chose."""
        if self._window <= 1 or not candidates:
            return candidates
        top = candidates[0].facts.priority
        head = [c for c in candidates[: self._window] if c.facts.priority == top]
        random.shuffle(head)
        return head + candidates[len(head) :]

    def _work(self, claim: Claim, handler: Callable[[Claim], str | None], *, resumed: bool = False) -> None:
        ref = claim.order.logref
        if resumed:
            # Nobody renewed it while we were away: renew at once, not a third of the timeout
            # from now (by then a short claim would have expired under us).
            try:
                claim.renew()
            except ClaimLost as exc:
                log.warning("%s", exc, extra=ref)
                return
            except Exception as exc:  # the background renewal tries again
                log.warning("%s: renewing the resumed claim failed: %s", claim.order.key, exc, extra=ref)
        try:
            with claim.renewing():
                result = handler(claim)
        except ClaimLost as exc:
            log.warning("%s", exc, extra=ref)
            return
        except Failure as exc:
            self._fail(claim, str(exc), exc.retryable)
            return
        except Exception as exc:
            mapped = api_error(exc)
            if mapped is not None and mapped.status is not None:
                self._fail(claim, f"API error {mapped.status}: {mapped}", True)
            else:
                self._fail(claim, f"{type(exc).__name__}: {exc}", True)
            return
        if claim.done:  # the handler finished the claim itself
            return
        try:
            claim.complete(result or "")
            log.info("%s: attempt %d completed", claim.order.key, claim.attempt, extra=ref)
        except ClaimLost as exc:
            log.warning("%s", exc, extra=ref)
        except Exception as exc:  # the API stayed away longer than the claim can live: it will expire
            log.error("%s: could not report the completion of attempt %d: %s", claim.order.key, claim.attempt, exc,
                      extra=ref)  # fmt: skip

    @staticmethod
    def _fail(claim: Claim, error: str, retryable: bool) -> None:
        if claim.done:
            return
        try:
            claim.fail(error, retryable=retryable)
            log.info("%s: attempt %d failed (%s): %s", claim.order.key, claim.attempt,
                     claim.order.status.phase, error, extra=claim.order.logref)  # fmt: skip
        except ClaimLost as exc:
            log.warning("%s", exc, extra=claim.order.logref)
        except Exception as exc:  # the API stayed away longer than the claim can live: it will expire
            log.error("%s: could not report the failure of attempt %d: %s", claim.order.key, claim.attempt, exc,
                      extra=claim.order.logref)  # fmt: skip


class Heartbeat:
    """An agent's presence lease (`fleet`), renewed every third of its term in a thread.

    Presence is best effort: an agent that cannot announce itself (no right to leases, the API
    away) still works; its claims then only expire after their claimTimeoutSeconds."""

    def __init__(self, agent: Agent, namespaces: Sequence[str] | None = None) -> None:
        self.agent = agent
        default = () if agent.namespace is None else (agent.namespace,)
        self.namespaces = tuple(namespaces) if namespaces is not None else default
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"presence-{agent.id[:8]}", daemon=True)
        self._uid: str | None = None
        self._complained = False

    def start(self) -> None:
        """Announce once before anything is claimed, then keep renewing."""
        self._beat(first=True)
        self._thread.start()

    def stop(self, *, withdraw: bool) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if withdraw and self._uid is not None:
            a = self.agent
            try:
                a.leases.delete(a.presence_namespace, fleet.lease_name(a.id), self._uid)
            except WorkOrderError as exc:  # it lapses by itself; the operator then expires nothing we hold
                log.warning("could not withdraw the presence lease of agent %s: %s", a.id, exc)

    def _loop(self) -> None:
        every = self.agent.lease_duration / 3
        while not self._stop.wait(every):
            self._beat(first=False)

    def _beat(self, *, first: bool) -> None:
        a = self.agent
        try:
            body = fleet.lease_body(
                a.identity, work_types=a.work_types, user=a.user or "", namespaces=self.namespaces,
                duration=a.lease_duration, now=utcnow(), acquired=first,
            )  # fmt: skip
            stored = a.leases.put(a.presence_namespace, body)
        except Exception as exc:
            level = logging.WARNING if first or not self._complained else logging.DEBUG
            log.log(level, "agent %s: cannot announce its presence in namespace %s (%s); its claims expire only "
                    "after their claimTimeoutSeconds until it can", a.id, a.presence_namespace, exc)  # fmt: skip
            self._complained = True
            return
        if self._complained:
            log.info("agent %s: presence announced again", a.id)
            self._complained = False
        self._uid = str(stored.get("metadata", {}).get("uid") or "") or None


class Peers:
    """The live agents in this agent's presence namespace (presence leases, list then watch), to
    divide the queue with. Best effort: without the right to list leases, or while the watch is
    down, the agent sees no peers and takes every candidate, as before."""

    def __init__(self, agent: Agent, stop: threading.Event) -> None:
        self.agent = agent
        self._stop = stop
        self._seen: dict[str, fleet.Sighting] = {}
        self._lock = threading.Lock()
        self._watch: OrderWatch | None = None
        # Set once the first list answered or failed: then `live` says what this agent can know.
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"peers-{agent.id[:8]}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.stop()

    def live(self) -> list[fleet.Presence]:
        with self._lock:
            return fleet.live(self._seen.values(), utcnow())

    def _loop(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                bodies, version = self.agent.leases.list(self.agent.presence_namespace)
                with self._lock:
                    self._seen = {}
                for body in bodies:
                    self._saw("ADDED", body)
                self.ready.set()
                backoff = 0.5
                while not self._stop.is_set():
                    self._watch = self.agent.leases.watch(self.agent.presence_namespace, version)
                    for kind, body in self._watch:
                        version = body.get("metadata", {}).get("resourceVersion", version)
                        if kind != "BOOKMARK":
                            self._saw(kind, body)
                    if self._watch.gone:
                        break
            except Exception as exc:
                self.ready.set()  # best effort: without peers in view, take every candidate
                if self._stop.is_set():
                    return
                log.debug("agent %s: cannot follow its peers (%s); again in %.0fs", self.agent.id, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _saw(self, kind: str, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
        with self._lock:
            if kind == "DELETED":
                self._seen.pop(key, None)
                return
            try:
                presence = fleet.parse_lease(body)
            except ValueError:
                return
            before = self._seen.get(key)
            kept = before is not None and fleet.same_renewal(before.presence, presence)
            self._seen[key] = fleet.Sighting(presence, before.seen_at if before and kept else utcnow())


class PendingOrders:
    """A live view of the Pending orders an agent would take, fed by a watch, without their
    content (`offer.Candidate`: an order is parsed whole only when a claim round tries it).

    Lists page by page (`Agent.page_size` orders a request), then watches from the last page's
    resourceVersion; on 410 Gone or any connection error (an API server restart) it lists again
    after a short backoff. The first listing fills the view as its pages come in, so the agent
    claims as soon as the first page is in (in offer order among what it has seen so far: exact
    once the listing is done); a later listing fills a new view that replaces the old one when it
    is complete (orders it did not bring are gone), so claims never stop meanwhile. An order
    leaving Pending leaves the field-selected watch as a DELETED event."""

    def __init__(self, agent: Agent, stop: threading.Event) -> None:
        self.agent = agent
        self._stop = stop
        self._offer = Offer()
        # Whether a listing ever completed (until then, the view is filled in place).
        self._listed = False
        self._lock = threading.Lock()
        self.changed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="workorder-watch", daemon=True)
        self._watch: OrderWatch | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()

    def __len__(self) -> int:
        with self._lock:
            return len(self._offer)

    def snapshot(self) -> list[WorkOrder]:
        """Every candidate, parsed, in offer order (for a look at a short queue: `choose` reads lazily)."""
        with self._lock:
            candidates = list(self._offer)
        return [c.order() for c in candidates]

    def choose(self, select: Callable[[Iterable[Candidate], int], list[Candidate]]) -> list[Candidate]:
        """What `select` takes of the candidates (in offer order, read lazily; and how many there
        are), under the lock: the watch does not change the view while it reads."""
        with self._lock:
            return select(iter(self._offer), len(self._offer))

    def discard(self, candidate: Candidate) -> None:
        """Forget this version of an order (a newer one the watch already brought stays)."""
        with self._lock:
            self._offer.discard(candidate.key, candidate.resource_version)

    def _loop(self) -> None:
        keep_watching(self._stop, "pending orders", self._list_and_watch)

    def _candidate(self, body: dict[str, Any]) -> Candidate | None:
        """The order's candidate; None if this agent would not take it (or it is not Pending),
        or if it is unreadable (the API server accepts dates like year 0000): skipped with a
        warning instead of blocking every other order."""
        try:
            return offer.candidate(body, self.agent.takes)
        except (KeyError, ValueError, TypeError) as exc:
            meta = body.get("metadata", {})
            log.warning("workorder %s/%s: unreadable (%s); skipping it", meta.get("namespace"), meta.get("name"), exc)
            return None

    def _list(self) -> str:
        """List every page into the view; the last page's resourceVersion (to watch from)."""
        a = self.agent
        with self._lock:
            # Before a first complete listing the view is filled in place (claims start with the
            # first page); after one, a new view is filled and replaces the old one at the end.
            fresh = self._offer if not self._listed else Offer()
            # What an interrupted first listing left that this one does not bring is dropped at the end.
            stale = self._offer.keys() if fresh is self._offer else set()
        version = ""
        for page in a.orders.pages(a.namespace, a._selector(), a.page_size):
            candidates = [c for c in map(self._candidate, page) if c is not None]
            with self._lock:
                for c in candidates:
                    fresh.put(c)
                    stale.discard(c.key)
            version = page.resource_version
            if fresh is self._offer:
                self.changed.set()  # claim what is in already: the other pages keep coming
            if self._stop.is_set():
                return version
        with self._lock:
            for key in stale:
                fresh.remove(key)
            self._offer, self._listed = fresh, True
        self.changed.set()
        return version

    def _list_and_watch(self) -> None:
        version = self._list()
        while not self._stop.is_set():
            self._watch = self.agent.orders.watch(
                self.agent.namespace, field_selector=self.agent._selector(), resource_version=version
            )
            for kind, body in self._watch:
                version = body["metadata"]["resourceVersion"]
                if kind == "BOOKMARK":
                    continue
                meta = body["metadata"]
                key = f"{meta.get('namespace', '')}/{meta['name']}"
                # DELETED: left Pending (the field selector): no need to parse it. Otherwise None
                # when it is not Pending any more or not for this agent (or unreadable: skipped).
                candidate = None if kind == "DELETED" else self._candidate(body)
                with self._lock:
                    if candidate is None:
                        self._offer.remove(key)
                    else:
                        self._offer.put(candidate)
                self.changed.set()
                if self._stop.is_set():
                    return
            if self._watch.gone:  # our resourceVersion is too old: list again
                return
