"""Unit tests of ThriftCodec on frames written by the real libraries (in memory)."""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from metaprotocol_thrift import ThriftCodec, theader
from metaprotocol_thrift.replies import APPLICATION_EXCEPTION_TYPES
from metaprotocol_thrift.wire import read_varint, write_varint
from thriftpy2.protocol import TBinaryProtocol, TCompactProtocol
from thriftpy2.thrift import TApplicationException, TMessageType
from thriftpy2.transport import TMemoryBuffer

from metaprotocol_sdk import (
    Capabilities,
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
    ResponseStatus,
    UnsupportedError,
    join_encoded,
)

sys.path.insert(0, str(Path(__file__).parent))
import thrift_frames as tf
from thrift_peers import apache_fixture, calc_tp  # noqa: F401 - fixture

VARIANTS = [(t, p) for t in tf.TRANSPORTS for p in tf.PROTOCOLS]


def decode_one(data: bytes, **options: Any) -> tuple[Metadata, ThriftCodec]:
    codec = ThriftCodec(**options)
    buffer = bytearray(data)
    result = codec.decode(buffer)
    assert isinstance(result, Metadata), result
    assert not buffer
    return result, codec


# -- configuration ---------------------------------------------------------------------------


def test_options_accept_strings_and_reject_bad_values() -> None:
    codec = ThriftCodec.from_options(
        {"transport": "Framed", "protocol": "binary", "strict": "false", "max_frame_size": "1024"}
    )
    assert (codec.transport, codec.wire_protocol, codec.strict, codec.max_frame_size) == (
        "framed",
        "binary",
        False,
        1024,
    )
    assert ThriftCodec.from_options({"max_depth": 8, "strict": 1}).max_depth == 8
    for bad in (
        {"transport": "http"},
        {"protocol": "json"},
        {"strict": "maybe"},
        {"max_frame_size": "0"},
        {"max_frame_size": "big"},
        {"mutation_without_headers": "ignore"},
        {"nope": 1},
    ):
        with pytest.raises(ConfigError):
            ThriftCodec.from_options(bad)


def test_capabilities() -> None:
    assert ThriftCodec.capabilities == Capabilities(
        heartbeat=False,
        oneway=True,
        mutation=True,
        response_mutation=True,
        rewrite_request_id=True,
        error_reply=True,
        peek_reply=True,
    )
    with pytest.raises(UnsupportedError):
        ThriftCodec().heartbeat_reply(Metadata(MessageType.Request))


# -- detection and decoding ------------------------------------------------------------------


@pytest.mark.parametrize(("transport", "protocol"), VARIANTS)
def test_auto_detects_every_variant(transport: str, protocol: str) -> None:
    data = tf.sample(transport, protocol, headers={b"k": b"v"})
    message, codec = decode_one(data, **tf.options_for(transport, protocol))
    assert message.message_type is MessageType.Request
    assert (message.request_id, message.operation_name) == (7, "add")
    assert message.frame == data
    assert message.header_size + message.body_size == len(data)
    assert codec.detected[0] == transport
    assert message.codec_state.protocol == ("compact" if protocol == "compact" else "binary")
    assert message.codec_state.strict is (protocol != "nonstrict")
    if transport == "header":
        assert message.attributes.to_dict() == {"k": "v", "method": "add"}
    else:
        assert message.attributes.to_dict() == {"method": "add"}


@pytest.mark.parametrize(("transport", "protocol"), VARIANTS)
def test_forced_options_decode_and_need_data_at_every_prefix(transport: str, protocol: str) -> None:
    data = tf.sample(transport, protocol) * 2
    options = {
        "transport": transport,
        "protocol": "compact" if protocol == "compact" else "binary",
        "strict": protocol != "nonstrict",
    }
    one = len(data) // 2
    for cut in range(one):
        buffer = bytearray(data[:cut])
        assert isinstance(ThriftCodec(**options).decode(buffer), NeedData)
        assert len(buffer) == cut  # nothing consumed
    codec = ThriftCodec(**options)
    buffer = bytearray(data)
    first, second = codec.decode(buffer), codec.decode(buffer)
    assert isinstance(first, Metadata) and isinstance(second, Metadata)
    assert first.frame == second.frame == data[:one]


def test_framed_need_data_reports_the_frame_size() -> None:
    data = tf.sample("framed", "binary")
    result = ThriftCodec().decode(bytearray(data[:10]))
    assert isinstance(result, NeedData) and result.needed == len(data)


def test_non_strict_is_refused_when_strict() -> None:
    data = tf.sample("framed", "nonstrict")
    with pytest.raises(FramingError, match="strict"):
        ThriftCodec().decode(bytearray(data))
    with pytest.raises(FramingError, match="strict"):
        ThriftCodec(transport="framed").decode(bytearray(data))
    with pytest.raises(FramingError):
        ThriftCodec(transport="unframed", protocol="binary").decode(
            bytearray(tf.sample("unframed", "nonstrict"))
        )


def test_auto_detects_per_message() -> None:
    codec = ThriftCodec()
    stream = bytearray(
        tf.sample("framed", "compact")
        + tf.sample("unframed", "binary")
        + tf.sample("header", "compact")
    )
    seen = []
    while stream:
        message = codec.decode(stream)
        assert isinstance(message, Metadata)
        seen.append(codec.detected)
    assert seen == [("framed", "compact"), ("unframed", "binary"), ("header", "auto")]
    codec.reset()
    assert codec.detected == ("auto", "auto")


def test_forced_transport_refuses_other_transports() -> None:
    with pytest.raises(FramingError, match="THeader magic"):
        ThriftCodec(transport="header").decode(bytearray(tf.sample("framed", "binary")))
    with pytest.raises(FramingError):
        ThriftCodec(transport="framed").decode(bytearray(tf.sample("unframed", "binary")))
    with pytest.raises(FramingError):
        ThriftCodec(protocol="binary").decode(bytearray(tf.sample("framed", "compact")))
    with pytest.raises(FramingError):
        ThriftCodec(protocol="binary").decode(bytearray(tf.sample("header", "compact")))


@pytest.mark.parametrize(("transport", "protocol"), VARIANTS)
def test_message_types_and_statuses(transport: str, protocol: str) -> None:
    opts = tf.options_for(transport, protocol)

    def decode(mtype: int, args: Any, name: str = "divide") -> Metadata:
        return decode_one(tf.sample(transport, protocol, name, mtype, 9, args), **opts)[0]

    result = calc_tp.Calculator.divide_result
    ok = decode(TMessageType.REPLY, result(success=3))
    assert (ok.message_type, ok.response_status) == (MessageType.Response, ResponseStatus.Ok)
    declared = decode(TMessageType.REPLY, result(err=calc_tp.CalcError(code=1, reason="x")))
    assert declared.message_type is MessageType.Response
    assert declared.response_status is ResponseStatus.Error
    void = decode(TMessageType.REPLY, calc_tp.Calculator.ping_result(), "ping")
    assert void.response_status is ResponseStatus.Ok
    exc = decode(TMessageType.EXCEPTION, TApplicationException(1, "boom"))
    assert (exc.message_type, exc.response_status) == (MessageType.Error, ResponseStatus.Error)
    oneway = decode(TMessageType.ONEWAY, calc_tp.Calculator.notify_args(event="e"), "notify")
    assert oneway.message_type is MessageType.Oneway


def test_multiplexed_name() -> None:
    message, _ = decode_one(tf.sample("framed", "binary", name="calc:add"))
    assert message.attributes.to_dict() == {"service": "calc", "method": "add"}
    assert message.operation_name == "add"
    assert message.codec_state.wire_name == "calc:add"


# -- errors and limits -----------------------------------------------------------------------


def test_oversized_frame_is_refused_from_its_length_with_the_request_id() -> None:
    data = tf.sample("framed", "binary", seqid=42)
    huge = (10_000_000).to_bytes(4, "big") + data[4:]
    with pytest.raises(FrameTooLargeError) as raised:
        ThriftCodec(max_frame_size=1 << 20).decode(bytearray(huge[:30]))
    assert raised.value.size == 10_000_004 and raised.value.offset == 0
    assert raised.value.metadata is not None and raised.value.metadata.request_id == 42
    assert raised.value.metadata.operation_name == "add"
    # Only the length is there yet: still refused at once.
    with pytest.raises(FrameTooLargeError):
        ThriftCodec(max_frame_size=1 << 20).decode(bytearray(huge[:4]))
    header = tf.sample("header", "binary", seqid=43)
    with pytest.raises(FrameTooLargeError) as raised:
        ThriftCodec(max_frame_size=16).decode(bytearray(header))
    assert raised.value.metadata is not None and raised.value.metadata.request_id == 43


@pytest.mark.parametrize(
    ("data", "offset"),
    [
        (b"\xff\xff\xff\xff\x00\x00\x00\x00", 0),
        (b"\x80\x02\x00\x01", 0),
        (b"\x00\x00\x00\x00\x80\x01\x00\x01", 0),
        (b"GET / HTTP/1.1\r\n\r\n", 0),
    ],
)
def test_garbage_is_a_codec_error_with_offset(data: bytes, offset: int) -> None:
    with pytest.raises(CodecError) as raised:
        ThriftCodec().decode(bytearray(data))
    assert raised.value.offset == offset


def test_bad_message_in_a_complete_frame_keeps_the_stream_in_sync() -> None:
    good = tf.sample("framed", "binary")
    bad = bytearray(good)
    bad[7] = 9  # message type 9
    buffer = bytearray(bytes(bad) + good)
    codec = ThriftCodec(transport="framed")
    with pytest.raises(FramingError) as raised:
        codec.decode(buffer)
    assert raised.value.frame_size == len(good)
    assert len(buffer) == 2 * len(good)  # nothing consumed
    del buffer[: raised.value.frame_size]
    assert isinstance(codec.decode(buffer), Metadata)


@pytest.mark.parametrize("protocol", tf.PROTOCOLS)
def test_unframed_is_bounded_before_buffering(protocol: str) -> None:
    item = tf.sample_item()
    item.name = "x" * 5000
    data = tf.sample(
        "unframed", protocol, "roundtrip", 1, 5, calc_tp.Calculator.roundtrip_args(item=item)
    )
    opts = {**tf.options_for("unframed", protocol), "max_frame_size": 1024}
    # The string length alone tells the message is too big: refused with 100 bytes buffered.
    with pytest.raises(FrameTooLargeError) as raised:
        ThriftCodec(**opts).decode(bytearray(data[:100]))
    assert raised.value.metadata is not None and raised.value.metadata.request_id == 5
    # A message that never ends is refused once more than max_frame_size bytes are buffered.
    endless = tf.message(protocol, "add", 1, 6, tf.add_call())[:-1]
    field = b"\x08\x00\x01\x00\x00\x00\x01" if protocol != "compact" else b"\x15\x02"
    buffer = bytearray(endless)
    codec = ThriftCodec(**opts)
    while len(buffer) <= 1024:
        assert isinstance(codec.decode(buffer), NeedData)
        buffer += field * 50
    with pytest.raises(FrameTooLargeError):
        codec.decode(buffer)


@pytest.mark.parametrize("protocol", ["binary", "compact"])
def test_nesting_depth_is_bounded(protocol: str) -> None:
    depth = 100
    head = tf.message(protocol, "x", 1, 3, calc_tp.Calculator.ping_args())[:-1]
    if protocol == "binary":
        body = b"\x0c\x00\x01" * depth + b"\x00" * (depth + 1)
    else:
        body = b"\x1c" * depth + b"\x00" * (depth + 1)
    data = head + body
    with pytest.raises(FramingError, match="nested") as raised:
        ThriftCodec(transport="unframed").decode(bytearray(data))
    assert raised.value.metadata is not None and raised.value.metadata.request_id == 3
    message, _ = decode_one(data, transport="unframed", max_depth=depth + 1)
    assert message.size == len(data)


def test_unframed_garbage_after_the_header_carries_the_request_id() -> None:
    data = tf.message("binary", "add", 1, 11, tf.add_call())
    bad = data[: -1 - 14] + b"\x63" + data[-14:]  # an unknown field type
    with pytest.raises(FramingError) as raised:
        ThriftCodec().decode(bytearray(bad))
    assert raised.value.metadata is not None and raised.value.metadata.request_id == 11


def test_theader_transforms_and_unknown_protocols_are_unsupported() -> None:
    payload = tf.message("binary", "add", 1, 4, tf.add_call())
    block = theader.THeaderBlock(0, 4, 0, b"\x01\x07", [], b"", 0)  # an unknown transform
    data = theader.build_frame(0, 4, theader.build_block(block, []), payload)
    with pytest.raises(UnsupportedError, match="transform 7") as raised:
        ThriftCodec().decode(bytearray(data))
    assert raised.value.frame_size == len(data)
    assert raised.value.metadata is not None and raised.value.metadata.request_id == 4
    block = theader.THeaderBlock(0, 4, 1, b"\x00", [], b"", 0)  # JSON
    data = theader.build_frame(0, 4, theader.build_block(block, []), payload)
    with pytest.raises(UnsupportedError, match="protocol id 1"):
        ThriftCodec().decode(bytearray(data))


# -- encode: identity, request ids, mutation -------------------------------------------------


@pytest.mark.parametrize(("transport", "protocol"), VARIANTS)
def test_empty_encode_returns_the_frame_itself(transport: str, protocol: str) -> None:
    message, codec = decode_one(
        tf.sample(transport, protocol), **tf.options_for(transport, protocol)
    )
    assert codec.encode(message) is message.frame
    assert codec.encode(message, {}) is message.frame


@pytest.mark.parametrize(("transport", "protocol"), VARIANTS)
@pytest.mark.parametrize("new_id", [0, 1, 127, 128, 300, 2**31 - 1, -1, 2**32 - 1])
def test_request_id_rewrite(transport: str, protocol: str, new_id: int) -> None:
    item = tf.sample_item()
    args = calc_tp.Calculator.roundtrip_args(item=item)
    data = tf.sample(transport, protocol, "roundtrip", 1, 5, args, {b"a": b"b"})
    opts = tf.options_for(transport, protocol)
    message, codec = decode_one(data, **opts)
    encoded = codec.encode(message, request_id=new_id)
    if transport != "header":
        # Only the head and the id are new: the rest travels as a slice of the original frame.
        assert isinstance(encoded, list) and isinstance(encoded[-1], memoryview)
        assert encoded[-1].obj is message.frame
    out = join_encoded(encoded)
    again, _ = decode_one(out, **opts)
    expected = new_id - 2**32 if new_id >= 2**31 else new_id
    assert again.request_id == expected
    assert again.operation_name == "roundtrip"
    assert again.attributes.to_dict() == message.attributes.to_dict()
    assert bytes(again.body) == bytes(message.body)  # the args struct is untouched
    if transport == "header":
        assert again.codec_state.header.seqid == expected
    # The real library still reads the rewritten message.
    payload = out[again.codec_state.header.payload_offset :] if transport == "header" else out
    if transport == "framed":
        payload = out[4:]
    mem = TMemoryBuffer(payload)
    proto: Any = (
        TCompactProtocol(mem) if protocol == "compact" else TBinaryProtocol(mem, strict_read=False)
    )
    name, _, seqid = proto.read_message_begin()
    back = calc_tp.Calculator.roundtrip_args()
    proto.read_struct(back)
    assert (name, seqid & 0xFFFFFFFF, back.item.id) == ("roundtrip", new_id & 0xFFFFFFFF, item.id)
    with pytest.raises(ValueError):
        codec.encode(message, request_id=2**32)


@pytest.mark.parametrize("protocol", ["binary", "compact"])
def test_theader_mutation_adds_and_replaces(protocol: str, apache: Any) -> None:
    data = tf.sample("header", protocol, seqid=8, headers={b"Trace": b"1", b"user": b"u"})
    message, codec = decode_one(data)
    out = codec.encode(message, {"trace": "2", "x-new": "ä" * 3})
    assert isinstance(out, bytes)
    again, _ = decode_one(out)
    assert again.attributes.to_dict() == {
        "trace": "2",
        "user": "u",
        "x-new": "äää",
        "method": "add",
    }
    assert again.codec_state.header.info == [
        (b"trace", b"2"),
        (b"user", b"u"),
        (b"x-new", "äää".encode()),
    ]
    # Payload bytes unchanged, lengths fixed.
    start, new_start = (
        message.codec_state.header.payload_offset,
        again.codec_state.header.payload_offset,
    )
    assert out[new_start:] == data[start:]
    assert int.from_bytes(out[:4], "big") == len(out) - 4
    # Apache's THeaderTransport reads the mutated frame.
    from thrift.transport.THeaderTransport import THeaderClientType, THeaderTransport
    from thrift.transport.TTransport import TMemoryBuffer as ApMemory

    reader = THeaderTransport(ApMemory(out), [THeaderClientType.HEADERS])
    reader.readFrame(0)
    assert reader.get_headers() == {b"trace": b"2", b"user": b"u", b"x-new": "äää".encode()}
    # Mutation plus a new request id.
    both, _ = decode_one(codec.encode(message, {"a": "b"}, request_id=1000))
    assert both.request_id == 1000 and both.attributes["a"] == "b"


@pytest.mark.parametrize(("transport", "protocol"), [v for v in VARIANTS if v[0] != "header"])
def test_mutation_without_headers_is_skipped_and_counted_or_refused(
    transport: str, protocol: str
) -> None:
    data = tf.sample(transport, protocol)
    options = tf.options_for(transport, protocol)
    message, codec = decode_one(data, mutation_without_headers="skip", **options)
    assert codec.encode(message, {"k": "v"}) is message.frame
    assert codec.mutations_skipped == 1
    rewritten, _ = decode_one(
        join_encoded(codec.encode(message, {"k": "v"}, request_id=77)), **options
    )
    assert rewritten.request_id == 77 and codec.mutations_skipped == 2
    strict = ThriftCodec(**options)  # the default refuses
    with pytest.raises(MutationError, match="no headers"):
        strict.encode(message, {"k": "v"})
    with pytest.raises(MutationError):
        strict.encode(message, {"k": "v"}, request_id=77)
    assert strict.mutations_skipped == 0


def test_encode_refuses_foreign_metadata() -> None:
    with pytest.raises(UnsupportedError):
        ThriftCodec().encode(Metadata(MessageType.Request, frame=b"x"), {"a": "b"})


# -- error replies ---------------------------------------------------------------------------


@pytest.mark.parametrize(("transport", "protocol"), VARIANTS)
def test_error_reply_matches_the_request(transport: str, protocol: str) -> None:
    seqid = 5 if protocol == "compact" else -5  # thriftpy2's compact writer loops on negatives
    data = tf.sample(transport, protocol, name="calc:add", seqid=seqid)
    opts = tf.options_for(transport, protocol)
    request, codec = decode_one(data, **opts)
    reply_bytes = codec.on_error(request, LocalError(ErrorType.RouteNotFound, "no route"))
    reply, reply_codec = decode_one(reply_bytes, **opts)
    assert reply_codec.detected[0] == transport
    assert reply.message_type is MessageType.Error
    assert (reply.request_id, reply.operation_name) == (seqid, "add")
    assert reply.codec_state.strict == request.codec_state.strict
    assert reply.codec_state.protocol == request.codec_state.protocol
    payload = reply_bytes
    if transport == "framed":
        payload = reply_bytes[4:]
    elif transport == "header":
        payload = reply_bytes[reply.codec_state.header.payload_offset :]
        assert reply.codec_state.header.seqid == seqid
    mem = TMemoryBuffer(payload)
    proto: Any = (
        TCompactProtocol(mem) if protocol == "compact" else TBinaryProtocol(mem, strict_read=False)
    )
    name, mtype, seqid_read = proto.read_message_begin()
    exc = TApplicationException()
    proto.read_struct(exc)
    assert (name, mtype, seqid_read) == ("add", TMessageType.EXCEPTION, seqid)
    assert exc.type == TApplicationException.UNKNOWN_METHOD
    assert exc.message == "RouteNotFound: no route"


def test_every_error_type_maps_to_an_application_exception_code() -> None:
    message, codec = decode_one(tf.sample("framed", "binary"))
    for error_type in ErrorType:
        assert error_type in APPLICATION_EXCEPTION_TYPES
        reply = codec.on_error(message, LocalError(error_type))
        assert reply and error_type.name.encode() in reply


def test_error_reply_without_codec_state_uses_the_configured_variant() -> None:
    bare = Metadata(MessageType.Request, request_id=3, operation_name="add")
    reply, codec = decode_one(
        ThriftCodec(transport="unframed", protocol="compact").on_error(
            bare, LocalError(ErrorType.Timeout)
        )
    )
    assert codec.detected == ("unframed", "compact") and reply.request_id == 3


# -- fast metadata construction --------------------------------------------------------------


def test_framed_fast_path_matches_the_general_path() -> None:
    # The framed binary fast path gives the same metadata as the general path.
    data = tf.sample("framed", "binary", "add", 2, 3, calc_tp.Calculator.add_result(success=3))
    quick, _ = decode_one(data)
    general = ThriftCodec(strict=False, transport="framed")._metadata(
        data, (2, "add", 3, 15, 4, 19, True), "framed", "binary", None, False
    )
    # A compiled Metadata lists its attributes in __mypyc_attrs__, not __slots__.
    attributes = vars(Metadata).get("__slots__") or vars(Metadata)["__mypyc_attrs__"]
    for slot in attributes:
        assert getattr(quick, slot) == getattr(general, slot), slot


def test_framed_fast_path_shares_per_method_facts_within_a_bound() -> None:
    # The fast path keeps what all messages of one type and method share in a bounded table,
    # since method names come off the wire; names past the bound still decode the same.
    from metaprotocol_thrift import codec as codec_module

    codec = ThriftCodec()
    names = [f"m{'x' * (i % 7)}{i}" for i in range(codec_module._MAX_SHAPES + 100)]
    for seqid, name in enumerate(names * 2):
        message = codec.decode(bytearray(tf.sample("framed", "binary", name, 1, seqid)))
        assert isinstance(message, Metadata)
        assert (message.operation_name, message.request_id) == (name, seqid)
        assert message.attributes.to_dict() == {"method": name}
        assert message.codec_state.seqid_offset == 12 + len(name)
        message.attributes["user"] = "changed"  # each message owns its attributes
    assert len(codec._shapes[1]) <= codec_module._MAX_SHAPES


def test_method_shapes_are_kept_per_codec_within_a_byte_bound() -> None:
    """Method names come off the wire: what the fast path remembers of them dies with the
    codec (its connection) and never holds a long name."""
    long_name = "m" * 100_000
    codec = ThriftCodec()
    for name in (long_name, "add"):
        message = codec.decode(bytearray(tf.sample("framed", "binary", name, 1, 1)))
        assert isinstance(message, Metadata) and message.operation_name == name
    assert list(codec._shapes[1]) == ["add"]
    assert ThriftCodec()._shapes[1] == {}


def test_header_prefix_uses_the_sdk_header_dsl() -> None:
    fields = theader.PREFIX.parse(tf.sample("header", "binary", seqid=9))
    assert (fields.magic, fields.seqid) == (0x0FFF, 9)
    assert struct.calcsize(">iHHiH") == theader.PREFIX_SIZE


def test_error_reply_to_an_oversized_theader_compact_frame_keeps_its_protocol() -> None:
    data = tf.sample("header", "compact", seqid=12)
    codec = ThriftCodec(protocol="compact", max_frame_size=20)
    with pytest.raises(FrameTooLargeError) as raised:
        codec.decode(bytearray(data))
    partial = raised.value.metadata
    assert partial is not None and partial.request_id == 12 and partial.operation_name == "add"
    reply, reply_codec = decode_one(
        codec.on_error(partial, LocalError(ErrorType.BadRequest)), protocol="compact"
    )
    assert reply.message_type is MessageType.Error and reply.request_id == 12
    assert reply_codec.detected[0] == "header" and reply.codec_state.protocol == "compact"


@pytest.mark.parametrize(("transport", "protocol"), VARIANTS)
@pytest.mark.parametrize("mtype", [1, 2, 3, 4])
def test_fast_paths_agree_with_the_general_readers(
    transport: str, protocol: str, mtype: int
) -> None:
    from metaprotocol_thrift import binary, compact

    args: Any = {
        1: tf.add_call(),
        2: calc_tp.Calculator.divide_result(err=calc_tp.CalcError(code=1)),
        3: TApplicationException(1, "x"),
        4: calc_tp.Calculator.notify_args(event="e"),
    }[mtype]
    data = tf.sample(transport, protocol, "divide", mtype, 9, args)
    message, _ = decode_one(data, **tf.options_for(transport, protocol))
    start = {"framed": 4, "unframed": 0}.get(transport)
    if start is None:
        start = message.codec_state.header.payload_offset
    if protocol == "compact":
        begin = compact.read_message_begin(data, start, len(data))
    else:
        begin = binary.read_message_begin(data, start, len(data), True)
    mt, name, seqid, seqid_offset, seqid_size, body, strict = begin
    state = message.codec_state
    assert (state.message_type, state.wire_name, message.request_id) == (mt, name, seqid)
    assert (state.seqid_offset, state.seqid_size, message.header_size) == (
        seqid_offset,
        seqid_size,
        body,
    )
    assert state.strict is strict
    expected_status = {1: "Unknown", 2: "Error", 3: "Error", 4: "Unknown"}[mtype]
    assert message.response_status.name == expected_status


def apache_zlib_frame(apache: Any, seqid: int, headers: dict[bytes, bytes]) -> bytes:
    """A THeader call with the zlib transform, written by Apache's THeaderProtocol."""
    from thrift.protocol.THeaderProtocol import THeaderProtocol
    from thrift.transport.THeaderTransport import THeaderClientType, THeaderTransformID
    from thrift.transport.TTransport import TMemoryBuffer as ApMemory

    memory = ApMemory()
    proto = THeaderProtocol(memory, [THeaderClientType.HEADERS])
    proto.add_transform(THeaderTransformID.ZLIB)
    for key, value in headers.items():
        proto.set_header(key, value)
    proto.writeMessageBegin("roundtrip", 1, seqid)
    item = apache.ttypes.Item(id=5, name="z" * 300, values=list(range(50)))
    apache.service.roundtrip_args(item=item).write(proto)
    proto.writeMessageEnd()
    proto.trans.flush()
    return bytes(memory.getvalue())


def test_theader_zlib_decode_mutate_and_rewrite(apache: Any) -> None:
    from thrift.protocol.THeaderProtocol import THeaderProtocol
    from thrift.transport.THeaderTransport import THeaderClientType
    from thrift.transport.TTransport import TMemoryBuffer as ApMemory

    data = apache_zlib_frame(apache, 21, {b"user": b"u"})
    message, codec = decode_one(data)
    assert (message.operation_name, message.request_id) == ("roundtrip", 21)
    assert message.attributes.to_dict() == {"user": "u", "method": "roundtrip"}
    assert message.header_size + message.body_size == len(data)
    out = codec.encode(message, {"x-k": "v"}, request_id=99)
    assert isinstance(out, bytes)
    again, _ = decode_one(out)
    assert again.request_id == 99 and again.attributes["x-k"] == "v"
    # Apache reads the mutated, recompressed frame.
    reader = THeaderProtocol(ApMemory(out), [THeaderClientType.HEADERS])
    name, _, seqid = reader.readMessageBegin()
    args = apache.service.roundtrip_args()
    args.read(reader)
    assert (name, seqid, args.item.name) == ("roundtrip", 99, "z" * 300)
    assert reader.get_headers() == {b"user": b"u", b"x-k": b"v"}
    # max_frame_size bounds the frame on the wire, not the inflated payload.
    small, _ = decode_one(data, max_frame_size=len(data))
    assert small.request_id == 21


def test_theader_zlib_bomb_is_only_peeked_at() -> None:
    import zlib

    payload = tf.message("binary", "add", 1, 8, tf.add_call())
    bomb = zlib.compress(payload[:-1] + b"\x00" * (4 * 1024 * 1024))  # 4 MiB of zeros
    block = theader.THeaderBlock(0, 8, 0, b"\x01\x01", [], b"", 0)
    data = theader.build_frame(0, 8, theader.build_block(block, []), bomb)
    message, codec = decode_one(data, max_inflated_size="1048576")
    assert (message.operation_name, message.request_id) == ("add", 8)
    with pytest.raises(FrameTooLargeError):
        codec.encode(message, request_id=9)  # a rewrite must inflate it all: refused
    assert isinstance(codec.encode(message, {"k": "v"}), bytes)  # a mutation does not


def test_peek_reply_reads_framed_binary_replies_only() -> None:
    # A reply's seqid, size and status without decoding it: what decode reports, or None.
    codec = ThriftCodec()
    ok = tf.sample("framed", "binary", "add", 2, 7, calc_tp.Calculator.add_result(success=3))
    declared = tf.sample(
        "framed",
        "binary",
        "divide",
        2,
        -8,
        calc_tp.Calculator.divide_result(err=calc_tp.CalcError(code=1, reason="by zero")),
    )
    raised = tf.sample("framed", "binary", "add", 3, 9, TApplicationException(1, "boom"))
    for data, status in ((ok, ResponseStatus.Ok), (declared, ResponseStatus.Error)):
        decoded, _ = decode_one(data)
        assert decoded.response_status is status
        head = (decoded.request_id, len(data), status)
        assert codec.peek_reply(bytearray(data)) == head
        assert codec.peek_reply(bytearray(data + ok)) == head
        relabelled = join_encoded(codec.relabel(data, 41))
        assert relabelled == join_encoded(codec.encode(decoded, request_id=41))
    assert codec.peek_reply(bytearray(raised)) == (9, len(raised), ResponseStatus.Error)
    not_replies = [
        tf.sample("framed", "binary", "add", 1, 1, tf.add_call()),  # a call
        tf.sample("framed", "binary", "Calc:add", 2, 1, calc_tp.Calculator.add_result(3)),
        tf.sample("framed", "compact", "add", 2, 1, calc_tp.Calculator.add_result(3)),
        tf.sample("header", "binary", "add", 2, 1, calc_tp.Calculator.add_result(3)),
        tf.sample("unframed", "binary", "add", 2, 1, calc_tp.Calculator.add_result(3)),
        ok[:-1],
    ]
    for data in not_replies:
        assert codec.peek_reply(bytearray(data)) is None
    assert ThriftCodec(transport="unframed").peek_reply(bytearray(ok)) is None


def test_reply_whose_first_field_header_runs_past_its_frame() -> None:
    """Fuzz find: a framed binary REPLY whose one-byte body starts a field. decode raised
    IndexError alone, and with another frame after it read the field id from that frame."""
    frame = bytes.fromhex("000000118001000200000004706767676767676767")
    for stream in (frame, frame + frame):
        buffer = bytearray(stream)
        with pytest.raises(FramingError, match="runs past the frame end") as info:
            ThriftCodec().decode(buffer)
        assert info.value.frame_size == len(frame)
        assert buffer == stream
        assert ThriftCodec().peek_reply(bytearray(stream)) is None


@pytest.mark.parametrize("count", [2, theader.MAX_TRANSFORMS + 1, 5000])
def test_theader_transform_list_is_bounded(count: int) -> None:
    """Issue 13: a frame listing 5000 zlib transforms cost 2.9 s per re-encode (every layer
    inflated and recompressed). Each transform id may appear once, at most MAX_TRANSFORMS."""
    import zlib

    payload = tf.message("binary", "add", 1, 8, tf.add_call())
    for _ in range(min(count, 50)):
        payload = zlib.compress(payload)
    transforms = write_varint(count) + b"\x01" * count
    block = theader.THeaderBlock(0, 8, 0, transforms, [], b"", 0)
    data = theader.build_frame(0, 8, theader.build_block(block, []), payload)
    buffer = bytearray(data)
    match = "listed twice" if count <= theader.MAX_TRANSFORMS else f"lists {count} transforms"
    with pytest.raises(FramingError, match=match) as raised:
        ThriftCodec().decode(buffer)
    assert raised.value.frame_size == len(data) and buffer == data


def test_theader_mutation_of_the_message_name_is_refused() -> None:
    """method (and service of a multiplexed name) come from the message name, which wins over
    info headers: a mutation of them would be silently lost, so encode refuses it."""
    plain, codec = decode_one(tf.sample("header", "binary", "add", 1, 3))
    multiplexed, _ = decode_one(tf.sample("header", "binary", "Calc:add", 1, 4))
    for message, key in ((plain, "method"), (plain, "Method"), (multiplexed, "service")):
        with pytest.raises(MutationError, match="message name"):
            codec.encode(message, {key: "other"})
    mutated, _ = decode_one(join_encoded(codec.encode(plain, {"service": "s"})))
    assert mutated.attributes["service"] == "s"  # not multiplexed: an info header like others


def _header_frame(
    protocol: str,
    seqid: int,
    sections: list[list[tuple[bytes, bytes]]],
    info_ids: list[int] | None = None,
    mtype: int = 1,
) -> bytes:
    """A THeader call ``add`` (or message of type ``mtype``) whose header block holds these
    key-value sections (``info_ids``: each section's id, 1 by default; 2 is persistent)."""
    block = bytearray(b"\x02\x00" if protocol == "compact" else b"\x00\x00")
    for n, pairs in enumerate(sections):
        block += write_varint(info_ids[n] if info_ids else 1) + write_varint(len(pairs))
        for key, value in pairs:
            block += write_varint(len(key)) + key + write_varint(len(value)) + value
    block += b"\x00" * (-len(block) % 4)
    payload = tf.message(protocol, "add", mtype, seqid, tf.add_call())
    return theader.build_frame(0, seqid, bytes(block), payload)


def _sections(frame: bytes) -> list[tuple[int, list[tuple[bytes, bytes]]]]:
    """The info sections of a THeader frame's block, as (info id, pairs), as fbthrift reads
    them (every key-value and persistent section, to the padding)."""
    block = theader.read_block(frame, len(frame))
    pos = theader.PREFIX_SIZE + 2  # protocol id and an empty transform list
    out: list[tuple[int, list[tuple[bytes, bytes]]]] = []
    while pos < block.payload_offset and frame[pos] in (1, 2):
        info_id = frame[pos]
        count, pos = read_varint(frame, pos + 1, block.payload_offset)
        pairs = []
        for _ in range(count):
            size, pos = read_varint(frame, pos, block.payload_offset)
            key = frame[pos : pos + size]
            size, pos = read_varint(frame, pos + size, block.payload_offset)
            pairs.append((key, frame[pos : pos + size]))
            pos += size
        out.append((info_id, pairs))
    return out


@pytest.mark.parametrize("protocol", ["binary", "compact"])
def test_theader_persistent_headers_in_a_request_are_refused_with_the_seqid(
    protocol: str, apache: Any
) -> None:
    """fbthrift's persistent info headers (info id 2) apply to every later message of the
    server's connection: on the engine's connection shared by clients, to other clients'
    requests, and never seen by routing or authorization there. Refused, consuming nothing,
    with the seqid; Apache's THeaderTransport stops reading at them (it never sees the
    headers after them)."""
    from thrift.transport.THeaderTransport import THeaderClientType, THeaderTransport
    from thrift.transport.TTransport import TMemoryBuffer as ApMemory

    data = _header_frame(
        protocol, 51, [[(b"x-user", b"admin")], [(b"trace", b"1")]], info_ids=[2, 1]
    )
    reader = THeaderTransport(ApMemory(data), [THeaderClientType.HEADERS])
    reader.readFrame(0)
    assert reader.get_headers() == {}
    good = tf.sample("header", protocol, seqid=52, headers={b"user": b"alice"})
    codec = ThriftCodec()
    buffer = bytearray(data + good)
    with pytest.raises(FramingError, match="1 persistent THeader info headers") as caught:
        codec.decode(buffer)
    error = caught.value
    assert error.frame_size == len(data) and len(buffer) == len(data) + len(good)
    assert error.metadata is not None and error.metadata.request_id == 51
    del buffer[: error.frame_size]
    assert decode_one(bytes(buffer))[0].attributes["user"] == "alice"


def test_theader_headers_after_a_persistent_section_are_read_and_kept_once() -> None:
    """A key-value section after a persistent one is read (fbthrift reads on; routing must
    see what the server sees), and a mutation leaves exactly one key-value section with the
    mutated value: before, that section was kept verbatim after the rewritten one, and a
    server reading both took the original value back. A reply may carry persistent headers
    (they are the server's): it decodes, and a mutation keeps them."""
    data = _header_frame("binary", 6, [[], [(b"user", b"bob")]], info_ids=[2, 1])
    message, codec = decode_one(data)
    assert message.attributes["user"] == "bob"
    mutated = join_encoded(codec.encode(message, {"user": "eve"}))
    assert _sections(mutated) == [(1, [(b"user", b"eve")]), (2, [])]
    assert decode_one(mutated)[0].attributes["user"] == "eve"
    reply = _header_frame("binary", 7, [[(b"s", b"1")], [(b"k", b"v")]], info_ids=[2, 1], mtype=2)
    answer, codec = decode_one(reply)
    assert answer.attributes["k"] == "v" and "s" not in answer.attributes
    rewritten = join_encoded(codec.encode(answer, {"k": "w"}))
    assert _sections(rewritten) == [(1, [(b"k", b"w")]), (2, [(b"s", b"1")])]


@pytest.mark.parametrize("protocol", ["binary", "compact"])
@pytest.mark.parametrize(
    ("sections", "words"),
    [
        ([[(b"user", b"admin"), (b"USER", b"bob")]], "keys 'user' and 'USER' differ only in case"),
        ([[(b"user", b"admin")], [(b"User", b"bob")]], "keys 'user' and 'User' differ only"),
        ([[(b"user", b"admin"), (b"user", b"bob")]], "key 'user' appears twice"),
        ([[(b"k\xff", b"1"), (b"k\xfe", b"2")]], r"keys b'k\\xff' and b'k\\xfe' read as the same"),
    ],
    ids=["case", "case-two-sections", "twice", "invalid-utf8"],
)
def test_theader_keys_that_collide_are_refused_with_the_seqid(
    protocol: str, sections: list[list[tuple[bytes, bytes]]], words: str, apache: Any
) -> None:
    """Attributes ignore case and keep one value per key; Apache's THeaderTransport keys its
    headers by their exact bytes (the last of a repeated key wins). Headers that collide would
    be judged and routed on another value than the server reads: refused, consuming nothing,
    with the seqid for the error reply."""
    from thrift.transport.THeaderTransport import THeaderClientType, THeaderTransport
    from thrift.transport.TTransport import TMemoryBuffer as ApMemory

    data = _header_frame(protocol, 41, sections)
    reader = THeaderTransport(ApMemory(data), [THeaderClientType.HEADERS])
    reader.readFrame(0)
    keys = [key for pairs in sections for key, _ in pairs]
    assert set(reader.get_headers()) == set(keys)  # what the server reads: every distinct key
    good = tf.sample("header", protocol, seqid=42, headers={b"user": b"alice"})
    codec = ThriftCodec()
    buffer = bytearray(data + good)
    with pytest.raises(FramingError, match=words) as caught:
        codec.decode(buffer)
    error = caught.value
    assert "ambiguous" in error.reason and error.frame_size == len(data)
    assert len(buffer) == len(data) + len(good)
    assert error.metadata is not None and error.metadata.request_id == 41
    reply = codec.on_error(error.metadata, LocalError(ErrorType.BadRequest, str(error)))
    assert decode_one(reply)[0].request_id == 41
    del buffer[: error.frame_size]
    assert decode_one(bytes(buffer))[0].attributes["user"] == "alice"


def test_theader_keys_that_differ_decode_across_sections() -> None:
    data = _header_frame("binary", 3, [[(b"user", b"a")], [(b"user-id", b"1")]])
    message, _ = decode_one(data)
    assert message.attributes.to_dict() == {"user": "a", "user-id": "1", "method": "add"}
