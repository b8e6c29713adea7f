"""Streams under attack: hostile clients and upstreams, and streams with the engine's other
features (filters that hold, limits, reloads, timeouts), over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import ClassVar, TypeVar

from proxy_kit import (
    WAIT,
    Client,
    Upstream,
    address,
    build_frame,
    engine_for,
    error_type,
    mesh,
    run,
    until,
)
from test_streams import (
    StreamClient,
    StreamServer,
    StreamServerConnection,
    active,
    kinds,
    streams,
)

from metaprotocol_sdk import Capabilities, MessageType, Metadata
from metaprotocol_sdk.examples.kv import STREAM_DATA, STREAM_HALF_CLOSE, STREAM_OPEN, KVCodec
from metaprotocol_sdk.filters import Filter, RequestContext
from metaprotocol_sdk.proxy import Engine, loads_config


class ChatHolder(Filter):
    """Holds a ``Stream_Init`` of method ``chat`` until ``gate`` is set (both events are
    made by :meth:`armed`)."""

    name = "chat-holder"
    gate: ClassVar[asyncio.Event]
    holding: ClassVar[asyncio.Event]

    def on_request(self, context: RequestContext) -> Awaitable[object] | None:
        if context.request.operation_name != "chat":
            return None
        ChatHolder.holding.set()
        return ChatHolder.gate.wait()

    @classmethod
    def armed(cls) -> str:
        """New events, and the listener's ``filters`` with this class, named by its own module
        (a copy of it under another name would hold events no test sets)."""
        cls.gate, cls.holding = asyncio.Event(), asyncio.Event()
        return f"filters: [{{name: '{cls.__module__}:{cls.__qualname__}'}}]"


Server = TypeVar("Server", bound=StreamServer)


@contextlib.asynccontextmanager
async def stream_client(
    server: Server,
    router: str | None = None,
    traffic_policy: str = "{}",
    proxy: str = "",
    listener: str = "",
) -> AsyncIterator[tuple[Engine, StreamClient, Server]]:
    """The engine in front of ``server`` (started here; the other arguments are
    :func:`mesh`'s) and a stream client connected to it; all closed on exit."""
    await server.start()
    try:
        config = mesh([(server.port, "v1")], router, traffic_policy, proxy, listener=listener)
        async with engine_for(config) as engine:
            c = await StreamClient.connect(address(engine))
            assert isinstance(c, StreamClient)
            try:
                yield engine, c, server
            finally:
                c.close()
    finally:
        await server.close()


DELAYED = """\
- name: delayed
  match: {attributes: {method: {prefix: chat}}}
  route: [{destination: {host: svc.test, subset: v1}}]
  fault: {delay: {fixedDelay: 300ms}}
- name: refused
  match: {attributes: {method: {exact: refused}}}
  route: [{destination: {host: svc.test, subset: v1}}]
  fault: {delay: {fixedDelay: 300ms}, abort: {errorType: OverLimit}}
"""


def test_frames_sent_behind_a_held_stream_init_wait_for_it() -> None:
    """A client sends its first frames right behind the ``Stream_Init``, as it may while the
    upstream connection is made; here a fault delay holds the ``Stream_Init`` first. Those
    frames wait for it and reach the stream in order (they got ``BadRequest``, "no open
    stream", and the stream then opened without them). When the held ``Stream_Init`` is
    refused after all (the fault's abort), its error reply is the stream's only answer: the
    frames that waited for it are dropped and counted."""

    async def main() -> None:
        async with stream_client(StreamServer(), router=DELAYED) as (engine, c, up):
            c.frame(STREAM_OPEN, 1, {"method": "chat"})
            c.frame(STREAM_DATA, 1, {}, b"early")
            c.frame(STREAM_DATA, 1, {}, b"second")
            c.frame(STREAM_HALF_CLOSE, 1)
            c.frame(STREAM_OPEN, 2, {"method": "refused"})
            c.frame(STREAM_DATA, 2, {}, b"never")
            one = await c.until(1, 4)
            assert kinds(one) == [
                "Stream_Init",
                "Stream_Data",
                "Stream_Data",
                "Stream_Close_One_Way",
            ], [f.attributes.to_dict() for f in one]
            assert [bytes(f.body) for f in one[1:3]] == [b"EARLY", b"SECOND"]
            two = await c.until(2, 1)
            assert [error_type(f) for f in two] == ["OverLimit"]
            dropped = "metaprotocol_stream_frames_dropped_total"
            await until(lambda: engine.stats.total(dropped) == 1, "the waiting frame dropped")
            await until(lambda: streams(engine, "closed") == 1, "stream 1 closed")
            assert active(engine) == 0 and engine.pending == 0
            (conn,) = up.connections
            assert kinds(conn.frames) == [
                "Stream_Init",
                "Stream_Data",
                "Stream_Data",
                "Stream_Close_One_Way",
            ]
            await until(lambda: engine.buffered == 0, "nothing held")

    run(main())


def test_frames_behind_a_held_stream_init_are_bounded() -> None:
    """Frames for a held ``Stream_Init`` wait in the engine up to ``connectionBufferBytes``;
    past that the client is not read until the stream opens (then every frame arrives)."""

    async def main() -> None:
        proxy = "limits: {connectionBufferBytes: 262144}\n"
        held = ChatHolder.armed()
        async with stream_client(StreamServer(), proxy=proxy, listener=held) as (engine, c, up):
            c.frame(STREAM_OPEN, 1, {"method": "chat"})
            await asyncio.wait_for(ChatHolder.holding.wait(), WAIT)
            count = 256  # 16 MiB: more than the kernels' buffers take
            for i in range(count):
                c.frame(STREAM_DATA, 1, {"n": str(i)}, bytes(65536))
            dx = next(iter(engine.downstreams))
            await until(lambda: dx.reading_paused, "the client no longer read")
            assert engine.buffered < 4 * 262144, engine.buffered
            ChatHolder.gate.set()
            c.frame(STREAM_HALF_CLOSE, 1)
            frames = await c.until(1, count + 2)
            assert [bytes(f.body) for f in frames[1:-1]] == [bytes(65536)] * count
            assert kinds(frames)[-1] == "Stream_Close_One_Way"
            await until(lambda: streams(engine, "closed") == 1, "stream 1 closed")
            (conn,) = up.connections
            assert len(conn.frames) == count + 2

    run(main())


def test_a_client_that_half_closes_gets_its_streams_ended_within_the_drain() -> None:
    """A client half-closes (or closes: the engine cannot tell) with streams open that the
    upstream does not end: they get ``timeouts.drain`` to finish, as for a shutdown, then
    each is reset (``Timeout``, to a client that may still read) and its upstream connection
    closed. They stayed open until ``timeouts.streamIdle`` (5 min), each with its upstream
    connection; a stream the upstream ends meanwhile ends as usual."""

    async def main() -> None:
        proxy = "timeouts: {drain: 1s}\n"
        async with stream_client(StreamServer(), proxy=proxy) as (engine, c, _):
            for sid in (1, 2):
                c.frame(STREAM_OPEN, sid, {"method": "chat"})
            c.frame(STREAM_OPEN, 3, {"method": "ticks", "count": "2"})
            c.frame(STREAM_HALF_CLOSE, 3)
            for sid in (1, 2):
                await c.until(sid, 1)
            assert c.transport is not None
            c.transport.write_eof()
            assert kinds(await c.until(3, 3)) == ["Stream_Data"] * 2 + ["Stream_Close_One_Way"]
            for sid in (1, 2):
                assert error_type((await c.until(sid, 2))[1]) == "Timeout"
            await asyncio.wait_for(c.closed, WAIT)
            await until(lambda: not engine.upstreams, "the streams' connections closed")
            assert streams(engine, "closed") == 1 and streams(engine, "Timeout") == 2
            assert active(engine) == 0 and engine.buffered == 0

    run(main())


def test_a_stream_init_held_past_the_drain_after_the_client_s_close_opens_no_stream() -> None:
    """The client half-closes while a filter holds its ``Stream_Init``; the filter lets go of
    it after ``timeouts.drain``: it is answered ``Timeout`` and opens no connection. It
    opened one, and the stream lived until ``timeouts.streamIdle`` (5 min), for a client that
    had closed its side before it began."""

    async def main() -> None:
        proxy = "timeouts: {drain: 200ms}\n"
        held = ChatHolder.armed()
        async with stream_client(StreamServer(), proxy=proxy, listener=held) as (engine, c, up):
            c.frame(STREAM_OPEN, 1, {"method": "chat"})
            await asyncio.wait_for(ChatHolder.holding.wait(), WAIT)
            dx = next(iter(engine.downstreams))
            assert c.transport is not None
            c.transport.write_eof()
            await until(lambda: dx.streams_over, "the drain over")
            ChatHolder.gate.set()
            (reply,) = await c.until(1, 1)
            assert (reply.request_id, error_type(reply)) == (1, "Timeout")
            await asyncio.wait_for(c.closed, WAIT)
            assert up.connections == [] and not engine.upstreams and active(engine) == 0

    run(main())


def test_streams_open_at_the_end_of_a_shutdown_s_drain_end_as_their_client_s() -> None:
    """A shutdown's drain ends with streams the upstream keeps open: their client connections
    are reset, then the upstream connections. The streams ended as ``UpstreamReset`` (the
    upstream side went first, before the loop reported the clients gone), as if an upstream
    had failed; they end ``DownstreamClosed``, as the requests in flight then."""

    async def main() -> None:
        async with stream_client(StreamServer()) as (engine, c, _):
            for sid in (1, 3):
                c.frame(STREAM_OPEN, sid, {"method": "chat"})
                await c.until(sid, 1)
            await engine.stop(drain=0.2)
            assert streams(engine, "DownstreamClosed") == 2
            assert streams(engine, "UpstreamReset") == 0

    run(main())


class FinServer(StreamServer):
    """``fin``: a data frame, then the server's ``Stream_Close_One_Way`` and a TCP
    half-close (its side of the stream and of the connection are done; it still reads);
    ``close``: its ``Stream_Close_One_Way``, then it closes the connection."""

    def on_frame(self, conn: StreamServerConnection, msg: Metadata) -> None:
        if msg.message_type is MessageType.Stream_Init and msg.operation_name == "fin":
            assert conn.transport is not None
            conn.write(STREAM_DATA, msg.stream_id, {}, b"last")
            conn.write(STREAM_HALF_CLOSE, msg.stream_id)
            conn.transport.write_eof()
        elif msg.message_type is MessageType.Stream_Init and msg.operation_name == "close":
            assert conn.transport is not None
            conn.write(STREAM_HALF_CLOSE, msg.stream_id)
            conn.transport.close()
        elif msg.message_type is not MessageType.Stream_Data:  # it no longer writes
            super().on_frame(conn, msg)


def test_an_upstream_that_half_closes_after_its_side_of_the_stream_lets_the_client_finish() -> None:
    """The upstream closes its side of the stream, then half-closes TCP: the client may still
    send (its frames reach the upstream) and close its side, and the stream ends ``closed``.
    (The FIN reset the stream: the client got ``UpstreamReset`` after a clean close, its later
    frames ``BadRequest``, and outlier detection counted a gateway error.)"""

    async def main() -> None:
        policy = "{outlierDetection: {consecutiveGatewayErrors: 1, interval: 10s}}"
        async with stream_client(FinServer(), traffic_policy=policy) as (engine, c, up):
            c.frame(STREAM_OPEN, 1, {"method": "fin"})
            assert kinds(await c.until(1, 2)) == ["Stream_Data", "Stream_Close_One_Way"]
            (conn,) = up.connections
            c.frame(STREAM_DATA, 1, {}, b"after the upstream's close")
            c.frame(STREAM_HALF_CLOSE, 1)
            await until(lambda: len(conn.frames) == 3, "the client's frames reached it")
            assert kinds(conn.frames)[1:] == ["Stream_Data", "Stream_Close_One_Way"]
            await until(lambda: streams(engine, "closed") == 1, "the stream closed")
            await asyncio.wait_for(conn.lost, WAIT)
            assert kinds(c.frames[1]) == ["Stream_Data", "Stream_Close_One_Way"]
            assert streams(engine, "UpstreamReset") == 0
            assert engine.stats.total("metaprotocol_outlier_ejections_total") == 0
            c.frame(STREAM_OPEN, 2, {"method": "chat"})  # the endpoint was not ejected
            assert kinds(await c.until(2, 1)) == ["Stream_Init"]

    run(main())


def test_a_client_that_stops_reading_does_not_fail_its_streams_upstream() -> None:
    """The client stops reading while the upstream sends large frames: the engine stops
    reading the stream's connection, often with part of a frame in its buffer. That frame
    stays partial because of the client, not the upstream: ``timeouts.frame`` must not reset
    the stream nor count a gateway error against the endpoint. (It did: after 1 s the client
    got ``UpstreamReset``, "sent part of a reply and not the rest", and the endpoint was
    ejected.) When the client reads again, every frame arrives."""

    async def main() -> None:
        proxy = (
            "timeouts: {frame: 1s}\n"
            "limits: {connectionBufferBytes: 262144, connectionBufferMaxBytes: 16777216}\n"
        )
        policy = "{outlierDetection: {consecutiveGatewayErrors: 1, interval: 10s}}"
        client = stream_client(StreamServer(), proxy=proxy, traffic_policy=policy)
        async with client as (engine, c, up):
            assert c.transport is not None
            c.transport.pause_reading()
            count, size = 64, 1000003  # frames of ~1 MiB: a read ends inside one
            c.frame(STREAM_OPEN, 1, {"method": "flood", "count": str(count), "size": str(size)})
            await up.wait(lambda: any(conn.paused for conn in up.connections), "a pause")
            (upstream,) = engine.upstreams
            await until(lambda: upstream.partial_since, "part of a frame held")
            deadline = asyncio.get_running_loop().time() + 2.5  # past timeouts.frame
            await until(lambda: asyncio.get_running_loop().time() > deadline, "2.5 s")
            c.transport.resume_reading()
            frames = await c.until(1, count + 1)
            assert [int(f.attributes.get("n") or -1) for f in frames[:count]] == list(range(count))
            assert streams(engine, "UpstreamReset") == 0
            assert engine.stats.total("metaprotocol_outlier_ejections_total") == 0
            c.frame(STREAM_HALF_CLOSE, 1)
            await until(lambda: streams(engine, "closed") == 1, "the stream closed")

    run(main(), timeout=30)


def test_a_stream_held_when_the_client_half_closes_gets_the_drain_too() -> None:
    """The client half-closes while a fault delay holds its ``Stream_Init``: the stream opens
    after the half-close and is bounded by the same ``timeouts.drain``."""

    async def main() -> None:
        proxy = "timeouts: {drain: 1s}\n"
        async with stream_client(StreamServer(), router=DELAYED, proxy=proxy) as (engine, c, _):
            c.frame(STREAM_OPEN, 1, {"method": "chat"})
            assert c.transport is not None
            c.transport.write_eof()
            frames = await c.until(1, 2)
            assert kinds(frames)[0] == "Stream_Init" and error_type(frames[1]) == "Timeout"
            await asyncio.wait_for(c.closed, WAIT)
            await until(lambda: not engine.upstreams, "the stream's connection closed")
            assert streams(engine, "Timeout") == 1 and active(engine) == 0

    run(main())


def test_a_reload_that_keeps_the_streams_endpoint_keeps_the_stream() -> None:
    """A reload changes the stream's cluster (here an endpoint added, as each EDS update
    does) but keeps the stream's endpoint: the stream goes on past the reload's
    ``timeouts.drain``. (It was reset, ``UpstreamReset`` "a reload changed or removed its
    cluster", 1 s after any change of its cluster.) A later reload that removes the endpoint
    resets it at that reload's deadline, as before."""

    async def main() -> None:
        a, b = await StreamServer("a").start(), await StreamServer("b").start()
        proxy = "timeouts: {drain: 1s}\n"
        async with engine_for(mesh([(a.port, "v1")], proxy=proxy)) as engine:
            c = await StreamClient.connect(address(engine))
            c.frame(STREAM_OPEN, 1, {"method": "chat"})
            await c.until(1, 1)
            await engine.apply(loads_config(mesh([(a.port, "v1"), (b.port, "v1")], proxy=proxy)))
            assert engine._drain_timers
            await until(lambda: not engine._drain_timers, "the reload's drain deadline")
            c.frame(STREAM_DATA, 1, {}, b"still there")
            assert bytes((await c.until(1, 2))[1].body) == b"STILL THERE"
            await engine.apply(loads_config(mesh([(b.port, "v1")], proxy=proxy)))
            assert error_type((await c.until(1, 3))[2]) == "UpstreamReset"
            assert streams(engine, "UpstreamReset") == 1 and active(engine) == 0
            c.close()
        await a.close()
        await b.close()

    run(main())


class DedicatedKV(KVCodec):
    """The KV codec without id rewriting: each client gets upstream connections of its own."""

    capabilities = Capabilities(
        heartbeat=True, oneway=True, mutation=True, error_reply=True, streaming=True
    )


def test_a_stream_takes_the_place_of_an_idle_connection_when_the_budget_is_spent() -> None:
    """``maxUpstreamConnections`` is taken by clients' own connections, idle: a request would
    close the one idle longest and open in its place (``reclaimed``); a ``Stream_Init`` does
    the same. (It got ``OverLimit``, "too many upstream connections".)"""
    router = """\
    - name: streams
      match: {attributes: {method: {exact: chat}}}
      route: [{destination: {host: svc.test, subset: v2}}]
    - name: requests
      route: [{destination: {host: svc.test, subset: v1}}]
    """

    async def main() -> None:
        unary, up = await Upstream("u").start(), await StreamServer().start()
        codec = f"{__name__}:DedicatedKV"
        proxy = "limits: {maxUpstreamConnections: 2}\n"
        config = mesh([(unary.port, "v1"), (up.port, "v2")], router, proxy=proxy, codec=codec)
        async with engine_for(config) as engine:
            idle = [await Client.connect(address(engine)) for _ in range(2)]
            for client in idle:
                assert error_type(await client.call("get")) is None
            assert len(engine.upstreams) == 2 and len(engine.idle_upstreams) == 2
            c = await StreamClient.connect(address(engine))
            c.frame(STREAM_OPEN, 1, {"method": "chat"})
            assert kinds(await c.until(1, 1)) == ["Stream_Init"], c.frames[1][0].attributes
            closed = "metaprotocol_upstream_connections_closed_total"
            assert engine.stats.total(closed, reason="reclaimed") == 1
            assert len(engine.upstreams) == 2
            c.close()
            for client in idle:
                client.close()
        await unary.close()
        await up.close()

    run(main())


def test_a_client_that_writes_to_an_upstream_done_with_the_stream_does_not_eject_it() -> None:
    """The upstream closed its side of the stream, then its connection; the client goes on
    sending, and the upstream's kernel resets the connection: the client gets ``UpstreamReset``
    for the stream, but the endpoint did nothing wrong, and outlier detection does not count
    it. (It counted a gateway error: any client could get endpoints ejected so.)"""

    async def main() -> None:
        policy = "{outlierDetection: {consecutiveGatewayErrors: 1, interval: 10s}}"
        async with stream_client(FinServer(), traffic_policy=policy) as (engine, c, up):
            c.frame(STREAM_OPEN, 1, {"method": "close"})
            assert kinds(await c.until(1, 1)) == ["Stream_Close_One_Way"]
            (conn,) = up.connections
            await asyncio.wait_for(conn.lost, WAIT)

            def sent_until_reset() -> bool:  # the kernel's reset comes after a write or two
                if len(c.frames[1]) == 1:
                    c.frame(STREAM_DATA, 1, {}, b"to nobody")
                return len(c.frames[1]) > 1

            await until(sent_until_reset, "the upstream's reset")
            assert error_type(c.frames[1][1]) == "UpstreamReset"
            assert engine.stats.total("metaprotocol_outlier_ejections_total") == 0
            c.frame(STREAM_OPEN, 2, {"method": "chat"})  # the endpoint was not ejected
            assert kinds(await c.until(2, 1)) == ["Stream_Init"]

    run(main())


def test_a_stream_upstream_that_sends_unreadable_bytes_is_a_gateway_error() -> None:
    """Bytes the codec refuses on a stream's connection reset the stream with ``BadResponse``
    and count as a gateway error for outlier detection, as an unreadable reply to a request
    does. (They were not counted: an endpoint that wrote garbage on every stream was never
    ejected.)"""

    async def main() -> None:
        policy = "{outlierDetection: {consecutiveGatewayErrors: 1, interval: 10s}}"
        async with stream_client(StreamServer(), traffic_policy=policy) as (engine, c, _):
            c.frame(STREAM_OPEN, 1, {"method": "garbage"})
            (bad,) = await c.until(1, 1)
            assert error_type(bad) == "BadResponse"
            ejections = "metaprotocol_outlier_ejections_total"
            await until(lambda: engine.stats.total(ejections) == 1, "the endpoint ejected")

    run(main())


def test_a_held_stream_init_settled_while_the_client_reads_nothing_keeps_the_frame_clock() -> None:
    """A client's partial frame must complete within ``timeouts.frame``, also when a held
    ``Stream_Init`` is let go while the engine stops reading the client for another reason (its
    unread replies). (Letting it go moved the partial frame's clock by the loop's time since
    the connection was last blocked, or since the loop started: the partial frame then held
    the connection for good, neither frame nor idle timeout closing it.)"""

    async def main() -> None:
        proxy = "timeouts: {frame: 1s}\nlimits: {connectionBufferBytes: 262144}\n"
        held = ChatHolder.armed()
        async with stream_client(StreamServer(), proxy=proxy, listener=held) as (engine, c, _):
            assert c.transport is not None
            c.transport.pause_reading()
            flood = {"method": "flood", "count": "1024", "size": "65536"}  # 64 MiB
            partial = build_frame(STREAM_DATA, 2, {}, b"never finished")[:7]
            c.send(
                build_frame(STREAM_OPEN, 1, {"method": "chat"})
                + build_frame(STREAM_OPEN, 2, flood)
                + partial
            )
            await asyncio.wait_for(ChatHolder.holding.wait(), WAIT)
            dx = next(iter(engine.downstreams))
            await until(lambda: dx.write_paused and dx.partial_since, "paused, a partial frame")
            ChatHolder.gate.set()
            closed = "metaprotocol_downstream_connections_closed_total"
            await until(
                lambda: engine.stats.total(closed, reason="frame_timeout") == 1,
                "the partial frame timed out",
            )

    run(main())


def test_a_stream_open_across_a_reload_is_counted_in_its_routes_series() -> None:
    """A reload renames the route of an open stream: the old route's series stay while the
    stream is open (a sweep keeps them, as for a request in flight), so its end is counted,
    and the totals agree with what the client saw. (The sweep dropped them: the stream's end
    went into a series no longer in the registry, and one closed stream was never counted.)"""

    def route(name: str) -> str:
        return f"- name: {name}\n  route: [{{destination: {{host: svc.test, subset: v1}}}}]\n"

    async def main() -> None:
        async with stream_client(StreamServer(), router=route("r0")) as (engine, c, up):
            for sid in (1, 2):
                c.frame(STREAM_OPEN, sid, {"method": "chat"})
                await c.until(sid, 1)
            c.frame(STREAM_HALF_CLOSE, 1)
            await until(lambda: streams(engine, "closed") == 1, "stream 1 closed")
            await engine.apply(loads_config(mesh([(up.port, "v1")], router=route("r1"))))
            engine.prune_stats()  # what a housekeeping sweep does: stream 2 is open
            c.frame(STREAM_HALF_CLOSE, 2)
            await until(lambda: active(engine) == 0, "stream 2 ended")
            assert streams(engine, "closed") == 2
            engine.prune_stats()  # nothing holds the old route now: folded, still counted
            assert streams(engine, "closed") == 2

    run(main())


def test_a_stream_the_upstream_answers_resets_the_endpoints_consecutive_errors() -> None:
    """Outlier detection counts *consecutive* gateway errors: a stream the upstream answers
    (its first frame) is a success between two failed streams, as a reply is between two
    failed requests. (Streams never counted a success: two failures among any number of
    streams served ejected the endpoint at ``consecutiveGatewayErrors: 2``.)"""

    async def main() -> None:
        policy = "{outlierDetection: {consecutiveGatewayErrors: 2, interval: 10s}}"
        async with stream_client(StreamServer(), traffic_policy=policy) as (engine, c, _):
            c.frame(STREAM_OPEN, 1, {"method": "drop"})
            assert error_type((await c.until(1, 1))[0]) == "UpstreamReset"
            c.frame(STREAM_OPEN, 2, {"method": "chat"})
            assert kinds(await c.until(2, 1)) == ["Stream_Init"]
            c.frame(STREAM_OPEN, 3, {"method": "drop"})
            assert error_type((await c.until(3, 1))[0]) == "UpstreamReset"
            assert engine.stats.total("metaprotocol_outlier_ejections_total") == 0

    run(main())


def test_a_client_that_sends_an_unreadable_frame_gets_its_streams_ended_within_the_drain() -> None:
    """After bytes the codec cannot resynchronise on, the engine reads nothing more from the
    client, which can no longer close its streams: as after its half-close, they get
    ``timeouts.drain`` to finish, then each is reset (``Timeout``). (They stayed open until
    ``timeouts.streamIdle``, 5 min, or for good while the upstream sent frames.)"""

    async def main() -> None:
        proxy = "timeouts: {drain: 1s}\n"
        async with stream_client(StreamServer(), proxy=proxy) as (engine, c, _):
            c.frame(STREAM_OPEN, 1, {"method": "chat"})
            await c.until(1, 1)
            c.send(b"XX" + bytes(30))  # no frame: nothing to resynchronise on
            assert error_type((await c.until(1, 2))[1]) == "Timeout"
            await asyncio.wait_for(c.closed, WAIT)
            assert streams(engine, "Timeout") == 1 and active(engine) == 0

    run(main())
