"""Skipping Hessian 2.0 values without building them (the table behind ``Decoder.skip``).

A skipper advances the decoder over one value. Fixed-width values are skipped by arithmetic,
strings by counting UTF-8 lead bytes a slice at a time, containers item by item. Class
definitions and type names are still recorded, and every skipped list, map and object takes
its reference number (a ``Skipped`` marker tuple), so values after a skipped one
decode exactly as if it had been read.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import tags as T
from .decoder import _READERS, _WIDTH, read_class_def
from .strings import units_end

if TYPE_CHECKING:
    from .decoder import Decoder

Skipper = Callable[["Decoder", int, int], None]

_H = struct.Struct(">H").unpack_from


def _s_unknown(d: Decoder, tag: int, pos: int) -> None:
    _READERS[tag](d, tag, pos)  # raises the same error as read()


def _fixed(width: int) -> Skipper:
    def skip(d: Decoder, tag: int, pos: int) -> None:
        end = pos + width
        if end > d._end:
            raise d._error("truncated value", pos - 1)
        d._pos = end

    return skip


def _skip_units(d: Decoder, pos: int, n: int, tag_pos: int) -> int:
    end = units_end(d._data, pos, n, d._end)
    if end < 0:
        raise d._error(f"truncated string: declared length {n} exceeds the data left", tag_pos)
    return end


def _s_str_direct(d: Decoder, tag: int, pos: int) -> None:
    d._pos = _skip_units(d, pos, tag, pos - 1)


def _s_str_short(d: Decoder, tag: int, pos: int) -> None:
    if pos + 1 > d._end:
        raise d._error("truncated string length", pos - 1)
    n = ((tag - 0x30) << 8) + d._data[pos]
    d._pos = _skip_units(d, pos + 1, n, pos - 1)


def _s_chunked(d: Decoder, tag: int, pos: int) -> None:
    """Strings ('S', 'R') and binary ('B', 'A'): chunks until a final one."""
    tag_pos = pos - 1
    data = d._data
    binary = tag == T.BINARY or tag == T.BINARY_CHUNK
    total = 0
    while True:
        if tag in (T.STRING, T.STRING_CHUNK, T.BINARY, T.BINARY_CHUNK):
            if pos + 2 > d._end:
                raise d._error("truncated chunk length", pos - 1)
            n = _H(data, pos)[0]
            pos += 2
        elif not binary and tag <= 0x1F:
            n = tag
        elif binary and 0x20 <= tag <= 0x2F:
            n = tag - 0x20
        elif (not binary and 0x30 <= tag <= 0x33) or (binary and 0x34 <= tag <= 0x37):
            if pos + 1 > d._end:
                raise d._error("truncated chunk length", pos - 1)
            n = ((tag & 0x03) << 8) + data[pos]
            pos += 1
        else:
            what = "binary" if binary else "string"
            raise d._error(f"expected a {what} chunk, found tag 0x{tag:02x}", pos - 1)
        total += n
        if total > d.max_length:
            raise d._error(f"length {total} exceeds max_length={d.max_length}", tag_pos)
        if binary:
            pos += n
            if pos > d._end:
                raise d._error(
                    f"truncated binary: declared length {n} exceeds the data left", tag_pos
                )
        else:
            pos = _skip_units(d, pos, n, tag_pos)
        if tag != T.STRING_CHUNK and tag != T.BINARY_CHUNK:
            break
        if pos >= d._end:
            raise d._error("truncated chunked value", tag_pos)
        tag = data[pos]
        pos += 1
    d._pos = pos


def _s_bin_direct(d: Decoder, tag: int, pos: int) -> None:
    end = pos + tag - 0x20
    if end > d._end:
        raise d._error("truncated binary", pos - 1)
    d._pos = end


def _s_bin_short(d: Decoder, tag: int, pos: int) -> None:
    if pos + 1 > d._end:
        raise d._error("truncated binary length", pos - 1)
    end = pos + 1 + ((tag - 0x34) << 8) + d._data[pos]
    if end > d._end:
        raise d._error("truncated binary", pos - 1)
    d._pos = end


def _mark(d: Decoder, tag_pos: int, n_types: int = -1) -> int:
    """Number the skipped container, count its depth and make it the innermost open one.

    ``n_types`` is how many type names were known at its tag, when its own type name was
    already read (re-decoding from the tag reads that name again). Returns the container that
    was open before, which the caller restores when this one ends.
    """
    if n_types < 0:
        n_types = len(d._types)
    refs = d._refs
    if len(refs) >= d.max_refs:
        raise d._too_many_refs(tag_pos)
    outer = d._open
    d._open = len(refs)
    refs.append((tag_pos, len(d._classes), n_types, outer))  # a Skipped marker
    d._depth += 1
    if d._depth > d.max_depth:
        d._enter(tag_pos)
    return outer


def _skip_items(d: Decoder, count: int) -> None:
    """Skip ``count`` values; fixed-width values and compact ASCII strings inline."""
    data = d._data
    end = d._end
    width = _WIDTH
    skip = d._skip
    pos = d._pos
    for _ in range(count):
        if pos < end:
            tag = data[pos]
            w = width[tag]
            if w:
                if pos + w <= end:
                    pos += w
                    continue
            elif tag <= 0x1F:
                stop = pos + 1 + tag
                if stop <= end and data[pos + 1 : stop].isascii():
                    pos = stop
                    continue
        d._pos = pos
        skip()  # everything else, and every error, goes through the full skipper
        pos = d._pos
    d._pos = pos


def _skip_n(d: Decoder, n: int, tag_pos: int, n_types: int = -1) -> None:
    d._length(n, "list", tag_pos)
    outer = _mark(d, tag_pos, n_types)
    _skip_items(d, n)
    d._depth -= 1
    d._open = outer


def _skip_until_end(d: Decoder, tag_pos: int, pairs: bool, n_types: int = -1) -> None:
    """Skip values (map: key-value pairs) up to and over 'Z'."""
    outer = _mark(d, tag_pos, n_types)
    skip = d._skip
    data = d._data
    end = d._end
    width = _WIDTH
    count = 0
    pos = d._pos
    while True:
        if pos >= end:
            raise d._error("truncated container: missing 'Z'", tag_pos)
        tag = data[pos]
        if tag == T.END:
            if pairs and count & 1:
                raise d._error("map entry without a value before 'Z'", pos)
            d._pos = pos + 1
            break
        count += 1
        w = width[tag]
        if w:
            if pos + w <= end:
                pos += w
                continue
        elif tag <= 0x1F:
            stop = pos + 1 + tag
            if stop <= end and data[pos + 1 : stop].isascii():
                pos = stop
                continue
        d._pos = pos
        skip()
        pos = d._pos
    d._depth -= 1
    d._open = outer


def _s_list_direct_untyped(d: Decoder, tag: int, pos: int) -> None:
    d._pos = pos
    _skip_n(d, tag - T.LIST_DIRECT_UNTYPED, pos - 1)


def _s_list_direct(d: Decoder, tag: int, pos: int) -> None:
    d._pos = pos
    n_types = len(d._types)
    d._read_type()
    _skip_n(d, tag - T.LIST_DIRECT, pos - 1, n_types)


def _s_list_fixed_untyped(d: Decoder, tag: int, pos: int) -> None:
    d._pos = pos
    _skip_n(d, d._read_length("a list length"), pos - 1)


def _s_list_fixed(d: Decoder, tag: int, pos: int) -> None:
    d._pos = pos
    n_types = len(d._types)
    d._read_type()
    _skip_n(d, d._read_length("a list length"), pos - 1, n_types)


def _s_variable_untyped(d: Decoder, tag: int, pos: int) -> None:
    """'W' list or 'H' map."""
    d._pos = pos
    _skip_until_end(d, pos - 1, tag == T.MAP_UNTYPED)


def _s_variable_typed(d: Decoder, tag: int, pos: int) -> None:
    """'U' list or 'M' map."""
    d._pos = pos
    n_types = len(d._types)
    d._read_type()
    _skip_until_end(d, pos - 1, tag == T.MAP, n_types)


def _s_class_def(d: Decoder, tag: int, pos: int) -> None:
    read_class_def(d, pos)
    d._skip()  # the object that follows its definition


def _skip_object(d: Decoder, idx: int, tag_pos: int) -> None:
    if not 0 <= idx < len(d._classes):
        raise d._error(f"bad class reference {idx}", tag_pos)
    outer = _mark(d, tag_pos)
    _skip_items(d, len(d._classes[idx][1]))
    d._depth -= 1
    d._open = outer


def _s_object_direct(d: Decoder, tag: int, pos: int) -> None:
    d._pos = pos
    _skip_object(d, tag - T.OBJECT_DIRECT, pos - 1)


def _s_object(d: Decoder, tag: int, pos: int) -> None:
    d._pos = pos
    _skip_object(d, d._read_length("a class reference"), pos - 1)


def _s_ref(d: Decoder, tag: int, pos: int) -> None:
    d._pos = pos
    idx = d._read_length("a reference")
    if not 0 <= idx < len(d._refs):
        raise d._error(f"bad reference {idx}: {len(d._refs)} containers so far", pos - 1)


def _table() -> list[Skipper]:
    skippers: list[Skipper] = [_s_unknown] * 256

    def put(lo: int, hi: int, fn: Skipper) -> None:
        for t in range(lo, hi + 1):
            skippers[t] = fn

    none, one, two, four, eight = _fixed(0), _fixed(1), _fixed(2), _fixed(4), _fixed(8)
    put(0x00, 0x1F, _s_str_direct)
    put(0x20, 0x2F, _s_bin_direct)
    put(0x30, 0x33, _s_str_short)
    put(0x34, 0x37, _s_bin_short)
    put(0x38, 0x3F, two)
    for t in (T.BINARY_CHUNK, T.BINARY, T.STRING_CHUNK, T.STRING):
        skippers[t] = _s_chunked
    skippers[T.CLASS_DEF] = _s_class_def
    skippers[T.DOUBLE] = eight
    skippers[T.FALSE] = none
    skippers[T.TRUE] = none
    skippers[T.NULL] = none
    skippers[T.MAP_UNTYPED] = _s_variable_untyped
    skippers[T.MAP] = _s_variable_typed
    skippers[T.INT] = four
    skippers[T.DATE] = eight
    skippers[T.DATE_MINUTE] = four
    skippers[T.LONG] = eight
    skippers[T.OBJECT] = _s_object
    skippers[T.REF] = _s_ref
    skippers[T.LIST_VARIABLE] = _s_variable_typed
    skippers[T.LIST_FIXED] = _s_list_fixed
    skippers[T.LIST_VARIABLE_UNTYPED] = _s_variable_untyped
    skippers[T.LIST_FIXED_UNTYPED] = _s_list_fixed_untyped
    skippers[T.LONG_INT] = four
    skippers[T.DOUBLE_ZERO] = none
    skippers[T.DOUBLE_ONE] = none
    skippers[T.DOUBLE_BYTE] = one
    skippers[T.DOUBLE_SHORT] = two
    skippers[T.DOUBLE_MILL] = four
    put(0x60, 0x6F, _s_object_direct)
    put(0x70, 0x77, _s_list_direct)
    put(0x78, 0x7F, _s_list_direct_untyped)
    put(0x80, 0xBF, none)
    put(0xC0, 0xCF, one)
    put(0xD0, 0xD7, two)
    put(0xD8, 0xEF, none)
    put(0xF0, 0xFF, one)
    return skippers


SKIPPERS = _table()
