"""Malformed input: a HessianError with the reason and the byte offset, never a short value,
a huge allocation, a crash of another kind, or unbounded recursion."""

from __future__ import annotations

import encodings
import sys
from typing import Any

import pytest
from metaprotocol_dubbo.hessian2 import (
    Decoder,
    HessianError,
    JavaLong,
    JavaObject,
    TypedList,
    TypedMap,
    dumps,
    loads,
)

H = bytes.fromhex

# pytest's importlib mode can register this repository's codecs/ folder as the module
# "codecs", which breaks encodings loaded later (unicode_escape for test ids); put the
# standard library module back (see interop/peers.py).
sys.modules["codecs"] = encodings.codecs


def fails(
    data: bytes, match: str, offset: int | None = None, *, skip: bool = True, **kw: Any
) -> HessianError:
    """read (and skip, unless the problem is in content skip does not look at) refuse ``data``
    with a HessianError matching ``match``."""
    with pytest.raises(HessianError, match=match) as info:
        Decoder(data, **kw).read()
    if offset is not None:
        assert info.value.offset == offset
    if skip:
        with pytest.raises(HessianError):
            Decoder(data, **kw).skip()
    return info.value


@pytest.mark.parametrize("tag", [0x40, 0x45, 0x47, 0x50])
def test_unknown_tags(tag: int) -> None:
    fails(bytes([tag]), f"unknown tag 0x{tag:02x}", offset=0)
    # inside a list, the offset points at the bad byte
    fails(bytes([0x7A, 0x91, tag]), f"unknown tag 0x{tag:02x}", offset=2)


def test_unexpected_end_tag() -> None:
    fails(b"Z", "unexpected end-of-container", offset=0)


def test_empty_input() -> None:
    fails(b"", "truncated", offset=0)


SAMPLES: list[Any] = [
    123456,
    JavaLong(2**40),
    JavaLong(100000),
    3.25,
    12345.0,
    1e300,
    "héllo \U0001f600",
    "x" * 40,
    "y" * 2000,
    b"\x01" * 20,
    b"\x02" * 2000,
    [1, "a", [None]],
    list(range(10)),
    TypedList("[int", [1, 2]),
    TypedList("[int", range(9)),
    TypedList("[int", [1], variable=True),
    TypedList(None, [1], variable=True),
    {"k": [1, 2], 3: None},
    TypedMap("java.util.TreeMap", {"a": 1}),
    JavaObject("com.x.P", {"name": "n", "v": [1]}),
    [JavaObject("K", {"v": i}) for i in range(17)],
]


@pytest.mark.parametrize("value", SAMPLES, ids=lambda v: type(v).__name__)
def test_every_truncation_is_an_error_never_a_short_value(value: Any) -> None:
    data = dumps(value)
    for cut in range(len(data)):
        with pytest.raises(HessianError) as info:
            Decoder(data[:cut]).read()
        assert info.value.offset is not None and 0 <= info.value.offset <= cut
        with pytest.raises(HessianError):
            Decoder(data[:cut]).skip()


def test_truncated_chunked_values() -> None:
    s = dumps("z" * 40000)
    fails(s[:0x8000], "truncated")
    fails(s[: 0x8000 + 3], "truncated")
    b = dumps(b"z" * 40000)
    fails(b[: 0x8000 + 3], "truncated")


def test_bad_utf8() -> None:
    # skip counts characters without validating them (documented), so read only
    fails(H("02ff41"), "bad UTF-8", offset=1, skip=False)
    fails(H("01c080"), "bad UTF-8", skip=False)  # overlong
    fails(H("01f09f9880"), "bad UTF-8", skip=False)  # 4-byte sequence: Java refuses it too
    fails(H("01e4b8"), "truncated")  # sequence cut by the end of the data


def test_string_declared_longer_than_data() -> None:
    err = fails(H("53ffff") + b"abc", "declared length 65535 exceeds the data left", offset=0)
    assert "string" in err.reason


def test_bad_chunk_continuation() -> None:
    fails(H("5200016191"), "expected a string chunk", offset=4)
    fails(H("4100016191"), "expected a binary chunk", offset=4)


def test_huge_declared_list_length_is_refused_without_allocating() -> None:
    # 'X' with length 2**31-1 and 1 byte of data
    err = fails(H("58497fffffff90"), "list", offset=0)
    assert "exceeds" in err.reason
    fails(H("56045b696e74497fffffff90"), "exceeds")


def test_max_length() -> None:
    data = dumps("a" * 5000)
    fails(data, "exceeds max_length=1024", offset=0, max_length=1024)
    assert Decoder(data, max_length=5000).read() == "a" * 5000
    fails(dumps(b"b" * 5000), "exceeds max_length", max_length=1024)
    fails(dumps(list(range(2000))), "exceeds max_length", max_length=1024)
    fails(dumps("c" * 40000), "exceeds max_length", max_length=0x8000)
    with pytest.raises(ValueError):
        Decoder(b"", max_length=10)


def test_negative_length() -> None:
    fails(H("5880"), "negative list length")


def test_depth_is_bounded() -> None:
    nested: Any = 1
    for _ in range(10):
        nested = [nested]
    data = dumps(nested)
    fails(data, "max_depth=5", max_depth=5)
    assert Decoder(data, max_depth=10).read() == nested
    # far beyond Python's recursion limit: a clean error, not a RecursionError
    deep = b"\x79" * 100000 + b"\x90"
    fails(deep, "max_depth=128")
    fails(b"\x57" * 100000, "max_depth")
    fails(b"\x48\x90" * 100000, "max_depth")


def test_bad_references() -> None:
    fails(H("5190"), "bad reference 0: 0 containers so far", offset=0)
    fails(H("7b 78 90 5192".replace(" ", "")), "bad reference 2", offset=3)
    fails(H("51 59 00000001".replace(" ", "")), "bad reference")
    fails(H("51 4e"), "expected an int for a reference")


def test_bad_class_references() -> None:
    fails(H("60"), "bad class reference 0", offset=0)
    fails(H("4f95"), "bad class reference 5", offset=0)
    fails(H("4f8f"), "bad class reference -1")


def test_bad_class_definitions() -> None:
    fails(H("434e9060"), "without a class name")
    fails(H("43014190"), "truncated: expected an object after its class definition")
    fails(H("430141914e60"), "null field name")
    fails(H("43014191"), "truncated")
    fails(H("43014190") + H("43014290"), "truncated")  # definitions but no object


def test_bad_type_references() -> None:
    fails(H("7191"), "bad type reference 1", offset=1)
    fails(H("714e"), "expected a type name or reference")


def test_map_errors() -> None:
    fails(H("4891"), "truncated")
    fails(H("48914e"), "missing 'Z'")
    fails(H("48915a"), "unexpected end-of-container|without a value")
    with pytest.raises(HessianError, match="without a value"):
        Decoder(H("48915a")).skip()
    fails(H("4878905a"), "not hashable", skip=False)


def test_list_errors() -> None:
    fails(H("5791"), "missing 'Z'")
    fails(H("79"), "truncated")


def test_dates_out_of_python_range() -> None:
    fails(H("4a7fffffffffffffff"), "outside Python's range", offset=0, skip=False)


def test_loads_trailing_bytes_has_offset() -> None:
    with pytest.raises(HessianError) as info:
        loads(H("9091"))
    assert info.value.offset == 1


def test_error_reasons_are_codec_errors_with_offsets() -> None:
    err = fails(H("7a9140"), "unknown tag")
    assert err.offset == 2
    assert str(err) == "unknown tag 0x40 at byte 2"


def test_a_max_depth_beyond_the_python_stack_still_gives_a_hessian_error() -> None:
    deep = b"\x79" * 5000 + b"\x90"
    fails(deep, "too deep for the Python stack", max_depth=100000)
    obj = b"\x43\x01A\x91\x01v" + b"\x60" * 5000 + b"\x90"
    fails(obj, "too deep for the Python stack", max_depth=100000)
