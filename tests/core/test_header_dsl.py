"""The header DSL: construct declarations compiled to struct, with honest truncation."""

from __future__ import annotations

import struct

import construct as cs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaprotocol_sdk import FramingError, compile_header

DUBBO_LIKE = cs.Struct(
    "magic" / cs.Const(b"\xda\xbb"),
    "flag" / cs.Int8ub,
    "status" / cs.Int8ub,
    "request_id" / cs.Int64ub,
    "body_length" / cs.Int32ub,
)
SAMPLE = b"\xda\xbb\xc2\x14" + (77).to_bytes(8, "big") + (300).to_bytes(4, "big")


def test_fixed_layout_compiles_to_one_struct() -> None:
    layout = compile_header(DUBBO_LIKE)
    assert layout.compiled and layout.size == 16
    assert layout.struct is not None and layout.struct.format == ">2sBBQL"
    fields = layout.parse(SAMPLE)
    assert (fields.flag, fields.status, fields.request_id, fields.body_length) == (
        0xC2,
        0x14,
        77,
        300,
    )
    assert layout.unpack(SAMPLE) == struct.unpack(">2sBBQL", SAMPLE)


def test_parse_at_an_offset_and_from_memoryview() -> None:
    layout = compile_header(DUBBO_LIKE)
    data = memoryview(b"junk" + SAMPLE)
    assert layout.parse(data, 4).request_id == 77
    assert layout.parse(data, 5) is None


@pytest.mark.parametrize("cut", range(16))
def test_truncated_input_is_need_more_data_never_a_short_value(cut: int) -> None:
    layout = compile_header(DUBBO_LIKE)
    assert layout.parse(SAMPLE[:cut]) is None
    assert layout.unpack(SAMPLE[:cut]) is None


def test_compiled_construct_has_the_short_value_bug_we_avoid() -> None:
    # construct's own compiled parser returns a short value on truncated input; ours does not.
    compiled = cs.Struct("tag" / cs.Bytes(4)).compile()
    assert compiled.parse(b"ab").tag == b"ab"
    assert compile_header(cs.Struct("tag" / cs.Bytes(4))).parse(b"ab") is None


def test_constant_mismatch_names_field_and_offset() -> None:
    layout = compile_header(cs.Struct("version" / cs.Int8ub, "magic" / cs.Const(b"KV")))
    with pytest.raises(FramingError) as info:
        layout.parse(b"\x01XX")
    assert info.value.offset == 1 and "'magic'" in str(info.value)
    integer_const = compile_header(cs.Struct("magic" / cs.Const(0xDABB, cs.Int16ub)))
    with pytest.raises(FramingError, match="expected 55995, got 1"):
        integer_const.parse(b"\x00\x01")


def test_struct_inexpressible_fixed_fields_are_converted_by_construct() -> None:
    layout = compile_header(
        cs.Struct(
            "flags" / cs.BitStruct("req" / cs.Flag, "twoway" / cs.Flag, "ser" / cs.BitsInteger(6)),
            "length" / cs.Int16ul,
            cs.Padding(2),
            "ok" / cs.Flag,
        )
    )
    assert layout.compiled and layout.size == 6
    fields = layout.parse(b"\xc2\x05\x00\x00\x00\x01")
    assert fields.flags.req and fields.flags.twoway and fields.flags.ser == 2
    assert fields.length == 5 and fields.ok is True
    assert layout.parse(b"\xc2\x05\x00") is None
    built = layout.build(flags={"req": True, "twoway": True, "ser": 2}, length=5, ok=True)
    assert built == b"\xc2\x05\x00\x00\x01"[:4] + b"\x00\x01"


def test_variable_layouts_fall_back_to_construct_with_honest_truncation() -> None:
    layout = compile_header(cs.Struct("n" / cs.Int8ub, "name" / cs.PascalString(cs.Int8ub, "utf8")))
    assert not layout.compiled and layout.size is None
    assert layout.parse(b"\x01\x03ab") is None
    assert layout.parse(b"\x01\x03abc") == (1, "abc")


def test_build_fills_constants_and_rejects_unknown_or_missing_fields() -> None:
    layout = compile_header(DUBBO_LIKE)
    assert layout.build(flag=0xC2, status=0x14, request_id=77, body_length=300) == SAMPLE
    with pytest.raises(TypeError, match="missing"):
        layout.build(flag=1)
    with pytest.raises(TypeError, match="unknown header fields: bogus"):
        layout.build(flag=0xC2, status=0x14, request_id=77, body_length=300, bogus=1)


def test_mixed_byte_orders_fall_back() -> None:
    layout = compile_header(cs.Struct("a" / cs.Int16ub, "b" / cs.Int16ul))
    assert not layout.compiled
    assert layout.parse(b"\x00\x01\x01\x00") == (1, 1)


def test_compile_header_requires_a_struct() -> None:
    with pytest.raises(TypeError):
        compile_header(cs.Int8ub)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(0, 255), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.binary())
def test_build_parse_round_trip(flag: int, rid: int, length: int, tail: bytes) -> None:
    layout = compile_header(DUBBO_LIKE)
    data = layout.build(flag=flag, status=0, request_id=rid, body_length=length) + tail
    fields = layout.parse(data)
    assert (fields.flag, fields.request_id, fields.body_length) == (flag, rid, length)
