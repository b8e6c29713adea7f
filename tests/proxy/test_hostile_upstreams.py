"""Attacks from the upstream side: a server that sends what it likes, when it likes.

Each test runs the engine over real sockets against :class:`RawUpstream`, a server that answers
nothing by itself: the test reads what arrived and writes back whatever bytes it chooses.
"""

from __future__ import annotations

import asyncio
import sys
import types
from typing import Any, cast

import pytest
from proxy_kit import (
    ONEWAY,
    REQUEST,
    RESPONSE,
    WAIT,
    Client,
    address,
    build_frame,
    engine_for,
    error_type,
    mesh,
    run,
    until,
)

from metaprotocol_sdk import Metadata, ReplyHead, ResponseStatus
from metaprotocol_sdk.examples.kv import ERROR, HEADER, HEADER_SIZE, KVCodec
from metaprotocol_sdk.proxy.upstream import ATTRIBUTE_BYTES

CLUSTER = "outbound|9000||svc.test"
DEDICATED = {"protocol": "kvnr", "codec": "proxy_test_codecs:NoRewriteKVCodec"}


class LaxPeekKVCodec(KVCodec):
    """A KV codec whose ``peek_reply`` reads the fixed header only, not the headers block (as
    a codec peeking at a header and a status does): it passes replies that ``decode``
    refuses."""

    protocol = "kvlax"

    def peek_reply(self, buffer: bytearray) -> ReplyHead | None:
        fields = HEADER.unpack(buffer)
        if fields is None:
            return None
        _, _, kind, request_id, headers_length, _, body_length = fields
        size = HEADER_SIZE + headers_length + body_length
        if kind not in (RESPONSE, ERROR) or size > len(buffer):
            return None
        return request_id, size, ResponseStatus.Ok if kind == RESPONSE else ResponseStatus.Error


class WholeKVCodec(KVCodec):
    """The KV codec with a ``decode_frame`` of its own: the engine hands it large replies
    whole."""

    protocol = "kvwhole"

    def decode_frame(self, frame: bytes) -> Metadata:
        return super().decode_frame(frame)


class NoPeekKVCodec(KVCodec):
    """The KV codec without ``peek_reply``: every reply is decoded."""

    protocol = "kvnp"
    capabilities = KVCodec.capabilities.__class__(
        heartbeat=True,
        oneway=True,
        mutation=True,
        response_mutation=True,
        rewrite_request_id=True,
        error_reply=True,
    )


_codecs = types.ModuleType("hostile_upstream_codecs")
_codecs.WholeKVCodec = WholeKVCodec  # type: ignore[attr-defined]
_codecs.LaxPeekKVCodec = LaxPeekKVCodec  # type: ignore[attr-defined]
_codecs.NoPeekKVCodec = NoPeekKVCodec  # type: ignore[attr-defined]
sys.modules["hostile_upstream_codecs"] = _codecs
WHOLE = {"protocol": "kvwhole", "codec": "hostile_upstream_codecs:WholeKVCodec"}
LAX = {"protocol": "kvlax", "codec": "hostile_upstream_codecs:LaxPeekKVCodec"}


def bad_reply(request_id: int, body: int = 0) -> bytes:
    """A KV response whose headers block is malformed (a key runs past it): the codec refuses
    it, saying where it ends (``frame_size``) and whose reply it is (``metadata``)."""
    block = b"\x05ab"
    return (
        HEADER.build(
            version=1,
            kind=RESPONSE,
            request_id=request_id,
            headers_length=len(block),
            reserved=0,
            body_length=body,
        )
        + block
        + bytes(body)
    )


class RawConn(asyncio.Protocol):
    """One connection accepted by a :class:`RawUpstream`."""

    def __init__(self, owner: RawUpstream) -> None:
        self.owner = owner
        self.codec = KVCodec()
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not inherit from asyncio.Transport: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        self.owner.conns.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while isinstance(msg := self.codec.decode(self.buffer), Metadata):
            self.owner.received.append((self, msg))

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class RawUpstream:
    """A server that answers nothing by itself: tests read ``received`` and write replies."""

    def __init__(self) -> None:
        self.conns: list[RawConn] = []
        self.received: list[tuple[RawConn, Metadata]] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> RawUpstream:
        self.server = await asyncio.get_running_loop().create_server(
            lambda: RawConn(self), "127.0.0.1", 0
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def wait_received(self, n: int) -> list[tuple[RawConn, Metadata]]:
        """Wait until ``n`` messages have arrived, on any connection; all of them."""
        await until(lambda: len(self.received) >= n, f"{n} messages at the upstream", WAIT)
        return self.received

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for conn in self.conns:
                if conn.transport is not None:
                    conn.transport.abort()
            await asyncio.wait_for(self.server.wait_closed(), WAIT)


def requests(engine: object, status: str) -> int:
    return int(engine.stats.total("metaprotocol_requests_total", status=status))  # type: ignore[attr-defined]


# -- partial replies ---------------------------------------------------------------------------


@pytest.mark.parametrize("body", [100, 200_000], ids=["small", "large"])
def test_a_reply_that_stops_midway_is_cut_at_the_frame_timeout(body: int) -> None:
    """An upstream that sent part of a reply and then nothing more kept it at the front of
    the shared connection for good: every reply behind it, and every later request to that
    host (the connection was never replaced), waited for its route timeout. The partial reply
    now gets ``timeouts.frame`` like a client's partial request: the connection is closed,
    what was in flight on it gets ``UpstreamReset`` at once, and the next request opens a new
    one."""

    async def main() -> None:
        up = await RawUpstream().start()
        proxy = "timeouts: {route: 60s, frame: 0.5s}\n"
        async with engine_for(mesh([(up.port, "v1")], proxy=proxy)) as engine:
            c = await Client.connect(address(engine))
            first, second = c.start(rid=1), c.start(rid=2)
            (conn, m1), _ = await up.wait_received(2)
            frame = build_frame(RESPONSE, m1.request_id, {"k": "v"}, bytes(body))
            conn.write(frame[: len(frame) // 2])
            replies = [await asyncio.wait_for(f, WAIT) for f in (first, second)]
            assert [(r.request_id, error_type(r)) for r in replies] == [
                (1, "UpstreamReset"),
                (2, "UpstreamReset"),
            ]
            await asyncio.wait_for(conn.lost, WAIT)
            third = c.start(rid=3)
            (fresh, m3) = (await up.wait_received(3))[2]
            assert fresh is not conn
            fresh.write(build_frame(RESPONSE, m3.request_id, {"k": "v"}))
            assert error_type(await asyncio.wait_for(third, WAIT)) is None
            stats = engine.stats
            assert requests(engine, "UpstreamReset") == 2 and requests(engine, "Ok") == 1
            assert stats.total("metaprotocol_local_replies_total", type="UpstreamReset") == 2
            assert (
                stats.total(
                    "metaprotocol_upstream_connections_closed_total", reason="frame_timeout"
                )
                == 1
            )
            assert stats.total("metaprotocol_upstream_resets_total") == 0  # not the peer's
            await until(lambda: engine.buffered == 0, "nothing buffered")
            c.close()
        await up.close()

    run(main())


def test_a_retry_after_a_frame_timeout_goes_to_a_fresh_connection_and_stays_counted() -> None:
    """A request on a connection closed for its stalled reply is retried (``retryOn: reset``)
    on a new connection, not on the one closing. The close happens in the housekeeping sweep,
    which recounts the buffered bytes: the retry's bytes, queued on the new connection during
    the sweep, were missing from the recount, so the count went below what was held (measured:
    -28 bytes, a request's frame, once the reply was in) until the next sweep."""

    async def main() -> None:
        up = await RawUpstream().start()
        router = (
            "- name: r\n"
            "  route: [{destination: {host: svc.test}}]\n"
            "  retries: {attempts: 2, retryOn: reset}\n"
        )
        proxy = "timeouts: {route: 60s, frame: 0.3s}\n"
        async with engine_for(mesh([(up.port, "v1")], router=router, proxy=proxy)) as engine:
            c = await Client.connect(address(engine))
            waiting = c.start(rid=1)
            ((conn, m1),) = await up.wait_received(1)
            conn.write(build_frame(RESPONSE, m1.request_id, {}, bytes(100))[:30])
            (fresh, m2) = (await up.wait_received(2))[1]
            assert fresh is not conn
            # The request in flight, nothing else: its frame and its decoded attributes.
            size = len(m2.frame) + ATTRIBUTE_BYTES * len(m2.attributes)
            assert engine.buffered == size
            fresh.write(build_frame(RESPONSE, m2.request_id, {"k": "v"}))
            reply = await asyncio.wait_for(waiting, WAIT)
            assert (reply.request_id, error_type(reply), reply.attributes.get("k")) == (
                1,
                None,
                "v",
            )
            assert engine.buffered == 0
            assert requests(engine, "Ok") == 1
            assert engine.stats.total("metaprotocol_retries_total", reason="reset") == 1
            assert engine.stats.total("metaprotocol_local_replies_total") == 0
            c.close()
        await up.close()

    run(main())


def test_a_connection_given_up_on_does_not_wait_to_send_what_it_holds() -> None:
    """The connection closed for a stalled reply was closed gracefully: asyncio then waits to
    send what is still queued for the upstream, and an upstream that also reads nothing never
    takes it. The connection stayed open, its unsent requests (already answered
    ``UpstreamReset``) counted as buffered (measured: 3.8 MB), and ``stop()`` could not
    finish it. Its requests are answered, so it is aborted."""

    async def main() -> None:
        up = await RawUpstream().start()
        proxy = "timeouts: {route: 60s, frame: 0.3s}\n"
        async with engine_for(mesh([(up.port, "v1")], proxy=proxy)) as engine:
            c = await Client.connect(address(engine))
            first = c.start(rid=1)
            ((conn, m1),) = await up.wait_received(1)
            assert conn.transport is not None
            conn.transport.pause_reading()
            second = c.start(rid=2, body=bytes(8_000_000))  # the kernel takes a part only
            held = lambda: sum(u.unsent for u in engine.upstreams) > 100_000  # noqa: E731
            await until(held, "bytes held for the upstream", WAIT)
            conn.write(build_frame(RESPONSE, m1.request_id, {}, bytes(100))[:30])
            replies = [await asyncio.wait_for(f, WAIT) for f in (first, second)]
            assert [error_type(r) for r in replies] == ["UpstreamReset", "UpstreamReset"]
            # (The upstream, not reading, would not notice: the engine's side is what counts.)
            await until(lambda: not engine.upstreams and engine.buffered == 0, "all let go", WAIT)
            c.close()
        await up.close()

    run(main())


def test_a_retry_after_an_upstream_write_timeout_stays_counted() -> None:
    """The same recount slip for the write watch merged from upstall: a connection aborted in
    the sweep's recount loop for stalled writes sent its requests again (``retryOn: reset``)
    on a new connection the loop did not see, so the count went below what was held
    (measured: 0 with an 8 MB request in flight, then -8 000 056) until the next sweep."""

    async def main() -> None:
        up = await RawUpstream().start()
        router = (
            "- name: r\n"
            "  route: [{destination: {host: svc.test}}]\n"
            "  retries: {attempts: 1, retryOn: reset}\n"
        )
        proxy = "timeouts: {route: 60s, upstreamWrite: 0.3s}\n"
        async with engine_for(mesh([(up.port, "v1")], router=router, proxy=proxy)) as engine:
            c = await Client.connect(address(engine))
            first = c.start(rid=1)
            ((conn, _),) = await up.wait_received(1)
            assert conn.transport is not None
            conn.transport.pause_reading()
            second = c.start(rid=2, body=bytes(8_000_000))  # the kernel takes a part only
            received = await up.wait_received(3)
            fresh = received[1][0]
            assert fresh is not conn and received[2][0] is fresh
            retried = [m for _, m in received[1:]]
            # At least the frames in flight (a few bytes may still count as unsent until the
            # next sweep: a transport's drain below its low-water mark is not reported).
            assert engine.buffered >= sum(len(m.frame) for m in retried)
            for m in retried:
                fresh.write(build_frame(RESPONSE, m.request_id))
            replies = [await asyncio.wait_for(f, WAIT) for f in (first, second)]
            assert [error_type(r) for r in replies] == [None, None]
            assert engine.buffered >= 0
            assert engine.stats.total("metaprotocol_retries_total", reason="reset") == 2
            c.close()
        await up.close()

    run(main())


def test_partial_replies_past_the_buffer_budget_are_cut_off() -> None:
    """Partial replies were never held to ``overload.maxBufferedBytes``: each upstream
    connection kept up to ``max_frame_size`` of one, and with a connection per client (codecs
    without id rewriting) that is ``maxConnections`` x ``max_frame_size`` (measured: 20
    clients, 4 MiB frames and a 1 MiB budget held 80 MiB). Like a client's partial request, a
    partial reply that grows past ``connectionBufferBytes`` while the process is over its
    budget is now cut off: its connection is closed and its requests get ``OverLimit``. (A
    shared connection is not cut: a client that reads nothing would fail every client's
    replies, see test_hostile_clients.py; there are only ``connectionsPerEndpoint`` of them.)"""

    async def main() -> None:
        up = await RawUpstream().start()
        proxy = (
            "timeouts: {route: 60s}\n"
            "overload: {maxBufferedBytes: 1048576}\n"
            "limits: {connectionBufferBytes: 65536}\n"
            "codecOptions: {kvnr: {max_frame_size: 4194304}}\n"
        )
        async with engine_for(mesh([(up.port, "v1")], proxy=proxy, **DEDICATED)) as engine:
            clients = [await Client.connect(address(engine)) for _ in range(3)]
            waiting = [c.start(rid=7) for c in clients]
            received = await up.wait_received(3)
            assert len({conn for conn, _ in received}) == 3  # one connection per client
            for conn, m in received:
                frame = build_frame(RESPONSE, m.request_id, {}, bytes(4194304 - 64))
                conn.write(frame[:-1000])
            replies = [await asyncio.wait_for(f, WAIT) for f in waiting]
            assert {(r.request_id, error_type(r)) for r in replies} == {(7, "OverLimit")}
            stats = engine.stats
            assert requests(engine, "OverLimit") == 3
            assert (
                stats.total("metaprotocol_upstream_connections_closed_total", reason="overload")
                == 3
            )
            await until(lambda: engine.buffered == 0, "nothing buffered")
            for c in clients:
                c.close()
        await up.close()

    run(main())


def test_replies_read_before_a_partial_reply_is_cut_off_leave_before_its_error() -> None:
    """The ``OverLimit`` for a partial reply cut off in a read went out at once, ahead of the
    replies decoded before it in that read (they wait to leave together): a client pairing
    replies by order got the error first."""

    async def main() -> None:
        up = await RawUpstream().start()
        proxy = (
            "overload: {maxBufferedBytes: 1048576}\n"
            "limits: {connectionBufferBytes: 65536}\n"
            "codecOptions: {kvnr: {max_frame_size: 4194304}}\n"
        )
        async with engine_for(mesh([(up.port, "v1")], proxy=proxy, **DEDICATED)) as engine:
            reader, writer = await asyncio.open_connection(*address(engine))
            writer.write(b"".join(build_frame(REQUEST, i, {"method": "get"}) for i in (1, 2)))
            (conn, m1), (_, m2) = await up.wait_received(2)
            # 20 clients, each with a partial request under connectionBufferBytes: the process
            # is over its budget, and none of them is cut off.
            fillers = []
            for _ in range(20):
                _, filler = await asyncio.open_connection(*address(engine))
                filler.write(build_frame(REQUEST, 9, {"method": "get"}, bytes(100_000))[:60_000])
                fillers.append(filler)
            await until(lambda: engine.overloaded(), "the process over its budget")
            big = build_frame(RESPONSE, m2.request_id, {}, bytes(2_000_000))
            conn.write(build_frame(RESPONSE, m1.request_id, {"k": "1"}) + big[:100_000])
            codec, buffer, replies = KVCodec(), bytearray(), []
            while len(replies) < 2:
                buffer += await asyncio.wait_for(reader.read(65536), WAIT)
                while isinstance(reply := codec.decode(buffer), Metadata):
                    replies.append(reply)
            assert [(r.request_id, error_type(r)) for r in replies] == [
                (1, None),
                (2, "OverLimit"),
            ]
            for w in [writer, *fillers]:
                w.close()
        await up.close()

    run(main())


@pytest.mark.parametrize("mode", ["shared", "dedicated"])
def test_replies_a_byte_at_a_time_then_a_half_close_midway(mode: str) -> None:
    """(Held before this hunt; kept as a guard.) Replies split at every byte, one read each,
    all arrive; an upstream that half-closes in the middle of the next reply fails the
    requests left on the connection with ``UpstreamReset`` at once, not at a timeout, and
    the reset is the upstream's (``metaprotocol_upstream_resets_total``)."""

    async def main() -> None:
        up = await RawUpstream().start()
        kw: dict[str, Any] = DEDICATED if mode == "dedicated" else {}
        proxy = "timeouts: {route: 60s, frame: 60s}\n"
        async with engine_for(mesh([(up.port, "v1")], proxy=proxy, **kw)) as engine:
            c = await Client.connect(address(engine))
            waiting = [c.start(rid=i) for i in range(1, 5)]
            received = await up.wait_received(4)
            conn = received[0][0]
            assert conn.transport is not None
            data = b"".join(
                build_frame(RESPONSE, m.request_id, {"k": str(i)}, b"b" * 40)
                for i, (_, m) in enumerate(received[:3], 1)
            )
            for i in range(len(data)):
                conn.write(data[i : i + 1])
                await asyncio.sleep(0)  # one read per byte, as far as the loop goes
            last = build_frame(RESPONSE, received[3][1].request_id, {}, b"b" * 40)
            conn.write(last[:20])
            conn.transport.write_eof()
            replies = [await asyncio.wait_for(f, WAIT) for f in waiting]
            assert [(r.request_id, error_type(r)) for r in replies] == [
                (1, None),
                (2, None),
                (3, None),
                (4, "UpstreamReset"),
            ]
            assert [r.attributes.get("k") for r in replies[:3]] == ["1", "2", "3"]
            assert engine.stats.total("metaprotocol_upstream_resets_total") == 1
            assert requests(engine, "Ok") == 3 and requests(engine, "UpstreamReset") == 1
            await until(lambda: engine.buffered == 0, "nothing buffered", WAIT)
            c.close()
        await up.close()

    run(main())


# -- replies the codec refuses -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["shared", "dedicated", "large", "large-whole"])
def test_a_reply_the_codec_refuses_fails_only_its_own_request(mode: str) -> None:
    """A reply the codec refused, although it said where the reply ends and which request it
    answers, failed every request in flight on the connection with ``BadResponse`` (on a shared
    connection: every client's) and closed it; the replies right behind it were lost. Now only
    its own request gets ``BadResponse``; the connection goes on, as it does for a client's
    bad frame."""

    async def main() -> None:
        up = await RawUpstream().start()
        kw: dict[str, Any] = {"dedicated": DEDICATED, "large-whole": WHOLE}.get(mode, {})
        body = 200_000 if mode.startswith("large") else 0  # assembled from its reads
        async with engine_for(mesh([(up.port, "v1")], **kw)) as engine:
            c = await Client.connect(address(engine))
            first, second = c.start(rid=1), c.start(rid=2)
            (conn, m1), (_, m2) = await up.wait_received(2)
            conn.write(
                bad_reply(m1.request_id, body) + build_frame(RESPONSE, m2.request_id, {"k": "2"})
            )
            one, two = [await asyncio.wait_for(f, WAIT) for f in (first, second)]
            assert (one.request_id, error_type(one)) == (1, "BadResponse")
            assert (two.request_id, error_type(two), two.attributes.get("k")) == (2, None, "2")
            third = c.start(rid=3)
            (again, m3) = (await up.wait_received(3))[2]
            assert again is conn and len(up.conns) == 1  # the same connection
            conn.write(build_frame(RESPONSE, m3.request_id))
            assert error_type(await asyncio.wait_for(third, WAIT)) is None
            stats = engine.stats
            assert requests(engine, "BadResponse") == 1 and requests(engine, "Ok") == 2
            assert stats.total("metaprotocol_local_replies_total", type="BadResponse") == 1
            assert stats.total("metaprotocol_decode_errors_total", side="upstream") == 1
            c.close()
        await up.close()

    run(main())


@pytest.mark.parametrize("mode", ["shared", "dedicated"])
def test_the_error_for_a_refused_reply_leaves_in_the_order_of_the_replies(mode: str) -> None:
    """The local ``BadResponse`` for a refused reply was written at once, ahead of the replies
    decoded before it from the same read (they wait to leave together): a client that pairs
    replies by their order (as the engine itself does on a connection of its own) got the
    error first."""

    async def main() -> None:
        up = await RawUpstream().start()
        kw: dict[str, Any] = DEDICATED if mode == "dedicated" else {}
        async with engine_for(mesh([(up.port, "v1")], **kw)) as engine:
            reader, writer = await asyncio.open_connection(*address(engine))
            writer.write(b"".join(build_frame(REQUEST, i, {"method": "get"}) for i in (1, 2)))
            (conn, m1), (_, m2) = await up.wait_received(2)
            conn.write(build_frame(RESPONSE, m1.request_id, {"k": "1"}) + bad_reply(m2.request_id))
            codec, buffer, replies = KVCodec(), bytearray(), []
            while len(replies) < 2:
                buffer += await asyncio.wait_for(reader.read(65536), WAIT)
                while isinstance(reply := codec.decode(buffer), Metadata):
                    replies.append(reply)
            assert [(r.request_id, error_type(r)) for r in replies] == [
                (1, None),
                (2, "BadResponse"),
            ]
            writer.close()
        await up.close()

    run(main())


def test_a_reply_peeked_at_but_refused_for_a_response_mutation_is_forwarded_unchanged() -> None:
    """A codec's ``peek_reply`` may pass a reply that ``decode`` refuses. Without a response
    mutation the reply went out (peeked, never decoded); with one it was decoded, refused, and
    every request on the shared connection got ``BadResponse``. The mutation is what needed the
    decode, so the reply now goes out unchanged, the skipped mutation counted, as a reply that
    cannot carry a mutation is."""

    async def main() -> None:
        up = await RawUpstream().start()
        router = (
            "- name: mutating\n"
            "  route: [{destination: {host: svc.test}}]\n"
            '  responseMutation: [{key: x-added, value: "yes"}]\n'
        )
        async with engine_for(mesh([(up.port, "v1")], router=router, **LAX)) as engine:
            # A raw client: its own codec would refuse the reply as the engine's does.
            reader, writer = await asyncio.open_connection(*address(engine))
            writer.write(b"".join(build_frame(REQUEST, i, {"method": "get"}) for i in (1, 2)))
            (conn, m1), (_, m2) = await up.wait_received(2)
            bad = bad_reply(m1.request_id)
            conn.write(bad + build_frame(RESPONSE, m2.request_id, {"k": "2"}))
            got = await asyncio.wait_for(reader.readexactly(len(bad)), WAIT)
            assert got == bad[:4] + (1).to_bytes(4, "big") + bad[8:]  # the client's id back
            buffer = bytearray(await asyncio.wait_for(reader.readexactly(HEADER_SIZE), WAIT))
            head = HEADER.unpack(buffer)
            assert head is not None
            rest = head[4] + head[6]
            buffer += await asyncio.wait_for(reader.readexactly(rest), WAIT)
            two = KVCodec().decode(buffer)
            assert isinstance(two, Metadata)
            assert (two.request_id, two.attributes.get("x-added")) == (2, "yes")
            stats = engine.stats
            assert requests(engine, "Ok") == 2
            assert stats.total("metaprotocol_mutations_skipped_total", route="mutating") == 1
            assert stats.total("metaprotocol_local_replies_total") == 0
            writer.close()
        await up.close()

    run(main())


# -- replies to what expects none ----------------------------------------------------------------


def test_a_reply_to_a_one_way_message_cannot_answer_another_clients_request() -> None:
    """On a shared connection one-way messages kept their client's id while the engine numbers
    requests from 1: an upstream that (wrongly) answers a one-way message answered, as far as
    the engine could tell, whichever request had that id on the connection. Client B's one-way
    message 1 got a reply that went to client A's request (wire id 1), and A's real reply was
    then dropped as a duplicate. One-way messages now get a fresh id of the connection's too,
    which no request waits for."""

    async def main() -> None:
        up = await RawUpstream().start()
        async with engine_for(mesh([(up.port, "v1")])) as engine:
            a = await Client.connect(address(engine))
            b = await Client.connect(address(engine))
            waiting = a.start(rid=7)
            await up.wait_received(1)
            b.send(build_frame(ONEWAY, 1, {"method": "notify"}))
            (conn, request), (_, oneway) = await up.wait_received(2)
            assert oneway.message_type.name == "Oneway"
            conn.write(
                build_frame(RESPONSE, oneway.request_id, {"answer": "to-the-one-way"})
                + build_frame(RESPONSE, request.request_id, {"answer": "real"})
            )
            reply = await asyncio.wait_for(waiting, WAIT)
            assert (reply.request_id, reply.attributes.get("answer")) == (7, "real")
            assert requests(engine, "Ok") == 1
            a.close()
            b.close()
        await up.close()

    run(main())


@pytest.mark.parametrize("path", ["peeked", "decoded"])
def test_replies_that_answer_nothing_are_dropped_and_counted(path: str) -> None:
    """Replies no request waits for (late, duplicated, or with an id never sent) are dropped,
    in time linear in their bytes, and were counted nowhere: an upstream flooding them was
    invisible. They are counted by cluster in
    ``metaprotocol_upstream_unmatched_replies_total``."""

    async def main() -> None:
        up = await RawUpstream().start()
        kw: dict[str, Any] = {}
        if path == "decoded":
            kw = {"protocol": "kvnp", "codec": "hostile_upstream_codecs:NoPeekKVCodec"}
        proxy = "timeouts: {route: 0.3s}\n"
        async with engine_for(mesh([(up.port, "v1")], proxy=proxy, **kw)) as engine:
            c = await Client.connect(address(engine))
            late = await c.call(rid=1)
            assert error_type(late) == "Timeout"
            waiting = c.start(rid=2)
            (conn, m1), (_, m2) = await up.wait_received(2)
            answer = build_frame(RESPONSE, m2.request_id, {"k": "2"})
            conn.write(
                build_frame(RESPONSE, m1.request_id)  # after its timeout
                + build_frame(RESPONSE, 9991)  # never sent
                + build_frame(ERROR, 9992)
                + answer
                + answer  # again
            )
            reply = await asyncio.wait_for(waiting, WAIT)
            assert (reply.request_id, error_type(reply), reply.attributes.get("k")) == (
                2,
                None,
                "2",
            )
            unmatched = "metaprotocol_upstream_unmatched_replies_total"
            await until(
                lambda: engine.stats.get(unmatched, cluster=CLUSTER) == 4, "4 counted", WAIT
            )
            assert requests(engine, "Ok") == 1 and requests(engine, "Timeout") == 1
            assert c.unmatched == []
            c.close()
        await up.close()

    run(main())


def test_an_extra_reply_on_a_client_s_own_connection_does_not_shift_the_others() -> None:
    """A client's own connection (a codec without id rewriting) pairs a reply whose id no
    request has with the oldest request, for upstreams that do not echo ids. An upstream
    that does, sending one reply too many (an id never sent), shifted every later pairing:
    request 3 was taken by the extra reply, its own reply by request 4, whose reply then
    answered nobody; the client got a reply of an id it never sent and none for request 4,
    which the stats counted ``Ok``. Once replies were paired by two ids, one of an id no
    request has is dropped and counted, as on a shared connection."""

    async def main() -> None:
        up = await RawUpstream().start()
        proxy = "timeouts: {route: 2s}\n"
        async with engine_for(mesh([(up.port, "v1")], proxy=proxy, **DEDICATED)) as engine:
            c = await Client.connect(address(engine))
            for rid in (1, 2):  # answered by their ids: the upstream echoes them
                waiting = c.start(rid=rid)
                (conn, message) = (await up.wait_received(rid))[-1]
                conn.write(build_frame(RESPONSE, message.request_id, {"k": str(rid)}))
                assert (await asyncio.wait_for(waiting, WAIT)).attributes.get("k") == str(rid)
            third, fourth = c.start(rid=3), c.start(rid=4)
            received = await up.wait_received(4)
            conn = received[-1][0]
            conn.write(
                build_frame(RESPONSE, 9999, {"k": "extra"})
                + b"".join(
                    build_frame(RESPONSE, m.request_id, {"k": str(m.request_id)})
                    for _, m in received[2:]
                )
            )
            replies = [await asyncio.wait_for(f, WAIT) for f in (third, fourth)]
            assert [(r.request_id, r.attributes.get("k")) for r in replies] == [
                (3, "3"),
                (4, "4"),
            ]
            unmatched = "metaprotocol_upstream_unmatched_replies_total"
            await until(lambda: engine.stats.get(unmatched, cluster=CLUSTER) == 1, "1", WAIT)
            assert c.unmatched == [] and requests(engine, "Ok") == 4
            c.close()
        await up.close()

    run(main())


@pytest.mark.parametrize("codec", ["kv", "whole"])
def test_requests_and_one_way_messages_from_an_upstream_are_dropped_and_counted(
    codec: str,
) -> None:
    """An upstream sends replies and heartbeats only: a request or one-way message from it
    (a peer speaking the wrong way, or flooding) was dropped without a trace. It is dropped
    and counted with the replies that answer nothing; the request waiting still gets its
    reply. ``whole``: a large one, assembled and decoded whole (``decode_frame``)."""

    async def main() -> None:
        up = await RawUpstream().start()
        kw: dict[str, Any] = WHOLE if codec == "whole" else {}
        async with engine_for(mesh([(up.port, "v1")], **kw)) as engine:
            c = await Client.connect(address(engine))
            waiting = c.start(rid=1)
            ((conn, m1),) = await up.wait_received(1)
            body = bytes(200_000 if codec == "whole" else 10)
            conn.write(
                build_frame(REQUEST, m1.request_id, {"method": "get"}, body)
                + build_frame(ONEWAY, 77, {"method": "note"}, body)
                + build_frame(RESPONSE, m1.request_id, {"k": "1"})
            )
            reply = await asyncio.wait_for(waiting, WAIT)
            assert (reply.request_id, error_type(reply), reply.attributes.get("k")) == (
                1,
                None,
                "1",
            )
            unmatched = "metaprotocol_upstream_unmatched_replies_total"
            await until(
                lambda: engine.stats.get(unmatched, cluster=CLUSTER) == 2, "2 counted", WAIT
            )
            assert requests(engine, "Ok") == 1 and c.unmatched == []
            c.close()
        await up.close()

    run(main())
