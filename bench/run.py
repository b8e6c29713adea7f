"""Run every benchmark (``bench/bench_*.py``) or the ones named: ``./dev bench [NAME ...]``."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    """Run the selected benchmark modules in order; each prints its own table."""
    available = {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}
    names = argv or list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(available)}")
        return 2
    for name in names:
        print(f"\n===== bench {name} =====", flush=True)
        sys.argv = [str(available[name])]
        runpy.run_path(str(available[name]), run_name="__main__")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
