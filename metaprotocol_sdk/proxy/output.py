"""A serving process's standard output and error, written by threads.

Whatever prints while the engine serves (a codec's or a filter's ``print``, a warning logged,
the engine's reload lines) writes to ``sys.stdout`` or ``sys.stderr``. When those are pipes
and nobody reads them (a log shipper that stalls, a supervisor that stopped reading), a plain
``write`` blocks, and with it the event loop and every connection. While it serves,
``metaprotocol proxy`` replaces both with line-buffered streams whose writes are handed to a
:class:`~metaprotocol_sdk.proxy.writer.BackgroundWriter`: at most :data:`BACKLOG` bytes wait
for each; the rest is dropped and counted.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .writer import BackgroundWriter

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

    from .stats import Counter

#: Bytes waiting to be written to each of standard output and error, above which output is
#: dropped.
BACKLOG = 1 << 20

#: How long the process, exiting, waits for its last output to be written.
CLOSE_WAIT = 2.0


class BackgroundRaw(io.RawIOBase):
    """A write-only raw stream on ``fd`` whose writes go to a writer thread: never blocks."""

    def __init__(self, fd: int, name: str) -> None:
        super().__init__()
        self.fd = fd
        self.writer = BackgroundWriter(fd, name, BACKLOG)
        #: Bytes dropped because the writer was BACKLOG behind (mirrored to ``counter``).
        self.dropped = 0
        self.counter: Counter | None = None

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def isatty(self) -> bool:
        return os.isatty(self.fd)

    def write(self, data: ReadableBuffer) -> int:
        chunk = bytes(data)
        if not self.writer.submit([chunk], len(chunk)):
            self.dropped += len(chunk)
            if self.counter is not None:
                self.counter.value += len(chunk)
        return len(chunk)


class BackgroundOutput:
    """The two raw streams behind ``sys.stdout`` and ``sys.stderr``."""

    def __init__(self) -> None:
        self.raws = (BackgroundRaw(1, "stdout writer"), BackgroundRaw(2, "stderr writer"))

    def count_into(self, counter: Counter) -> None:
        """Count the bytes dropped from now on (and before) in ``counter``."""
        counter.value += sum(raw.dropped for raw in self.raws)
        for raw in self.raws:
            raw.counter = counter


@contextlib.contextmanager
def background_output() -> Iterator[BackgroundOutput]:
    """Serve with ``sys.stdout`` and ``sys.stderr`` written by threads; on exit, give them up
    to :data:`CLOSE_WAIT` seconds to write what they hold, and put the old streams back."""
    old = sys.stdout, sys.stderr
    for stream in old:
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    output = BackgroundOutput()
    out, err = (
        io.TextIOWrapper(
            io.BufferedWriter(raw), encoding="utf-8", errors="backslashreplace", line_buffering=True
        )
        for raw in output.raws
    )
    sys.stdout, sys.stderr = out, err
    try:
        yield output
    finally:
        for stream in (out, err):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        sys.stdout, sys.stderr = old
        for raw in output.raws:
            raw.writer.close(CLOSE_WAIT)


def flush_before_exit(wait: float) -> None:
    """Write what ``sys.stdout`` and ``sys.stderr`` hold, for at most ``wait`` seconds in all,
    before an ``os._exit`` (which skips every ``finally``). Any thread may call it.

    The flushing runs on a thread of its own: a stream that is not ours (an embedding program's)
    may block in ``flush`` for good, on a pipe nobody reads or on its lock, held by the very
    thread that is stuck writing to it; the caller waits for it only until the deadline.
    """
    deadline = time.monotonic() + wait

    def flush() -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                stream.flush()
                raw = getattr(getattr(stream, "buffer", None), "raw", None)
                if isinstance(raw, BackgroundRaw):
                    raw.writer.close(max(0.0, deadline - time.monotonic()))

    thread = threading.Thread(target=flush, name="flush before exit", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
