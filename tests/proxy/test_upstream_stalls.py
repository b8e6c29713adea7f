"""An upstream that accepts and then reads nothing (or stops reading) must not keep what the
engine wrote to it: ``timeouts.upstreamWrite`` bounds how long an upstream connection may hold
unsent bytes without progress, and one whose every request timed out behind such bytes goes at
the next sweep. Real sockets: the upstream is a listening socket with a small ``SO_RCVBUF``
whose connections are read (or not) as each test says."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from proxy_kit import Client, address, engine_for, error_type, mesh, run, until

from metaprotocol_sdk import Metadata
from metaprotocol_sdk.examples.kv import RESPONSE, KVCodec, build_frame
from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.upstream import UpstreamConnection

#: Requests of this size, this many: more than the kernel buffers of a loopback connection
#: (``tcp_wmem`` grows the engine's send buffer to 4 MiB) take, so the rest waits in the
#: engine's transport.
BODY = 200_000
COUNT = 48
#: What the engine may still hold once all is answered (nothing in flight, nothing unsent).
SETTLED = 4096
BOUND = 30.0  # every test as a whole


class Backend:
    """A real upstream on 127.0.0.1: connection ``i`` (from 0) is handled as ``modes[i]``
    (the last mode for any later one): ``stall`` never reads; ``serve`` reads and answers
    every request at once; ``slow`` reads ``CHUNK`` bytes each ``TICK`` and answers, until
    :attr:`stop_slow` is set, then reads nothing more."""

    CHUNK = 16 * 1024
    TICK = 0.01

    def __init__(self, modes: list[str]) -> None:
        self.modes = modes
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.answered = 0
        self.stop_slow = asyncio.Event()
        self.slow_stopped_at = 0.0
        self.tasks: list[asyncio.Task[None]] = []
        self.tasks.append(asyncio.get_running_loop().create_task(self._accept()))

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            conn.setblocking(False)
            mode = self.modes[min(len(self.accepted), len(self.modes) - 1)]
            self.accepted.append(conn)
            if mode != "stall":
                self.tasks.append(loop.create_task(self._read(conn, mode == "slow")))

    async def _read(self, conn: socket.socket, slow: bool) -> None:
        loop = asyncio.get_running_loop()
        codec = KVCodec()
        buffer = bytearray()
        while True:
            if slow:
                if self.stop_slow.is_set():
                    self.slow_stopped_at = loop.time()
                    return  # keeps the socket, reads nothing more
                await asyncio.sleep(self.TICK)
                try:
                    data = conn.recv(self.CHUNK)
                except BlockingIOError:
                    continue
            else:
                data = await loop.sock_recv(conn, 256 * 1024)
            if not data:
                return
            buffer += data
            while isinstance(msg := codec.decode(buffer), Metadata):
                if msg.message_type.name == "Request":
                    await loop.sock_sendall(conn, build_frame(RESPONSE, msg.request_id))
                    self.answered += 1

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        for conn in self.accepted:
            conn.close()
        self.sock.close()


def _config(port: int, timeouts: str, route_timeout: str, dedicated: bool = False) -> str:
    router = f"""\
    - name: all
      route: [{{destination: {{host: svc.test, subset: v1}}}}]
      timeout: {route_timeout}
    """
    codec = {"protocol": "kvnr", "codec": "proxy_test_codecs:NoRewriteKVCodec"}
    return mesh(
        [(port, "v1")],
        router=router,
        proxy=f"timeouts: {timeouts}\n",
        **(codec if dedicated else {}),
    )


def _only_upstream(engine: Engine) -> UpstreamConnection | None:
    return next(iter(engine.upstreams), None) if len(engine.upstreams) == 1 else None


def _closed(engine: Engine, reason: str) -> int:
    return engine.stats.total("metaprotocol_upstream_connections_closed_total", reason=reason)


def _local(engine: Engine, kind: str) -> int:
    return engine.stats.total("metaprotocol_local_replies_total", type=kind)


async def _send_all(c: Client) -> tuple[list[int], list[asyncio.Future[Metadata]]]:
    body = b"b" * BODY
    futures = [c.start("put", body=body) for _ in range(COUNT)]
    return list(range(1, COUNT + 1)), futures


async def _replies(futures: list[asyncio.Future[Metadata]]) -> list[Metadata]:
    return list(await asyncio.wait_for(asyncio.gather(*futures), BOUND / 2))


def test_an_upstream_that_reads_nothing_is_aborted_after_upstream_write() -> None:
    """Shared connections: the first connection is never read. Once its transport holds
    bytes the upstream did not take for ``upstreamWrite``, it is aborted: the requests on it
    get ``UpstreamReset`` (with their own ids), the client blocked behind it reads again, the
    rest go through on a fresh connection, and the bytes are given back. Before, the
    connection kept ~5 MB and the client stayed blocked until the route timeout and after."""

    async def main() -> None:
        backend = Backend(["stall", "serve"])
        text = _config(backend.port, "{upstreamWrite: 300ms}", "20s")
        async with engine_for(text) as engine:
            try:
                c = await Client.connect(address(engine))
                ids, futures = await _send_all(c)
                stalled = await until(lambda: _only_upstream(engine), "the first connection")
                await until(lambda: stalled.unsent > 0, "bytes waiting for the upstream")
                assert engine.buffered > 64 * 1024
                replies = await _replies(futures)
                assert [m.request_id for m in replies] == ids
                kinds = [error_type(m) for m in replies]
                reset = kinds.count("UpstreamReset")
                # the requests sent on the stalled connection, then those on the fresh one
                assert 0 < reset < COUNT and kinds == ["UpstreamReset"] * reset + [None] * (
                    COUNT - reset
                ), kinds
                assert stalled.closed and stalled not in engine.upstreams
                assert len(backend.accepted) == 2 and backend.answered == COUNT - reset
                assert _closed(engine, "write_timeout") == 1
                assert _closed(engine, "write_abandoned") == 0
                assert _local(engine, "UpstreamReset") == reset
                assert _local(engine, "Timeout") == 0
                await until(lambda: engine.buffered <= SETTLED, "the bytes given back")
                await until(lambda: stalled.transport is None, "the stalled socket closed")
                c.close()
            finally:
                await backend.close()

    run(main(), timeout=BOUND)


def test_a_dedicated_connection_whose_requests_all_timed_out_goes_at_the_next_sweep() -> None:
    """Per-client connections: every request on the never-read connection times out (the
    client gets ``Timeout`` for each, with its id). Its bytes now belong to nobody, and the
    upstream took none of them since the last sweep: the connection is aborted then, long
    before ``upstreamWrite`` (1 minute here). The client's later requests go through on a
    fresh connection. Before, the bytes and the blocked client stayed for good."""

    async def main() -> None:
        backend = Backend(["stall", "serve"])
        text = _config(backend.port, "{upstreamWrite: 1m}", "300ms", dedicated=True)
        async with engine_for(text) as engine:
            try:
                c = await Client.connect(address(engine))
                ids, futures = await _send_all(c)
                stalled = await until(lambda: _only_upstream(engine), "the first connection")
                await until(lambda: stalled.unsent > 0, "bytes waiting for the upstream")
                replies = await _replies(futures)
                assert [m.request_id for m in replies] == ids
                kinds = [error_type(m) for m in replies]
                timed_out = kinds.count("Timeout")
                assert 0 < timed_out < COUNT and kinds == ["Timeout"] * timed_out + [None] * (
                    COUNT - timed_out
                ), kinds
                assert stalled.closed
                assert _closed(engine, "write_abandoned") == 1
                assert _closed(engine, "write_timeout") == 0
                assert _local(engine, "Timeout") == timed_out
                assert _local(engine, "UpstreamReset") == 0
                await until(lambda: engine.buffered <= SETTLED, "the bytes given back")
                assert error_type(await c.call("get")) is None  # still a fresh connection
                assert len(backend.accepted) == 2
                c.close()
            finally:
                await backend.close()

    run(main(), timeout=BOUND)


def test_a_slow_upstream_that_makes_progress_is_not_aborted() -> None:
    """An upstream that reads 16 KiB every 10 ms is slower than the client: the engine holds
    unsent bytes for it the whole time, for many times ``upstreamWrite``, and it is not
    aborted, since every sweep sees progress. When it stops reading altogether it is, within
    ``upstreamWrite`` and a sweep; what was still on it gets ``UpstreamReset``."""

    async def main() -> None:
        backend = Backend(["slow", "serve"])
        text = _config(backend.port, "{upstreamWrite: 200ms}", "20s")
        async with engine_for(text) as engine:
            try:
                c = await Client.connect(address(engine))
                ids, futures = await _send_all(c)
                slow = await until(lambda: _only_upstream(engine), "the first connection")
                loop = asyncio.get_running_loop()
                start = loop.time()
                held = ticks = 0
                while loop.time() - start < 1.2:  # six times upstreamWrite
                    await asyncio.sleep(0.02)
                    ticks += 1
                    transport = slow.transport
                    held += transport is not None and transport.get_write_buffer_size() > 0
                assert held > ticks * 0.8, (held, ticks)  # it was behind all along
                assert 0 < backend.answered < COUNT
                assert not slow.closed and _closed(engine, "write_timeout") == 0
                backend.stop_slow.set()
                replies = await _replies(futures)
                assert [m.request_id for m in replies] == ids
                kinds = [error_type(m) for m in replies]
                reset = kinds.count("UpstreamReset")
                first = kinds.index("UpstreamReset")  # answered by the slow reader before
                assert first > 0 and kinds == [None] * first + ["UpstreamReset"] * reset + [
                    None
                ] * (COUNT - first - reset), kinds
                assert backend.answered == COUNT - reset
                assert slow.closed and _closed(engine, "write_timeout") == 1
                assert _local(engine, "UpstreamReset") == reset
                await until(lambda: engine.buffered <= SETTLED, "the bytes given back")
                c.close()
            finally:
                await backend.close()

    run(main(), timeout=BOUND)


def test_upstream_write_defaults_to_the_write_timeout() -> None:
    """Unset, ``timeouts.upstreamWrite`` is ``timeouts.write``: one bound for any peer that
    does not read what the engine writes; set, it is its own (and shortens the sweep)."""
    text = mesh([(1, "v1")], proxy="timeouts: {write: 7s}\n")
    assert Engine(loads_config(text)).upstream_write_timeout == 7.0
    text = mesh([(1, "v1")], proxy="timeouts: {write: 7s, upstreamWrite: 2s}\n")
    assert Engine(loads_config(text)).upstream_write_timeout == 2.0


def test_a_retired_connection_closing_with_bytes_unsent_is_aborted() -> None:
    """A connection that reached ``maxRequestsPerConnection`` closes once its last request
    is answered or timed out; but a close waits until what is queued is sent, which for an
    upstream that reads nothing is never: the connection stayed, with its bytes counted. Now
    the sweep aborts one that took nothing since the previous sweep."""
    router = """\
    - name: all
      route: [{destination: {host: svc.test, subset: v1}}]
      timeout: 300ms
    """
    traffic = "{connectionPool: {http: {maxRequestsPerConnection: 1}}}"

    async def main() -> None:
        backend = Backend(["stall", "serve"])
        text = mesh(
            [(backend.port, "v1")],
            router=router,
            traffic_policy=traffic,
            proxy="timeouts: {upstreamWrite: 1m}\n",
        )
        async with engine_for(text) as engine:
            try:
                c = await Client.connect(address(engine))
                big = c.start("put", body=b"b" * 6_000_000)  # more than the kernel takes
                stalled = await until(lambda: _only_upstream(engine), "the connection")
                assert error_type(await asyncio.wait_for(big, BOUND / 2)) == "Timeout"
                assert stalled.closed and stalled.unsent > 0  # closing, waiting to send
                await until(lambda: not engine.upstreams, "the closing connection aborted")
                assert _closed(engine, "write_abandoned") == 1
                await until(lambda: engine.buffered <= SETTLED, "the bytes given back")
                assert error_type(await c.call("get")) is None  # on a fresh connection
                assert len(backend.accepted) == 2
                c.close()
            finally:
                await backend.close()

    run(main(), timeout=BOUND)
