"""One timer for many deadlines.

A heap of (deadline, key) and a single asyncio task that sleeps until the earliest one, so
10,000 orders with nothing due cost nothing (no per-object ticking), and a burst of deadlines
in the same second is handed out immediately to a bounded pool of callbacks.

A key is never lost: it stays armed until its callback has *finished*. A callback interrupted by
the timer stopping (leadership lost) keeps its deadline, and fires again once the timer runs again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable

from workorder_operator.model import utcnow

log = logging.getLogger(__name__)

_Entry = tuple[dt.datetime, int]


class DeadlineScheduler:
    """Calls `fire(key)` once at (or right after) each key's latest deadline.

    `schedule` replaces a key's deadline; `cancel` forgets it. At most `concurrency` callbacks run
    at once; a key is never fired twice concurrently (a deadline set while it fires is kept and
    fired afterwards). `run` is the timer; tests may instead step it with `run_due` and `idle`.
    """

    def __init__(
        self,
        fire: Callable[[str], Awaitable[None]],
        concurrency: int = 32,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self._fire = fire
        self._clock = clock
        self._heap: list[tuple[dt.datetime, int, str]] = []
        self._current: dict[str, _Entry] = {}
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        # Keys whose callback runs, with the deadline it serves (None once cancelled meanwhile).
        self._running: dict[str, _Entry | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._current.keys() | {k for k, e in self._running.items() if e is not None})

    def deadline(self, key: str) -> dt.datetime | None:
        entry = self._current.get(key)
        return entry[0] if entry else None

    def schedule(self, key: str, at: dt.datetime) -> None:
        current = self._current.get(key)
        if current is not None and current[0] == at:
            return
        seq = next(self._seq)
        self._current[key] = (at, seq)
        heapq.heappush(self._heap, (at, seq, key))
        # Superseded entries stay in the heap until popped; compact when they dominate.
        if len(self._heap) > 2 * len(self._current) + 1024:
            self._heap = [(a, s, k) for k, (a, s) in self._current.items()]
            heapq.heapify(self._heap)
        if self._heap[0][1] == seq:
            self._wake.set()

    def cancel(self, key: str) -> None:
        self._current.pop(key, None)
        if key in self._running:
            self._running[key] = None  # an interrupted callback must not bring it back

    def poke(self) -> None:
        """Look at the clock again now (a test's fake clock moved)."""
        self._wake.set()

    async def run(self) -> None:
        """The timer loop; runs until cancelled. On the way out it stops its callbacks and waits
        for them, so none of them acts after `run` has returned (their keys stay armed)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._wake.clear()
                delay = self.run_due()
                # Not asyncio.wait_for: on Python 3.11 it can swallow a cancellation that meets
                # the wake-up, and a timer that ignores losing leadership keeps acting.
                alarm = None if delay is None else loop.call_later(delay, self._wake.set)
                try:
                    await self._wake.wait()
                finally:
                    if alarm is not None:
                        alarm.cancel()
        finally:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def idle(self) -> None:
        """Wait until no callback runs (for tests that step the timer themselves)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def run_due(self) -> float | None:
        """Start callbacks for everything due; return seconds until the next deadline."""
        now = self._clock()
        while self._heap:
            at, seq, key = self._heap[0]
            if self._current.get(key) != (at, seq):
                heapq.heappop(self._heap)  # superseded or cancelled
                continue
            if at > now:
                return (at - now).total_seconds()
            heapq.heappop(self._heap)
            if key in self._running:
                continue  # kept in _current: re-armed when the running callback ends
            self._start(key, self._current.pop(key))
        return None

    def _start(self, key: str, entry: _Entry) -> None:
        self._running[key] = entry
        task = asyncio.create_task(self._call(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, key: str) -> None:
        finished = False
        try:
            async with self._slots:
                await self._fire(key)
            finished = True
        except asyncio.CancelledError:
            raise
        except Exception:  # one bad order must never stop the timer
            log.exception("deadline callback for %s failed", key)
            finished = True
        finally:
            served = self._running.pop(key, None)
            if not finished and served is not None and key not in self._current:
                self._current[key] = served  # interrupted before it was done: still due
            pending = self._current.get(key)
            if pending is not None:
                heapq.heappush(self._heap, (pending[0], pending[1], key))
                self._wake.set()
