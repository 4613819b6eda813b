"""The deadline scheduler: one timer, many deadlines, each fired once, in order, never concurrently."""

from __future__ import annotations

import asyncio
import datetime as dt

from workorder_operator.model import utcnow
from workorder_operator.scheduler import DeadlineScheduler


def soon(ms: float) -> dt.datetime:
    return utcnow() + dt.timedelta(milliseconds=ms)


async def _run(scheduler: DeadlineScheduler, seconds: float) -> None:
    task = asyncio.create_task(scheduler.run())
    await asyncio.sleep(seconds)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_fires_each_key_once_in_deadline_order() -> None:
    fired: list[str] = []

    async def fire(key: str) -> None:
        fired.append(key)

    async def main() -> None:
        s = DeadlineScheduler(fire)
        s.schedule("c", soon(60))
        s.schedule("a", soon(20))
        s.schedule("b", soon(40))
        await _run(s, 0.15)

    asyncio.run(main())
    assert fired == ["a", "b", "c"]


def test_reschedule_replaces_and_cancel_forgets() -> None:
    fired: list[tuple[str, dt.datetime]] = []

    async def fire(key: str) -> None:
        fired.append((key, utcnow()))

    async def main() -> None:
        s = DeadlineScheduler(fire)
        s.schedule("moved", soon(10))
        s.schedule("moved", soon(80))  # later deadline wins: replaces, not adds
        s.schedule("gone", soon(20))
        s.cancel("gone")
        start = utcnow()
        await _run(s, 0.15)
        assert [k for k, _ in fired] == ["moved"]
        assert (fired[0][1] - start).total_seconds() >= 0.075

    asyncio.run(main())


def test_an_earlier_deadline_wakes_a_sleeping_timer() -> None:
    fired: list[str] = []

    async def fire(key: str) -> None:
        fired.append(key)

    async def main() -> None:
        s = DeadlineScheduler(fire)
        s.schedule("late", soon(10_000))
        task = asyncio.create_task(s.run())
        await asyncio.sleep(0.02)  # the timer now sleeps towards "late"
        s.schedule("early", soon(10))
        await asyncio.sleep(0.08)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert fired == ["early"]


def test_a_burst_is_bounded_by_concurrency_and_a_key_never_runs_twice_at_once() -> None:
    running: set[str] = set()
    peak = 0
    calls = 0

    async def fire(key: str) -> None:
        nonlocal peak, calls
        assert key not in running
        running.add(key)
        peak = max(peak, len(running))
        calls += 1
        await asyncio.sleep(0.02)
        running.discard(key)

    async def main() -> None:
        s = DeadlineScheduler(fire, concurrency=4)
        for i in range(20):
            s.schedule(f"k{i}", soon(0))
        await asyncio.sleep(0)
        task = asyncio.create_task(s.run())
        await asyncio.sleep(0.005)
        s.schedule("k0", soon(0))  # re-armed while (possibly) running: fired again afterwards
        await asyncio.sleep(0.3)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

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
        s = DeadlineScheduler(fire)
        s.schedule("bad", soon(5))
        s.schedule("good", soon(30))
        await _run(s, 0.1)

    asyncio.run(main())
    assert fired == ["good"]
