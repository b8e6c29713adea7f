"""What the engine writes to upstreams is memory it holds too: counted, and bounded."""

from __future__ import annotations

import gc
from typing import Any

import uvloop
from proxy_kit import (
    Client,
    FakeTransport,
    Upstream,
    address,
    engine_for,
    error_type,
    gather,
    mesh,
    run,
    until,
    wire_fakes,
)
from test_streams import StreamClient, StreamServer

from metaprotocol_sdk.examples.kv import (
    ONEWAY,
    PING,
    REQUEST,
    STREAM_DATA,
    STREAM_HALF_CLOSE,
    STREAM_OPEN,
    build_frame,
)
from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.downstream import Downstream
from metaprotocol_sdk.proxy.streams import Stream
from metaprotocol_sdk.proxy.upstream import UpstreamConnection

BUDGET = 1024 * 1024  # the smallest maxBufferedBytes allowed
HIGH = 64 * 1024  # asyncio's and uvloop's default high-water mark of a transport


class StuckTransport(FakeTransport):
    """A transport whose peer reads nothing: it keeps every byte and, as asyncio does, pauses
    its protocol past the high-water mark."""

    def __init__(self, protocol: Any) -> None:
        super().__init__()
        self.protocol = protocol
        self.size = 0

    def _add(self, size: int) -> None:
        was = self.size
        self.size += size
        if was <= HIGH < self.size:
            self.protocol.pause_writing()

    def write(self, data: Any) -> None:
        self._add(len(data))

    def writelines(self, data: Any) -> None:
        self._add(sum(len(d) for d in data))

    def get_write_buffer_size(self) -> int:
        return self.size

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default  # no socket: the sweep's write watch sees no kernel counts

    def close(self) -> None:
        if self.protocol is not None:
            protocol, self.protocol = self.protocol, None
            protocol.connection_lost(None)

    abort = close


def _stuck(engine: Engine, up: UpstreamConnection) -> StuckTransport:
    """Put ``up`` on a transport that sends nothing, as one of the engine's connections."""
    stuck = StuckTransport(up)
    up.transport = stuck  # type: ignore[assignment]
    engine.upstreams.add(up)
    return stuck


def _sweep(engine: Engine) -> None:
    """The engine's housekeeping, now (it schedules the next one itself)."""
    assert engine._sweeper is not None
    engine._sweeper.cancel()
    engine._sweep()


def _engine() -> Engine:
    proxy = f"overload: {{maxBufferedBytes: {BUDGET}}}\n"
    return Engine(loads_config(mesh([(1, "v1")], proxy=proxy)))


def _oneways(first: int, n: int) -> bytes:
    return b"".join(
        build_frame(ONEWAY, first + i, {"method": "notify"}, b"e" * 1000) for i in range(n)
    )


def _queued(up: UpstreamConnection) -> int:
    return sum(len(b) for b in up.queued)


def test_oneway_messages_for_a_connecting_upstream_count_against_the_budget() -> None:
    """While an upstream connection opens (up to ``timeouts.connect``), one-way messages
    queue for it and the client is not paused: they must count in ``engine.buffered``, and
    past ``maxBufferedBytes`` be refused. They were neither: 4 MB queued, 0 counted."""

    async def main() -> None:
        engine = _engine()
        await engine.start()
        try:
            down, _, up, _ = wire_fakes(engine)
            host = up.host
            host.conns.remove(up)
            opening = UpstreamConnection(up.cluster, host, None)  # no transport yet
            host.conns.append(opening)
            for i in range(100):  # 100 reads of 40 one-way messages of 1 KiB: 4 MB
                down.data_received(_oneways(40 * i, 40))
            queued = _queued(opening)
            assert engine.buffered >= queued
            assert queued <= BUDGET + 40 * 1100, queued
            assert engine.stats.total("metaprotocol_oneway_total", status="OverLimit") > 0
            opening.connection_made(FakeTransport())  # type: ignore[arg-type]
            assert engine.buffered == 0
        finally:
            await engine.stop(drain=0.1)

    uvloop.run(main())


def test_requests_to_an_upstream_that_does_not_read_stay_counted_and_bounded() -> None:
    """An upstream that reads nothing keeps what was written to it in the engine's transport
    buffer. Each client is paused once that is full, but one that leaves and comes back
    sends one more read each time: the bytes must stay counted after the requests time out,
    and new ones be refused past the budget. Before, 100 clients left 4 MB there, counted 0."""

    async def main() -> None:
        engine = _engine()
        await engine.start()
        try:
            first, _, up, _ = wire_fakes(engine)
            stuck = _stuck(engine, up)
            first.connection_lost(None)
            listener = first.listener
            for i in range(100):  # each client: one read of 40 one-way messages, then gone
                down = Downstream(listener)
                down.connection_made(FakeTransport())  # type: ignore[arg-type]
                down.data_received(_oneways(40 * i, 40))
                up._flush()  # what the loop does after the read
                down.connection_lost(None)
            assert engine.buffered >= stuck.size
            assert stuck.size <= BUDGET + 40 * 1100, stuck.size
            _sweep(engine)  # the exact recount keeps them
            assert engine.buffered >= stuck.size
        finally:
            await engine.stop(drain=0.1)

    uvloop.run(main())


def test_a_client_that_left_is_not_kept_by_the_upstream_it_waited_for() -> None:
    """A client paused for a full shared upstream connection, then gone, stayed in that
    connection's set of clients to wake up (with its codec and buffers) until the upstream
    read again: never, for one that reads nothing. One per client that came and left."""

    async def main() -> None:
        engine = _engine()
        await engine.start()
        try:
            first, _, up, _ = wire_fakes(engine)
            _stuck(engine, up)
            up.pause_writing()
            first.connection_lost(None)
            listener = first.listener
            for i in range(50):
                down = Downstream(listener)
                down.connection_made(FakeTransport())  # type: ignore[arg-type]
                down.data_received(_oneways(i, 1))
                assert down.blocked == {up}
                down.connection_lost(None)
            assert not up._blocked
        finally:
            await engine.stop(drain=0.1)

    uvloop.run(main())


def test_heartbeats_from_an_upstream_that_does_not_read_are_not_answered_without_end() -> None:
    """An upstream sending pings and reading nothing made the engine queue one pong per ping,
    without limit and uncounted (3.2 MB for 200 000 pings); now pongs wait only while the
    upstream's write buffer is below its high-water mark, and count."""

    async def main() -> None:
        engine = _engine()
        await engine.start()
        try:
            _, _, up, _ = wire_fakes(engine)
            stuck = _stuck(engine, up)
            pings = build_frame(PING, 7) * 2000
            for _ in range(100):
                up.data_received(pings)
            name = "metaprotocol_heartbeats_total"
            # Read DECODE_TURN at a time, the loop running in between (see test_loop_turns).
            await until(lambda: engine.stats.total(name, side="upstream") == 200_000, "pings")
            assert stuck.size <= HIGH + 1000, stuck.size
            assert engine.buffered >= stuck.size
        finally:
            await engine.stop(drain=0.1)

    uvloop.run(main())


def test_requests_still_count_while_their_bytes_wait_for_the_upstream() -> None:
    """A two-way request's frame counts until its reply; what the engine queued for a
    stuck upstream stays counted after the request timed out and let go of it."""

    async def main() -> None:
        engine = _engine()
        await engine.start()
        try:
            down, _, up, _ = wire_fakes(engine)
            stuck = _stuck(engine, up)
            body = b"r" * 100_000
            down.data_received(build_frame(REQUEST, 1, {"method": "m"}, body))
            up._flush()
            assert stuck.size > 100_000
            (p,) = up.pending.values()
            down.timeout(p)  # the request times out: its frame is let go of
            assert down.inflight_bytes == 0
            assert engine.buffered >= stuck.size
            _sweep(engine)
            assert engine.buffered >= stuck.size
        finally:
            await engine.stop(drain=0.1)

    uvloop.run(main())


def test_a_mirrored_copy_does_not_keep_its_frame_once_sent() -> None:
    """A mirrored copy waiting for a mirror that does not answer kept the request's frame
    alive after the primary's reply (which stops counting it), until the route's timeout:
    up to 1000 copies (``MIRROR_LIMIT``) x the largest frame, uncounted. Once written, the
    copy needs nothing of it."""
    router = """\
    - name: mirrored
      route: [{destination: {host: svc.test, subset: v1}}]
      mirror: {host: svc.test, subset: v2}
    """

    async def main() -> None:
        primary, mirror = await Upstream("primary").start(), await Upstream("mirror").start()
        mirror.on_message = lambda conn, msg: mirror.received.append(msg)  # type: ignore[method-assign]
        text = mesh([(primary.port, "v1"), (mirror.port, "v2")], router=router)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            body = b"m" * 100_000
            await gather(*(c.start("put", body=body) for _ in range(20)))
            await until(lambda: len(mirror.received) == 20, "the copies at the mirror")
            assert engine.pending == 0 and engine.mirror_sink.inflight == 20
            copies = [p for conn in engine.upstreams for p in conn.pending.values()]
            assert len(copies) == 20
            kept = sum(len(p.request.frame) for p in copies)
            assert kept <= engine.buffered, kept
            c.close()
        await primary.close()
        await mirror.close()

    run(main())


def test_local_and_heartbeat_replies_to_a_client_count_when_written() -> None:
    """Replies the engine writes itself (local errors, heartbeat answers) went straight to the
    client's transport and counted only at the next sweep (up to a second later): a client
    that reads nothing and sends small requests the engine refuses gets about five times what
    it sends (a 16-byte request, an 80-byte error), uncounted meanwhile."""
    router = """\
    - name: only
      match: {attributes: {method: {exact: only}}}
      route: [{destination: {host: svc.test, subset: v1}}]
    """

    async def main() -> None:
        engine = Engine(loads_config(mesh([(1, "v1")], router=router)))
        await engine.start()
        try:
            listener = next(iter(engine.listeners.values()))
            down = Downstream(listener)
            stuck = StuckTransport(down)
            down.connection_made(stuck)  # type: ignore[arg-type]
            refused = b"".join(build_frame(REQUEST, i, {"method": "x"}) for i in range(100))
            down.data_received(refused + build_frame(PING, 1000) * 100)
            assert stuck.size > 100 * 60
            assert engine.buffered >= stuck.size
        finally:
            await engine.stop(drain=0.1)

    uvloop.run(main())


def test_a_retired_shared_connection_closes_when_its_last_request_times_out() -> None:
    """With ``maxRequestsPerConnection``, a shared connection that reached it takes no new
    requests and closes once nothing is in flight; but a request that timed out there never
    closed it: each N requests to an upstream that does not answer left one more connection
    open (its socket, codec and buffers), without end (no idleTimeout: nothing else sweeps)."""
    router = """\
    - name: all
      route: [{destination: {host: svc.test, subset: v1}}]
      timeout: 50ms
    """
    traffic = "{connectionPool: {http: {maxRequestsPerConnection: 1}}}"

    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh([(up.port, "v1")], router=router, traffic_policy=traffic)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            for _ in range(5):
                assert error_type(await c.call("hang")) == "Timeout"
            assert up.accepted == 5
            await until(lambda: not engine.upstreams, "the retired connections closed")
            await until(lambda: not up.connections, "the upstream saw them close")
            c.close()
        await up.close()

    run(main())


def test_a_stream_and_its_connection_are_freed_once_both_are_done() -> None:
    """A stream's upstream connection and the stream held each other, so every stream that
    ended left both (and what they hold: codec, buffers, its ``Stream_Init``, some 13 objects)
    to the cycle collector, which the proxy runs only every 20 000 net allocations (see
    ``cli.proxy._tune_gc``): memory and collector time paid per stream. Once the stream ended
    and its connection closed, reference counting alone frees them (the collector is off here)."""

    async def main() -> None:
        server = await StreamServer().start()
        async with engine_for(mesh([(server.port, "v1")])) as engine:

            def alive() -> list[object]:
                """This engine's streams and upstream connections still in memory."""
                return [
                    o
                    for o in gc.get_objects()
                    if (isinstance(o, UpstreamConnection) and o.engine is engine)
                    or (isinstance(o, Stream) and o.downstream.engine is engine)
                ]

            c = await StreamClient.connect(address(engine))
            gc.collect()
            gc.disable()
            try:
                c.frame(STREAM_OPEN, 5, {"method": "chat"})
                c.frame(STREAM_DATA, 5, {}, b"hi")
                await c.until(5, 2)
                assert len(alive()) == 2  # the stream and its connection
                c.frame(STREAM_HALF_CLOSE, 5)
                await c.until(5, 3)
                await until(lambda: not engine.upstreams, "the stream's connection closed")
                await until(lambda: server.connections[0].lost.done(), "the upstream saw it")
                assert alive() == []
            finally:
                gc.enable()
            c.close()
        await server.close()

    run(main())
