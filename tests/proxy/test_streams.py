"""Streams: ``Stream_*`` frames through the engine, each stream on an upstream connection of
its own, against a KV stream server over real sockets."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections import defaultdict
from typing import Any, cast

import trustme
from proxy_kit import (
    WAIT,
    Client,
    address,
    build_frame,
    engine_for,
    error_type,
    mesh,
    refusing_port,
    run,
    until,
)

from metaprotocol_sdk import Capabilities, MessageType, Metadata
from metaprotocol_sdk.examples.kv import (
    STREAM_CLOSE,
    STREAM_DATA,
    STREAM_HALF_CLOSE,
    STREAM_OPEN,
    KVCodec,
)
from metaprotocol_sdk.proxy.tls import TlsUpstreamConnection

LISTENER = "svc.test:9000"
HALF_CLOSE = MessageType.Stream_Close_One_Way


class StreamServerConnection(asyncio.Protocol):
    """One connection of :class:`StreamServer`."""

    def __init__(self, owner: StreamServer) -> None:
        self.owner = owner
        self.codec = KVCodec()
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.frames: list[Metadata] = []
        self.paused = False
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.owner.connections.append(self)
        self.owner.changed()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self.owner.changed()

    def pause_writing(self) -> None:
        self.paused = True
        self.owner.changed()

    def resume_writing(self) -> None:
        self.paused = False
        self.owner.changed()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            msg = self.codec.decode(self.buffer)
            if not isinstance(msg, Metadata):
                return
            self.frames.append(msg)
            self.owner.on_frame(self, msg)
            self.owner.changed()

    def write(self, kind: int, sid: int, headers: dict[str, str] | None = None, body: bytes = b""):
        assert self.transport is not None
        self.transport.write(build_frame(kind, sid, headers, body))


class StreamServer:
    """A KV stream server; the ``Stream_Init``'s method says what it does with the stream:

    ``echo`` answers each data frame with its body upper-cased and half-closes after the
    client; ``ticks`` sends ``count`` data frames, then half-closes; ``drop`` closes the
    connection; ``garbage`` writes bytes that are no KV frame; ``silent`` does nothing;
    ``flood`` writes data frames of ``size`` bytes until its transport pauses, then more each
    time it resumes, ``count`` in all.
    """

    def __init__(self, name: str = "s") -> None:
        self.name = name
        self.connections: list[StreamServerConnection] = []
        self.server: asyncio.Server | None = None
        self.port = 0
        self.event = asyncio.Event()
        self.sent: dict[int, int] = defaultdict(int)

    async def start(self, ssl: Any = None) -> StreamServer:
        """Listen on 127.0.0.1 (with TLS when given an ``ssl.SSLContext``)."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: StreamServerConnection(self), "127.0.0.1", 0, ssl=ssl
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.wait_for(self.server.wait_closed(), WAIT)

    def changed(self) -> None:
        self.event.set()

    def on_frame(self, conn: StreamServerConnection, msg: Metadata) -> None:
        kind = msg.message_type
        sid = msg.stream_id
        if kind is MessageType.Stream_Init:
            method = msg.operation_name
            headers = {"server": self.name}
            headers.update({f"req-{k}": v for k, v in msg.attributes.to_dict().items()})
            if method == "drop":
                assert conn.transport is not None
                conn.transport.close()
            elif method == "garbage":
                assert conn.transport is not None
                conn.transport.write(b"XX" + bytes(30))
            elif method == "ticks":
                for i in range(int(msg.attributes.get("count") or 0)):
                    conn.write(STREAM_DATA, sid, {"n": str(i)}, b"tick")
                conn.write(STREAM_HALF_CLOSE, sid, headers)
            elif method == "flood":
                self._flood(conn, msg)
            elif method != "silent":
                conn.write(STREAM_OPEN, sid, headers)  # the server's open: seen by the client
        elif kind is MessageType.Stream_Data:
            conn.write(STREAM_DATA, sid, {}, bytes(msg.body).upper())
        elif kind is HALF_CLOSE:
            conn.write(STREAM_HALF_CLOSE, sid)

    def _flood(self, conn: StreamServerConnection, msg: Metadata) -> None:
        count = int(msg.attributes.get("count") or 0)
        size = int(msg.attributes.get("size") or 0)
        sid = msg.stream_id

        async def flood() -> None:
            while self.sent[sid] < count:
                if conn.lost.done():
                    return
                if conn.paused:
                    await self.wait(lambda: not conn.paused or conn.lost.done(), "resume")
                    if conn.lost.done():
                        return
                    continue
                conn.write(STREAM_DATA, sid, {"n": str(self.sent[sid])}, bytes(size))
                self.sent[sid] += 1
                if self.sent[sid] % 16 == 0:
                    await asyncio.sleep(0)  # let the loop see the pause
            conn.write(STREAM_HALF_CLOSE, sid)

        asyncio.get_running_loop().create_task(flood())

    async def wait(self, check: Any, what: str, timeout: float = WAIT) -> None:
        """Wait until ``check()`` holds (checked at every change of the server)."""
        async with asyncio.timeout(timeout):
            while not check():
                self.event.clear()
                await self.event.wait()


class StreamClient(Client):
    """A KV client that files the frames it gets by id (stream frames and replies alike)."""

    def __init__(self, metadata: dict[str, Any] | None = None) -> None:
        super().__init__(metadata)
        self.frames: dict[int, list[Metadata]] = defaultdict(list)
        self.event = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.exchanging and not self.exchanged():
            return
        while True:
            msg = self.codec.decode(self.buffer)
            if not isinstance(msg, Metadata):
                break
            self.frames[msg.request_id].append(msg)
        self.event.set()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.event.set()

    def frame(self, kind: int, sid: int, headers: dict[str, str] | None = None, body: bytes = b""):
        self.send(build_frame(kind, sid, headers, body))

    async def until(self, sid: int, n: int) -> list[Metadata]:
        """Wait until stream ``sid`` got ``n`` frames."""
        try:
            async with asyncio.timeout(WAIT):
                while len(self.frames[sid]) < n:
                    self.event.clear()
                    await self.event.wait()
        except TimeoutError:
            got = dict(self.frames)
            raise AssertionError(f"stream {sid}: {n} frames expected, got {got}") from None
        return self.frames[sid]


def kinds(frames: list[Metadata]) -> list[str]:
    return [f.message_type.name for f in frames]


def streams(engine: Any, outcome: str) -> int:
    return int(engine.stats.total("metaprotocol_streams_total", outcome=outcome))


def active(engine: Any) -> int:
    return int(engine.stats.get("metaprotocol_streams_active", listener=LISTENER))


ROUTER = """\
- name: watch-v2
  match: {attributes: {method: {exact: watch}}}
  route: [{destination: {host: svc.test, subset: v2}}]
  requestMutation: [{key: via, value: engine}]
- name: default
  route: [{destination: {host: svc.test, subset: v1}}]
"""


def test_a_stream_goes_both_ways_on_a_connection_of_its_own() -> None:
    """Two streams at once, interleaved: each ``Stream_Init`` is routed by its headers (and
    mutated as the route says), each stream has its own upstream connection, every frame
    reaches the other side as it was sent, in order, and the stream ends when both sides
    half-closed: its connection closes and the stats count it."""

    async def main() -> None:
        v1, v2 = await StreamServer("v1").start(), await StreamServer("v2").start()
        config = mesh([(v1.port, "v1"), (v2.port, "v2")], router=ROUTER)
        async with engine_for(config) as engine:
            c = await StreamClient.connect(address(engine))
            c.frame(STREAM_OPEN, 5, {"method": "watch", "key": "a"})
            c.frame(STREAM_OPEN, 6, {"method": "chat"})
            for i in range(3):
                c.frame(STREAM_DATA, 5, {}, f"five-{i}".encode())
                c.frame(STREAM_DATA, 6, {}, f"six-{i}".encode())
            c.frame(STREAM_HALF_CLOSE, 5)
            c.frame(STREAM_HALF_CLOSE, 6)
            five, six = await c.until(5, 5), await c.until(6, 5)
            assert kinds(five) == ["Stream_Init", *["Stream_Data"] * 3, "Stream_Close_One_Way"]
            assert [bytes(f.body) for f in five[1:4]] == [b"FIVE-0", b"FIVE-1", b"FIVE-2"]
            assert [bytes(f.body) for f in six[1:4]] == [b"SIX-0", b"SIX-1", b"SIX-2"]
            assert five[0].attributes.get("server") == "v2"
            assert five[0].attributes.get("req-via") == "engine"  # the route's mutation
            assert six[0].attributes.get("server") == "v1"
            assert six[0].attributes.get("req-via") is None
            # One upstream connection per stream, closed once the stream ended.
            assert len(v2.connections) == 1 and len(v1.connections) == 1
            for conn in (*v1.connections, *v2.connections):
                await asyncio.wait_for(conn.lost, WAIT)
                assert kinds(conn.frames)[-1] == "Stream_Close_One_Way"
            await until(lambda: not engine.upstreams, "the streams' connections closed")
            assert streams(engine, "closed") == 2
            assert active(engine) == 0
            frames = "metaprotocol_stream_frames_total"
            assert engine.stats.get(frames, listener=LISTENER, side="downstream") == 10
            assert engine.stats.get(frames, listener=LISTENER, side="upstream") == 10
            assert not engine.downstreams.copy().pop().streams
            c.close()
        await v1.close()
        await v2.close()

    run(main())


def test_frames_of_no_open_stream_get_the_codecs_error_reply_with_their_id() -> None:
    """A data frame for a stream never opened, a second open of an open stream, and a frame
    after the client's half-close each get ``BadRequest`` with the frame's id; the open
    stream is not disturbed."""

    async def main() -> None:
        up = await StreamServer().start()
        async with engine_for(mesh([(up.port, "v1")])) as engine:
            c = await StreamClient.connect(address(engine))
            c.frame(STREAM_DATA, 9, {}, b"nobody")
            (reply,) = await c.until(9, 1)
            assert error_type(reply) == "BadRequest"
            assert "no open stream 9" in (reply.attributes.get("error-message") or "")
            c.frame(STREAM_OPEN, 3, {"method": "chat"})
            await c.until(3, 1)  # the server's open
            c.frame(STREAM_OPEN, 3, {"method": "chat"})
            again = (await c.until(3, 2))[1]
            assert error_type(again) == "BadRequest"
            assert "already open" in (again.attributes.get("error-message") or "")
            c.frame(STREAM_HALF_CLOSE, 3)
            c.frame(STREAM_DATA, 3, {}, b"late")
            frames = await c.until(3, 4)
            assert {kinds(frames)[2], kinds(frames)[3]} == {"Error", "Stream_Close_One_Way"}
            late = next(f for f in frames[2:] if f.message_type is MessageType.Error)
            assert "closed on the client's side" in (late.attributes.get("error-message") or "")
            await until(lambda: streams(engine, "closed") == 1, "the stream closed")
            (conn,) = up.connections
            assert kinds(conn.frames) == ["Stream_Init", "Stream_Close_One_Way"]
            c.close()
        await up.close()

    run(main())


def test_an_upstream_that_drops_the_stream_resets_it_for_the_client() -> None:
    """The stream's connection closes (or sends bytes that are no frame): the client gets the
    codec's error reply with the stream's id (its only answer), and the stream is counted by
    what ended it. The frames the client sends for it until it closes its side (they may be
    on their way) are dropped and counted, not each answered with an error; after its close,
    a frame of that id is an error again."""

    async def main() -> None:
        up = await StreamServer().start()
        async with engine_for(mesh([(up.port, "v1")])) as engine:
            c = await StreamClient.connect(address(engine))
            c.frame(STREAM_OPEN, 1, {"method": "drop"})
            (reset,) = await c.until(1, 1)
            assert error_type(reset) == "UpstreamReset"
            c.frame(STREAM_OPEN, 2, {"method": "garbage"})
            (bad,) = await c.until(2, 1)
            assert error_type(bad) == "BadResponse"
            c.frame(STREAM_DATA, 2, {}, b"more")
            c.frame(STREAM_HALF_CLOSE, 2)
            c.frame(STREAM_DATA, 2, {}, b"after the close")
            assert error_type((await c.until(2, 2))[1]) == "BadRequest"
            assert len(c.frames[2]) == 2
            dropped = "metaprotocol_stream_frames_dropped_total"
            assert engine.stats.get(dropped, listener=LISTENER) == 2
            assert streams(engine, "UpstreamReset") == 1
            assert streams(engine, "BadResponse") == 1
            assert engine.stats.total("metaprotocol_upstream_resets_total") == 1  # the drop
            assert active(engine) == 0
            await until(lambda: not engine.upstreams, "the connections closed")
            c.close()
        await up.close()

    run(main())


def test_a_stream_to_an_endpoint_that_refuses_gets_connect_failure() -> None:
    async def main() -> None:
        async with engine_for(mesh([(refusing_port(), "v1")])) as engine:
            c = await StreamClient.connect(address(engine))
            c.frame(STREAM_OPEN, 4, {"method": "chat"})
            c.frame(STREAM_DATA, 4, {}, b"queued while connecting")
            frames = await c.until(4, 1)
            assert error_type(frames[0]) == "UpstreamConnectFailure"
            assert streams(engine, "UpstreamConnectFailure") == 1
            assert active(engine) == 0
            c.close()

    run(main())


def test_a_server_stream_and_the_idle_timeout() -> None:
    """A stream only the server sends on is not idle; one with no frame either way for
    ``timeouts.streamIdle`` is reset with ``Timeout``, its connection closed, while the
    client connection stays open for the rest."""

    async def main() -> None:
        up = await StreamServer().start()
        proxy = "timeouts: {streamIdle: 1s}\n"
        async with engine_for(mesh([(up.port, "v1")], proxy=proxy)) as engine:
            c = await StreamClient.connect(address(engine))
            c.frame(STREAM_OPEN, 7, {"method": "ticks", "count": "50"})
            ticks = await c.until(7, 51)
            assert kinds(ticks)[-1] == "Stream_Close_One_Way"
            assert [f.attributes.get("n") for f in ticks[:50]] == [str(i) for i in range(50)]
            c.frame(STREAM_HALF_CLOSE, 7)  # the server half-closed; now the client
            await until(lambda: streams(engine, "closed") == 1, "stream 7 closed")
            c.frame(STREAM_OPEN, 8, {"method": "silent"})
            (timeout,) = await c.until(8, 1)  # within WAIT: the sweep runs every second
            assert error_type(timeout) == "Timeout"
            assert streams(engine, "Timeout") == 1
            assert active(engine) == 0
            await until(lambda: not engine.upstreams, "the silent stream's connection closed")
            assert not c.closed.done()
            c.close()
        await up.close()

    run(main())


def test_a_client_that_leaves_takes_its_streams_connections_along() -> None:
    async def main() -> None:
        up = await StreamServer().start()
        async with engine_for(mesh([(up.port, "v1")])) as engine:
            c = await StreamClient.connect(address(engine))
            for sid in (1, 2, 3):
                c.frame(STREAM_OPEN, sid, {"method": "chat"})
            for sid in (1, 2, 3):
                await c.until(sid, 1)
            assert active(engine) == 3
            c.reset()
            for conn in up.connections:
                await asyncio.wait_for(conn.lost, WAIT)
            await until(lambda: streams(engine, "DownstreamClosed") == 3, "three counted")
            assert active(engine) == 0
            assert not engine.upstreams
        await up.close()

    run(main())


def test_streams_per_connection_are_limited() -> None:
    async def main() -> None:
        up = await StreamServer().start()
        proxy = "limits: {maxStreamsPerConnection: 2}\n"
        async with engine_for(mesh([(up.port, "v1")], proxy=proxy)) as engine:
            c = await StreamClient.connect(address(engine))
            for sid in (1, 2, 3):
                c.frame(STREAM_OPEN, sid, {"method": "chat"})
            assert error_type((await c.until(3, 1))[0]) == "OverLimit"
            assert len(up.connections) <= 2
            c.frame(STREAM_CLOSE, 1)
            await until(lambda: streams(engine, "closed") == 1, "stream 1 closed")
            c.frame(STREAM_OPEN, 4, {"method": "chat"})
            assert kinds(await c.until(4, 1)) == ["Stream_Init"]
            assert len(up.connections) == 3
            c.close()
        await up.close()

    run(main())


def test_open_streams_count_against_http2_max_requests() -> None:
    """A stream is a request to the cluster's circuit breakers, as Envoy's max_requests
    counts a gRPC stream: with http2MaxRequests 2, a third stream is refused while two are
    open, and opens once one has closed. (Streams were never refused by it.)"""

    async def main() -> None:
        up = await StreamServer().start()
        policy = "{connectionPool: {http: {http2MaxRequests: 2}}}"
        async with engine_for(mesh([(up.port, "v1")], traffic_policy=policy)) as engine:
            c = await StreamClient.connect(address(engine))
            for sid in (1, 2):
                c.frame(STREAM_OPEN, sid, {"method": "chat"})
                assert kinds(await c.until(sid, 1)) == ["Stream_Init"]
            c.frame(STREAM_OPEN, 3, {"method": "chat"})
            refused = (await c.until(3, 1))[0]
            assert error_type(refused) == "OverLimit"
            assert "http2MaxRequests" in refused.attributes["error-message"]
            c.frame(STREAM_CLOSE, 1)
            await until(lambda: streams(engine, "closed") == 1, "stream 1 closed")
            c.frame(STREAM_OPEN, 4, {"method": "chat"})
            assert kinds(await c.until(4, 1)) == ["Stream_Init"]
            c.close()
        await up.close()

    run(main())


class UnaryKV(KVCodec):
    capabilities = Capabilities(
        heartbeat=True,
        oneway=True,
        mutation=True,
        response_mutation=True,
        rewrite_request_id=True,
        error_reply=True,
        peek_reply=True,
    )


def test_a_codec_without_streams_gets_bad_request_for_stream_frames() -> None:
    async def main() -> None:
        up = await StreamServer().start()
        codec = f"{__name__}:UnaryKV"
        async with engine_for(mesh([(up.port, "v1")], codec=codec)) as engine:
            c = await StreamClient.connect(address(engine))
            c.frame(STREAM_OPEN, 2, {"method": "chat"})
            (reply,) = await c.until(2, 1)
            assert error_type(reply) == "BadRequest"
            assert "Stream_Init messages are not accepted" in (
                reply.attributes.get("error-message") or ""
            )
            assert up.connections == []
            c.close()
        await up.close()

    run(main())


def test_a_client_that_reads_slowly_slows_its_streams_upstream() -> None:
    """The upstream floods a stream (64 MiB) while the client reads nothing: the engine stops
    reading the stream's connection once the client's buffer is full, so what it holds stays
    near ``connectionBufferBytes`` and the server's writes pause; when the client reads
    again every frame arrives, in order. (Without it the engine would read all and close the
    client at ``connectionBufferMaxBytes``.)"""

    async def main() -> None:
        up = await StreamServer().start()
        proxy = "limits: {connectionBufferBytes: 262144, connectionBufferMaxBytes: 4194304}\n"
        async with engine_for(mesh([(up.port, "v1")], proxy=proxy)) as engine:
            c = await StreamClient.connect(address(engine))
            assert c.transport is not None
            c.transport.pause_reading()
            count, size = 4096, 16384
            c.frame(STREAM_OPEN, 1, {"method": "flood", "count": str(count), "size": str(size)})
            await up.wait(lambda: bool(up.connections) and up.connections[0].paused, "a pause")
            assert up.sent[1] < count // 2, up.sent[1]
            assert engine.buffered < 4 * 262144, engine.buffered
            c.transport.resume_reading()
            frames = await c.until(1, count + 1)
            assert [int(f.attributes.get("n") or -1) for f in frames[:count]] == list(range(count))
            assert kinds(frames)[-1] == "Stream_Close_One_Way"
            c.frame(STREAM_HALF_CLOSE, 1)
            await until(lambda: streams(engine, "closed") == 1, "the stream closed")
            assert not c.closed.done()
            c.close()
        await up.close()

    run(main())


def test_a_drain_lets_open_streams_finish_and_refuses_new_ones() -> None:
    async def main() -> None:
        up = await StreamServer().start()
        async with engine_for(mesh([(up.port, "v1")])) as engine:
            c = await StreamClient.connect(address(engine))
            c.frame(STREAM_OPEN, 1, {"method": "chat"})
            await c.until(1, 1)
            stopping = asyncio.get_running_loop().create_task(engine.stop(drain=WAIT))
            await until(lambda: engine.draining, "the drain began")
            c.frame(STREAM_OPEN, 2, {"method": "chat"})
            assert error_type((await c.until(2, 1))[0]) == "ShuttingDown"
            c.frame(STREAM_DATA, 1, {}, b"still here")
            assert bytes((await c.until(1, 2))[1].body) == b"STILL HERE"
            assert not stopping.done()
            c.frame(STREAM_HALF_CLOSE, 1)
            await asyncio.wait_for(c.closed, WAIT)  # closed once its stream ended
            assert kinds(c.frames[1])[-1] == "Stream_Close_One_Way"
            await asyncio.wait_for(stopping, WAIT)
            assert streams(engine, "closed") == 1
        await up.close()

    run(main())


def test_each_stream_gets_one_access_log_line_as_it_ends(tmp_path: Any) -> None:
    log = tmp_path / "access.log"
    ports = []

    async def main() -> None:
        up = await StreamServer().start()
        ports.append(up.port)
        proxy = f"accessLog: {{path: '{log}', attributes: [method]}}\n"
        async with engine_for(mesh([(up.port, "v1")], proxy=proxy)) as engine:
            c = await StreamClient.connect(address(engine))
            c.frame(STREAM_OPEN, 31, {"method": "chat"})
            c.frame(STREAM_DATA, 31, {}, b"x" * 100)
            c.frame(STREAM_CLOSE, 31)
            c.frame(STREAM_OPEN, 32, {"method": "drop"})
            await c.until(32, 1)
            await until(lambda: streams(engine, "closed") == 1, "stream 31 closed")
            c.close()
        await up.close()

    run(main())
    lines = {r["request_id"]: r for r in map(json.loads, log.read_text().splitlines())}
    closed, dropped = lines[31], lines[32]
    assert (closed["status"], closed["message_type"]) == ("closed", "Stream_Init")
    assert closed["attributes"] == {"method": "chat"}
    sent = len(build_frame(STREAM_OPEN, 31, {"method": "chat"})) + len(
        build_frame(STREAM_DATA, 31, {}, b"x" * 100)
    )
    assert closed["bytes_received"] == sent + len(build_frame(STREAM_CLOSE, 31))
    assert "3 frames received" in closed["response_code_details"]
    assert dropped["status"] == "UpstreamReset" and dropped["bytes_sent"] > 0
    assert closed["upstream"] == dropped["upstream"] == f"127.0.0.1:{ports[0]}"


def test_streams_over_tls_to_the_upstream(tmp_path: Any) -> None:
    """A cluster with TLS: each stream's connection is a TLS one, and flow control holds on
    it as on plain TCP (the client reads nothing, the TLS connection stops being read)."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("svc.test").configure_cert(server_ctx)
    policy = f'{{tls: {{mode: SIMPLE, caCertificates: "{ca_file}"}}}}'

    async def main() -> None:
        up = await StreamServer().start(ssl=server_ctx)
        proxy = "limits: {connectionBufferBytes: 262144, connectionBufferMaxBytes: 4194304}\n"
        config = mesh([(up.port, "v1")], traffic_policy=policy, proxy=proxy)
        async with engine_for(config) as engine:
            c = await StreamClient.connect(address(engine))
            c.frame(STREAM_OPEN, 1, {"method": "chat"})
            c.frame(STREAM_DATA, 1, {}, b"over tls")
            frames = await c.until(1, 2)
            assert bytes(frames[1].body) == b"OVER TLS"
            assert isinstance(next(iter(engine.upstreams)), TlsUpstreamConnection)
            c.frame(STREAM_CLOSE, 1)
            assert c.transport is not None
            c.transport.pause_reading()
            count, size = 4096, 16384
            c.frame(STREAM_OPEN, 2, {"method": "flood", "count": str(count), "size": str(size)})
            await up.wait(lambda: any(conn.paused for conn in up.connections), "a pause")
            assert up.sent[2] < count // 2, up.sent[2]
            c.transport.resume_reading()
            flood = await c.until(2, count + 1)
            assert [int(f.attributes.get("n") or -1) for f in flood[:count]] == list(range(count))
            c.frame(STREAM_HALF_CLOSE, 2)
            await until(lambda: streams(engine, "closed") == 2, "both streams closed")
            c.close()
        await up.close()

    run(main())


def test_a_refused_stream_init_is_the_streams_only_answer() -> None:
    """A ``Stream_Init`` the engine refuses (no route) gets its error reply; the frames the
    client sent right behind it get nothing (dropped, counted): before, each got a
    ``BadRequest`` "no open stream" of its own. A ``Stream_Init`` with stream id 0 (a codec
    that sets none) is refused, naming the cause, instead of opening a stream no later frame
    could name."""

    async def main() -> None:
        up = await StreamServer().start()
        router = (
            "- match: {attributes: {method: {exact: chat}}}\n"
            "  route: [{destination: {host: svc.test}}]\n"
        )
        async with engine_for(mesh([(up.port, "v1")], router=router)) as engine:
            c = await StreamClient.connect(address(engine))
            c.frame(STREAM_OPEN, 4, {"method": "unrouted"})
            c.frame(STREAM_DATA, 4, {}, b"one")
            c.frame(STREAM_DATA, 4, {}, b"two")
            c.frame(STREAM_HALF_CLOSE, 4)
            c.frame(STREAM_OPEN, 5, {"method": "chat"})
            assert kinds(await c.until(5, 1)) == ["Stream_Init"]  # after stream 4's frames
            assert [error_type(f) for f in c.frames[4]] == ["RouteNotFound"]
            dropped = "metaprotocol_stream_frames_dropped_total"
            assert engine.stats.get(dropped, listener=LISTENER) == 3
            c.frame(STREAM_OPEN, 0, {"method": "chat"})
            (zero,) = await c.until(0, 1)
            assert error_type(zero) == "BadRequest"
            assert "stream_id 0" in (zero.attributes.get("error-message") or "")
            assert len(up.connections) == 1
            c.close()
        await up.close()

    run(main())
