"""One timer for many deadlines.

A heap of (deadline, key) and a single asyncio task that sleeps until the earliest one, so
10,000 orders with nothing due cost nothing (no per-object ticking), and a burst of deadlines
in the same second is handed out immediately to a bounded pool of callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable

from workorder_operator.model import utcnow

log = logging.getLogger(__name__)


class DeadlineScheduler:
    """Calls `fire(key)` once at (or right after) each key's latest deadline.

    `schedule` replaces a key's deadline; `cancel` forgets it. At most `concurrency` callbacks run
    at once; a key is never fired twice concurrently (a deadline set while it fires is kept and
    fired afterwards).
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
        self._current: dict[str, tuple[dt.datetime, int]] = {}
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._running: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._current)

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

    async def run(self) -> None:
        """The timer loop; runs until cancelled."""
        try:
            while True:
                self._wake.clear()
                delay = self._pop_due()
                if delay is None:
                    await self._wake.wait()
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=delay)
        finally:
            for task in list(self._tasks):
                task.cancel()

    def _pop_due(self) -> float | None:
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
            del self._current[key]
            self._start(key)
        return None

    def _start(self, key: str) -> None:
        self._running.add(key)
        task = asyncio.create_task(self._call(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, key: str) -> None:
        try:
            async with self._slots:
                await self._fire(key)
        except asyncio.CancelledError:
            raise
        except Exception:  # one bad order must never stop the timer
            log.exception("deadline callback for %s failed", key)
        finally:
            self._running.discard(key)
            pending = self._current.get(key)
            if pending is not None:
                heapq.heappush(self._heap, (pending[0], pending[1], key))
                self._wake.set()
