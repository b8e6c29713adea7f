"""The event loop's own TLS layer of a connection, keeping its raw transport and telling the
connection above it when that transport's writing is paused or resumed.

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
from typing import Any, cast

log = logging.getLogger("metaprotocol.proxy")

_HANDSHAKES: dict[type[Any], type[Any]] = {}


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

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.raw = cast(asyncio.Transport, transport)
            super().connection_made(transport)

        def pause_writing(self) -> None:
            self.raw_paused = True
            super().pause_writing()
            if self.watcher is not None:
                self.watcher.raw_flow(False)

        def resume_writing(self) -> None:
            self.raw_paused = False
            # The layer hands on what it held at once: the transport may pause again in
            # there (reported first); the word after it is the transport's state now.
            super().resume_writing()
            if self.watcher is not None:
                self.watcher.raw_flow(not self.raw_paused)

    return Handshake


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
