"""The struct skippers against Apache Thrift's own ``TProtocol.skip``.

Hypothesis draws arbitrary nested Thrift values (every wire type, lists, sets and maps of
anything, structs in collections, long-form compact field ids, strings past 127 bytes,
multi-byte varints), Apache's pure-Python binary and compact protocols write them, and our
skipper must end exactly where Apache's ``skip`` ends, stop at the struct's end even when more
bytes follow, and report every truncated prefix as incomplete (never a wrong end or another
error).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from metaprotocol_thrift.resumable import ResumableSkip
from metaprotocol_thrift.skip import skip_binary_struct, skip_compact_struct
from metaprotocol_thrift.wire import Incomplete
from thrift.protocol.TBinaryProtocol import TBinaryProtocol
from thrift.protocol.TCompactProtocol import TCompactProtocol
from thrift.Thrift import TType
from thrift.transport.TTransport import TMemoryBuffer

from metaprotocol_sdk import FramingError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A drawn type is a tuple: (TType.X,) for scalars, (LIST|SET, element), (MAP, key, value),
# (STRUCT, [(field id, type), ...]).
SCALARS = [
    TType.BOOL,
    TType.BYTE,
    TType.I16,
    TType.I32,
    TType.I64,
    TType.DOUBLE,
    TType.STRING,
]
# Field ids: mostly ascending by small steps (compact's one-byte short form), sometimes
# anything (its long form: negative ids, jumps past 15, descending order).
field_ids = st.one_of(
    st.lists(st.integers(1, 15), max_size=6).map(
        lambda steps: [sum(steps[: i + 1]) for i in range(len(steps))]
    ),
    st.lists(st.integers(-40, 400), max_size=6, unique=True),
)


def fields_of(inner: st.SearchStrategy[tuple[Any, ...]]) -> st.SearchStrategy[tuple[Any, ...]]:
    return field_ids.flatmap(
        lambda ids: st.tuples(*(st.tuples(st.just(i), inner) for i in ids)).map(
            lambda fields: (TType.STRUCT, list(fields))
        )
    )


types: st.SearchStrategy[tuple[Any, ...]] = st.recursive(
    st.sampled_from(SCALARS).map(lambda t: (t,)),
    lambda inner: st.one_of(
        st.tuples(st.sampled_from([TType.LIST, TType.SET]), inner),
        st.tuples(st.just(TType.MAP), inner, inner),
        fields_of(inner),
    ),
    max_leaves=12,
)
S = (TType.STRING,)
LEAF = (TType.STRUCT, [(1, (TType.I16,)), (2, (TType.DOUBLE,)), (3, (TType.BOOL,)), (4, S)])
# Shapes every skipper fast path is written for, so each is drawn often, not by chance.
SHAPES = [
    LEAF,
    (TType.LIST, LEAF),
    (TType.MAP, (TType.I32,), LEAF),
    (TType.MAP, S, S),
    (TType.LIST, (TType.LIST, S)),
    (TType.SET, (TType.I64,)),
    (TType.LIST, (TType.I32,)),
    (TType.MAP, S, (TType.LIST, (TType.I32,))),
    (TType.LIST, (TType.MAP, S, (TType.I64,))),
    (TType.MAP, (TType.I64,), (TType.I16,)),
]


def values(ttype: tuple[Any, ...]) -> st.SearchStrategy[Any]:
    kind = ttype[0]
    if kind == TType.BOOL:
        return st.booleans()
    if kind == TType.BYTE:
        return st.integers(-128, 127)
    if kind == TType.I16:
        return st.integers(-(2**15), 2**15 - 1)
    if kind == TType.I32:
        return st.integers(-(2**31), 2**31 - 1)
    if kind == TType.I64:
        return st.integers(-(2**63), 2**63 - 1)
    if kind == TType.DOUBLE:
        return st.floats(allow_nan=False)
    if kind == TType.STRING:
        # UTF-8, since Apache's skip decodes strings; some past 127 bytes (2-byte varints).
        return st.one_of(st.text(max_size=8), st.text(min_size=130, max_size=300)).map(str.encode)
    if kind in (TType.LIST, TType.SET):
        return st.lists(values(ttype[1]), max_size=4)
    if kind == TType.MAP:
        return st.lists(st.tuples(values(ttype[1]), values(ttype[2])), max_size=4)
    return st.tuples(*(values(ftype) for _, ftype in ttype[1]))


def write(proto: Any, ttype: tuple[Any, ...], value: Any) -> None:
    kind = ttype[0]
    if kind == TType.BOOL:
        proto.writeBool(value)
    elif kind == TType.BYTE:
        proto.writeByte(value)
    elif kind == TType.I16:
        proto.writeI16(value)
    elif kind == TType.I32:
        proto.writeI32(value)
    elif kind == TType.I64:
        proto.writeI64(value)
    elif kind == TType.DOUBLE:
        proto.writeDouble(value)
    elif kind == TType.STRING:
        proto.writeBinary(value)
    elif kind in (TType.LIST, TType.SET):
        begin, end = (
            (proto.writeListBegin, proto.writeListEnd)
            if kind == TType.LIST
            else (proto.writeSetBegin, proto.writeSetEnd)
        )
        begin(ttype[1][0], len(value))
        for element in value:
            write(proto, ttype[1], element)
        end()
    elif kind == TType.MAP:
        proto.writeMapBegin(ttype[1][0], ttype[2][0], len(value))
        for key, item in value:
            write(proto, ttype[1], key)
            write(proto, ttype[2], item)
        proto.writeMapEnd()
    else:
        proto.writeStructBegin("S")
        for (field_id, ftype), item in zip(ttype[1], value, strict=True):
            proto.writeFieldBegin("f", ftype[0], field_id)
            write(proto, ftype, item)
            proto.writeFieldEnd()
        proto.writeFieldStop()
        proto.writeStructEnd()


@st.composite
def structs(draw: st.DrawFn) -> tuple[Any, ...]:
    ttype = draw(fields_of(st.one_of(types, st.sampled_from(SHAPES))))
    return ttype, draw(values(ttype))


PROTOCOLS = {
    "binary": (TBinaryProtocol, skip_binary_struct),
    "compact": (TCompactProtocol, skip_compact_struct),
}


def encoded(protocol: str, ttype: tuple[Any, ...], value: Any) -> bytes:
    buffer = TMemoryBuffer()
    write(PROTOCOLS[protocol][0](buffer), ttype, value)
    return buffer.getvalue()


def apache_skip_end(protocol: str, data: bytes) -> int:
    buffer = TMemoryBuffer(data)
    PROTOCOLS[protocol][0](buffer).skip(TType.STRUCT)
    return buffer._buffer.tell()  # Apache's memory buffer has no public offset


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@SETTINGS
@given(drawn=structs(), trailing=st.binary(max_size=4))
def test_skip_ends_where_apache_skip_ends(
    protocol: str, drawn: tuple[Any, ...], trailing: bytes
) -> None:
    data = encoded(protocol, *drawn)
    skip = PROTOCOLS[protocol][1]
    assert apache_skip_end(protocol, data) == len(data)
    buf = bytearray(data + trailing)
    assert skip(buf, 0, len(buf), 64) == len(data)
    # With three bytes in front, offsets are relative to the buffer, not the struct.
    shifted = bytearray(b"\xff\xff\xff" + data)
    assert skip(shifted, 3, len(shifted), 64) == len(shifted)


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@SETTINGS
@given(drawn=structs(), data=st.data())
def test_every_truncation_is_incomplete(
    protocol: str, drawn: tuple[Any, ...], data: st.DataObject
) -> None:
    whole = encoded(protocol, *drawn)
    skip = PROTOCOLS[protocol][1]
    cuts = (
        range(len(whole))
        if len(whole) <= 64
        else data.draw(st.lists(st.integers(0, len(whole) - 1), min_size=8, max_size=8))
    )
    for cut in cuts:
        prefix = bytearray(whole[:cut])
        with pytest.raises(Incomplete) as raised:
            skip(prefix, 0, cut, 64)
        assert cut < raised.value.needed <= len(whole)


MALFORMED = [
    ("binary", b"\x63\x00\x01", "unknown binary field type 99"),
    ("binary", b"\x0b\x00\x01\xff\xff\xff\xfe", "negative string length"),
    ("binary", b"\x0f\x00\x01\x08\xff\xff\xff\xff", "negative list size"),
    ("binary", b"\x0d\x00\x01\x0b\x0b\x80\x00\x00\x00", "negative map size"),
    ("binary", b"\x0f\x00\x01\x63\x00\x00\x00\x01", "unknown binary element type 99"),
    ("binary", b"\x0d\x00\x01\x63\x08\x00\x00\x00\x01", "unknown binary element type 99"),
    ("compact", b"\x10", "compact field of type 0"),
    ("compact", b"\x1e", "unknown compact type 14"),
    ("compact", b"\x19\x1e", "unknown compact element type 14"),
    ("compact", b"\x1b\x01\x8e", "unknown compact element type 14"),
    ("compact", b"\x15" + b"\x80" * 11, "varint longer than 10 bytes"),
    ("compact", b"\x18\xff\xff\xff\xff\xff\x01", "size varint longer than 5 bytes"),
]


@pytest.mark.parametrize(("protocol", "data", "message"), MALFORMED)
def test_malformed_structs_are_framing_errors(protocol: str, data: bytes, message: str) -> None:
    buf = bytearray(data + b"\x00" * 16)
    with pytest.raises(FramingError, match=message):
        PROTOCOLS[protocol][1](buf, 0, len(buf), 64)


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@pytest.mark.parametrize("container", ["struct", "list", "map"])
def nested(protocol: str, container: str, levels: int) -> bytearray:
    """A struct holding ``levels`` containers of one kind nested in each other."""
    inner: tuple[Any, ...] = (TType.I32,)
    value: Any = 1
    for _ in range(levels):
        if container == "struct":
            inner, value = (TType.STRUCT, [(1, inner)]), (value,)
        elif container == "list":
            inner, value = (TType.LIST, inner), [value]
        else:
            inner, value = (TType.MAP, (TType.I32,), inner), [(0, value)]
    return bytearray(encoded(protocol, (TType.STRUCT, [(1, inner)]), (value,)))


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@pytest.mark.parametrize("container", ["struct", "list", "map"])
def test_nesting_past_max_depth_is_refused(protocol: str, container: str) -> None:
    data = nested(protocol, container, 10)
    skip = PROTOCOLS[protocol][1]
    assert skip(data, 0, len(data), 64) == len(data)
    with pytest.raises(FramingError, match="nested deeper than max_depth"):
        skip(data, 0, len(data), 5)


# -- the resumable walk (unframed messages arriving in pieces) -------------------------------


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@SETTINGS
@given(drawn=structs(), data=st.data())
def test_resumable_walk_ends_where_apache_skip_ends(
    protocol: str, drawn: tuple[Any, ...], data: st.DataObject
) -> None:
    """Fed in pieces cut anywhere, the resumable walk needs more until the struct is complete
    (asking for no more than its end) and then ends exactly where Apache's skip does."""
    whole = encoded(protocol, *drawn)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(whole) - 1), max_size=8)))
    walk = ResumableSkip(b"", protocol, 0, 64)
    for cut in cuts:
        done, needed = walk.feed(whole[:cut])
        assert not done and cut < needed <= len(whole)
    assert walk.feed(whole + b"\x00\x01") == (True, apache_skip_end(protocol, whole))


@pytest.mark.parametrize(
    ("protocol", "data"),
    [(protocol, data) for protocol, data, _ in MALFORMED],
)
def test_resumable_walk_refuses_malformed_structs(protocol: str, data: bytes) -> None:
    with pytest.raises(FramingError):
        ResumableSkip(b"", protocol, 0, 64).feed(data + b"\x00" * 16)


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@pytest.mark.parametrize("container", ["struct", "list", "map"])
def test_resumable_walk_refuses_nesting_past_max_depth(protocol: str, container: str) -> None:
    data = nested(protocol, container, 10)
    assert ResumableSkip(b"", protocol, 0, 64).feed(data) == (True, len(data))
    with pytest.raises(FramingError, match="nested deeper than max_depth"):
        ResumableSkip(b"", protocol, 0, 5).feed(data)


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@pytest.mark.parametrize("container", ["struct", "list", "map"])
def test_resumable_walk_and_skip_agree_on_depth(protocol: str, container: str) -> None:
    """Whole (skip) and in pieces (the walk), a message is accepted or refused alike at every
    nesting and max_depth: their depth accounting is the same."""
    skip = PROTOCOLS[protocol][1]
    for levels in range(1, 10):
        data = bytes(nested(protocol, container, levels))
        for depth in range(1, 14):
            try:
                whole: int | str = skip(bytearray(data), 0, len(data), depth)
            except FramingError:
                whole = "refused"
            try:
                walked: int | str = ResumableSkip(b"", protocol, 0, depth).feed(data)[1]
            except FramingError:
                walked = "refused"
            assert whole == walked, (levels, depth)


def test_resumable_walk_reads_long_field_ids_as_skip_does() -> None:
    """Fuzz find: a compact long-form field id written in 4 varint bytes was accepted whole
    and refused in pieces ("varint longer than 3 bytes")."""
    data = b"\x05" + b"\x82\x80\x80\x00" + b"\x01" + b"\x00"  # i32 field, long-form id
    assert skip_compact_struct(bytearray(data), 0, len(data), 64) == len(data)
    walk = ResumableSkip(b"", "compact", 0, 64)
    for cut in range(len(data)):
        assert walk.feed(data[:cut])[0] is False
    assert walk.feed(data) == (True, len(data))
