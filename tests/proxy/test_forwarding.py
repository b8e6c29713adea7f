"""Replies a codec can peek at are forwarded without being decoded, unless a mutation applies."""

from __future__ import annotations

import asyncio
import struct

import pytest
import uvloop
from proxy_kit import (
    ERROR,
    PING,
    REQUEST,
    RESPONSE,
    Client,
    CountingKVCodec,
    Upstream,
    address,
    build_frame,
    engine_for,
    gather,
    mesh,
    run,
    wire_fakes,
)

from metaprotocol_sdk import MessageType, ResponseStatus, join_encoded
from metaprotocol_sdk.examples.kv import KVCodec
from metaprotocol_sdk.proxy import Engine, loads_config

ROUTER = """\
- name: mutated
  match: {attributes: {method: {regex: "mutate|renumber"}}}
  route: [{destination: {host: svc.test}}]
  responseMutation: [{key: x-proxy, value: metaprotocol}]
- name: plain
  route: [{destination: {host: svc.test}}]
"""
METHODS = ["get", "mutate", "fail", "get", "mutate"]


@pytest.mark.parametrize(
    ("protocol", "codec"), [("kvc", "CountingKVCodec"), ("kvcd", "CountingDedicatedKVCodec")]
)
def test_only_mutated_replies_are_decoded(protocol: str, codec: str) -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh(
            [(up.port, "v1")], router=ROUTER, protocol=protocol, codec=f"proxy_test_codecs:{codec}"
        )
        CountingKVCodec.reply_decodes = 0
        async with engine_for(text) as engine:
            clients = [await Client.connect(address(engine)) for _ in range(3)]
            # Every client uses the same ids: the replies must still find their way back.
            sent = [(rid, m, i) for rid, m in enumerate(METHODS, 1) for i in range(3)]
            replies = await gather(
                *(clients[i].start(m, {"who": f"{i}-{m}"}, m.encode(), rid) for rid, m, i in sent)
            )
            for reply, (rid, method, i) in zip(replies, sent, strict=True):
                assert reply.request_id == rid
                assert reply.attributes["req-who"] == f"{i}-{method}"
                assert bytes(reply.body) == method.encode()
                assert ("x-proxy" in reply.attributes) == (method == "mutate")
                assert (reply.message_type is MessageType.Error) == (method == "fail")
            # The engine decoded only the replies a response mutation had to be written into.
            assert CountingKVCodec.reply_decodes == 2 * 3
            total = engine.stats.total
            assert total("metaprotocol_requests_total", route="plain", status="Ok") == 6
            assert total("metaprotocol_requests_total", route="plain", status="Error") == 3
            assert total("metaprotocol_requests_total", route="mutated", status="Ok") == 6
            for c in clients:
                assert c.unmatched == []
                c.close()
        await up.close()

    run(main())


def test_a_reply_paired_by_arrival_order_still_gets_its_mutation() -> None:
    # Without id rewriting, a reply whose id matches no request pairs with the oldest one:
    # the engine must take that request's route (with a response mutation) into account.
    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh(
            [(up.port, "v1")],
            router=ROUTER,
            protocol="kvcd",
            codec="proxy_test_codecs:CountingDedicatedKVCodec",
        )
        CountingKVCodec.reply_decodes = 0
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            reply = c.expect(1007)
            c.send(build_frame(REQUEST, 7, {"method": "renumber"}))
            got = await asyncio.wait_for(reply, 5)
            assert got.attributes["x-proxy"] == "metaprotocol"
            assert CountingKVCodec.reply_decodes == 1
            c.close()
        await up.close()

    run(main())


def test_peek_reply_leaves_anything_else_to_decode() -> None:
    codec = KVCodec()
    reply = build_frame(RESPONSE, 7, {"k": "v"}, b"body")
    assert codec.peek_reply(bytearray(reply)) == (7, len(reply), ResponseStatus.Ok)
    assert codec.peek_reply(bytearray(reply + reply)) == (7, len(reply), ResponseStatus.Ok)
    error = build_frame(ERROR, 8, {"error-type": "x"})
    assert codec.peek_reply(bytearray(error)) == (8, len(error), ResponseStatus.Error)
    for other in (build_frame(REQUEST, 1), build_frame(PING, 2), reply[:-1], b"XX" + reply[2:]):
        assert codec.peek_reply(bytearray(other)) is None
    assert KVCodec(max_frame_size=len(reply) - 1).peek_reply(bytearray(reply)) is None
    decoded = codec.decode(bytearray(reply))
    relabelled = join_encoded(codec.relabel(reply, 99))
    assert relabelled == join_encoded(codec.encode(decoded, request_id=99))  # type: ignore[arg-type]


def test_peeked_replies_split_across_reads_or_sharing_one() -> None:
    # Replies reach the engine in arbitrary pieces: a reply is forwarded once it is complete,
    # several in one read each go out, and none of them is decoded.

    async def main() -> None:
        text = mesh(
            [(1, "v1")], router=ROUTER, protocol="kvc", codec="proxy_test_codecs:CountingKVCodec"
        )
        engine = Engine(loads_config(text))
        await engine.start()
        down, down_t, up, up_t = wire_fakes(engine)
        CountingKVCodec.reply_decodes = 0
        for rid in (11, 12, 13):
            down.data_received(build_frame(REQUEST, rid, {"method": "get"}, b"x"))
        up._flush()
        sent = b"".join(bytes(b) for call in up_t.calls for b in call)
        wire_ids = [
            struct.unpack_from(">I", sent, at + 4)[0] for at in range(0, len(sent), len(sent) // 3)
        ]
        replies = b"".join(build_frame(RESPONSE, w, {"n": str(w)}, b"reply") for w in wire_ids)
        one = len(replies) // 3
        for byte in replies[:one]:  # the first reply byte by byte
            up.data_received(bytes([byte]))
        up.data_received(replies[one : one + one + 5])  # the second and part of the third
        up.data_received(replies[one + one + 5 :])
        got = b"".join(bytes(b) for call in down_t.calls for b in call)
        kv = KVCodec()
        buffer = bytearray(got)
        ids = []
        while buffer:
            message = kv.decode(buffer)
            ids.append(message.request_id)  # type: ignore[union-attr]
        assert ids == [11, 12, 13]
        assert CountingKVCodec.reply_decodes == 0
        await engine.stop(drain=0.1)

    uvloop.run(main())
