"""Requests waiting for room on an upstream connection.

A cluster with ``connectionPool.http.maxConcurrentStreams`` (or whose codec has fewer request
ids than the engine may have requests in flight) lets each upstream connection carry at most
that many requests at once, as Envoy's HTTP/2 pool does. A request that finds every
connection to its endpoint full opens another one, within ``tcp.maxConnections`` and the
process's upstream connection budget; past those it waits here, in order, until a connection
has room (a reply, a timeout, a new connection), its route's timeout passes or its client
leaves. ``http1MaxPendingRequests`` bounds how many wait, with those waiting for a connection
to open (Envoy's pending requests).

Shared connections (codecs that rewrite request ids) have one queue per endpoint: the first
of its connections with room takes the oldest request. A client's own connection has its
own queue, which keeps the client's order.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from metaprotocol_sdk.metadata import Metadata, Mutation

from .upstream import held_bytes

if TYPE_CHECKING:
    from .downstream import Downstream
    from .router import CompiledRoute, Target
    from .upstream import UpstreamConnection

#: One queue of requests waiting for room, oldest first (an ordered set: a request that
#: leaves it early, timed out or its client gone, is taken out in O(1)).
Queue = OrderedDict["Queued", None]


class Queued:
    """A request waiting for room on an upstream connection: it counts as pending, against
    every pending limit, until it is sent, its route's timeout passes or its client leaves."""

    __slots__ = (
        "conn",
        "deadline",
        "done",
        "downstream",
        "mutation",
        "queue",
        "request",
        "route",
        "size",
        "started",
        "target",
        "tries",
    )

    def __init__(
        self,
        downstream: Downstream,
        request: Metadata,
        route: CompiledRoute,
        target: Target,
        conn: UpstreamConnection,
        mutation: Mutation | None,
        tries: int,
        started: float,
        queue: Queue,
    ) -> None:
        self.downstream = downstream
        self.request = request
        self.route = route
        self.target = target
        #: The connection that was full when it came (its cluster and endpoint are the
        #: request's; a client's own connection is the one it waits for).
        self.conn = conn
        self.mutation = mutation
        #: Retries before this try, and the request's start (its first try's).
        self.tries = tries
        self.started = started
        self.queue = queue
        #: What it holds, in the buffer budget (as a request in flight, see ``Pending``).
        self.size = held_bytes(request)
        self.done = False
        self.deadline = 0.0

    def expire(self) -> None:
        """The route's timeout passed while it waited (called by the engine's deadlines)."""
        if not self.done:
            self.downstream.room_timeout(self)
