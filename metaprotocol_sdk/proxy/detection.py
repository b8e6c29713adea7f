"""Istio's PERMISSIVE (and DISABLE) inbound mode: mutual TLS or plain text on one port, told
apart by the first bytes of each connection, as Envoy's ``tls_inspector`` does in a sidecar.

A listener without ``tls`` in an engine with a ``meshIdentity`` follows the mode its
PeerAuthentication gives it (PERMISSIVE by default, as in Istio). STRICT is an
``ISTIO_MUTUAL`` listener and never comes here. PERMISSIVE and DISABLE listeners accept
each connection as a :class:`Detecting`: it holds at most :data:`CLIENT_HELLO_PREFIX` bytes
(less as soon as one of them is not a TLS ClientHello's), then hands the connection, with
what it read, to the loop's TLS layer (PERMISSIVE, over a ``TlsDownstream``: the mesh
identity's server context, client certificates of the mesh required) or to a plain
``Downstream``, which it is from then on: nothing of this runs per request.

A DISABLE listener closes a TLS client at once and cleanly (nothing is written): without
this its first bytes would be read as a frame and answered with the codec's error reply,
which a TLS client reads as garbage.

A client that sends nothing is served as plain text after ``timeouts.handshake`` (Envoy's
``continue_on_listener_filters_timeout``, which Istio sets): a client that connects early
and sends later (a pre-connected pool) is not closed for it; from then on it is a plain
connection, whose idle and frame timeouts apply. The engine never speaks first, so no
protocol it serves waits for it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

from .codec_bugs import CodecUnavailable
from .downstream import Downstream, Refused
from .tls import tls_layer

if TYPE_CHECKING:
    from .downstream import ListenerRuntime
    from .stats import Counter, Stats

#: Bytes looked at: a TLS record header (type 22 handshake, version 3.x, length) and the
#: handshake message's type (1, ClientHello).
CLIENT_HELLO_PREFIX = 6
#: Largest record length of a TLS plaintext record (RFC 8446, 5.1).
MAX_RECORD = 1 << 14
#: ``metaprotocol_downstream_connections_detected_total{result}`` of each mode: ``mtls`` (a
#: ClientHello, handed to the TLS handshake), ``plain``, ``timeout`` (nothing telling within
#: ``timeouts.handshake``: served as plain text), ``closed`` (the client left first), and on
#: DISABLE listeners ``tls_refused`` (a ClientHello, closed).
RESULTS = {
    "PERMISSIVE": ("mtls", "plain", "timeout", "closed"),
    "DISABLE": ("tls_refused", "plain", "timeout", "closed"),
}


def client_hello(data: bytes) -> bool | None:
    """Whether ``data`` begins a TLS record holding a ClientHello: ``False`` at the first
    byte that says not, ``None`` while the bytes so far could still begin one."""
    n = len(data)
    if n >= 1 and data[0] != 0x16:  # handshake record
        return False
    if n >= 2 and data[1] != 0x03:  # SSL 3.0 to TLS 1.3 all write 3.x
        return False
    if n >= 3 and data[2] > 0x04:
        return False
    if n >= 5 and not 0 < (data[3] << 8 | data[4]) <= MAX_RECORD:
        return False
    if n >= 6:
        return data[5] == 0x01  # ClientHello
    return None


class Detection:
    """A PERMISSIVE or DISABLE listener's detection: its mode and its series."""

    __slots__ = ("counts", "listener", "mode", "stats")

    def __init__(self, stats: Stats, listener: str, mode: str) -> None:
        self.mode = mode
        self.stats = stats
        self.listener = listener
        self.counts: dict[str, Counter] = {}
        for result in RESULTS[mode]:
            self.count(result, 0)

    def count(self, result: str, n: int = 1) -> None:
        """Count a connection's ``result`` (a result of the other mode, when a reload changed
        the listener's while it was detecting, makes its series then)."""
        counter = self.counts.get(result)
        if counter is None:
            counter = self.counts[result] = self.stats.counter(
                "metaprotocol_downstream_connections_detected_total",
                listener=self.listener,
                result=result,
            )
        counter.value += n


def attach_detection(runtime: ListenerRuntime, mode: str | None) -> None:
    """Make a listener's connections detect TLS first (PERMISSIVE, DISABLE); ``None`` or
    STRICT: as they were."""
    if mode in RESULTS:
        assert mode is not None
        runtime.detect = Detection(runtime.engine.stats, runtime.name, mode)


def detecting(runtime: ListenerRuntime, detection: Detection) -> asyncio.BaseProtocol:
    """The protocol of a new connection of a detecting listener. One the engine refuses
    (``maxConnections``, overload, draining) is closed before anything is read."""
    reason = runtime.engine.refuse_connection()
    if reason is not None:
        return Refused(runtime.rejected[reason])
    return Detecting(runtime, detection)


class Detecting(asyncio.Protocol):
    """A connection whose first bytes are not read yet. It counts against
    ``limits.maxConnections`` (as one of the engine's ``handshaking``) from the accept: from
    when it is made, not from ``connection_made``, which the event loop calls a turn later,
    after it has accepted the rest of a burst (asyncio makes a whole backlog's protocols
    first: counted at ``connection_made``, a burst of 200 got past a ``maxConnections`` of
    10, and stayed for ``timeouts.handshake``)."""

    __slots__ = ("detection", "held", "listener", "started", "timer", "transport")

    def __init__(self, runtime: ListenerRuntime, detection: Detection) -> None:
        self.listener = runtime
        self.detection = detection
        self.transport: asyncio.Transport | None = None
        #: The bytes read so far (fewer than CLIENT_HELLO_PREFIX).
        self.held = b""
        engine = runtime.engine
        engine.handshaking.add(self)
        self.started = engine.loop.time()
        #: ``None`` once no longer detecting (handed on, closed, aborted).
        self.timer: asyncio.TimerHandle | None = engine.loop.call_later(
            engine.handshake_timeout, self._timed_out
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        made = cast(asyncio.Transport, transport)
        if self.timer is None:  # aborted (a stop, a reload) before the loop made it
            made.abort()
            return
        self.transport = made

    def data_received(self, data: bytes) -> None:
        held = self.held + data if self.held else data
        verdict = client_hello(held[:CLIENT_HELLO_PREFIX])
        if verdict is None:
            self.held = held
        elif verdict:
            self._tls(held)
        else:
            self._plain(held, "plain")

    def eof_received(self) -> bool | None:
        """The client ended its side before its bytes said: what it sent is read as plain
        text, and the plain connection answers the half-close as usual."""
        if not self.held:
            self._settle("closed")
            self.transport = None  # (counted: not again when it is lost)
            return None  # the transport closes itself
        downstream = self._plain(self.held, "plain")
        if downstream is None or downstream.closed or downstream.transport is None:
            return None
        return downstream.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:  # not handed on
            self._settle("closed")
        self.transport = None

    def abort(self) -> None:
        """Reset the connection (the engine stops, or a reload changed the listener's codec),
        also before the loop has made its transport."""
        if self.timer is None:
            return  # no longer detecting
        self._settle(None)
        transport = self.transport
        if transport is not None:
            self.transport = None  # no client's doing: not counted when it is lost
            transport.abort()

    # -- the verdict -------------------------------------------------------------------------

    def _settle(self, result: str | None) -> None:
        """No longer detecting: count ``result`` (``None``: nothing, an abort)."""
        self.listener.engine.handshaking.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if result is not None:
            self.detection.count(result)
        self.held = b""

    def _refuse(self, transport: asyncio.Transport) -> None:
        """The connection's codec could not be built: closed (a FIN), nothing answered."""
        self.listener.rejected["codec_error"].value += 1
        transport.close()

    def _timed_out(self) -> None:
        self.timer = None
        if self.transport is not None:
            self._plain(self.held, "timeout")
        else:  # the loop never made its transport (its accept failed): forget it
            self._settle(None)

    def _plain(self, data: bytes, result: str) -> Downstream | None:
        """Hand the connection to a plain :class:`Downstream` (it judges the connection
        against the limits again, as every plain one), then ``data``."""
        transport = self.transport
        self._settle(result)
        if transport is None:
            return None
        self.transport = None
        try:
            downstream = Downstream(self.listener)
        except CodecUnavailable:  # counted and logged as the codec's bug
            self._refuse(transport)
            return None
        transport.set_protocol(downstream)
        downstream.connection_made(transport)
        if data and not downstream.closed:
            downstream.data_received(data)
        return downstream

    def _tls(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        runtime = self.listener
        context = runtime.tls
        if self.detection.mode != "PERMISSIVE" or context is None:
            self._settle("tls_refused")
            self.transport = None
            transport.close()  # a FIN: nothing was written
            return
        self._settle("mtls")
        self.transport = None
        engine = runtime.engine
        remaining = self.started + engine.handshake_timeout - engine.loop.time()
        try:
            layer = tls_layer(runtime, context, max(remaining, 0.001))
        except CodecUnavailable:  # counted and logged as the codec's bug
            self._refuse(transport)
            return
        layer = cast(asyncio.BufferedProtocol, layer)
        transport.set_protocol(layer)
        layer.connection_made(transport)
        view = memoryview(data)
        while view:  # the loop's TLS layers read into their own buffer
            buffer = memoryview(layer.get_buffer(len(view)))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            layer.buffer_updated(size)
            view = view[size:]
