"""Header DSL vs hand-written struct vs construct, on a 16-byte Dubbo-like header.

Run: ``.venv/bin/python bench/bench_header.py`` (or ``./dev bench header``).
Goal: parsing through the DSL stays within 1.5x of hand-written ``struct``.
"""

from __future__ import annotations

import struct
import sys
from collections import namedtuple
from pathlib import Path

import construct as cs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import per_call_us, print_table

from metaprotocol_sdk import FramingError, compile_header

DECLARATION = cs.Struct(
    "magic" / cs.Const(b"\xda\xbb"),
    "flag" / cs.Int8ub,
    "status" / cs.Int8ub,
    "request_id" / cs.Int64ub,
    "body_length" / cs.Int32ub,
)
HEADER = b"\xda\xbb\xc2\x14" + (77).to_bytes(8, "big") + (300).to_bytes(4, "big")
BUFFER = bytearray(HEADER + b"x" * 300)

_S = struct.Struct(">2sBBQL")
_MAGIC = b"\xda\xbb"
_Named = namedtuple("_Named", "magic flag status request_id body_length")


def hand_written(data: bytearray) -> tuple[object, ...] | None:
    """What a careful author writes by hand: length check, unpack, magic check."""
    if len(data) < 16:
        return None
    v = _S.unpack_from(data, 0)
    if v[0] != _MAGIC:
        raise FramingError("bad magic", offset=0)
    return v


def hand_written_named(data: bytearray) -> tuple[object, ...] | None:
    """The same, returning a named tuple (what ``parse`` returns)."""
    if len(data) < 16:
        return None
    v = _S.unpack_from(data, 0)
    if v[0] != _MAGIC:
        raise FramingError("bad magic", offset=0)
    return _Named._make(v)


def main() -> None:
    layout = compile_header(DECLARATION)
    interpreted = DECLARATION
    compiled = DECLARATION.compile()
    unpack, parse = layout.unpack, layout.parse
    cases = [
        ("hand-written struct -> tuple (floor)", lambda: hand_written(BUFFER)),
        ("DSL unpack -> tuple", lambda: unpack(BUFFER)),
        ("hand-written struct -> named tuple", lambda: hand_written_named(BUFFER)),
        ("DSL parse -> named tuple", lambda: parse(BUFFER)),
        ("construct compiled (no truncation check)", lambda: compiled.parse(HEADER)),
        ("construct interpreted", lambda: interpreted.parse(HEADER)),
    ]
    times = [(name, per_call_us(fn)) for name, fn in cases]
    floor = times[0][1]
    rows = [(name, us * 1000, us / floor) for name, us in times]
    print_table(
        "16-byte Dubbo-like header parse (ns per call, ratio to the hand-written tuple floor)",
        ["case", "ns/call", "x floor"],
        rows,
    )
    # Like for like: each DSL form against the hand-written code returning the same thing.
    tuple_ratio = times[1][1] / times[0][1]
    named_ratio = times[3][1] / times[2][1]
    for label, ratio in (
        ("unpack vs hand-written tuple", tuple_ratio),
        ("parse vs hand-written named tuple", named_ratio),
    ):
        verdict = "met" if ratio <= 1.5 else "MISSED"
        print(f"goal <= 1.5x, {label}: {ratio:.2f}x -> {verdict}")


if __name__ == "__main__":
    main()
