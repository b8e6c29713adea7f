"""Coverage-guided fuzzing with atheris (libFuzzer), in-process.

    .venv/bin/python -m fuzz.run dubbo --time 600       # a campaign: 10 minutes on one target
    .venv/bin/python -m fuzz.run --all --time 600       # 10 minutes on each target in turn
    .venv/bin/python -m fuzz.run --all --quick          # what the quick CI test runs
    .venv/bin/python -m fuzz.run kv --time 60 -- -max_len=65536   # extra libFuzzer flags

Each target reads its committed seeds (``fuzz/corpus/TARGET``) and regressions
(``fuzz/regressions/TARGET``), writes inputs that reach new code to ``--work``
(default ``fuzz/work/TARGET``, not committed) and every input that breaks a rule to
``--finds`` (default ``fuzz/finds/TARGET``): ``<rule>-<sha1>`` holds the input and
``<rule>-<sha1>.txt`` says what happened. Fuzzing goes on after a find, keeping one input
per kind of find. The modules are instrumented once; each target then runs in a forked child,
so that a campaign over every target pays the instrumentation once. ``--quick`` runs each
target for its fixed number of inputs with a fixed seed (deterministic, given a fixed
``PYTHONHASHSEED``). The exit status is 1 when a target found anything or died.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tracemalloc
from pathlib import Path

import atheris  # type: ignore[import-untyped]

HERE = Path(__file__).resolve().parent
#: Packages whose coverage guides the fuzzer (PyYAML is left out: a third of the speed for
#: coverage of a parser that is not ours).
INSTRUMENTED = ["metaprotocol_sdk", "metaprotocol_dubbo", "metaprotocol_thrift"]

with atheris.instrument_imports(include=INSTRUMENTED):
    from .bounds import bounded
    from .oracle import Violation
    from .replay import CORPUS, REGRESSIONS
    from .targets import TARGETS, Target


def record(finds: Path, data: bytes, violation: Violation, seen: set[str]) -> None:
    """Write a find, once per kind (:attr:`Violation.kind`)."""
    if violation.kind in seen:
        return
    seen.add(violation.kind)
    name = f"{violation.rule}-{hashlib.sha1(data).hexdigest()[:12]}"
    (finds / name).write_bytes(data)
    (finds / f"{name}.txt").write_text(f"{violation}\n")
    first = str(violation).splitlines()[0]
    print(f"FIND {finds / name}: {first}", file=sys.stderr, flush=True)


def fuzz(target: Target, flags: list[str], work: Path, finds: Path, memory: bool) -> None:
    """Fuzz one target in this process until libFuzzer's limits end it (never returns)."""
    work.mkdir(parents=True, exist_ok=True)
    finds.mkdir(parents=True, exist_ok=True)
    if memory:
        tracemalloc.start()
    seen: set[str] = set()

    def one_input(data: bytes) -> None:
        try:
            bounded(target.check, data, target.bounds)
        except Violation as violation:
            record(finds, data, violation, seen)

    folders = [work] + [d / target.name for d in (CORPUS, REGRESSIONS)]
    dirs = [str(d) for d in folders if d.is_dir()]
    atheris.Setup([sys.argv[0], f"-artifact_prefix={finds}{os.sep}", *flags, *dirs], one_input)
    atheris.Fuzz()


def main(argv: list[str]) -> int:
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    else:
        extra = []
    parser = argparse.ArgumentParser(
        prog="python -m fuzz.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=", ".join(TARGETS))
    parser.add_argument("--all", action="store_true", help="every target, one after another")
    parser.add_argument("--quick", action="store_true", help="each target's fixed CI run")
    parser.add_argument("--runs", type=int, help="stop each target after this many inputs")
    parser.add_argument("--time", type=int, default=0, help="seconds per target")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    parser.add_argument("--max-len", type=int, default=4096, help="longest input tried")
    parser.add_argument("--work", type=Path, default=HERE / "work", help="new inputs go here")
    parser.add_argument("--finds", type=Path, default=HERE / "finds", help="finds go here")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory bound")
    args = parser.parse_args(argv)
    names = list(TARGETS) if args.all else args.targets
    unknown = [n for n in names if n not in TARGETS]
    if not names or unknown:
        parser.error(f"name targets among {', '.join(TARGETS)} (or --all); unknown: {unknown}")
    failed = 0
    for name in names:
        target = TARGETS[name]
        flags = [
            f"-seed={args.seed}",
            f"-max_len={args.max_len}",
            "-rss_limit_mb=2048",
            "-timeout=120",  # our own bounds fire first; this catches a hang inside C code
            "-print_final_stats=1",
        ]
        runs = target.quick_runs if args.quick and args.runs is None else args.runs
        if runs is not None:
            flags.append(f"-runs={runs}")
        if args.time:
            flags.append(f"-max_total_time={args.time}")
        finds = args.finds / name
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child ends inside libFuzzer
            try:
                fuzz(target, [*flags, *extra], args.work / name, finds, not args.no_memory)
            finally:
                os._exit(70)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        found = sorted(p.name for p in finds.iterdir() if not p.name.endswith(".txt"))
        print(f"{name}: exit {status}, {len(found)} finds in {finds}", flush=True)
        failed += bool(status or found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
