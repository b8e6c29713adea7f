"""The event loop's own TLS layer for a client connection, keeping its raw transport.

Interpreted on purpose (never in the compiled build's module list): the class it makes
subclasses the loop's TLS protocol (uvloop's, or asyncio's), which a mypyc-compiled module
cannot do in a function, and which no compiled class may be the base of.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
from typing import Any, cast

_HANDSHAKES: dict[type[Any], type[Any]] = {}


def handshake_class(loop: asyncio.AbstractEventLoop) -> type[Any]:
    """The loop's own TLS protocol (uvloop's on uvloop, asyncio's otherwise), extended to
    keep its raw transport (to abort a handshake when the engine stops)."""
    base: type[Any] = asyncio.sslproto.SSLProtocol
    try:
        import uvloop.loop

        if isinstance(loop, uvloop.loop.Loop):
            base = uvloop.loop.SSLProtocol
    except ImportError:  # pragma: no cover - uvloop is optional
        pass
    cached = _HANDSHAKES.get(base)
    if cached is None:

        class Handshake(base):  # type: ignore[misc]
            """The TLS layer of one client connection."""

            raw: asyncio.Transport | None = None

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.raw = cast(asyncio.Transport, transport)
                super().connection_made(transport)

        cached = _HANDSHAKES[base] = Handshake
    return cached
