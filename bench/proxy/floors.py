"""Two floors for large payloads: what any Python proxy on uvloop spends, by how it forwards.

    python bench/proxy/floors.py {frames|chains|stream} {thrift|dubbo} UPSTREAM_PORT

``frames``: the least a proxy that holds each frame whole before forwarding it can do (as the
engine, Envoy's protocol proxies and Aeraki's do). Each connection reads straight into one
receive buffer it reuses (``asyncio.BufferedProtocol``: no per-read ``bytes``, no appends), and
each complete frame is written to the peer as a view of that buffer: no copy in user space at
all. If the transport keeps the view (a write it could not finish), the connection takes a new
buffer instead of overwriting it.

``chains``: holds each frame whole too, but as the chain of the reads' ``bytes`` objects, written
to the peer with ``writelines``: never contiguous, so never copied (Envoy keeps its buffers as
chains of slices the same way). Run it with glibc's allocator told to keep large blocks on the
heap (``GLIBC_TUNABLES``, see :data:`CHAINS_TUNABLES`): by default every read's ``bytes`` above
128 KiB gets its own ``mmap``, and holding a frame's reads costs page faults on every frame.

``stream``: an L4 pass-through like Envoy's tcp_proxy: each read is written to the peer as it
is, without framing, so no frame is ever held whole.

One upstream connection per downstream connection, no routing, ids untouched. Prints
``listening ... on 127.0.0.1:PORT`` and runs until stdin closes.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from passthrough import serve_pairs
from wire import WIRES, Wire

#: Receive buffer of the ``frames`` floor: room for the largest frame the benchmark sends.
CAPACITY = 4 << 20

#: glibc settings the ``chains`` floor runs with: blocks up to 4 MiB from the heap, and the
#: heap not trimmed below 128 MiB, so freed reads are reused rather than unmapped.
CHAINS_TUNABLES = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=134217728"


class Peer(asyncio.BaseProtocol):
    """What both floors share: the paired connection, and writes made before it exists."""

    def __init__(self) -> None:
        self.peer: Peer | None = None
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's own class

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def send(self, data: bytes | memoryview) -> bool:
        """Write ``data`` to the peer; ``True`` if the transport still holds part of it."""
        peer = self.peer
        if peer is None or peer.transport is None:
            self.early.append(bytes(data))
            return False
        peer.transport.write(data)
        return bool(peer.transport.get_write_buffer_size())


class FrameFloor(Peer, asyncio.BufferedProtocol):
    """Reads into a reused buffer and forwards whole frames as views of it."""

    def __init__(self, wire: Wire) -> None:
        super().__init__()
        self.wire = wire
        self.buffer = bytearray(CAPACITY)
        self.view = memoryview(self.buffer)
        self.end = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view[self.end :]

    def buffer_updated(self, nbytes: int) -> None:
        self.end += nbytes
        wire, header = self.wire, self.wire.header_size
        buffer, end = self.buffer, self.end
        pos = 0
        while end - pos >= header:
            size = wire.frame_size(buffer, pos)
            if end - pos < size:
                break
            pos += size
        if not pos:
            return
        held = self.send(self.view[:pos])
        if held:  # the transport keeps a view of this buffer: leave it be
            rest = self.view[pos:end]
            self.buffer = bytearray(CAPACITY)
            self.view = memoryview(self.buffer)
            self.buffer[: len(rest)] = rest
        elif pos < end:
            self.buffer[: end - pos] = self.view[pos:end]
        self.end = end - pos


class ChainFloor(Peer, asyncio.Protocol):
    """Holds each frame as the list of its reads and forwards it with ``writelines``."""

    def __init__(self, wire: Wire) -> None:
        super().__init__()
        self.wire = wire
        self.chain: list[bytes | memoryview] = []
        self.have = 0  # bytes in the chain
        self.need = 0  # size of the frame the chain starts, once its header is in

    def data_received(self, data: bytes) -> None:
        chain, wire = self.chain, self.wire
        chain.append(data)
        self.have += len(data)
        while True:
            if not self.need:
                if self.have < wire.header_size:
                    return
                head = b"".join(chain)[: wire.header_size] if len(chain) > 1 else chain[0]
                self.need = wire.frame_size(bytes(head[: wire.header_size]), 0)
            if self.have < self.need:
                return
            # The frame ends in the last read: split that read (a view, not a copy).
            last = chain[-1]
            cut = len(last) - (self.have - self.need)
            whole, rest = chain[:-1], memoryview(last)[cut:]
            whole.append(memoryview(last)[:cut] if rest else last)
            self.send_chain(whole)
            self.chain = chain = [rest] if rest else []
            self.have, self.need = len(rest), 0
            if not rest:
                return

    def send_chain(self, chain: list[bytes | memoryview]) -> None:
        """Write a whole frame's chain to the peer."""
        peer = self.peer
        if peer is None or peer.transport is None:
            self.early.append(b"".join(chain))
        else:
            peer.transport.writelines(chain)


class StreamFloor(Peer, asyncio.Protocol):
    """Writes each read to the peer as it is."""

    def __init__(self, wire: Wire) -> None:
        super().__init__()

    def data_received(self, data: bytes) -> None:
        self.send(data)


#: The floors by mode.
KINDS: dict[str, Callable[[Wire], Peer]] = {
    "frames": FrameFloor,
    "chains": ChainFloor,
    "stream": StreamFloor,
}


def main() -> None:
    """Entry point."""
    import uvloop

    mode, protocol, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode not in KINDS:
        raise SystemExit(f"mode must be one of {', '.join(KINDS)}, got {mode!r}")
    kind, wire = KINDS[mode], WIRES[protocol]
    uvloop.run(serve_pairs(lambda: kind(wire), mode, port))


if __name__ == "__main__":
    main()
