"""Downstream side: one protocol instance per client connection, the request hot path."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

from metaprotocol_sdk.codec import Codec, Encoded, LocalError
from metaprotocol_sdk.enums import ErrorType, MessageType, ResponseStatus
from metaprotocol_sdk.errors import CodecError, FrameTooLargeError
from metaprotocol_sdk.metadata import Metadata

from .router import CompiledRoute, RouteTable, Target
from .stats import Counter
from .upstream import Cluster, Pending, UpstreamConnection, UpstreamHost, append_encoded

if TYPE_CHECKING:
    from .engine import Engine

_REQUEST = MessageType.Request
_ONEWAY = MessageType.Oneway
_HEARTBEAT = MessageType.Heartbeat
_STATUS_NAMES = ("Unknown", "Ok", "Error")


class ListenerRuntime:
    """What every connection of one listener shares: codec factory, routes, stats."""

    def __init__(
        self,
        engine: Engine,
        name: str,
        protocol_codec: type[Codec],
        table: RouteTable,
        options: dict[str, object],
    ) -> None:
        self.engine = engine
        self.name = name
        self.codec_class = protocol_codec
        self.options = options
        self.table = table
        stats = engine.stats
        self.accepted = stats.counter("metaprotocol_downstream_connections_total", listener=name)
        self.rejected = stats.counter(
            "metaprotocol_downstream_connections_rejected_total", listener=name
        )
        self.active = stats.gauge("metaprotocol_downstream_connections_active", listener=name)
        self.heartbeats = stats.counter(
            "metaprotocol_heartbeats_total", listener=name, side="downstream"
        )
        self.decode_errors = stats.counter(
            "metaprotocol_decode_errors_total", listener=name, side="downstream"
        )
        self._local: dict[ErrorType, Counter] = {
            t: stats.counter("metaprotocol_local_replies_total", listener=name, type=t.name)
            for t in ErrorType
        }
        self._unrouted = Target("", None, 0, stats, name, "")

    def count_local(self, error: ErrorType) -> None:
        """Count one local reply."""
        self._local[error].value += 1


class Downstream(asyncio.Protocol):
    """One client connection."""

    __slots__ = (
        "_route",
        "blocked",
        "buffer",
        "closed",
        "codec",
        "dedicated",
        "draining",
        "engine",
        "inflight",
        "listener",
        "need",
        "out",
        "reading_paused",
        "transport",
        "write_paused",
    )

    def __init__(self, listener: ListenerRuntime) -> None:
        self.listener = listener
        self.engine = listener.engine
        self.codec: Codec = listener.codec_class.from_options(listener.options)
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.need = 0
        self.inflight = 0
        self.closed = False
        self.draining = False
        # Flow control: reading stops while the client does not read its responses
        # (``write_paused``) or while an upstream connection it sent to is full (``blocked``).
        self.write_paused = False
        self.blocked = 0
        self.reading_paused = False
        self.dedicated: dict[tuple[str, str], UpstreamConnection] = {}
        self._route = listener.table.match
        #: Responses decoded but not yet written (see :meth:`finish`).
        self.out: list[bytes | memoryview] = []

    # -- connection events ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not inherit from asyncio.Transport: no isinstance check.
        self.transport = transport = cast(asyncio.Transport, transport)
        engine = self.engine
        listener = self.listener
        if engine.draining or len(engine.downstreams) >= engine.max_connections:
            listener.rejected.value += 1
            self.closed = True
            transport.abort()
            return
        engine.downstreams.add(self)
        listener.accepted.value += 1
        listener.active.value += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.engine.downstreams:
            self.listener.active.value -= 1
            self.engine.downstreams.discard(self)
        self.closed = True
        self.transport = None
        for conn in list(self.dedicated.values()):
            conn.close()
        self.dedicated.clear()
        self.engine.downstream_gone()

    def pause_writing(self) -> None:
        """The transport's write buffer is full (asyncio flow control)."""
        self.write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        """The transport's write buffer drained (asyncio flow control)."""
        self.write_paused = False
        self._maybe_resume_reading()

    def block_on(self, conn: UpstreamConnection) -> None:
        """Stop reading until ``conn`` can take more (it calls :meth:`unblock`)."""
        if conn.add_blocked(self):
            self.blocked += 1
            self._pause_reading()

    def unblock(self) -> None:
        """An upstream connection this one waited for drained or closed."""
        self.blocked -= 1
        self._maybe_resume_reading()

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def _maybe_resume_reading(self) -> None:
        if self.reading_paused and not self.write_paused and not self.blocked:
            self.reading_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def close(self) -> None:
        """Close after writing what is buffered."""
        if self.transport is not None:
            self.transport.close()

    def start_drain(self) -> None:
        """Finish what is in flight, refuse new requests, then close."""
        self.draining = True
        if self.inflight == 0:
            self.close()

    # -- the hot path --------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if len(buffer) < self.need:
            return
        codec = self.codec
        while buffer:
            try:
                message = codec.decode(buffer)
            except FrameTooLargeError as exc:
                self._refuse(exc, ErrorType.OverLimit, close=True)
                return
            except CodecError as exc:
                if exc.frame_size is None:
                    self._refuse(exc, ErrorType.BadRequest, close=True)
                    return
                del buffer[: exc.frame_size]
                self._refuse(exc, ErrorType.BadRequest, close=False)
                continue
            if not isinstance(message, Metadata):
                self.need = message.needed
                return
            kind = message.message_type
            if kind is _REQUEST:
                self._request(message)
            elif kind is _HEARTBEAT:
                self.listener.heartbeats.value += 1
                reply = codec.heartbeat_reply(message)
                if reply and self.transport is not None:
                    self.transport.write(reply)
            elif kind is _ONEWAY:
                self._oneway(message)
            else:
                self.local_reply(
                    message,
                    ErrorType.BadRequest,
                    f"{kind.name} messages are not accepted from clients by this engine",
                )
            if self.closed:
                return
        self.need = 0

    def _request(self, message: Metadata) -> None:
        if self.draining:
            self.local_reply(message, ErrorType.ShuttingDown, "proxy is shutting down")
            return
        route = self._route(message.attributes)
        if route is None:
            name = self.listener.name
            self.local_reply(message, ErrorType.RouteNotFound, f"no route on {name}")
            return
        target = route.single or route.pick()
        cluster = target.cluster
        if cluster is None:
            self.local_reply(
                message, ErrorType.ClusterNotFound, f"unknown cluster {target.name}", route, target
            )
            return
        host = cluster.balancer.pick(message)
        if host is None:
            self.local_reply(
                message,
                ErrorType.NoHealthyUpstream,
                f"no endpoint in {target.name}",
                route,
                target,
            )
            return
        engine = self.engine
        if engine.pending >= engine.max_pending:
            self.local_reply(
                message, ErrorType.OverLimit, "too many pending requests", route, target
            )
            return
        conn = cluster.shared_connection(host) if cluster.shared else self._dedicated(cluster, host)
        now = engine.loop.time()
        p = Pending(self, message, route, target, host, conn, now)
        try:
            conn.send(p, route.request_mutation)
        except Exception as exc:  # the codec cannot write this request (e.g. a mutation)
            self.local_reply(
                message, ErrorType.BadRequest, f"cannot encode request: {exc}", route, target
            )
            return
        engine.deadlines.add(p, now, route.timeout)
        engine.pending += 1
        host.active += 1
        self.inflight += 1
        if conn.write_paused:
            self.block_on(conn)

    def _oneway(self, message: Metadata) -> None:
        route = self._route(message.attributes)
        if route is None:
            self.listener._unrouted.count_oneway(ErrorType.RouteNotFound.name)
            return
        target = route.pick()
        cluster = target.cluster
        host = None if cluster is None else cluster.balancer.pick(message)
        if cluster is None or host is None:
            status = ErrorType.ClusterNotFound if cluster is None else ErrorType.NoHealthyUpstream
            target.count_oneway(status.name)
            return
        conn = cluster.shared_connection(host) if cluster.shared else self._dedicated(cluster, host)
        try:
            conn.send_oneway(message, route.request_mutation)
        except Exception:  # the codec cannot write this request: nobody to tell
            target.count_oneway(ErrorType.BadRequest.name)
            return
        if conn.write_paused:
            self.block_on(conn)
        target.count_oneway("Forwarded")

    def _dedicated(self, cluster: Cluster, host: UpstreamHost) -> UpstreamConnection:
        key = (cluster.name, host.key)
        conn = self.dedicated.get(key)
        if conn is None or conn.closed:
            conn = self.dedicated[key] = UpstreamConnection(cluster, host, self)
            conn.connect()
        return conn

    def upstream_closed(self, conn: UpstreamConnection) -> None:
        """A dedicated upstream connection went away."""
        key = (conn.cluster.name, conn.host.key)
        if self.dedicated.get(key) is conn:
            del self.dedicated[key]

    # -- completion ----------------------------------------------------------------------------

    def _settle(self, p: Pending) -> None:
        p.done = True  # also stops its deadline
        engine = self.engine
        p.host.active -= 1
        self.inflight -= 1
        engine.pending -= 1
        if engine.draining and engine.pending == 0:
            engine.requests_drained()

    def finish(self, p: Pending, response: Metadata, batch: list[Downstream]) -> None:
        """Queue the response to ``p`` (response mutation and original id applied).

        The bytes wait in ``self.out``; this connection is added to ``batch`` and the caller
        flushes every connection of the batch once it has decoded all it read, so pipelined
        responses leave in one write.
        """
        encoded: Encoded | None = None
        if self.transport is not None:
            try:
                if p.conn.shared:
                    encoded = self.codec.encode(
                        response, p.route.response_mutation, request_id=p.request.request_id
                    )
                else:
                    encoded = self.codec.encode(response, p.route.response_mutation)
            except Exception as exc:  # the codec cannot write this response
                encoded = self._bad_response(p, f"cannot encode response: {exc}")
        self._reply(p, encoded, len(response.frame), response.response_status, batch)

    def forward(
        self, p: Pending, frame: bytes, status: ResponseStatus, batch: list[Downstream]
    ) -> None:
        """Queue a reply to ``p`` that the codec peeked at: no response mutation applies, so
        only the id is put back (shared connections). Batched as :meth:`finish` does."""
        encoded: Encoded | None = None
        if self.transport is not None:
            try:
                encoded = (
                    self.codec.relabel(frame, p.request.request_id) if p.conn.shared else frame
                )
            except Exception as exc:  # the codec cannot write this response
                encoded = self._bad_response(p, f"cannot relabel response: {exc}")
        self._reply(p, encoded, len(frame), status, batch)

    def _bad_response(self, p: Pending, message: str) -> bytes:
        self.listener.count_local(ErrorType.BadResponse)
        return self.codec.on_error(p.request, LocalError(ErrorType.BadResponse, message))

    def _reply(
        self,
        p: Pending,
        encoded: Encoded | None,
        size: int,
        status: ResponseStatus,
        batch: list[Downstream],
    ) -> None:
        """Settle ``p``, count its status and queue ``encoded`` (``None``: the client left)."""
        self._settle(p)  # first: a draining connection closes once nothing is in flight
        counter = p.target.responses[status]
        if counter is None:
            counter = p.target.response_counter(status)
        counter.value += 1
        if encoded is not None:
            out = self.out
            if not out:
                batch.append(self)
            if type(encoded) is bytes:  # the usual case, without a call (see append_encoded)
                out.append(encoded)
            else:
                append_encoded(out, encoded, size)
        elif self.draining and self.inflight == 0:
            self.close()
        log = self.engine.access_log
        if log is not None:
            log.log(
                self.listener.name,
                p.route.name,
                p.target.name,
                _STATUS_NAMES[status],
                self.engine.loop.time() - p.start,
                p.request.request_id,
                p.request.message_type.name,
                p.host.key,
            )

    def flush(self) -> None:
        """Write the queued responses (and close if draining and idle)."""
        out = self.out
        self.out = []
        transport = self.transport
        if transport is not None:
            if len(out) == 1:
                transport.write(out[0])
            else:
                transport.writelines(out)
        if self.draining and self.inflight == 0:
            self.close()

    def fail(self, p: Pending, error: ErrorType, message: str) -> None:
        """Answer ``p`` locally (upstream reset, connect failure, timeout)."""
        self._settle(p)
        if self.transport is None:  # the client left first: nothing to answer, not an error
            p.target.count("DownstreamClosed")
            return
        self.local_reply(p.request, error, message, p.route, p.target, p.start, p.host.key)
        if self.draining and self.inflight == 0:
            self.close()

    def timeout(self, p: Pending) -> None:
        """``p`` got no response within its route's timeout."""
        p.conn.forget(p)
        self.fail(p, ErrorType.Timeout, f"no response within {p.route.timeout:g}s")

    def local_reply(
        self,
        request: Metadata,
        error: ErrorType,
        message: str,
        route: CompiledRoute | None = None,
        target: Target | None = None,
        start: float | None = None,
        upstream: str = "",
    ) -> None:
        """Send the codec's error reply for ``request`` and count it."""
        listener = self.listener
        listener.count_local(error)
        (target or listener._unrouted).count(error.name)
        transport = self.transport
        if transport is not None:
            transport.write(self.codec.on_error(request, LocalError(error, message)))
        log = self.engine.access_log
        if log is not None:
            log.log(
                listener.name,
                route.name if route else "",
                target.name if target else "",
                error.name,
                0.0 if start is None else self.engine.loop.time() - start,
                request.request_id,
                request.message_type.name,
                upstream,
            )

    def _refuse(self, exc: CodecError, error: ErrorType, close: bool) -> None:
        listener = self.listener
        listener.decode_errors.value += 1
        if exc.metadata is not None:
            self.local_reply(exc.metadata, error, str(exc))
        else:
            listener.count_local(error)
        if close:
            self.closed = True
            self.buffer.clear()
            if self.transport is not None:
                self.transport.close()
