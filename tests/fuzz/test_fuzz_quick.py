"""Fuzzing in CI: committed inputs replayed, then each target fuzzed briefly with a fixed seed.

The quick run is deterministic (fixed libFuzzer seed, fixed number of inputs per target,
fixed ``PYTHONHASHSEED``), so it passes or fails the same way every time. Inputs that break a
rule today wait in ``fuzz/pending`` (see its README) and are not replayed here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuzz.replay import CORPUS, PENDING, REGRESSIONS, inputs, replay
from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tracing() -> Iterator[None]:
    tracemalloc.start()
    yield
    tracemalloc.stop()


@pytest.mark.parametrize("target", list(TARGETS))
def test_seeds_and_regressions_pass(target: str, tracing: None) -> None:
    paths = list(inputs(target, CORPUS, REGRESSIONS))
    assert paths, f"no seeds for {target}"
    failures = [f"{p.relative_to(ROOT)}: {v}" for p in paths if (v := replay(target, p))]
    assert not failures, "\n\n".join(failures)


def test_pending_finds_are_documented() -> None:
    readme = (PENDING / "README.md").read_text()
    for target in TARGETS:
        for path in inputs(target, PENDING):
            assert f"{target}/{path.name}" in readme, f"{path} has no line in the README"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    try:
        import atheris  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:  # never skipped: the dev extra pins it
        pytest.fail("atheris is missing: pip install -e '.[dev]' (atheris==3.0.0)")
    tmp = tmp_path_factory.mktemp("fuzz")
    command = [sys.executable, "-m", "fuzz.run", "--all", "--quick"]
    command += ["--work", str(tmp / "work"), "--finds", str(tmp / "finds")]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    return tmp / "finds", done.stdout + done.stderr


@pytest.mark.parametrize("target", list(TARGETS))
def test_quick_fuzzing_finds_nothing(target: str, quick_run: tuple[Path, str]) -> None:
    finds, output = quick_run
    assert f"{target}: exit 0," in output, output[-3000:]
    reports = sorted((finds / target).glob("*.txt"))
    assert not reports, "\n".join(f"{p.with_suffix('')}: {p.read_text()}" for p in reports)
