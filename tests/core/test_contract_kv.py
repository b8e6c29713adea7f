"""Every rule of the codec contract, shown with the worked example codec (KV)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaprotocol_sdk import (
    NEED_DATA,
    CodecError,
    ConfigError,
    ErrorType,
    FrameTooLargeError,
    FramingError,
    LocalError,
    MessageType,
    Metadata,
    MutationError,
    NeedData,
    UnsupportedError,
    join_encoded,
)
from metaprotocol_sdk.examples.kv import ERROR, ONEWAY, PING, PONG, REQUEST, RESPONSE, KVCodec
from metaprotocol_sdk.examples.kv import build_frame as kv

REQ = kv(REQUEST, 41, {"method": "sayHello", "Interface": "demo.Greeter"}, b"\x00body\xff")
RESP = kv(RESPONSE, 41, {"status": "ok"}, b"hello")


def decode_all(codec: KVCodec, data: bytes) -> tuple[list[Metadata], bytearray]:
    buffer = bytearray(data)
    out = []
    while True:
        result = codec.decode(buffer)
        if isinstance(result, NeedData):
            return out, buffer
        out.append(result)


def test_decode_consumes_exactly_one_message_and_leaves_the_rest() -> None:
    buffer = bytearray(REQ + RESP + RESP[:5])
    md = KVCodec().decode(buffer)
    assert isinstance(md, Metadata)
    assert md.frame == REQ
    assert bytes(buffer) == RESP + RESP[:5]


def test_metadata_fields() -> None:
    md = KVCodec().decode(bytearray(REQ))
    assert isinstance(md, Metadata)
    assert md.message_type is MessageType.Request
    assert md.request_id == 41
    assert md.operation_name == "sayHello"
    assert md.header_size + md.body_size == md.size == len(REQ)
    assert bytes(md.body) == b"\x00body\xff"
    # attribute keys are case-insensitive but keep their spelling
    assert md.attributes["interface"] == md.attributes["INTERFACE"] == "demo.Greeter"
    assert list(md.attributes) == ["method", "Interface"]


@pytest.mark.parametrize("cut", range(len(REQ)))
def test_truncated_input_needs_more_data_and_consumes_nothing(cut: int) -> None:
    buffer = bytearray(REQ[:cut])
    result = KVCodec().decode(buffer)
    assert isinstance(result, NeedData)
    assert bytes(buffer) == REQ[:cut]


def test_need_data_reports_the_frame_size_once_the_header_is_known() -> None:
    result = KVCodec().decode(bytearray(REQ[:20]))
    assert isinstance(result, NeedData) and result.needed == len(REQ)
    assert KVCodec().decode(bytearray(REQ[:3])) is NEED_DATA


def test_every_split_point_of_a_multi_message_buffer() -> None:
    stream = REQ + RESP + kv(ONEWAY, 7, {"method": "log"}) + REQ
    expected, rest = decode_all(KVCodec(), stream)
    assert len(expected) == 4 and not rest
    for a in range(len(stream) + 1):
        for b in range(a, len(stream) + 1, 7):
            codec, buffer, got = KVCodec(), bytearray(), []
            for chunk in (stream[:a], stream[a:b], stream[b:]):
                buffer += chunk
                while not isinstance(result := codec.decode(buffer), NeedData):
                    got.append(result)
            assert [m.frame for m in got] == [m.frame for m in expected], (a, b)
            assert not buffer


def test_oversized_length_is_refused_before_the_body_is_buffered() -> None:
    codec = KVCodec(max_frame_size=64)
    big = kv(REQUEST, 9, {"method": "m"}, b"x" * 100)
    with pytest.raises(FrameTooLargeError) as info:
        codec.decode(bytearray(big[:16]))  # only the header has arrived
    assert info.value.limit == 64 and info.value.size == len(big)
    assert info.value.metadata is not None and info.value.metadata.request_id == 9
    assert "exceeds the limit of 64 bytes" in str(info.value)


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_limit_boundaries(delta: int) -> None:
    frame = kv(REQUEST, 1, {}, b"x" * 44)  # 60 bytes
    codec = KVCodec(max_frame_size=len(frame) + delta)
    if delta < 0:
        with pytest.raises(FrameTooLargeError):
            codec.decode(bytearray(frame))
    else:
        assert isinstance(codec.decode(bytearray(frame)), Metadata)


def test_malformed_input_raises_typed_errors_with_offsets() -> None:
    with pytest.raises(FramingError) as bad_magic:
        KVCodec().decode(bytearray(b"XX" + REQ[2:]))
    assert bad_magic.value.offset == 0 and "magic" in str(bad_magic.value)
    with pytest.raises(UnsupportedError) as bad_version:
        KVCodec().decode(bytearray(REQ[:2] + b"\x09" + REQ[3:]))
    assert bad_version.value.offset == 2
    with pytest.raises(FramingError) as bad_kind:
        KVCodec().decode(bytearray(REQ[:3] + b"\x63" + REQ[4:]))
    assert bad_kind.value.offset == 3 and "kind 99" in str(bad_kind.value)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=80))
def test_random_bytes_give_need_data_or_codec_error(data: bytes) -> None:
    buffer = bytearray(b"KV\x01" + data)
    try:
        result = KVCodec(max_frame_size=1024).decode(buffer)
    except CodecError:
        return
    assert isinstance(result, NeedData | Metadata)


def test_encode_without_mutation_returns_the_original_bytes_object() -> None:
    codec = KVCodec()
    md = codec.decode(bytearray(REQ))
    assert isinstance(md, Metadata)
    assert codec.encode(md) is md.frame
    assert codec.encode(md, {}) is md.frame


def test_mutation_is_written_and_the_body_is_a_zero_copy_slice() -> None:
    codec = KVCodec()
    md = codec.decode(bytearray(REQ))
    assert isinstance(md, Metadata)
    encoded = codec.encode(md, {"x-route": "v2", "method": "sayHello"})
    assert isinstance(encoded, list)
    body = encoded[-1]
    assert isinstance(body, memoryview) and body.obj is md.frame
    again = codec.decode(bytearray(join_encoded(encoded)))
    assert isinstance(again, Metadata)
    assert again.attributes["x-route"] == "v2"
    assert bytes(again.body) == bytes(md.body)
    assert again.size == len(join_encoded(encoded))


@pytest.mark.parametrize(
    "mutation",
    [
        {"k" * 256: "v"},  # a key over its 1-byte length
        {"x-long": "v" * 0x10000},  # a value over its 2-byte length
        {f"x-{i:05d}": "v" * 60 for i in range(1100)},  # a block over its 2-byte length
    ],
    ids=["key", "value", "block"],
)
def test_a_mutation_the_headers_cannot_carry_is_refused(mutation: dict[str, str]) -> None:
    # The contract's MutationError (an engine answers the request with an error reply); it
    # raised ValueError and struct.error, which an engine does not expect from encode.
    md = KVCodec().decode(bytearray(RESP))
    assert isinstance(md, Metadata)
    with pytest.raises(MutationError, match=r"too long|65535"):
        KVCodec().encode(md, mutation)


def test_request_id_rewriting_changes_only_the_id() -> None:
    codec = KVCodec()
    md = codec.decode(bytearray(REQ))
    assert isinstance(md, Metadata)
    out = join_encoded(codec.encode(md, request_id=0xDEADBEEF))
    again = codec.decode(bytearray(out))
    assert isinstance(again, Metadata)
    assert again.request_id == 0xDEADBEEF
    assert out[:4] == REQ[:4] and out[8:] == REQ[8:]


@pytest.mark.parametrize("error_type", list(ErrorType))
def test_on_error_replies_carry_the_request_id(error_type: ErrorType) -> None:
    codec = KVCodec()
    md = codec.decode(bytearray(REQ))
    assert isinstance(md, Metadata)
    reply = codec.on_error(md, LocalError(error_type, "no route for sayHello"))
    assert reply
    decoded = KVCodec().decode(bytearray(reply))
    assert isinstance(decoded, Metadata)
    assert decoded.message_type is MessageType.Error
    assert decoded.request_id == 41
    assert decoded.attributes["error-type"] == error_type.name


def test_heartbeat_and_oneway() -> None:
    codec = KVCodec()
    ping = codec.decode(bytearray(kv(PING, 5)))
    assert isinstance(ping, Metadata) and ping.message_type is MessageType.Heartbeat
    reply = codec.heartbeat_reply(ping)
    assert reply is not None
    pong = codec.decode(bytearray(reply))
    assert isinstance(pong, Metadata) and pong.request_id == 5
    assert codec.heartbeat_reply(pong) is None  # a reply needs no reply
    oneway = codec.decode(bytearray(kv(ONEWAY, 6, {"method": "log"})))
    assert isinstance(oneway, Metadata) and oneway.message_type is MessageType.Oneway
    err = codec.decode(bytearray(kv(ERROR, 6)))
    assert isinstance(err, Metadata) and err.message_type is MessageType.Error
    assert kv(PONG, 1)  # builder covers every kind


def test_drain_notice_is_a_pong_with_goaway_and_only_that_pong_is_one() -> None:
    codec = KVCodec()
    notice = codec.decode(bytearray(codec.drain_notice()))
    assert isinstance(notice, Metadata) and notice.message_type is MessageType.Heartbeat
    assert codec.heartbeat_reply(notice) is None  # never answered
    assert codec.is_drain_notice(notice)
    assert codec.is_drain_notice(codec.decode(bytearray(kv(PONG, 8, {"goaway": "bye"}))))
    for frame in (kv(PING, 8), kv(PONG, 8), kv(PING, 8, {"goaway": "x"}), REQ, RESP):
        message = codec.decode(bytearray(frame))
        assert isinstance(message, Metadata) and not codec.is_drain_notice(message)


def test_heartbeat_request_is_a_ping_with_the_id_answered_by_a_pong() -> None:
    codec = KVCodec()
    assert KVCodec.capabilities.heartbeat_request and KVCodec.capabilities.heartbeat
    # Magic "KV", version 1, kind 3 (ping), id 0xFFFFFFFF, no headers, no body.
    assert codec.heartbeat_request(0xFFFFFFFF) == bytes.fromhex("4b560103ffffffff" + "00" * 8)
    ping = codec.decode(bytearray(codec.heartbeat_request(77)))
    assert isinstance(ping, Metadata) and ping.message_type is MessageType.Heartbeat
    assert ping.request_id == 77
    reply = codec.heartbeat_reply(ping)
    assert reply == kv(PONG, 77)
    pong = codec.decode(bytearray(reply))
    assert isinstance(pong, Metadata) and codec.heartbeat_reply(pong) is None


def test_instances_do_not_share_state() -> None:
    a, b = KVCodec(max_frame_size=100), KVCodec()
    assert a.max_frame_size != b.max_frame_size
    buf_a = bytearray(REQ[:10])
    assert isinstance(a.decode(buf_a), NeedData)
    assert isinstance(b.decode(bytearray(RESP)), Metadata)


def test_from_options_rejects_unknown_keys_with_the_accepted_list() -> None:
    assert KVCodec.from_options({"max_frame_size": 10}).max_frame_size == 10
    with pytest.raises(Exception, match=r"unknown option.*accepted: max_frame_size"):
        KVCodec.from_options({"transport": "framed"})
    with pytest.raises(Exception, match="must be positive"):
        KVCodec.from_options({"max_frame_size": 0})
    # A value of the wrong type (YAML `1MiB`, `-o max_frame_size=abc`) names the field.
    for value in ("1MiB", 1.5, True, None):
        with pytest.raises(ConfigError, match="must be a positive integer") as info:
            KVCodec.from_options({"max_frame_size": value})
        assert info.value.field == "max_frame_size"


def test_bulk_attribute_constructors_match_the_public_mapping() -> None:
    from metaprotocol_sdk import Attributes

    public = Attributes({"Method": "add", "X-Env": "canary"})
    strings = Attributes.from_strings({"Method": "add", "X-Env": "canary"})
    folded = Attributes.from_folded({"method": ("Method", "add"), "x-env": ("X-Env", "canary")})
    for attributes in (strings, folded):
        assert attributes.to_dict() == public.to_dict()
        assert attributes["METHOD"] == "add" and attributes.get_folded("x-env") == "canary"


def test_positional_metadata_constructor_is_the_keyword_one() -> None:
    from metaprotocol_sdk import Attributes, ResponseStatus

    attrs = Attributes({"method": "add"})
    positional = Metadata(MessageType.Response, b"abc", 5, "add", 1, 2, ResponseStatus.Ok, attrs, 7)
    keyword = Metadata(
        MessageType.Response,
        frame=b"abc",
        request_id=5,
        operation_name="add",
        header_size=1,
        body_size=2,
        response_status=ResponseStatus.Ok,
        attributes=attrs,
        codec_state=7,
    )
    for slot in Metadata.__slots__:
        assert getattr(positional, slot) == getattr(keyword, slot), slot


def test_bad_frame_with_known_extent_is_dropped_and_the_stream_goes_on() -> None:
    good = kv(REQUEST, 8, {"method": "ok"})
    bad = bytearray(kv(REQUEST, 9, {"method": "x"}))
    bad[17:18] = b"\xff"  # the first key is no longer UTF-8
    buffer = bytearray(bytes(bad) + good)
    codec = KVCodec()
    with pytest.raises(FramingError) as info:
        codec.decode(buffer)
    assert bytes(buffer) == bytes(bad) + good  # nothing consumed
    assert info.value.frame_size == len(bad)
    assert info.value.metadata is not None and info.value.metadata.request_id == 9
    del buffer[: info.value.frame_size]
    after = codec.decode(buffer)
    assert isinstance(after, Metadata) and after.request_id == 8 and not buffer


def test_max_request_id_is_what_the_wire_can_carry() -> None:
    codec = KVCodec()
    md = codec.decode(bytearray(REQ))
    assert isinstance(md, Metadata)
    top = join_encoded(codec.encode(md, request_id=KVCodec.max_request_id))
    again = codec.decode(bytearray(top))
    assert isinstance(again, Metadata) and again.request_id == KVCodec.max_request_id
