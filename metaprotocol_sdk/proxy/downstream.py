"""Downstream side: one protocol instance per client connection, the request hot path."""

from __future__ import annotations

import asyncio
import random
from bisect import bisect_left
from collections.abc import Awaitable
from time import monotonic
from typing import TYPE_CHECKING, Any, cast

from metaprotocol_sdk.codec import Codec, Encoded, LocalError
from metaprotocol_sdk.enums import ErrorType, MessageType, ResponseStatus
from metaprotocol_sdk.errors import CodecError, FrameTooLargeError, MutationError
from metaprotocol_sdk.filters import Filter, LocalReply, RequestContext, ResponseContext
from metaprotocol_sdk.metadata import Attributes, Metadata, Mutation

from .accesslog import NO_CLIENT, client_facts
from .assembly import DECODE_TURN, LARGE_FRAME, Reads, parses_whole_frames
from .authorization import DENIED, Verdict
from .codec_bugs import CodecUnavailable, guarded_maker
from .config.models import codec_maker
from .room import Queued
from .router import CompiledRoute, RouteTable, Target
from .stats import DURATION_BUCKETS_MS, Counter
from .streams import (
    STREAM_FRAMES,
    Held,
    client_frame,
    client_half_closed,
    client_left,
    hold_init,
    init_refused,
    open_stream,
    pause_streams,
)
from .streams import sweep as sweep_streams
from .telemetry import RESPONSE_FLAGS, Identities
from .upstream import (
    RELEASED,
    Cluster,
    Pending,
    UpstreamConnection,
    UpstreamHost,
    append_encoded,
    held_bytes,
)

if TYPE_CHECKING:
    import ssl

    from .authorization import ListenerAuthorization, Stale, Verdict
    from .config.models import ListenerTls
    from .detection import Detection
    from .engine import Engine
    from .policies import ConnectionRateLimit
    from .streams import Stream
    from .tls import ClientCheck, TlsStats

_REQUEST = MessageType.Request
_ONEWAY = MessageType.Oneway
_HEARTBEAT = MessageType.Heartbeat
_STREAM_INIT = MessageType.Stream_Init
_STATUS_NAMES = ("Unknown", "Ok", "Error")
_ERROR_STATUS = ResponseStatus.Error
#: What the engine does after a bug of the codec that a client's connection reached.
_AFTER_CODEC_BUG = "the client is read no more and closed once answered"
#: Local failures a route's ``retries.retryOn`` may name; each is a gateway error for
#: outlier detection. A reply the codec refused is a ``reset``, as Envoy counts an upstream
#: protocol error (the engine drops the connection when the stream cannot go on).
_RETRY_CONDITIONS = {
    ErrorType.UpstreamConnectFailure: "connect-failure",
    ErrorType.UpstreamReset: "reset",
    ErrorType.BadResponse: "reset",
    ErrorType.Timeout: "timeout",
}

#: Why a new connection is refused (closed at once, cleanly); ``rate_limited`` (a listener's
#: ``connectionRateLimit``) has its series only where that is configured.
REJECT_REASONS = ("max_connections", "overload", "draining", "codec_error")
#: A client connection with nothing in flight that has been quiet this long (seconds) is
#: closed, where the engine wants it gone but serves it meanwhile: the first half of a hot
#: restart's drain (its client reconnects, to the successor), a listener's
#: ``maxConnectionDuration`` (to another replica, maybe).
QUIET_CLOSE = 1.0

#: Why the engine closes an open client connection (``..._closed_total{reason}``): ``idle`` nothing
#: in flight nor received for ``timeouts.idle``; ``max_connection_duration`` older than its
#: listener's ``maxConnectionDuration``; ``frame_timeout`` a frame not complete within
#: ``timeouts.frame``; ``write_timeout`` unsent replies above ``limits.connectionBufferBytes`` for
#: ``timeouts.write``; ``write_overflow`` a reply would take them past
#: ``limits.connectionBufferMaxBytes``; ``overload`` a partial frame growing past
#: ``limits.connectionBufferBytes`` while the process is over its buffer budget; ``write_abandoned``
#: a close (for any reason, the client's half-close included) whose replies the client had not all
#: taken ``timeouts.write`` later: reset (a close waits for what is unsent, which for a client that
#: reads nothing is forever); ``unanswerable`` a frame the codec refused without its request id;
#: ``codec_error`` the codec raised an exception other than ``CodecError`` (a bug in it, see
#: ``codec_bugs``): both read nothing more and close once the requests in flight are answered;
#: ``peer_exchange`` an Istio metadata exchange header above its bound (peer_exchange.py).
CLOSE_REASONS = (
    "idle",
    "peer_exchange",
    "max_connection_duration",
    "frame_timeout",
    "write_timeout",
    "write_overflow",
    "overload",
    "write_abandoned",
    "unanswerable",
    "codec_error",
)


class ListenerRuntime:
    """What every connection of one listener shares: codec factory, routes, stats."""

    def __init__(
        self,
        engine: Engine,
        name: str,
        protocol_codec: type[Codec],
        table: RouteTable,
        options: dict[str, Any],
    ) -> None:
        self.engine = engine
        self.name = name
        self.codec_class = protocol_codec
        self.options = options
        #: Makes each connection's codec (see ``codec_maker``); one that fails raises
        #: ``CodecUnavailable`` and the connection is refused (``reason="codec_error"``).
        self.new_codec = guarded_maker(
            codec_maker(protocol_codec, options),
            protocol_codec,
            engine.codec_bugs,
            "client connection refused",
        )
        self.table = table
        stats = engine.stats
        self.accepted = stats.counter("metaprotocol_downstream_connections_total", listener=name)
        self.rejected = {
            reason: stats.counter(
                "metaprotocol_downstream_connections_rejected_total", listener=name, reason=reason
            )
            for reason in REJECT_REASONS
        }
        self.closed_by = {
            reason: stats.counter(
                "metaprotocol_downstream_connections_closed_total", listener=name, reason=reason
            )
            for reason in CLOSE_REASONS
        }
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
        #: Drain notices sent to its clients (made on first use: most codecs have none).
        self._notices: Counter | None = None
        #: ``maxConnectionDuration`` in seconds (``None``: connections never age).
        self.max_duration: float | None = None
        self._skipped: dict[str, Counter] = {}
        self._filter_errors: dict[str, Counter] = {}
        self._retries: dict[tuple[str, str], Counter] = {}
        #: TLS termination (set by ``tls.attach_listener``; ``None``: plain TCP).
        self.tls: ssl.SSLContext | None = None
        self.tls_stats: TlsStats | None = None
        #: What a client certificate must be beyond its chain (``None``: nothing more).
        self.tls_check: ClientCheck | None = None
        #: An ``ISTIO_MUTUAL`` listener's settings: ``tls`` is then the workload identity's
        #: context, replaced when the identity rotates (``None``: any other listener).
        self.mesh_tls: ListenerTls | None = None
        #: The URI SANs of its certificate when not ``mesh_tls``'s (read once, for Istio's
        #: metrics: ``tls.attach_listener``).
        self.local_uris: tuple[str, ...] = ()
        #: ``connectionRateLimit`` (``None``: none; set by the engine).
        self.accept_limit: ConnectionRateLimit | None = None
        #: PERMISSIVE or DISABLE (a PeerAuthentication's): each connection's first bytes say
        #: TLS or plain text (``detection.attach_detection``; ``None``: not detected).
        self.detect: Detection | None = None
        #: The AuthorizationPolicies (``None``: none; set by the engine).
        self.authz: ListenerAuthorization | None = None
        #: Streams' series, made with the first stream (see ``streams``).
        self._streams_active: Counter | None = None
        self._stream_frames: dict[str, Counter] = {}

    def count_streams(self, delta: int) -> None:
        """One stream more (1) or fewer (-1) open on this listener."""
        gauge = self._streams_active
        if gauge is None:
            gauge = self._streams_active = self.engine.stats.gauge(
                "metaprotocol_streams_active", listener=self.name
            )
        gauge.value += delta

    def count_stream_frame_dropped(self) -> None:
        """Count one frame of a stream that had ended for the client, dropped."""
        counter = self._stream_frames.get("dropped")
        if counter is None:
            counter = self._stream_frames["dropped"] = self.engine.stats.counter(
                "metaprotocol_stream_frames_dropped_total", listener=self.name
            )
        counter.value += 1

    def count_stream_frame(self, side: str) -> None:
        """Count one frame of a stream from the client (``downstream``) or the upstream."""
        counter = self._stream_frames.get(side)
        if counter is None:
            counter = self._stream_frames[side] = self.engine.stats.counter(
                "metaprotocol_stream_frames_total", listener=self.name, side=side
            )
        counter.value += 1

    def count_filter_error(self, f: Filter) -> None:
        """Count one exception raised by a filter (its request was answered locally)."""
        name = f.name or type(f).__name__
        counter = self._filter_errors.get(name)
        if counter is None:
            counter = self._filter_errors[name] = self.engine.stats.counter(
                "metaprotocol_filter_errors_total", listener=self.name, filter=name
            )
        counter.value += 1

    def count_retry(self, route: str, condition: str) -> None:
        """Count one retry of a request on ``route`` after ``condition``."""
        counter = self._retries.get((route, condition))
        if counter is None:
            counter = self._retries[route, condition] = self.engine.stats.counter(
                "metaprotocol_retries_total", listener=self.name, route=route, reason=condition
            )
        counter.value += 1

    def count_skipped_mutation(self, route: str) -> None:
        """Count one reply forwarded without the response mutation it cannot carry."""
        counter = self._skipped.get(route)
        if counter is None:
            counter = self._skipped[route] = self.engine.stats.counter(
                "metaprotocol_mutations_skipped_total", listener=self.name, route=route
            )
        counter.value += 1

    def count_notice(self) -> None:
        """Count one drain notice sent to a client."""
        counter = self._notices
        if counter is None:
            counter = self._notices = self.engine.stats.counter(
                "metaprotocol_drain_notices_total", listener=self.name, side="downstream"
            )
        counter.value += 1

    def forget_series(self) -> None:
        """Forget the series made on first use (after the stats dropped some of them)."""
        self._skipped.clear()
        self._notices = None
        self._filter_errors.clear()
        self._retries.clear()
        self._stream_frames.clear()
        if self.authz is not None:
            self.authz.forget_series()

    def count_local(self, error: ErrorType) -> None:
        """Count one local reply."""
        self._local[error].value += 1


class Refused(asyncio.Protocol):
    """A client connection refused when it was accepted: counted in ``rejected`` and closed
    cleanly (FIN) once its transport exists, nothing read. The verdict is final: the
    engine's state may change before the transport is made (a loop iteration later), and a
    TLS listener's connection must never be judged again as a plain one."""

    __slots__ = ("rejected",)

    def __init__(self, rejected: Counter) -> None:
        self.rejected = rejected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.rejected.value += 1
        transport.close()


class Downstream(asyncio.Protocol):
    """One client connection.

    Bounded by the engine's settings (see the Limits page): unsent replies pause reading above
    ``connectionBufferBytes`` and close the client past ``connectionBufferMaxBytes`` or after
    ``timeouts.write``; a partial frame must complete within ``timeouts.frame``; an idle
    connection closes after ``timeouts.idle``. Once the client half-closes or sends bytes the
    codec cannot resynchronise on, nothing more is read, but replies to the requests already
    forwarded are still delivered before the connection closes.
    """

    __slots__ = (
        "_route",
        "_source_ip",
        "aged",
        "authz",
        "blocked",
        "blocked_since",
        "buffer",
        "client",
        "closed",
        "closing_since",
        "codec",
        "dedicated",
        "draining",
        "ended_streams",
        "engine",
        "held",
        "held_inits",
        "holds",
        "inflight",
        "inflight_bytes",
        "istio",
        "last_seen",
        "listener",
        "need",
        "noticed",
        "out",
        "out_size",
        "partial_since",
        "paused_since",
        "queued",
        "read_done",
        "reading_paused",
        "reads",
        "seen",
        "since",
        "streams",
        "streams_over",
        "transport",
        "turn",
        "unsent",
        "waiting",
        "whole",
        "write_paused",
    )

    def __init__(self, listener: ListenerRuntime) -> None:
        self.listener = listener
        self.engine = listener.engine
        self.codec: Codec = listener.new_codec()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.need = 0
        #: The reads of a large frame being assembled (see ``assembly``).
        self.reads = Reads()
        #: The codec parses an assembled frame itself (``decode_frame``).
        self.whole = parses_whole_frames(self.codec)
        self.inflight = 0
        #: Bytes of the requests in flight (their frames are kept for local replies).
        self.inflight_bytes = 0
        #: Set once the engine closed (or aborted) the transport: late replies are not sent.
        self.closed = False
        #: When the engine closed the transport cleanly (0: it did not): the close waits
        #: for the unsent replies, at most ``timeouts.write`` (see :meth:`sweep`).
        self.closing_since = 0.0
        #: No new requests: a shutdown drain, a half-closed client or an unrecoverable frame.
        #: The connection closes as soon as nothing is in flight.
        self.draining = False
        #: The client was sent the codec's drain notice (see :meth:`notify_drain`).
        self.noticed = False
        #: Nothing more is read (half-close or an unrecoverable frame).
        self.read_done = False
        # Flow control: reading stops while the client does not read its responses
        # (``write_paused``) or while an upstream connection it sent to is full (``blocked``).
        self.write_paused = False
        self.blocked: set[UpstreamConnection] = set()
        #: When ``blocked`` last became non-empty: the frame timeout does not count that wait.
        self.blocked_since = 0.0
        self.reading_paused = False
        #: The rest of a long read waits for the next turn of the loop (see DECODE_TURN).
        self.turn = False
        self.dedicated: dict[tuple[str, str], UpstreamConnection] = {}
        self._route = listener.table.match
        #: Responses decoded but not yet written (see :meth:`finish`), and their size.
        self.out: list[bytes | memoryview] = []
        self.out_size = 0
        # Buffer accounting (the engine's overload budget): bytes of a partial frame held in
        # ``buffer`` and bytes the transport had not sent at the last look.
        self.held = 0
        self.unsent = 0
        # Clocks read by the engine's housekeeping sweep (no timer per connection).
        self.seen = False
        self.last_seen = 0.0
        #: When it was accepted, and when it reached its listener's ``maxConnectionDuration``
        #: (0: not yet; see :meth:`_age`).
        self.since = 0.0
        self.aged = 0.0
        self.partial_since = 0.0
        self.paused_since = 0.0
        #: Requests filters hold now (made on the first hold): cancelled if the client leaves.
        self.holds: set[Hold] | None = None
        #: Its requests waiting for room on an upstream connection (see room.py).
        self.queued: set[Queued] | None = None
        #: Requests sent upstream and not settled: given up at once if the client leaves.
        self.waiting: dict[Pending, None] = {}
        #: What the listener's AuthorizationPolicies say of this connection's requests
        #: (``None``: all allowed, or no policy; see ``authorization``).
        self.authz: Verdict | Stale | None = None
        #: Its TLS identities in Istio's series (``None``: plain text; set by a TLS
        #: connection once its handshake is done).
        self.istio: Identities | None = None
        #: Its address and TLS identity, as the access log writes them (found when the
        #: connection is made, with an access log only).
        self.client = NO_CLIENT
        #: Its IP address once a source-IP hash asked for it ("": not known).
        self._source_ip: str | None = None
        #: Its open streams by stream id (made with its first stream; see ``streams``).
        self.streams: dict[int, Stream] | None = None
        #: The drain of its streams after its close is over (``streams._drain_over``): a
        #: ``Stream_Init`` a filter lets go of since opens no stream.
        self.streams_over = False
        #: ``Stream_Init`` frames filters hold, with their streams' frames meanwhile (made
        #: with the first such hold; see ``streams.Held``).
        self.held_inits: Held | None = None
        #: Streams that ended (or were refused) before the client closed its side: its
        #: frames for them are dropped until it does (see ``streams.ended_early``).
        self.ended_streams: dict[int, None] | None = None

    def source_ip(self) -> str | None:
        """The client's IP address, which ``consistentHash.useSourceIp`` hashes (``None``:
        not known); read from the socket the first time it is asked for."""
        ip = self._source_ip
        if ip is None:
            transport = self.transport
            if transport is None:
                return None
            peer = transport.get_extra_info("peername")
            ip = self._source_ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        return ip or None

    # -- connection events ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not inherit from asyncio.Transport: no isinstance check.
        self.transport = transport = cast(asyncio.Transport, transport)
        engine = self.engine
        listener = self.listener
        reason = engine.refuse_connection()
        if reason is not None:
            listener.rejected[reason].value += 1
            self.closed = True
            transport.close()  # a clean close (FIN), not a reset
            return
        transport.set_write_buffer_limits(
            high=engine.connection_buffer, low=engine.connection_buffer // 4
        )
        engine.downstreams.add(self)
        listener.accepted.value += 1
        listener.active.value += 1
        self.last_seen = self.since = engine.loop.time()
        if listener.authz is not None:
            self.authz = listener.authz.judge(transport)
        if engine.access_log is not None:
            self.client = client_facts(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        engine = self.engine
        self.closed = True
        self.transport = None
        if self.waiting:
            self._give_up_waiting()
        if self.queued:  # never sent: nothing to forget upstream
            for q in list(self.queued):
                self.room_left(q)
        if self.streams:
            client_left(self)
        if self in engine.downstreams:
            self.listener.active.value -= 1
            engine.downstreams.discard(self)
            if self.inflight:  # held requests: their frames stay counted until each settles
                engine.departed.add(self)
        engine.buffered -= self.held + self.unsent
        self.held = self.unsent = 0
        self.buffer = bytearray()
        self.reads.clear()
        self.out = []
        for conn in self.blocked:  # a full upstream must not keep a client that left
            conn.remove_blocked(self)
        self.blocked = set()
        if self.dedicated:
            engine.clients_with_upstream -= 1
            conns = list(self.dedicated.values())
            self.dedicated.clear()  # first: a close may call upstream_closed at once
            for conn in conns:
                conn.close()
        if self.holds:  # nobody to answer: stop what they wait for (a call, a timer)
            for hold in list(self.holds):
                hold.future.cancel()
        engine.downstream_gone()

    def _give_up_waiting(self) -> None:
        """The client is gone: nobody can get the replies its requests wait for. As Envoy
        resets a connection's streams when it closes, each is settled now (counted
        ``DownstreamClosed``) and forgotten by its upstream connection, whose late reply is
        dropped and counted as unmatched: until the replies or the route's timeout, clients
        that connect, send and leave would hold ``maxPendingRequests`` slots for nothing."""
        for p in list(self.waiting):
            if p.done:  # settled meanwhile, by the giving up of another
                continue
            conn = p.conn
            self.fail(p, ErrorType.Unspecified, "the client left")  # no retry, nothing sent
            conn.forget(p)

    def eof_received(self) -> bool | None:
        """The client half-closed: read nothing more, but answer what is in flight, then
        close (ourselves, not the transport on its own: the close is bounded, see
        :meth:`sweep`)."""
        self._stop_reading()
        self.draining = True
        if not self.inflight:
            self.close()
        else:
            self._drain_streams()
        return True

    def _drain_streams(self) -> None:
        """Nothing more is read from the client (its half-close, an unreadable frame), which
        can no longer close its streams: they (and those held) get ``timeouts.drain``."""
        if self.streams or (self.held_inits is not None and self.held_inits.by_id):
            client_half_closed(self)

    def pause_writing(self) -> None:
        """The transport's write buffer is full (asyncio flow control)."""
        self.write_paused = True
        self.paused_since = self.engine.loop.time()
        self._pause_reading()
        if self.streams:
            pause_streams(self, True)

    def resume_writing(self) -> None:
        """The transport's write buffer drained (asyncio flow control)."""
        self.write_paused = False
        self._account_unsent()
        self._maybe_resume_reading()
        if self.streams:
            pause_streams(self, False)

    def block_on(self, conn: UpstreamConnection) -> None:
        """Stop reading until ``conn`` can take more (it calls :meth:`unblock`)."""
        if conn.add_blocked(self):
            if not self.blocked:
                self.blocked_since = self.engine.loop.time()
            self.blocked.add(conn)
            self._pause_reading()

    def unblock(self, conn: UpstreamConnection) -> None:
        """``conn``, which this one waited for, drained or closed. The time spent waiting is
        not the client's: a partial frame's clock skips it."""
        self.blocked.discard(conn)
        if not self.blocked and self.partial_since and not self._held_full():
            # (While the frames of held ``Stream_Init`` frames are at their bound the engine
            # still does not read: :meth:`unblock_held` skips the whole wait.)
            self.partial_since += self.engine.loop.time() - self.blocked_since
        self._maybe_resume_reading()

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def block_held(self) -> None:
        """Stop reading: the frames waiting for held ``Stream_Init`` frames are at their
        bound (:meth:`unblock_held` once one is settled)."""
        if not self.blocked:
            self.blocked_since = self.engine.loop.time()
        self._pause_reading()

    def unblock_held(self) -> None:
        """A held ``Stream_Init`` was settled, and the frames waiting are below their bound
        again: read again if nothing else stops it."""
        if not self.reading_paused or self._held_full():
            return
        if not self.blocked and self.partial_since:
            self.partial_since += self.engine.loop.time() - self.blocked_since
        self._maybe_resume_reading()

    def _held_full(self) -> bool:
        held = self.held_inits
        return held is not None and held.full(self)

    def _maybe_resume_reading(self) -> None:
        if self.reading_paused and not self.write_paused and not self.blocked:
            if self.read_done or self.turn or self._held_full():
                return
            self.reading_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def _stop_reading(self) -> None:
        """Read nothing more; a partial frame in the buffer is dropped."""
        self.read_done = True
        self._pause_reading()
        self.buffer.clear()
        self.reads.clear()
        self.need = 0
        self._account_held(0)

    def close(self) -> None:
        """Close after writing what is buffered (within ``timeouts.write``). Once: asyncio's
        TLS transport, closed a second time, lets go of its TLS layer, and every call on
        it after raises (its layer calls :meth:`eof_received` as it closes, after a
        client's close_notify)."""
        self.closed = True
        transport = self.transport
        if transport is not None:
            if not self.closing_since:
                self.closing_since = self.engine.loop.time()
            if not transport.is_closing():
                transport.close()

    def abort(self) -> None:
        """Reset the connection now, dropping what is unsent (a drain's deadline). Its
        streams end now, as its client's (``DownstreamClosed``), not when the loop reports
        the connection lost: a shutdown resets the upstream connections before that."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        if self.streams:
            client_left(self)

    def shut(self, reason: str) -> None:
        """Close because of a limit (counted by ``reason``, see ``CLOSE_REASONS``).

        Limits on a client that does not read abort (its unsent bytes are dropped at once);
        the others close cleanly.
        """
        if self.closed or self.transport is None:
            return
        self.listener.closed_by[reason].value += 1
        if reason in ("write_timeout", "write_overflow", "overload"):
            self.abort()
        else:
            self.close()

    def close_if_done(self) -> None:
        """Close a connection that takes no new requests (drain, half-close, an unreadable
        frame) once nothing is in flight: after an answer that did not go through
        :meth:`flush` or :meth:`fail`, which check it themselves (a held request answered
        locally, or sent one-way)."""
        if self.draining and self.inflight == 0 and not self.closed:
            self.close()

    def start_drain(self) -> None:
        """Finish what is in flight, refuse new requests, then close (telling the client
        first, where its codec has a drain notice, if the close must wait)."""
        self.draining = True
        if self.inflight == 0:
            self.close()
        else:
            self.notify_drain()

    def notify_drain(self) -> None:
        """Tell the client that this connection is closing, once: the codec's drain notice
        (HTTP/2's ``GOAWAY`` is one), so that a client that knows it sends its
        next requests elsewhere rather than on a connection about to close. Nothing for a
        codec without one."""
        if self.noticed or self.closed or self.transport is None:
            return
        codec = self.codec
        if not codec.active_capabilities.drain_notice:
            return
        self.noticed = True
        try:
            notice = codec.drain_notice()
            if not notice:
                raise ValueError("drain_notice() returned nothing")
        except Exception as exc:  # a bug in the codec: the drain goes on without a notice
            self.engine.codec_bugs.report(
                codec, "drain_notice", exc, "no drain notice sent", strict=True
            )
            return
        self.queue_frame(notice)
        if self.closed:  # a client too far behind to take it is closed instead, as for a reply
            return
        self.listener.count_notice()
        self.flush()

    # -- buffer accounting ---------------------------------------------------------------------

    def _account_held(self, held: int) -> None:
        engine = self.engine
        engine.buffered += held - self.held
        self.held = held

    def _account_unsent(self) -> None:
        transport = self.transport
        unsent = transport.get_write_buffer_size() if transport is not None else 0
        if unsent != self.unsent:
            self.engine.buffered += unsent - self.unsent
            self.unsent = unsent

    def _partial(self, consumed: bool) -> None:
        """After a read that leaves (or left) a partial frame in the buffer."""
        held = len(self.buffer) + self.reads.size
        self._account_held(held)
        if not held:
            self.partial_since = 0.0
            return
        engine = self.engine
        if consumed or not self.partial_since:
            self.partial_since = engine.loop.time()  # a new frame started in this read
        if held > engine.connection_buffer and engine.buffered > engine.max_buffered:
            # Over the process budget, the connection asking for more memory gives way.
            self.shut("overload")

    def sweep(self, now: float) -> int:
        """Housekeeping (called by the engine about once a second): enforce the idle, frame
        and write timeouts, and return the bytes this connection holds."""
        engine = self.engine
        if self.seen or self.inflight:
            self.seen = False
            self.last_seen = now
        if not self.closed:
            if self.write_paused and now - self.paused_since > engine.write_timeout:
                self.shut("write_timeout")
            elif (
                self.partial_since
                and not self.blocked  # the engine stopped reading it, not the client
                and now - self.partial_since > engine.frame_timeout
                and not self._held_full()
            ):
                self.shut("frame_timeout")
            elif not self.held and now - self.last_seen > engine.idle_timeout:
                self.shut("idle")
            elif self.listener.max_duration is not None:
                self._age(now, self.listener.max_duration)
        elif (
            self.closing_since
            and now - self.closing_since > engine.write_timeout
            and self.transport is not None
        ):
            # Closed cleanly, and the client has not taken the replies left since: reset.
            self.listener.closed_by["write_abandoned"].value += 1
            self.closing_since = 0.0
            self.abort()
        if self.streams:
            sweep_streams(self, now)
        self._account_unsent()
        return self.held + self.unsent + self.inflight_bytes

    def _age(self, now: float, max_duration: float) -> None:
        """Its listener's ``maxConnectionDuration`` (sweep): once the connection is that old,
        its client is sent the codec's drain notice, and it is served on until it has had
        nothing in flight and been quiet for :data:`QUIET_CLOSE` seconds, then closed (its
        client's next connection may reach another replica). A client that never pauses is
        drained as on a shutdown ``timeouts.drain`` after the notice: its new requests get
        ``ShuttingDown`` and the connection closes as soon as nothing is in flight (a request
        it has on its way then is not read: the client sees the connection close)."""
        if self.draining:
            return
        if not self.aged:
            if now - self.since < max_duration:
                return
            self.aged = now
            self.notify_drain()
            if self.closed:  # too far behind to take it: closed (and counted) for that
                return
        if not self.inflight and not self.held and now - self.last_seen >= QUIET_CLOSE:
            self.listener.closed_by["max_connection_duration"].value += 1
            self.close()
        elif now - self.aged >= self.engine.config.proxy.timeouts.drain:
            self.listener.closed_by["max_connection_duration"].value += 1
            self.start_drain()

    # -- the hot path --------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.seen = True
        if self.read_done:
            return
        if self.need > LARGE_FRAME:
            self._assemble(data)
            return
        buffer = self.buffer
        buffer += data
        if len(buffer) < self.need:
            self._partial(False)
            return
        start = len(buffer)
        left = DECODE_TURN
        codec = self.codec
        while buffer:
            try:
                message = codec.decode(buffer)
            except FrameTooLargeError as exc:
                self._refuse(exc, ErrorType.OverLimit, close=True)
                return
            except CodecError as exc:
                if exc.frame_size is None or not 0 < exc.frame_size <= len(buffer):
                    self._refuse(exc, ErrorType.BadRequest, close=True)
                    return
                del buffer[: exc.frame_size]
                self._refuse(exc, ErrorType.BadRequest, close=False)
                continue
            except Exception as exc:  # a bug in the codec: as bytes it cannot resynchronise on
                self.listener.decode_errors.value += 1
                self.codec_failed("decode", exc)
                return
            if not isinstance(message, Metadata):
                self.need = message.needed
                self._partial(len(buffer) != start)
                return
            if message.message_type is _REQUEST:
                self._request(message)
            else:
                self._other(message)
            if self.read_done:
                return
            left -= 1
            if not left and buffer:
                self.need = 0
                self._next_turn()
                return
        self.need = 0
        if self.held:
            self._partial(True)

    def _next_turn(self) -> None:
        """``DECODE_TURN`` frames of a long read are decoded: the rest waits for the next turn
        of the event loop, reading paused meanwhile (so no further read comes first)."""
        self._account_held(len(self.buffer) + self.reads.size)  # in the buffer budget
        if not self.turn:
            self.turn = True
            self._pause_reading()
            self.engine.loop.call_soon(self._take_turn)

    def _take_turn(self) -> None:
        """Decode what :meth:`_next_turn` left, then read again if nothing else stops it."""
        self.turn = False
        if self.closed or self.read_done:
            return
        self.data_received(b"")
        self._maybe_resume_reading()

    def _assemble(self, data: bytes) -> None:
        """A read of the large frame at the front: kept until the frame is whole, then
        decoded (the reads joined once); what follows it goes on as usual."""
        reads = self.reads
        if not reads.size and len(self.buffer) >= self.need:
            # The codec asked for no more than it had (it fails the kit's needed check):
            # decode as usual.
            self.buffer += data
            self.need = 0
            self.data_received(b"")
            return
        if len(self.buffer) + reads.add(data) < self.need:
            self._partial(False)
            return
        frame, self.buffer = reads.join(self.buffer, self.need, self.whole)
        self.need = 0
        self.partial_since = 0.0  # what follows the frame starts anew
        if frame is not None:
            self._decode_frame(frame)
        self.data_received(b"")  # decodes the buffer: the frame itself, or what followed it

    def _decode_frame(self, frame: bytes) -> None:
        """An assembled frame, for a codec that parses it whole."""
        try:
            message = self.codec.decode_frame(frame)
        except FrameTooLargeError as exc:
            self._refuse(exc, ErrorType.OverLimit, close=True)
            return
        except CodecError as exc:
            self._refuse(exc, ErrorType.BadRequest, close=exc.frame_size != len(frame))
            return
        except Exception as exc:  # a bug in the codec: as bytes it cannot resynchronise on
            self.listener.decode_errors.value += 1
            self.codec_failed("decode_frame", exc)
            return
        if message.message_type is _REQUEST:
            self._request(message)
        else:
            self._other(message)

    def _other(self, message: Metadata) -> None:
        """A message from the client that is not a two-way request."""
        kind = message.message_type
        if kind is _HEARTBEAT:
            self.listener.heartbeats.value += 1
            try:
                reply = self.codec.heartbeat_reply(message)
            except Exception as exc:  # a bug in the codec: no reply, the connection goes on
                self.engine.codec_bugs.report(self.codec, "heartbeat_reply", exc, "not answered")
                return
            if reply and self.transport is not None:
                self.transport.write(reply)
                self._account_unsent()
        elif kind is _ONEWAY:
            self._oneway(message)
        elif kind in STREAM_FRAMES and self.codec.active_capabilities.streaming:
            client_frame(self, message)
        else:
            self.local_reply(
                message,
                ErrorType.BadRequest,
                f"{kind.name} messages are not accepted from clients by this engine",
            )

    def _request(self, message: Metadata) -> None:
        if self.draining:
            self.local_reply(message, ErrorType.ShuttingDown, "proxy is shutting down")
            return
        authz = self.authz
        if authz is not None and (policy := authz.denies(self, message.attributes)) is not None:
            self._deny(message, policy)
            return
        route = self._route(message.attributes)
        if route is None:
            name = self.listener.name
            self.local_reply(message, ErrorType.RouteNotFound, f"no route on {name}")
            return
        if route.request_filters:
            self._filter(message, route, 0, None)
            return
        self._dispatch(message, route, route.request_mutation)

    def _dispatch(
        self,
        message: Metadata,
        route: CompiledRoute,
        mutation: Mutation | None,
        tries: int = 0,
        started: float = 0.0,
        avoid: UpstreamHost | None = None,
        ready: Queued | None = None,
    ) -> None:
        """The router, the chain's last step: destination, endpoint, limits, send.

        ``tries`` counts the retries before this one (``started`` is the first try's start,
        or a request's that waited; ``avoid`` the endpoint that just failed: a retry prefers
        another). ``ready``: a request that waited for room, to send on its ``conn``, which
        has room now (see room.py). One function, not two: a call more per request costs the
        interpreted engine 2 % (callgrind)."""
        engine = self.engine
        conn: UpstreamConnection | None
        if ready is not None:
            target, conn = ready.target, ready.conn
        else:
            target = route.single or route.pick()
            cluster = target.cluster
            if cluster is not None and cluster.retired:  # routed before a reload
                cluster = cluster.serving()
                if avoid is not None:  # the failed try's endpoint, as the cluster of now has it
                    avoid = cluster.own(avoid)
            if cluster is None:
                self.local_reply(
                    message,
                    ErrorType.ClusterNotFound,
                    f"unknown cluster {target.name}",
                    route,
                    target,
                    started or None,  # a retry's answer counts the time since the first try
                )
                return
            host = (
                cluster.balancer.pick(message, self)
                if avoid is None
                else cluster.pick_other(message, avoid, self)
            )
            if host is None:
                if self._retry(route, "unavailable", tries, started, cluster):
                    # The first try has no start yet (``started`` is set from the second on):
                    # the request's clock starts now, not at the loop's time zero.
                    started = started if tries else monotonic()
                    self._dispatch(message, route, mutation, tries + 1, started)
                    return
                self.local_reply(
                    message,
                    ErrorType.NoHealthyUpstream,
                    f"no endpoint in {target.name}",
                    route,
                    target,
                    started or None,
                )
                return
            if (  # at_limit(), inline: this runs for every request
                engine.pending >= engine.max_pending
                or self.inflight >= engine.max_pending_per_connection
                or engine.buffered > engine.max_buffered
                or engine.rss_over
            ):
                over = self._over_limit()
                self.local_reply(message, ErrorType.OverLimit, over, route, target, started or None)
                return
            if cluster.request_limits and (why := cluster.over_pool_limits(host)) is not None:
                self.local_reply(message, ErrorType.OverLimit, why, route, target, started or None)
                return
            try:
                conn = (
                    cluster.shared_connection(host)
                    if cluster.shared
                    else self._dedicated(cluster, host, avoid)
                )
            except CodecUnavailable as exc:  # counted and logged as the codec's bug
                failed = ErrorType.UpstreamConnectFailure
                self.local_reply(message, failed, str(exc), route, target, started or None)
                return
            if conn is None:
                why = cluster.refused()
                self.local_reply(message, ErrorType.OverLimit, why, route, target, started or None)
                return
            if cluster.stream_cap and conn.full():
                self._wait_for_room(message, route, target, conn, mutation, tries, started)
                return
        host = conn.host  # another endpoint's when the budget made the client reuse one
        now = monotonic()
        p = Pending(self, message, route, target, host, conn, now)
        try:
            conn.send(p, mutation)
        except Exception as exc:  # the codec cannot write this request (e.g. a mutation)
            why = engine.codec_bugs.report(conn.codec, "encode", exc, "answered BadRequest")
            self.local_reply(
                message,
                ErrorType.BadRequest,
                f"cannot encode request: {why}",
                route,
                target,
                started or None,
            )
            return
        if route.retries is None:
            if started:  # a request that waited for room: the route's time is less
                p.start = started
                engine.deadlines.add_at(p, max(started + route.timeout, now + 0.001))
            else:
                engine.deadlines.add(p, now, route.timeout)
        else:
            if started:  # a retry, or a request that waited for room
                p.start = started
            p.mutation = mutation
            p.tries = tries
            if tries:
                conn.cluster.retrying += 1
            per_try = self._per_try_timeout(route, p.start, now)
            if per_try is not None:
                engine.deadlines.add(p, now, per_try)
            elif started:  # the rest of the route's timeout: a deadline no other request has
                engine.deadlines.add_at(p, max(started + route.timeout, now + 0.001))
            else:
                engine.deadlines.add(p, now, route.timeout)
        engine.pending += 1
        host.active += 1
        if host.load is not None:
            host.load.active += 1
        self.inflight += 1
        self.waiting[p] = None
        held = p.held
        self.inflight_bytes += held
        engine.buffered += held
        if conn.write_paused:
            self.block_on(conn)
        if route.mirror is not None and not tries:
            self._mirror(message, route, mutation)

    # -- waiting for room on a connection (see room.py) ----------------------------------------

    def _wait_for_room(
        self,
        message: Metadata,
        route: CompiledRoute,
        target: Target,
        conn: UpstreamConnection,
        mutation: Mutation | None,
        tries: int,
        started: float,
    ) -> None:
        """Queue a request whose connection is full (``maxConcurrentStreams``): it counts as
        pending until it is sent, bounded by its route's timeout."""
        engine = self.engine
        cluster = conn.cluster
        now = monotonic()
        queue = cluster.queue_for(conn)
        q = Queued(self, message, route, target, conn, mutation, tries, started or now, queue)
        queue[q] = None
        cluster.wait_started()
        if tries:  # a retry waiting is a retry in flight (maxRetries)
            cluster.retrying += 1
        engine.pending += 1
        self.inflight += 1
        self.inflight_bytes += q.size
        engine.buffered += q.size
        engine.deadlines.add_at(q, max(q.started + route.timeout, now + 0.001))
        if self.queued is None:
            self.queued = set()
        self.queued.add(q)

    def _unqueue(self, q: Queued) -> Metadata:
        """Stop counting ``q`` as waiting (sent, timed out, refused, or its client left); its
        request, which ``q`` lets go of: it may stay a while in its deadline queue, and must
        not keep the frame the buffer budget no longer counts (see ``upstream.RELEASED``)."""
        q.done = True  # also stops its deadline
        request = q.request
        q.request = RELEASED
        q.queue.pop(q, None)
        cluster = q.conn.cluster
        cluster.wait_ended()
        if q.tries:
            cluster.retrying -= 1
        engine = self.engine
        engine.pending -= 1
        self.inflight -= 1
        self.inflight_bytes -= q.size
        engine.buffered -= q.size
        if self.queued is not None:
            self.queued.discard(q)
        if engine.draining and engine.pending == 0:
            engine.requests_drained()
        return request

    def send_queued(self, q: Queued, conn: UpstreamConnection) -> None:
        """Send ``q`` on ``conn``, which has room now (or answer it: its client left, or
        ``http2MaxRequests`` is reached now: ``OverLimit``, as Envoy fails a pending request
        it attaches to a connection then; kept waiting, it might wait for nothing, the
        requests in flight being another endpoint's)."""
        request = self._unqueue(q)
        if self.closed:
            self._unanswered(request, q.route, q.target, monotonic() - q.started, conn.host)
            return
        cluster = conn.cluster
        if cluster.request_limits and (why := cluster.over_max_requests()) is not None:
            host = conn.host
            self.local_reply(request, ErrorType.OverLimit, why, q.route, q.target, q.started, host)
            self.close_if_done()
            return
        q.conn = conn
        self._dispatch(request, q.route, q.mutation, q.tries, q.started, None, q)
        self.close_if_done()

    def requeue(self, q: Queued) -> None:
        """``q`` cannot wait where it waits: a client's own connection went away or retired,
        or a reload retired its cluster. Routed again, as a request not yet sent."""
        request = self._unqueue(q)
        if self.closed:
            self._unanswered(request, q.route, q.target, monotonic() - q.started, q.conn.host)
            return
        self._dispatch(request, q.route, q.mutation, q.tries, q.started)
        self.close_if_done()

    def room_refused(self, q: Queued, why: str) -> None:
        """``q``'s endpoint has no connection left and none may open: ``OverLimit``."""
        request = self._unqueue(q)
        host = q.conn.host
        self.local_reply(request, ErrorType.OverLimit, why, q.route, q.target, q.started, host)
        self.close_if_done()

    def room_left(self, q: Queued) -> None:
        """``q``'s client left (or is being closed) before it had room: nobody to answer
        (reported against the endpoint it waited for, as every end of a wait is)."""
        request = self._unqueue(q)
        self._unanswered(request, q.route, q.target, monotonic() - q.started, q.conn.host)

    def room_failed(self, q: Queued, error: ErrorType, message: str) -> None:
        """``q`` fails without being sent (its endpoint's connect failed, see
        ``UpstreamConnection._take_waiting``): tried again when its route retries on it
        and its cluster's retries allow, else answered."""
        request = self._unqueue(q)
        host = q.conn.host
        if self.closed:
            self._unanswered(request, q.route, q.target, monotonic() - q.started, host)
            return
        condition = _RETRY_CONDITIONS.get(error)
        if condition is not None and q.route.retries is not None:
            cluster = q.conn.cluster.serving()
            if self._retry(q.route, condition, q.tries, q.started, cluster):
                self._dispatch(request, q.route, q.mutation, q.tries + 1, q.started, host)
                self.close_if_done()
                return
        self.local_reply(request, error, message, q.route, q.target, q.started, host)
        self.close_if_done()

    def room_timeout(self, q: Queued) -> None:
        """The route's timeout passed while ``q`` waited for room: ``Timeout``."""
        request = self._unqueue(q)
        cap = q.conn.cluster.stream_cap
        why = (
            f"no response within {q.route.timeout:g}s (waited for room on a connection to "
            f"{q.conn.host.key}: {cap} requests in flight on each)"
        )
        host = q.conn.host
        self.local_reply(request, ErrorType.Timeout, why, q.route, q.target, q.started, host)
        self.close_if_done()

    # -- filters -------------------------------------------------------------------------------

    def _filter(
        self,
        message: Metadata,
        route: CompiledRoute,
        first: int,
        context: RequestContext | None,
    ) -> None:
        """Run the route's request filters from ``first`` on, then the router."""
        if context is None:
            context = RequestContext(message, route.name, self.listener.name)
        filters = route.request_filters
        for i in range(first, len(filters)):
            f = filters[i]
            try:
                waiting = f.on_request(context)
            except Exception as exc:  # a filter's bug answers its request, nothing else
                self.listener.count_filter_error(f)
                name = f.name or type(f).__name__
                why = f"filter {name} failed: {type(exc).__name__}"
                self.refuse(message, ErrorType.Unspecified, why, route)
                return
            if context.reply is not None:
                if waiting is not None:
                    _discard(waiting)
                self.filter_reply(f, context.reply, message, route)
                return
            if waiting is not None:
                self._hold(message, route, context, i + 1, waiting)
                return
        mutation = route.request_mutation
        if context.mutation:
            mutation = {**mutation, **context.mutation} if mutation else context.mutation
        if message.message_type is _ONEWAY:
            self._send_oneway(message, route, mutation)
        elif message.message_type is _STREAM_INIT:
            open_stream(self, message, route, mutation)
        else:
            self._dispatch(message, route, mutation)

    def filter_reply(
        self,
        f: Filter,
        reply: LocalReply,
        message: Metadata,
        route: CompiledRoute,
        start: float | None = None,
    ) -> None:
        """Answer a request as filter ``f`` decided (``context.local_reply``), flagged as the
        reply says or else as its kind of policy does (``RESPONSE_FLAGS``)."""
        text = reply.message or f.name
        flags = reply.flags or RESPONSE_FLAGS.get(f.name)
        self.refuse(message, reply.error, text, route, flags, start)

    def refuse(
        self,
        message: Metadata,
        error: ErrorType,
        text: str,
        route: CompiledRoute,
        flags: str | None = None,
        start: float | None = None,
    ) -> None:
        """Answer a request before the router (a filter's decision, ``start``: when a held
        request's hold began): a local reply, or for a one-way message, which gets no reply,
        only its count; ``DownstreamClosed`` for either once the client has left."""
        if message.message_type is _ONEWAY:
            route.local.count_oneway("DownstreamClosed" if self.closed else error.name)
        else:
            self.local_reply(message, error, text, route, None, start, None, flags)

    def _hold(
        self,
        message: Metadata,
        route: CompiledRoute,
        context: RequestContext,
        resume_at: int,
        waiting: Awaitable[object],
    ) -> None:
        """A filter holds the request until ``waiting`` completes (bounded by the route's
        timeout); meanwhile it counts as pending, against every pending limit."""
        engine = self.engine
        if self.at_limit():
            _discard(waiting)
            self.refuse(message, ErrorType.OverLimit, self._over_limit(), route)
            return
        hold = Hold(self, message, route, context, resume_at, asyncio.ensure_future(waiting))
        if message.message_type is _STREAM_INIT:
            hold_init(self, message)  # its stream's frames wait for it
        engine.pending += 1
        self.inflight += 1
        self.inflight_bytes += hold.size
        engine.buffered += hold.size
        engine.deadlines.add(hold, monotonic(), route.timeout)
        if self.holds is None:
            self.holds = set()
        self.holds.add(hold)
        hold.future.add_done_callback(hold.resume)

    def release(self, hold: Hold) -> None:
        """Stop counting a held request as pending."""
        hold.done = True
        if self.holds is not None:
            self.holds.discard(hold)
        engine = self.engine
        engine.pending -= 1
        self.inflight -= 1
        self.inflight_bytes -= hold.size
        engine.buffered -= hold.size

    def _respond(
        self,
        route: CompiledRoute,
        request: Metadata,
        status: ResponseStatus,
        attributes: Attributes | None,
        local_error: ErrorType | None,
        target: Target | None = None,
        host: UpstreamHost | None = None,
    ) -> None:
        """Show an answer to the route's response filters (their errors are counted only)."""
        context = ResponseContext(
            request,
            route.name,
            self.listener.name,
            status,
            attributes,
            local_error,
            "" if target is None else target.name,
            "" if host is None else host.key,
        )
        for f in route.response_filters:
            try:
                f.on_response(context)
            except Exception:
                self.listener.count_filter_error(f)

    # -- mirroring and retries -----------------------------------------------------------------

    def _mirror(self, message: Metadata, route: CompiledRoute, mutation: Mutation | None) -> None:
        """Send a copy of ``message`` to the route's mirror; its reply is dropped. Never
        delays or fails the primary request: a copy that cannot go at once is dropped."""
        mirror = route.mirror
        assert mirror is not None
        if mirror.percent < 100 and random.random() * 100 >= mirror.percent:
            return
        target = mirror.target
        cluster = target.cluster
        if cluster is not None and cluster.retired:  # routed before a reload
            cluster = cluster.serving()
        engine = self.engine
        sink = engine.mirror_sink
        if cluster is None:
            sink.count(target, "ClusterNotFound")
            return
        host = cluster.balancer.pick(message, self)
        if host is None:
            sink.count(target, "NoHealthyUpstream")
            return
        if cluster.request_limits and cluster.over_pool_limits(host) is not None:
            sink.count(target, "Dropped")  # the mirror cluster's circuit breaker is open
            return
        if sink.inflight >= sink.limit or engine.buffered > engine.max_buffered:
            sink.count(target, "Dropped")
            return
        try:
            conn = (
                cluster.shared_connection(host, False)
                if cluster.shared
                else self._dedicated(cluster, host, None, False)
            )
        except CodecUnavailable:  # counted and logged as the codec's bug
            sink.count(target, "UpstreamConnectFailure")
            return
        if conn is None:  # maxConnections or the budget: counted as a request's refusal is
            cluster.refused()
            sink.count(target, "Dropped")
            return
        if conn.write_paused or (cluster.stream_cap and conn.full()):  # a copy never waits
            sink.count(target, "Dropped")
            return
        host = conn.host
        now = monotonic()
        p = Pending(sink, message, route, target, host, conn, now)
        try:
            conn.send(p, mutation)
        except Exception as exc:
            engine.codec_bugs.report(conn.codec, "encode", exc, "mirror copy dropped")
            sink.count(target, "BadRequest")
            return
        p.request = RELEASED  # written: the copy needs nothing of the frame, counted nowhere
        sink.inflight += 1
        host.active += 1
        if host.load is not None:
            host.load.active += 1
        engine.deadlines.add(p, now, route.timeout)

    def _retry(
        self,
        route: CompiledRoute,
        condition: str,
        tries: int,
        started: float,
        cluster: Cluster | None,
        held: int = 0,
        ended: int = 0,
    ) -> bool:
        """Whether a request that failed with ``condition`` (on ``cluster``) gets another
        try: the route retries on it, tries are left, time is left, and the cluster's
        ``retryBudget`` or ``maxRetries`` circuit breaker is closed. ``held``: the failed try
        was itself a retry (1), whose place among the cluster's retries in flight is free
        once it ended, as Envoy frees it before it decides the next; ``ended``: the failed
        try is still among the cluster's requests in flight (1), which a budget counts
        without it."""
        retries = route.retries
        if (
            retries is None
            or tries >= retries.attempts
            or condition not in retries.retry_on
            or self.closed
        ):
            return False
        if cluster is not None and cluster.limits_retries:
            budget = cluster.retry_budget
            # A budget's share of the requests in flight and those waiting for room on a
            # connection (Envoy's active and pending), kept as a count (``Load``).
            if budget is None:
                limit = cluster.max_retries
            else:
                assert cluster.load is not None  # kept with a budget
                limit = budget.allowed(cluster.load.active + cluster.queued - ended)
            if cluster.retrying - held >= limit:
                cluster.overflow("maxRetries" if budget is None else "retryBudget")
                return False
        if tries and monotonic() - started >= route.timeout:
            return False
        self.listener.count_retry(route.name, condition)
        return True

    def _per_try_timeout(self, route: CompiledRoute, started: float, now: float) -> float | None:
        """This try's ``perTryTimeout``; ``None`` when it has none or the route's own
        timeout ends first (the try runs until the route's deadline)."""
        retries = route.retries
        assert retries is not None
        per_try = retries.per_try_timeout
        if per_try is None or per_try >= route.timeout - (now - started):
            return None
        return per_try

    def _retry_allowed(self, p: Pending, condition: str) -> bool:
        """:meth:`_retry` for ``p``, judged on the cluster its retry goes to: that of its try
        (``p.conn.cluster``), or the one a reload replaced it with since; ``p``'s own place
        among the retries (and the requests) in flight is free only on the cluster that
        counted it."""
        tried = p.conn.cluster
        cluster = tried.serving()
        here = cluster is tried
        return self._retry(
            p.route, condition, p.tries, p.start, cluster, here and p.tries > 0, here
        )

    def _retry_pending(self, p: Pending, condition: str) -> bool:
        """Send ``p`` again (a new try) instead of answering it; ``False``: answer it."""
        if not self._retry_allowed(p, condition):
            return False
        request = self._settle(p)
        self._dispatch(request, p.route, p.mutation, p.tries + 1, p.start, p.host)
        return True

    def _retry_error(self, p: Pending) -> bool:
        """Send ``p`` again after the upstream answered it with an ``Error`` status, when its
        route retries on ``error``; ``False``: answer it. The outlier detector sees the error
        of a try that is retried as it sees the last try's answer (in :meth:`_reply`), and
        before the retry picks an endpoint: an ejection it causes steers the retry away."""
        if not self._retry_allowed(p, "error"):
            return False
        host = p.host
        if host.outlier is not None:
            host.outlier.observe(host, _ERROR_STATUS)
        request = self._settle(p)
        self._dispatch(request, p.route, p.mutation, p.tries + 1, p.start, host)
        return True

    def at_limit(self) -> bool:
        """Whether a new request must be refused: a pending limit (process or connection) or
        the overload budget (buffered bytes or RSS) is reached. :meth:`_over_limit` says
        which."""
        engine = self.engine
        return (
            engine.pending >= engine.max_pending
            or self.inflight >= engine.max_pending_per_connection
            or engine.buffered > engine.max_buffered
            or engine.rss_over
        )

    def _over_limit(self) -> str:
        """Why a request is refused with ``OverLimit`` (off the hot path)."""
        engine = self.engine
        if engine.pending >= engine.max_pending:
            return f"too many pending requests ({engine.max_pending})"
        if self.inflight >= engine.max_pending_per_connection:
            limit = engine.max_pending_per_connection
            return f"too many pending requests on this connection ({limit})"
        if engine.rss_over:
            return "proxy overloaded: resident memory above overload.maxRssBytes"
        return f"proxy overloaded: {engine.buffered} bytes buffered (limit {engine.max_buffered})"

    def _deny(self, message: Metadata, policy: str) -> None:
        """Answer a request an AuthorizationPolicy denied (``policy``, or ``none``: no ALLOW
        rule matched); a one-way message is counted only."""
        if message.message_type is _ONEWAY:
            self.listener._unrouted.count_oneway(ErrorType.PermissionDenied.name)
            return
        details = f"rbac_access_denied_matched_policy[{policy}]"
        self.local_reply(message, ErrorType.PermissionDenied, DENIED, details=details)

    def _oneway(self, message: Metadata) -> None:
        authz = self.authz
        if authz is not None and (policy := authz.denies(self, message.attributes)) is not None:
            self._deny(message, policy)
            return
        route = self._route(message.attributes)
        if route is None:
            self.listener._unrouted.count_oneway(ErrorType.RouteNotFound.name)
            return
        if route.request_filters:  # one-way messages pass the chain too (rate limit, ...)
            self._filter(message, route, 0, None)
            return
        self._send_oneway(message, route, route.request_mutation)

    def _send_oneway(
        self, message: Metadata, route: CompiledRoute, mutation: Mutation | None
    ) -> None:
        """The router for a one-way message: forwarded, never retried, counted."""
        target = route.pick()
        cluster = target.cluster
        if cluster is not None and cluster.retired:  # routed before a reload
            cluster = cluster.serving()
        host = None if cluster is None else cluster.balancer.pick(message, self)
        if cluster is None or host is None:
            status = ErrorType.ClusterNotFound if cluster is None else ErrorType.NoHealthyUpstream
            target.count_oneway(status.name)
            return
        engine = self.engine
        if engine.buffered > engine.max_buffered or engine.rss_over:
            target.count_oneway(ErrorType.OverLimit.name)
            return
        try:
            shared = cluster.shared
            conn = cluster.shared_connection(host) if shared else self._dedicated(cluster, host)
        except CodecUnavailable:  # counted and logged as the codec's bug
            target.count_oneway(ErrorType.UpstreamConnectFailure.name)
            return
        if conn is None or (cluster.stream_cap and len(conn.pending) >= conn.max_id):
            # (The second: a codec of one id, in flight on every connection that may be
            # used, which leaves none for a one-way message; see ``stream_cap``.)
            if conn is None:
                cluster.refused()
            target.count_oneway(ErrorType.OverLimit.name)
            return
        try:
            conn.send_oneway(message, mutation)
        except Exception as exc:  # the codec cannot write this request: nobody to tell
            engine.codec_bugs.report(conn.codec, "encode", exc, "one-way message dropped")
            target.count_oneway(ErrorType.BadRequest.name)
            return
        if conn.write_paused:
            self.block_on(conn)
        target.count_oneway("Forwarded")

    def _dedicated(
        self,
        cluster: Cluster,
        host: UpstreamHost,
        avoid: UpstreamHost | None = None,
        reclaim: bool = True,
    ) -> UpstreamConnection | None:
        """This client's connection to ``host``, opened if it has none and the limits allow;
        past the process's upstream connection budget, one it has to another endpoint of the
        cluster instead (see :meth:`_reuse`), else (``reclaim``: not for a mirror's copy)
        one opened in the place of the connection idle longest of any client's (see
        ``Engine.reclaim_upstream``). ``None``: no connection for the request."""
        key = (cluster.name, host.key)
        conn = self.dedicated.get(key)
        if conn is None or conn.closed:
            fresh = None
            if not cluster.may_open():
                reused = self._reuse(cluster, avoid)
                if reused is not None or not reclaim:
                    return reused
                # Built before another client's idle connection is closed for it: a codec
                # that cannot be built (CodecUnavailable) costs nobody's connection.
                fresh = host.connection_class(cluster, host, self)
                if not cluster.may_reclaim():
                    return None
            dedicated = self.dedicated
            if dedicated and not self.engine.upstream_room(self.engine.clients_without_upstream()):
                # Fair share: a client that has connections opens more only while the
                # budget keeps one for each client that has none; else it reuses its own.
                reused = self._reuse(cluster, avoid)
                if reused is not None:
                    return reused
            conn = fresh if fresh is not None else host.connection_class(cluster, host, self)
            if not dedicated:
                self.engine.clients_with_upstream += 1
            dedicated[key] = conn
            conn.connect()
        return conn

    def _reuse(self, cluster: Cluster, avoid: UpstreamHost | None) -> UpstreamConnection | None:
        """A connection this client already has to another endpoint of ``cluster`` (not
        ejected, not ``avoid``, taking requests), for a request that may not open one for
        the process's upstream connection budget (used up, or its fair share taken): served
        a little off balance rather than refused. ``None`` when the cluster's own
        ``maxConnections`` refused (its overflow stays as in Envoy) or the client has none."""
        if cluster.at_max_connections():
            return None
        for conn in self.dedicated.values():
            if (
                conn.cluster is cluster
                and not (conn.closed or conn.retiring)
                and conn.host is not avoid
                and not conn.host.ejected
            ):
                return conn
        return None

    def upstream_closed(self, conn: UpstreamConnection) -> None:
        """A dedicated upstream connection went away."""
        key = (conn.cluster.name, conn.host.key)
        dedicated = self.dedicated
        if dedicated.get(key) is conn:
            del dedicated[key]
            if not dedicated:
                self.engine.clients_with_upstream -= 1

    # -- completion ----------------------------------------------------------------------------

    def _settle(self, p: Pending) -> Metadata:
        """Stop ``p``'s clock and counts; its request, which ``p`` lets go of (see
        ``upstream.RELEASED``)."""
        p.done = True  # also stops its deadline
        request = p.request
        p.request = RELEASED
        del self.waiting[p]
        engine = self.engine
        host = p.host
        host.active -= 1
        if host.load is not None:
            host.load.active -= 1
        if p.tries:  # the cluster that counted it (after a reload, not the route's own)
            p.conn.cluster.retrying -= 1
        self.inflight -= 1
        self.inflight_bytes -= p.held
        engine.buffered -= p.held
        engine.pending -= 1
        if engine.draining and engine.pending == 0:
            engine.requests_drained()
        return request

    def finish(self, p: Pending, response: Metadata, batch: list[Downstream]) -> None:
        """Queue the response to ``p`` (response mutation and original id applied).

        The bytes wait in ``self.out``; this connection is added to ``batch`` and the caller
        flushes every connection of the batch once it has decoded all it read, so pipelined
        responses leave in one write.

        A reply that cannot carry the route's response mutation (the codec raises
        :class:`MutationError`: an error reply without headers, a header-less transport) is
        forwarded unchanged and counted in ``metaprotocol_mutations_skipped_total``: a real
        reply is never replaced by a local error because of a mutation.
        """
        if self.closed:
            self._reply(p, None, 0, response.response_status, batch)
            return
        if (
            p.route.retries is not None
            and response.response_status is _ERROR_STATUS
            and self._retry_error(p)
        ):
            return
        codec = self.codec
        request_id = p.request.request_id if p.conn.shared else None
        mutation = p.route.response_mutation
        try:
            try:
                encoded: Encoded = codec.encode(response, mutation, request_id=request_id)
            except MutationError:
                if mutation is None:
                    raise
                encoded = codec.encode(response, None, request_id=request_id)
                self.listener.count_skipped_mutation(p.route.name)
        except Exception as exc:  # the codec cannot write this response
            why = self.engine.codec_bugs.report(codec, "encode", exc, "answered BadResponse")
            self._bad_response(p, f"cannot encode response: {why}", batch)
            return
        self._reply(
            p, encoded, len(response.frame), response.response_status, batch, response.attributes
        )

    def forward(
        self, p: Pending, frame: bytes, status: ResponseStatus, batch: list[Downstream]
    ) -> None:
        """Queue a reply to ``p`` that the codec peeked at: no response mutation applies, so
        only the id is put back (shared connections). Batched as :meth:`finish` does."""
        if self.closed:
            self._reply(p, None, 0, status, batch)
            return
        if p.route.retries is not None and status is _ERROR_STATUS and self._retry_error(p):
            return
        try:
            encoded = self.codec.relabel(frame, p.request.request_id) if p.conn.shared else frame
        except Exception as exc:  # the codec cannot write this response
            why = self.engine.codec_bugs.report(self.codec, "relabel", exc, "answered BadResponse")
            self._bad_response(p, f"cannot relabel response: {why}", batch)
            return
        self._reply(p, encoded, len(frame), status, batch)

    def _bad_response(self, p: Pending, message: str, batch: list[Downstream]) -> None:
        """Answer ``p`` with a local ``BadResponse``: counted as that, not as the reply's
        status."""
        try:
            reply = self.codec.on_error(p.request, LocalError(ErrorType.BadResponse, message))
        except Exception as exc:  # a bug in the codec: nothing can answer ``p``
            self.codec_failed("on_error", exc)
            self._reply(p, None, 0, None, batch)
            return
        if not reply:  # the same bug, without an exception
            self.empty_error_reply(ErrorType.BadResponse)
            self._reply(p, None, 0, None, batch)
            return
        self.listener.count_local(ErrorType.BadResponse)
        self._reply(p, reply, len(reply), None, batch)

    def _reply(
        self,
        p: Pending,
        encoded: Encoded | None,
        size: int,
        status: ResponseStatus | None,
        batch: list[Downstream],
        attributes: Attributes | None = None,
    ) -> None:
        """Settle ``p``, count it and queue ``encoded``.

        ``encoded`` ``None``: the client left (counted ``DownstreamClosed``); ``status``
        ``None``: a local ``BadResponse`` replaced the reply.
        """
        request = self._settle(p)  # first: a draining connection closes once nothing is in flight
        if encoded is not None:
            engine = self.engine
            if (self.write_paused or engine.buffered > engine.max_buffered) and (
                reason := self._overflows(size)
            ):
                # Closed instead of queued: the client never gets this reply, as it never
                # gets those of its other requests, and it counts as they do.
                self.shut(reason)
                encoded, size = None, 0
        if encoded is None:
            p.target.count("DownstreamClosed")
            status_name = "DownstreamClosed"
        else:
            if status is None:
                p.target.count(ErrorType.BadResponse.name)
                status_name = ErrorType.BadResponse.name
            else:
                counter = p.target.responses[status]
                if counter is None:
                    counter = p.target.response_counter(status)
                counter.value += 1
                status_name = _STATUS_NAMES[status]
            out = self.out
            if not out:
                batch.append(self)
            self.out_size += size
            self.engine.buffered += size  # until flush() measures what the transport kept
            if type(encoded) is bytes:  # the usual case, without a call (see append_encoded)
                out.append(encoded)
            else:
                append_encoded(out, encoded, size)
        if encoded is None and self.draining and self.inflight == 0:
            self.flush()  # what is queued, then the close
        outlier = p.host.outlier
        if outlier is not None and status is not None:
            outlier.observe(p.host, status)
        route = p.route
        if route.response_filters:
            self._respond(
                route,
                request,
                ResponseStatus.Error if status is None else status,
                attributes if route.decode_replies else None,
                ErrorType.BadResponse if status is None else None,
                p.target,
                p.host,
            )
        elapsed = monotonic() - p.start
        ms = elapsed * 1000.0
        slot = bisect_left(DURATION_BUCKETS_MS, ms)  # once, for both duration histograms
        target = p.target
        durations = target.duration
        durations.counts[slot] += 1
        durations.sum += ms
        telemetry = target.telemetry
        if telemetry is not None:
            ids = self.istio if telemetry.inbound else p.conn.istio
            series = telemetry.ok.get((p.host, ids)) if status_name == "Ok" else None
            if series is None:
                series = telemetry.series(p.host, p.host.labels, status_name, None, ids)
            series.record_at(slot, ms, p.size, size)
        log = self.engine.access_log
        if log is not None and log.wants(status_name, elapsed):
            log.log(
                self.listener.name,
                p.route.name,
                target.name,
                status_name,
                elapsed,
                request.request_id,
                request.message_type.name,
                p.host.key,
                "-",  # an answer from upstream: no flag
                None,
                self.client,
                p.size,
                size,
                request.attributes,
                self._dry_run(request),
            )

    def _observe_local(
        self,
        target: Target,
        outcome: str,
        elapsed: float,
        request: Metadata,
        reply_size: int,
        flags: str | None,
        host: UpstreamHost | None,
    ) -> None:
        """Durations and Istio's series for an answer the engine gave (or could not give)."""
        target.observe(elapsed * 1000.0)
        telemetry = target.telemetry
        if telemetry is not None:
            labels = None if host is None else host.labels
            # (at the client side: what the endpoint's last connection presented)
            ids = self.istio if telemetry.inbound or host is None else host.istio
            series = telemetry.series(host, labels, outcome, flags, ids)
            series.record(elapsed * 1000.0, len(request.frame), reply_size)

    def _overflows(self, size: int) -> str | None:
        """Why a reply of ``size`` must close this client instead of being queued: it would
        take its unsent bytes past ``connectionBufferMaxBytes`` (``write_overflow``), or the
        process is over its buffer budget and the client, already behind, would go past
        ``connectionBufferBytes`` (``overload``). ``None``: queue it."""
        self._account_unsent()
        engine = self.engine
        behind = self.unsent + self.out_size
        if behind + size > engine.connection_buffer_max:
            return "write_overflow"
        if (
            behind
            and behind + size > engine.connection_buffer
            and engine.buffered > engine.max_buffered
        ):
            return "overload"
        return None

    # -- streams (see ``streams``) --------------------------------------------------------------

    def stream_started(self, size: int) -> None:
        """A stream opened: it counts as in flight (a drain or a half-close waits for it),
        its ``Stream_Init`` frame (kept for its error reply) as held."""
        self.inflight += 1
        self.inflight_bytes += size
        self.engine.buffered += size

    def stream_ended(self, size: int) -> None:
        """A stream ended (``size``: its ``Stream_Init`` frame's)."""
        self.inflight -= 1
        self.inflight_bytes -= size
        self.engine.buffered -= size
        if self.draining and self.inflight == 0:
            self.flush()  # writes what is queued, then closes

    def queue_frame(self, frame: bytes) -> None:
        """Queue a stream's frame for the client (written by the next :meth:`flush`); a
        client too far behind is closed instead, as for a reply."""
        if self.closed:
            return
        size = len(frame)
        engine = self.engine
        if (self.write_paused or engine.buffered > engine.max_buffered) and (
            reason := self._overflows(size)
        ):
            self.shut(reason)
            return
        self.out.append(frame)
        self.out_size += size
        engine.buffered += size

    def flush(self) -> None:
        """Write the queued responses (and close if draining and idle)."""
        out = self.out
        self.out = []
        self.engine.buffered -= self.out_size
        self.out_size = 0
        transport = self.transport
        if transport is not None and not self.closed and out:
            if len(out) == 1:
                transport.write(out[0])
            else:
                transport.writelines(out)
            self._account_unsent()
        if self.draining and self.inflight == 0:
            self.close()

    def fail(self, p: Pending, error: ErrorType, message: str) -> None:
        """Answer ``p`` locally (upstream reset, connect failure, timeout), or try again when
        its route retries on that failure."""
        if p.host.outlier is not None and error in _RETRY_CONDITIONS:
            p.host.outlier.gateway_error(p.host)
        if p.route.retries is not None and not self.closed:
            condition = _RETRY_CONDITIONS.get(error)
            if condition is not None and self._retry_pending(p, condition):
                return
        request = self._settle(p)
        if self.closed:  # the client left first, or was closed: nothing to answer
            p.target.count("DownstreamClosed")
            elapsed = monotonic() - p.start
            self._observe_local(p.target, "DownstreamClosed", elapsed, request, 0, None, p.host)
            if p.route.response_filters:  # nothing answered: status Unknown, no local error
                unknown = ResponseStatus.Unknown
                self._respond(p.route, request, unknown, None, None, p.target, p.host)
            if self.draining and self.inflight == 0:
                self.close()
            return
        self.local_reply(request, error, message, p.route, p.target, p.start, p.host)
        if self.draining and self.inflight == 0:
            self.close()

    def timeout(self, p: Pending) -> None:
        """``p`` got no response within its route's timeout (or its try's)."""
        conn = p.conn
        self.fail(p, ErrorType.Timeout, f"no response within {p.route.timeout:g}s")
        conn.forget(p)  # after the local reply or the retry, which need the request

    def local_reply(
        self,
        request: Metadata,
        error: ErrorType,
        message: str,
        route: CompiledRoute | None = None,
        target: Target | None = None,
        start: float | None = None,
        host: UpstreamHost | None = None,
        flags: str | None = None,
        details: str | None = None,
    ) -> None:
        """Send the codec's error reply for ``request`` and count it (``flags``: Istio's
        ``response_flags`` when not the error type's own, e.g. a rate limit's ``RL``;
        ``details``: the access log's ``response_code_details``)."""
        if request.message_type is _STREAM_INIT:
            init_refused(self, request)  # the frames that waited for it, and later ones
        listener = self.listener
        if target is None:
            target = listener._unrouted if route is None else route.local
        transport = self.transport
        elapsed = 0.0 if start is None else monotonic() - start
        if transport is None or self.closed:
            self._unanswered(request, route, target, elapsed, host)
            return
        try:
            reply = self.codec.on_error(request, LocalError(error, message))
        except Exception as exc:  # a bug in the codec: nothing can answer ``request``
            self.codec_failed("on_error", exc)
            self._unanswered(request, route, target, elapsed, host)
            return
        if not reply:  # the same bug, without an exception: the client would wait in vain
            self.empty_error_reply(error)
            self._unanswered(request, route, target, elapsed, host)
            return
        listener.count_local(error)
        target.count(error.name)
        transport.write(reply)
        self._account_unsent()  # a client that reads nothing may get many of them per read
        self._observe_local(target, error.name, elapsed, request, len(reply), flags, host)
        if route is not None and route.response_filters:
            self._respond(route, request, ResponseStatus.Error, None, error, target, host)
        log = self.engine.access_log
        if log is not None and log.wants(error.name, elapsed):
            log.log(
                listener.name,
                route.name if route else "",
                target.name if target else "",
                error.name,
                elapsed,
                request.request_id,
                request.message_type.name,
                "" if host is None else host.key,
                flags if flags is not None else RESPONSE_FLAGS.get(error.name, "-"),
                details,
                self.client,
                len(request.frame),
                len(reply),
                request.attributes,
                self._dry_run(request),
            )

    def _unanswered(
        self,
        request: Metadata,
        route: CompiledRoute | None,
        target: Target,
        elapsed: float,
        host: UpstreamHost | None,
    ) -> None:
        """Count a local answer nobody gets: the client left, or is being closed."""
        target.count("DownstreamClosed")
        self._observe_local(target, "DownstreamClosed", elapsed, request, 0, None, host)
        if route is not None and route.response_filters:
            unknown = ResponseStatus.Unknown
            self._respond(route, request, unknown, None, None, target, host)

    def codec_failed(self, method: str, exc: Exception) -> None:
        """The codec raised ``exc`` from ``method``, not a ``CodecError``: a bug in it (see
        ``codec_bugs``), reached by this client's bytes. As after bytes the codec cannot
        resynchronise on: nothing more is read, and the connection closes (after what is
        queued for it) once the requests in flight are answered; counted ``codec_error``."""
        self.engine.codec_bugs.report(self.codec, method, exc, _AFTER_CODEC_BUG)
        self._end_after_codec_bug()

    def empty_error_reply(self, error: ErrorType) -> None:
        """The codec's ``on_error`` returned no bytes to answer ``error`` (the contract calls
        an empty reply a bug): as when it raises, logged, counted and the connection ended,
        rather than a client left waiting for its own timeout."""
        self.engine.codec_bugs.misbehaved(
            self.codec,
            "on_error",
            f"returned an empty reply to answer {error.name} (the protocol's error reply is owed)",
            _AFTER_CODEC_BUG,
        )
        self._end_after_codec_bug()

    def _end_after_codec_bug(self) -> None:
        """Read no more; close once the requests in flight are answered (``codec_error``)."""
        if self.closed:
            return
        if not self.read_done:  # not already ending (a half-close, an unanswerable frame)
            self.listener.closed_by["codec_error"].value += 1
            self._stop_reading()
        if not self.inflight:
            self.draining = True
            self.flush()  # writes what is queued, then closes
        elif not self.draining:
            self.draining = True
            self._drain_streams()

    def _dry_run(self, request: Metadata) -> dict[str, dict[str, str]] | None:
        """For the access log: what the listener's dry-run AuthorizationPolicies decide for
        ``request`` (``None``: it has none, or a reload since left the connection's verdict
        to be made at its next request)."""
        owner = self.listener.authz
        verdict = self.authz
        if owner is None or not owner.logged or not isinstance(verdict, Verdict):
            return None
        return verdict.dry_run_outcome(request.attributes)

    def _refuse(self, exc: CodecError, error: ErrorType, close: bool) -> None:
        """A frame the codec refused: answer it when it has an id. Without an id nothing can
        answer it, and skipping it would leave its client waiting for good: so, as without a
        way to resynchronise (``close``), read nothing more and close once the requests
        already forwarded are answered (counted ``unanswerable``, not as a local reply)."""
        listener = self.listener
        listener.decode_errors.value += 1
        if exc.metadata is not None:
            self.local_reply(exc.metadata, error, str(exc))
        else:
            listener.closed_by["unanswerable"].value += 1
            close = True
        if close:
            self._stop_reading()
            if self.inflight:
                self.draining = True
                self._drain_streams()
            else:
                self.close()


def _discard(waiting: Awaitable[object]) -> None:
    """Drop an awaitable a filter returned for a request that will not wait after all."""
    if isinstance(waiting, asyncio.Future):
        waiting.cancel()
    elif asyncio.iscoroutine(waiting):
        waiting.close()


class Hold:
    """A request a filter holds (``on_request`` returned an awaitable)."""

    __slots__ = (
        "context",
        "deadline",
        "done",
        "downstream",
        "future",
        "request",
        "resume_at",
        "route",
        "size",
        "verdict",
    )

    def __init__(
        self,
        downstream: Downstream,
        request: Metadata,
        route: CompiledRoute,
        context: RequestContext,
        resume_at: int,
        future: asyncio.Future[Any],
    ) -> None:
        self.downstream = downstream
        self.request = request
        self.route = route
        self.context = context
        self.resume_at = resume_at
        self.future = future
        #: What it holds, in the buffer budget (as a request in flight, see ``Pending``).
        self.size = held_bytes(request)
        self.done = False
        self.deadline = 0.0
        #: The connection's verdict when held: a reload since (another verdict) makes the
        #: request be judged again when let go.
        self.verdict = downstream.authz

    def resume(self, future: asyncio.Future[Any]) -> None:
        """The awaitable completed: go on with the chain (or answer, if it failed)."""
        if self.done:  # timed out first
            return
        downstream = self.downstream
        downstream.release(self)
        route = self.route
        start = self.deadline - route.timeout
        if downstream.closed:  # counted DownstreamClosed, as any request whose client left
            downstream.refuse(self.request, ErrorType.Unspecified, "", route, None, start)
            return
        if future.cancelled() or future.exception() is not None:
            why = "a filter's wait failed"
            downstream.refuse(self.request, ErrorType.Unspecified, why, route, None, start)
        elif (reply := self.context.reply) is not None:  # the filter decided after its wait
            f = route.request_filters[self.resume_at - 1]
            downstream.filter_reply(f, reply, self.request, route, start)
        elif (authz := downstream.authz) is not self.verdict and (
            authz is not None and (policy := authz.denies(downstream, self.request.attributes))
        ):
            downstream._deny(self.request, policy)  # a reload's policies deny it now
        else:
            downstream._filter(self.request, route, self.resume_at, self.context)
        downstream.close_if_done()

    def expire(self) -> None:
        """The route's timeout passed while held: ``Timeout``."""
        if self.done:
            return
        downstream = self.downstream
        downstream.release(self)
        self.future.cancel()
        route = self.route
        message = f"held by a filter for longer than {route.timeout:g}s"
        start = self.deadline - route.timeout
        downstream.refuse(self.request, ErrorType.Timeout, message, route, None, start)
        downstream.close_if_done()
