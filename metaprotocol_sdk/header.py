"""Header DSL: declare a frame header with ``construct``, parse it at ``struct`` speed.

Codec authors write the header the way construct users already do::

    from construct import Const, Int8ub, Int32ub, Int64ub, Struct

    DUBBO_HEADER = compile_header(Struct(
        "magic" / Const(b"\\xda\\xbb"),
        "flag" / Int8ub,
        "status" / Int8ub,
        "request_id" / Int64ub,
        "body_length" / Int32ub,
    ))

    fields = DUBBO_HEADER.parse(buffer)      # None: need more data
    fields.request_id, fields.body_length

A layout of fixed-size fields (integers, floats, flags, fixed bytes, constants, padding) is
compiled to one :class:`struct.Struct` and a generated parse function. Fixed-size fields that
struct cannot express (``BitStruct``, ``Enum``, ``BytesInteger`` ...) are read as raw bytes by
the same struct and converted by construct. Layouts with variable-size fields fall back to
construct's interpreter. In every case a truncated buffer gives ``None`` ("need more data"),
never a short value; compiled construct parsers return short values on truncated input, which
is why this module does not use ``construct.compile``.
"""

from __future__ import annotations

import struct
from collections import namedtuple
from collections.abc import Callable
from typing import Any, NamedTuple

import construct as cs

from .errors import FramingError

Readable = bytes | bytearray | memoryview


class _Field(NamedTuple):
    name: str | None  # None for padding
    fmt: str  # struct code without byte order
    order: str  # "<", ">", "=" or "" (order-free)
    size: int
    const: Any  # expected value, or _NO_CONST
    convert: cs.Construct | None  # construct used to convert raw bytes, if any


_NO_CONST = object()


class HeaderLayout:
    """A compiled header declaration.

    ``size`` is the fixed header size (``None`` for variable-size layouts). ``fields`` is the
    named-tuple type :attr:`parse` returns; ``names`` its field names. ``compiled`` tells
    whether the hot path is a single ``struct.Struct``.

    ``parse(data, offset=0)`` parses the header at ``offset`` into a named tuple, or returns
    ``None`` when ``data`` is too short ("need more data"); a constant that does not match
    raises :class:`~metaprotocol_sdk.errors.FramingError` naming the field and byte offset.
    ``unpack(data, offset=0)`` does the same but returns a plain tuple (the fastest form).
    Both are generated functions bound as attributes, so a call costs what a hand-written
    ``struct.unpack_from`` with a length check costs.
    """

    #: Parse into a named tuple, or ``None`` if more data is needed.
    parse: Callable[..., Any]
    #: Parse into a plain tuple, or ``None`` if more data is needed.
    unpack: Callable[..., tuple[Any, ...] | None]

    def __init__(self, declaration: cs.Construct) -> None:
        self.declaration = declaration
        plan = _plan(declaration)
        self.compiled = plan is not None
        if plan is None:
            self.names = tuple(
                sc.name for sc in getattr(declaration, "subcons", ()) if getattr(sc, "name", None)
            )
            self.size: int | None = _static_size(declaration)
            self.struct: struct.Struct | None = None
            self.fields: Any = namedtuple("HeaderFields", self.names)  # type: ignore[misc]
            self.parse = self._parse_interpreted
            self.unpack = self._unpack_interpreted
            return
        order, items = plan
        self._items = items
        self.struct = struct.Struct(order + "".join(f.fmt for f in items))
        self.size = self.struct.size
        self.names = tuple(f.name for f in items if f.name is not None)
        self.fields = namedtuple("HeaderFields", self.names)  # type: ignore[misc]
        self.parse, self.unpack = _generate(self, items)

    # -- building -----------------------------------------------------------------------------

    def build(self, **values: Any) -> bytes:
        """Serialise the header; constants and padding are filled in automatically."""
        if self.struct is None:
            return bytes(self.declaration.build(values))
        args = []
        for item in self._items:
            if item.name is None:
                continue
            if item.name in values:
                value = values.pop(item.name)
            elif item.const is not _NO_CONST:
                value = item.const
            else:
                raise TypeError(f"header field {item.name!r} is missing")
            if item.convert is not None:
                value = bytes(item.convert.build(value))
            args.append(value)
        if values:
            raise TypeError(f"unknown header fields: {', '.join(sorted(values))}")
        return self.struct.pack(*args)

    def pack_into(self, buffer: bytearray | memoryview, offset: int, *values: Any) -> None:
        """Write raw field values (in declaration order) into ``buffer`` (compiled layouts)."""
        if self.struct is None:
            raise TypeError("pack_into needs a fixed-size, compiled layout")
        self.struct.pack_into(buffer, offset, *values)

    # -- interpreted fallback -----------------------------------------------------------------

    def _parse_interpreted(self, data: Readable, offset: int = 0) -> Any:
        raw = self._unpack_interpreted(data, offset)
        return None if raw is None else self.fields._make(raw)

    def _unpack_interpreted(self, data: Readable, offset: int = 0) -> tuple[Any, ...] | None:
        if self.size is not None and len(data) - offset < self.size:
            return None
        try:
            container = self.declaration.parse(bytes(memoryview(data)[offset:]))
        except cs.StreamError:
            return None
        except cs.ConstError as exc:
            raise FramingError(f"header constant mismatch: {exc}", offset=offset) from None
        except cs.ConstructError as exc:
            raise FramingError(f"malformed header: {exc}", offset=offset) from None
        return tuple(container[name] for name in self.names)

    def __repr__(self) -> str:
        kind = f"struct {self.struct.format!r}" if self.struct else "construct fallback"
        return f"HeaderLayout({', '.join(self.names)}; size={self.size}; {kind})"


def compile_header(declaration: cs.Construct) -> HeaderLayout:
    """Compile a construct ``Struct`` declaration into a :class:`HeaderLayout`."""
    if not isinstance(declaration, cs.Struct):
        raise TypeError("compile_header expects a construct.Struct declaration")
    return HeaderLayout(declaration)


# -- compilation ------------------------------------------------------------------------------


def _static_size(declaration: cs.Construct) -> int | None:
    try:
        return int(declaration.sizeof())
    except (cs.SizeofError, cs.ConstructError, TypeError, KeyError):
        return None


def _plan(declaration: cs.Construct) -> tuple[str, list[_Field]] | None:
    """Map each subconstruct to a struct code; ``None`` if the layout is not fixed-size."""
    items: list[_Field] = []
    for sub in declaration.subcons:
        name = sub.name if isinstance(sub, cs.Renamed) else None
        inner = sub.subcon if isinstance(sub, cs.Renamed) else sub
        item = _field(name, inner)
        if item is None:
            return None
        items.append(item)
    orders = {f.order for f in items if f.order}
    if len(orders) > 1:
        return None  # mixed byte orders: struct has one prefix per format
    order = orders.pop() if orders else ">"
    return ("=" if order == "=" else order), items


def _field(name: str | None, sub: cs.Construct) -> _Field | None:
    if isinstance(sub, cs.FormatField):
        return _Field(name, sub.fmtstr[1:], sub.fmtstr[0], sub.length, _NO_CONST, None)
    if isinstance(sub, cs.Const):
        inner = _field(name, sub.subcon)
        return None if inner is None else inner._replace(const=sub.value)
    if isinstance(sub, cs.Bytes) and isinstance(sub.length, int):
        return _Field(name, f"{sub.length}s", "", sub.length, _NO_CONST, None)
    if isinstance(sub, cs.Padded) and isinstance(sub.subcon, type(cs.Pass)):
        if not isinstance(sub.length, int):
            return None
        return _Field(None, f"{sub.length}x", "", sub.length, _NO_CONST, None)
    if sub is cs.Flag:
        return _Field(name, "?", "", 1, _NO_CONST, None)
    # Any other fixed-size construct: struct reads its raw bytes, construct converts them.
    size = _static_size(sub)
    if size is None or size == 0:
        return None
    return _Field(name, f"{size}s", "", size, _NO_CONST, sub)


def _generate(
    layout: HeaderLayout, items: list[_Field]
) -> tuple[Callable[..., Any], Callable[..., tuple[Any, ...] | None]]:
    """Generate straight-line parse functions for a compiled layout (checked, no short values)."""
    assert layout.struct is not None
    env: dict[str, Any] = {
        "_unpack_from": layout.struct.unpack_from,
        "_tuple_new": tuple.__new__,
        "_cls": layout.fields,
        "_FramingError": FramingError,
        "_len": len,
    }
    lines = []
    position = 0  # index in the struct's output tuple
    byte_offset = 0
    converted = []
    for n, item in enumerate(items):
        if item.name is None:
            byte_offset += item.size
            continue
        if item.const is not _NO_CONST:
            env[f"_const{n}"] = item.const
            env[f"_name{n}"] = item.name
            lines.append(
                f"    if v[{position}] != _const{n}:\n"
                f"        raise _FramingError(f'header field {{_name{n}!r}}: expected "
                f"{{_const{n}!r}}, got {{v[{position}]!r}}', offset=offset + {byte_offset})"
            )
        if item.convert is not None:
            env[f"_conv{n}"] = item.convert.parse
            converted.append((position, f"_conv{n}(v[{position}])"))
        position += 1
        byte_offset += item.size
    checks = "\n".join(lines)
    if converted:
        mapping = dict(converted)
        parts = ", ".join(mapping.get(i, f"v[{i}]") for i in range(position))
        result = f"({parts},)"
    else:
        result = "v"
    source = f"""
def _unpack(data, offset=0, _len=_len, _unpack_from=_unpack_from, _FramingError=_FramingError):
    if _len(data) < offset + {layout.size}:
        return None
    v = _unpack_from(data, offset)
{checks}
    return {result}

def _parse(
    data, offset=0, _len=_len, _unpack_from=_unpack_from, _tuple_new=_tuple_new, _cls=_cls
):
    if _len(data) < offset + {layout.size}:
        return None
    v = _unpack_from(data, offset)
{checks}
    return _tuple_new(_cls, {result})
"""
    exec(compile(source, f"<header layout {', '.join(layout.names)}>", "exec"), env)
    return env["_parse"], env["_unpack"]
