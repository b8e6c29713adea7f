"""Shared helpers for the benchmarks: best-of-N timing and table printing."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence


def per_call_us(
    fn: Callable[[], object],
    *,
    target_s: float = 0.2,
    repeat: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Best-of-``repeat`` microseconds per call of ``fn`` by ``clock`` (calibrated loop).

    The loop count is chosen so one measured window takes about ``target_s / 10``.
    """
    number = 1
    while True:
        start = clock()
        for _ in range(number):
            fn()
        elapsed = clock() - start
        if elapsed >= target_s / 10 or number >= 1 << 24:
            break
        number *= 4
    number = max(1, int(number * (target_s / 10) / max(elapsed, 1e-9)))
    best = float("inf")
    for _ in range(repeat):
        start = clock()
        for _ in range(number):
            fn()
        best = min(best, (clock() - start) / number)
    return best * 1e6


def cpu_us(fn: Callable[[], object], *, target_s: float = 0.2, repeat: int = 7) -> float:
    """Like :func:`per_call_us` in CPU time of this process (immune to other processes)."""
    return per_call_us(fn, target_s=target_s, repeat=repeat, clock=time.process_time)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print an aligned text table with a title."""
    cells = [[str(h) for h in headers], *([_fmt(c) for c in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return str(value)
