"""KV streams for the streams benchmark: an echo upstream, a per-stream floor, a load generator.

    python bench/proxy/kvstreams.py upstream
    python bench/proxy/kvstreams.py floor UPSTREAM_PORT
    python bench/proxy/kvstreams.py load HOST:PORT[,HOST:PORT...] --pids PID[,PID...]
        --connections N --streams K --frames F --body BYTES --warmup S --slices N --slice S

``upstream`` answers a stream open with an open of its own, echoes every data frame as it came
and answers a half-close with one; it prints ``READY <port>`` and exits when stdin closes.

``floor`` is the least a Python proxy that gives each stream an upstream connection of its own
can do (as the engine does): it frames KV on both sides, opens a connection at each stream open,
passes every frame on as it came, and closes the connection once both sides half-closed. It
prints ``listening ... on 127.0.0.1:PORT``.

``load`` takes turns as ``loadgen.py``'s slices do. Each of N connections carries K streams at
once. With ``--frames 0`` the streams are opened before the turns and stay open: each is a closed
loop of data frame -> echoed data frame (2 frames through the proxy each). With ``--frames F``
each stream slot runs short streams one after another: open, its answer, F data frames each
echoed in turn, a half-close each way (2F + 4 frames through the proxy), then the next stream.
Counted in frames through the proxy (a short stream's only once it ended); latencies are per echo,
or per whole short stream.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loadgen import Stats, Target, connect, take_turns
from wire import KV, KV_DATA, KV_ERROR, KV_HALF_CLOSE, KV_OPEN, kv_frame

#: Headers of the stream open: the engine's route matches ``method``.
OPEN_HEADERS = {"method": "echo"}


def frames_in(buf: bytes | bytearray) -> tuple[list[tuple[int, int, int, int]], int]:
    """The complete frames at the start of ``buf`` as (start, end, kind, stream id), and where
    they end."""
    out = []
    pos, end = 0, len(buf)
    while end - pos >= 16:
        size = KV.frame_size(buf, pos)
        if end - pos < size:
            break
        out.append((pos, pos + size, buf[pos + 3], int.from_bytes(buf[pos + 4 : pos + 8], "big")))
        pos += size
    return out, pos


class Framed(asyncio.Protocol):
    """Gathers reads into whole frames for :meth:`frames_received`."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's own class

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        frames, pos = frames_in(buf)
        if frames:
            self.frames_received(buf, frames)
            del buf[:pos]

    def frames_received(self, buf: bytearray, frames: list[tuple[int, int, int, int]]) -> None:
        """Whole frames of ``buf`` arrived (``buf`` changes after the call)."""


# --- the echo upstream ---------------------------------------------------------------------


class Echo(Framed):
    """Opens answered with an open, data frames echoed, half-closes answered."""

    def frames_received(self, buf: bytearray, frames: list[tuple[int, int, int, int]]) -> None:
        out: list[bytes | bytearray] = []
        for start, end, kind, sid in frames:
            if kind == KV_DATA:
                out.append(buf[start:end])
            elif kind in (KV_OPEN, KV_HALF_CLOSE):
                out.append(kv_frame(kind, sid))
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


async def serve_upstream() -> None:
    """Serve :class:`Echo` until stdin closes."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", 0, backlog=4096)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


# --- the per-stream floor ------------------------------------------------------------------


class FloorUp(Framed):
    """One stream's upstream connection: its frames go to the client as they came."""

    def __init__(self, down: FloorDown, sid: int) -> None:
        super().__init__()
        self.down, self.sid = down, sid
        self.early: list[bytes] = []
        self.client_closed = self.server_closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.write(b"".join(self.early))  # type: ignore[attr-defined]
        self.early.clear()
        self.end_if_closed()

    def send(self, frame: bytes) -> None:
        """A frame of the stream from the client."""
        if self.transport is None:
            self.early.append(frame)
        else:
            self.transport.write(frame)

    def frames_received(self, buf: bytearray, frames: list[tuple[int, int, int, int]]) -> None:
        down = self.down.transport
        if down is not None:
            down.write(bytes(buf[: frames[-1][1]]))
        if any(kind == KV_HALF_CLOSE for _, _, kind, _ in frames):
            self.server_closed = True
            self.end_if_closed()

    def end_if_closed(self) -> None:
        """Close the connection once both sides half-closed."""
        if self.client_closed and self.server_closed and self.transport is not None:
            self.transport.close()
            self.down.streams.pop(self.sid, None)


class FloorDown(Framed):
    """A client connection: each stream open gets a connection of its own."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__()
        self.upstream_port = upstream_port
        self.streams: dict[int, FloorUp] = {}
        self.connecting: set[asyncio.Task[None]] = set()

    def frames_received(self, buf: bytearray, frames: list[tuple[int, int, int, int]]) -> None:
        for start, end, kind, sid in frames:
            up = self.streams.get(sid)
            if kind == KV_OPEN and up is None:
                up = self.streams[sid] = FloorUp(self, sid)
                loop = asyncio.get_running_loop()
                task = loop.create_task(self.connect(up))
                self.connecting.add(task)
                task.add_done_callback(self.connecting.discard)
            if up is None:
                continue
            up.send(bytes(buf[start:end]))
            if kind == KV_HALF_CLOSE:
                up.client_closed = True
                up.end_if_closed()

    async def connect(self, up: FloorUp) -> None:
        """Open ``up``'s connection (its frames wait in it until then)."""
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: up, "127.0.0.1", self.upstream_port)

    def connection_lost(self, exc: Exception | None) -> None:
        for up in self.streams.values():
            if up.transport is not None:
                up.transport.abort()


async def serve_floor(upstream_port: int) -> None:
    """Serve :class:`FloorDown` until stdin closes."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: FloorDown(upstream_port), "127.0.0.1", 0, backlog=4096
    )
    port = server.sockets[0].getsockname()[1]
    print(f"listening per-stream-floor on 127.0.0.1:{port}", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


# --- the load generator --------------------------------------------------------------------


class StreamClient(Framed):
    """One connection carrying ``streams`` streams at once (see the module's docstring)."""

    def __init__(self, stats: Stats, streams: int, frames: int, body: int) -> None:
        super().__init__()
        self.stats = stats
        self.slots = streams
        self.frames = frames
        self.per_stream = 2 * frames + 4
        data = kv_frame(KV_DATA, 0, body=b"x" * body)
        self.data_head, self.data_tail = data[:4], data[8:]
        self.next_sid = 1
        #: Open streams: id -> [data frames echoed, when the stream (or the echo) started].
        self.open: dict[int, list[int]] = {}
        #: Streams with a frame sent and its answer not yet in.
        self.waiting: set[int] = set()
        self.opened = asyncio.Event()
        self.stop = True
        self.drained = asyncio.Event()

    def _data(self, sid: int) -> bytes:
        return self.data_head + sid.to_bytes(4, "big") + self.data_tail

    def _begin(self) -> bytes:
        sid = self.next_sid
        self.next_sid += 1
        self.open[sid] = [0, time.perf_counter_ns()]
        self.waiting.add(sid)
        return kv_frame(KV_OPEN, sid, OPEN_HEADERS)

    async def open_streams(self) -> None:
        """Long-lived streams: open them all and wait for the upstream's answers."""
        assert self.transport is not None
        self.transport.write(b"".join(self._begin() for _ in range(self.slots)))
        await asyncio.wait_for(self.opened.wait(), 30)

    def start(self) -> None:
        """Run the streams until :attr:`stop`."""
        assert self.transport is not None
        self.stop = False
        self.drained.clear()
        if self.frames:
            self.transport.write(b"".join(self._begin() for _ in range(self.slots)))
            return
        now = time.perf_counter_ns()
        for sid, state in self.open.items():
            state[1] = now
            self.waiting.add(sid)
        self.transport.write(b"".join(self._data(sid) for sid in self.open))

    def busy(self) -> bool:
        """Whether a frame sent awaits its answer."""
        return bool(self.waiting)

    def frames_received(self, buf: bytearray, frames: list[tuple[int, int, int, int]]) -> None:
        stats, out = self.stats, []
        now = time.perf_counter_ns()
        for _, _, kind, sid in frames:
            state = self.open.get(sid)
            if state is None or kind == KV_ERROR:  # counted, and the stream given up
                stats.errors += 1
                self.open.pop(sid, None)
                self.waiting.discard(sid)
                if not self.waiting:
                    self.opened.set()
                continue
            if kind == KV_OPEN:
                if not self.frames:
                    self.waiting.discard(sid)
                    if not self.waiting:
                        self.opened.set()
                    continue
                state[0] = 0
                out.append(self._data(sid))
            elif kind == KV_DATA and not self.frames:  # long-lived: one echo, one round trip
                if stats.measuring:
                    stats.done += 2
                    stats.latencies.append(now - state[1])
                if self.stop:
                    self.waiting.discard(sid)
                else:
                    state[1] = now
                    out.append(self._data(sid))
            elif kind == KV_DATA:
                state[0] += 1
                if state[0] < self.frames:
                    out.append(self._data(sid))
                else:
                    out.append(kv_frame(KV_HALF_CLOSE, sid))
            elif kind == KV_HALF_CLOSE:  # a short stream ended
                del self.open[sid]
                self.waiting.discard(sid)
                if stats.measuring:
                    stats.done += self.per_stream
                    stats.latencies.append(now - state[1])
                if not self.stop:
                    out.append(self._begin())
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
        if self.stop and not self.waiting:
            self.drained.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stop:
            self.stats.errors += 1


async def run_load(args: argparse.Namespace) -> None:
    """Connect to every target, open long-lived streams, take turns (``loadgen.take_turns``)."""
    addresses = args.target.split(",")
    pids = [int(p) for p in args.pids.split(",")]
    if len(pids) != len(addresses):
        raise SystemExit("--pids needs one pid (0 for none) per target")
    targets = []
    for address, pid in zip(addresses, pids, strict=True):
        host, _, port = address.rpartition(":")
        stats = Stats()

        def factory(stats: Stats = stats) -> StreamClient:
            return StreamClient(stats, args.streams, args.frames, args.body)

        clients: list[StreamClient] = list(
            await asyncio.gather(
                *(connect(host, int(port), factory) for _ in range(args.connections))
            )
        )
        if not args.frames:
            await asyncio.gather(*(c.open_streams() for c in clients))
        targets.append(Target(clients, stats, pid))
    await take_turns(targets, args)


def main() -> None:
    """Entry point."""
    import uvloop

    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "upstream":
        uvloop.run(serve_upstream())
    elif mode == "floor":
        uvloop.run(serve_floor(int(sys.argv[2])))
    elif mode == "load":
        parser = argparse.ArgumentParser()
        parser.add_argument("target")
        parser.add_argument("--pids", required=True)
        parser.add_argument("--connections", type=int, default=16)
        parser.add_argument("--streams", type=int, default=1, help="streams at once per connection")
        parser.add_argument("--frames", type=int, default=0, help="data frames per short stream")
        parser.add_argument("--body", type=int, default=64)
        parser.add_argument("--warmup", type=float, default=1.0)
        parser.add_argument("--slices", type=int, default=8)
        parser.add_argument("--slice", type=float, default=0.5)
        uvloop.run(run_load(parser.parse_args(sys.argv[2:])))
    else:
        raise SystemExit("usage: kvstreams.py {upstream | floor UPSTREAM_PORT | load ...}")


if __name__ == "__main__":
    main()
