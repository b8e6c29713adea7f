"""A canned-response upstream: frames each request and answers with a pre-built reply that
carries the request's id. Nothing else, so the proxy under test dominates the cost.

    python bench/proxy/upstream.py {thrift|dubbo} REPLY_BYTES [DELAY_SECONDS]

Binds 127.0.0.1 on an ephemeral port, prints ``READY <port>``, exits when stdin closes. With
``DELAY_SECONDS`` (the soak's slow upstream) each reply is written that long after its request.
"""

from __future__ import annotations

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tls
from wire import REPLIES, WIRES, Wire


class CannedProtocol(asyncio.Protocol):
    """Answers every complete request frame with the canned reply."""

    def __init__(self, wire: Wire, reply: bytes, delay: float = 0.0) -> None:
        self.wire = wire
        self.delay = delay
        id_at, id_size = wire.id_offset(reply)
        self.head, self.tail = reply[:id_at], reply[id_at + id_size :]
        self.id_size = id_size
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's own class

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        wire, header = self.wire, self.wire.header_size
        out = []
        pos = 0
        end = len(buf)
        while end - pos >= header:
            size = wire.frame_size(buf, pos)
            if end - pos < size:
                break
            id_at, id_size = wire.id_offset(buf, pos)
            out += (self.head, buf[id_at : id_at + id_size], self.tail)
            pos += size
        if pos:
            del buf[:pos]
        if out and self.transport is not None:
            if self.delay:
                loop = asyncio.get_running_loop()
                loop.call_later(self.delay, self._write, b"".join(out))
            else:
                self.transport.write(b"".join(out))

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


async def serve(protocol: str, reply_bytes: int, delay: float = 0.0) -> None:
    """Serve until stdin closes."""
    loop = asyncio.get_running_loop()
    reply = REPLIES[protocol](reply_bytes)
    server = await loop.create_server(
        lambda: CannedProtocol(WIRES[protocol], reply, delay),
        "127.0.0.1",
        0,
        backlog=4096,
        ssl=tls.server_context(),
    )
    port = server.sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


def main() -> None:
    """Entry point."""
    import uvloop

    delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    uvloop.run(serve(sys.argv[1], int(sys.argv[2]), delay))


if __name__ == "__main__":
    main()
