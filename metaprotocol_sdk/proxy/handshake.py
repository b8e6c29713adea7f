"""The event loop's own TLS layer of a connection, keeping its raw transport and telling the
connection above it when that transport's writing is paused or resumed; and the TLS object
of a listener's connections (:class:`HalfClosing`), which makes the ends of a connection
ones a client can read.

Interpreted on purpose (never in the compiled build's module list): the class it makes
subclasses the loop's TLS protocol (uvloop's, or asyncio's), which a mypyc-compiled module
cannot do in a function, and which no compiled class may be the base of.

uvloop's ``SSLProtocol`` is not a public API: its constructor is checked once, with the
arguments the engine gives it, and if a uvloop release changed it, asyncio's own TLS
protocol (which runs over any transport, uvloop's too) is used instead, with a warning.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import logging
import ssl
import weakref
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger("metaprotocol.proxy")

_HANDSHAKES: dict[type[Any], type[Any]] = {}
#: The TLS layer whose connection_made is making its TLS object (see HalfClosing._create).
_making: Any = None
#: A TLS 1.2 record in the clear (type alert, version 3.3, 2 bytes): a fatal (2)
#: ``access_denied`` (49) alert (see HalfClosing).
ACCESS_DENIED = bytes((21, 3, 3, 0, 2, 2, 49))


def handshake_class(loop: asyncio.AbstractEventLoop) -> type[Any]:
    """The loop's own TLS protocol (uvloop's on uvloop, asyncio's otherwise), extended to
    keep its raw transport (to abort a handshake when the engine stops, to count what that
    transport holds) and to tell its ``watcher`` of that transport's flow control."""
    base: type[Any] = asyncio.sslproto.SSLProtocol
    try:
        import uvloop.loop

        if isinstance(loop, uvloop.loop.Loop):
            base = uvloop.loop.SSLProtocol
    except ImportError:  # pragma: no cover - uvloop is optional
        pass
    cached = _HANDSHAKES.get(base)
    if cached is None:
        chosen = base
        if base is not asyncio.sslproto.SSLProtocol and not _constructs(base, loop):
            log.warning(
                "this uvloop's TLS protocol takes other arguments than the engine gives it: "
                "TLS listeners use asyncio's (slower) instead"
            )
            chosen = asyncio.sslproto.SSLProtocol
        cached = _HANDSHAKES[base] = _keeping_raw(chosen)
    return cached


def _keeping_raw(base: type[Any]) -> type[Any]:
    class Handshake(base):  # type: ignore[misc]
        """The TLS layer of one connection.

        The layer hands all it encrypts to the TCP transport under it at once and counts only
        what it still holds; its own writing pauses when that transport is full, and resumes
        when it drained, without a word to the connection above. ``watcher.raw_flow(resumed)``
        is that word (``resumed``: the transport is not paused once the layer handed on what
        it held): the connection judges its unsent bytes on both counts."""

        raw: asyncio.Transport | None = None
        watcher: Any = None
        #: The TCP transport paused this layer's writing (it will say when it drained).
        raw_paused = False
        #: Bytes written on the TCP transport before the handshake begins: an upstream
        #: connection's PROXY protocol header (``trafficPolicy.proxyProtocol``).
        preface = b""

        # The layer makes its TLS object in one of these (asyncio's in __init__, uvloop's in
        # connection_made): the object learns its layer then (HalfClosing._create).

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            global _making
            _making = self
            try:
                super().__init__(*args, **kwargs)
            finally:
                _making = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            global _making
            self.raw = cast(asyncio.Transport, transport)
            if self.preface:
                self.raw.write(self.preface)
            _making = self
            try:
                super().connection_made(transport)
            finally:
                _making = None

        def pause_writing(self) -> None:
            self.raw_paused = True
            super().pause_writing()
            if self.watcher is not None:
                self.watcher.raw_flow(False)

        def eof_received(self) -> bool | None:
            # The TCP transport's end of input. After the peer's close_notify it changes
            # nothing (the connection is answering what it was sent, see HalfClosing): the
            # layer would otherwise end it at once.
            if self.watcher is not None and self.watcher.keeps_raw_open():
                return True
            return cast("bool | None", super().eof_received())

        def resume_writing(self) -> None:
            self.raw_paused = False
            # The layer hands on what it held at once: the transport may pause again in
            # there (reported first); the word after it is the transport's state now.
            super().resume_writing()
            if self.watcher is not None:
                self.watcher.raw_flow(not self.raw_paused)

    return Handshake


class HalfClosing(ssl.SSLObject):
    """The TLS object of a listener's connection (its context's ``sslobject_class``): it
    makes the ends of a connection what a client can read.

    * A failed handshake: OpenSSL's alert saying why (``certificate required``, ``unknown
      ca``, ...) is sent; the loop's TLS layer would drop it as it resets the connection.
    * A client certificate the listener's names or pins refuse (``watcher.refuses``, asked
      as the handshake completes, before the layer sends anything more): the handshake
      fails. With TLS 1.2 the client reads why, an ``access_denied`` alert, sent in the
      clear in place of the engine's ``ChangeCipherSpec`` and ``Finished`` (the engine had
      not yet turned on its encryption); a TLS 1.3 client has finished its side, and no
      alert can be sent without the keys OpenSSL keeps: it is reset, at its first read.
    * The peer's close_notify is the TLS form of a TCP half-close: the client sent all it
      will, and waits for its replies. The layer, reading it, would end the connection's
      writing at once and drop them; here ``peer.tls_half_close()`` is told instead, and
      the layer reads on as if nothing came. TLS lets the engine write after receiving it
      (TLS 1.3 says so; OpenSSL does so with TLS 1.2 too), and the layer sends the engine's
      own close_notify when the connection closes.
    """

    #: The connection told of the peer's close_notify (``None``: the layer's own handling).
    peer: Any = None
    #: The peer's close_notify was seen and the connection took it.
    half_closed = False
    #: The server name the client sent (``None``: none; kept by ``tls._keep_sni``).
    sni: str | None = None
    #: The TLS layer (``Handshake``) that made this object (weakly: the layer holds this
    #: object, and a cycle would outlive the connection until a collection), and its
    #: outgoing buffer.
    layer: weakref.ref[Any] | None = None
    outgoing: ssl.MemoryBIO | None = None

    @classmethod
    def _create(
        cls,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
        context: ssl.SSLContext | None = None,
    ) -> HalfClosing:
        made = cast(
            HalfClosing,
            super()._create(  # type: ignore[misc]
                incoming, outgoing, server_side, server_hostname, session, context
            ),
        )
        if _making is not None:
            made.layer = weakref.ref(_making)
        made.outgoing = outgoing
        return made

    def _layer(self) -> Any:
        return None if self.layer is None else self.layer()

    def do_handshake(self) -> None:
        assert self.outgoing is not None
        try:
            self._sslobj.do_handshake()  # type: ignore[attr-defined]
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError:
            self._send(self.outgoing.read())  # OpenSSL's alert, which it wrote last
            raise
        layer = self._layer()
        why = None if layer is None or layer.watcher is None else layer.watcher.refuses(self)
        if why is not None:
            self.outgoing.read()  # the end of the engine's handshake: never sent
            if self.version() == "TLSv1.2" and not self.session_reused:
                # (A resumed TLS 1.2 handshake has turned the engine's encryption on.)
                self._send(ACCESS_DENIED)
            raise ssl.SSLCertVerificationError(why)

    def _send(self, data: bytes) -> None:
        """Send ``data`` on the TCP transport, before the layer resets the connection."""
        layer = self._layer()
        raw = None if layer is None else layer.raw
        if data and raw is not None and not raw.is_closing():
            raw.write(data)

    def read(self, len: int = 1024, buffer: WriteableBuffer | None = None) -> bytes:
        # SSLObject.read's own body (a call to it would cost each read a frame more).
        ssl_object: Any = self._sslobj  # type: ignore[attr-defined]
        data: bytes = ssl_object.read(len) if buffer is None else ssl_object.read(len, buffer)
        if data or not len:
            return data
        if not self.half_closed:  # the peer's close_notify (OpenSSL reads nothing more)
            peer = self.peer
            if peer is None or not peer.tls_half_close():
                return data
            self.half_closed = True
        raise ssl.SSLWantReadError("the peer sent close_notify")


def _constructs(base: type[Any], loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``base`` takes the arguments ``tls.tls_accept`` (a server's layer) and
    ``TlsUpstreamConnection`` (a client's) give it."""
    sides: tuple[tuple[int, dict[str, Any]], ...] = (
        (ssl.PROTOCOL_TLS_SERVER, {"server_side": True}),
        (ssl.PROTOCOL_TLS_CLIENT, {"server_side": False, "server_hostname": "upstream.test"}),
    )
    try:
        for protocol, side in sides:
            base(
                loop,
                asyncio.Protocol(),
                ssl.SSLContext(protocol),
                None,
                ssl_handshake_timeout=1.0,
                **side,
            )
    except TypeError:
        return False
    return True
