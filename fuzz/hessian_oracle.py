"""Oracle for the Hessian 2.0 decoder: read, skip and skip-then-read must agree.

The input is a stream of top-level values, as in a Dubbo body. Three passes over it:

1. ``read`` every value;
2. ``skip`` every value (skip does not validate string bytes, so it may accept more);
3. ``skip`` the first half, then ``read`` the rest, which resolves references to skipped
   containers on demand (the path a Dubbo request takes to reach its attachments).

Only a ``CodecError`` (``HessianError``) may be raised. When pass 1 succeeds, pass 2 must
stop at the same offsets, and pass 3 must read values equal to pass 1's.
"""

from __future__ import annotations

import math
from typing import Any

from metaprotocol_dubbo.hessian2 import Decoder

from metaprotocol_sdk.errors import CodecError

from .oracle import Violation, crash


def check_hessian(data: bytes) -> None:
    """Run the three passes over ``data``."""
    read = _pass(data, "read")
    skipped = _pass(data, "skip")
    if read is None:
        return
    read_ends, values = read
    if skipped is None:
        raise Violation("skip-refuses", "skip raised on a stream that read accepts")
    if skipped[0] != read_ends:
        raise Violation("skip-differs", f"value ends: read {read_ends}, skip {skipped[0]}")
    half = len(values) // 2
    decoder = Decoder(data)
    try:
        for _ in range(half):
            decoder.skip()
        later = [decoder.read() for _ in range(len(values) - half)]
    except CodecError as exc:
        raise Violation("skip-then-read-refuses", f"{exc} after skipping {half} values") from None
    except Exception as exc:
        raise crash("skip then read", exc) from None
    for index, (got, want) in enumerate(zip(later, values[half:], strict=True)):
        if not _same(got, want, {}):
            raise Violation(
                "skip-then-read-differs",
                f"value {half + index} reads differently after skipping {half} values",
            )


def _pass(data: bytes, how: str) -> tuple[list[int], list[Any]] | None:
    """Value end offsets and values (for ``read``), or None on a ``CodecError``."""
    decoder = Decoder(data)
    ends: list[int] = []
    values: list[Any] = []
    try:
        while not decoder.at_end:
            if how == "read":
                values.append(decoder.read())
            else:
                decoder.skip()
            if decoder.offset <= (ends[-1] if ends else 0):
                raise Violation("no-progress", f"{how} did not advance at {decoder.offset}")
            ends.append(decoder.offset)
    except CodecError:
        return None
    except Violation:
        raise
    except Exception as exc:
        raise crash(how, exc) from None
    return ends, values


def _same(a: Any, b: Any, seen: dict[tuple[int, int], bool]) -> bool:
    """Structural equality that follows shared and cyclic references once (linear)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return bool(a == b) or (math.isnan(a) and math.isnan(b))
    if not isinstance(a, list | dict):
        return bool(a == b)
    key = (id(a), id(b))
    if key in seen:
        return True
    seen[key] = True
    # TypedList, TypedMap and JavaObject carry their Java type in slots.
    for slot in ("type", "variable"):
        if getattr(a, slot, None) != getattr(b, slot, None):
            return False
    if len(a) != len(b):
        return False
    if isinstance(a, list):
        return all(_same(x, y, seen) for x, y in zip(a, b, strict=True))
    if list(map(type, a)) != list(map(type, b)):
        return False
    return all(
        _same(ka, kb, seen) and _same(va, vb, seen)
        for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True)
    )
