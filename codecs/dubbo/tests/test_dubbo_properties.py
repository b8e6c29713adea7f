"""Property tests: split points, garbage, and mutation round trips on generated frames."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from metaprotocol_dubbo import DubboCodec
from metaprotocol_dubbo.conformance.strategies import frames as messages
from metaprotocol_dubbo.conformance.strategies import requests, responses
from metaprotocol_dubbo.header import build_header

from metaprotocol_sdk import CodecError, Metadata, MutationError, NeedData, join_encoded

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def summary(md: Metadata) -> tuple[object, ...]:
    return (
        md.message_type,
        md.request_id,
        md.operation_name,
        md.response_status,
        md.header_size,
        md.body_size,
        md.frame,
        md.attributes.to_dict(),
        md.values,
    )


def decode_all(codec: DubboCodec, buffer: bytearray) -> list[Metadata]:
    out = []
    while True:
        result = codec.decode(buffer)
        if isinstance(result, NeedData):
            return out
        out.append(result)


@SETTINGS
@given(messages())
def test_identical_decode_at_every_split_point(frame: bytes) -> None:
    expected = summary(DubboCodec().decode(bytearray(frame)))  # type: ignore[arg-type]
    codec = DubboCodec()
    for cut in range(len(frame) + 1):
        buffer = bytearray(frame[:cut])
        first = codec.decode(buffer)
        if cut < len(frame):
            assert isinstance(first, NeedData) and len(buffer) == cut
            buffer += frame[cut:]
            first = codec.decode(buffer)
        assert isinstance(first, Metadata) and not buffer
        assert summary(first) == expected


@SETTINGS
@given(st.lists(messages(), min_size=1, max_size=3), st.data())
def test_identical_decode_of_a_stream_in_random_chunks(
    frames: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(frames)
    expected = [summary(md) for md in decode_all(DubboCodec(), bytearray(stream))]
    assert len(expected) == len(frames)
    cuts = sorted(
        data.draw(st.lists(st.integers(0, len(stream)), max_size=4, unique=True), label="cuts")
    )
    codec = DubboCodec()  # one codec per connection, fed chunk by chunk
    buffer = bytearray()
    got: list[Metadata] = []
    previous = 0
    for cut in [*cuts, len(stream)]:
        buffer += stream[previous:cut]
        previous = cut
        got += decode_all(codec, buffer)
    assert [summary(md) for md in got] == expected and not buffer


@SETTINGS
@given(messages())
def test_every_prefix_is_need_data(frame: bytes) -> None:
    codec = DubboCodec()
    step = max(1, len(frame) // 40)
    for cut in [*range(0, len(frame), step), len(frame) - 1]:
        buffer = bytearray(frame[:cut])
        assert isinstance(codec.decode(buffer), NeedData)
        assert len(buffer) == cut


@SETTINGS
@given(st.binary(max_size=300))
def test_garbage_gives_need_data_or_codec_error(blob: bytes) -> None:
    try:
        result = DubboCodec().decode(bytearray(blob))
    except CodecError:
        return
    assert isinstance(result, (Metadata, NeedData))


@SETTINGS
@given(
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=200),
)
def test_valid_header_with_garbage_body(flag: int, status: int, rid: int, body: bytes) -> None:
    frame = build_header(flag, status, rid, len(body)) + body
    try:
        result = DubboCodec().decode(bytearray(frame))
    except CodecError as exc:
        assert exc.frame_size == len(frame), "a bad body names its frame's extent"
        assert exc.metadata is not None and exc.metadata.request_id == rid
    else:
        assert isinstance(result, Metadata) and result.request_id == rid


#: A request hypothesis found with the mutation ``{"METHOD": ""}``, which the codec refuses.
_FOUND = b"\xda\xbb\x82\x00" + bytes(11) + b"\x0e\x052.0.2\x010\x00\x010\x00HZ"


@SETTINGS
@given(requests(), st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=40)))
@example(_FOUND, {"METHOD": ""})
@example(_FOUND, {"Version": ""})
def test_request_mutation_round_trip(frame: bytes, mutation: dict[str, str]) -> None:
    codec = DubboCodec()
    md = codec.decode(bytearray(frame))
    assert isinstance(md, Metadata)
    if any(  # what no attachment can change: refused, never dropped (see _refuse_method)
        key.lower() == "method" or (not value and key.lower() in ("interface", "version"))
        for key, value in mutation.items()
    ):
        with pytest.raises(MutationError):
            codec.encode(md, mutation, request_id=7)
        return
    out = codec.decode(bytearray(join_encoded(codec.encode(md, mutation, request_id=7))))
    assert isinstance(out, Metadata)
    assert out.request_id == 7 and out.operation_name == md.operation_name
    data = out.frame
    assert struct.unpack(">i", data[12:16])[0] == len(data) - 16
    start = md.codec_state.attachments.start
    assert data[16:start] == md.frame[16:start], "arguments unchanged"
    folded = {key.lower(): value for key, value in mutation.items()}  # last spelling wins
    for key, value in folded.items():
        if key not in ("interface", "method", "version"):
            assert out.attributes[key] == value


@SETTINGS
@given(responses(), st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=40)))
def test_response_mutation_round_trip(frame: bytes, mutation: dict[str, str]) -> None:
    codec = DubboCodec()
    md = codec.decode(bytearray(frame))
    assert isinstance(md, Metadata)
    if md.values.get("status") != 20 and mutation:
        with pytest.raises(MutationError):
            codec.encode(md, mutation)
        return
    out = codec.decode(bytearray(join_encoded(codec.encode(md, mutation))))
    assert isinstance(out, Metadata)
    assert out.message_type is md.message_type and out.response_status is md.response_status
    if mutation:
        for key, value in {key.lower(): value for key, value in mutation.items()}.items():
            assert out.attributes[key] == value
    else:
        assert out.frame == md.frame
