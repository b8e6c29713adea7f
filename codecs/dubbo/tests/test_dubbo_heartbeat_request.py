"""Dubbo's heartbeat request (the ping an engine sends its peers on idle connections), as
Apache Dubbo's ``HeartbeatTimerTask`` sends it; checked against dubbo-remoting 2.1.4's own
encoder and answered by a real sofa-rpc-node provider over 127.0.0.1."""

from __future__ import annotations

import socket

import pytest
from dubbo_harness import TIMEOUT, LineProcess, run_node_script
from metaprotocol_dubbo import DubboCodec, heartbeat_request
from metaprotocol_dubbo.frames import build_request, build_response

from metaprotocol_sdk import MessageType, Metadata, NeedData, ResponseStatus, join_encoded

#: Ids an engine may allocate (1..max_request_id), around each width Dubbo's peers handle:
#: 32 bits, JavaScript's safe integers (2^53) and the signed 64-bit top.
IDS = [1, 4242, 2**31, 2**32 + 1, 2**53 - 1, 2**53 + 1, DubboCodec.max_request_id]


def decode_one(frame: bytes, codec: DubboCodec | None = None) -> Metadata:
    codec = codec or DubboCodec()
    buffer = bytearray(frame)
    result = codec.decode(buffer)
    assert isinstance(result, Metadata), result
    assert not buffer, "decode must consume exactly one frame"
    return result


def test_the_capability_is_declared_with_heartbeats() -> None:
    capabilities = DubboCodec.capabilities
    assert capabilities.heartbeat_request and capabilities.heartbeat
    assert DubboCodec().active_capabilities.heartbeat_request


@pytest.mark.parametrize("request_id", [1, DubboCodec.max_request_id])
def test_the_ping_is_the_heartbeat_apache_dubbo_sends(request_id: int) -> None:
    # HeartbeatTimerTask: a Request, two-way, event HEARTBEAT_EVENT (null); ExchangeCodec
    # writes flag 0xE2 (request 0x80 | two-way 0x40 | event 0x20 | Hessian 2), status 0, the
    # id, body length 1 and the Hessian null "N" (CodecSupport.getNullBytesOf).
    golden = bytes.fromhex(f"dabb e2 00 {request_id:016x} 00000001 4e")
    ping = DubboCodec().heartbeat_request(request_id)
    assert ping == golden == heartbeat_request(request_id)


@pytest.mark.parametrize("request_id", IDS)
def test_the_ping_decodes_as_one_heartbeat_answered_by_a_reply_that_is_no_ping(
    request_id: int,
) -> None:
    codec = DubboCodec()
    ping = decode_one(codec.heartbeat_request(request_id), codec)
    assert ping.message_type is MessageType.Heartbeat and ping.request_id == request_id
    assert not codec.is_drain_notice(ping)
    reply = codec.heartbeat_reply(ping)
    # An event response (flag 0x22), status OK (20), the ping's id, the Hessian null.
    assert reply == bytes.fromhex(f"dabb 22 14 {request_id:016x} 00000001 4e")
    answer = decode_one(reply)
    assert answer.message_type is MessageType.Heartbeat and answer.request_id == request_id
    assert answer.response_status is ResponseStatus.Ok
    assert codec.heartbeat_reply(answer) is None and not codec.is_drain_notice(answer)


def test_the_ping_is_the_same_after_any_traffic() -> None:
    codec = DubboCodec()
    expected = DubboCodec().heartbeat_request(99)
    for frame in (
        build_request("com.example.S", "m", ["x"], attachments={"k": "v"}),
        build_response("y"),
        heartbeat_request(3),
        codec.drain_notice(),
    ):
        decode_one(frame, codec)
        assert codec.heartbeat_request(99) == expected
        assert decode_one(codec.heartbeat_request(99), codec).request_id == 99


# -- dubbo-remoting 2.1.4 (what sofa-rpc-node reads and writes Dubbo with) ------------------


def _node(*args: str) -> str:
    return run_node_script("heartbeat.js", *args)


@pytest.mark.parametrize("request_id", IDS)
def test_dubbo_remoting_s_heartbeat_encode_writes_our_bytes(request_id: int) -> None:
    # protocol.heartbeatEncode (a Request whose event is null), byte for byte; and its
    # heartbeatAckEncode is our heartbeat reply to it.
    ours = DubboCodec().heartbeat_request(request_id)
    assert bytes.fromhex(_node("encode", str(request_id))) == ours
    ack = bytes.fromhex(_node("ack", str(request_id)))
    assert ack == DubboCodec().heartbeat_reply(decode_one(ours))


# -- the ping sent to a real sofa-rpc-node provider over 127.0.0.1 --------------------------


def _read_messages(sock: socket.socket, count: int) -> list[Metadata]:
    """``count`` messages decoded from ``sock`` (each read bounded by the socket timeout)."""
    codec, buffer, messages = DubboCodec(), bytearray(), []
    while len(messages) < count:
        result = codec.decode(buffer)
        if isinstance(result, NeedData):
            data = sock.recv(65536)
            assert data, f"the provider closed the connection after {len(messages)} answers"
            buffer += data
            continue
        messages.append(result)
    assert not buffer, f"the provider sent more than {count} messages: {bytes(buffer).hex()}"
    return messages


def test_a_sofa_rpc_node_provider_answers_each_ping_with_its_heartbeat_reply(
    provider: tuple[LineProcess, int],
) -> None:
    codec = DubboCodec()
    with socket.create_connection(("127.0.0.1", provider[1]), timeout=TIMEOUT) as sock:
        # One at a time, then all in one write: the connection stays open and every ping gets
        # its answer, in order, the same bytes as our own heartbeat reply.
        for request_id in IDS:
            sock.sendall(codec.heartbeat_request(request_id))
            (answer,) = _read_messages(sock, 1)
            assert answer.message_type is MessageType.Heartbeat
            assert answer.request_id == request_id
            assert answer.response_status is ResponseStatus.Ok
            assert codec.heartbeat_reply(answer) is None  # a reply: nothing to answer
            ping = decode_one(codec.heartbeat_request(request_id))
            assert answer.frame == codec.heartbeat_reply(ping)
        sock.sendall(b"".join(codec.heartbeat_request(i) for i in IDS))
        answers = _read_messages(sock, len(IDS))
        assert [a.request_id for a in answers] == IDS
        assert {a.message_type for a in answers} == {MessageType.Heartbeat}
        # And a call on the same connection after them is served as usual.
        call = build_request(
            "com.example.DemoService", "sayHello", ["ping"], version="1.0.0", request_id=5
        )
        sock.sendall(call)
        (reply,) = _read_messages(sock, 1)
        assert reply.message_type is MessageType.Response and reply.request_id == 5
        assert reply.response_status is ResponseStatus.Ok
        assert join_encoded(codec.encode(reply))  # decodes and forwards like any reply
