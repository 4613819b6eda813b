"""The queue engine against an in-memory store with the API server's compare-and-swap rules
(`tests.unit.orders.MemoryOrders`): a fake clock, watch events delivered when the test says, and the
timer stepped by the test. What depends on the real API server is in tests/integration."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.unit.clock import FakeClock
from tests.unit.orders import AGENT_A, NOW, MemoryOrders, order_body, read, store
from workorder_operator import lifecycle as lc
from workorder_operator.engine import Engine
from workorder_operator.model import WorkOrder, format_time
from workorder_operator.targeting import AgentIdentity

HANG = 30.0  # a safety net for a broken engine only: nothing waits for it to pass
A = AgentIdentity(AGENT_A)
Event = tuple[str, str, str]  # (order name, reason, message)


def uid(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


def body(i: int, spec: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    return order_body(spec, name=f"wo-{i}", uid=uid(i), **kw)


def initialised(b: dict[str, Any], at: dt.datetime = NOW) -> dict[str, Any]:
    return store(b, lc.initialise(read(b), at))


def claimed(i: int, at: dt.datetime, timeout: int = 60, **kw: Any) -> dict[str, Any]:
    b = initialised(body(i, {"claimTimeoutSeconds": timeout}, **kw))
    return store(b, lc.claim(read(b), A, at))


def retry_pending(i: int, at: dt.datetime) -> dict[str, Any]:
    """Failed once at `at`: due 2 s later (backoffSeconds 1)."""
    b = claimed(i, at)
    b["spec"]["backoffSeconds"] = 1
    return store(b, lc.fail(read(b), AGENT_A, 1, "boom", at))


def completed(i: int, at: dt.datetime, ttl: int) -> dict[str, Any]:
    b = claimed(i, at)
    b["spec"]["ttlSecondsAfterFinished"] = ttl
    return store(b, lc.complete(read(b), AGENT_A, 1, "ok", at))


class Harness:
    """An engine, its store and its clock; the test delivers watch events and steps the timer."""

    def __init__(self, bodies: list[dict[str, Any]], **options: Any) -> None:
        self.clock = FakeClock(options.pop("now", NOW))
        self.store = MemoryOrders(bodies)
        self.posted: list[Event] = []
        self.engine = Engine(
            self.store,  # type: ignore[arg-type]
            post_event=lambda o, _kind, reason, message: self.posted.append((o.name, reason, message)),
            clock=self.clock,
            concurrency=options.pop("concurrency", 4),
            **options,
        )
        for b in self.store.bodies.values():  # the start-up listing
            self.engine.observe(None, b)
        self.store.events.clear()

    def deliver(self) -> None:
        for event_type, b in self.store.take_events():
            self.engine.observe(event_type, b)

    async def step(self, seconds: float = 0.0) -> None:
        """Move the clock, run what is due, wait for it, deliver what the watch saw."""
        self.clock.advance(seconds)
        self.engine.scheduler.run_due()
        await asyncio.wait_for(self.engine.scheduler.idle(), HANG)
        self.deliver()

    def events(self) -> list[Event]:
        self.engine._event_pool.shutdown(wait=True)  # posted in the background: wait for them
        return self.posted

    def phase(self, i: int) -> str:
        return str(self.store.bodies[("team-a", f"wo-{i}")]["status"]["phase"])


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


# --- item 2: a flapping leader handles every deadline exactly once ------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_a_flapping_leader_handles_each_deadline_of_a_burst_exactly_once(seed: int) -> None:
    """60 claims expiring, 20 retries falling due and 10 TTL deletions, all within 5 s; meanwhile
    the replica loses and regains leadership at random moments, replies are held back (a write
    made, its answer not yet back when leadership goes) and watch events come late."""
    rng = random.Random(seed)
    bodies = [claimed(i, NOW + dt.timedelta(seconds=i * 0.08)) for i in range(60)]
    bodies += [retry_pending(i, NOW + dt.timedelta(seconds=(i - 60) * 0.2)) for i in range(60, 80)]
    bodies += [completed(i, NOW + dt.timedelta(seconds=(i - 80) * 0.3), ttl=1) for i in range(80, 90)]
    interrupted = 0
    done: list[tuple[str, str]] = []

    async def test() -> None:
        nonlocal interrupted
        h = Harness(bodies, now=NOW + dt.timedelta(seconds=59))
        engine, db = h.engine, h.store
        engine.lead()
        for _ in range(80):
            h.clock.advance(0.1)
            engine.scheduler.poke()
            roll = rng.random()
            if roll < 0.3:
                if engine.acting:
                    interrupted += 1 if db.waiting or engine.scheduler._running else 0
                    db.answer()  # the stuck replies come back while we step down: too late
                    await asyncio.wait_for(engine.follow(), HANG)
                else:
                    engine.lead()
            elif roll < 0.5:
                h.deliver()
            elif roll < 0.7:
                db.hold_replies()
            else:
                db.answer()
            for _ in range(rng.randrange(1, 6)):
                await asyncio.sleep(0)
        # Settle: leader for good, every reply and event delivered.
        db.answer()
        engine.lead()
        for _ in range(20):
            h.clock.advance(1)
            engine.scheduler.poke()
            await asyncio.sleep(0.01)
            await asyncio.wait_for(engine.scheduler.idle(), HANG)
            h.deliver()
        await engine.follow()
        engine.close()
        done.extend(db.done)

    run(test)
    transitions: dict[str, list[str]] = {}
    for transition, order_uid in done:
        transitions.setdefault(order_uid, []).append(transition)
    assert interrupted > 0, "the test never lost leadership with work in flight"
    for i in range(60):
        assert transitions.get(uid(i)) == ["expire"], f"claim {i}: {transitions.get(uid(i))}"
    for i in range(60, 80):
        assert transitions.get(uid(i)) == ["due"], f"retry {i}: {transitions.get(uid(i))}"
    for i in range(80, 90):
        assert transitions.get(uid(i)) == ["delete"], f"ttl {i}: {transitions.get(uid(i))}"


# --- item 2: gaining leadership re-arms every tracked order -------------------------------------


def test_gaining_leadership_re_arms_every_tracked_order_from_its_stored_status() -> None:
    async def test() -> None:
        h = Harness([claimed(1, NOW)])
        h.engine.scheduler.cancel(uid(1))  # a deadline lost by a previous term
        h.clock.advance(61)
        h.engine.lead()
        await h.step()
        await h.engine.follow()
        assert h.phase(1) == "Pending"
        assert h.store.done == [("expire", uid(1))]

    run(test)


# --- item 3: TTL deletion is a compare-and-swap -------------------------------------------------


def test_an_order_requeued_as_its_ttl_falls_due_is_not_deleted() -> None:
    async def test() -> None:
        b = claimed(1, NOW)
        b["spec"]["ttlSecondsAfterFinished"] = 10
        failed = store(b, lc.fail(read(b), AGENT_A, 1, "boom", NOW, retryable=False))
        h = Harness([failed])
        # An admin requeues it just as its TTL falls due; the engine has not seen that yet.
        h.store.bodies[("team-a", "wo-1")] = store(failed, lc.requeue(read(failed), NOW + dt.timedelta(seconds=10)))
        await h.step(11)
        assert h.phase(1) == "Pending"
        assert h.store.done == []
        assert all(reason != "Deleted" for _, reason, _ in h.events())
        # It read the order again and planned again: nothing is armed for the Pending order.
        assert h.engine.scheduler.deadline(uid(1)) is None

    run(test)


def test_ttl_deletes_an_unchanged_finished_order_and_says_so_once() -> None:
    async def test() -> None:
        h = Harness([completed(1, NOW, ttl=10)])
        await h.step(9)
        assert h.store.done == []
        await h.step(2)
        assert h.store.done == [("delete", uid(1))]
        assert [(n, r) for n, r, _ in h.events()] == [("wo-1", "Deleted")]

    run(test)


def test_no_deleted_event_when_someone_else_deleted_it_first() -> None:
    async def test() -> None:
        h = Harness([completed(1, NOW, ttl=10)])
        del h.store.bodies[("team-a", "wo-1")]  # deleted by a person; the watch is late
        await h.step(11)
        assert h.events() == []
        assert list(h.engine.tracked_orders()) == []

    run(test)


# --- item 4: a leader writes only within its lease ----------------------------------------------


def test_no_write_when_the_lease_may_lapse_before_the_request_is_over() -> None:
    async def test() -> None:
        budget = [0.5]
        h = Harness([claimed(1, NOW)], budget=lambda: budget[0])
        await h.step(61)
        assert h.store.done == []  # deferred, not dropped
        assert h.engine.scheduler.deadline(uid(1)) is not None
        budget[0] = 8.0
        await h.step(2)
        assert h.store.done == [("expire", uid(1))]
        assert h.store.budgets == [8.0]  # the request itself is bounded by what is left

    run(test)


# --- item 5: content parsing never takes the API workers ----------------------------------------


def test_a_burst_of_slow_content_checks_does_not_delay_an_expiry() -> None:
    release = threading.Event()
    checking: list[str] = []

    class SlowChecks:  # an executor registry whose content checks take long
        def runs(self, work_type: str) -> bool:
            return True

        def check(self, order: WorkOrder) -> str | None:
            checking.append(order.name)
            release.wait(HANG)  # huge YAML: parsing takes a long time
            return None

    async def test() -> None:
        h = Harness([claimed(0, NOW)], executors=SlowChecks(), concurrency=2)
        for i in range(1, 11):  # ten new build orders arrive
            h.engine.observe("ADDED", body(i))
        await asyncio.sleep(0)
        await h.step(61)  # the claim falls due while every content worker is busy
        assert h.store.done == [("expire", uid(0))]
        assert 1 <= len(checking) <= 2  # parsing runs in its own small pool
        release.set()
        h.engine.close()

    run(test)


# --- item 6: no clock can pin a claim -----------------------------------------------------------


def test_a_claim_stamped_years_ahead_expires_a_timeout_after_the_operator_saw_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def test() -> None:
        ahead = claimed(1, NOW + dt.timedelta(days=5 * 365))
        h = Harness([], now=NOW)
        with caplog.at_level(logging.WARNING, logger="workorder_operator.engine"):
            h.engine.observe("ADDED", ahead)
            h.engine.observe("MODIFIED", ahead)  # the same sign of life again: no second warning
        await h.step(59)
        assert h.store.done == []
        h.store.bodies[("team-a", "wo-1")] = ahead
        await h.step(2)
        assert h.store.done == [("expire", uid(1))]

    run(test)
    warnings = [r for r in caplog.records if "ahead of the operator's clock" in r.getMessage()]
    assert len(warnings) == 1


# --- item 7: a relist forgets what no longer exists ---------------------------------------------


def test_a_relist_forgets_orders_deleted_while_the_watch_was_down() -> None:
    async def test() -> None:
        h = Harness([claimed(i, NOW) for i in range(3)])
        assert len(list(h.engine.tracked_orders())) == 3
        del h.store.bodies[("team-a", "wo-1")]  # deleted while the watch was down: no event
        assert h.engine.forget_missing(*h.store.list_versions()) == 1
        assert sorted(o.name for o in h.engine.tracked_orders()) == ["wo-0", "wo-2"]
        assert h.engine.scheduler.deadline(uid(1)) is None
        h.engine.close()

    run(test)


def test_a_relist_keeps_an_order_created_after_the_listing() -> None:
    async def test() -> None:
        h = Harness([claimed(1, NOW)])
        newer = claimed(2, NOW, resource_version="900")
        h.engine.observe("ADDED", newer)
        existing, version = h.store.list_versions()
        assert int(version) < 900
        assert h.engine.forget_missing(existing, version) == 0
        assert len(list(h.engine.tracked_orders())) == 2
        h.engine.close()

    run(test)


# --- item 9: conditions true whoever wrote the phase --------------------------------------------


def test_the_engine_writes_conditions_for_a_completion_by_a_minimal_agent_once() -> None:
    async def test() -> None:
        b = claimed(1, NOW)
        minimal = dict(b, status=dict(b["status"], phase="Completed", completedAt=format_time(NOW), result="r"))
        h = Harness([])
        h.engine.observe("MODIFIED", h.store.change(minimal))
        h.store.events.clear()
        await h.step()
        assert h.store.done == [("conditions", uid(1))]
        succeeded = next(c for c in h.store.bodies[("team-a", "wo-1")]["status"]["conditions"]
                         if c["type"] == "Succeeded")  # fmt: skip
        assert succeeded["status"] == "True"
        await h.step(1)
        assert h.store.done == [("conditions", uid(1))]  # none when they already match
        assert h.events() == []

    run(test)


# --- issue 17, item 7: every transition leaves an Event, whoever made it -------------------------


def test_the_leader_tells_the_story_of_agents_transitions_once_and_a_follower_stays_quiet() -> None:
    async def test() -> None:
        h = Harness([initialised(body(1))])
        h.engine.lead()
        b = h.store.change(
            store(h.store.bodies[("team-a", "wo-1")], lc.claim(read(h.store.bodies[("team-a", "wo-1")]), A, NOW))
        )
        h.engine.observe("MODIFIED", b)
        h.engine.observe("MODIFIED", b)  # the same version again (our own write's answer, then the watch)
        failed = h.store.change(store(b, lc.fail(read(b), AGENT_A, 1, "disk full", NOW)))
        h.engine.observe("MODIFIED", failed)
        # A minimal agent: only the transition's fields, no history, no conditions.
        again = store(failed, lc.due(read(failed), NOW + dt.timedelta(seconds=121)))
        h.engine.observe("MODIFIED", h.store.change(again))
        taken = store(again, lc.claim(read(again), A, NOW))
        minimal = dict(taken, status=dict(taken["status"], phase="Completed", result="sha256:1"))
        h.engine.observe("MODIFIED", h.store.change(minimal))
        await h.engine.follow()
        h.engine.observe("MODIFIED", h.store.change(dict(minimal, status=dict(minimal["status"], phase="Failed"))))
        told = [(r, m) for _, r, m in h.events()]
        assert [r for r, _ in told] == ["Claim", "Fail", "Due", "Claim", "Complete"], told
        assert f"attempt 1 claimed by agent {AGENT_A}" in told[0][1]
        assert "failed (retryable: retry 1 of 3 after" in told[1][1] and "disk full" in told[1][1]
        assert told[4][1] == f"attempt 2 completed by agent {AGENT_A}: result sha256:1"

    run(test)


def test_a_burst_of_transitions_costs_a_bounded_number_of_events(monkeypatch: pytest.MonkeyPatch) -> None:
    # The bucket's clock stands still: the burst happens "at once", however loaded the machine.
    monkeypatch.setattr("workorder_operator.engine.time.monotonic", lambda: 1000.0)

    async def test() -> None:
        bodies = [initialised(body(i)) for i in range(400)]
        h = Harness(bodies)
        h.engine.lead()
        for b in bodies:
            h.engine.observe("MODIFIED", h.store.change(store(b, lc.claim(read(b), A, NOW))))
        posted = len(h.events())
        await h.engine.follow()
        # 400 claims at once: the burst allowance of 50 events, the rest counted as dropped.
        assert posted == 50, posted

    run(test)


def test_routine_events_have_a_smaller_budget_than_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("workorder_operator.engine.time.monotonic", lambda: now[0])

    async def test() -> None:
        bodies = [initialised(body(i)) for i in range(200)]
        h = Harness(bodies)
        h.engine.lead()
        claimed_ = [h.store.change(store(b, lc.claim(read(b), A, NOW))) for b in bodies]
        for b in claimed_[:100]:
            h.engine.observe("MODIFIED", b)
        now[0] += 10.0  # 10 s later: Normal events refill at 2 a second
        for b in claimed_[100:]:
            h.engine.observe("MODIFIED", b)
        # The Normal budget spent, Warnings still have theirs: 60 expiries at once.
        for b in claimed_[:60]:
            h.engine.observe("MODIFIED", h.store.change(store(b, lc.expire(read(b), NOW + dt.timedelta(hours=2)))))
        reasons = [r for _, r, _ in h.events()]
        await h.engine.follow()
        assert reasons.count("Claim") == 50 + 20, reasons.count("Claim")
        assert reasons.count("Expire") == 50, reasons.count("Expire")

    run(test)


def test_the_engine_keeps_orders_compact_and_writes_on_their_whole_stored_status() -> None:
    async def test() -> None:
        # Two orders with the same spec and content, one claimed with a history of one expiry.
        first = claimed(1, NOW, timeout=60)
        first = store(first, lc.expire(read(first), NOW + dt.timedelta(seconds=61), None, NOW))
        first = store(first, lc.claim(read(first), A, NOW + dt.timedelta(seconds=62)))
        h = Harness([first, claimed(2, NOW, timeout=60)])
        kept = {o.name: o for o in h.engine.tracked_orders()}
        # What 100,000 orders must not cost: content, typed conditions and history, a spec each.
        assert kept["wo-1"].spec is kept["wo-2"].spec
        assert kept["wo-1"].spec.yaml_content == "" and kept["wo-1"].status.conditions == []
        assert kept["wo-1"].status.history == []
        # The stored status stays whole: the expiry's write carries the earlier history and the conditions.
        assert kept["wo-1"].raw_status == first["status"]
        await h.step(62 + 60)
        stored = h.store.bodies[("team-a", "wo-1")]["status"]
        assert stored["phase"] == "Pending"
        assert [entry["outcome"] for entry in stored["history"]] == ["Expired", "Expired"]
        assert {c["type"] for c in stored["conditions"]} == {c["type"] for c in first["status"]["conditions"]}

    run(test)
