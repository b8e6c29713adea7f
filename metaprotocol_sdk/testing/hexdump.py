"""Hex dumps with offsets, for failure messages that show the bytes."""

from __future__ import annotations

#: Bytes shown per dump line.
WIDTH = 16
#: Longest dump a failure message shows in full; longer data shows its head and tail.
MAX_DUMP = 256


def _line(data: bytes, start: int, mark: int | None) -> list[str]:
    chunk = data[start : start + WIDTH]
    cells = " ".join(f"{byte:02x}" for byte in chunk)
    text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
    lines = [f"  {start:08x}  {cells:<{WIDTH * 3 - 1}}  |{text}|"]
    if mark is not None and start <= mark < start + WIDTH:
        column = 12 + 3 * (mark - start)
        lines.append(" " * column + f"^^ offset {mark}")
    return lines


def hexdump(data: bytes | bytearray | memoryview, *, mark: int | None = None) -> str:
    """Render ``data`` as offset-prefixed hex lines; ``mark`` points at the byte at that offset.

    Data longer than :data:`MAX_DUMP` shows its first and last lines and the lines around
    ``mark``.
    """
    raw = bytes(data)
    if not raw:
        return "  (0 bytes)"
    starts = list(range(0, len(raw), WIDTH))
    if len(raw) > MAX_DUMP:
        keep = set(starts[:4] + starts[-2:])
        if mark is not None:
            centre = mark - mark % WIDTH
            keep |= {centre - WIDTH, centre, centre + WIDTH}
        starts = sorted(s for s in keep if 0 <= s < len(raw))
    lines = [f"  ({len(raw)} bytes)"]
    previous = -WIDTH
    for start in starts:
        if start != previous + WIDTH:
            lines.append("  ...")
        lines += _line(raw, start, mark)
        previous = start
    return "\n".join(lines)


def first_difference(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> int:
    """Offset of the first byte where ``a`` and ``b`` differ (the shorter length if a prefix)."""
    x, y = bytes(a), bytes(b)
    for i, (p, q) in enumerate(zip(x, y, strict=False)):
        if p != q:
            return i
    return min(len(x), len(y))


def compare(
    expected: bytes | bytearray | memoryview,
    actual: bytes | bytearray | memoryview,
    *,
    what: str = "bytes",
) -> str:
    """A side-by-side explanation of two byte strings that should be equal."""
    at = first_difference(expected, actual)
    return (
        f"{what} differ at offset {at} (expected {len(expected)} bytes, got {len(actual)})\n"
        f"expected:\n{hexdump(expected, mark=at)}\n"
        f"actual:\n{hexdump(actual, mark=at)}"
    )
