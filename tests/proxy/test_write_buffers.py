"""How encoded messages reach the transports: small multi-buffer encodes are joined into one
buffer (one item for the transport per message), large ones keep the codec's zero-copy slices."""

from __future__ import annotations

import struct
from typing import Any

import uvloop
from proxy_kit import mesh, wire_fakes

from metaprotocol_sdk import join_encoded
from metaprotocol_sdk.examples.kv import REQUEST, RESPONSE, KVCodec, build_frame
from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.upstream import JOIN_LIMIT

ROUTER = """\
- name: all
  requestMutation: [{key: x-req, value: "1"}]
  responseMutation: [{key: x-resp, value: "2"}]
  route: [{destination: {host: svc.test, subset: v1}}]
"""


def exchange(body_size: int) -> tuple[list[list[Any]], list[list[Any]], bytes, bytes]:
    """One request and its response through the engine; what each transport was given."""
    result: list[Any] = []

    async def main() -> None:
        engine = Engine(loads_config(mesh([(1, "v1")], router=ROUTER)))
        await engine.start()
        down, down_t, up, up_t = wire_fakes(engine)
        request = build_frame(REQUEST, 7, {"method": "m"}, b"q" * body_size)
        down.data_received(request)
        up._flush()  # normally run by the loop once it has delivered all it read
        sent = b"".join(bytes(b) for b in up_t.calls[0])
        wire_id = struct.unpack_from(">I", sent, 4)[0]
        up.data_received(build_frame(RESPONSE, wire_id, {"s": "1"}, b"r" * body_size))
        result.extend([up_t.calls, down_t.calls, sent, request])
        await engine.stop(drain=0.1)

    uvloop.run(main())
    return result[0], result[1], result[2], result[3]


def test_small_messages_reach_the_transport_as_one_buffer() -> None:
    to_upstream, to_client, sent, request = exchange(64)
    assert [len(call) for call in to_upstream] == [1]
    assert [len(call) for call in to_client] == [1]
    (forwarded,) = to_upstream[0]
    assert type(forwarded) is bytes
    codec = KVCodec()
    message = codec.decode(bytearray(request))
    expected = join_encoded(codec.encode(message, {"x-req": "1"}, request_id=1))  # type: ignore[arg-type]
    assert forwarded == sent == expected
    reply = codec.decode(bytearray(b"".join(bytes(b) for b in to_client[0])))
    assert reply.request_id == 7 and reply.attributes["x-resp"] == "2"  # type: ignore[union-attr]


def test_large_messages_keep_the_codecs_zero_copy_buffers() -> None:
    to_upstream, to_client, _, request = exchange(JOIN_LIMIT + 1)
    (buffers,) = to_upstream
    assert len(buffers) == 3  # KV's mutated form: fixed header, headers block, body slice
    body = buffers[-1]
    assert isinstance(body, memoryview) and body.obj == request  # a view of the frame read
    assert len(to_client) == 1 and len(to_client[0]) == 3
    codec = KVCodec()
    reply = codec.decode(bytearray(b"".join(bytes(b) for b in to_client[0])))
    assert reply.request_id == 7 and reply.attributes["x-resp"] == "2"  # type: ignore[union-attr]
