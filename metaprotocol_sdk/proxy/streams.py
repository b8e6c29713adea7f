"""Streams: ``Stream_*`` frames, each stream on an upstream connection of its own.

A client opens a stream with a ``Stream_Init`` frame, admitted and routed as a request is
(AuthorizationPolicies, the route's match, its filters and request mutation). The engine then
opens a connection to an endpoint of the route's destination for that stream alone: stream ids
never need rewriting, and one stream's frames never wait behind another's. Every later frame of
the stream (by ``stream_id``) goes to that connection as it came, and every frame the upstream
sends on it goes back to the client as it came.

A stream ends when both sides closed it (a ``Stream_Close_One_Way`` each way), or at a
``Stream_Close_Two_Way`` from either side or an ``Error`` frame from the upstream; its upstream
connection then closes once its last frame is written. It is reset (the client gets the codec's
error reply for the stream's ``Stream_Init``, and the upstream connection is aborted) when that
connection fails or sends bytes the codec refuses, when no frame went either way for
``timeouts.streamIdle``, or ``timeouts.drain`` after the client half-closed. When the client
leaves, its streams' connections are aborted. The error reply that refuses a ``Stream_Init``
or resets a stream is the stream's one answer: the client's frames for it until it closes its
side are dropped and counted (:func:`ended_early`).

While a filter holds a ``Stream_Init`` (a fault delay, a rate limit service's answer), the
frames the client sends for that stream wait for it (:class:`Held`): the stream gets them
once it is open; they are dropped if it is refused. Past ``connectionBufferBytes`` of them
the client is not read until it is settled.
"""

from __future__ import annotations

from time import monotonic
from typing import TYPE_CHECKING

from metaprotocol_sdk.codec import Encoded, LocalError
from metaprotocol_sdk.enums import ErrorType, MessageType
from metaprotocol_sdk.metadata import Metadata, Mutation

from .codec_bugs import CodecUnavailable
from .telemetry import RESPONSE_FLAGS

if TYPE_CHECKING:
    from .downstream import Downstream
    from .router import CompiledRoute, Target
    from .upstream import UpstreamConnection, UpstreamHost

_INIT = MessageType.Stream_Init
_CLOSE_ONE_WAY = MessageType.Stream_Close_One_Way
_CLOSE_TWO_WAY = MessageType.Stream_Close_Two_Way
_ERROR = MessageType.Error
#: A stream's failures outlier detection counts against its endpoint (as for a request: an
#: unreadable frame is one too).
_GATEWAY_ERRORS = (ErrorType.UpstreamConnectFailure, ErrorType.UpstreamReset, ErrorType.BadResponse)
#: Frames a client sends on a stream (``Downstream`` hands them here).
STREAM_FRAMES = frozenset(
    {_INIT, MessageType.Stream_Data, _CLOSE_ONE_WAY, _CLOSE_TWO_WAY},
)
#: How a stream ended (``metaprotocol_streams_total{outcome}``): ``closed`` by both sides,
#: ``error`` an ``Error`` frame from the upstream, else the local reason (an ``ErrorType`` name:
#: ``UpstreamConnectFailure``, ``UpstreamReset``, ``BadResponse``, ``Timeout`` for
#: ``timeouts.streamIdle``) or ``DownstreamClosed`` (the client left).
CLOSED = "closed"
ERROR = "error"
#: A stream's outcome as a request's in Istio's standard metrics (``response_code`` 200 for a
#: stream both sides closed, 500 for the upstream's ``Error``; the local reasons as requests').
ISTIO_OUTCOMES = {CLOSED: "Ok", ERROR: "Error"}


class Stream:
    """One open stream: the client's connection, the upstream connection of its own, and
    what went each way."""

    __slots__ = (
        "bytes_received",
        "bytes_sent",
        "client_closed",
        "conn",
        "downstream",
        "early",
        "ended",
        "frames_received",
        "frames_sent",
        "host",
        "init",
        "last_active",
        "route",
        "seen",
        "server_closed",
        "started",
        "stream_id",
        "target",
        "tries",
    )

    def __init__(
        self,
        downstream: Downstream,
        init: Metadata,
        route: CompiledRoute,
        target: Target,
        conn: UpstreamConnection,
        encoded: Encoded,
    ) -> None:
        self.downstream = downstream
        #: The ``Stream_Init`` frame's metadata: the error reply of a reset answers it.
        self.init = init
        self.stream_id = init.stream_id
        self.route = route
        self.target = target
        self.conn = conn
        self.host: UpstreamHost = conn.host
        self.started = monotonic()
        #: A frame went either way since the last sweep (the idle clock's cheap tick).
        self.seen = False
        self.last_active = downstream.engine.loop.time()
        self.client_closed = False
        self.server_closed = False
        self.ended = False
        #: Frames and bytes from the client (``received``) and to it (``sent``).
        self.frames_received = 1
        self.bytes_received = len(init.frame)
        self.frames_sent = 0
        self.bytes_sent = 0
        #: Retries of the stream's connection so far (``retryOn: connect-failure``).
        self.tries = 0
        #: Until its connection is made, what the stream sent on it (the ``Stream_Init`` as
        #: written, then the client's frames), for a retry to send again; ``None`` when the
        #: route does not retry connect failures, and once connected.
        self.early: list[tuple[Encoded, int]] | None = (
            [(encoded, len(init.frame))] if _retries_connects(route) else None
        )

    # -- frames --------------------------------------------------------------------------------

    def from_client(self, message: Metadata) -> None:
        """A later frame of the stream from the client: to the upstream, as it came."""
        downstream = self.downstream
        if self.client_closed:
            downstream.local_reply(
                message,
                ErrorType.BadRequest,
                f"stream {self.stream_id} is closed on the client's side",
            )
            return
        frame = message.frame
        conn = self.conn
        conn.send_frame(frame)
        if self.early is not None:
            self.early.append((frame, len(frame)))
        self.seen = True
        self.frames_received += 1
        self.bytes_received += len(frame)
        downstream.listener.count_stream_frame("downstream")
        kind = message.message_type
        if kind is _CLOSE_TWO_WAY:
            self.client_closed = True
            self.end(CLOSED)
            return
        if kind is _CLOSE_ONE_WAY:
            self.client_closed = True
            if self.server_closed:
                self.end(CLOSED)
                return
        if conn.write_paused or (conn.connecting and _over_budget(conn)):
            downstream.block_on(conn)  # the client waits until the upstream takes them

    def from_upstream(self, message: Metadata) -> None:
        """A frame from the stream's connection: to the client, as it came. One that is not
        of this stream (another id) is dropped and counted as an unmatched reply. The first
        is the stream's answer for outlier detection."""
        if self.ended or not (
            message.stream_id == self.stream_id
            or (message.stream_id == 0 and message.request_id == self.init.request_id)
        ):
            self.conn.cluster.unmatched_reply()
            return
        if not self.frames_sent and self.host.outlier is not None:
            # The upstream answered: for outlier detection the stream's reply (a success
            # between failures, as a request's reply; an Error frame an error).
            self.host.outlier.observe(self.host, message.response_status)
        frame = message.frame
        self.seen = True
        self.frames_sent += 1
        self.bytes_sent += len(frame)
        downstream = self.downstream
        downstream.listener.count_stream_frame("upstream")
        downstream.queue_frame(frame)
        kind = message.message_type
        if kind is _CLOSE_TWO_WAY:
            self.end(CLOSED)
        elif kind is _ERROR:
            self.end(ERROR)
        elif kind is _CLOSE_ONE_WAY:
            self.server_closed = True
            if self.client_closed:
                self.end(CLOSED)

    # -- the upstream connection ---------------------------------------------------------------

    def connected(self) -> None:
        """The upstream connection is made (what was queued meanwhile is written)."""
        conn = self.conn
        self._forget_early()  # no retry from now on (the upstream may have read them)
        if self.ended:
            conn.close_after_writes()
            return
        if not conn.write_paused:
            conn.writable()  # the client may send more
        if self.downstream.write_paused:
            conn.pause_reading()

    def upstream_failed(self, error: ErrorType, message: str) -> None:
        """The stream's connection failed (connect, reset, a frame the codec refused, a write
        that made no progress): the client gets the stream's error reply. After the upstream
        closed its side of the stream, a reset is no gateway error (it owes nothing more; a
        client that goes on sending gets it reset by the upstream's kernel)."""
        if self.ended:
            return
        host = self.host
        if host.outlier is not None and not self.server_closed and error in _GATEWAY_ERRORS:
            host.outlier.gateway_error(host)
        early = self.early
        self._forget_early()  # this try is over
        if (
            early is not None
            and error is ErrorType.UpstreamConnectFailure
            and self._retry_connect(early)
        ):
            return
        self.reset(error, message)

    def _forget_early(self) -> None:
        """Keep no more of what the stream sent: its connection is made, failed or ended. A
        retry whose connection was being made is no longer in flight (``maxRetries``)."""
        if self.early is not None:
            if self.tries:
                self.conn.cluster.retrying -= 1
            self.early = None

    def _retry_connect(self, early: list[tuple[Encoded, int]]) -> bool:
        """Open the stream again on a new connection, to another endpoint when the cluster
        has one, after its connection could not be made, when the route retries on
        ``connect-failure``: nothing reached the upstream, so what the stream sent is sent
        again, in order. ``False``: no retry (none left, the ``maxRetries`` circuit breaker
        open, no endpoint or connection allowed)."""
        downstream = self.downstream
        route = self.route
        tried = self.conn.cluster
        cluster = tried.serving()  # a reload since the last try: the new one
        failed = self.host
        avoid = failed if cluster is tried else cluster.own(failed)
        host = cluster.pick_other(self.init, avoid, downstream)
        if host is None:
            return False
        try:  # built before the retry is counted and another connection may be closed for it
            conn = host.connection_class(cluster, host, downstream)
        except CodecUnavailable:  # counted and logged as the codec's bug
            return False
        # The stream is still among the requests in flight of its failed endpoint's cluster.
        ended = cluster is tried
        if not downstream._retry(
            route, "connect-failure", self.tries, self.started, cluster, 0, ended
        ):
            return False
        if not (cluster.may_open() or cluster.may_reclaim()):
            return False
        self.tries += 1
        cluster.retrying += 1  # a retry in flight until its connection is made or fails
        self.early = early
        failed.active -= 1
        if failed.load is not None:
            failed.load.active -= 1
        host.active += 1
        if host.load is not None:
            host.load.active += 1
        self.host = host
        self.conn = conn
        conn.stream = self
        conn.connect()
        for encoded, size in early:
            conn.send_frame(encoded, size)
        if _over_budget(conn):
            # The failed connection let the client go: it waits again, or each retry would
            # read another chunk of its frames past the budget.
            downstream.block_on(conn)
        return True

    # -- ending --------------------------------------------------------------------------------

    def reset(self, error: ErrorType, message: str) -> None:
        """End the stream on a failure: the client gets the codec's error reply for the
        stream's ``Stream_Init`` (when it is still there), and the upstream connection is
        aborted (unless it is closed already)."""
        if self.ended:
            return
        downstream = self.downstream
        reply = b""
        if not downstream.closed and downstream.transport is not None:
            try:
                reply = downstream.codec.on_error(self.init, LocalError(error, message))
            except Exception as exc:  # a bug in the codec: the client cannot be told
                downstream.codec_failed("on_error", exc)
            else:
                if reply:
                    downstream.listener.count_local(error)
                    downstream.queue_frame(reply)
                    downstream.flush()
                else:  # the same bug, without an exception
                    downstream.empty_error_reply(error)
        self.bytes_sent += len(reply)
        self.end(error.name, abort=True)

    def end(self, outcome: str, abort: bool = False) -> None:
        """The stream is over (``outcome``): counted, logged, forgotten by its client, and
        its upstream connection closes (after its last frame, or at once: ``abort``)."""
        if self.ended:
            return
        self.ended = True
        self._forget_early()
        downstream = self.downstream
        streams = downstream.streams
        if streams is not None and streams.get(self.stream_id) is self:
            del streams[self.stream_id]
        downstream.stream_ended(len(self.init.frame))
        if not self.client_closed and outcome != "DownstreamClosed":
            ended_early(downstream, self.stream_id)  # the client's frames on the way: dropped
        host = self.host
        host.active -= 1
        if host.load is not None:
            host.load.active -= 1
        self.target.count_stream(outcome)
        listener = downstream.listener
        listener.count_streams(-1)
        conn = self.conn
        if conn.closed:  # it failed: what ends the stream
            pass
        elif abort:
            conn.abort(ErrorType.UpstreamReset, f"stream {self.stream_id} reset")
        else:
            conn.close_after_writes()
        elapsed = monotonic() - self.started
        telemetry = self.target.telemetry
        if telemetry is not None:  # one request of Istio's series, as Envoy counts a stream
            host = self.host
            ids = downstream.istio if telemetry.inbound else conn.istio
            status = ISTIO_OUTCOMES.get(outcome, outcome)
            series = telemetry.series(host, host.labels, status, None, ids)
            series.record(elapsed * 1000.0, self.bytes_received, self.bytes_sent)
        log = downstream.engine.access_log
        if log is not None and log.wants("Ok" if outcome == CLOSED else outcome, elapsed):
            log.log(
                listener.name,
                self.route.name,
                self.target.name,
                outcome,
                elapsed,
                self.init.request_id,
                self.init.message_type.name,
                self.host.key,
                RESPONSE_FLAGS.get(outcome, "-"),  # a reset's, as a request's (UR, DC, ...)
                f"stream {self.stream_id}: {self.frames_received} frames received, "
                f"{self.frames_sent} sent",
                downstream.client,
                self.bytes_received,
                self.bytes_sent,
                self.init.attributes,
                downstream._dry_run(self.init),
            )


class Held:
    """The ``Stream_Init`` frames filters hold on a client's connection, by stream id, each
    with the frames of its stream that came meanwhile (``size``: their bytes, all streams)."""

    __slots__ = ("by_id", "size")

    def __init__(self) -> None:
        self.by_id: dict[int, tuple[Metadata, list[Metadata]]] = {}
        self.size = 0

    def full(self, downstream: Downstream) -> bool:
        """Past ``connectionBufferBytes``: the client is not read until one is settled."""
        return self.size > downstream.engine.connection_buffer


def hold_init(downstream: Downstream, message: Metadata) -> None:
    """A filter holds ``message``, a ``Stream_Init``: its stream's frames wait for it."""
    held = downstream.held_inits
    if held is None:
        held = downstream.held_inits = Held()
    held.by_id.setdefault(message.stream_id, (message, []))


def _settle_held(downstream: Downstream, init: Metadata) -> list[Metadata]:
    """The frames that waited for ``init`` (none if it was not held), forgotten."""
    held = downstream.held_inits
    if held is None:
        return []
    entry = held.by_id.get(init.stream_id)
    if entry is None or entry[0] is not init:
        return []
    del held.by_id[init.stream_id]
    frames = entry[1]
    size = sum(len(f.frame) for f in frames)
    was_full = held.full(downstream)
    held.size -= size
    downstream.inflight_bytes -= size
    downstream.engine.buffered -= size
    if was_full:
        downstream.unblock_held()
    return frames


def init_refused(downstream: Downstream, init: Metadata) -> None:
    """A ``Stream_Init`` was answered with an error (its reply is the stream's end for the
    client): the frames that waited for it, and those the client sends after it until it
    closes its side, are dropped and counted. Not for a second ``Stream_Init`` of a stream
    open or held (that stream goes on)."""
    sid = init.stream_id
    frames = _settle_held(downstream, init)
    streams = downstream.streams
    held = downstream.held_inits
    if (streams and sid in streams) or (held is not None and sid in held.by_id):
        return
    ended_early(downstream, sid)
    for frame in frames:
        client_frame(downstream, frame)


def ended_early(downstream: Downstream, sid: int) -> None:
    """Stream ``sid`` ended (or was refused) before the client closed its side: the frames
    the client sends for it until it does (they were on their way) are dropped and counted
    (``metaprotocol_stream_frames_dropped_total``), not each answered with an error the client
    would have to match. At most ``maxStreamsPerConnection`` ids are remembered, the oldest
    forgotten first."""
    ids = downstream.ended_streams
    if ids is None:
        ids = downstream.ended_streams = {}
    ids.pop(sid, None)
    ids[sid] = None
    if len(ids) > downstream.engine.max_streams_per_connection:
        del ids[next(iter(ids))]


def client_frame(downstream: Downstream, message: Metadata) -> None:
    """A ``Stream_*`` frame from a client whose codec carries streams."""
    held = downstream.held_inits
    sid = message.stream_id
    if held is not None and sid in held.by_id:
        if message.message_type is _INIT:
            why = f"stream {sid} is already open on this connection"
            downstream.local_reply(message, ErrorType.BadRequest, why)
            return
        held.by_id[sid][1].append(message)
        size = len(message.frame)
        held.size += size
        downstream.inflight_bytes += size
        downstream.engine.buffered += size
        if held.full(downstream):
            downstream.block_held()
        return
    kind = message.message_type
    if kind is _INIT:
        _admit(downstream, message)
        return
    streams = downstream.streams
    stream = None if streams is None else streams.get(sid)
    if stream is None:
        ended = downstream.ended_streams
        if ended is not None and sid in ended:
            if kind is _CLOSE_ONE_WAY or kind is _CLOSE_TWO_WAY:
                del ended[sid]  # the client knows: later frames of the id are errors again
            downstream.listener.count_stream_frame_dropped()
            return
        downstream.local_reply(
            message,
            ErrorType.BadRequest,
            f"no open stream {message.stream_id} on this connection",
        )
        return
    stream.from_client(message)


def _admit(downstream: Downstream, message: Metadata) -> None:
    """A ``Stream_Init``: admitted and routed as a request is, then :func:`open_stream`."""
    sid = message.stream_id
    if sid == 0:
        why = (
            "a Stream_Init with stream_id 0: the codec set no stream id (stream frames carry "
            "a non-zero one, see the contract)"
        )
        downstream.local_reply(message, ErrorType.BadRequest, why)
        return
    ended = downstream.ended_streams
    if ended is not None:
        ended.pop(sid, None)  # a new stream of the id
    if downstream.draining:
        downstream.local_reply(message, ErrorType.ShuttingDown, "proxy is shutting down")
        return
    streams = downstream.streams
    if streams and message.stream_id in streams:
        why = f"stream {message.stream_id} is already open on this connection"
        downstream.local_reply(message, ErrorType.BadRequest, why)
        return
    authz = downstream.authz
    if authz is not None and (policy := authz.denies(downstream, message.attributes)) is not None:
        downstream._deny(message, policy)
        return
    route = downstream._route(message.attributes)
    if route is None:
        name = downstream.listener.name
        downstream.local_reply(message, ErrorType.RouteNotFound, f"no route on {name}")
        return
    if route.request_filters:  # the filters' last step calls open_stream
        downstream._filter(message, route, 0, None)
        return
    open_stream(downstream, message, route, route.request_mutation)


def open_stream(
    downstream: Downstream, message: Metadata, route: CompiledRoute, mutation: Mutation | None
) -> None:
    """The router for a ``Stream_Init``: an endpoint, a connection of the stream's own, and
    the frame (with the route's request mutation) sent on it."""
    streams = downstream.streams
    if streams is None:
        streams = downstream.streams = {}
    engine = downstream.engine
    target = route.single or route.pick()
    sid = message.stream_id
    if downstream.streams_over:  # held by a filter past the drain after the client's close
        drain = engine.config.proxy.timeouts.drain
        why = f"stream {sid}: not opened within {drain:g}s of the client's close"
        downstream.local_reply(message, ErrorType.Timeout, why, route, target)
        return
    if sid in streams:
        downstream.local_reply(
            message, ErrorType.BadRequest, f"stream {sid} is already open on this connection"
        )
        return
    if len(streams) >= engine.max_streams_per_connection:
        why = f"too many streams on this connection ({engine.max_streams_per_connection})"
        downstream.local_reply(message, ErrorType.OverLimit, why, route, target)
        return
    if engine.buffered > engine.max_buffered or engine.rss_over:
        why = downstream._over_limit()
        downstream.local_reply(message, ErrorType.OverLimit, why, route, target)
        return
    cluster = target.cluster
    if cluster is not None and cluster.retired:  # routed before a reload (held by a filter)
        cluster = cluster.serving()
    if cluster is None:
        why = f"unknown cluster {target.name}"
        downstream.local_reply(message, ErrorType.ClusterNotFound, why, route, target)
        return
    host = cluster.balancer.pick(message, downstream)
    if host is None:
        why = f"no endpoint in {target.name}"
        downstream.local_reply(message, ErrorType.NoHealthyUpstream, why, route, target)
        return
    # A stream is a request to the cluster's circuit breakers (http2MaxRequests counts the
    # open ones), as Envoy's max_requests counts a gRPC stream.
    if cluster.request_limits and (limit := cluster.over_pool_limits(host)) is not None:
        downstream.local_reply(message, ErrorType.OverLimit, limit, route, target)
        return
    try:  # built before another client's idle connection may be closed for it (below)
        conn = host.connection_class(cluster, host, downstream)
    except CodecUnavailable as exc:  # counted and logged as the codec's bug
        failed = ErrorType.UpstreamConnectFailure
        downstream.local_reply(message, failed, str(exc), route, target)
        return
    if not (cluster.may_open() or cluster.may_reclaim()):  # as a request's own connection
        downstream.local_reply(message, ErrorType.OverLimit, cluster.refused(), route, target)
        return
    try:
        encoded = conn.codec.encode(message, mutation)
    except Exception as exc:  # the codec cannot write this frame (e.g. a mutation)
        why = engine.codec_bugs.report(conn.codec, "encode", exc, "answered BadRequest")
        why = f"cannot encode request: {why}"
        downstream.local_reply(message, ErrorType.BadRequest, why, route, target)
        return
    stream = Stream(downstream, message, route, target, conn, encoded)
    conn.stream = stream
    streams[sid] = stream
    downstream.stream_started(len(message.frame))
    host.active += 1
    if host.load is not None:
        host.load.active += 1
    listener = downstream.listener
    listener.count_streams(1)
    listener.count_stream_frame("downstream")
    conn.connect()
    conn.send_frame(encoded, len(message.frame))
    if downstream.held_inits is not None:
        for frame in _settle_held(downstream, message):
            client_frame(downstream, frame)


def _over_budget(conn: UpstreamConnection) -> bool:
    """Whether a stream's connection still being made holds enough of its client's frames:
    ``connectionBufferBytes``, or any while the process is over ``maxBufferedBytes`` (every
    stream of every client would otherwise hold that much)."""
    engine = conn.engine
    return conn.unsent > engine.connection_buffer or engine.buffered > engine.max_buffered


def _retries_connects(route: CompiledRoute) -> bool:
    """Whether ``route`` retries a stream whose connection could not be made."""
    retries = route.retries
    return retries is not None and retries.attempts > 0 and "connect-failure" in retries.retry_on


def sweep(downstream: Downstream, now: float) -> None:
    """The idle clock of a client's streams (the engine's sweep, about once a second):
    a stream with no frame either way for ``timeouts.streamIdle`` is reset."""
    streams = downstream.streams
    if not streams:
        return
    idle = downstream.engine.stream_idle_timeout
    for stream in list(streams.values()):
        if stream.seen:
            stream.seen = False
            stream.last_active = now
        elif now - stream.last_active >= idle:
            stream.reset(ErrorType.Timeout, f"stream {stream.stream_id}: no frame in {idle:g}s")


def client_half_closed(downstream: Downstream) -> None:
    """The client half-closed (or closed: a FIN does not tell), or sent bytes nothing can
    follow, with streams open: they get ``timeouts.drain`` to finish, as in a shutdown, then
    each still open is reset."""
    drain = downstream.engine.config.proxy.timeouts.drain
    downstream.engine.loop.call_later(drain, _drain_over, downstream, drain)


def _drain_over(downstream: Downstream, drain: float) -> None:
    if downstream.closed:
        return
    downstream.streams_over = True  # those held still are refused when let go (open_stream)
    streams = downstream.streams
    if not streams:
        return
    for stream in list(streams.values()):
        why = f"stream {stream.stream_id}: not ended within {drain:g}s of the client's close"
        stream.reset(ErrorType.Timeout, why)


def client_left(downstream: Downstream) -> None:
    """The client's connection is gone: its streams end, their connections are aborted."""
    streams = downstream.streams
    if not streams:
        return
    for stream in list(streams.values()):
        stream.end("DownstreamClosed", abort=True)


def pause_streams(downstream: Downstream, paused: bool) -> None:
    """The client stopped (or resumed) reading what it is sent: so do its streams'
    connections, which would otherwise fill its buffer without end."""
    streams = downstream.streams
    if not streams:
        return
    for stream in streams.values():
        if paused:
            stream.conn.pause_reading()
        else:
            stream.conn.resume_reading()
