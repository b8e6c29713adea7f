"""Writes that must never hold up the event loop: a thread writes, with a bounded backlog.

A pipe whose reader stalls, or a hung network mount, blocks ``write`` for as long as it likes.
The access log and the supervisor's copy of its workers' output go through a
:class:`BackgroundWriter`: the event loop hands it chunks and goes on; its thread writes them in
order. Chunks that would take the backlog above its bound are refused (the caller counts them).
"""

from __future__ import annotations

import os
import select
import threading
from collections import deque


class BackgroundWriter:
    """Writes chunks to ``fd`` in order on its own thread; at most ``max_pending`` bytes wait.

    A chunk is written whole unless a write fails (each is one ``write`` call when it is at most
    ``PIPE_BUF`` bytes, so a pipe shared with other processes never splits it). A failed write
    drops its batch and is counted in :attr:`failed_writes` and :attr:`failed_items`.
    """

    def __init__(self, fd: int, name: str, max_pending: int) -> None:
        self.fd = fd
        self.max_pending = max_pending
        # Batches handed over (chunks, items they stand for) and their bytes; under _ready.
        self._batches: deque[tuple[list[bytes], int]] = deque()
        self._pending = 0
        self._closing = False
        self._ready = threading.Condition()
        #: Writes that failed, and the items (lines, bytes: the caller's unit) they dropped.
        self.failed_writes = 0
        self.failed_items = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, chunks: list[bytes], items: int) -> bool:
        """Hand ``chunks`` (standing for ``items`` of the caller's unit) to the thread;
        ``False``, and nothing queued, when they would take the backlog above the bound or the
        writer is closing. Never blocks on the file."""
        size = sum(map(len, chunks))
        with self._ready:
            if self._closing or self._pending + size > self.max_pending:
                return False
            self._batches.append((chunks, items))
            self._pending += size
            self._ready.notify()
        return True

    def close(self, wait: float) -> bool:
        """Write what was handed over, waiting at most ``wait`` seconds; ``True`` when the
        thread finished (``False``: it is stuck in a write and is left to the process's exit)."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join(wait)
        return not self._thread.is_alive()

    def _run(self) -> None:
        ready = self._ready
        while True:
            with ready:
                while not self._batches and not self._closing:
                    ready.wait()
                if not self._batches:
                    return
                chunks, items = self._batches.popleft()
            try:
                for chunk in chunks:
                    data = memoryview(chunk)
                    while data:
                        try:
                            data = data[os.write(self.fd, data) :]
                        except BlockingIOError:
                            # O_NONBLOCK, set by whoever shares the open file (a parent's
                            # pipe): wait for room as a blocking write would.
                            _wait_writable(self.fd)
            except OSError:
                self.failed_writes += 1
                self.failed_items += items  # some may have been written: counted as lost
            with ready:
                self._pending -= sum(map(len, chunks))


def _wait_writable(fd: int) -> None:
    """Block until ``fd`` takes a write (or reports an error, which the next write raises)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    poller.poll()
