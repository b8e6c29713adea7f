"""Every Hessian 2.0 wire form, byte for byte, in both directions, and the decoder's API."""

from __future__ import annotations

import encodings
import math
import struct
import sys
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from metaprotocol_dubbo.hessian2 import (
    Decoder,
    Encoder,
    HessianError,
    JavaDouble,
    JavaFloat,
    JavaInt,
    JavaLong,
    JavaObject,
    TypedList,
    TypedMap,
    dumps,
    loads,
)

from metaprotocol_sdk.errors import CodecError, FramingError

H = bytes.fromhex

# pytest's importlib mode can register this repository's codecs/ folder as the module
# "codecs", which breaks encodings loaded later (unicode_escape for test ids); put the
# standard library module back (see interop/peers.py).
sys.modules["codecs"] = encodings.codecs


def rt(value: Any, wire: str) -> None:
    """``value`` encodes to exactly ``wire``, which decodes (and skips) back."""
    assert dumps(value).hex() == wire
    back = loads(H(wire))
    assert back == value
    d = Decoder(H(wire))
    d.skip()
    assert d.at_end


# -- scalars --------------------------------------------------------------------------------


def test_null_and_booleans() -> None:
    rt(None, "4e")
    rt(True, "54")
    rt(False, "46")


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0, "90"),
        (-16, "80"),
        (47, "bf"),
        (48, "c830"),
        (-17, "c7ef"),
        (-2048, "c000"),
        (2047, "cfff"),
        (2048, "d40800"),
        (-262144, "d00000"),
        (262143, "d7ffff"),
        (262144, "4900040000"),
        (2**31 - 1, "497fffffff"),
        (-(2**31), "4980000000"),
    ],
)
def test_int_forms(value: int, wire: str) -> None:
    rt(value, wire)
    rt(JavaInt(value), wire)


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0, "e0"),
        (-8, "d8"),
        (15, "ef"),
        (16, "f810"),
        (-2048, "f000"),
        (2047, "ffff"),
        (2048, "3c0800"),
        (-262144, "380000"),
        (262143, "3fffff"),
        (262144, "5900040000"),
        (2**31 - 1, "597fffffff"),
        (-(2**31), "5980000000"),
        (2**31, "4c0000000080000000"),
        (2**63 - 1, "4c7fffffffffffffff"),
        (-(2**63), "4c8000000000000000"),
    ],
)
def test_long_forms(value: int, wire: str) -> None:
    rt(JavaLong(value), wire)
    assert type(Decoder(H(wire), java_longs=True).read()) is JavaLong
    assert type(loads(H(wire), java_longs=True)) is JavaLong


def test_plain_int_beyond_32_bits_is_a_long() -> None:
    assert dumps(2**31) == H("4c0000000080000000")
    assert dumps(-(2**31) - 1) == H("4cffffffff7fffffff")
    with pytest.raises(HessianError, match="does not fit a Java long"):
        dumps(2**63)


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0.0, "5b"),
        (1.0, "5c"),
        (-1.0, "5dff"),
        (127.0, "5d7f"),
        (-128.0, "5d80"),
        (128.0, "5e0080"),
        (-32768.0, "5e8000"),
        (32767.0, "5e7fff"),
        (32768.0, "5f01f40000"),  # 0x5f: int32 count of thousandths, as Java writes it
        (1.5, "5f000005dc"),
        (0.1, "5f00000064"),
        (-0.001, "5fffffffff"),
        (2147483.647, "5f7fffffff"),
        (2147483.648, "444140624dd2f1a9fc"),
        (3.14159, "44400921f9f01b866e"),
        (1e7, "44416312d000000000"),
        (math.inf, "447ff0000000000000"),
        (-0.0, "448000000000000000"),  # Java writes 0x5b and loses the sign; we keep it
    ],
)
def test_double_forms(value: float, wire: str) -> None:
    rt(value, wire)
    rt(JavaDouble(value), wire)
    back = loads(H(wire))
    assert math.copysign(1, back) == math.copysign(1, value)


def test_double_nan() -> None:
    assert dumps(math.nan) == H("447ff8000000000000")
    assert math.isnan(loads(dumps(math.nan)))


def test_0x5f_is_thousandths_computed_like_java() -> None:
    # Java: 0.001 * mills, which for 12345 is not the same double as 12.345
    assert loads(H("5f") + struct.pack(">i", 12345)) == 0.001 * 12345


def test_java_float_is_rounded_to_32_bits_and_written_as_double() -> None:
    f = JavaFloat(1.1)
    assert float(f) == struct.unpack(">f", struct.pack(">f", 1.1))[0]
    assert dumps(f) == H("443ff19999a0000000")
    assert JavaFloat(1e39) == math.inf


def test_java_int_and_long_ranges_are_checked() -> None:
    with pytest.raises(OverflowError):
        JavaInt(2**31)
    with pytest.raises(OverflowError):
        JavaLong(2**63)
    with pytest.raises(HessianError):
        Encoder().write_int(2**31)


# -- strings --------------------------------------------------------------------------------


def test_string_compact_forms() -> None:
    rt("", "00")
    rt("a", "0161")
    rt("b" * 31, "1f" + "62" * 31)
    rt("c" * 32, "3020" + "63" * 32)
    rt("d" * 1023, "33ff" + "64" * 1023)
    rt("e" * 1024, "530400" + "65" * 1024)


def test_string_lengths_count_utf16_units_and_split_non_bmp_like_java() -> None:
    # U+1F600 is two UTF-16 units, each written as its own 3-byte sequence
    rt("a\U0001f600b", "0461eda0bdedb88062")
    rt("é中", "02c3a9e4b8ad")
    rt("\x00", "0100")


def test_lone_surrogates_survive() -> None:
    rt("x\ud800y", "0378eda08079")
    rt("\udc00", "01edb080")


def test_four_byte_utf8_is_refused_as_java_does() -> None:
    with pytest.raises(HessianError, match="bad UTF-8") as info:
        loads(H("01f09f9880"))
    assert info.value.offset == 1


def test_long_strings_are_chunked_at_0x8000_units() -> None:
    s = "f" * 0x8000
    assert dumps(s) == H("538000") + s.encode()
    s = "g" * 0x8001
    assert dumps(s) == H("528000") + b"g" * 0x8000 + H("0167")
    assert loads(dumps(s)) == s
    s = "h" * 100000
    data = dumps(s)
    assert data[:3] == H("528000") and loads(data) == s


def test_a_chunk_never_ends_on_a_high_surrogate() -> None:
    s = "a" * 0x7FFF + "\U0001f600" + "tail"
    data = dumps(s)
    assert data[:3] == H("527fff")
    assert loads(data) == s


def test_chunked_non_ascii_and_pairs_split_across_chunks_are_joined() -> None:
    # another writer may split a pair across chunks: still one character
    data = H("5200 01 eda0bd".replace(" ", "")) + H("01edb880")
    assert loads(data) == "\U0001f600"
    s = "中" * 40000
    assert loads(dumps(s)) == s


def test_chunk_forms_accepted_after_R() -> None:
    # R chunk followed by a 0x30-form final chunk and by an S final chunk
    assert loads(H("5200026162") + H("300163")) == "abc"
    assert loads(H("5200026162") + H("53000163")) == "abc"


# -- binary ---------------------------------------------------------------------------------


def test_binary_forms() -> None:
    rt(b"", "20")
    rt(b"\x01" * 15, "2f" + "01" * 15)
    rt(b"\x02" * 16, "3410" + "02" * 16)
    rt(b"\x03" * 1023, "37ff" + "03" * 1023)
    rt(b"\x04" * 1024, "420400" + "04" * 1024)
    assert dumps(bytearray(b"ab")) == dumps(memoryview(b"ab")) == H("226162")


def test_binary_is_chunked_at_0x8000() -> None:
    data = bytes(range(256)) * 300
    enc = dumps(data)
    assert enc[:3] == H("418000")
    assert loads(enc) == data
    assert dumps(b"x" * 0x8000)[:3] == H("428000")


def test_chunked_binary_with_compact_final_chunk() -> None:
    assert loads(H("4100026162") + H("2163")) == b"abc"
    assert loads(H("4100026162") + H("340163")) == b"abc"


# -- dates ----------------------------------------------------------------------------------


def test_dates() -> None:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    rt(epoch, "4b00000000")  # whole minutes: 0x4b int32 minutes
    rt(epoch + timedelta(minutes=26666667), "4b0196e6ab")
    rt(epoch + timedelta(milliseconds=1600000000123), "4a00000174876e807b")
    rt(epoch - timedelta(milliseconds=1), "4affffffffffffffff")


def test_naive_and_other_zone_datetimes() -> None:
    naive = datetime(2021, 5, 6, 7, 8, 9, 123456)
    back = loads(dumps(naive))
    assert back == naive.replace(tzinfo=UTC, microsecond=123000)
    tz = timezone(timedelta(hours=2))
    assert loads(dumps(datetime(2021, 1, 1, 2, tzinfo=tz))) == datetime(2021, 1, 1, tzinfo=UTC)


# -- lists ----------------------------------------------------------------------------------


def test_untyped_lists() -> None:
    rt([], "78")
    rt([1, 2], "7a9192")
    rt(list(range(7)), "7f90919293949596")
    rt(list(range(8)), "58989091929394959697")  # fixed untyped 'X' with int length
    assert dumps((1, 2)) == H("7a9192")


def test_compact_fixed_lists_have_no_terminator() -> None:
    d = Decoder(H("7a91927890"))
    assert d.read() == [1, 2]
    assert d.read() == []
    assert d.read() == 0
    assert d.at_end


def test_typed_lists() -> None:
    rt(TypedList("[int", [1, 2, 3]), "73045b696e74919293")
    rt(TypedList("[int", range(8)), "56045b696e749890919293949596 97".replace(" ", ""))
    rt(TypedList("[int", [1], variable=True), "55045b696e74915a")
    # an untyped list in the variable form ('W') reads back as a plain list
    assert dumps(TypedList(None, [1], variable=True)) == H("57915a")
    assert loads(H("57915a")) == [1]
    # the second use of a type name is a type reference (an int)
    rt([TypedList("[int", [1]), TypedList("[int", [2])], "7a71045b696e749171909 2".replace(" ", ""))


def test_typed_list_variable_flag_is_read() -> None:
    lst = loads(H("55045b696e74915a"))
    assert isinstance(lst, TypedList) and lst.variable and lst.type == "[int"
    assert not loads(H("71045b696e7491")).variable
    assert loads(H("57915a")) == [1] and type(loads(H("57915a"))) is list


def test_typed_containers_compare_by_type() -> None:
    assert TypedList("[int", [1]) != [1]
    assert TypedList("[int", [1]) != TypedList("[long", [1])
    assert TypedList("[int", [1]) == TypedList("[int", [1], variable=True)
    assert TypedMap("x", {1: 2}) != {1: 2}
    assert JavaObject("A", {"f": 1}) != JavaObject("B", {"f": 1})
    assert JavaObject("A", {"f": 1}) != {"f": 1}
    assert JavaObject("A", f=1) == JavaObject("A", {"f": 1})
    assert repr(TypedList("[int", [1])) == "TypedList('[int', [1])"


# -- maps -----------------------------------------------------------------------------------


def test_maps() -> None:
    rt({}, "485a")
    rt({1: "one", 2: "two"}, "4891036f6e65920374776f5a")
    rt(
        TypedMap("java.util.TreeMap", {"a": 1}),
        "4d116a6176612e7574696c2e547265654d6170016191 5a".replace(" ", ""),
    )
    assert dumps(TypedMap(None, {"a": 1})) == H("480161915a")
    assert type(loads(H("480161915a"))) is dict


def test_typed_map_type_reference_shared_with_lists() -> None:
    # type names form one table for lists and maps
    wire = "7a71045b696e74914d90914e5a"
    got = loads(H(wire))
    assert got == [TypedList("[int", [1]), TypedMap("[int", {1: None})]
    assert dumps(got).hex() == wire


# -- objects and references ----------------------------------------------------------------


def test_object_definition_then_compact_instances() -> None:
    a = JavaObject("com.x.P", {"name": "a", "age": 1})
    b = JavaObject("com.x.P", {"name": "b", "age": 2})
    wire = "7a4307636f6d2e782e5092046e616d650361676560016191600162 92".replace(" ", "")
    rt([a, b], wire)


def test_class_index_above_15_uses_O() -> None:
    objs = [JavaObject(f"K{i}", {"v": i}) for i in range(17)]
    data = dumps(objs)
    assert data.endswith(H("4f a0 a0".replace(" ", "")))  # 'O' class 16, value 16
    assert loads(data) == objs


def test_same_type_with_other_fields_gets_its_own_definition() -> None:
    objs = [JavaObject("A", {"x": 1}), JavaObject("A", {"y": 2}), JavaObject("A", {"x": 3})]
    data = dumps(objs)
    assert data.count(b"C") == 2
    assert loads(data) == objs


def test_references_number_containers_from_zero() -> None:
    shared = [1]
    value = [shared, {"k": shared}, shared]
    data = dumps(value)
    assert data == H("7b 7991 48016b 5191 5a 5191".replace(" ", ""))
    back = loads(data)
    assert back[0] is back[1]["k"] is back[2]


def test_cycles_round_trip() -> None:
    obj = JavaObject("Node", {"next": None, "v": 1})
    obj["next"] = obj
    back = loads(dumps(obj))
    assert back["next"] is back
    lst: list[Any] = []
    lst.append(lst)
    back = loads(dumps(lst))
    assert back[0] is back


def test_no_reference_for_equal_but_distinct_containers() -> None:
    assert dumps([[1], [1]]) == H("7a79917991")


# -- streams of several values ---------------------------------------------------------------


def test_stream_shares_class_definitions_and_references() -> None:
    a = JavaObject("P", {"n": 1})
    e = Encoder()
    e.write("2.0.2")
    e.write(a)
    e.write(JavaObject("P", {"n": 2}))
    e.write(a)
    data = e.getvalue()
    assert data == H("05322e302e32 43 0150 91 016e 60 91 60 92 51 90".replace(" ", ""))
    d = Decoder(data)
    assert d.read_string() == "2.0.2"
    x, y, z = d.read(), d.read(), d.read()
    assert x is z and y == JavaObject("P", {"n": 2}) and d.at_end
    assert d.class_defs == [("P", ("n",))]
    assert d.ref_count == 2


def test_skipping_keeps_definitions_and_reference_numbers() -> None:
    a = JavaObject("P", {"n": [1, 2]})
    e = Encoder()
    for v in ("s", a, {"k": a["n"]}, a):
        e.write(v)
    d = Decoder(e.getvalue())
    d.skip()
    d.skip()  # defines class P, takes refs 0 (object) and 1 (its list)
    m = d.read()  # the map refers to the skipped list: decoded on demand
    assert m == {"k": [1, 2]}
    last = d.read()  # a reference to the skipped object
    assert last == a
    assert d.at_end


def test_skip_then_read_new_instance_of_skipped_class() -> None:
    e = Encoder()
    e.write(JavaObject("P", {"n": 1}))
    e.write(JavaObject("P", {"n": 2}))
    d = Decoder(e.getvalue())
    d.skip()
    assert d.read() == JavaObject("P", {"n": 2})


def test_encoder_following_a_decoder_continues_the_stream() -> None:
    e = Encoder()
    e.write(JavaObject("P", {"n": 1}))
    e.write(TypedList("[int", [1]))
    head = e.getvalue()
    d = Decoder(head)
    d.skip()
    d.skip()
    tail_enc = Encoder.following(d)
    tail_enc.write([JavaObject("P", {"n": 2}), TypedList("[int", [2])])
    tail = tail_enc.getvalue()
    assert b"C" not in tail and b"[int" not in tail  # definition and type name reused
    d2 = Decoder(head + tail)
    d2.skip()
    d2.skip()
    assert d2.read() == [JavaObject("P", {"n": 2}), TypedList("[int", [2])]


def test_reset_references() -> None:
    x = [1]
    e = Encoder()
    e.write(x)
    e.reset_references()
    e.write(x)
    assert e.getvalue() == H("79917991")


# -- decoder API ----------------------------------------------------------------------------


def test_offset_is_readable_and_writable() -> None:
    data = dumps("ab") + dumps(5)
    d = Decoder(data)
    assert d.offset == 0
    d.read()
    assert d.offset == 3
    d.offset = 0
    assert d.read_string() == "ab"
    with pytest.raises(ValueError):
        d.offset = 99


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_buffers_and_start_offset(kind: type) -> None:
    raw = b"\xff\xff" + dumps(["x", 5])
    d = Decoder(kind(raw), 2)
    assert d.offset == 2
    assert d.read() == ["x", 5]
    assert d.offset == len(raw) and d.at_end


def test_error_offsets_are_in_the_callers_buffer() -> None:
    raw = b"\xff\xff\x90\x40"
    for buf in (raw, bytearray(raw), memoryview(raw)):
        d = Decoder(buf, 2)
        d.read()
        with pytest.raises(HessianError) as info:
            d.read()
        assert info.value.offset == 3


def test_read_string_fast_path_and_null() -> None:
    d = Decoder(dumps("abc") + dumps(None) + dumps("é" * 40) + dumps("x" * 70000) + dumps(1))
    assert d.read_string() == "abc"
    assert d.read_string() is None
    assert d.read_string() == "é" * 40
    assert d.read_string() == "x" * 70000
    with pytest.raises(HessianError, match="expected a string") as info:
        d.read_string()
    assert info.value.offset == d.offset


def test_read_int() -> None:
    d = Decoder(dumps(5) + dumps(JavaLong(2**40)) + dumps("x"))
    assert d.read_int() == 5
    assert d.read_int() == 2**40
    with pytest.raises(HessianError, match="expected an int"):
        d.read_int()


def test_hessian_error_is_a_framing_error() -> None:
    with pytest.raises(FramingError) as info:
        loads(b"\x40")
    assert isinstance(info.value, CodecError)
    assert info.value.reason == "unknown tag 0x40" and info.value.offset == 0


def test_loads_refuses_trailing_bytes() -> None:
    with pytest.raises(HessianError, match="trailing"):
        loads(b"\x90\x90")


# -- encoder type mapping -------------------------------------------------------------------


def test_subclasses_use_their_base_mapping() -> None:
    import enum
    from collections import OrderedDict

    class Color(enum.IntEnum):
        RED = 3

    class Name(str):
        pass

    assert dumps(Color.RED) == dumps(3)
    assert dumps(Name("ab")) == dumps("ab")
    assert dumps(OrderedDict(a=1)) == dumps({"a": 1})


def test_unsupported_values_are_refused() -> None:
    for bad in ({1, 2}, object(), 1j):
        with pytest.raises(HessianError, match="cannot write"):
            dumps(bad)
    with pytest.raises(HessianError, match="type name"):
        dumps(TypedList("", [1]))
    with pytest.raises(HessianError, match="class name"):
        dumps(JavaObject("", {"a": 1}))
    # Ill-typed: the compiled encoder refuses these where it reads the value (TypeError).
    ill_typed: list[tuple[Any, str]] = [
        (TypedMap(5, {1: 2}), "type name"),  # type: ignore[arg-type]
        (JavaObject(None, {"a": 1}), "class name"),  # type: ignore[arg-type]
        (JavaObject("A", {1: 1}), "field name"),  # type: ignore[arg-type]
    ]
    for value, what in ill_typed:
        with pytest.raises((HessianError, TypeError), match=f"{what}|object expected"):
            dumps(value)


def test_deep_values_fail_cleanly_when_encoding() -> None:
    v: list[Any] = []
    for _ in range(5000):
        v = [v]
    with pytest.raises(HessianError, match="nested too deeply"):
        dumps(v)


def test_definition_caches_keep_same_named_classes_apart() -> None:
    # one class name, different field lists, in separate streams and in one stream
    long_name = "com.example.service.dto." + "X" * 40
    for name in ("A", long_name):
        one = JavaObject(name, {"x": 1})
        two = JavaObject(name, {"y": "2", "z": None})
        assert loads(dumps(one)) == one
        assert loads(dumps(two)) == two
        assert loads(dumps([one, two, one])) == [one, two, one]
        assert loads(dumps(one)) == one


def test_string_cache_does_not_leak_between_encodings() -> None:
    assert dumps(["ab", "ab"]) == H("7a02616202 6162".replace(" ", ""))
    assert dumps("x" * 64) == H("3040") + b"x" * 64
    assert dumps("é" * 10) == dumps("é" * 10) == H("0a") + "é".encode() * 10


def test_reference_to_a_skipped_typed_list_reads_its_type_names_again() -> None:
    # found by hypothesis: the skipped list's own type name must not be counted twice
    inner = TypedList(
        "[int", [TypedMap("java.util.TreeMap", {}), TypedMap("java.util.TreeMap", {})]
    )
    for outer in (inner, TypedList("[int", range(9)), TypedList("x", [1], variable=True)):
        e = Encoder()
        for v in ([], outer, outer):
            e.write(v)
        d = Decoder(e.getvalue())
        d.skip()
        d.skip()
        assert d.read() == outer
        assert d.at_end
    m = TypedMap("java.util.TreeMap", {"a": TypedMap("java.util.TreeMap", {})})
    e = Encoder()
    e.write(m)
    e.write(m)
    d = Decoder(e.getvalue())
    d.skip()
    assert d.read() == m


def test_java_types_copy_and_pickle() -> None:
    import copy
    import pickle

    values = [
        TypedList("[int", [1, 2], variable=True),
        TypedMap("x.M", {1: 2}),
        JavaObject("A", {"f": [1]}),
        JavaLong(5),
        JavaInt(3),
        JavaFloat(1.1),
        JavaDouble(2.0),
    ]
    for v in values:
        for clone in (copy.copy(v), copy.deepcopy(v), pickle.loads(pickle.dumps(v))):
            assert type(clone) is type(v) and clone == v
            assert dumps(clone) == dumps(v)
