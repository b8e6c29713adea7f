"""Java typing for values where plain Python is ambiguous.

Plain Python values have a default mapping (``int`` -> Java int when it fits in 32 bits, else
long; ``float`` -> double; ``list`` -> untyped list; ``dict`` -> untyped map). These wrappers
say what Java should see when the default is not enough:

* :class:`JavaInt`, :class:`JavaLong`: an ``int`` written as a Java int or long.
* :class:`JavaFloat`, :class:`JavaDouble`: a ``float`` with Java float (rounded to 32 bits) or
  double meaning. Hessian has no float type; both are written as doubles, as Java does.
* :class:`TypedList`: a list with a Java type name (``"[int"``, ``"java.util.HashSet"``),
  in the fixed-length (default, as Java writes) or the variable-length form.
* :class:`TypedMap`: a map with a Java type name (``"java.util.TreeMap"``).
* :class:`JavaObject`: an object of a named Java class: its fields, in declaration order.

The decoder returns :class:`TypedList`, :class:`TypedMap` and :class:`JavaObject` for typed
lists, typed maps and objects, so a value read and written again keeps its Java typing.
The containers compare equal only to a value of the same class with the same Java type.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping
from typing import Any, Self

_INT_MIN = -0x80000000
_INT_MAX = 0x7FFFFFFF
_LONG_MIN = -0x8000000000000000
_LONG_MAX = 0x7FFFFFFFFFFFFFFF
_FLOAT32 = struct.Struct(">f")


class JavaInt(int):
    """An ``int`` that is a Java ``int`` (32-bit); out-of-range values raise ``OverflowError``."""

    __slots__ = ()

    def __new__(cls, value: int = 0) -> Self:
        """Check the range and build the value."""
        self = super().__new__(cls, value)
        if not _INT_MIN <= self <= _INT_MAX:
            raise OverflowError(f"{int(self)} does not fit a Java int")
        return self

    def __repr__(self) -> str:
        return f"JavaInt({int(self)})"


class JavaLong(int):
    """An ``int`` that is a Java ``long`` (64-bit); out-of-range values raise ``OverflowError``."""

    __slots__ = ()

    def __new__(cls, value: int = 0) -> Self:
        """Check the range and build the value."""
        self = super().__new__(cls, value)
        if not _LONG_MIN <= self <= _LONG_MAX:
            raise OverflowError(f"{int(self)} does not fit a Java long")
        return self

    def __repr__(self) -> str:
        return f"JavaLong({int(self)})"


class JavaFloat(float):
    """A ``float`` that is a Java ``float``: the value is rounded to 32-bit precision.

    Written as a Hessian double, exactly as Java writes a ``float`` (widened to double).
    Values beyond the float range become infinities, as Java's ``(float)`` cast does.
    """

    __slots__ = ()

    def __new__(cls, value: float = 0.0) -> Self:
        """Round to 32-bit precision and build the value."""
        v = float(value)
        try:
            v = _FLOAT32.unpack(_FLOAT32.pack(v))[0]
        except OverflowError:
            v = math.copysign(math.inf, v)
        return super().__new__(cls, v)

    def __repr__(self) -> str:
        return f"JavaFloat({float(self)!r})"


class JavaDouble(float):
    """A ``float`` that is explicitly a Java ``double`` (the same as a plain ``float``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"JavaDouble({float(self)!r})"


class TypedList(list[Any]):
    """A Hessian list with a Java type name.

    ``type`` is the Java type (``"[int"``, ``"[java.lang.String"``, ``"java.util.HashSet"``) or
    ``None`` for an untyped list written in a chosen form. ``variable`` selects the
    variable-length form (``'U'``/``'W'`` ... ``'Z'``) instead of the fixed-length one that Java
    writes for collections and arrays. Equality compares ``type`` and the items, not
    ``variable`` (a wire detail).
    """

    __slots__ = ("type", "variable")

    def __init__(
        self, type: str | None, items: Iterable[Any] = (), *, variable: bool = False
    ) -> None:
        super().__init__(items)
        self.type = type
        self.variable = variable

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TypedList) or other.type != self.type:
            return False
        return list.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = None

    def __repr__(self) -> str:
        extra = ", variable=True" if self.variable else ""
        return f"TypedList({self.type!r}, {list.__repr__(self)}{extra})"


class TypedMap(dict[Any, Any]):
    """A Hessian map with a Java type name (``"java.util.TreeMap"``), written as ``'M'``.

    ``type=None`` writes an untyped map (``'H'``) like a plain ``dict``.
    """

    __slots__ = ("type",)

    def __init__(
        self, type: str | None, items: Mapping[Any, Any] | Iterable[tuple[Any, Any]] = ()
    ) -> None:
        super().__init__(items)
        self.type = type

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TypedMap) or other.type != self.type:
            return False
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = None

    def __repr__(self) -> str:
        return f"TypedMap({self.type!r}, {dict.__repr__(self)})"


class JavaObject(dict[str, Any]):
    """An instance of the Java class ``type``: a dict of its fields in declaration order.

    Written as a class definition (once per stream per class and field list) followed by
    the field values; Java enums are objects with one field, ``name``.
    """

    __slots__ = ("type",)

    def __init__(
        self,
        type: str,
        fields: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(fields, **kwargs)
        self.type = type

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, JavaObject) or other.type != self.type:
            return False
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = None

    def __repr__(self) -> str:
        return f"JavaObject({self.type!r}, {dict.__repr__(self)})"
