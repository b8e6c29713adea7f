"""Struct skippers: find where a struct ends without building any Python value.

They walk type tags and lengths only: a fixed-size field costs one table lookup and one
addition (the tables map a field's type byte, or a compact field header, to its whole size), a
fixed-size collection one multiplication, and a list of one-byte compact varints one C-level
``isascii`` scan. Reading past the available bytes raises
:class:`~metaprotocol_thrift.wire.Incomplete` with a lower bound of the bytes needed, so a
skipper is also the completeness test for unframed messages. Differentially tested against
Apache Thrift's ``TProtocol.skip`` (``tests/test_thrift_skip.py``).
"""

from __future__ import annotations

import struct

from metaprotocol_sdk.errors import FramingError

from .wire import Incomplete

#: What the skippers read (not memoryview: the varint run check needs ``isascii``).
Bytes = bytes | bytearray

_BINARY_MAP = struct.Struct(">BBi")
_BINARY_LIST = struct.Struct(">Bi")
_unpack_i32 = struct.Struct(">i").unpack_from

# Binary type id -> encoded size of a fixed-size value (0: variable size or invalid).
_BINARY_FIXED = bytes([0, 0, 1, 1, 8, 0, 2, 0, 4, 0, 8, 0, 0, 0, 0, 0, 16] + [0] * 239)
# Binary type id -> size of a whole fixed-size field (3-byte field header + value), else 0.
_BINARY_FIELD = bytes([3 + width if width else 0 for width in _BINARY_FIXED])
# Binary type ids with variable size: string, struct, map, set, list.
_BINARY_VARIABLE = frozenset({11, 12, 13, 14, 15})

# Compact element type id -> encoded size inside a collection (0: variable size or invalid).
_COMPACT_FIXED = bytes([0, 1, 1, 1, 0, 0, 0, 8, 0, 0, 0, 0, 0, 16, 0, 0])
_COMPACT_VARINTS = frozenset({4, 5, 6})
_COMPACT_VARIABLE = frozenset({4, 5, 6, 8, 9, 10, 11, 12})
# Compact short-form field header (id delta << 4 | type) -> how to skip the field: 1..17, the
# size of a whole fixed-size field (booleans live in the header); _VARINT (i16, i32, i64),
# _STRING, _LIST (list or set), _STRUCT; 0 for anything else (long form, stop, map, invalid).
_VARINT, _STRING, _LIST, _STRUCT = 0x20, 0x21, 0x22, 0x23
_COMPACT_FIELD = bytes(
    0
    if head < 0x10
    else {
        1: 1,
        2: 1,
        3: 2,
        7: 9,
        13: 17,
        4: _VARINT,
        5: _VARINT,
        6: _VARINT,
        8: _STRING,
        9: _LIST,
        10: _LIST,
        12: _STRUCT,
    }.get(head & 0x0F, 0)
    for head in range(256)
)


def _too_deep(pos: int) -> FramingError:
    return FramingError("structs nested deeper than max_depth", offset=pos)


def skip_binary_struct(buf: Bytes, pos: int, end: int, depth: int) -> int:
    """Offset just past the binary struct starting at ``pos`` (``end`` must be ``len(buf)``)."""
    try:
        return _binary_struct(buf, pos, end, depth)
    except (IndexError, struct.error):
        # A read ran off the end of the bytes (the hot loops let indexing check the bounds).
        raise Incomplete(end + 1) from None


def _binary_struct(buf: Bytes, pos: int, end: int, depth: int) -> int:
    if depth <= 0:
        raise _too_deep(pos)
    fields = _BINARY_FIELD
    unpack = _unpack_i32
    while True:
        ftype = buf[pos]
        step = fields[ftype]
        if step:  # a fixed-size field: the most common case, one addition
            pos += step
        elif ftype == 11:
            size = unpack(buf, pos + 3)[0]
            if size < 0:
                raise FramingError(f"negative string length {size}", offset=pos + 3)
            pos += 7 + size
            if pos > end:
                raise Incomplete(pos)
        elif ftype == 0:
            return pos + 1
        elif ftype == 12:
            pos = _binary_struct(buf, pos + 3, end, depth - 1)
        elif ftype == 15 or ftype == 14:
            pos = _binary_list(buf, pos + 3, end, depth)
        elif ftype == 13:
            pos = _binary_map(buf, pos + 3, end, depth)
        else:
            raise FramingError(f"unknown binary field type {ftype}", offset=pos)


def _binary_list(buf: Bytes, pos: int, end: int, depth: int) -> int:
    """A list or set whose header starts at ``pos``, inside a struct at ``depth``."""
    etype: int
    count: int
    etype, count = _BINARY_LIST.unpack_from(buf, pos)
    pos += 5
    if count <= 0:
        if count:
            raise FramingError(f"negative list size {count}", offset=pos - 4)
        return pos
    width = _BINARY_FIXED[etype]
    if width:
        pos += count * width
        if pos > end:
            raise Incomplete(pos)
        return pos
    if depth <= 1:
        if etype in _BINARY_VARIABLE:
            raise _too_deep(pos)
        raise FramingError(f"unknown binary element type {etype}", offset=pos - 5)
    unpack = _unpack_i32
    if etype == 11:  # strings, inline (the most common variable-size element)
        for _ in range(count):
            size = unpack(buf, pos)[0]
            if size < 0:
                raise FramingError(f"negative string length {size}", offset=pos)
            pos += 4 + size
        if pos > end:
            raise Incomplete(pos)
    elif etype == 12:
        # Structs, with the field loop inlined (one call per element is most of the cost).
        if depth <= 2:
            raise _too_deep(pos)
        fields = _BINARY_FIELD
        for _ in range(count):
            while True:
                ftype = buf[pos]
                step = fields[ftype]
                if step:
                    pos += step
                elif ftype == 11:
                    size = unpack(buf, pos + 3)[0]
                    if size < 0:
                        raise FramingError(f"negative string length {size}", offset=pos + 3)
                    pos += 7 + size
                elif ftype == 0:
                    pos += 1
                    break
                elif ftype == 12:
                    pos = _binary_struct(buf, pos + 3, end, depth - 3)
                elif ftype == 15 or ftype == 14:
                    pos = _binary_list(buf, pos + 3, end, depth - 2)
                elif ftype == 13:
                    pos = _binary_map(buf, pos + 3, end, depth - 2)
                else:
                    raise FramingError(f"unknown binary field type {ftype}", offset=pos)
            if pos > end:
                raise Incomplete(pos)
    elif etype == 15 or etype == 14:
        for _ in range(count):
            pos = _binary_list(buf, pos, end, depth - 1)
    elif etype == 13:
        for _ in range(count):
            pos = _binary_map(buf, pos, end, depth - 1)
    else:
        raise FramingError(f"unknown binary element type {etype}", offset=pos - 5)
    return pos


def _binary_map(buf: Bytes, pos: int, end: int, depth: int) -> int:
    """A map whose header starts at ``pos``, inside a struct at ``depth``."""
    ktype: int
    vtype: int
    count: int
    ktype, vtype, count = _BINARY_MAP.unpack_from(buf, pos)
    pos += 6
    if count <= 0:
        if count:
            raise FramingError(f"negative map size {count}", offset=pos - 4)
        return pos
    fixed = _BINARY_FIXED
    kwidth = fixed[ktype]
    vwidth = fixed[vtype]
    if not kwidth and ktype not in _BINARY_VARIABLE:
        raise FramingError(f"unknown binary element type {ktype}", offset=pos - 6)
    if not vwidth and vtype not in _BINARY_VARIABLE:
        raise FramingError(f"unknown binary element type {vtype}", offset=pos - 5)
    if kwidth and vwidth:
        pos += count * (kwidth + vwidth)
        if pos > end:
            raise Incomplete(pos)
        return pos
    if depth <= 1:
        raise _too_deep(pos)
    unpack = _unpack_i32
    if ktype == 11 and vtype == 11:  # map<string, string>: the common attachment shape
        for _ in range(count):
            size = unpack(buf, pos)[0]
            pos += 4 + size
            size2 = unpack(buf, pos)[0]
            pos += 4 + size2
            if size < 0 or size2 < 0:
                raise FramingError("negative string length in a map", offset=pos)
        if pos > end:
            raise Incomplete(pos)
        return pos
    for _ in range(count):
        if kwidth:
            pos += kwidth
        elif ktype == 11:
            size = unpack(buf, pos)[0]
            if size < 0:
                raise FramingError(f"negative string length {size}", offset=pos)
            pos += 4 + size
        else:
            pos = _binary_element(buf, pos, end, ktype, depth - 1)
        if vwidth:
            pos += vwidth
        elif vtype == 11:
            size = unpack(buf, pos)[0]
            if size < 0:
                raise FramingError(f"negative string length {size}", offset=pos)
            pos += 4 + size
        elif vtype == 12:
            pos = _binary_struct(buf, pos, end, depth - 2)
        else:
            pos = _binary_element(buf, pos, end, vtype, depth - 1)
        if pos > end:
            raise Incomplete(pos)
    return pos


def _binary_element(buf: Bytes, pos: int, end: int, etype: int, depth: int) -> int:
    """A variable-size collection element (struct, list, set or map) at ``depth``."""
    if etype == 12:
        return _binary_struct(buf, pos, end, depth - 1)
    if etype == 13:
        return _binary_map(buf, pos, end, depth)
    return _binary_list(buf, pos, end, depth)


def _varint_end(buf: Bytes, pos: int) -> int:
    """Offset just past the varint at ``pos`` (IndexError when it runs off the bytes)."""
    limit = pos + 10
    while buf[pos] >= 0x80:
        pos += 1
        if pos >= limit:
            raise FramingError("varint longer than 10 bytes", offset=pos - 1)
    return pos + 1


def _varint32(buf: Bytes, pos: int) -> tuple[int, int]:
    """A size varint at ``pos``: ``(value, next offset)``."""
    value = 0
    shift = 0
    start = pos
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 35:
            raise FramingError("size varint longer than 5 bytes", offset=start)


def skip_compact_struct(buf: Bytes, pos: int, end: int, depth: int) -> int:
    """Offset just past the compact struct starting at ``pos`` (``end`` must be ``len(buf)``)."""
    try:
        return _compact_struct(buf, pos, end, depth)
    except IndexError:
        raise Incomplete(end + 1) from None


def _compact_struct(buf: Bytes, pos: int, end: int, depth: int) -> int:
    if depth <= 0:
        raise _too_deep(pos)
    fields = _COMPACT_FIELD
    while True:
        head = buf[pos]
        how = fields[head]
        if how < _VARINT:
            if how:  # a short-form fixed-size field (booleans, bytes, doubles)
                pos += how
            elif head == 0:
                return pos + 1
            else:
                pos = _compact_field(buf, pos, end, head, depth)
        elif how == _VARINT:  # a short-form integer field, one byte for small values
            pos = pos + 2 if buf[pos + 1] < 0x80 else _varint_end(buf, pos + 1)
        elif how == _STRING:
            size = buf[pos + 1]
            if size < 0x80:  # under 128 bytes: a one-byte length
                pos += 2 + size
                if pos > end:
                    raise Incomplete(pos)
            else:
                pos = _compact_field(buf, pos, end, head, depth)
        elif how == _LIST:
            pos = _compact_list(buf, pos + 1, end, depth, pos)
        else:
            pos = _compact_struct(buf, pos + 1, end, depth - 1)


def _compact_field(buf: Bytes, pos: int, end: int, head: int, depth: int) -> int:
    """Offset past the field at ``pos`` whose header byte is ``head`` (not a fast-path one)."""
    at = pos
    pos += 1
    if head < 0x10:  # long form: zigzag varint field id follows
        pos = _varint_end(buf, pos)
    ftype = head & 0x0F
    if ftype == 8:
        size = buf[pos]
        if size < 0x80:
            pos += 1 + size
        else:
            size, pos = _varint32(buf, pos)
            pos += size
        if pos > end:
            raise Incomplete(pos)
        return pos
    if ftype == 12:
        return _compact_struct(buf, pos, end, depth - 1)
    if ftype == 9 or ftype == 10:
        return _compact_list(buf, pos, end, depth, at)
    if ftype == 11:
        return _compact_map(buf, pos, end, depth)
    if ftype in _COMPACT_VARINTS:
        return _varint_end(buf, pos)
    if ftype <= 2:
        if ftype == 0:
            raise FramingError("compact field of type 0", offset=at)
        return pos  # booleans live in the field header
    width = _COMPACT_FIXED[ftype]
    if width:
        return pos + width
    raise FramingError(f"unknown compact type {ftype}", offset=at)


def _skip_varints(buf: Bytes, pos: int, count: int) -> int:
    """Offset just past ``count`` varints starting at ``pos``."""
    for _ in range(count):
        pos = pos + 1 if buf[pos] < 0x80 else _varint_end(buf, pos)
    return pos


def _compact_string(buf: Bytes, pos: int, end: int) -> int:
    size, pos = _varint32(buf, pos)
    pos += size
    if pos > end:
        raise Incomplete(pos)
    return pos


def _compact_list(buf: Bytes, pos: int, end: int, depth: int, at: int) -> int:
    """A list or set whose header starts at ``pos``, inside a struct at ``depth``."""
    head = buf[pos]
    pos += 1
    count = head >> 4
    etype = head & 0x0F
    if count == 15:  # the long form: a size varint follows
        count = buf[pos]
        if count < 0x80:
            pos += 1
        else:
            count, pos = _varint32(buf, pos)
    if count == 0:
        return pos
    width = _COMPACT_FIXED[etype]
    if width:
        pos += count * width
    elif etype not in _COMPACT_VARIABLE:
        raise FramingError(f"unknown compact element type {etype}", offset=at)
    elif depth <= 1:
        raise _too_deep(pos)
    elif etype == 8:  # strings, inline
        for _ in range(count):
            size = buf[pos]
            if size < 0x80:
                pos += 1 + size
            else:
                size, pos = _varint32(buf, pos)
                pos += size
    elif etype in _COMPACT_VARINTS:
        stop = pos + count
        # All one-byte values (or cut short: checked below): one C-level scan.
        pos = stop if buf[pos:stop].isascii() else _skip_varints(buf, pos, count)
    elif etype == 12:
        # Structs, with the field loop inlined (one call per element is most of the cost).
        if depth <= 2:
            raise _too_deep(pos)
        fields = _COMPACT_FIELD
        for _ in range(count):
            while True:
                head = buf[pos]
                how = fields[head]
                if how < _VARINT:
                    if how:
                        pos += how
                    elif head == 0:
                        pos += 1
                        break
                    else:
                        pos = _compact_field(buf, pos, end, head, depth - 2)
                elif how == _VARINT:
                    pos = pos + 2 if buf[pos + 1] < 0x80 else _varint_end(buf, pos + 1)
                elif how == _STRING and buf[pos + 1] < 0x80:
                    pos += 2 + buf[pos + 1]
                else:
                    pos = _compact_field(buf, pos, end, head, depth - 2)
            if pos > end:
                raise Incomplete(pos)
    elif etype == 9 or etype == 10:
        for _ in range(count):
            pos = _compact_list(buf, pos, end, depth - 1, pos)
    else:
        for _ in range(count):
            pos = _compact_element(buf, pos, end, etype, depth - 1)
    if pos > end:
        raise Incomplete(pos)
    return pos


def _compact_map(buf: Bytes, pos: int, end: int, depth: int) -> int:
    """A map whose header starts at ``pos``, inside a struct at ``depth``."""
    count = buf[pos]
    if count < 0x80:
        pos += 1
    else:
        count, pos = _varint32(buf, pos)
    if count == 0:
        return pos
    kinds = buf[pos]
    pos += 1
    ktype = kinds >> 4
    vtype = kinds & 0x0F
    fixed = _COMPACT_FIXED
    kwidth = fixed[ktype]
    vwidth = fixed[vtype]
    if not kwidth and ktype not in _COMPACT_VARIABLE:
        raise FramingError(f"unknown compact element type {ktype}", offset=pos - 1)
    if not vwidth and vtype not in _COMPACT_VARIABLE:
        raise FramingError(f"unknown compact element type {vtype}", offset=pos - 1)
    if kwidth and vwidth:
        pos += count * (kwidth + vwidth)
        if pos > end:
            raise Incomplete(pos)
        return pos
    if depth <= 1:
        raise _too_deep(pos)
    if ktype == 8 and vtype == 8:  # map<string, string>: the common attachment shape
        for _ in range(count):
            size = buf[pos]
            if size < 0x80:
                pos += 1 + size
            else:
                size, pos = _varint32(buf, pos)
                pos += size
            size = buf[pos]
            if size < 0x80:
                pos += 1 + size
            else:
                size, pos = _varint32(buf, pos)
                pos += size
        if pos > end:
            raise Incomplete(pos)
        return pos
    kvarint = ktype in _COMPACT_VARINTS
    vvarint = vtype in _COMPACT_VARINTS
    for _ in range(count):
        if kwidth:
            pos += kwidth
        elif ktype == 8 and buf[pos] < 0x80:
            pos += 1 + buf[pos]
        elif kvarint:
            pos = pos + 1 if buf[pos] < 0x80 else _varint_end(buf, pos)
        else:
            pos = _compact_element(buf, pos, end, ktype, depth - 1)
        if vwidth:
            pos += vwidth
        elif vtype == 8 and buf[pos] < 0x80:
            pos += 1 + buf[pos]
        elif vtype == 12:
            pos = _compact_struct(buf, pos, end, depth - 2)
        elif vvarint:
            pos = pos + 1 if buf[pos] < 0x80 else _varint_end(buf, pos)
        else:
            pos = _compact_element(buf, pos, end, vtype, depth - 1)
        if pos > end:
            raise Incomplete(pos)
    return pos


def _compact_element(buf: Bytes, pos: int, end: int, etype: int, depth: int) -> int:
    """A variable-size collection element at ``depth`` (its type comes from the header)."""
    if etype == 8:
        return _compact_string(buf, pos, end)
    if etype == 12:
        return _compact_struct(buf, pos, end, depth - 1)
    if etype in _COMPACT_VARINTS:
        return _varint_end(buf, pos)
    if etype == 11:
        return _compact_map(buf, pos, end, depth)
    return _compact_list(buf, pos, end, depth, pos)
