"""The deadline scheduler: one timer, many deadlines, each fired once, in order, never concurrently,
and never lost. Time is a fake clock and the tests step the timer themselves (`run_due`, `idle`):
nothing here depends on how fast the machine is."""

from __future__ import annotations

import asyncio
import datetime as dt

from tests.unit.clock import FakeClock
from tests.unit.orders import NOW
from workorder_operator.scheduler import DeadlineScheduler

# Only ever a safety net for a broken scheduler: no test waits for it to pass.
HANG = 30.0


def at(clock: FakeClock, seconds: float) -> dt.datetime:
    return clock.now + dt.timedelta(seconds=seconds)


async def step(s: DeadlineScheduler) -> float | None:
    """One turn of the timer: start what is due and wait for those callbacks to finish."""
    delay = s.run_due()
    await asyncio.wait_for(s.idle(), HANG)
    return delay


async def until(condition: asyncio.Event) -> None:
    await asyncio.wait_for(condition.wait(), HANG)


def test_fires_each_key_once_in_deadline_order() -> None:
    fired: list[str] = []

    async def fire(key: str) -> None:
        fired.append(key)

    async def main() -> None:
        clock = FakeClock(NOW)
        s = DeadlineScheduler(fire, clock=clock)
        s.schedule("c", at(clock, 60))
        s.schedule("a", at(clock, 20))
        s.schedule("b", at(clock, 40))
        assert await step(s) == 20.0
        assert fired == []
        clock.advance(30)
        assert await step(s) == 10.0
        assert fired == ["a"]
        clock.advance(100)
        assert await step(s) is None
        assert fired == ["a", "b", "c"]
        clock.advance(1000)
        await step(s)
        assert fired == ["a", "b", "c"]

    asyncio.run(main())


def test_reschedule_replaces_and_cancel_forgets() -> None:
    fired: list[tuple[str, dt.datetime]] = []

    async def main() -> None:
        clock = FakeClock(NOW)

        async def fire(key: str) -> None:
            fired.append((key, clock.now))

        s = DeadlineScheduler(fire, clock=clock)
        s.schedule("moved", at(clock, 10))
        s.schedule("moved", at(clock, 80))  # later deadline wins: replaces, not adds
        s.schedule("gone", at(clock, 20))
        s.cancel("gone")
        assert len(s) == 1
        clock.advance(50)
        await step(s)
        assert fired == []
        clock.advance(30)
        await step(s)
        assert fired == [("moved", NOW + dt.timedelta(seconds=80))]
        assert len(s) == 0

    asyncio.run(main())


def test_an_earlier_deadline_wakes_a_sleeping_timer() -> None:
    fired: list[str] = []

    async def main() -> None:
        clock = FakeClock(NOW)
        woke = asyncio.Event()

        async def fire(key: str) -> None:
            fired.append(key)
            woke.set()

        s = DeadlineScheduler(fire, clock=clock)
        s.schedule("late", at(clock, 10_000))
        task = asyncio.create_task(s.run())
        for _ in range(5):
            await asyncio.sleep(0)  # the timer now sleeps towards "late" (10,000 s)
        s.schedule("early", clock.now)
        await until(woke)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert fired == ["early"]


def test_a_burst_is_bounded_by_concurrency_and_a_key_never_runs_twice_at_once() -> None:
    running: set[str] = set()
    peak = 0
    calls = 0

    async def main() -> None:
        nonlocal peak, calls
        clock = FakeClock(NOW)
        gate = asyncio.Event()

        async def fire(key: str) -> None:
            nonlocal peak, calls
            assert key not in running
            running.add(key)
            peak = max(peak, len(running))
            calls += 1
            await gate.wait()
            running.discard(key)

        s = DeadlineScheduler(fire, concurrency=4, clock=clock)
        for i in range(20):
            s.schedule(f"k{i}", clock.now)
        s.run_due()
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(running) == 4  # the rest wait for a slot
        s.schedule("k0", clock.now)  # re-armed while running: fired again afterwards, not alongside
        s.run_due()
        gate.set()
        await asyncio.wait_for(s.idle(), HANG)
        await step(s)  # k0's second deadline, handed back when its first callback ended

    asyncio.run(main())
    assert peak == 4
    assert calls == 21


def test_a_failing_callback_does_not_stop_the_timer() -> None:
    fired: list[str] = []

    async def fire(key: str) -> None:
        if key == "bad":
            raise RuntimeError("boom")
        fired.append(key)

    async def main() -> None:
        clock = FakeClock(NOW)
        s = DeadlineScheduler(fire, clock=clock)
        s.schedule("bad", at(clock, 5))
        s.schedule("good", at(clock, 30))
        clock.advance(60)
        await step(s)

    asyncio.run(main())
    assert fired == ["good"]


def test_a_callback_interrupted_by_the_timer_stopping_keeps_its_deadline() -> None:
    """Leadership lost in the middle of a callback (or while it waits for a slot): the key stays
    armed with its deadline and fires once the timer runs again."""
    finished: list[str] = []

    async def main() -> None:
        clock = FakeClock(NOW)
        started = asyncio.Event()
        gate = asyncio.Event()

        async def fire(key: str) -> None:
            started.set()
            await gate.wait()
            finished.append(key)

        s = DeadlineScheduler(fire, concurrency=1, clock=clock)
        s.schedule("running", at(clock, 1))
        s.schedule("queued", at(clock, 1))  # waits for the one slot
        clock.advance(2)
        timer = asyncio.create_task(s.run())
        await until(started)
        timer.cancel()  # leadership lost
        await asyncio.gather(timer, return_exceptions=True)
        assert finished == []
        assert len(s) == 2
        assert s.deadline("running") == s.deadline("queued") == NOW + dt.timedelta(seconds=1)

        gate.set()
        await step(s)  # leadership regained
        assert sorted(finished) == ["queued", "running"]
        assert len(s) == 0

    asyncio.run(main())


def test_a_key_cancelled_while_its_callback_runs_is_not_brought_back() -> None:
    async def main() -> None:
        clock = FakeClock(NOW)
        started = asyncio.Event()

        async def fire(key: str) -> None:
            started.set()
            await asyncio.Event().wait()  # never finishes by itself

        s = DeadlineScheduler(fire, clock=clock)
        s.schedule("deleted", clock.now)
        timer = asyncio.create_task(s.run())
        await until(started)
        s.cancel("deleted")  # the order was deleted meanwhile
        timer.cancel()
        await asyncio.gather(timer, return_exceptions=True)
        assert len(s) == 0 and s.deadline("deleted") is None

    asyncio.run(main())
