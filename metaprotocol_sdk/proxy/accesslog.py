"""Structured access log: one JSON object per request, to stderr or a file. Off by default."""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO


class AccessLog:
    """Writes one JSON line per finished request. ``path`` ``-`` means stderr."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._own = path not in ("-", "stderr", "/dev/stderr")
        self._out: TextIO = open(path, "a", encoding="utf-8") if self._own else sys.stderr  # noqa: SIM115

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
        """Write one record (``duration`` in seconds)."""
        self._out.write(
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

    def flush(self) -> None:
        """Flush buffered lines."""
        self._out.flush()

    def close(self) -> None:
        """Flush, and close the file if this log opened it."""
        self.flush()
        if self._own:
            self._out.close()
