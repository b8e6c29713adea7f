"""Property-based tests (hypothesis): messages written by thriftpy2 in every variant decode the
same at every split point; arbitrary and corrupted bytes give NeedData or a CodecError only;
encode round trips keep the body bytes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metaprotocol_sdk import CodecError, Metadata, NeedData, join_encoded

sys.path.insert(0, str(Path(__file__).parent))
import thrift_frames as tf
from metaprotocol_thrift import ThriftCodec
from thrift_peers import calc_tp

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VARIANTS = [(t, p) for t in tf.TRANSPORTS for p in tf.PROTOCOLS]

i32 = st.integers(-(2**31), 2**31 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
text = st.text(max_size=12)
leaves = st.builds(
    calc_tp.Leaf,
    small=st.none() | st.integers(-(2**15), 2**15 - 1),
    ratio=st.none() | st.floats(allow_nan=False),
    flag=st.none() | st.booleans(),
    blob=st.none() | st.binary(max_size=8),
)
items = st.builds(
    calc_tp.Item,
    id=st.none() | i64,
    name=st.none() | text,
    values=st.none() | st.lists(i32, max_size=5),
    tags=st.none() | st.dictionaries(text, text, max_size=3),
    marks=st.none() | st.sets(i64, max_size=3),
    leaves=st.none() | st.lists(leaves, max_size=3),
    by_id=st.none() | st.dictionaries(i32, leaves, max_size=2),
    grid=st.none() | st.lists(st.lists(text, max_size=3), max_size=3),
    tiny=st.none() | st.integers(-128, 127),
)
names = st.from_regex(r"([a-z]{1,6}:)?[a-zA-Z_][a-zA-Z0-9_]{0,12}", fullmatch=True)
headers = st.dictionaries(
    st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True).map(str.encode),
    st.text(max_size=10).map(str.encode),
    max_size=3,
)


@st.composite
def frames(draw: Any, variant: tuple[str, str] | None = None) -> tuple[str, str, bytes]:
    transport, protocol = variant or draw(st.sampled_from(VARIANTS))
    args = calc_tp.Calculator.roundtrip_args(item=draw(items))
    name = draw(names)
    mtype = draw(st.sampled_from([1, 2, 3, 4]))
    seqid = draw(st.integers(0, 2**31 - 1))  # thriftpy2's compact writer loops on negatives
    payload = tf.message(protocol, name, mtype, seqid, args)
    return transport, protocol, tf.frame(transport, protocol, payload, draw(headers), seqid)


def decode_all(codec: ThriftCodec, chunks: list[bytes]) -> list[Metadata]:
    buffer = bytearray()
    out: list[Metadata] = []
    for chunk in chunks:
        buffer += chunk
        while True:
            result = codec.decode(buffer)
            if isinstance(result, NeedData):
                break
            out.append(result)
    assert not buffer
    return out


@SETTINGS
@given(st.data())
def test_every_split_decodes_the_same(data: st.DataObject) -> None:
    transport, protocol, first = data.draw(frames())
    _, _, second = data.draw(frames((transport, protocol)))
    stream = first + second
    options = tf.options_for(transport, protocol)
    whole = decode_all(ThriftCodec(**options), [stream])
    assert [m.frame for m in whole] == [first, second]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    pieces = decode_all(ThriftCodec(**options), chunks)
    assert [m.to_dict() for m in pieces] == [m.to_dict() for m in whole]
    bytewise = decode_all(ThriftCodec(**options), [bytes([b]) for b in stream])
    assert [m.to_dict() for m in bytewise] == [m.to_dict() for m in whole]


CONFIGS = [
    {},
    {"strict": False},
    {"transport": "unframed", "protocol": "binary", "strict": False},
    {"transport": "unframed", "protocol": "compact"},
    {"transport": "framed", "protocol": "compact"},
    {"transport": "header"},
    {"max_frame_size": 64, "max_depth": 3},
]


def only_need_data_or_codec_errors(data: bytes, options: dict[str, Any]) -> None:
    codec = ThriftCodec(**options)
    buffer = bytearray(data)
    for _ in range(len(data) + 1):
        before = len(buffer)
        try:
            result = codec.decode(buffer)
        except CodecError:
            assert len(buffer) == before  # an error consumes nothing
            return
        if isinstance(result, NeedData):
            assert len(buffer) == before
            return
        assert before - len(buffer) == result.size


@SETTINGS
@given(st.binary(max_size=300), st.sampled_from(CONFIGS))
def test_garbage_gives_need_data_or_codec_error(data: bytes, options: dict[str, Any]) -> None:
    only_need_data_or_codec_errors(data, options)


@SETTINGS
@given(st.data(), st.sampled_from(CONFIGS))
def test_corrupted_messages_give_need_data_or_codec_error(
    data: st.DataObject, options: dict[str, Any]
) -> None:
    _, _, frame = data.draw(frames())
    corrupted = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 4))):
        corrupted[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    only_need_data_or_codec_errors(bytes(corrupted), options)


@SETTINGS
@given(st.data(), st.integers(-(2**31), 2**32 - 1))
def test_request_id_and_mutation_round_trip(data: st.DataObject, new_id: int) -> None:
    transport, protocol, frame = data.draw(frames())
    options = tf.options_for(transport, protocol)
    codec = ThriftCodec(**options)
    message = codec.decode(bytearray(frame))
    assert isinstance(message, Metadata)
    mutation = data.draw(st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), text))
    if transport != "header":
        mutation = {}
    out = join_encoded(codec.encode(message, mutation, request_id=new_id))
    again = ThriftCodec(**options).decode(bytearray(out))
    assert isinstance(again, Metadata)
    assert again.request_id == (new_id - 2**32 if new_id >= 2**31 else new_id)
    assert bytes(again.body) == bytes(message.body)
    assert again.operation_name == message.operation_name
    assert again.message_type == message.message_type
    expected = message.attributes.to_dict()
    for key, value in mutation.items():
        expected = {k: v for k, v in expected.items() if k.lower() != key.lower()}
        expected[key] = value
    assert {k.lower(): v for k, v in again.attributes.to_dict().items()} == {
        k.lower(): v for k, v in {**expected, **_protocol_attrs(message)}.items()
    }


def _protocol_attrs(message: Metadata) -> dict[str, str]:
    # method/service come from the message name and win over a same-named header.
    return {k: message.attributes[k] for k in ("method", "service") if k in message.attributes}
