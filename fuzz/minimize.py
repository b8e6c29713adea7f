"""Shrink a find to a small input that breaks the same rule in the same way.

    .venv/bin/python -m fuzz.minimize TARGET FILE [-o OUT]

Removes chunks of the input, halving the chunk size down to one byte, and keeps every removal
after which the input still raises a :class:`~fuzz.oracle.Violation` of the same kind (rule,
plus exception type and place for a crash). A smaller input makes a clearer regression file.
"""

from __future__ import annotations

import argparse
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from .bounds import bounded
from .oracle import Violation
from .targets import TARGETS


def kind_of(check: Callable[[bytes], None], data: bytes) -> str | None:
    """The kind of violation ``data`` provokes, or None."""
    try:
        check(data)
    except Violation as violation:
        return violation.kind
    return None


def minimize(check: Callable[[bytes], None], data: bytes, max_tries: int = 20000) -> bytes:
    """The smallest input found by chunk removal that provokes the same kind as ``data``."""
    kind = kind_of(check, data)
    if kind is None:
        raise ValueError("the input breaks no rule")
    tries = 0
    chunk = max(1, len(data) // 2)
    while tries < max_tries:
        start = 0
        while start < len(data) and tries < max_tries:
            candidate = data[:start] + data[start + chunk :]
            tries += 1
            if candidate and kind_of(check, candidate) == kind:
                data = candidate  # keep the removal; the same start now holds new bytes
            else:
                start += chunk
        if chunk == 1:
            break
        chunk //= 2
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.minimize", description=__doc__)
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("file", type=Path)
    parser.add_argument("-o", "--out", type=Path, help="default: FILE.min")
    args = parser.parse_args(argv)
    target = TARGETS[args.target]
    tracemalloc.start()
    data = args.file.read_bytes()
    try:
        small = minimize(lambda d: bounded(target.check, d, target.bounds), data)
    except ValueError as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    out = args.out or args.file.with_name(args.file.name + ".min")
    out.write_bytes(small)
    print(f"{len(data)} -> {len(small)} bytes: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
