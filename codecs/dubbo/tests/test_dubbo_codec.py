"""Unit tests of the Dubbo codec on frames built in-process (real-peer tests live elsewhere)."""

from __future__ import annotations

import struct

import pytest
from metaprotocol_dubbo import (
    COMPILED,
    ERROR_STATUS,
    DubboCodec,
    ResultFlag,
    Status,
    heartbeat_request,
)
from metaprotocol_dubbo.body import encode_string_map
from metaprotocol_dubbo.codec import KnownRequest, RequestState
from metaprotocol_dubbo.frames import build_request, build_response
from metaprotocol_dubbo.header import (
    FLAG_EVENT,
    FLAG_REQUEST,
    HEADER,
    HEADER_SIZE,
    SERIALIZATION_MASK,
    build_header,
)
from metaprotocol_dubbo.hessian2 import Decoder, JavaObject, dumps, loads

from metaprotocol_sdk import (
    DEFAULT_MAX_FRAME_SIZE,
    CodecError,
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
from metaprotocol_sdk.registry import create_codec

PATH = "com.example.DemoService"
ATTACHMENTS = {"k1": "v1", "k2": "v2", "group": "blue", "timeout": "3000", "x-trace": "abc"}


def decode_one(frame: bytes, codec: DubboCodec | None = None) -> Metadata:
    codec = codec or DubboCodec()
    buffer = bytearray(frame)
    result = codec.decode(buffer)
    assert isinstance(result, Metadata), result
    assert not buffer, "decode must consume exactly one frame"
    return result


def typical_request(**kw: object) -> bytes:
    args = kw.pop("args", ["alice", "bob", "carol"])
    attachments = kw.pop("attachments", ATTACHMENTS)
    return build_request(
        PATH,
        "sayHello",
        args,
        version="1.0.0",
        attachments=attachments,
        **kw,  # type: ignore[arg-type]
    )


# -- registry and capabilities ------------------------------------------------------------------


def test_registered_under_aeraki_name_and_alias() -> None:
    assert isinstance(create_codec("dubbo"), DubboCodec)
    assert isinstance(create_codec("aeraki.meta_protocol.codec.dubbo"), DubboCodec)


def test_capabilities() -> None:
    caps = DubboCodec.capabilities
    assert caps.heartbeat and caps.oneway and caps.mutation and caps.response_mutation
    assert caps.rewrite_request_id and caps.error_reply and not caps.streaming
    assert caps.drain_notice
    assert DubboCodec().max_frame_size == DEFAULT_MAX_FRAME_SIZE


# -- header -------------------------------------------------------------------------------------


def test_header_layout_is_compiled_struct() -> None:
    assert HEADER.compiled and HEADER.size == 16
    raw = build_header(0xC2, 0, 0x0102030405060708, 9)
    assert raw == b"\xda\xbb\xc2\x00" + struct.pack(">QI", 0x0102030405060708, 9)


def test_need_data_until_the_whole_frame_is_buffered() -> None:
    frame = typical_request(request_id=42)
    codec = DubboCodec()
    for cut in range(len(frame)):
        buffer = bytearray(frame[:cut])
        result = codec.decode(buffer)
        assert isinstance(result, NeedData)
        assert len(buffer) == cut, "nothing consumed on NeedData"
        if cut >= 16:
            assert result.needed == len(frame)
    assert decode_one(frame).request_id == 42


def test_two_frames_in_one_buffer_decode_one_at_a_time() -> None:
    a, b = typical_request(request_id=1), typical_request(request_id=2)
    buffer = bytearray(a + b)
    codec = DubboCodec()
    first, second = codec.decode(buffer), codec.decode(buffer)
    assert isinstance(first, Metadata) and isinstance(second, Metadata)
    assert (first.request_id, second.request_id) == (1, 2)
    assert first.frame == a and second.frame == b and not buffer


def test_decode_frame_parses_the_whole_frame_it_is_given_without_a_copy() -> None:
    frame = build_request("svc.Big", "put", ["x" * 200_000], request_id=9, attachments={"k": "v"})
    codec = DubboCodec()
    message = codec.decode_frame(frame)
    assert message.frame is frame  # the engine's large frames are not copied again
    assert message.request_id == 9 and message.attributes["k"] == "v"
    expected = codec.decode(bytearray(frame))
    assert isinstance(expected, Metadata) and message.to_dict() == expected.to_dict()
    with pytest.raises(FramingError, match="left 1 bytes"):  # not one whole frame: decode's path
        codec.decode_frame(frame + b"\x00")
    with pytest.raises(FrameTooLargeError):
        DubboCodec(max_frame_size=len(frame) - 1).decode_frame(frame)


def test_bad_magic_is_a_framing_error_at_offset_0() -> None:
    with pytest.raises(FramingError) as info:
        DubboCodec().decode(bytearray(b"\xca\xfe" + typical_request()[2:]))
    assert info.value.offset == 0


def test_negative_body_length_is_a_framing_error() -> None:
    with pytest.raises(FramingError, match="negative body length"):
        DubboCodec().decode(bytearray(b"\xda\xbb\xc2\x00" + bytes(8) + b"\xff\xff\xff\xff"))


@pytest.mark.parametrize("sid,name", [(6, "fastjson"), (8, "kryo"), (3, "java"), (31, "unknown")])
def test_non_hessian2_serialization_is_unsupported_and_names_the_id(sid: int, name: str) -> None:
    frame = bytearray(typical_request(request_id=5))
    frame[2] = (frame[2] & 0xE0) | sid
    with pytest.raises(UnsupportedError) as info:
        DubboCodec().decode(bytearray(frame))
    exc = info.value
    assert f"serialization id {sid}" in str(exc) and name in str(exc)
    assert exc.frame_size == len(frame), "the engine can drop exactly this frame"
    assert exc.metadata is not None and exc.metadata.request_id == 5


@pytest.mark.parametrize("bad", ["serialization", "descriptor", "truncated body"])
def test_a_bad_frame_consumes_nothing_and_the_good_ones_after_it_decode(bad: str) -> None:
    """Bad, good, good in one buffer: the error leaves the buffer as it was, so dropping
    frame_size bytes (the contract) leaves exactly the two good requests."""
    if bad == "serialization":
        frame = bytearray(typical_request(request_id=1))
        frame[2] = (frame[2] & 0xE0) | 6
    elif bad == "descriptor":
        frame = bytearray(build_request(PATH, "m", [], descriptor="Q", request_id=1))
    else:
        frame = bytearray(build_header(0xC2, 0, 1, 20) + typical_request()[16:36])
    stream = bytes(frame) + typical_request(request_id=2) + typical_request(request_id=3)
    buffer = bytearray(stream)
    codec = DubboCodec()
    with pytest.raises(CodecError) as info:
        codec.decode(buffer)
    assert buffer == stream, "an error consumes nothing"
    assert info.value.frame_size == len(frame)
    del buffer[: info.value.frame_size]
    ids = []
    while buffer:
        md = codec.decode(buffer)
        assert isinstance(md, Metadata)
        ids.append(md.request_id)
    assert ids == [2, 3]


def test_frame_above_max_is_refused_from_the_header_alone() -> None:
    codec = DubboCodec(max_frame_size=1024)
    header = build_header(0xC2, 0, 77, 5000)  # 16 bytes only: nothing of the body buffered
    with pytest.raises(FrameTooLargeError) as info:
        codec.decode(bytearray(header))
    exc = info.value
    assert exc.size == 5016 and exc.limit == 1024 and exc.offset == 12
    assert exc.metadata is not None
    assert exc.metadata.request_id == 77 and exc.metadata.message_type is MessageType.Request


def test_default_limit_is_8_mib() -> None:
    header = build_header(0x02, 20, 9, DEFAULT_MAX_FRAME_SIZE)  # 16 + 8 MiB > 8 MiB
    with pytest.raises(FrameTooLargeError) as info:
        DubboCodec().decode(bytearray(header))
    assert info.value.metadata is not None
    assert info.value.metadata.message_type is MessageType.Response
    ok = build_header(0x02, 20, 9, DEFAULT_MAX_FRAME_SIZE - 16)
    assert isinstance(DubboCodec().decode(bytearray(ok)), NeedData)


# -- requests -----------------------------------------------------------------------------------


def test_request_metadata() -> None:
    md = decode_one(typical_request(request_id=7))
    assert md.message_type is MessageType.Request
    assert md.request_id == 7 and md.operation_name == "sayHello"
    assert md.attributes.to_dict() == {
        **ATTACHMENTS,
        "interface": PATH,
        "method": "sayHello",
        "version": "1.0.0",
    }
    assert md.attributes["GROUP"] == "blue", "attribute lookups ignore case"
    assert md.values["dubbo_version"] == "2.0.2"
    assert md.values["parameter_types"] == "Ljava/lang/String;" * 3
    assert md.header_size == 16 and md.body_size == len(md.frame) - 16


def test_oneway_when_not_two_way() -> None:
    md = decode_one(typical_request(two_way=False))
    assert md.message_type is MessageType.Oneway


def test_interface_attachment_wins_over_path_and_version_falls_back() -> None:
    frame = build_request(
        "com.example.Impl", "m", [], attachments={"interface": "com.example.Api", "version": "2.0"}
    )
    md = decode_one(frame)
    assert md.attributes["interface"] == "com.example.Api"
    assert md.attributes["version"] == "2.0"
    assert md.values["service_path"] == "com.example.Impl"


def test_version_attachment_wins_over_the_body_version_and_a_mutation_of_it_shows() -> None:
    """Java's DecodeableRpcInvocation puts the wire attachments over the body's version, so
    the provider sees the attachment; routing must see the same, and a replaced version."""
    codec = DubboCodec()
    frame = build_request(PATH, "m", ["x"], version="1.0.0", attachments={"version": "2.0"})
    md = decode_one(frame, codec)
    assert md.attributes["version"] == "2.0"
    mutated = decode_one(join_encoded(codec.encode(md, {"version": "3.0"})), codec)
    assert mutated.attributes["version"] == "3.0"
    plain = decode_one(build_request(PATH, "m", ["x"], version="1.0.0"), codec)
    replaced = decode_one(join_encoded(codec.encode(plain, {"version": "3.0"})), codec)
    assert replaced.attributes["version"] == "3.0"


def test_method_from_body_wins_over_an_attachment_named_method() -> None:
    md = decode_one(build_request(PATH, "real", [], attachments={"method": "fake"}))
    assert md.attributes["method"] == "real" and md.operation_name == "real"
    # So a mutation of it would change nothing: refused, not silently dropped.
    for key in ("method", "Method"):
        with pytest.raises(MutationError, match="method of a Dubbo request is in its body"):
            DubboCodec().encode(md, {key: "other", "k": "v"})


def test_a_recognised_request_refuses_a_method_mutation_too() -> None:
    # A request whose head and map were seen before shares a KnownRequest and takes the
    # splice path, whose encoded pairs are cached per mutation: a 'method' key is refused
    # there too, before and after other mutations were cached.
    codec = DubboCodec()
    frame = build_request(PATH, "real", ["x"], attachments={"path": PATH})
    decode_one(frame, codec)
    md = decode_one(frame, codec)
    assert isinstance(md.codec_state, KnownRequest)
    assert codec.encode(md, {"k": "v"})
    for mutation in ({"METHOD": "other"}, {"k": "v", "method": "other"}):
        for _ in range(2):  # a refused mutation is not cached as an accepted one
            with pytest.raises(MutationError, match="method of a Dubbo request is in its body"):
                codec.encode(md, mutation)


def test_an_empty_interface_or_version_mutation_is_refused_not_dropped() -> None:
    # decode reads an empty interface or version attachment as absent (the body's stands):
    # writing one would leave routing on the body's while the mutation meant to blank it.
    codec = DubboCodec()
    frame = build_request(PATH, "m", ["x"], version="1.0.0", attachments={"path": PATH})
    for md in decode_one(frame, codec), decode_one(frame, codec):  # scanned, then recognised
        for mutation in ({"version": ""}, {"k": "v", "Interface": ""}):
            with pytest.raises(MutationError, match="reads as absent"):
                codec.encode(md, mutation)
        blanked = decode_one(join_encoded(codec.encode(md, {"group": ""})), codec)
        assert blanked.attributes["group"] == "" and blanked.attributes["version"] == "1.0.0"


def test_a_mutation_changed_in_place_is_encoded_anew() -> None:
    # The codec remembers the last request mutation by identity and a copy of its items: the
    # same dict changed since is encoded (and checked) anew, on either request state.
    codec = DubboCodec()
    frame = build_request(PATH, "real", ["x"], attachments={"path": PATH})
    first = decode_one(frame, codec)
    again = decode_one(frame, codec)
    assert isinstance(again.codec_state, KnownRequest)
    for md in first, again:
        mutation = {"k": "v1"}
        assert decode_one(join_encoded(codec.encode(md, mutation))).attributes["k"] == "v1"
        mutation["k"] = "v2"
        assert decode_one(join_encoded(codec.encode(md, mutation))).attributes["k"] == "v2"
        mutation["method"] = "other"
        with pytest.raises(MutationError, match="method of a Dubbo request is in its body"):
            codec.encode(md, mutation)


def test_non_string_attachments_are_values_not_attributes() -> None:
    attachments = {"a": "b", "n": 5, "flag": True, "none": None, "list": ["x"]}
    md = decode_one(build_request(PATH, "m", ["x"], attachments=attachments))
    assert "n" not in md.attributes and "flag" not in md.attributes and "list" not in md.attributes
    assert md.attributes["a"] == "b"
    assert md.values["attachments"] == {"n": 5, "flag": True, "none": None, "list": ["x"]}


def test_unicode_strings_use_the_hessian_decoder() -> None:
    frame = build_request(PATH, "grüß", ["日本", "😀"], attachments={"ключ": "значение"})
    md = decode_one(frame)
    assert md.operation_name == "grüß"
    assert md.attributes["ключ"] == "значение"


@pytest.mark.skipif(
    "metaprotocol_dubbo.hessian2.decoder" in COMPILED,
    reason="spies on Decoder.read by monkeypatching, which compiled callers do not see",
)
def test_arguments_are_skipped_not_materialised(monkeypatch: pytest.MonkeyPatch) -> None:
    obj = JavaObject("com.example.User", {"name": "n", "tags": ["a", "b"], "age": 3})
    frame = build_request(
        PATH,
        "save",
        [obj, [1, 2, 3], {"m": 1}],
        descriptor="Lcom/example/User;Ljava/util/List;Ljava/util/Map;",
        attachments={"k": "v"},
    )

    reads: list[int] = []
    original = Decoder.read

    def spy(self: Decoder) -> object:
        reads.append(self.offset)
        return original(self)

    monkeypatch.setattr(Decoder, "read", spy)
    md = decode_one(frame)
    assert md.attributes["k"] == "v" and md.operation_name == "save"
    # Only the attachments map (after the arguments) was materialised.
    assert reads and min(reads) == md.codec_state.attachments.start


def test_arguments_sharing_class_definitions_with_attachments() -> None:
    # An attachment value reusing the class definition written by an argument: skipping the
    # arguments must keep the class numbering so the attachments still decode.
    user = JavaObject("com.example.User", {"name": "a"})
    frame = build_request(
        PATH, "m", [user], descriptor="Lcom/example/User;", attachments={"who": user, "k": "v"}
    )
    md = decode_one(frame)
    assert md.attributes["k"] == "v"
    assert md.values["attachments"]["who"]["name"] == "a"


def test_no_attachments_map_is_tolerated() -> None:
    frame = typical_request()
    body = frame[16:]
    end = len(body) - len(dumps(ATTACHMENTS))
    trimmed = build_header(0xC2, 0, 3, end) + body[:end]
    md = decode_one(trimmed)
    assert md.operation_name == "sayHello" and md.attributes["interface"] == PATH


@pytest.mark.parametrize("desc", ["Q", "Ljava/lang/String", "[", "[[L;X"])
def test_bad_parameter_descriptor(desc: str) -> None:
    frame = build_request(PATH, "m", [], descriptor=desc)
    with pytest.raises(FramingError, match="descriptor") as info:
        DubboCodec().decode(bytearray(frame))
    assert info.value.frame_size == len(frame) and info.value.offset is not None


def test_fewer_arguments_than_the_descriptor_says() -> None:
    frame = build_request(PATH, "m", ["a"], descriptor="Ljava/lang/String;II", attachments={})
    with pytest.raises(CodecError) as info:
        DubboCodec().decode(bytearray(frame))
    exc = info.value
    assert exc.frame_size == len(frame) and exc.offset is not None
    assert exc.metadata is not None and exc.metadata.request_id == 1


def test_truncated_body_inside_a_complete_frame() -> None:
    frame = typical_request(request_id=11)
    short = build_header(0xC2, 0, 11, 20) + frame[16:36]
    with pytest.raises(CodecError) as info:
        DubboCodec().decode(bytearray(short))
    assert info.value.frame_size == 36 and info.value.offset is not None


# -- responses ----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [s for s in Status if s is not Status.OK])
def test_error_status_is_an_error_message(status: Status) -> None:
    md = decode_one(build_response(status=status, error_message="it broke", request_id=9))
    assert md.message_type is MessageType.Error
    assert md.response_status is ResponseStatus.Error
    assert md.values == {"status": int(status), "error_message": "it broke"}


@pytest.mark.parametrize("flag", list(ResultFlag))
def test_result_flags(flag: ResultFlag) -> None:
    value = None if not flag.has_value else "value"
    attachments = {"r": "1", "n": 2} if flag.has_attachments else None
    md = decode_one(build_response(value, result_flag=flag, attachments=attachments))
    assert md.message_type is MessageType.Response
    assert md.values["result_flag"] == flag
    expected = ResponseStatus.Error if flag.is_exception else ResponseStatus.Ok
    assert md.response_status is expected
    if flag.has_attachments:
        assert md.attributes.to_dict() == {"r": "1"}
        assert md.values["attachments"] == {"n": 2}
    else:
        assert len(md.attributes) == 0


def test_exception_result_with_a_java_exception_object() -> None:
    exc = JavaObject("java.lang.RuntimeException", {"detailMessage": "x", "cause": None})
    md = decode_one(build_response(exc, result_flag=ResultFlag.RESPONSE_WITH_EXCEPTION))
    assert md.message_type is MessageType.Response
    assert md.response_status is ResponseStatus.Error


@pytest.mark.parametrize("flag", [7, -1])
def test_bad_result_flag(flag: int) -> None:
    body = dumps(flag) + dumps("x")
    frame = build_header(0x02, 20, 1, len(body)) + body
    with pytest.raises(FramingError, match="result flag") as info:
        DubboCodec().decode(bytearray(frame))
    assert info.value.frame_size == len(frame)


def test_dubbo_remoting_flagless_null_result() -> None:
    frame = build_header(0x02, 20, 4, 1) + b"N"
    md = decode_one(frame)
    assert md.message_type is MessageType.Response and md.response_status is ResponseStatus.Ok
    mutated = join_encoded(DubboCodec().encode(md, {"k": "v"}))
    out = decode_one(mutated)
    assert out.values["result_flag"] == ResultFlag.RESPONSE_NULL_VALUE_WITH_ATTACHMENTS
    assert out.attributes["k"] == "v"
    # Flag 5 carries no value: the body is the flag and the map, the bare null is not kept.
    assert mutated[HEADER_SIZE:] == b"\x95" + encode_string_map({"k": "v"})


def test_plain_responses_share_their_state() -> None:
    """Flags 0..2 responses share one state per header flag; re-encoding still works."""
    small = decode_one(build_response("a", result_flag=ResultFlag.RESPONSE_VALUE))
    large = decode_one(build_response("b" * 300, result_flag=ResultFlag.RESPONSE_VALUE))
    assert small.codec_state is large.codec_state
    assert small.values == {"status": 20, "result_flag": 1} and small.values is not large.values
    assert small.attributes is not large.attributes
    for md, value in ((small, "a"), (large, "b" * 300)):
        out = decode_one(join_encoded(DubboCodec().encode(md, {"k": "v"}, request_id=9)))
        assert out.request_id == 9 and out.attributes["k"] == "v"
        assert out.values["result_flag"] == ResultFlag.RESPONSE_VALUE_WITH_ATTACHMENTS
        assert loads(out.frame[HEADER_SIZE + 1 : out.codec_state.attachments.start]) == value


# -- heartbeats ---------------------------------------------------------------------------------


def test_heartbeat_request_and_reply() -> None:
    codec = DubboCodec()
    request = decode_one(heartbeat_request(31))
    assert request.message_type is MessageType.Heartbeat and request.request_id == 31
    reply = codec.heartbeat_reply(request)
    assert reply == b"\xda\xbb\x22\x14" + struct.pack(">QI", 31, 1) + b"N"
    reply_md = decode_one(reply)
    assert reply_md.message_type is MessageType.Heartbeat
    assert reply_md.response_status is ResponseStatus.Ok
    assert codec.heartbeat_reply(reply_md) is None


def test_oneway_event_needs_no_reply() -> None:
    readonly = build_header(0xA2, 0, 5, 2) + dumps("R")  # Dubbo's read-only event, one-way
    md = decode_one(readonly)
    assert md.message_type is MessageType.Heartbeat
    assert DubboCodec().heartbeat_reply(md) is None


def test_heartbeat_reply_is_none_for_non_heartbeats() -> None:
    assert DubboCodec().heartbeat_reply(decode_one(typical_request())) is None


# -- mutation and request ids -------------------------------------------------------------------


def test_empty_mutation_returns_the_frame_itself() -> None:
    codec = DubboCodec()
    for frame in (typical_request(), build_response("x"), heartbeat_request(3)):
        md = decode_one(frame)
        assert codec.encode(md) is md.frame
        assert codec.encode(md, {}) is md.frame
        assert codec.encode(md, None, request_id=md.request_id) is md.frame


def test_request_mutation_adds_and_replaces_attachments() -> None:
    codec = DubboCodec()
    md = decode_one(typical_request(request_id=8))
    out = codec.encode(md, {"k1": "changed", "x-new": "added"})
    assert isinstance(out, list)
    # The arguments travel as a zero-copy slice of the original frame, byte for byte.
    args = out[1]
    assert isinstance(args, memoryview) and args.obj is md.frame
    att_start = md.codec_state.attachments.start
    assert bytes(args) == md.frame[16:att_start]
    data = join_encoded(out)
    assert struct.unpack(">i", data[12:16])[0] == len(data) - 16, "body length fixed"
    again = decode_one(data)
    assert again.request_id == 8
    assert again.attributes["k1"] == "changed" and again.attributes["x-new"] == "added"
    assert again.attributes["k2"] == "v2" and again.operation_name == "sayHello"
    assert loads(data[att_start:]) == {**ATTACHMENTS, "k1": "changed", "x-new": "added"}


def test_mutation_keeps_non_string_attachments_byte_identical() -> None:
    user = JavaObject("com.example.User", {"name": "a"})
    frame = build_request(
        PATH,
        "m",
        [user],
        descriptor="Lcom/example/User;",
        attachments={"who": user, "n": 7, "k": "v"},
    )
    md = decode_one(frame)
    data = join_encoded(DubboCodec().encode(md, {"k": "w", "added": "1"}))
    again = decode_one(data)
    assert again.attributes["k"] == "w" and again.attributes["added"] == "1"
    assert again.values["attachments"] == md.values["attachments"]


def test_mutation_on_a_request_without_attachments() -> None:
    frame = typical_request()
    end = len(frame) - 16 - len(dumps(ATTACHMENTS))
    trimmed = build_header(0xC2, 0, 3, end) + frame[16 : 16 + end]
    data = join_encoded(DubboCodec().encode(decode_one(trimmed), {"a": "b"}))
    assert decode_one(data).attributes["a"] == "b"


def test_request_id_rewrite() -> None:
    codec = DubboCodec()
    md = decode_one(typical_request(request_id=1))
    data = join_encoded(codec.encode(md, request_id=2**40 + 5))
    assert data[12:] == md.frame[12:] and data[:4] == md.frame[:4]
    assert decode_one(data).request_id == 2**40 + 5
    both = decode_one(join_encoded(codec.encode(md, {"a": "b"}, request_id=99)))
    assert both.request_id == 99 and both.attributes["a"] == "b"


@pytest.mark.parametrize("flag", list(ResultFlag))
def test_response_mutation(flag: ResultFlag) -> None:
    value = None if not flag.has_value else {"nested": ["v"]}
    attachments = {"r": "1"} if flag.has_attachments else None
    md = decode_one(build_response(value, result_flag=flag, attachments=attachments, request_id=6))
    data = join_encoded(DubboCodec().encode(md, {"served-by": "relay"}, request_id=60))
    out = decode_one(data)
    assert out.request_id == 60
    assert out.values["result_flag"] == flag.with_attachments
    assert out.attributes["served-by"] == "relay"
    if flag.has_attachments:
        assert out.attributes["r"] == "1"
    # the value bytes are unchanged
    decoder = Decoder(data, 16)
    assert decoder.read() == flag.with_attachments
    if flag.has_value:
        assert decoder.read() == value


def test_response_mutation_without_upgrade_refuses_flags_0_to_2() -> None:
    codec = DubboCodec(upgrade_result_flag=False)
    md = decode_one(build_response("v"))
    with pytest.raises(MutationError, match="upgrade_result_flag"):
        codec.encode(md, {"a": "b"})
    assert codec.encode(md, {}) is md.frame
    with_att = decode_one(build_response("v", attachments={"x": "y"}))
    assert decode_one(join_encoded(codec.encode(with_att, {"a": "b"}))).attributes["a"] == "b"


def test_error_responses_and_heartbeats_refuse_mutations_but_take_new_ids() -> None:
    codec = DubboCodec()
    for frame in (
        build_response(status=Status.SERVER_ERROR),
        heartbeat_request(4),
        build_header(0x22, 20, 4, 1) + b"N",
    ):
        md = decode_one(frame)
        with pytest.raises(MutationError, match="no attachments"):
            codec.encode(md, {"a": "b"})
        renumbered = join_encoded(codec.encode(md, request_id=12))
        assert decode_one(renumbered).request_id == 12


def test_from_options() -> None:
    codec = DubboCodec.from_options({"max_frame_size": 100, "upgrade_result_flag": False})
    assert codec.max_frame_size == 100 and codec.upgrade_result_flag is False


# -- error replies ------------------------------------------------------------------------------


@pytest.mark.parametrize("error_type", list(ErrorType))
def test_on_error_builds_a_dubbo_error_response(error_type: ErrorType) -> None:
    codec = DubboCodec()
    request = decode_one(typical_request(request_id=123456789))
    reply = codec.on_error(request, LocalError(error_type, "no route for sayHello"))
    assert reply, "an empty reply is a bug"
    md = decode_one(reply)
    assert md.message_type is MessageType.Error and md.request_id == 123456789
    assert md.values["status"] == ERROR_STATUS[error_type]
    assert md.values["error_message"] == f"{error_type.name}: no route for sayHello"
    assert reply[2] == 0x02, "response, Hessian 2, not an event"
    assert loads(reply[16:]) == md.values["error_message"]


@pytest.mark.parametrize(
    "error_type,status",
    [
        (ErrorType.RouteNotFound, Status.SERVICE_NOT_FOUND),
        (ErrorType.ClusterNotFound, Status.SERVICE_NOT_FOUND),
        (ErrorType.NoHealthyUpstream, Status.SERVICE_ERROR),
        (ErrorType.UpstreamConnectFailure, Status.SERVICE_ERROR),
        (ErrorType.UpstreamReset, Status.SERVER_ERROR),
        (ErrorType.Timeout, Status.SERVER_TIMEOUT),
        (ErrorType.OverLimit, Status.SERVER_THREADPOOL_EXHAUSTED_ERROR),
        (ErrorType.BadRequest, Status.BAD_REQUEST),
        (ErrorType.BadResponse, Status.BAD_RESPONSE),
    ],
)
def test_error_status_mapping(error_type: ErrorType, status: Status) -> None:
    assert ERROR_STATUS[error_type] is status


def test_on_error_without_message_and_for_partial_metadata() -> None:
    codec = DubboCodec(max_frame_size=64)
    with pytest.raises(FrameTooLargeError) as info:
        codec.decode(bytearray(build_header(0xC2, 0, 55, 1000)))
    assert info.value.metadata is not None
    reply = codec.on_error(info.value.metadata, LocalError(ErrorType.BadRequest))
    md = decode_one(reply)
    assert md.request_id == 55 and md.values["error_message"] == "BadRequest"
    assert md.values["status"] == Status.BAD_REQUEST


def test_long_chunked_strings_in_arguments_and_attachments() -> None:
    big = "x" * 70_000  # Hessian writes it in chunks ('R' ... 'S')
    frame = build_request(PATH, "m", [big, "small"], attachments={"big": big, "k": "v"})
    md = decode_one(frame)
    assert md.attributes["big"] == big and md.attributes["k"] == "v"
    data = join_encoded(DubboCodec().encode(md, {"k": "w"}))
    again = decode_one(data)
    assert again.attributes["big"] == big and again.attributes["k"] == "w"


def test_typed_attachments_map() -> None:
    from metaprotocol_dubbo.hessian2 import TypedMap

    attachments = TypedMap("java.util.HashMap", {"k": "v", "group": "g"})
    frame = build_request(PATH, "m", ["a"], attachments=attachments)
    assert frame[-len(dumps(attachments)) :][:1] == b"M"
    md = decode_one(frame)
    assert md.attributes["k"] == "v" and md.attributes["group"] == "g"
    again = decode_one(join_encoded(DubboCodec().encode(md, {"k": "w", "n": "1"})))
    assert again.attributes.to_dict() == {**md.attributes.to_dict(), "k": "w", "n": "1"}


def test_null_attachments_and_null_version() -> None:
    body = b"".join(dumps(v) for v in ("2.0.2", PATH, None, "m", "")) + b"N"
    frame = build_header(0xC2, 0, 1, len(body)) + body
    md = decode_one(frame)
    assert md.operation_name == "m" and "version" not in md.attributes
    again = decode_one(join_encoded(DubboCodec().encode(md, {"a": "b"})))
    assert again.attributes["a"] == "b"


def test_recent_heads_are_recognised_without_mixing_requests() -> None:
    codec = DubboCodec()
    a1 = build_request(PATH, "a", ["x"], attachments={"k": "1"}, request_id=1)
    b = build_request(PATH, "b", ["x", "y"], attachments={"k": "2"}, request_id=2)
    a2 = build_request(PATH, "a", ["other"], attachments={"k": "3", "n": 4}, request_id=3)
    a3 = build_request(PATH, "a", [JavaObject("T", {"f": 1})], descriptor="Ljava/lang/String;")
    seen = [decode_one(f, codec) for f in (a1, b, a2, a1, b, a3)]
    assert [md.operation_name for md in seen] == ["a", "b", "a", "a", "b", "a"]
    assert [md.attributes.get("k") for md in seen[:5]] == ["1", "2", "3", "1", "2"]
    assert seen[2].values["attachments"] == {"n": 4}
    assert seen[5].request_id == 1 and len(codec._heads) == 2
    for fresh, cached in zip(seen, (decode_one(f) for f in (a1, b, a2, a1, b, a3)), strict=True):
        assert fresh.attributes.to_dict() == cached.attributes.to_dict()
        assert fresh.values == cached.values
    codec.reset()
    assert not codec._heads


def request_state(md: Metadata) -> RequestState:
    """The request's full codec state (a recognised request shares a KnownRequest)."""
    state = md.codec_state
    return state.state(md.frame) if isinstance(state, KnownRequest) else state


def same_metadata(a: Metadata, b: Metadata) -> None:
    assert a.to_dict() == b.to_dict()
    assert a.attributes.to_dict() == b.attributes.to_dict() and a.values == b.values
    sa, sb = request_state(a), request_state(b)
    assert (sa.flag, sa.args) == (sb.flag, sb.args)
    assert (sa.attachments.start, sa.attachments.end) == (sb.attachments.start, sb.attachments.end)
    assert sa.attachments.strings == sb.attachments.strings


def test_repeated_attachment_maps_are_recognised_per_message() -> None:
    # Same head and map, arguments of different lengths: the map starts elsewhere each time.
    codec = DubboCodec()
    attachments = {"path": PATH, "interface": PATH, "Env": "canary", "version": "2.0"}
    frames = [
        build_request(PATH, "a", [arg], attachments=attachments, request_id=i)
        for i, arg in enumerate(["x", "yy" * 40, "", "é" * 3, "x"], 1)
    ]
    seen = [decode_one(f, codec) for f in frames * 2]
    ((_, head),) = codec._heads
    assert head.maps is not None and len(head.maps) == 1  # parsed once, recognised after
    # After the first, every request shares one state (nothing in it depends on the frame),
    # except the one whose argument is not ASCII: it is read in full each time.
    assert isinstance(seen[0].codec_state, RequestState)
    shared = seen[1].codec_state
    assert isinstance(shared, KnownRequest)
    for md in seen[1:]:
        assert md.codec_state is shared or "é" in md.frame.decode("utf-8", "replace")
    for md, frame in zip(seen, frames * 2, strict=True):
        same_metadata(md, decode_one(frame))
        assert join_encoded(codec.encode(md, {"n": "1"}, request_id=99)) == join_encoded(
            DubboCodec().encode(decode_one(frame), {"n": "1"}, request_id=99)
        )
    # Each message owns its attributes and values, though they came from one parsed map.
    for md in seen[1], seen[5]:
        md.attributes["env"] = "changed"
        md.values["service_path"] = "changed"
    assert seen[4].attributes["ENV"] == "canary" and seen[6].values["service_path"] == PATH
    again = decode_one(frames[0], codec)
    assert again.attributes["env"] == "canary" and again.values["service_path"] == PATH


def test_attachment_maps_that_never_repeat_stop_being_looked_up() -> None:
    codec = DubboCodec()
    for i in range(100):
        frame = build_request(PATH, "a", ["x"], attachments={"trace": f"t{i}"}, request_id=i)
        md = decode_one(frame, codec)
        same_metadata(md, decode_one(frame))
    ((_, head),) = codec._heads
    assert head.maps is None  # 64 misses in a row: lookups stopped, decoding goes on the same
    frame = build_request(PATH, "a", ["x"], attachments={"trace": "t1"}, request_id=7)
    same_metadata(decode_one(frame, codec), decode_one(frame))


def test_large_request_is_read_without_inline_text_and_mutates_the_same() -> None:
    # Above the inline-scan limit the head is read by the decoder and only the tail is scanned.
    big = build_request(PATH, "echo", ["x" * 100_000], attachments={"k": "v", "Env": "canary"})
    small = build_request(PATH, "echo", ["x"], attachments={"k": "v", "Env": "canary"})
    large_md, small_md = decode_one(big), decode_one(small)
    assert large_md.attributes.to_dict() == small_md.attributes.to_dict()
    again = decode_one(join_encoded(DubboCodec().encode(large_md, {"x-route": "v2"})))
    assert again.attributes["x-route"] == "v2" and again.attributes["env"] == "canary"
    # Everything before the attachments map (head and the chunked argument) is byte-identical.
    map_start = big.rindex(b"H")
    assert again.frame[16:map_start] == big[16:map_start]


@pytest.mark.parametrize("arg_size", [1, 20_000])
def test_new_attachment_keys_are_spliced_before_the_map_end(arg_size: int) -> None:
    frame = build_request(PATH, "m", ["a" * arg_size, "b"], attachments={"k": "v", "Env": "prod"})
    md = decode_one(frame)
    spliced = DubboCodec().encode(md, {"x-route": "v2"})
    if len(frame) <= 16 * 1024:
        # A small frame is written anew in one piece (cheaper than views and buffers).
        assert isinstance(spliced, bytes)
        assert spliced[16 : len(frame) - 1] == frame[16:-1]
    else:
        assert isinstance(spliced, list)
        body = spliced[1]
        # Arguments and the existing attachments travel as one slice of the original frame.
        assert isinstance(body, memoryview) and body.obj is md.frame
        assert bytes(body) == frame[16:-1]
    again = decode_one(join_encoded(spliced))
    assert again.attributes["x-route"] == "v2" and again.attributes["env"] == "prod"
    assert again.body_size == len(join_encoded(spliced)) - 16
    # Replacing an existing key re-encodes the map instead; the result decodes the same way.
    replaced = DubboCodec().encode(md, {"Env": "canary", "x-route": "v2"})
    assert isinstance(replaced, list) and bytes(replaced[1]) != frame[16:-1]
    assert decode_one(join_encoded(replaced)).attributes["env"] == "canary"


@pytest.mark.parametrize("size", [10, 100_000])
def test_peek_reply_and_relabel(size: int) -> None:
    codec = DubboCodec()
    frame = build_response("v" * size, request_id=5, result_flag=ResultFlag.RESPONSE_VALUE)
    assert codec.peek_reply(bytearray(frame)) == (5, len(frame), ResponseStatus.Ok)
    relabelled = codec.relabel(frame, 77)
    # Large frames keep their body as a view instead of a copy.
    assert isinstance(relabelled, bytes) == (len(frame) <= 16 * 1024)
    expected = join_encoded(codec.encode(decode_one(frame), request_id=77))
    assert join_encoded(relabelled) == expected
    assert decode_one(expected).request_id == 77
    with_attachments = build_response("v", attachments={"k": "v"})
    assert codec.peek_reply(bytearray(with_attachments)) is None  # decode reads the map


def test_peek_reply_leaves_requests_events_and_other_serializations_to_decode() -> None:
    # The header flag of a plain OK reply, with a request or event bit, or another
    # serialization id: a body that reads as a plain result flag does not make it one.
    codec = DubboCodec()
    frame = build_response("v", request_id=5, result_flag=ResultFlag.RESPONSE_VALUE)
    flag = frame[2]
    assert codec.peek_reply(bytearray(frame)) == (5, len(frame), ResponseStatus.Ok)
    for other in (flag | FLAG_REQUEST, flag | FLAG_EVENT, (flag & ~SERIALIZATION_MASK) | 3):
        changed = bytearray(frame)
        changed[2] = other
        for _ in range(2):  # not remembered as a plain reply's flag either
            assert codec.peek_reply(bytearray(changed)) is None


def test_request_with_an_empty_body_is_refused() -> None:
    """Fuzz find: a request with body length 0 decoded as a request with empty strings (a
    missing byte read as a zero-length string), and a mutation then wrote a frame that does
    not decode."""
    frame = bytes.fromhex("dabbc200000000000000000000000000")
    buffer = bytearray(frame)
    with pytest.raises(FramingError, match="body ends where a string should start") as info:
        DubboCodec().decode(buffer)
    assert info.value.frame_size == len(frame) and info.value.offset == HEADER_SIZE
    assert buffer == frame


def test_response_mutation_refuses_a_value_that_does_not_end_the_frame() -> None:
    """Fuzz find: upgrading flag 0..2 appends the map after the value, unparsed; with a broken
    value (a string length off) re-decoding read "attachments" from inside the old body. The
    value must end exactly at the frame end."""
    good = build_response(
        JavaObject("java.lang.RuntimeException", {"detailMessage": "boom"}),
        result_flag=ResultFlag.RESPONSE_WITH_EXCEPTION,
    )
    at = good.index(b"\x04boom")
    broken = good[:at] + b"\x02boom"  # the string claims 2 characters: the value ends early
    broken = build_header(0x02, 20, 1, len(broken) - HEADER_SIZE) + broken[HEADER_SIZE:]
    null_with_junk = build_header(0x02, 20, 1, 2) + b"\x92\x91"  # flag 2, then a stray byte
    codec = DubboCodec()
    for frame in (broken, null_with_junk):
        md = decode_one(frame)
        with pytest.raises(MutationError, match="response value"):
            codec.encode(md, {"k": "v"})
    again = decode_one(join_encoded(codec.encode(decode_one(good), {"k": "v"})))
    assert again.attributes["k"] == "v" and again.values["result_flag"] == 3


def test_replacing_a_duplicated_attachment_key_in_a_map_with_other_keys() -> None:
    """Fuzz find: a map holding a key twice and a non-string key is rewritten entry by entry;
    only the first occurrence was replaced while decode reads the last, so the mutation was
    lost. Every occurrence is replaced. (A request with such a map is refused, see
    ``test_request_attachment_keys_that_collide_are_refused_with_the_request_id``; replies
    are read as they come.)"""
    head = build_response("ok", attachments={})
    body = head[HEADER_SIZE:-2]  # without the empty map
    attachments = b"H\x05dubbo\x05first\x91\x01x\x05dubbo\x06secondZ"  # 'dubbo' twice, key 1
    frame = build_header(0x02, 20, 1, len(body) + len(attachments)) + body + attachments
    codec = DubboCodec()
    md = decode_one(frame, codec)
    assert md.attributes["dubbo"] == "second" and md.values["attachments"] == {1: "x"}
    again = decode_one(join_encoded(codec.encode(md, {"dubbo": "fuzz", "k": "v"})), codec)
    assert again.attributes["dubbo"] == "fuzz" and again.attributes["k"] == "v"
    assert again.values["attachments"] == {1: "x"}


def _with_map(request: bytes, pairs: bytes) -> bytes:
    """``request`` (built with an empty attachments map) with the map's entries ``pairs``."""
    assert request.endswith(b"HZ")
    body = request[HEADER_SIZE:-1] + pairs + b"Z"
    return request[:12] + struct.pack(">i", len(body)) + body


@pytest.mark.parametrize(
    ("pairs", "words"),
    [
        # the case variant comes last: the engine read USER=bob, the provider user=admin
        (b"\x04user\x05admin\x04USER\x03bob", "keys 'user' and 'USER' differ only in case"),
        (b"\x04user\x05admin\x04user\x03bob", "key 'user' appears twice"),
        # a non-string entry takes the Hessian decoder's path
        (b"\x04user\x05admin\x04user\x03bob\x01n\x91", "key 'user' appears twice"),
        (b"\x04USER\x03bob\x04user\x91", "keys 'USER' and 'user' differ only in case"),
    ],
    ids=["case", "twice", "twice-decoder", "case-non-string"],
)
@pytest.mark.parametrize("size", ["small", "large"])
def test_request_attachment_keys_that_collide_are_refused_with_the_request_id(
    pairs: bytes, words: str, size: str
) -> None:
    """Attributes ignore case and keep one value per key; Java's attachments ``HashMap`` keeps
    every key as sent. A request whose keys collide would be judged and routed on another
    value than the provider reads: it is refused (consuming nothing, with its id), never
    read one way. Large frames (not scanned as text) and decode_frame alike."""
    arg = "a" * (70_000 if size == "large" else 1)
    good = build_request(PATH, "greet", [arg], request_id=5, attachments={"user": "alice"})
    bad = _with_map(build_request(PATH, "greet", [arg], request_id=2**40 + 7), pairs)
    codec = DubboCodec()
    for _ in range(2):  # the head is known after the good request: refused all the same
        decode_one(good, codec)
        buffer = bytearray(bad + good)
        with pytest.raises(FramingError, match=words) as caught:
            codec.decode(buffer)
        error = caught.value
        assert "ambiguous" in error.reason and error.offset == len(bad) - len(pairs) - 2
        assert error.frame_size == len(bad) and len(buffer) == len(bad) + len(good)
        assert error.metadata is not None and error.metadata.request_id == 2**40 + 7
        del buffer[: error.frame_size]
        assert decode_one(bytes(buffer), codec).attributes["user"] == "alice"
        with pytest.raises(FramingError, match=words):
            codec.decode_frame(bad)
    reply = codec.on_error(error.metadata, LocalError(ErrorType.BadRequest, str(error)))
    assert struct.unpack_from(">q", reply, 4)[0] == 2**40 + 7 and reply[3] == Status.BAD_REQUEST


def test_keys_that_differ_from_every_other_key_ignoring_case_decode() -> None:
    """Near misses are not collisions: ``user`` and ``user-id``, a non-string key."""
    pairs = b"\x04user\x05admin\x07user-id\x011\x91\x01x"
    message = decode_one(_with_map(build_request(PATH, "greet", ["a"]), pairs))
    assert message.attributes["user"] == "admin" and message.values["attachments"] == {1: "x"}


def _map_items(message: Metadata) -> list[tuple[object, object]]:
    """The attachments map of a decoded request, in wire order."""
    state = message.codec_state
    assert isinstance(state, RequestState) and state.attachments is not None
    value = loads(bytes(message.frame[state.attachments.start :]))
    assert isinstance(value, dict)
    return list(value.items())


@pytest.mark.parametrize("mode", ["known", "fresh", "non-string"])
@pytest.mark.parametrize("arg_size", [1, 20_000, 70_000])
def test_a_mutation_replaces_an_attachment_whose_key_differs_only_in_case(
    mode: str, arg_size: int
) -> None:
    """Attributes ignore case; a mutation matched keys exactly, so a route writing ``user: x``
    onto a request carrying ``User: admin`` sent both: the provider saw two attachments and a
    second engine refused the request as ambiguous. The mutation's key replaces the variant
    in place, spelled as the mutation spells it; untouched entries keep their place. Every
    path: the splice of a recognised map (``known``), a fresh scan (``fresh``), the entry by
    entry rewrite (``non-string``), small, above 16 KiB (views) and above 64 KiB (no text)."""
    attachments: dict[str, object] = {"k": "v", "User": "admin", "Env": "prod"}
    if mode == "non-string":
        attachments["n"] = 7
    # Compact strings whose length bytes are ASCII (768 = 0x300), a short descriptor: the
    # inline scan reads them, and a frame below 64 KiB has its map recognised.
    count = max(1, arg_size // 768)
    args = ["a" * min(arg_size, 768)] * count
    frame = build_request(PATH, "m", args, descriptor="Lx;" * count, attachments=attachments)
    codec = DubboCodec()
    md = decode_one(frame, codec)
    if mode == "known":
        md = decode_one(frame, codec)
        md = decode_one(frame, codec)  # the map was kept after its head was seen
        assert (type(md.codec_state) is KnownRequest) == (len(frame) <= 64 * 1024)
    data = join_encoded(codec.encode(md, {"user": "x", "x-new": "1"}, request_id=9))
    again = decode_one(data)  # a colliding map would be refused here
    assert again.attributes["user"] == "x" and again.request_id == 9
    expected: list[tuple[object, object]] = [("k", "v"), ("user", "x"), ("Env", "prod")]
    if mode == "non-string":
        expected.append(("n", 7))
        assert again.values["attachments"] == {"n": 7}
    assert _map_items(again) == [*expected, ("x-new", "1")]
    start = frame.rindex(b"H\x01k")  # the map's start
    assert again.frame[HEADER_SIZE:start] == frame[HEADER_SIZE:start]  # arguments untouched
    # A key that only looks alike ('user-id') is added, not replaced: the splice still applies.
    spliced = decode_one(join_encoded(codec.encode(md, {"user-id": "1"})))
    assert _map_items(spliced)[:3] == [("k", "v"), ("User", "admin"), ("Env", "prod")]


def test_a_mutation_holding_a_key_in_two_spellings_writes_the_last() -> None:
    """As attributes keep it: ``{"user": "a", "USER": "b"}`` writes ``USER: b`` once, whether
    added, spliced or written over an existing key."""
    for attachments in ({"k": "v"}, {"k": "v", "User": "admin"}, {"k": "v", "n": 7}):
        frame = build_request(PATH, "m", ["a"], attachments=attachments)
        data = join_encoded(DubboCodec().encode(decode_one(frame), {"user": "a", "USER": "b"}))
        items = _map_items(decode_one(data))
        assert [item for item in items if str(item[0]).lower() == "user"] == [("USER", "b")]


def test_a_reply_mutation_leaves_one_spelling_of_the_key() -> None:
    """Replies are read as they come, so one may carry ``user`` twice and ``User``: the
    mutation replaces the first in place and drops the others (string maps and the entry by
    entry rewrite alike)."""
    head = build_response("ok", attachments={})
    body = head[HEADER_SIZE:-2]  # without the empty map
    for extra in (b"", b"\x91\x01x"):  # key 1: a non-string entry takes rewrite_map
        attachments = b"H\x04user\x01a\x01k\x01v\x04User\x01b\x04user\x01c" + extra + b"Z"
        frame = build_header(0x02, 20, 1, len(body) + len(attachments)) + body + attachments
        md = decode_one(frame)
        data = join_encoded(DubboCodec().encode(md, {"USER": "x"}))
        again = decode_one(data)
        assert again.attributes["user"] == "x"
        state = again.codec_state
        assert state.attachments is not None
        items = list(loads(data[state.attachments.start :]).items())
        assert items == [("USER", "x"), ("k", "v")] + ([(1, "x")] if extra else [])
