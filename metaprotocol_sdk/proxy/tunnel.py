"""HTTP/1.1 tunnels to upstream endpoints (Istio's ``trafficPolicy.tunnel``, Envoy's tcp_proxy
``tunneling_config``): each connection of such a cluster is made to the endpoint, an HTTP
proxy, asks it for a tunnel to the target (``CONNECT host:port HTTP/1.1``), and carries the
connection's bytes (a TLS handshake too) only once a 2xx response head came.

The response head is parsed sans-IO (:class:`ResponseHead`) and bounded by :data:`HEAD_LIMIT`;
:func:`open_tunnel` runs it on a new TCP connection and hands that connection on, with any
bytes that came after the head, to the connection's own protocol: nothing of this stays on
the data path.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from .config.models import Tunnel

#: Most bytes a proxy's response head may take (status line and headers), as Envoy's
#: HTTP/1 codec's default header limit (60 KiB).
HEAD_LIMIT = 60 * 1024
#: Most characters of a refusing proxy's status line quoted in the message.
QUOTED = 120


class TunnelRefused(Exception):
    """The proxy did not open the tunnel: a non-2xx status, a malformed or an oversized head,
    or the connection ended first. The message says which."""


def request_head(tunnel: Tunnel) -> bytes:
    """The request that opens ``tunnel``: ``CONNECT host:port HTTP/1.1`` and its ``Host``."""
    authority = tunnel.authority
    return f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode("ascii")


class ResponseHead:
    """Reads a proxy's response head, up to ``limit`` bytes (sans-IO)."""

    __slots__ = ("buffer", "limit")

    def __init__(self, limit: int = HEAD_LIMIT) -> None:
        self.buffer = bytearray()
        self.limit = limit

    def feed(self, data: bytes) -> bytes | None:
        """Take ``data``: ``None`` while the head is incomplete, else the bytes after it
        (the tunnel's first bytes). Raises :class:`TunnelRefused` for a non-2xx status, a
        malformed status line or a head over the limit."""
        buffer = self.buffer
        start = max(0, len(buffer) - 3)  # the end may straddle two reads
        buffer += data
        end = buffer.find(b"\r\n\r\n", start)
        if end < 0:
            if len(buffer) > self.limit:
                raise TunnelRefused(
                    f"the proxy's response head exceeds {self.limit} bytes without ending"
                )
            return None
        if end + 4 > self.limit:
            raise TunnelRefused(f"the proxy's response head exceeds {self.limit} bytes")
        self._check(bytes(buffer[: buffer.find(b"\r\n")]))
        rest = bytes(buffer[end + 4 :])
        buffer.clear()
        return rest

    @staticmethod
    def _check(line: bytes) -> None:
        """Accept a ``HTTP/1.x 2xx`` status line, refuse anything else naming it."""
        quoted = repr(line[:QUOTED].decode("latin-1"))
        parts = line.split(b" ", 2)
        if (
            len(parts) < 2
            or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0")
            or len(parts[1]) != 3
            or not parts[1].isdigit()
        ):
            raise TunnelRefused(f"the proxy's response is not HTTP/1.1: {quoted}")
        status = int(parts[1])
        if not 200 <= status < 300:
            raise TunnelRefused(f"the proxy refused the tunnel: status {status} ({quoted})")


class _Opening(asyncio.Protocol):
    """A connection until its tunnel is open (see :func:`open_tunnel`)."""

    def __init__(self, request: bytes, waiter: asyncio.Future[bytes]) -> None:
        self.request = request
        self.waiter = waiter
        self.head = ResponseHead()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.waiter.done():
            return
        try:
            rest = self.head.feed(data)
        except TunnelRefused as exc:
            self.waiter.set_exception(exc)
            return
        if rest is not None:
            assert self.transport is not None
            self.transport.pause_reading()  # until the connection's protocol takes over
            self.waiter.set_result(rest)

    def eof_received(self) -> bool | None:
        self.connection_lost(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.waiter.done():
            self.waiter.set_exception(
                TunnelRefused("the proxy closed the connection before opening the tunnel")
            )


async def open_tunnel(
    loop: asyncio.AbstractEventLoop, address: str, port: int, tunnel: Tunnel
) -> tuple[asyncio.Transport, bytes]:
    """Connect to the proxy at ``address:port`` and open ``tunnel``: the connection (its
    reading paused, its protocol to be set by the caller) and the bytes after the head.
    The caller bounds the time; a failure closes the connection."""
    waiter: asyncio.Future[bytes] = loop.create_future()
    opening = _Opening(request_head(tunnel), waiter)
    transport, _ = await loop.create_connection(lambda: opening, address, port)
    try:
        rest = await waiter
        if transport.is_closing():  # lost between the head and now
            raise TunnelRefused("the proxy closed the connection as it opened the tunnel")
    except BaseException:
        transport.abort()
        raise
    return transport, rest


def connect_error(exc: BaseException) -> str:
    """How a connect (and its tunnel) failed, for ``UpstreamConnectFailure``'s message."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, TunnelRefused):
        return f"tunnel: {exc}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc) or type(exc).__name__


def hand_over(transport: asyncio.Transport, protocol: asyncio.BaseProtocol, rest: bytes) -> None:
    """Give the tunnel's connection to ``protocol``: its ``connection_made``, then the bytes
    that came after the head, then reading resumes."""
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if rest and not transport.is_closing():
        if hasattr(protocol, "get_buffer"):  # a TLS layer (uvloop's is no BufferedProtocol)
            buffered = cast(asyncio.BufferedProtocol, protocol)
            view = memoryview(rest)
            while view:
                into = memoryview(buffered.get_buffer(len(view)))
                n = min(len(into), len(view))
                into[:n] = view[:n]
                buffered.buffer_updated(n)
                view = view[n:]
        else:
            cast(asyncio.Protocol, protocol).data_received(rest)
    if not transport.is_closing():
        transport.resume_reading()
