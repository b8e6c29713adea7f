"""Structured access log: one JSON object per request, to stderr or a file. Off by default.

Lines are gathered in memory and written at most :data:`FLUSH_BYTES` at a time, and at least
once a second (the engine's sweep calls :meth:`AccessLog.flush`), so a reader tailing the file
sees each line within a second. A write that fails (a full disk, a file removed from under a
read-only mount) drops the lines it carried and is counted; it never reaches the request that
finished, so the proxy keeps answering whatever happens to its log.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time

#: Gathered lines are written once they reach this many bytes (and by every sweep).
FLUSH_BYTES = 64 * 1024

#: Paths meaning standard error.
STDERR_PATHS = ("-", "stderr", "/dev/stderr")


class AccessLog:
    """Writes one JSON line per finished request. ``path`` ``-`` means stderr."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._own = path not in STDERR_PATHS
        if self._own:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        else:
            sys.stderr.flush()
            self._fd = sys.stderr.fileno()
        self._lines: list[str] = []
        self._size = 0
        #: Writes that failed, and the lines they dropped (the engine shows both as counters).
        self.failed_writes = 0
        self.dropped_lines = 0

    def log(
        self,
        listener: str,
        route: str,
        destination: str,
        status: str,
        duration: float,
        request_id: int,
        message_type: str,
        upstream: str = "",
    ) -> None:
        """Record one request (``duration`` in seconds)."""
        line = (
            json.dumps(
                {
                    "time": round(time.time(), 6),
                    "listener": listener,
                    "route": route,
                    "destination": destination,
                    "upstream": upstream,
                    "status": status,
                    "duration_ms": round(duration * 1000.0, 3),
                    "request_id": request_id,
                    "message_type": message_type,
                },
                separators=(",", ":"),
            )
            + "\n"
        )
        self._lines.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the gathered lines; on failure drop them and count it (never raises)."""
        lines = self._lines
        if not lines:
            return
        self._lines = []
        self._size = 0
        try:
            for chunk in self._chunks(lines):
                data = memoryview(chunk)
                while data:
                    data = data[os.write(self._fd, data) :]
        except OSError:
            self.failed_writes += 1
            self.dropped_lines += len(lines)  # some may have been written: counted as lost

    def _chunks(self, lines: list[str]) -> list[bytes]:
        """The bytes to write, one write each. A file opened in append mode takes any size
        whole; standard error, shared by every worker of ``--workers`` and often a pipe, gets
        whole lines in writes of at most ``PIPE_BUF`` bytes, which a pipe never interleaves
        with another process's writes."""
        if self._own:
            return ["".join(lines).encode("utf-8")]
        out: list[bytes] = []
        batch: list[bytes] = []
        size = 0
        for line in lines:
            data = line.encode("utf-8")
            if batch and size + len(data) > select.PIPE_BUF:
                out.append(b"".join(batch))
                batch, size = [], 0
            batch.append(data)
            size += len(data)
        if batch:
            out.append(b"".join(batch))
        return out

    def close(self) -> None:
        """Flush, and close the file if this log opened it."""
        self.flush()
        if self._own:
            os.close(self._fd)
            self._own = False
