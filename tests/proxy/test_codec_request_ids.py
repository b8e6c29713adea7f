"""A codec that declares ``rewrite_request_id`` but whose ``encode`` does not write the new id
it is given: on a shared upstream connection, the upstream would answer with the client's id,
which may be the id the engine gave another client's request there (that client would get
the reply). The engine checks the first requests of each shared connection as they are sent
(decoded again), answers one with the wrong id locally, names the codec (one log line and
``metaprotocol_codec_errors_total{method="encode"}``) and serves the codec dedicated from
then on. Before, only the unmatched replies counter grew, with nothing saying why (the kit's
``mutation_with_request_id`` finds it)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import pytest
from proxy_kit import (
    ONEWAY,
    RESPONSE,
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

from metaprotocol_sdk import Encoded, MessageType, Metadata, Mutation
from metaprotocol_sdk.examples.kv import KVCodec
from metaprotocol_sdk.proxy import codec_bugs, loads_config, upstream

#: By this module's own name: by its file name the engine would import a second copy of it.
CODEC = f"{__name__}:IdKeepingKV"
#: The requests checked as they are sent on each shared connection (``ENCODE_CHECKS``).
CHECKS = 4
ROUTER = """\
- name: all
  route: [{destination: {host: svc.test}}]
  timeout: 300ms
"""


class IdKeepingKV(KVCodec):
    """The KV codec with a bug: ``encode`` keeps the frame's own id, whatever it is given."""

    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        return super().encode(message, mutation)


def test_a_codec_that_does_not_write_the_new_request_id_is_named(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first request on the shared connection is checked as it is sent (decoded again):
    the id written is the client's 7777, not the engine's 1. It is answered locally with the
    codec's error reply (not sent), the codec is named once (a log line, a counted error) and
    served dedicated from then on: the next requests go on the client's own connection, with
    its own ids, and are answered. (Before, each waited for its timeout.)"""
    monkeypatch.setattr(codec_bugs, "LOG_INTERVAL", 3600.0)

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")], router=ROUTER, codec=CODEC)) as engine:
            c = await Client.connect(address(engine))
            first = await c.call(rid=7777)
            assert error_type(first) == "BadRequest"
            assert "did not write the request id" in str(first.attributes.get("error-message"))
            seen = [error_type(await c.call(rid=7778 + i)) for i in range(2)]
            assert seen == [None, None]  # dedicated: the client's ids are the connection's
            assert [m.request_id for m in up.received] == [7778, 7779]  # the first not sent
            errors: Any = engine.stats.total(
                "metaprotocol_codec_errors_total", codec=CODEC, method="encode"
            )
            assert errors == 1
            assert engine.stats.total("metaprotocol_upstream_unmatched_replies_total") == 0
            (cluster,) = engine.config_dump()["clusters"]
            assert cluster["pooling"] == "dedicated"
            c.close()
        await up.close()

    with caplog.at_level(logging.INFO):
        run(main())
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert (
        f"codec {CODEC}: encode: a request on cluster outbound|9000||svc.test was encoded "
        "with id 7777, not the id 1 encode was asked to write" in lines[0]
    )
    assert "from now on each client connection gets its own upstream connections" in lines[0]


def test_a_one_way_message_with_the_wrong_id_is_dropped_and_later_clusters_stay_dedicated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A one-way message is checked too (an upstream that answers it anyway would answer
    whichever request has its id): dropped, counted ``BadRequest``, the codec served
    dedicated. A reload that builds the cluster anew (another endpoint) keeps it dedicated:
    the codec's class, not the cluster, is what does not write the ids."""

    async def main() -> None:
        up = await Upstream("a").start()
        other = await Upstream("b").start()
        async with engine_for(mesh([(up.port, "v1")], router=ROUTER, codec=CODEC)) as engine:
            c = await Client.connect(address(engine))
            c.send(build_frame(ONEWAY, 7777, {"method": "log"}))
            dropped = "metaprotocol_oneway_total"
            await until(lambda: engine.stats.total(dropped, status="BadRequest") == 1, "drop")
            assert engine.stats.total("metaprotocol_codec_errors_total", method="encode") == 1
            assert error_type(await c.call(rid=5)) is None  # on the client's own connection
            text = mesh([(other.port, "v1")], router=ROUTER, codec=CODEC)
            await engine.apply(loads_config(text, "t2.yaml"))
            (cluster,) = engine.config_dump()["clusters"]
            assert cluster["endpoints"] == [f"127.0.0.1:{other.port}"]
            assert cluster["pooling"] == "dedicated"
            assert error_type(await c.call(rid=6)) is None
            assert [m.request_id for m in other.received] == [6]
            assert engine.stats.total("metaprotocol_codec_errors_total", method="encode") == 1
            c.close()
        await up.close()
        await other.close()

    with caplog.at_level(logging.INFO):
        run(main())
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1, lines


def test_requests_waiting_for_room_are_not_sent_on_a_connection_of_nobodys() -> None:
    """``maxConcurrentStreams: 1``, ``maxConnections: 1``: one request in flight on the shared
    connection (its id happens to be the engine's, so it passes), three more wait for room.
    Its reply makes room: the next one sent is found with the wrong id (answered
    ``BadRequest``), and the two still waiting are routed again as requests of a codec
    without id rewriting: each to its client's own connection, within ``maxConnections``
    (the shared connection, closing, still counts: ``OverLimit``), never to a connection
    opened as a shared one for nobody, which any client's request could then take."""
    pool = "{connectionPool: {http: {maxConcurrentStreams: 1}, tcp: {maxConnections: 1}}}"
    router = ROUTER.replace("300ms", "5s")

    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh([(up.port, "v1")], router=router, codec=CODEC, traffic_policy=pool)
        async with engine_for(text) as engine:
            clients = [await Client.connect(address(engine)) for _ in range(4)]
            first = clients[0].start("slow", headers={"who": "0"}, rid=1)
            await up.wait_received(1)
            rest = [c.start(headers={"who": str(i)}, rid=7) for i, c in enumerate(clients) if i]
            queued = "metaprotocol_upstream_requests_queued_total"
            await until(lambda: engine.stats.total(queued) == 3, "three waiting for room")
            up.release.set()
            assert _own("0", await asyncio.wait_for(first, 4))
            replies = await asyncio.wait_for(asyncio.gather(*rest), 4)
            assert error_type(replies[0]) == "BadRequest"
            for i, reply in enumerate(replies[1:], 2):
                assert _own(str(i), reply) or error_type(reply) == "OverLimit", (i, reply)
            assert up.accepted == 1  # the shared connection only
            active = "metaprotocol_upstream_connections_active"
            await until(lambda: engine.stats.total(active) == 0, "the shared one closed")
            assert _own("3", await clients[3].call(headers={"who": "3"}, rid=8))
            assert up.accepted == 2  # client 3's own
            assert engine.stats.total("metaprotocol_codec_errors_total", method="encode") == 1
            for c in clients:
                c.close()
        await up.close()

    run(main())


def _own(who: str, reply: Metadata) -> bool:
    """Whether ``reply`` answers a request of client ``who`` (the upstream echoes headers)."""
    return reply.attributes.get("req-who") == who


def test_two_clients_with_the_same_ids_never_get_each_others_replies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two clients numbering their requests from 1 share one upstream connection through a
    codec that writes the client's id instead of the engine's. A's first six requests have
    the engine's ids (1 to 6: they pass, and are not among the requests checked); B's first
    (engine id 7, written 1) would make the upstream's reply to A's seventh (engine id 8,
    written 7) answer B's request, engine id 7: A's data to B. The check refuses B's request
    as it is sent (answered ``BadRequest``); from then on each client has its own upstream
    connection, and every reply is its own client's."""

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")], router=ROUTER, codec=CODEC)) as engine:
            a = await Client.connect(address(engine))
            b = await Client.connect(address(engine))
            for rid in range(1, 7):
                assert _own("a", await a.call(headers={"who": "a"}, rid=rid))
            b1 = b.start(headers={"who": "b"}, rid=1)
            # B's request at the upstream (or answered by the engine) before A's seventh.
            await until(lambda: len(up.received) == 7 or b1.done(), "B's request handled")
            a7 = a.start(headers={"who": "a"}, rid=7)
            replies = await asyncio.wait_for(asyncio.gather(a7, b1), 4)
            assert not _own("a", replies[1]), "A's reply delivered to B"
            assert _own("a", replies[0]), replies[0].attributes.to_dict()
            assert error_type(replies[1]) == "BadRequest"
            for rid in range(8, 28):  # both clients, the same ids, concurrently
                ra, rb = await asyncio.wait_for(
                    asyncio.gather(
                        a.start(headers={"who": "a"}, rid=rid),
                        b.start(headers={"who": "b"}, rid=rid),
                    ),
                    4,
                )
                assert _own("a", ra) and _own("b", rb), (rid, ra, rb)
            assert a.unmatched == [] and b.unmatched == []
            assert up.accepted == 3  # the shared connection, then one per client
            assert engine.stats.total("metaprotocol_codec_errors_total", method="encode") == 1
            a.close()
            b.close()
        await up.close()

    with caplog.at_level(logging.INFO):
        run(main())
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines


class LateIdKeepingKV(KVCodec):
    """The KV codec with a bug on one path only: a request with the header ``keep-id``
    keeps its own id, whatever ``encode`` is given (the first requests of a connection, which
    the engine checks, have none)."""

    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        if message.attributes.get("keep-id"):
            request_id = None
        return super().encode(message, mutation, request_id=request_id)


def test_a_codec_that_keeps_the_id_on_one_path_is_served_dedicated_once_seen(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the requests checked as they are sent, a reply carrying a client's id above the
    ones the engine gave (``_unmatched``) says the same: the codec is named once and served
    dedicated from then on, so the path that keeps the id cannot answer another client."""
    monkeypatch.setattr(codec_bugs, "LOG_INTERVAL", 3600.0)
    codec = f"{__name__}:LateIdKeepingKV"

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")], router=ROUTER, codec=codec)) as engine:
            c = await Client.connect(address(engine))
            for rid in range(100, 100 + CHECKS):  # checked: the ids are written
                assert error_type(await c.call(rid=rid)) is None
            keep = {"keep-id": "1"}
            assert error_type(await c.call(headers=keep, rid=7777)) == "Timeout"
            (cluster,) = engine.config_dump()["clusters"]
            assert cluster["pooling"] == "dedicated"
            assert error_type(await c.call(headers=keep, rid=7778)) is None
            assert engine.stats.total("metaprotocol_codec_errors_total", method="encode") == 1
            c.close()
        await up.close()

    with caplog.at_level(logging.INFO):
        run(main())
    assert upstream.ENCODE_CHECKS == CHECKS
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert "carried id 7777" in lines[0] and "its own upstream connections" in lines[0]


class RequestCountingKV(KVCodec):
    """The correct KV codec, counting the requests it decodes (in every instance)."""

    request_decodes = 0

    def decode(self, buffer: bytearray) -> Metadata | Any:
        message = super().decode(buffer)
        if isinstance(message, Metadata) and message.message_type is MessageType.Request:
            RequestCountingKV.request_decodes += 1
        return message


def test_a_correct_codec_is_decoded_again_for_the_first_requests_of_a_connection_only() -> None:
    """A correct codec: each shared connection's first ``ENCODE_CHECKS`` requests are
    decoded once more (the check), and none after: the check costs per connection, not per
    request; and the connection stays shared (one for both clients). A request whose own id
    is the one the engine gives it is not checked (it could not tell a codec that ignores
    the id), nor counted among them."""
    codec = f"{__name__}:RequestCountingKV"
    checks = CHECKS

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")], router=ROUTER, codec=codec)) as engine:
            a = await Client.connect(address(engine))
            b = await Client.connect(address(engine))
            RequestCountingKV.request_decodes = 0
            assert error_type(await a.call(rid=1)) is None  # the engine's id 1 too
            assert RequestCountingKV.request_decodes == 1  # the client's only
            for rid in range(100, 100 + checks):
                assert error_type(await a.call(rid=rid)) is None
            assert RequestCountingKV.request_decodes == 1 + 2 * checks  # the client's, the check's
            for c in (a, b, a, b):
                for _ in range(25):
                    assert error_type(await c.call()) is None
            assert RequestCountingKV.request_decodes == 1 + 2 * checks + 100  # the clients' only
            assert up.accepted == 1
            (cluster,) = engine.config_dump()["clusters"]
            assert cluster["pooling"] == "shared"
            assert engine.stats.total("metaprotocol_codec_errors_total") == 0
            a.close()
            b.close()
        await up.close()

    run(main())
    assert upstream.ENCODE_CHECKS == CHECKS


def test_a_late_reply_to_a_timed_out_request_does_not_name_a_correct_codec(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request times out on a shared connection (engine id 1); another request, which its
    client also numbered 1, is in flight there under engine id 2 when the first one's reply
    comes, late, with id 1: dropped as unmatched, and nothing more. The correct KV codec was
    named as one that did not write the id it was given (the late id equals the client's
    id of a request in flight): an error line and a codec error counted."""

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")], router=ROUTER)) as engine:
            c = await Client.connect(address(engine))
            assert error_type(await c.call("slow", rid=1)) == "Timeout"
            second = c.start("hang", rid=1)
            await until(lambda: len(up.received) == 2, "the second request at the upstream")
            up.release.set()  # the first one's reply, late
            unmatched = "metaprotocol_upstream_unmatched_replies_total"
            await until(lambda: engine.stats.total(unmatched) == 1, "the late reply dropped")
            assert engine.stats.total("metaprotocol_codec_errors_total", method="encode") == 0
            assert error_type(await second) == "Timeout"
            c.close()
        await up.close()

    with caplog.at_level(logging.INFO):
        run(main())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


class LyingServer(asyncio.Protocol):
    """An upstream that answers each request with the id its header ``answer-as`` names,
    not the one it was sent (as a hostile upstream may, guessing the ids clients use)."""

    def __init__(self) -> None:
        self.codec = KVCodec()
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while isinstance(message := self.codec.decode(self.buffer), Metadata):
            rid = int(message.attributes.get("answer-as") or message.request_id)
            self.transport.write(build_frame(RESPONSE, rid, {"server": "liar"}))


def test_an_upstream_answering_with_a_client_s_id_does_not_name_a_correct_codec(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hostile upstream answers the first request of a shared connection (engine id 1)
    with id 5, the id its client gave it: taken as proof that the (correct) KV codec did not
    write the id it was given, the codec was named in an error line and its class served
    dedicated for the rest of the process, every cluster of it, whatever their upstreams:
    one upstream's bytes changed how the whole engine pools its connections. The engine now
    encodes that request again, as it was sent (a fresh codec, the same mutation and id), and
    decodes it: the id is written, so the reply is only one nobody waits for."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(LyingServer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        router = ROUTER + "  requestMutation: [{key: x-added, value: '1'}]\n"
        async with engine_for(mesh([(port, "v1")], router=router)) as engine:
            c = await Client.connect(address(engine))
            assert error_type(await c.call(rid=5, headers={"answer-as": "5"})) == "Timeout"
            unmatched = "metaprotocol_upstream_unmatched_replies_total"
            assert engine.stats.total(unmatched) == 1
            assert engine.stats.total("metaprotocol_codec_errors_total", method="encode") == 0
            (cluster,) = engine.config_dump()["clusters"]
            assert cluster["pooling"] == "shared"
            assert error_type(await c.call(rid=6)) is None
            c.close()
        server.close()
        await server.wait_closed()

    with caplog.at_level(logging.INFO):
        run(main())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


class TinyIdKV(KVCodec):
    """The KV codec with room for three request ids only."""

    max_request_id = 3


def test_a_codec_whose_ids_are_all_in_flight_waits_for_one() -> None:
    """A codec of three request ids (``max_request_id``) on one shared connection
    (``maxConnections: 1``): two requests in flight (the third id kept for one-way
    messages), the next ones wait for a free id and go as the first time out. The engine
    looked for a free id forever once, and its loop hung; then it answered BadRequest."""
    codec = f"{__name__}:TinyIdKV"
    pool = "{connectionPool: {tcp: {maxConnections: 1}}}"

    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh([(up.port, "v1")], router=ROUTER, codec=codec, traffic_policy=pool)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            hung = [c.start("hang") for _ in range(2)]
            waiting = c.start("get")
            answers = await asyncio.wait_for(asyncio.gather(*hung), 4)
            assert [error_type(a) for a in answers] == ["Timeout"] * 2
            # (the wait counts against the route's timeout: sent as the first ones time out,
            # it may time out too, or be answered: either way, it was never refused)
            assert error_type(await asyncio.wait_for(waiting, 4)) in (None, "Timeout")
            assert engine.stats.total("metaprotocol_upstream_requests_queued_total") == 1
            assert engine.pending == 0
            c.close()
        await up.close()

    run(main())
