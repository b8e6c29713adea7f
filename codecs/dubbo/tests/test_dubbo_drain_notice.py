"""Dubbo's drain notice: the read-only event a provider sends each consumer when it shuts down
gracefully (``HeaderExchangeServer.sendChannelReadOnlyEvent``), built and recognised by our
codec and checked against dubbo-remoting 2.1.4's own encoder and decoder."""

from __future__ import annotations

import json

import pytest
from dubbo_harness import (
    LineProcess,
    Relay,
    run_node_script,
)
from metaprotocol_dubbo import DubboCodec, heartbeat_request
from metaprotocol_dubbo.codec import DRAIN_NOTICE, READONLY_BODY
from metaprotocol_dubbo.frames import build_request, build_response
from metaprotocol_dubbo.header import build_header
from metaprotocol_dubbo.hessian2 import dumps

from metaprotocol_sdk import (
    ErrorType,
    LocalError,
    MessageType,
    Metadata,
    ResponseStatus,
    UnsupportedError,
    join_encoded,
)


def decode_one(frame: bytes, codec: DubboCodec | None = None) -> Metadata:
    codec = codec or DubboCodec()
    buffer = bytearray(frame)
    result = codec.decode(buffer)
    assert isinstance(result, Metadata), result
    assert not buffer, "decode must consume exactly one frame"
    return result


def event(flag: int, body: bytes, request_id: int = 5, status: int = 0) -> bytes:
    return build_header(flag, status, request_id, len(body)) + body


def test_the_capability_is_declared() -> None:
    assert DubboCodec.capabilities.drain_notice and DubboCodec.capabilities.heartbeat


def test_the_notice_is_the_read_only_event_as_apache_dubbo_writes_it() -> None:
    # Magic, flag 0xA2 (request 0x80 | event 0x20 | Hessian 2; not two-way), status 0, request
    # id 0, body length 2, and the body: the Hessian string "R" (Request.READONLY_EVENT).
    golden = bytes.fromhex("dabb a2 00 0000000000000000 00000002 0152")
    notice = DubboCodec().drain_notice()
    assert notice == golden == DRAIN_NOTICE
    assert READONLY_BODY == dumps("R") == b"\x01R"


def test_the_notice_decodes_as_one_heartbeat_that_needs_no_reply_and_is_a_notice() -> None:
    codec = DubboCodec()
    message = decode_one(codec.drain_notice(), codec)
    assert message.message_type is MessageType.Heartbeat
    assert message.size == len(DRAIN_NOTICE) and message.request_id == 0
    assert codec.heartbeat_reply(message) is None
    assert codec.is_drain_notice(message)
    assert DubboCodec().is_drain_notice(message)  # the metadata says it, not the instance
    # It forwards as it came, and with another id.
    assert join_encoded(codec.encode(message)) == DRAIN_NOTICE
    relabelled = decode_one(join_encoded(codec.encode(message, request_id=77)))
    assert codec.is_drain_notice(relabelled) and relabelled.request_id == 77


def test_the_notice_is_the_same_after_decoding_traffic() -> None:
    codec = DubboCodec()
    for frame in (
        build_request("com.example.S", "m", ["x"], attachments={"k": "v"}),
        build_response("y"),
        heartbeat_request(3),
    ):
        decode_one(frame, codec)
        assert codec.drain_notice() == DRAIN_NOTICE
        assert codec.is_drain_notice(decode_one(DRAIN_NOTICE, codec))


@pytest.mark.parametrize(
    "body",
    [b"\x01R", b"\x30\x01R", b"S\x00\x01R", b"R\x00\x00\x01R"],
    ids=["compact", "two-byte length", "S form", "empty chunk first"],
)
def test_any_hessian_encoding_of_R_in_a_one_way_event_is_a_notice(body: bytes) -> None:
    assert DubboCodec().is_drain_notice(decode_one(event(0xA2, body, request_id=9)))


NOT_NOTICES = {
    "two-way heartbeat (null body)": heartbeat_request(4),
    "two-way event with R": event(0xE2, b"\x01R"),
    "one-way event with null": event(0xA2, b"N"),
    "one-way event with another string": event(0xA2, b"\x01S"),
    "one-way event with r": event(0xA2, b"\x01r"),
    "one-way event with RR": event(0xA2, b"\x02RR"),
    "one-way event with R then more": event(0xA2, b"\x01R\x01R"),
    "one-way event with a list of R": event(0xA2, b"\x79\x01R"),
    "one-way event with an empty body": event(0xA2, b""),
    "one-way event with a truncated string": event(0xA2, b"\x02R"),
    "one-way event, R after 20 empty chunks": event(0xA2, b"R\x00\x00" * 20 + b"\x01R"),
    "event response with R": event(0x22, b"\x01R", status=20),
    "heartbeat reply": event(0x22, b"N", status=20),
    "two-way request": build_request("com.example.S", "R", ["R"]),
    "one-way request": build_request("com.example.S", "R", ["R"], two_way=False),
    "response R": build_response("R"),
}


@pytest.mark.parametrize("frame", NOT_NOTICES.values(), ids=NOT_NOTICES.keys())
def test_other_messages_are_not_notices(frame: bytes) -> None:
    codec = DubboCodec()
    assert not codec.is_drain_notice(decode_one(frame, codec))


def test_the_replies_the_codec_builds_are_not_notices() -> None:
    codec = DubboCodec()
    reply = codec.heartbeat_reply(decode_one(heartbeat_request(8)))
    assert reply is not None and not codec.is_drain_notice(decode_one(reply))
    request = decode_one(build_request("com.example.S", "m", []))
    error = codec.on_error(request, LocalError(ErrorType.Timeout, "R"))
    assert not codec.is_drain_notice(decode_one(error))


def test_a_read_only_event_in_another_serialization_is_refused_as_any_frame_is() -> None:
    # The codec reads Hessian 2 only (serialization id 2): Dubbo's notice in another
    # serialization (here id 3, Java) is refused like every frame in it, never misread.
    with pytest.raises(UnsupportedError, match="serialization id 3"):
        DubboCodec().decode(bytearray(event(0xA3, b"\x01R")))


# -- dubbo-remoting 2.1.4 (what sofa-rpc-node reads and writes Dubbo with) ------------------


def _node(*args: str) -> str:
    return run_node_script("readonly_event.js", *args)


def test_dubbo_remoting_decodes_our_notice_as_its_read_only_event() -> None:
    # Its stream decoder emits a 'heartbeat' packet (any event) whose data is 'R'; it does
    # not report the two-way flag, so that is read from the bytes it was given.
    packets = json.loads(_node("decode", DRAIN_NOTICE.hex()))
    assert packets == [
        {"event": "heartbeat", "packetType": "heartbeat", "packetId": 0, "data": "R"}
    ]
    assert not DRAIN_NOTICE[2] & 0x40  # not two-way: no answer is expected


def test_dubbo_remoting_s_read_only_event_is_recognised_as_a_notice() -> None:
    frame = bytes.fromhex(_node("encode", "12345"))
    message = decode_one(frame)
    assert message.message_type is MessageType.Heartbeat and message.request_id == 12345
    assert DubboCodec().is_drain_notice(message)
    assert DubboCodec().heartbeat_reply(message) is None
    # The same bytes as ours but for the id.
    assert frame[:4] + frame[12:] == DRAIN_NOTICE[:4] + DRAIN_NOTICE[12:]


# -- the notice written to real consumers over 127.0.0.1 (neither honours it) ------------------


def _call_connection(relay: Relay, consumer: LineProcess, name: str) -> int:
    """Call sayHello(name) through the relay; the relayed connection it went over."""
    assert consumer.call(method="sayHello", args=[name]).get("result") == f"Hello {name}"
    return relay.wait_for(
        lambda s: s.direction == "down" and s.metadata.operation_name == "sayHello"
    ).connection


def test_dubbo_ssl_python_answers_the_notice_as_a_heartbeat_and_goes_on(
    relay: Relay, python_consumer: LineProcess
) -> None:
    connection = _call_connection(relay, python_consumer, "before")
    relay.write_downstream(DRAIN_NOTICE, connection)
    reply = relay.wait_for(
        lambda s: s.direction == "down" and s.metadata.message_type is MessageType.Heartbeat
    ).metadata
    # Any event request is a heartbeat request to it: a heartbeat response with the id (0).
    assert reply.request_id == 0 and reply.response_status is ResponseStatus.Ok
    assert not DubboCodec().is_drain_notice(reply) and DubboCodec().heartbeat_reply(reply) is None
    assert _call_connection(relay, python_consumer, "after") == connection  # not drained
    assert not relay.errors


def test_sofa_rpc_node_ignores_the_notice(relay: Relay, node_consumer: LineProcess) -> None:
    connection = _call_connection(relay, node_consumer, "before")
    relay.write_downstream(DRAIN_NOTICE, connection)
    # Its client connection listens for responses only: the notice is dropped unanswered and
    # the next call goes over the same connection.
    assert _call_connection(relay, node_consumer, "after") == connection
    from_consumer = [s.metadata.message_type for s in relay.seen if s.direction == "down"]
    assert MessageType.Heartbeat not in from_consumer
    assert not relay.errors
