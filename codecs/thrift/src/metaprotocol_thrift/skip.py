"""Struct skippers: find where a struct ends without building any Python value.

They walk type tags and lengths only; fixed-size values and fixed-size collections are skipped
with one addition. Every read checks the end of the available bytes and raises
:class:`~metaprotocol_thrift.wire.Incomplete` with a lower bound of the bytes needed, so a
skipper is also the completeness test for unframed messages.
"""

from __future__ import annotations

import struct

from metaprotocol_sdk.errors import FramingError

from .wire import Buffer, Incomplete

_BINARY_MAP = struct.Struct(">BBi")
_BINARY_LIST = struct.Struct(">Bi")
_unpack_i32 = struct.Struct(">i").unpack_from

# Binary type id -> encoded size of a fixed-size value (0: variable size or invalid).
_BINARY_FIXED = bytes([0, 0, 1, 1, 8, 0, 2, 0, 4, 0, 8, 0, 0, 0, 0, 0, 16] + [0] * 239)
# Binary type ids with variable size: string, struct, map, set, list.
_BINARY_VARIABLE = frozenset({11, 12, 13, 14, 15})

# Compact element type id -> encoded size inside a collection (0: variable size or invalid).
_COMPACT_FIXED = bytes([0, 1, 1, 1, 0, 0, 0, 8, 0, 0, 0, 0, 0, 16, 0, 0])
_COMPACT_VARINTS = frozenset({4, 5, 6})
_COMPACT_VARIABLE = frozenset({4, 5, 6, 8, 9, 10, 11, 12})


def _too_deep(pos: int) -> FramingError:
    return FramingError("structs nested deeper than max_depth", offset=pos)


def skip_binary_struct(buf: Buffer, pos: int, end: int, depth: int) -> int:
    """Offset just past the binary struct starting at ``pos`` (``end`` must be ``len(buf)``)."""
    try:
        return _binary_struct(buf, pos, end, depth)
    except (IndexError, struct.error):
        # A read ran off the end of the bytes (the hot loops let indexing check the bounds).
        raise Incomplete(end + 1) from None


def _binary_struct(buf: Buffer, pos: int, end: int, depth: int) -> int:
    if depth <= 0:
        raise _too_deep(pos)
    fixed = _BINARY_FIXED
    unpack = _unpack_i32
    while True:
        ftype = buf[pos]
        if ftype == 0:
            return pos + 1
        pos += 3
        width = fixed[ftype]
        if width:
            pos += width
        elif ftype == 11:
            size = unpack(buf, pos)[0]
            if size < 0:
                raise FramingError(f"negative string length {size}", offset=pos)
            pos += 4 + size
            if pos > end:
                raise Incomplete(pos)
        elif ftype == 12:
            pos = _binary_struct(buf, pos, end, depth - 1)
        else:
            pos = _binary_value(buf, pos, end, ftype, depth, pos - 3)


def _binary_string(buf: Buffer, pos: int, end: int) -> int:
    size: int = _unpack_i32(buf, pos)[0]
    if size < 0:
        raise FramingError(f"negative string length {size}", offset=pos)
    pos += 4 + size
    if pos > end:
        raise Incomplete(pos)
    return pos


def _binary_value(buf: Buffer, pos: int, end: int, ftype: int, depth: int, at: int) -> int:
    fixed = _BINARY_FIXED
    if ftype == 11:
        return _binary_string(buf, pos, end)
    if ftype == 12:
        return _binary_struct(buf, pos, end, depth - 1)
    if ftype == 13:
        ktype: int
        vtype: int
        count: int
        ktype, vtype, count = _BINARY_MAP.unpack_from(buf, pos)
        pos += 6
        if count < 0:
            raise FramingError(f"negative map size {count}", offset=pos - 4)
        if count == 0:
            return pos
        kwidth = fixed[ktype]
        vwidth = fixed[vtype]
        _check_binary_type(ktype, kwidth, pos - 6)
        _check_binary_type(vtype, vwidth, pos - 5)
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
                pos = _binary_value(buf, pos, end, ktype, depth - 1, pos)
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
                pos = _binary_value(buf, pos, end, vtype, depth - 1, pos)
            if pos > end:
                raise Incomplete(pos)
        return pos
    if ftype == 14 or ftype == 15:
        etype: int
        etype, count = _BINARY_LIST.unpack_from(buf, pos)
        pos += 5
        if count < 0:
            raise FramingError(f"negative list size {count}", offset=pos - 4)
        if count == 0:
            return pos
        width = fixed[etype]
        _check_binary_type(etype, width, pos - 5)
        if width:
            pos += count * width
            if pos > end:
                raise Incomplete(pos)
            return pos
        if depth <= 1:
            raise _too_deep(pos)
        if etype == 11:  # strings, inline (the most common variable-size element)
            unpack = _unpack_i32
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
            unpack = _unpack_i32
            for _ in range(count):
                while True:
                    ftype = buf[pos]
                    if ftype == 0:
                        pos += 1
                        break
                    pos += 3
                    width = fixed[ftype]
                    if width:
                        pos += width
                    elif ftype == 11:
                        size = unpack(buf, pos)[0]
                        if size < 0:
                            raise FramingError(f"negative string length {size}", offset=pos)
                        pos += 4 + size
                    elif ftype == 12:
                        pos = _binary_struct(buf, pos, end, depth - 3)
                    else:
                        pos = _binary_value(buf, pos, end, ftype, depth - 2, pos - 3)
                if pos > end:
                    raise Incomplete(pos)
        else:
            for _ in range(count):
                pos = _binary_value(buf, pos, end, etype, depth - 1, pos)
        return pos
    raise FramingError(f"unknown binary field type {ftype}", offset=at)


def _check_binary_type(ttype: int, width: int, at: int) -> None:
    if not width and ttype not in _BINARY_VARIABLE:
        raise FramingError(f"unknown binary element type {ttype}", offset=at)


def _varint_end(buf: Buffer, pos: int) -> int:
    """Offset just past the varint at ``pos`` (IndexError when it runs off the bytes)."""
    limit = pos + 10
    while buf[pos] >= 0x80:
        pos += 1
        if pos >= limit:
            raise FramingError("varint longer than 10 bytes", offset=pos - 1)
    return pos + 1


def _varint32(buf: Buffer, pos: int) -> tuple[int, int]:
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


def skip_compact_struct(buf: Buffer, pos: int, end: int, depth: int) -> int:
    """Offset just past the compact struct starting at ``pos`` (``end`` must be ``len(buf)``)."""
    try:
        return _compact_struct(buf, pos, end, depth)
    except IndexError:
        raise Incomplete(end + 1) from None


def _compact_struct(buf: Buffer, pos: int, end: int, depth: int) -> int:
    if depth <= 0:
        raise _too_deep(pos)
    while True:
        head = buf[pos]
        if head == 0:
            return pos + 1
        at = pos
        pos += 1
        if head < 0x10:  # long form: zigzag varint field id follows
            pos = _varint_end(buf, pos)
        ftype = head & 0x0F
        if ftype <= 2:
            if ftype == 0:
                raise FramingError("compact field of type 0", offset=at)
            continue  # booleans live in the field header
        if ftype == 3:
            pos += 1
        elif ftype <= 6:
            pos = pos + 1 if buf[pos] < 0x80 else _varint_end(buf, pos)
        elif ftype == 7:
            pos += 8
        elif ftype == 8:
            size = buf[pos]
            if size < 0x80:
                pos += 1 + size
            else:
                size, pos = _varint32(buf, pos)
                pos += size
            if pos > end:
                raise Incomplete(pos)
        elif ftype == 12:
            pos = _compact_struct(buf, pos, end, depth - 1)
        elif ftype == 13:
            pos += 16
        else:
            pos = _compact_value(buf, pos, end, ftype, depth, at)


def _compact_value(buf: Buffer, pos: int, end: int, ftype: int, depth: int, at: int) -> int:
    if ftype == 12:
        return _compact_struct(buf, pos, end, depth - 1)
    if ftype == 8:
        size, pos = _varint32(buf, pos)
        pos += size
        if pos > end:
            raise Incomplete(pos)
        return pos
    if ftype in _COMPACT_VARINTS:
        return _varint_end(buf, pos)
    fixed = _COMPACT_FIXED
    if ftype == 9 or ftype == 10:
        head = buf[pos]
        pos += 1
        count = head >> 4
        etype = head & 0x0F
        if count == 15:
            count, pos = _varint32(buf, pos)
        if count == 0:
            return pos
        width = fixed[etype]
        if not width and etype not in _COMPACT_VARIABLE:
            raise FramingError(f"unknown compact element type {etype}", offset=at)
        if width:
            pos += count * width
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
        elif etype == 12:
            for _ in range(count):
                pos = _compact_struct(buf, pos, end, depth - 2)
        elif etype in _COMPACT_VARINTS:
            for _ in range(count):
                pos = pos + 1 if buf[pos] < 0x80 else _varint_end(buf, pos)
        else:
            for _ in range(count):
                pos = _compact_value(buf, pos, end, etype, depth - 1, pos)
        if pos > end:
            raise Incomplete(pos)
        return pos
    if ftype == 11:
        count, pos = _varint32(buf, pos)
        if count == 0:
            return pos
        kinds = buf[pos]
        pos += 1
        ktype = kinds >> 4
        vtype = kinds & 0x0F
        kwidth = fixed[ktype]
        vwidth = fixed[vtype]
        for ttype, width in ((ktype, kwidth), (vtype, vwidth)):
            if not width and ttype not in _COMPACT_VARIABLE:
                raise FramingError(f"unknown compact element type {ttype}", offset=pos - 1)
        if kwidth and vwidth:
            pos += count * (kwidth + vwidth)
        elif depth <= 1:
            raise _too_deep(pos)
        else:
            for _ in range(count):
                if kwidth:
                    pos += kwidth
                elif ktype == 8 and buf[pos] < 0x80:
                    pos += 1 + buf[pos]
                else:
                    pos = _compact_value(buf, pos, end, ktype, depth - 1, pos)
                if vwidth:
                    pos += vwidth
                elif vtype == 8 and buf[pos] < 0x80:
                    pos += 1 + buf[pos]
                elif vtype == 12:
                    pos = _compact_struct(buf, pos, end, depth - 2)
                else:
                    pos = _compact_value(buf, pos, end, vtype, depth - 1, pos)
                if pos > end:
                    raise Incomplete(pos)
        if pos > end:
            raise Incomplete(pos)
        return pos
    if fixed[ftype]:
        return pos + fixed[ftype]
    raise FramingError(f"unknown compact type {ftype}", offset=at)
