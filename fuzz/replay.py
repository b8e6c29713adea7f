"""Replay committed inputs in-process, without a fuzzer (what the quick CI test does first).

    .venv/bin/python -m fuzz.replay                  # corpus + regressions of every target
    .venv/bin/python -m fuzz.replay dubbo --pending  # the pending finds of one target

Exit status 1 when an input breaks a rule. With ``--pending``, each pending find is reported
as still failing or as fixed (then move it to ``fuzz/regressions/<target>/``).
"""

from __future__ import annotations

import argparse
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

from .bounds import bounded
from .oracle import Violation
from .targets import TARGETS

HERE = Path(__file__).resolve().parent
#: Folders of inputs, per target: seeds, fixed finds (replayed in CI), open finds (not).
CORPUS, REGRESSIONS, PENDING = HERE / "corpus", HERE / "regressions", HERE / "pending"


def inputs(target: str, *folders: Path) -> Iterator[Path]:
    """The input files of ``target`` in ``folders``, in name order."""
    for folder in folders:
        directory = folder / target
        if directory.is_dir():
            yield from sorted(p for p in directory.iterdir() if p.is_file())


def replay(target: str, path: Path) -> Violation | None:
    """Run one input file through its target's check and bounds."""
    t = TARGETS[target]
    try:
        bounded(t.check, path.read_bytes(), t.bounds)
    except Violation as violation:
        return violation
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.replay", description=__doc__)
    parser.add_argument("targets", nargs="*", choices=[[], *TARGETS], metavar="TARGET")
    parser.add_argument("--pending", action="store_true", help="replay fuzz/pending instead")
    args = parser.parse_args(argv)
    tracemalloc.start()
    folders = (PENDING,) if args.pending else (CORPUS, REGRESSIONS)
    failed = 0
    for target in args.targets or TARGETS:
        for path in inputs(target, *folders):
            violation = replay(target, path)
            name = path.relative_to(HERE.parent)
            if violation is not None:
                failed += 1
                first = str(violation).splitlines()[0]
                print(f"{'STILL FAILS' if args.pending else 'FAIL'} {name}: {first}")
            elif args.pending:
                print(f"FIXED {name}: move it to fuzz/regressions/{target}/")
    return 1 if failed and not args.pending else 0


if __name__ == "__main__":
    sys.exit(main())
