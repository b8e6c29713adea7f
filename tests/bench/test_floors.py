"""The benchmark's floors forward every frame intact (else they measure nothing).

Each floor of ``bench/proxy/floors.py``, and the pass-through of ``passthrough.py``, runs
between the benchmark's canned upstream and its load generator, which checks every reply's id
and status; pipelined requests put several frames in one read and split frames across reads,
the cases the ``chains`` floor cuts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PROXY = Path(__file__).resolve().parents[2] / "bench" / "proxy"
sys.path.insert(0, str(PROXY))

import floors  # noqa: E402


@contextmanager
def started(argv: list[str], ready: str, env: dict[str, str] | None = None) -> Iterator[int]:
    """Run ``argv`` until the block ends; yields the port from its ``ready`` line."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(ready), line
        yield int(line.rsplit(":", 1)[-1].split()[-1])
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("mode", ["frames", "chains", "stream", "passthrough"])
@pytest.mark.parametrize(
    ("protocol", "payload", "inflight"),
    [("dubbo", 1 << 20, 2), ("thrift", 16, 16), ("dubbo", 70_000, 8)],
)
def test_floor_forwards_every_frame(mode: str, protocol: str, payload: int, inflight: int) -> None:
    env = {**os.environ}
    if mode == "chains":
        env["GLIBC_TUNABLES"] = floors.CHAINS_TUNABLES
    upstream = [sys.executable, str(PROXY / "upstream.py"), protocol, str(payload)]
    with started(upstream, "READY") as upstream_port:
        floor = [sys.executable, str(PROXY / "floors.py"), mode, protocol, str(upstream_port)]
        if mode == "passthrough":  # the small-payload floor, bench/proxy/passthrough.py
            floor = [sys.executable, str(PROXY / "passthrough.py"), protocol, str(upstream_port)]
        with started(floor, "listening", env) as port:
            load = [sys.executable, str(PROXY / "loadgen.py"), protocol, f"127.0.0.1:{port}"]
            load += ["--payload", str(payload), "--connections", "2"]
            load += ["--inflight", str(inflight), "--warmup", "0.1", "--duration", "0.4"]
            done = subprocess.run(load, capture_output=True, text=True, timeout=60)
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["errors"] == 0
    assert result["requests"] > 0
