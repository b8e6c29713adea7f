"""A codec that breaks the contract (an exception other than ``CodecError``, reached by the
bytes of one connection) costs that connection at most: no traceback, no other client's
request lost, the same client's earlier requests answered, and the stats say what happened.
Over real sockets, with a KV codec that raises in the method a frame names."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import pytest
from proxy_kit import (
    PING,
    REQUEST,
    RESPONSE,
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
from test_streams import StreamClient, StreamServer, streams
from test_tls import record_loop_errors

from metaprotocol_sdk import Encoded, LocalError, Metadata, Mutation, ReplyHead
from metaprotocol_sdk.examples.kv import STREAM_OPEN, KVCodec
from metaprotocol_sdk.proxy import codec_bugs
from metaprotocol_sdk.proxy.assembly import LARGE_FRAME
from metaprotocol_sdk.proxy.engine import Engine

#: By this module's own name: by its file name the engine would import a second copy of it.
CODEC = NAME = f"{__name__}:BoomKV"
#: A message quoting "wire bytes": long, with a line break.
WIRE = "bad byte\n" + "x" * 5000
#: What each method raises when its frame asks for it.
BUGS: dict[str, Exception] = {
    "decode": IndexError(WIRE),
    "decode_frame": struct.error(WIRE),
    "heartbeat_reply": TypeError(WIRE),
    "on_error": RecursionError(WIRE),
    "encode": ValueError(WIRE),
    "up-decode": IndexError(WIRE),
    "up-decode_frame": KeyError(WIRE),
    "up-peek_reply": IndexError(WIRE),
    "up-relabel": UnicodeDecodeError("utf-8", b"\xff", 0, 1, WIRE),
    "up-heartbeat_reply": TypeError(WIRE),
}
BIG = 70 * 1024  # above the engine's large-frame threshold (64 KiB): ``decode_frame``


def boom(*places: str) -> dict[str, str]:
    """Headers that make the codec fail at each of ``places``: a client's frame names a
    place by itself; an ``up-`` place is hit in what the upstream echoes (``req-boom*``)."""
    return {f"boom{i}": f"<{place}>" for i, place in enumerate(places)}


def hit(place: str, frame: bytes | bytearray | memoryview) -> None:
    data = bytes(frame)
    if f"<{place}>".encode() in data and (not place.startswith("up-") or b"req-boom" in data):
        raise BUGS[place]


class BoomKV(KVCodec):
    """The KV codec, with a bug in each method that a frame's ``boom*`` header reaches."""

    def decode(self, buffer: bytearray) -> Any:
        message = super().decode(buffer)
        if isinstance(message, Metadata):
            hit("decode", message.frame)
            hit("up-decode", message.frame)
        return message

    def decode_frame(self, frame: bytes) -> Metadata:
        hit("decode_frame", frame)
        hit("up-decode_frame", frame)
        return super().decode_frame(frame)

    def peek_reply(self, buffer: bytearray) -> ReplyHead | None:
        head = super().peek_reply(buffer)
        if head is not None:
            frame = buffer[: head[1]]
            hit("up-peek_reply", frame)
            if b"<up-decode>" in frame:
                return None  # to ``decode``
        return head

    def relabel(self, frame: bytes, request_id: int) -> Encoded:
        hit("up-relabel", frame)
        return super().relabel(frame, request_id)

    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        hit("encode", message.frame)
        return super().encode(message, mutation, request_id=request_id)

    def on_error(self, metadata: Metadata, error: LocalError) -> bytes:
        hit("on_error", metadata.frame)
        if b"<on_error-empty>" in bytes(metadata.frame):
            return b""  # the contract's "an empty reply is a bug"
        return super().on_error(metadata, error)

    def heartbeat_reply(self, metadata: Metadata) -> bytes | None:
        hit("heartbeat_reply", metadata.frame)
        hit("up-heartbeat_reply", metadata.frame)
        return super().heartbeat_reply(metadata)


@pytest.fixture(autouse=True)
def one_line_per_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """One logged line per test, however many bugs: the rate limit, made long."""
    monkeypatch.setattr(codec_bugs, "LOG_INTERVAL", 3600.0)


def codec_errors(engine: Engine, method: str) -> int:
    return engine.stats.total("metaprotocol_codec_errors_total", codec=NAME, method=method)


def closed_by(engine: Engine, reason: str) -> int:
    return engine.stats.total("metaprotocol_downstream_connections_closed_total", reason=reason)


def check_log(caplog: pytest.LogCaptureFixture, method: str, exc: str) -> None:
    """Exactly one line about the bug, bounded, without a traceback; nothing else logged."""
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(records) == 1, [r.getMessage() for r in records]
    (record,) = records
    text = record.getMessage()
    assert record.exc_info is None and "Traceback" not in text
    assert "\n" not in text and len(text) < 600, text
    assert f"codec {NAME}: {method} raised {exc}" in text, text
    # Where: the codec's own line (here the test's hit()), as the kit names it.
    assert "test_codec_bugs.py:" in text and " in hit), a bug in the codec" in text, text


async def settled(engine: Engine) -> None:
    """Nothing left in flight, and every byte accounted for (once the sweep recounted)."""
    await until(lambda: engine.pending == 0 and engine.buffered == 0, "nothing held")


async def in_two(send: Any, frame: bytes, connections: Any) -> None:
    """Send ``frame`` in two writes, the second once a connection of ``connections()`` waits
    for the rest of it as a large frame (which is then given whole to ``decode_frame``)."""
    send(frame[:1000])
    await until(lambda: any(c.need > LARGE_FRAME for c in connections()), "a large frame")
    send(frame[1000:])


Server = TypeVar("Server", Upstream, StreamServer)


@contextlib.asynccontextmanager
async def buggy_engine(
    server: Server, router: str | None = None
) -> AsyncIterator[tuple[Engine, Server]]:
    """The engine with the buggy codec in front of ``server`` (started here, closed on exit).
    On a clean exit it checks that nothing is left in flight (:func:`settled`) and that the
    loop's exception handler was never called (a traceback in the log, otherwise)."""
    errors = record_loop_errors()
    up = await server.start()
    # A client that half-closes leaves its streams timeouts.drain to end (10 s by default,
    # which two tests waited for in settled()).
    drain = "timeouts: {drain: 200ms}\n"
    try:
        text = mesh([(up.port, "v1")], router=router, codec=CODEC, proxy=drain)
        async with engine_for(text) as engine:
            yield engine, up
            await settled(engine)
    finally:
        await up.close()
    assert errors == []


def run_checking_log(
    caplog: pytest.LogCaptureFixture, main: Coroutine[Any, Any, None], method: str, exc: str
) -> None:
    """Run ``main`` logging at INFO, then :func:`check_log` for ``method`` and ``exc``."""
    with caplog.at_level(logging.INFO):
        run(main)
    check_log(caplog, method, exc)


async def served(engine: Engine) -> None:
    """Another client is served meanwhile, and after."""
    other = await Client.connect(address(engine))
    reply = await other.call("get")
    assert error_type(reply) is None
    other.close()


# -- the client's side --------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "exc"), [("decode", "IndexError"), ("decode_frame", "error")])
def test_a_frame_the_codec_fails_on_closes_its_connection_after_the_earlier_replies(
    caplog: pytest.LogCaptureFixture, method: str, exc: str
) -> None:
    """``decode`` (or ``decode_frame``, for a large frame) raises on a client's frame: as a
    frame nothing can follow. The request before it is still answered, nothing after it is
    read, then the connection closes; counted as a decode error and a ``codec_error`` close."""

    async def main() -> None:
        async with buggy_engine(Upstream("a")) as (engine, up):
            c = await Client.connect(address(engine))
            first = c.start("slow", rid=1)
            await up.wait_received(1)
            failed = c.expect(2)
            frame = build_frame(REQUEST, 2, {"method": "get", **boom(method)})
            if method == "decode":
                c.send(frame)
            else:
                frame = build_frame(REQUEST, 2, {"method": "get", **boom(method)}, bytes(BIG))
                await in_two(c.send, frame, lambda: engine.downstreams)
            after = c.start(rid=3)
            await until(lambda: codec_errors(engine, method) == 1, "the bug")
            await served(engine)
            up.release.set()
            assert error_type(await asyncio.wait_for(first, WAIT)) is None
            await asyncio.wait_for(c.closed, WAIT)
            for fut in (failed, after):
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(fut, WAIT)
            assert [m.request_id for m in up.received if m.operation_name != "get"] == [1]
            stats = engine.stats
            assert stats.get(
                "metaprotocol_decode_errors_total", listener="svc.test:9000", side="downstream"
            ) == (1)
            assert closed_by(engine, "codec_error") == 1
            assert stats.total("metaprotocol_local_replies_total") == 0

    run_checking_log(caplog, main(), method, exc)


def test_a_heartbeat_the_codec_fails_to_answer_is_not_answered_and_the_connection_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with buggy_engine(Upstream("a")) as (engine, _):
            c = await Client.connect(address(engine))
            c.send(build_frame(PING, 9, boom("heartbeat_reply")))
            assert error_type(await c.call(rid=10)) is None
            assert codec_errors(engine, "heartbeat_reply") == 1
            assert c.unmatched == []  # no pong
            assert closed_by(engine, "codec_error") == 0
            c.close()

    run_checking_log(caplog, main(), "heartbeat_reply", "TypeError")


ROUTES = """\
- name: served
  match: {attributes: {method: {regex: "get|slow"}}}
  route: [{destination: {host: svc.test, subset: v1}}]
"""


def test_a_local_reply_the_codec_fails_to_build_closes_the_connection_after_the_earlier_replies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``on_error`` raises for a request the engine answers itself (no route): nothing can
    answer it, so the client is read no more and closed once its earlier request is answered,
    as after a frame nothing can answer; no local reply is counted (none was sent)."""

    async def main() -> None:
        async with buggy_engine(Upstream("a"), ROUTES) as (engine, up):
            c = await Client.connect(address(engine))
            first = c.start("slow", rid=1)
            failed = c.start("nowhere", boom("on_error"), rid=2)
            await up.wait_received(1)
            await until(lambda: codec_errors(engine, "on_error") == 1, "the bug")
            await served(engine)
            up.release.set()
            assert error_type(await asyncio.wait_for(first, WAIT)) is None
            await asyncio.wait_for(c.closed, WAIT)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(failed, WAIT)
            stats = engine.stats
            assert closed_by(engine, "codec_error") == 1
            assert stats.total("metaprotocol_local_replies_total") == 0
            assert stats.total("metaprotocol_requests_total", status="DownstreamClosed") == 1

    run_checking_log(caplog, main(), "on_error", "RecursionError")


def test_an_empty_local_reply_is_a_codec_bug_named_in_the_log_as_one_that_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``on_error`` returns ``b""`` for a request the engine answers itself: the engine sent
    nothing and said nothing, and the client waited for its own timeout. Now it is the bug it
    is: logged and counted, and the client closed once its earlier request is answered."""

    async def main() -> None:
        async with buggy_engine(Upstream("a"), ROUTES) as (engine, up):
            c = await Client.connect(address(engine))
            first = c.start("slow", rid=1)
            failed = c.start("nowhere", boom("on_error-empty"), rid=2)
            await up.wait_received(1)
            await until(lambda: codec_errors(engine, "on_error") == 1, "the bug")
            await served(engine)
            up.release.set()
            assert error_type(await asyncio.wait_for(first, WAIT)) is None
            await asyncio.wait_for(c.closed, WAIT)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(failed, WAIT)
            assert closed_by(engine, "codec_error") == 1
            assert engine.stats.total("metaprotocol_local_replies_total") == 0

    with caplog.at_level(logging.INFO):
        run(main())
    records = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(records) == 1, records
    assert records[0].startswith(
        f"codec {NAME}: on_error: returned an empty reply to answer RouteNotFound (the "
        "protocol's error reply is owed), a bug in the codec: the client is read no more"
    ), records


def test_a_reply_the_codec_cannot_relabel_nor_answer_closes_the_client_after_its_other_replies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``relabel`` raises on a reply (answered ``BadResponse`` by the engine), and so does
    ``on_error`` for that answer: the request is settled (counted ``DownstreamClosed``), the
    client's earlier request still answered, then its connection closes."""

    async def main() -> None:
        async with buggy_engine(Upstream("a")) as (engine, up):
            c = await Client.connect(address(engine))
            first = c.start("slow", rid=1)
            failed = c.start(headers=boom("up-relabel", "on_error"), rid=2)
            await until(lambda: codec_errors(engine, "on_error") == 1, "the bug")
            assert codec_errors(engine, "relabel") == 1
            await served(engine)
            up.release.set()
            assert error_type(await asyncio.wait_for(first, WAIT)) is None
            await asyncio.wait_for(c.closed, WAIT)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(failed, WAIT)
            stats = engine.stats
            assert closed_by(engine, "codec_error") == 1
            assert stats.total("metaprotocol_requests_total", status="DownstreamClosed") == 1
            assert stats.total("metaprotocol_upstream_connections_total") == 1  # it went on

    run_checking_log(caplog, main(), "relabel", "UnicodeDecodeError")


def test_a_request_the_codec_fails_to_encode_is_answered_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with buggy_engine(Upstream("a")) as (engine, _):
            c = await Client.connect(address(engine))
            reply = await c.call(headers=boom("encode"))
            assert error_type(reply) == "BadRequest"
            said = reply.attributes.get("error-message", "")
            assert "encode raised ValueError" in said and "bad byte" not in said, said
            assert error_type(await c.call()) is None
            assert codec_errors(engine, "encode") == 1
            c.close()

    run_checking_log(caplog, main(), "encode", "ValueError")


# -- the upstream's side ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "exc", "size"),
    [
        ("decode", "IndexError", 0),
        ("peek_reply", "IndexError", 0),
        ("decode_frame", "KeyError", BIG),
    ],
)
def test_a_reply_the_codec_fails_on_resets_the_upstream_connection_its_requests_bad_response(
    caplog: pytest.LogCaptureFixture, method: str, exc: str, size: int
) -> None:
    """``decode``, ``peek_reply`` or ``decode_frame`` raises on an upstream's reply: as a reply
    the codec refuses with no extent, the connection's requests get ``BadResponse`` and it is
    reset; the clients go on, on a new connection."""

    async def main() -> None:
        async with buggy_engine(Upstream("a")) as (engine, up):
            c = await Client.connect(address(engine))
            headers = boom(f"up-{method}")
            if size:  # the reply, written by hand in two parts
                pending = c.start("hang", headers)
                await up.wait_received(1)
                (conn,) = up.connections
                assert conn.transport is not None
                wire = up.received[0].request_id
                echo = {"req-boom0": headers["boom0"]}
                frame = build_frame(RESPONSE, wire, echo, bytes(size))
                await in_two(conn.transport.write, frame, lambda: engine.upstreams)
                reply = await asyncio.wait_for(pending, WAIT)
            else:
                reply = await c.call("get", headers)
            assert error_type(reply) == "BadResponse"
            said = reply.attributes.get("error-message", "")
            assert f"{method} raised {exc}" in said and "bad byte" not in said, said
            assert error_type(await c.call()) is None
            stats = engine.stats
            assert codec_errors(engine, method) == 1
            assert stats.total("metaprotocol_decode_errors_total", side="upstream") == 1
            assert stats.total("metaprotocol_upstream_connections_total") == 2
            assert closed_by(engine, "codec_error") == 0
            c.close()

    run_checking_log(caplog, main(), method, exc)


def test_an_upstream_heartbeat_the_codec_fails_to_answer_is_not_answered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with buggy_engine(Upstream("a")) as (engine, up):
            c = await Client.connect(address(engine))
            assert error_type(await c.call()) is None
            (conn,) = up.connections
            assert conn.transport is not None
            conn.transport.write(build_frame(PING, 777, {"req-boom": "<up-heartbeat_reply>"}))
            await until(lambda: codec_errors(engine, "heartbeat_reply") == 1, "the bug")
            assert error_type(await c.call()) is None  # on the same connection: no pong before
            assert up.pongs == [] and up.accepted == 1
            c.close()

    run_checking_log(caplog, main(), "heartbeat_reply", "TypeError")


# -- streams ------------------------------------------------------------------------------------


def test_a_stream_frame_the_codec_fails_on_resets_the_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``decode`` raises on a frame the stream's upstream sends: the stream is reset (the
    client gets the error reply with its id) and the client's connection goes on."""

    async def main() -> None:
        async with buggy_engine(StreamServer()) as (engine, _):
            c = await StreamClient.connect(address(engine))
            c.frame(STREAM_OPEN, 1, {"method": "chat", **boom("up-decode")})
            (reset,) = await c.until(1, 1)
            assert error_type(reset) == "BadResponse"
            assert streams(engine, "BadResponse") == 1
            assert codec_errors(engine, "decode") == 1
            c.frame(STREAM_OPEN, 2, {"method": "chat"})
            (opened,) = await c.until(2, 1)
            assert opened.message_type.name == "Stream_Init"
            assert closed_by(engine, "codec_error") == 0
            c.close()

    run_checking_log(caplog, main(), "decode", "IndexError")


def test_a_stream_reset_the_codec_fails_to_answer_ends_the_stream_and_closes_the_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``on_error`` raises for a stream's reset (its upstream dropped it): the stream still
    ends (counted, its connection gone), and the client, who cannot be told, is closed."""

    async def main() -> None:
        async with buggy_engine(StreamServer()) as (engine, _):
            c = await StreamClient.connect(address(engine))
            c.frame(STREAM_OPEN, 1, {"method": "drop", **boom("on_error")})
            await asyncio.wait_for(c.closed, WAIT)
            assert c.frames[1] == []
            assert streams(engine, "UpstreamReset") == 1
            assert codec_errors(engine, "on_error") == 1
            assert closed_by(engine, "codec_error") == 1
            assert engine.stats.total("metaprotocol_local_replies_total") == 0
            await served_streams(engine)
            await settled(engine)
            await until(lambda: not engine.upstreams and not engine.downstreams, "all closed")

    run_checking_log(caplog, main(), "on_error", "RecursionError")


async def served_streams(engine: Engine) -> None:
    """Another client's stream is served."""
    other = await StreamClient.connect(address(engine))
    other.frame(STREAM_OPEN, 1, {"method": "chat"})
    (opened,) = await other.until(1, 1)
    assert opened.message_type.name == "Stream_Init"
    other.close()


# -- the log ------------------------------------------------------------------------------------


def test_a_client_that_reaches_the_bug_again_and_again_cannot_flood_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every failure is counted; the log gets one line per ``LOG_INTERVAL`` (here the whole
    test), the next saying how many were left out."""

    async def main() -> None:
        async with buggy_engine(Upstream("a")) as (engine, _):
            clients = [await Client.connect(address(engine)) for _ in range(20)]
            for c in clients:
                c.send(build_frame(REQUEST, 1, {"method": "get", **boom("decode")}))
            await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), WAIT)
            assert codec_errors(engine, "decode") == 20
            assert closed_by(engine, "codec_error") == 20

    run_checking_log(caplog, main(), "decode", "IndexError")
