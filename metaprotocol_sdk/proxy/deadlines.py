"""Request timeouts without a loop timer per request.

A loop timer per request costs about 10 us with uvloop (a libuv handle each), a third of the
engine's budget. Routes have fixed timeouts, so requests sharing a timeout expire in the order
they started: one FIFO queue per timeout value and a single loop timer armed for the earliest
head are enough.

Finishing a request costs nothing here: the caller sets ``item.done`` and the queue forgets the
item lazily. Finished items are dropped from the head of their queue whenever one is added
(requests mostly finish in the order they started), and a queue whose length passes twice its
unfinished items is compacted. A finished request therefore does not wait long behind a slow
one, and it has let go of its frame when it finished (``Downstream._settle``).

A queue found empty when the timer fires is dropped: timeouts come from the configuration,
and one that a reload changed (a control plane that tunes a route's timeout at every push)
would otherwise keep its queue for good, each walked at every expiry (2 000 reloads, each
with a new timeout: 2 000 queues, 3 MiB, 32 us per timer fire, growing without end).

A deadline of its own (a retry runs until what is left of its route's timeout, a value no
other request shares) goes into one heap instead, trimmed and compacted alike: a queue per
such value would be kept for good and walked at every expiry.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Callable
from time import monotonic
from typing import Any

#: A queue is never compacted below this length (compaction is a pass over the queue).
COMPACT_MIN = 64


class TimeoutQueue:
    """Items sharing one timeout value, oldest first (finished ones dropped lazily)."""

    __slots__ = ("items", "limit", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.items: deque[Any] = deque()
        #: Length past which the queue is compacted.
        self.limit = COMPACT_MIN

    def compact(self) -> None:
        """Drop every finished item; the next compaction waits until the length doubles."""
        self.items = deque(i for i in self.items if not i.done)
        self.limit = max(COMPACT_MIN, 2 * len(self.items))


class Deadlines:
    """Tracks deadlines of objects with ``deadline`` and ``done`` attributes.

    ``add`` starts an item's clock; setting ``item.done = True`` stops it (no call needed).
    ``expire(item)`` is called for every item still not done at its deadline.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, expire: Callable[[Any], None]) -> None:
        self._loop = loop
        self._expire = expire
        self._queues: dict[float, TimeoutQueue] = {}
        #: Items with deadlines of their own: ``(deadline, sequence, item)``.
        self._heap: list[tuple[float, int, Any]] = []
        self._heap_limit = COMPACT_MIN
        self._sequence = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = 0.0

    def add(self, item: Any, now: float, timeout: float) -> None:
        """Start the clock for ``item``."""
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = TimeoutQueue(timeout)
        deadline = now + timeout
        item.deadline = deadline
        items = queue.items
        while items and items[0].done:
            items.popleft()
        items.append(item)
        if len(items) > queue.limit:
            queue.compact()
        if self._timer is None or deadline < self._armed_at:
            self._arm(deadline)

    def add_at(self, item: Any, deadline: float) -> None:
        """Start the clock for ``item`` with a deadline of its own (not ``now`` plus a
        timeout many items share)."""
        item.deadline = deadline
        heap = self._heap
        while heap and heap[0][2].done:
            heapq.heappop(heap)
        heapq.heappush(heap, (deadline, next(self._sequence), item))
        if len(heap) > self._heap_limit:
            self._heap = heap = [entry for entry in heap if not entry[2].done]
            heapq.heapify(heap)
            self._heap_limit = max(COMPACT_MIN, 2 * len(heap))
        if self._timer is None or deadline < self._armed_at:
            self._arm(deadline)

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = deadline
        # Deadlines are in time.monotonic()'s seconds (precise, for the requests' durations);
        # the loop's clock may be coarser (uvloop's: whole milliseconds, a delay rounded to
        # them), so the timer is set by the time left plus a millisecond: it fires up to about
        # 1.5 ms after the deadline, and rarely (uvloop) up to 0.5 ms before it, to find
        # nothing due and be armed again, a millisecond or more later (never a busy loop).
        self._timer = self._loop.call_later(max(0.0, deadline - monotonic()) + 0.001, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = monotonic()
        expired = []
        earliest: float | None = None
        emptied: list[float] = []
        for timeout, queue in self._queues.items():
            items = queue.items
            while items:
                head = items[0]
                if head.done:
                    items.popleft()
                elif head.deadline <= now:
                    items.popleft()
                    expired.append(head)
                else:
                    if earliest is None or head.deadline < earliest:
                        earliest = head.deadline
                    break
            if not items:
                emptied.append(timeout)
        for timeout in emptied:  # made again by the next request with that timeout
            del self._queues[timeout]
        heap = self._heap
        while heap:
            deadline, _, head = heap[0]
            if head.done:
                heapq.heappop(heap)
            elif deadline <= now:
                heapq.heappop(heap)
                expired.append(head)
            else:
                if earliest is None or deadline < earliest:
                    earliest = deadline
                break
        if earliest is not None:
            self._arm(earliest)
        for item in expired:
            if not item.done:
                self._expire(item)

    def waiting(self) -> list[Any]:
        """Every item whose clock runs (not done): what is in flight. A pass over them all,
        for housekeeping, never for a request."""
        out = [item for queue in self._queues.values() for item in queue.items if not item.done]
        out.extend(entry[2] for entry in self._heap if not entry[2].done)
        return out

    def close(self) -> None:
        """Cancel the timer and forget everything."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queues.clear()
        self._heap.clear()
