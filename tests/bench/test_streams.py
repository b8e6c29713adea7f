"""The streams benchmark runs: every target carries every scenario's streams without an error.

One short turn per target of ``bench/bench_streams.py``'s own ``run_slices`` (the KV echo
upstream, the floors, the engine with its KV configuration and, when installed, Envoy's
tcp_proxy), long-lived and short streams; the load generator counts any error frame, unknown
stream or dropped connection.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import bench_proxy  # noqa: E402
import bench_streams  # noqa: E402


@pytest.mark.parametrize(
    "scenario",
    [
        bench_streams.Scenario("long-lived", 2, 2, 0),
        bench_streams.Scenario("short", 2, 2, 2),
    ],
    ids=["long-lived", "short"],
)
def test_every_target_carries_the_streams(scenario: bench_streams.Scenario, tmp_path: Path) -> None:
    kinds = ["direct", "uvloop passthrough", bench_proxy.STREAM_FLOOR, "engine"]
    if bench_proxy.ENVOY.exists():
        kinds.append(bench_streams.TCP)
    results = bench_streams.run_slices(kinds, scenario, tmp_path, 0.1, 2, 0.1)
    for kind in kinds:
        result = results[kind]
        assert result.errors == 0, kind
        assert result.rps > 0, kind
        if kind != "direct":
            assert len(result.per_slice) == 2, kind
