"""The floor for a Python proxy: a bare uvloop pass-through that frames messages and nothing
else (one upstream connection per downstream connection, no routing, ids untouched).

    python bench/proxy/passthrough.py {thrift|dubbo} UPSTREAM_PORT

Prints ``listening ... on 127.0.0.1:PORT`` and runs until stdin closes.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from typing import Any, Protocol

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tls
from wire import WIRES, Wire


class Framer(asyncio.Protocol):
    """Forwards whole frames to ``peer``."""

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.peer: Framer | None = None
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []
        # A large frame is gathered as a list of chunks and joined once, instead of growing
        # a bytearray chunk by chunk (which copies the frame over and over).
        self.chunks: list[bytes] = []
        self.have = 0
        self.need = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.have + len(data) < self.need:
            self.chunks.append(data)
            self.have += len(data)
            return
        if self.chunks:
            data = b"".join([*self.chunks, data])  # one copy for a whole large frame
            self.chunks.clear()
        wire, header = self.wire, self.wire.header_size
        pos, end = 0, len(data)
        while end - pos >= header:
            size = wire.frame_size(data, pos)
            if end - pos < size:
                break
            pos += size
        if pos:
            frames = data if pos == end else memoryview(data)[:pos]
            peer = self.peer
            if peer is not None and peer.transport is not None:
                peer.transport.write(frames)
            else:
                self.early.append(bytes(frames))
        if pos < end:
            rest = data[pos:] if pos else data
            self.chunks.append(rest)
            self.have = len(rest)
            self.need = wire.frame_size(rest, 0) if len(rest) >= header else header
        else:
            self.have = self.need = 0

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class Paired(Protocol):
    """What :func:`serve_pairs` needs of a connection: its transport, its peer, and what it
    received before the peer existed."""

    peer: Any
    transport: asyncio.Transport | None
    early: list[bytes]


async def serve_pairs(make: Callable[[], Paired], label: str, upstream_port: int) -> None:
    """Accept downstream connections and pair each with an upstream connection of its own
    (both made by ``make``); print ``listening LABEL on 127.0.0.1:PORT``; run until stdin
    closes."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    client = tls.client_context()
    server_name = tls.SERVER_NAME if client is not None else None

    def downstream() -> asyncio.BaseProtocol:
        down = make()

        async def connect() -> None:
            up_transport, up = await loop.create_connection(  # type: ignore[type-var]
                make, "127.0.0.1", upstream_port, ssl=client, server_hostname=server_name
            )
            up.peer, down.peer = down, up
            for data in down.early:
                up_transport.write(data)
            down.early.clear()

        task = loop.create_task(connect())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return down  # type: ignore[return-value]

    server = await loop.create_server(
        downstream, "127.0.0.1", 0, backlog=4096, ssl=tls.server_context()
    )
    print(f"listening {label} on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)


def main() -> None:
    """Entry point."""
    import uvloop

    wire = WIRES[sys.argv[1]]
    uvloop.run(serve_pairs(lambda: Framer(wire), "bench", int(sys.argv[2])))


if __name__ == "__main__":
    main()
