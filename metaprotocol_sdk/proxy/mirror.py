"""Where mirrored requests' answers go: nowhere, counted by outcome.

A mirrored copy is sent like a request (its own id on a shared connection, the route's
mutation), and its :class:`~metaprotocol_sdk.proxy.upstream.Pending` points here instead of at a
client connection. The copy never delays or fails the primary request, and at most ``limit``
copies are in flight: more are dropped and counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from metaprotocol_sdk.enums import ErrorType, ResponseStatus
from metaprotocol_sdk.metadata import Metadata

from .stats import Counter, Stats
from .upstream import RELEASED

if TYPE_CHECKING:
    from .downstream import Downstream
    from .router import Target
    from .upstream import Pending

#: Mirrored requests in flight at most (per engine); more are dropped.
MIRROR_LIMIT = 1000
_STATUS_NAMES = ("Unknown", "Ok", "Error")


class MirrorSink:
    """Stands in for the client of mirrored requests (as ``Pending.downstream``)."""

    def __init__(self, stats: Stats, limit: int = MIRROR_LIMIT) -> None:
        self._stats = stats
        self._counters: dict[tuple[str, str, str, str], Counter] = {}
        self.limit = limit
        self.inflight = 0
        #: Never closed: the upstream side asks.
        self.closed = False

    def count(self, target: Target, outcome: str) -> None:
        """Count one mirrored request by outcome (``Ok``, ``Timeout``, ``Dropped``, ...)."""
        labels = target.labels
        key = (labels["listener"], labels["route"], labels["destination"], outcome)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self._stats.counter(
                "metaprotocol_mirror_total",
                listener=key[0],
                route=key[1],
                destination=key[2],
                status=outcome,
            )
        counter.value += 1

    def forget_series(self) -> None:
        """Forget the series found so far (after the stats dropped some of them)."""
        self._counters.clear()

    def _settle(self, p: Pending) -> None:
        p.done = True
        p.request = RELEASED  # a finished copy may wait in its deadline queue: not its frame
        host = p.host
        host.active -= 1
        if host.load is not None:
            host.load.active -= 1
        self.inflight -= 1

    def finish(self, p: Pending, response: Metadata, batch: list[Downstream]) -> None:
        """A decoded reply to a copy: dropped, counted by status."""
        self._settle(p)
        self.count(p.target, _STATUS_NAMES[response.response_status])

    def forward(
        self, p: Pending, frame: bytes, status: ResponseStatus, batch: list[Downstream]
    ) -> None:
        """A peeked reply to a copy: dropped, counted by status."""
        self._settle(p)
        self.count(p.target, _STATUS_NAMES[status])

    def fail(self, p: Pending, error: ErrorType, message: str) -> None:
        """A copy failed locally (connect failure, reset, timeout)."""
        self._settle(p)
        self.count(p.target, error.name)

    def timeout(self, p: Pending) -> None:
        """No reply to a copy within the route's timeout."""
        conn = p.conn
        self.fail(p, ErrorType.Timeout, "")
        conn.forget(p)
