"""Tests of what is specific to this protocol (the kit covers the generic contract)."""

from __future__ import annotations

from metaprotocol_sdk import (
    ErrorType,
    LocalError,
    MessageType,
    Metadata,
    NeedData,
    ResponseStatus,
{%- if cookiecutter.streaming %}
    StreamType,
{%- endif %}
    join_encoded,
)

from {{ cookiecutter.package_name }} import {{ cookiecutter.__codec_class }}
from {{ cookiecutter.package_name }}.protocol import Kind, build_frame


def decode(data: bytes) -> Metadata:
    result = {{ cookiecutter.__codec_class }}().decode(bytearray(data))
    assert isinstance(result, Metadata)
    return result


def test_request_attributes_are_the_key_values() -> None:
    frame = build_frame(Kind.REQUEST, 7, {"method": "sayHello", "tenant": "blue"}, b"hi")
    md = decode(frame)
    assert md.message_type is MessageType.Request
    assert md.request_id == 7
    assert md.operation_name == "sayHello"
    assert md.attributes.to_dict() == {"method": "sayHello", "tenant": "blue"}
    assert bytes(md.body) == b"hi"


def test_partial_frame_needs_the_announced_size() -> None:
    frame = build_frame(Kind.REQUEST, 1, {"method": "m"}, b"body")
    result = {{ cookiecutter.__codec_class }}().decode(bytearray(frame[:-1]))
    assert isinstance(result, NeedData)
    assert result.needed == len(frame)


def test_mutation_is_written_into_the_key_values_and_keeps_the_body() -> None:
    frame = build_frame(Kind.REQUEST, 1, {"method": "sayHello", "tenant": "blue"}, b"payload")
    md = decode(frame)
    codec = {{ cookiecutter.__codec_class }}()
    out = join_encoded(codec.encode(md, {"tenant": "green", "x-routed-by": "proxy"}))
    again = decode(out)
    assert again.attributes.to_dict() == {
        "method": "sayHello",
        "tenant": "green",
        "x-routed-by": "proxy",
    }
    assert bytes(again.body) == b"payload"
    assert codec.encode(md) is md.frame


def test_error_reply_carries_the_request_id_and_error_type() -> None:
    md = decode(build_frame(Kind.REQUEST, 42, {"method": "sayHello"}))
    error = LocalError(ErrorType.RouteNotFound, "no route")
    reply = decode({{ cookiecutter.__codec_class }}().on_error(md, error))
    assert reply.message_type is MessageType.Error
    assert reply.request_id == 42
    assert reply.response_status is ResponseStatus.Error
    assert reply.attributes["error-type"] == "RouteNotFound"
{%- if cookiecutter.heartbeat %}


def test_ping_gets_a_pong_with_the_same_id() -> None:
    codec = {{ cookiecutter.__codec_class }}()
    ping = decode(build_frame(Kind.PING, 9))
    pong = codec.heartbeat_reply(ping)
    assert pong is not None
    reply = decode(pong)
    assert reply.message_type is MessageType.Heartbeat
    assert reply.request_id == 9
    assert codec.heartbeat_reply(reply) is None
{%- endif %}
{%- if cookiecutter.streaming %}


def test_stream_frames_carry_the_stream_id_from_the_id_field() -> None:
    for kind in (Kind.STREAM_OPEN, Kind.STREAM_DATA, Kind.STREAM_HALF_CLOSE, Kind.STREAM_CLOSE):
        md = decode(build_frame(kind, 9, {"method": "chat"}, b"tick"))
        assert md.message_type.name.startswith("Stream_")
        assert (md.stream_id, md.request_id) == (9, 9)
        assert md.stream_type is StreamType.BidiStream
    request = decode(build_frame(Kind.REQUEST, 9))
    assert (request.stream_id, request.stream_type) == (0, StreamType.Unary)


def test_error_reply_to_a_stream_open_ends_that_stream() -> None:
    md = decode(build_frame(Kind.STREAM_OPEN, 11, {"method": "chat"}))
    assert md.message_type is MessageType.Stream_Init
    error = LocalError(ErrorType.UpstreamConnectFailure, "refused")
    reply = decode({{ cookiecutter.__codec_class }}().on_error(md, error))
    # The client reads an ERROR with the stream's id as the stream's end.
    assert reply.message_type is MessageType.Error
    assert reply.request_id == 11
{%- endif %}
