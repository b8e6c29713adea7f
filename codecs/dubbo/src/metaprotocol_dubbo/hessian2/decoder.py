"""Hessian 2.0 decoder: bytes to Python values, one value at a time, over a shared stream.

One :class:`Decoder` reads a sequence of top-level values that share class definitions, type
names and references, as a Dubbo body does. Values are read by a table of 256 small functions
indexed by the tag byte; :meth:`Decoder.skip` uses a twin table that advances without building
values (see :mod:`.skip`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Generic, Protocol, TypeVar

from . import tags as T
from .errors import HessianError
from .strings import decode_units, join_pairs, units_end
from .types import JavaLong, JavaObject, TypedList, TypedMap

#: Default bound on nesting (lists, maps, objects inside each other).
DEFAULT_MAX_DEPTH: Final = 128
#: Default bound on one declared length (string units, binary bytes, list items): 8 MiB.
DEFAULT_MAX_LENGTH: Final = 8 * 1024 * 1024
#: ``max_length`` may not be set below this: compact forms hold lengths up to 1023.
MIN_MAX_LENGTH: Final = 1024
#: Default bound on the lists, maps and objects (reference targets) of one stream. Each costs
#: about 100 bytes of bookkeeping even when skipped, and takes as little as one byte of input.
DEFAULT_MAX_REFS: Final = 128 * 1024
#: Default bound on the class definitions of one stream (a Java stream defines each class it
#: writes once; Dubbo bodies hold a few dozen).
DEFAULT_MAX_CLASSES: Final = 4096
#: Default ceiling on the list items and map entries a stream materialises: a one-byte item
#: becomes a Python object of tens of bytes, so this bounds memory, not the input's size.
DEFAULT_MAX_ITEMS: Final = 1 << 20

_H = struct.Struct(">H").unpack_from
_h = struct.Struct(">h").unpack_from
_i = struct.Struct(">i").unpack_from
_q = struct.Struct(">q").unpack_from
_d = struct.Struct(">d").unpack_from
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# Typed containers built without running their __init__ (attributes are set after)
_new_object = _new_dict = dict.__new__
_new_list = list.__new__


def _typed_list(type_name: str, variable: bool) -> TypedList:
    lst = _new_list(TypedList)
    lst.type = type_name
    lst.variable = variable
    return lst


Reader = Callable[["Decoder", int, int], Any]
#: A class definition: ``(class name, field names)``.
ClassDef = tuple[str, tuple[str, ...]]

_TOO_DEEP = "nesting too deep for the Python stack (lower max_depth)"


#: What stands in the reference table for a container that :meth:`Decoder.skip` passed over:
#: ``(position of its tag, class definitions known there, type names known there, reference
#: number of the skipped container around it or -1)``, so a later reference to it can decode
#: it on demand. Decoded values are never tuples.
Skipped = tuple[int, int, int, int]

_T = TypeVar("_T")


class _Table(Protocol[_T]):
    """What the decoder needs of its reference, class and type tables (a list, or a replay)."""

    def append(self, item: _T, /) -> None: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> _T: ...


class _Replay(Generic[_T]):
    """A table as it stood at an earlier point of the stream: the first ``size`` entries.

    Decoding a skipped container again (when a reference needs its value) meets the same
    containers, class definitions and type names the skip recorded, in the same order, so
    appending here moves ``size`` on instead of adding entries; with ``fill``, a Skipped
    marker at that place is replaced by the value just built.
    """

    __slots__ = ("entries", "fill", "size")

    def __init__(self, entries: list[_T], size: int, fill: bool = False) -> None:
        self.entries = entries
        self.size = size
        self.fill = fill

    def append(self, item: _T, /) -> None:
        at = self.size
        if self.fill and at < len(self.entries) and type(self.entries[at]) is tuple:
            self.entries[at] = item
        self.size = at + 1

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int, /) -> _T:
        if not 0 <= index < self.size:
            raise IndexError(index)
        return self.entries[index]


class Decoder:
    """Reads Hessian 2.0 values from ``data``, starting at byte ``offset``.

    ``data`` may be ``bytes`` (read in place) or any buffer (``bytearray``, ``memoryview``),
    whose bytes from ``offset`` on are copied once. Values read in sequence share class
    definitions, type names and references (reference 0 is the first list, map or object in
    the stream). ``offset`` (readable and writable) is the position of the next value in
    ``data``; error offsets use the same scale.

    ``max_depth`` bounds the nesting of containers; ``max_length`` (at least 1024) bounds every
    declared length (string units, binary bytes, list items); ``max_refs`` bounds the lists,
    maps and objects of the stream (read or skipped) and ``max_classes`` its class definitions;
    ``max_items`` bounds the list items and map entries it builds (memory, since a one-byte
    item becomes a Python object).
    Independently of all, a length larger than the data left is an error, so nothing large is
    allocated for a short input. Reading and skipping are linear in the bytes read: a
    reference to a skipped container decodes it once (see :meth:`skip`).
    With ``java_longs=True`` Hessian longs are returned as :class:`JavaLong` (an ``int``), so
    that writing the value again keeps them longs. After a :class:`HessianError` the decoder's
    state is undefined.
    """

    __slots__ = (
        "_all",
        "_base",
        "_classes",
        "_data",
        "_depth",
        "_end",
        "_items",
        "_open",
        "_pos",
        "_readers",
        "_refs",
        "_types",
        "map_entries",
        "max_classes",
        "max_depth",
        "max_items",
        "max_length",
        "max_refs",
    )

    def __init__(
        self,
        data: bytes | bytearray | memoryview,
        offset: int = 0,
        *,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_length: int = DEFAULT_MAX_LENGTH,
        max_refs: int = DEFAULT_MAX_REFS,
        max_classes: int = DEFAULT_MAX_CLASSES,
        max_items: int = DEFAULT_MAX_ITEMS,
        java_longs: bool = False,
    ) -> None:
        if offset < 0:
            raise ValueError("offset must not be negative")
        if max_length < MIN_MAX_LENGTH:
            raise ValueError(f"max_length must be at least {MIN_MAX_LENGTH}")
        if type(data) is bytes:
            self._data: bytes = data
            self._base = 0
            self._pos = offset
        else:
            mv = memoryview(data)
            if mv.format != "B" or mv.ndim != 1:
                mv = mv.cast("B")
            self._data = bytes(mv[offset:])
            self._base = offset
            self._pos = 0
        self._end = len(self._data)
        if self._pos > self._end:
            raise ValueError("offset is beyond the data")
        refs: list[Any] = []
        classes: list[ClassDef] = []
        types: list[str] = []
        #: The tables themselves; a decoder replaying a skipped container sees prefixes of them.
        self._all = (refs, classes, types)
        self._refs: _Table[Any] = refs
        self._classes: _Table[ClassDef] = classes
        self._types: _Table[str] = types
        #: Reference number of the innermost container being skipped (-1: none).
        self._open = -1
        self._depth = 0
        self.max_depth = max_depth
        self.max_length = max_length
        self.max_refs = max_refs
        self.max_classes = max_classes
        self.max_items = max_items
        #: Items left to build before ``max_items`` is reached.
        self._items = max_items
        #: Entries on the wire of the last map read to its end (a key that came twice counts
        #: twice, unlike the dict's length): a map read last ends after the maps inside it.
        self.map_entries = 0
        self._readers = _READERS_JAVA_LONGS if java_longs else _READERS

    # -- position -------------------------------------------------------------------------

    @property
    def offset(self) -> int:
        """Position of the next value, as an offset into the ``data`` given."""
        return self._base + self._pos

    @offset.setter
    def offset(self, value: int) -> None:
        pos = value - self._base
        if not 0 <= pos <= self._end:
            raise ValueError(f"offset {value} is outside the data")
        self._pos = pos

    @property
    def at_end(self) -> bool:
        """True when no bytes are left to read."""
        return self._pos >= self._end

    @property
    def ref_count(self) -> int:
        """How many lists, maps and objects (reference targets) the stream has held so far."""
        return len(self._refs)

    @property
    def class_defs(self) -> list[ClassDef]:
        """The class definitions read so far: ``(class name, field names)``, in order."""
        return [self._classes[i] for i in range(len(self._classes))]

    @property
    def type_names(self) -> list[str]:
        """The type names (of typed lists and maps) read so far, in order."""
        return [self._types[i] for i in range(len(self._types))]

    # -- reading --------------------------------------------------------------------------

    def read(self) -> Any:
        """Decode the next value and return it (see the module docs for the type mapping)."""
        try:
            return self._read()
        except RecursionError:
            raise self._error(_TOO_DEEP, self._pos) from None

    def _read(self) -> Any:
        pos = self._pos
        if pos >= self._end:
            raise self._error("truncated: expected a value", pos)
        data = self._data
        tag = data[pos]
        if tag <= 0x1F:  # compact string: the most common value; ASCII needs no UTF-8 walk
            end = pos + 1 + tag
            if end <= self._end:
                raw = data[pos + 1 : end]
                if raw.isascii():
                    self._pos = end
                    return raw.decode()
        elif 0x80 <= tag <= 0xBF:  # compact int
            self._pos = pos + 1
            return tag - 0x90
        return self._readers[tag](self, tag, pos + 1)

    def read_string(self) -> str | None:
        """Decode the next value, which must be a string (or null, returned as ``None``).

        Faster than :meth:`read` for the compact ASCII strings that dominate RPC headers.
        """
        data = self._data
        pos = self._pos
        if pos >= self._end:
            raise self._error("truncated: expected a string", pos)
        tag = data[pos]
        if tag <= 0x1F:
            end = pos + 1 + tag
            if end <= self._end:
                raw = data[pos + 1 : end]
                if raw.isascii():
                    self._pos = end
                    return raw.decode()
            return _string_body(self, pos + 1, tag, pos)
        if 0x30 <= tag <= 0x33 or tag == T.STRING or tag == T.STRING_CHUNK or tag == T.NULL:
            return _READERS[tag](self, tag, pos + 1)  # type: ignore[no-any-return]
        raise self._error(f"expected a string, found tag 0x{tag:02x}", pos)

    def read_int(self) -> int:
        """Decode the next value, which must be an int or a long, and return it."""
        pos = self._pos
        if pos >= self._end:
            raise self._error("truncated: expected an int", pos)
        tag = self._data[pos]
        if _IS_INT[tag]:
            return self._readers[tag](self, tag, pos + 1)  # type: ignore[no-any-return]
        raise self._error(f"expected an int, found tag 0x{tag:02x}", pos)

    def skip(self) -> None:
        """Advance over the next value without building it.

        Class definitions and type names met on the way are recorded and every skipped list,
        map and object takes its reference number, so later values decode correctly; a later
        reference to a skipped container decodes it then. String bytes are not validated.
        """
        try:
            self._skip()
        except RecursionError:
            raise self._error(_TOO_DEEP, self._pos) from None

    def _skip(self) -> None:
        pos = self._pos
        end = self._end
        if pos >= end:
            raise self._error("truncated: expected a value", pos)
        data = self._data
        tag = data[pos]
        width = _WIDTH[tag]
        if width:  # fixed-width value: skip by arithmetic
            pos += width
            if pos > end:
                raise self._error("truncated value", self._pos)
            self._pos = pos
            return
        if tag <= 0x1F:  # compact ASCII string
            stop = pos + 1 + tag
            if stop <= end and data[pos + 1 : stop].isascii():
                self._pos = stop
                return
        _SKIPPERS[tag](self, tag, pos + 1)

    # -- helpers --------------------------------------------------------------------------

    def _error(self, reason: str, pos: int) -> HessianError:
        return HessianError(reason, offset=self._base + pos)

    def _enter(self, pos: int) -> None:
        """Count one more level of nesting (callers may inline the increment)."""
        if self._depth <= self.max_depth:
            self._depth += 1
        if self._depth > self.max_depth:
            raise self._error(f"nesting deeper than max_depth={self.max_depth}", pos)

    def _length(self, n: int, what: str, pos: int, unit_bytes: int = 1) -> None:
        """Refuse a declared length above max_length or beyond the data left."""
        if n > self.max_length:
            raise self._error(f"{what} length {n} exceeds max_length={self.max_length}", pos)
        if n < 0:
            raise self._error(f"negative {what} length {n}", pos)
        if n * unit_bytes > self._end - self._pos:
            raise self._error(f"truncated {what}: declared length {n} exceeds the data left", pos)

    def _read_length(self, what: str) -> int:
        """Read an int-valued length, class index or reference number."""
        pos = self._pos
        if pos >= self._end:
            raise self._error(f"truncated: expected {what}", pos)
        tag = self._data[pos]
        if not _IS_INT[tag]:
            raise self._error(f"expected an int for {what}, found tag 0x{tag:02x}", pos)
        return _READERS[tag](self, tag, pos + 1)  # type: ignore[no-any-return]

    def _read_type(self) -> str:
        """Read the type of a typed list or map: a new type name or a type reference."""
        pos = self._pos
        if pos >= self._end:
            raise self._error("truncated: expected a type", pos)
        tag = self._data[pos]
        if _IS_STRING[tag]:
            name: str = _READERS[tag](self, tag, pos + 1)
            self._types.append(name)
            return name
        if _IS_INT[tag]:
            idx: int = _READERS[tag](self, tag, pos + 1)
            if not 0 <= idx < len(self._types):
                raise self._error(f"bad type reference {idx}", pos)
            return self._types[idx]
        raise self._error(f"expected a type name or reference, found tag 0x{tag:02x}", pos)

    def _too_many_items(self, pos: int) -> HessianError:
        return self._error(
            f"more than max_items={self.max_items} list items and map entries in one stream", pos
        )

    def _too_many_refs(self, pos: int) -> HessianError:
        return self._error(
            f"more than max_refs={self.max_refs} lists, maps and objects in one stream", pos
        )

    def _resolve(self, idx: int) -> Any:
        """The value of skipped container ``idx``, decoded now that a reference needs it.

        The outermost skipped container around it is decoded, which gives every container
        inside it its value in the same pass: each skipped byte is decoded at most once, however
        many references point into it and in whatever order.
        """
        refs, classes, types = self._all
        top = idx
        while (parent := refs[top][3]) >= 0 and type(refs[parent]) is tuple:
            top = parent
        pos, n_classes, n_types, _ = refs[top]
        sub = Decoder(self._data)  # then given this decoder's state, as a replay of it
        sub._base = self._base
        sub._end = self._end
        sub._pos = pos
        sub._all = self._all
        sub._refs = _Replay(refs, top, fill=True)
        sub._classes = _Replay(classes, n_classes)
        sub._types = _Replay(types, n_types)
        sub._open = -1
        sub._depth = self._depth
        sub.max_depth = self.max_depth
        sub.max_length = self.max_length
        sub.max_refs = self.max_refs
        sub.max_classes = self.max_classes
        sub.max_items = self.max_items
        sub._items = self._items
        sub._readers = self._readers
        sub._read()
        self._items = sub._items
        value = refs[idx]
        if type(value) is tuple:  # pragma: no cover - the replay meets what the skip met
            raise self._error(f"reference {idx} could not be decoded", pos)
        return value


def loads(
    data: bytes | bytearray | memoryview,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_refs: int = DEFAULT_MAX_REFS,
    max_classes: int = DEFAULT_MAX_CLASSES,
    max_items: int = DEFAULT_MAX_ITEMS,
    java_longs: bool = False,
) -> Any:
    """Decode exactly one value that fills ``data``; trailing bytes are an error.

    The options are those of :class:`Decoder`.
    """
    d = Decoder(
        data,
        max_depth=max_depth,
        max_length=max_length,
        max_refs=max_refs,
        max_classes=max_classes,
        max_items=max_items,
        java_longs=java_longs,
    )
    value = d.read()
    if not d.at_end:
        raise HessianError("trailing bytes after the value", offset=d.offset)
    return value


# -- readers: (decoder, tag, position after the tag) -> value; they set decoder._pos ---------


def _r_unknown(d: Decoder, tag: int, pos: int) -> Any:
    if tag == T.END:
        raise d._error("unexpected end-of-container tag 'Z'", pos - 1)
    raise d._error(f"unknown tag 0x{tag:02x}", pos - 1)


def _r_null(d: Decoder, tag: int, pos: int) -> None:
    d._pos = pos


def _r_true(d: Decoder, tag: int, pos: int) -> bool:
    d._pos = pos
    return True


def _r_false(d: Decoder, tag: int, pos: int) -> bool:
    d._pos = pos
    return False


def _truncated(d: Decoder, what: str, pos: int) -> HessianError:
    return d._error(f"truncated {what}", pos - 1)


def _r_int1(d: Decoder, tag: int, pos: int) -> int:
    d._pos = pos
    return tag - 0x90


def _r_int2(d: Decoder, tag: int, pos: int) -> int:
    if pos + 1 > d._end:
        raise _truncated(d, "int", pos)
    d._pos = pos + 1
    return ((tag - 0xC8) << 8) + d._data[pos]


def _r_int3(d: Decoder, tag: int, pos: int) -> int:
    if pos + 2 > d._end:
        raise _truncated(d, "int", pos)
    d._pos = pos + 2
    data = d._data
    return ((tag - 0xD4) << 16) + (data[pos] << 8) + data[pos + 1]


def _r_int4(d: Decoder, tag: int, pos: int) -> int:
    if pos + 4 > d._end:
        raise _truncated(d, "int", pos)
    d._pos = pos + 4
    return _i(d._data, pos)[0]  # type: ignore[no-any-return]


def _r_long1(d: Decoder, tag: int, pos: int) -> int:
    d._pos = pos
    return tag - 0xE0


def _r_long2(d: Decoder, tag: int, pos: int) -> int:
    if pos + 1 > d._end:
        raise _truncated(d, "long", pos)
    d._pos = pos + 1
    return ((tag - 0xF8) << 8) + d._data[pos]


def _r_long3(d: Decoder, tag: int, pos: int) -> int:
    if pos + 2 > d._end:
        raise _truncated(d, "long", pos)
    d._pos = pos + 2
    data = d._data
    return ((tag - 0x3C) << 16) + (data[pos] << 8) + data[pos + 1]


def _r_long8(d: Decoder, tag: int, pos: int) -> int:
    if pos + 8 > d._end:
        raise _truncated(d, "long", pos)
    d._pos = pos + 8
    return _q(d._data, pos)[0]  # type: ignore[no-any-return]


def _r_double0(d: Decoder, tag: int, pos: int) -> float:
    d._pos = pos
    return 0.0


def _r_double1(d: Decoder, tag: int, pos: int) -> float:
    d._pos = pos
    return 1.0


def _r_double_byte(d: Decoder, tag: int, pos: int) -> float:
    if pos + 1 > d._end:
        raise _truncated(d, "double", pos)
    d._pos = pos + 1
    b = d._data[pos]
    return float(b - 256 if b > 127 else b)


def _r_double_short(d: Decoder, tag: int, pos: int) -> float:
    if pos + 2 > d._end:
        raise _truncated(d, "double", pos)
    d._pos = pos + 2
    return float(_h(d._data, pos)[0])


def _r_double_mill(d: Decoder, tag: int, pos: int) -> float:
    if pos + 4 > d._end:
        raise _truncated(d, "double", pos)
    d._pos = pos + 4
    # Caucho writes and reads 0x5f as an int32 count of thousandths; computed as Java does.
    return 0.001 * _i(d._data, pos)[0]  # type: ignore[no-any-return]


def _r_double(d: Decoder, tag: int, pos: int) -> float:
    if pos + 8 > d._end:
        raise _truncated(d, "double", pos)
    d._pos = pos + 8
    return _d(d._data, pos)[0]  # type: ignore[no-any-return]


def _date(d: Decoder, ms: int, pos: int) -> datetime:
    try:
        return _EPOCH + timedelta(milliseconds=ms)
    except OverflowError:
        raise d._error(f"date {ms} ms since the epoch is outside Python's range", pos) from None


def _r_date(d: Decoder, tag: int, pos: int) -> datetime:
    if pos + 8 > d._end:
        raise _truncated(d, "date", pos)
    d._pos = pos + 8
    return _date(d, _q(d._data, pos)[0], pos - 1)


def _r_date_minute(d: Decoder, tag: int, pos: int) -> datetime:
    if pos + 4 > d._end:
        raise _truncated(d, "date", pos)
    d._pos = pos + 4
    return _date(d, _i(d._data, pos)[0] * 60000, pos - 1)


# strings


def _units(d: Decoder, pos: int, n: int, tag_pos: int) -> str:
    """Read ``n`` UTF-16 units at ``pos`` as a str of units (surrogates not joined)."""
    end = pos + n
    if end > d._end:
        raise d._error(f"truncated string: declared length {n} exceeds the data left", tag_pos)
    data = d._data
    raw = data[pos:end]
    if raw.isascii():
        d._pos = end
        return raw.decode()
    end = units_end(data, pos, n, d._end)
    if end < 0:
        raise d._error(f"truncated string: declared length {n} exceeds the data left", tag_pos)
    s = decode_units(data[pos:end], n)
    if s is None:
        raise d._error("bad UTF-8 in string", pos)
    d._pos = end
    return s


def _string_body(d: Decoder, pos: int, n: int, tag_pos: int) -> str:
    return join_pairs(_units(d, pos, n, tag_pos))


def _r_str_direct(d: Decoder, tag: int, pos: int) -> str:
    end = pos + tag
    if end <= d._end:
        raw = d._data[pos:end]
        if raw.isascii():
            d._pos = end
            return raw.decode()
    return _string_body(d, pos, tag, pos - 1)


def _r_str_short(d: Decoder, tag: int, pos: int) -> str:
    if pos + 1 > d._end:
        raise _truncated(d, "string length", pos)
    n = ((tag - 0x30) << 8) + d._data[pos]
    return _string_body(d, pos + 1, n, pos - 1)


def _r_str_chunked(d: Decoder, tag: int, pos: int) -> str:
    """'S' (one final chunk) or 'R' (chunks until a final one)."""
    tag_pos = pos - 1
    data = d._data
    parts: list[str] = []
    total = 0
    while True:
        if tag == T.STRING or tag == T.STRING_CHUNK:
            if pos + 2 > d._end:
                raise d._error("truncated string length", pos - 1)
            n = _H(data, pos)[0]
            pos += 2
        elif tag <= 0x1F:
            n = tag
        elif 0x30 <= tag <= 0x33:
            if pos + 1 > d._end:
                raise d._error("truncated string length", pos - 1)
            n = ((tag - 0x30) << 8) + data[pos]
            pos += 1
        else:
            raise d._error(f"expected a string chunk, found tag 0x{tag:02x}", pos - 1)
        total += n
        if total > d.max_length:
            raise d._error(f"string length {total} exceeds max_length={d.max_length}", tag_pos)
        parts.append(_units(d, pos, n, tag_pos))
        if tag != T.STRING_CHUNK:
            break
        pos = d._pos
        if pos >= d._end:
            raise d._error("truncated chunked string", tag_pos)
        tag = data[pos]
        pos += 1
    return join_pairs(parts[0] if len(parts) == 1 else "".join(parts))


# binary


def _bytes(d: Decoder, pos: int, n: int, tag_pos: int) -> bytes:
    end = pos + n
    if end > d._end:
        raise d._error(f"truncated binary: declared length {n} exceeds the data left", tag_pos)
    d._pos = end
    return d._data[pos:end]


def _r_bin_direct(d: Decoder, tag: int, pos: int) -> bytes:
    return _bytes(d, pos, tag - 0x20, pos - 1)


def _r_bin_short(d: Decoder, tag: int, pos: int) -> bytes:
    if pos + 1 > d._end:
        raise _truncated(d, "binary length", pos)
    return _bytes(d, pos + 1, ((tag - 0x34) << 8) + d._data[pos], pos - 1)


def _r_bin_chunked(d: Decoder, tag: int, pos: int) -> bytes:
    tag_pos = pos - 1
    data = d._data
    parts: list[bytes] = []
    total = 0
    while True:
        if tag == T.BINARY or tag == T.BINARY_CHUNK:
            if pos + 2 > d._end:
                raise d._error("truncated binary length", pos - 1)
            n = _H(data, pos)[0]
            pos += 2
        elif 0x20 <= tag <= 0x2F:
            n = tag - 0x20
        elif 0x34 <= tag <= 0x37:
            if pos + 1 > d._end:
                raise d._error("truncated binary length", pos - 1)
            n = ((tag - 0x34) << 8) + data[pos]
            pos += 1
        else:
            raise d._error(f"expected a binary chunk, found tag 0x{tag:02x}", pos - 1)
        total += n
        if total > d.max_length:
            raise d._error(f"binary length {total} exceeds max_length={d.max_length}", tag_pos)
        parts.append(_bytes(d, pos, n, tag_pos))
        if tag != T.BINARY_CHUNK:
            break
        pos = d._pos
        if pos >= d._end:
            raise d._error("truncated chunked binary", tag_pos)
        tag = data[pos]
        pos += 1
    return parts[0] if len(parts) == 1 else b"".join(parts)


# lists


def _fill_fixed(d: Decoder, lst: list[Any], n: int, tag_pos: int) -> list[Any]:
    if n > d._end - d._pos or n > d.max_length or n < 0:
        d._length(n, "list", tag_pos)
    d._items -= n
    if d._items < 0:
        raise d._too_many_items(tag_pos)
    refs = d._refs
    if len(refs) >= d.max_refs:
        raise d._too_many_refs(tag_pos)
    refs.append(lst)
    d._depth += 1
    if d._depth > d.max_depth:
        d._enter(tag_pos)
    read = d._read
    append = lst.append
    data = d._data
    end = d._end
    pos = d._pos
    for _ in range(n):
        # compact ASCII strings inline (the common item); anything else through read()
        if pos < end:
            tag = data[pos]
            if tag <= 0x1F:
                stop = pos + 1 + tag
                if stop <= end:
                    raw = data[pos + 1 : stop]
                    if raw.isascii():
                        append(raw.decode())
                        pos = stop
                        continue
        d._pos = pos
        append(read())
        pos = d._pos
    d._pos = pos
    d._depth -= 1
    return lst


def _fill_variable(d: Decoder, lst: list[Any], tag_pos: int) -> list[Any]:
    refs = d._refs
    if len(refs) >= d.max_refs:
        raise d._too_many_refs(tag_pos)
    refs.append(lst)
    d._enter(tag_pos)
    read = d._read
    append = lst.append
    data = d._data
    end = d._end
    while True:
        pos = d._pos
        if pos >= end:
            raise d._error("truncated list: missing 'Z'", tag_pos)
        if data[pos] == T.END:
            d._pos = pos + 1
            break
        d._items -= 1
        if d._items < 0:
            raise d._too_many_items(tag_pos)
        append(read())
    d._depth -= 1
    return lst


def _r_list_direct_untyped(d: Decoder, tag: int, pos: int) -> list[Any]:
    d._pos = pos
    return _fill_fixed(d, [], tag - T.LIST_DIRECT_UNTYPED, pos - 1)


def _r_list_direct(d: Decoder, tag: int, pos: int) -> list[Any]:
    d._pos = pos
    lst = _typed_list(d._read_type(), False)
    return _fill_fixed(d, lst, tag - T.LIST_DIRECT, pos - 1)


def _r_list_fixed_untyped(d: Decoder, tag: int, pos: int) -> list[Any]:
    d._pos = pos
    n = d._read_length("a list length")
    return _fill_fixed(d, [], n, pos - 1)


def _r_list_fixed(d: Decoder, tag: int, pos: int) -> list[Any]:
    d._pos = pos
    lst = _typed_list(d._read_type(), False)
    n = d._read_length("a list length")
    return _fill_fixed(d, lst, n, pos - 1)


def _r_list_variable_untyped(d: Decoder, tag: int, pos: int) -> list[Any]:
    d._pos = pos
    return _fill_variable(d, [], pos - 1)


def _r_list_variable(d: Decoder, tag: int, pos: int) -> list[Any]:
    d._pos = pos
    lst = _typed_list(d._read_type(), True)
    return _fill_variable(d, lst, pos - 1)


# maps


def _fill_map(d: Decoder, m: dict[Any, Any], tag_pos: int) -> dict[Any, Any]:
    refs = d._refs
    if len(refs) >= d.max_refs:
        raise d._too_many_refs(tag_pos)
    refs.append(m)
    d._depth += 1
    if d._depth > d.max_depth:
        d._enter(tag_pos)
    read = d._read
    data = d._data
    end = d._end
    pos = d._pos
    entries = 0
    while True:
        if pos >= end:
            raise d._error("truncated map: missing 'Z'", tag_pos)
        tag = data[pos]
        if tag == T.END:
            d._pos = pos + 1
            break
        entries += 1
        d._items -= 1
        if d._items < 0:
            raise d._too_many_items(tag_pos)
        entry = pos
        # compact ASCII strings inline (string-to-string maps dominate); else read()
        if (
            tag <= 0x1F
            and (stop := pos + 1 + tag) <= end
            and (raw := data[pos + 1 : stop]).isascii()
        ):
            key: Any = raw.decode()
            pos = stop
        else:
            d._pos = pos
            key = read()
            pos = d._pos
        if (
            pos < end
            and (tag := data[pos]) <= 0x1F
            and (stop := pos + 1 + tag) <= end
            and (raw := data[pos + 1 : stop]).isascii()
        ):
            value: Any = raw.decode()
            pos = stop
        else:
            d._pos = pos
            value = read()
            pos = d._pos
        try:
            m[key] = value
        except TypeError:
            raise d._error(
                f"map key of type {type(key).__name__} is not hashable in Python", entry
            ) from None
    d._depth -= 1
    d.map_entries = entries
    return m


def _r_map_untyped(d: Decoder, tag: int, pos: int) -> dict[Any, Any]:
    d._pos = pos
    return _fill_map(d, {}, pos - 1)


def _r_map(d: Decoder, tag: int, pos: int) -> dict[Any, Any]:
    d._pos = pos
    m = _new_dict(TypedMap)
    m.type = d._read_type()
    return _fill_map(d, m, pos - 1)


# class definitions and objects


def read_class_def(d: Decoder, pos: int) -> None:
    """Read one class definition whose body starts at ``pos`` and record it.

    Parsed every time: a cache of definitions by their bytes saved about 1 us per definition,
    not worth bytes kept from the wire. The usual form (compact ASCII names, a compact field
    count) is read inline.
    """
    tag_pos = pos - 1
    if len(d._classes) >= d.max_classes:
        raise d._error(f"more than max_classes={d.max_classes} class definitions", tag_pos)
    data = d._data
    end = d._end
    if (
        pos < end
        and (tag := data[pos]) <= 0x1F
        and (stop := pos + 1 + tag) < end
        and (raw := data[pos + 1 : stop]).isascii()
        and 0x90 <= (count := data[stop]) <= 0xBF
    ):
        name = raw.decode()
        n = count - 0x90
        pos = stop + 1
    else:
        d._pos = pos
        read = d.read_string()
        if read is None:
            raise d._error("class definition without a class name", tag_pos)
        name = read
        n = d._read_length("a field count")
        d._length(n, "field list", tag_pos)
        pos = d._pos
    fields: list[str] = []
    append = fields.append
    for _ in range(n):
        if pos < end and (tag := data[pos]) <= 0x1F:
            stop = pos + 1 + tag
            if stop <= end and (raw := data[pos + 1 : stop]).isascii():
                append(raw.decode())
                pos = stop
                continue
        d._pos = pos
        field = d.read_string()
        if field is None:
            raise d._error("class definition with a null field name", tag_pos)
        append(field)
        pos = d._pos
    d._pos = pos
    d._classes.append((name, tuple(fields)))


def _r_class_def(d: Decoder, tag: int, pos: int) -> Any:
    read_class_def(d, pos)
    # A definition is not a value: the value follows it (possibly after more definitions).
    data = d._data
    while True:
        pos = d._pos
        if pos >= d._end:
            raise d._error("truncated: expected an object after its class definition", pos)
        tag = data[pos]
        if tag != T.CLASS_DEF:
            return d._readers[tag](d, tag, pos + 1)
        read_class_def(d, pos + 1)


def _object(d: Decoder, idx: int, tag_pos: int) -> JavaObject:
    try:
        name, fields = d._classes[idx]
    except IndexError:
        raise d._error(f"bad class reference {idx}", tag_pos) from None
    refs = d._refs
    if len(refs) >= d.max_refs:
        raise d._too_many_refs(tag_pos)
    obj = _new_object(JavaObject)
    obj.type = name
    refs.append(obj)
    d._depth += 1
    if d._depth > d.max_depth:
        d._enter(tag_pos)
    read = d._read
    data = d._data
    end = d._end
    pos = d._pos
    for field in fields:
        # compact ASCII strings inline; anything else through read()
        if pos < end:
            tag = data[pos]
            if tag <= 0x1F:
                stop = pos + 1 + tag
                if stop <= end:
                    raw = data[pos + 1 : stop]
                    if raw.isascii():
                        obj[field] = raw.decode()
                        pos = stop
                        continue
        d._pos = pos
        obj[field] = read()
        pos = d._pos
    d._pos = pos
    d._depth -= 1
    return obj


def _r_object_direct(d: Decoder, tag: int, pos: int) -> JavaObject:
    d._pos = pos
    return _object(d, tag - T.OBJECT_DIRECT, pos - 1)


def _r_object(d: Decoder, tag: int, pos: int) -> JavaObject:
    d._pos = pos
    idx = d._read_length("a class reference")
    if idx < 0:
        raise d._error(f"bad class reference {idx}", pos - 1)
    return _object(d, idx, pos - 1)


def _r_ref(d: Decoder, tag: int, pos: int) -> Any:
    d._pos = pos
    idx = d._read_length("a reference")
    refs = d._refs
    if not 0 <= idx < len(refs):
        raise d._error(f"bad reference {idx}: {len(refs)} containers so far", pos - 1)
    value = refs[idx]
    if type(value) is tuple:
        return d._resolve(idx)
    return value


def _table() -> tuple[list[Reader], list[bool], list[bool]]:
    readers: list[Reader] = [_r_unknown] * 256
    is_int = [False] * 256
    is_string = [False] * 256

    def put(lo: int, hi: int, fn: Reader) -> None:
        for t in range(lo, hi + 1):
            readers[t] = fn

    put(0x00, 0x1F, _r_str_direct)
    put(0x20, 0x2F, _r_bin_direct)
    put(0x30, 0x33, _r_str_short)
    put(0x34, 0x37, _r_bin_short)
    put(0x38, 0x3F, _r_long3)
    put(T.BINARY_CHUNK, T.BINARY_CHUNK, _r_bin_chunked)
    put(T.BINARY, T.BINARY, _r_bin_chunked)
    put(T.CLASS_DEF, T.CLASS_DEF, _r_class_def)
    put(T.DOUBLE, T.DOUBLE, _r_double)
    put(T.FALSE, T.FALSE, _r_false)
    put(T.MAP_UNTYPED, T.MAP_UNTYPED, _r_map_untyped)
    put(T.INT, T.INT, _r_int4)
    put(T.DATE, T.DATE, _r_date)
    put(T.DATE_MINUTE, T.DATE_MINUTE, _r_date_minute)
    put(T.LONG, T.LONG, _r_long8)
    put(T.MAP, T.MAP, _r_map)
    put(T.NULL, T.NULL, _r_null)
    put(T.OBJECT, T.OBJECT, _r_object)
    put(T.REF, T.REF, _r_ref)
    put(T.STRING_CHUNK, T.STRING_CHUNK, _r_str_chunked)
    put(T.STRING, T.STRING, _r_str_chunked)
    put(T.TRUE, T.TRUE, _r_true)
    put(T.LIST_VARIABLE, T.LIST_VARIABLE, _r_list_variable)
    put(T.LIST_FIXED, T.LIST_FIXED, _r_list_fixed)
    put(T.LIST_VARIABLE_UNTYPED, T.LIST_VARIABLE_UNTYPED, _r_list_variable_untyped)
    put(T.LIST_FIXED_UNTYPED, T.LIST_FIXED_UNTYPED, _r_list_fixed_untyped)
    put(T.LONG_INT, T.LONG_INT, _r_int4)
    put(T.DOUBLE_ZERO, T.DOUBLE_ZERO, _r_double0)
    put(T.DOUBLE_ONE, T.DOUBLE_ONE, _r_double1)
    put(T.DOUBLE_BYTE, T.DOUBLE_BYTE, _r_double_byte)
    put(T.DOUBLE_SHORT, T.DOUBLE_SHORT, _r_double_short)
    put(T.DOUBLE_MILL, T.DOUBLE_MILL, _r_double_mill)
    put(0x60, 0x6F, _r_object_direct)
    put(0x70, 0x77, _r_list_direct)
    put(0x78, 0x7F, _r_list_direct_untyped)
    put(0x80, 0xBF, _r_int1)
    put(0xC0, 0xCF, _r_int2)
    put(0xD0, 0xD7, _r_int3)
    put(0xD8, 0xEF, _r_long1)
    put(0xF0, 0xFF, _r_long2)

    for t in (*range(0x38, 0x40), T.INT, T.LONG, T.LONG_INT, *range(0x80, 0x100)):
        is_int[t] = True
    for t in (*range(0x00, 0x20), *range(0x30, 0x34), T.STRING, T.STRING_CHUNK):
        is_string[t] = True
    return readers, is_int, is_string


_READERS, _IS_INT, _IS_STRING = _table()


def _widths() -> list[int]:
    """Total size in bytes of each fixed-width value by tag (0: variable or not a value)."""
    w = [0] * 256
    for lo, hi, n in (
        (0x80, 0xBF, 1), (0xC0, 0xCF, 2), (0xD0, 0xD7, 3), (0xD8, 0xEF, 1), (0xF0, 0xFF, 2),
        (0x38, 0x3F, 3), (T.INT, T.INT, 5), (T.LONG, T.LONG, 9), (T.LONG_INT, T.LONG_INT, 5),
        (T.DOUBLE, T.DOUBLE, 9), (T.DOUBLE_ZERO, T.DOUBLE_ONE, 1),
        (T.DOUBLE_BYTE, T.DOUBLE_BYTE, 2), (T.DOUBLE_SHORT, T.DOUBLE_SHORT, 3),
        (T.DOUBLE_MILL, T.DOUBLE_MILL, 5),
        (T.DATE, T.DATE, 9), (T.DATE_MINUTE, T.DATE_MINUTE, 5), (T.NULL, T.NULL, 1),
        (T.TRUE, T.TRUE, 1), (T.FALSE, T.FALSE, 1), (0x20, 0x20, 1),
    ):  # fmt: skip
        for t in range(lo, hi + 1):
            w[t] = n
    return w


_WIDTH = _widths()


def _java_long(fn: Reader) -> Reader:
    def read(d: Decoder, tag: int, pos: int) -> JavaLong:
        return JavaLong(fn(d, tag, pos))

    return read


_READERS_JAVA_LONGS = list(_READERS)
for _t in (*range(0x38, 0x40), T.LONG, T.LONG_INT, *range(0xD8, 0x100)):
    _READERS_JAVA_LONGS[_t] = _java_long(_READERS[_t])

from .skip import SKIPPERS as _SKIPPERS  # noqa: E402  (skip.py needs the names above)
