"""Request timeouts without a loop timer per request.

A loop timer per request costs about 10 us with uvloop (a libuv handle each), a third of the
engine's budget. Routes have fixed timeouts, so requests sharing a timeout expire in the order
they started: one FIFO queue per timeout value and a single loop timer armed for the earliest
head are enough. Finished requests are marked and skipped (lazy deletion); a queue is
compacted when most of it is finished, so memory stays proportional to what is in flight.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any


class TimeoutQueue:
    """Requests sharing one timeout value, oldest first."""

    __slots__ = ("items", "live", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.items: deque[Any] = deque()
        self.live = 0


class Deadlines:
    """Tracks deadlines of objects with ``deadline``, ``queue`` and ``done`` attributes."""

    COMPACT_MIN = 256

    def __init__(self, loop: asyncio.AbstractEventLoop, expire: Callable[[Any], None]) -> None:
        self._loop = loop
        self._expire = expire
        self._queues: dict[float, TimeoutQueue] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = 0.0

    def add(self, item: Any, now: float, timeout: float) -> None:
        """Start the clock for ``item``."""
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = TimeoutQueue(timeout)
        deadline = now + timeout
        item.deadline = deadline
        item.queue = queue
        queue.items.append(item)
        queue.live += 1
        if self._timer is None or deadline < self._armed_at:
            self._arm(deadline)

    def settle(self, item: Any) -> None:
        """``item`` finished (``item.done`` is already set); forget it lazily."""
        queue: TimeoutQueue | None = item.queue
        if queue is None:
            return
        item.queue = None
        queue.live -= 1
        items = queue.items
        if len(items) > self.COMPACT_MIN and queue.live * 2 < len(items):
            queue.items = deque(i for i in items if not i.done)

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = deadline
        self._timer = self._loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self._loop.time()
        expired = []
        earliest: float | None = None
        for queue in self._queues.values():
            items = queue.items
            while items:
                head = items[0]
                if head.done:
                    items.popleft()
                elif head.deadline <= now:
                    items.popleft()
                    head.queue = None
                    queue.live -= 1
                    expired.append(head)
                else:
                    if earliest is None or head.deadline < earliest:
                        earliest = head.deadline
                    break
        if earliest is not None:
            self._arm(earliest)
        for item in expired:
            if not item.done:
                self._expire(item)

    def close(self) -> None:
        """Cancel the timer and forget everything."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queues.clear()
