"""Hessian 2.0 encoder: Python values to bytes, in the forms Caucho's Java ``Hessian2Output`` uses.

One :class:`Encoder` writes a sequence of top-level values into one stream that shares class
definitions, type names and references, as a Dubbo body does. Writers are chosen by the exact
type of the value (one dict lookup), then by ``isinstance`` for subclasses.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from . import tags as T
from .errors import HessianError
from .strings import encode_units, to_units
from .types import JavaDouble, JavaFloat, JavaInt, JavaLong, JavaObject, TypedList, TypedMap

if TYPE_CHECKING:
    from .decoder import Decoder

_pack_H = struct.Struct(">H").pack
_pack_I = struct.Struct(">I").pack
_pack_i = struct.Struct(">i").pack
_pack_q = struct.Struct(">q").pack
_pack_d = struct.Struct(">d").pack
_pack_bH = struct.Struct(">BH").pack
_pack_bi = struct.Struct(">Bi").pack
_pack_bq = struct.Struct(">Bq").pack
_pack_bd = struct.Struct(">Bd").pack
_pack_bb = struct.Struct(">Bb").pack
_pack_bh = struct.Struct(">Bh").pack
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_INT_MIN = -0x80000000
_INT_MAX = 0x7FFFFFFF
_LONG_MIN = -0x8000000000000000
_LONG_MAX = 0x7FFFFFFFFFFFFFFF

Writer = Callable[["Encoder", Any], None]


class Encoder:
    """Writes Hessian 2.0 values into one stream; :meth:`getvalue` returns the bytes so far.

    Values written in sequence share class definitions, type names and references, so the
    same list, dict or object written twice (or inside itself) becomes a reference, as Java's
    ``Hessian2Output`` does. See the module docs for the Python-to-Java type mapping.
    """

    __slots__ = ("_buf", "_classes", "_keep", "_next_ref", "_refs", "_types")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._refs: dict[int, int] = {}
        self._keep: list[Any] = []  # keeps written containers alive so their ids stay unique
        self._next_ref = 0
        self._classes: dict[tuple[str, tuple[str, ...]], int] = {}
        self._types: dict[str, int] = {}

    @classmethod
    def following(cls, decoder: Decoder) -> Encoder:
        """An encoder that continues the stream ``decoder`` has read so far.

        Class definitions and type names the decoder has seen are reused (by index) and new
        references are numbered after the decoder's, so the bytes written can be appended to
        the decoded bytes (for example, rewritten Dubbo attachments after the arguments).
        """
        e = cls()
        for i, key in enumerate(decoder.class_defs):
            e._classes.setdefault(key, i)
        for i, name in enumerate(decoder.type_names):
            e._types.setdefault(name, i)
        e._next_ref = decoder.ref_count
        return e

    def getvalue(self) -> bytes:
        """The bytes written so far."""
        return bytes(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    def reset_references(self) -> None:
        """Forget written containers, so none of them is written as a reference again."""
        self._refs.clear()
        self._keep.clear()
        self._next_ref = 0

    def write(self, value: Any) -> None:
        """Write one value (see the module docs for the type mapping)."""
        try:
            self._write(value)
        except RecursionError:
            raise HessianError("value nested too deeply to encode") from None

    def _write(self, value: Any) -> None:
        fn = _WRITERS.get(type(value))
        if fn is None:
            fn = _writer_for(value)
        fn(self, value)

    # -- explicit writers -----------------------------------------------------------------

    def write_null(self) -> None:
        """Write null."""
        self._buf.append(T.NULL)

    def write_bool(self, value: bool) -> None:
        """Write a boolean."""
        self._buf.append(T.TRUE if value else T.FALSE)

    def write_int(self, value: int) -> None:
        """Write a Java int (32-bit) in its most compact form."""
        if not _INT_MIN <= value <= _INT_MAX:
            raise HessianError(f"{value} does not fit a Java int")
        _w_int(self, value)

    def write_long(self, value: int) -> None:
        """Write a Java long (64-bit) in its most compact form."""
        _w_long(self, value)

    def write_double(self, value: float) -> None:
        """Write a double in the most compact form Java uses."""
        _w_double(self, value)

    def write_string(self, value: str | None) -> None:
        """Write a string (``None`` writes null); long strings are chunked as Java does."""
        if value is None:
            self._buf.append(T.NULL)
        else:
            _w_str(self, value)

    def write_bytes(self, value: bytes | bytearray | memoryview | None) -> None:
        """Write binary data (``None`` writes null); chunked above 0x8000 bytes."""
        if value is None:
            self._buf.append(T.NULL)
        else:
            _w_bytes(self, value)

    def write_date(self, value: datetime) -> None:
        """Write a date (naive datetimes are taken as UTC; sub-millisecond parts dropped)."""
        _w_date(self, value)

    # -- shared pieces --------------------------------------------------------------------

    def _ref(self, value: Any) -> bool:
        """Write a reference if ``value`` was written before; else number it and say False."""
        key = id(value)
        idx = self._refs.get(key)
        if idx is not None:
            self._buf.append(T.REF)
            _w_int(self, idx)
            return True
        self._refs[key] = self._next_ref
        self._next_ref += 1
        self._keep.append(value)
        return False

    def _type(self, name: str) -> None:
        if type(name) is not str or not name:
            raise HessianError(f"a Java type name must be a non-empty str, not {name!r}")
        idx = self._types.get(name)
        if idx is None:
            self._types[name] = len(self._types)
            _w_str(self, name)
        else:
            _w_int(self, idx)


def dumps(value: Any) -> bytes:
    """Encode one value and return its bytes."""
    e = Encoder()
    e.write(value)
    return e.getvalue()


# -- writers -------------------------------------------------------------------------------


def _w_null(e: Encoder, value: None) -> None:
    e._buf.append(T.NULL)


def _w_bool(e: Encoder, value: bool) -> None:
    e._buf.append(T.TRUE if value else T.FALSE)


def _w_int(e: Encoder, v: int) -> None:
    """Java int forms; ``v`` must fit 32 bits."""
    if -16 <= v <= 47:
        e._buf.append(0x90 + v)
    elif -2048 <= v <= 2047:
        e._buf += _pack_H(0xC800 + v)
    elif -262144 <= v <= 262143:
        e._buf += (0xD40000 + v).to_bytes(3, "big")
    else:
        e._buf += _pack_bi(T.INT, v)


def _w_long(e: Encoder, v: int) -> None:
    if -8 <= v <= 15:
        e._buf.append(0xE0 + v)
    elif -2048 <= v <= 2047:
        e._buf += _pack_H(0xF800 + v)
    elif -262144 <= v <= 262143:
        e._buf += (0x3C0000 + v).to_bytes(3, "big")
    elif _INT_MIN <= v <= _INT_MAX:
        e._buf += _pack_bi(T.LONG_INT, v)
    elif _LONG_MIN <= v <= _LONG_MAX:
        e._buf += _pack_bq(T.LONG, v)
    else:
        raise HessianError(f"{v} does not fit a Java long")


def _w_pyint(e: Encoder, v: int) -> None:
    """Plain Python int: a Java int when it fits 32 bits, else a long."""
    if -16 <= v <= 47:
        e._buf.append(0x90 + v)
    elif _INT_MIN <= v <= _INT_MAX:
        _w_int(e, v)
    else:
        _w_long(e, v)


def _w_double(e: Encoder, v: float) -> None:
    buf = e._buf
    if v.is_integer():
        if v == 0.0:
            if math.copysign(1.0, v) > 0:
                buf.append(T.DOUBLE_ZERO)
                return
            # Java writes -0.0 as 0x5b (0.0) and loses the sign; a full double keeps it.
            buf += _pack_bd(T.DOUBLE, v)
            return
        if v == 1.0:
            buf.append(T.DOUBLE_ONE)
            return
        if -0x80 <= v < 0x80:
            buf += _pack_bb(T.DOUBLE_BYTE, int(v))
            return
        if -0x8000 <= v < 0x8000:
            buf += _pack_bh(T.DOUBLE_SHORT, int(v))
            return
    elif v != v or v in (math.inf, -math.inf):
        buf += _pack_bd(T.DOUBLE, v)
        return
    # Java: int mills = (int) (value * 1000); if (0.001 * mills == value) write 0x5f mills.
    m = v * 1000.0
    if m >= _INT_MAX:
        mills = _INT_MAX
    elif m <= _INT_MIN:
        mills = _INT_MIN
    else:
        mills = int(m)
    if 0.001 * mills == v:
        buf += _pack_bi(T.DOUBLE_MILL, mills)
    else:
        buf += _pack_bd(T.DOUBLE, v)


def _str_header(buf: bytearray, n: int) -> None:
    if n <= T.STRING_DIRECT_MAX:
        buf.append(n)
    elif n <= T.STRING_SHORT_MAX:
        buf += _pack_H(0x3000 + n)
    else:
        buf += _pack_bH(T.STRING, n)


#: Encoded bytes (header included) of short strings written before. RPC streams repeat the
#: same names, keys and values, and one dict lookup beats encoding them again.
_STR_CACHE: dict[str, bytes] = {}
_STR_CACHE_MAX = 4096
_STR_CACHE_LEN = 64


def _w_str(e: Encoder, s: str) -> None:
    cached = _STR_CACHE.get(s)
    if cached is not None:
        e._buf += cached
        return
    n = len(s)
    if n <= _STR_CACHE_LEN:
        start = len(e._buf)
        _w_str_uncached(e, s)
        if len(_STR_CACHE) >= _STR_CACHE_MAX:
            _STR_CACHE.clear()
        _STR_CACHE[s] = bytes(e._buf[start:])
        return
    _w_str_uncached(e, s)


def _w_str_uncached(e: Encoder, s: str) -> None:
    buf = e._buf
    n = len(s)
    if s.isascii():
        if n <= T.STRING_DIRECT_MAX:
            buf.append(n)
            buf += s.encode()
            return
        if n <= T.CHUNK_SIZE:
            _str_header(buf, n)
            buf += s.encode()
            return
        units = s
    else:
        units = to_units(s)
        n = len(units)
    off = 0
    while n - off > T.CHUNK_SIZE:
        sub = T.CHUNK_SIZE
        # As Java: a chunk never ends on a high surrogate.
        if 0xD800 <= ord(units[off + sub - 1]) <= 0xDBFF:
            sub -= 1
        buf += _pack_bH(T.STRING_CHUNK, sub)
        buf += encode_units(units[off : off + sub])
        off += sub
    _str_header(buf, n - off)
    buf += encode_units(units[off:] if off else units)


def _w_bytes(e: Encoder, value: bytes | bytearray | memoryview) -> None:
    buf = e._buf
    data = value if isinstance(value, bytes | bytearray) else memoryview(value).cast("B")
    n = len(data)
    off = 0
    while n - off > T.CHUNK_SIZE:
        buf += _pack_bH(T.BINARY_CHUNK, T.CHUNK_SIZE)
        buf += data[off : off + T.CHUNK_SIZE]
        off += T.CHUNK_SIZE
    rest = n - off
    if rest <= T.BINARY_DIRECT_MAX:
        buf.append(T.BINARY_DIRECT + rest)
    elif rest <= T.BINARY_SHORT_MAX:
        buf += _pack_H(0x3400 + rest)
    else:
        buf += _pack_bH(T.BINARY, rest)
    buf += data[off:] if off else data


def _w_date(e: Encoder, value: datetime) -> None:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    ms = (value - _EPOCH) // _MS
    if ms % 60000 == 0 and _INT_MIN <= ms // 60000 <= _INT_MAX:
        e._buf += _pack_bi(T.DATE_MINUTE, ms // 60000)
    else:
        e._buf += _pack_bq(T.DATE, ms)


def _w_list(e: Encoder, value: list[Any] | tuple[Any, ...]) -> None:
    if e._ref(value):
        return
    n = len(value)
    if n <= T.LIST_DIRECT_MAX:
        e._buf.append(T.LIST_DIRECT_UNTYPED + n)
    else:
        e._buf.append(T.LIST_FIXED_UNTYPED)
        _w_int(e, n)
    _w_items(e, value)


def _w_items(e: Encoder, items: Iterable[Any]) -> None:
    """Write values in sequence; short strings written before come from the cache inline."""
    write = e._write
    buf = e._buf
    cache = _STR_CACHE
    for item in items:
        if type(item) is str:
            cached = cache.get(item)
            if cached is not None:
                buf += cached
                continue
        write(item)


def _w_typed_list(e: Encoder, value: TypedList) -> None:
    if e._ref(value):
        return
    buf = e._buf
    n = len(value)
    if value.variable:
        if value.type is None:
            buf.append(T.LIST_VARIABLE_UNTYPED)
        else:
            buf.append(T.LIST_VARIABLE)
            e._type(value.type)
    elif value.type is None:
        if n <= T.LIST_DIRECT_MAX:
            buf.append(T.LIST_DIRECT_UNTYPED + n)
        else:
            buf.append(T.LIST_FIXED_UNTYPED)
            _w_int(e, n)
    elif n <= T.LIST_DIRECT_MAX:
        buf.append(T.LIST_DIRECT + n)
        e._type(value.type)
    else:
        buf.append(T.LIST_FIXED)
        e._type(value.type)
        _w_int(e, n)
    _w_items(e, value)
    if value.variable:
        buf.append(T.END)


def _w_map(e: Encoder, value: dict[Any, Any]) -> None:
    if e._ref(value):
        return
    buf = e._buf
    buf.append(T.MAP_UNTYPED)
    _w_entries(e, value)
    buf.append(T.END)


def _w_entries(e: Encoder, value: dict[Any, Any]) -> None:
    """Write map entries; short strings written before come from the cache inline."""
    write = e._write
    buf = e._buf
    cache = _STR_CACHE
    for k, v in value.items():
        cached = cache.get(k) if type(k) is str else None
        if cached is not None:
            buf += cached
        else:
            write(k)
        cached = cache.get(v) if type(v) is str else None
        if cached is not None:
            buf += cached
        else:
            write(v)


def _w_typed_map(e: Encoder, value: TypedMap) -> None:
    if e._ref(value):
        return
    buf = e._buf
    if value.type is None:
        buf.append(T.MAP_UNTYPED)
    else:
        buf.append(T.MAP)
        e._type(value.type)
    _w_entries(e, value)
    buf.append(T.END)


def _w_object(e: Encoder, value: JavaObject) -> None:
    if e._ref(value):
        return
    buf = e._buf
    key = (value.type, tuple(value))
    idx = e._classes.get(key)
    if idx is None:
        idx = e._classes[key] = len(e._classes)
        buf += _class_def(key)
    if idx <= T.OBJECT_DIRECT_MAX:
        buf.append(T.OBJECT_DIRECT + idx)
    else:
        buf.append(T.OBJECT)
        _w_int(e, idx)
    _w_items(e, value.values())


def _class_def(key: tuple[str, tuple[str, ...]]) -> bytes:
    name, fields = key
    if type(name) is not str or not name:
        raise HessianError(f"a Java class name must be a non-empty str, not {name!r}")
    e = Encoder()
    e._buf.append(T.CLASS_DEF)
    _w_str_uncached(e, name)
    _w_int(e, len(fields))
    for field in fields:
        if type(field) is not str:
            raise HessianError(f"field name {field!r} of {name} is not a str")
        _w_str_uncached(e, field)
    return bytes(e._buf)


_WRITERS: dict[type, Writer] = {
    type(None): _w_null,
    bool: _w_bool,
    int: _w_pyint,
    JavaInt: _w_int,
    JavaLong: _w_long,
    float: _w_double,
    JavaDouble: _w_double,
    JavaFloat: _w_double,
    str: _w_str,
    bytes: _w_bytes,
    bytearray: _w_bytes,
    memoryview: _w_bytes,
    datetime: _w_date,
    list: _w_list,
    tuple: _w_list,
    dict: _w_map,
    TypedList: _w_typed_list,
    TypedMap: _w_typed_map,
    JavaObject: _w_object,
}

# Subclasses (IntEnum, StrEnum, OrderedDict, user types) by isinstance, most specific first.
_BY_ISINSTANCE: tuple[tuple[type, Writer], ...] = (
    (bool, _w_bool),
    (JavaInt, _w_int),
    (JavaLong, _w_long),
    (int, _w_pyint),
    (float, _w_double),
    (str, _w_str),
    (bytes, _w_bytes),
    (bytearray, _w_bytes),
    (memoryview, _w_bytes),
    (datetime, _w_date),
    (TypedList, _w_typed_list),
    (TypedMap, _w_typed_map),
    (JavaObject, _w_object),
    (list, _w_list),
    (tuple, _w_list),
    (dict, _w_map),
)


def _writer_for(value: Any) -> Writer:
    for cls, fn in _BY_ISINSTANCE:
        if isinstance(value, cls):
            return fn
    raise HessianError(
        f"cannot write a {type(value).__qualname__} as Hessian: use None, bool, int, float, "
        "str, bytes, datetime, list, tuple, dict or a hessian2 Java type"
    )
