"""Soak: steady Dubbo traffic through the engine, alone and alongside the attackers of issue 12.

The engine's RSS and CPU and the well-behaved clients' latency and errors, as tables.

    .venv/bin/python bench/bench_soak.py [--duration S] [--engine-tree PATH] [--scale X]
    ./dev bench soak

Two phases of ``--duration`` seconds each (default 120) against one engine process with the
default limits (the configuration is printed): the well-behaved clients alone, and the same
clients while the attackers of ``bench/proxy/soakload.py`` run. Each phase is cut into
``--rounds`` windows (default 4) and the windows alternate (without, with; then with, without;
...), so a change in the load other tenants put on the machine weighs on both phases alike; the
clients' latency is compared round by round. The attackers (a client asking for 1 MiB
replies that never reads, slowloris connections at one byte a second, connections holding
incomplete 8 MiB frames, one connection pipelining 5000 requests to a slow upstream, an idle
connection flood). Attackers are bounded in connections and time and stop by themselves;
everything is on 127.0.0.1. The engine runs on core 0; upstreams, clients and attackers on
core 1 (a 2-core machine shared with other work: compare the phases, not absolute numbers).
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_proxy import (  # noqa: E402
    _LAUNCH_TREE,
    CORES,
    LOAD_CORE,
    METAPROTOCOL,
    PROXY_CORE,
    PY,
    Proc,
    check_tree,
    cpu_model,
    status_kib,
    tree_env,
)

SOAKLOAD = HERE / "proxy" / "soakload.py"
UPSTREAM = HERE / "proxy" / "upstream.py"
ATTACKS = ["nonreader", "slowloris", "large-frames", "pipeliner", "idle-flood"]
HOST = "org.apache.dubbo.samples.basic.api.demoservice"
MiB = 1 << 20


def engine_yaml(ports: Mapping[str, int]) -> str:
    """Dubbo: method ``big`` to the 1 MiB upstream, ``slow`` to the slow one, the rest to the
    small one. No limits, overload or timeouts section: the engine's defaults."""
    name = "tcp-metaprotocol-dubbo-soak"
    endpoints = "".join(
        f"\n    - {{address: 127.0.0.1, ports: {{{name}: {port}}}, labels: {{version: {v}}}}}"
        for v, port in ports.items()
    )
    subsets = "".join(f"\n    - {{name: {v}, labels: {{version: {v}}}}}" for v in ports)
    routes = "".join(
        f"\n    - name: {v}\n      match: {{attributes: {{method: {{exact: {v}}}}}}}\n"
        f"      route: [{{destination: {{host: {HOST}, port: {{number: 20880}}, subset: {v}}}}}]"
        for v in ("big", "slow")
    )
    return f"""\
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: ApplicationProtocol
metadata: {{name: dubbo}}
spec: {{protocol: dubbo, codec: aeraki.meta_protocol.codec.dubbo}}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: soak}}
spec:
  hosts: [{HOST}]
  ports: [{{number: 20880, name: {name}, protocol: TCP}}]
  resolution: STATIC
  endpoints:{endpoints}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: soak}}
spec:
  host: {HOST}
  subsets:{subsets}
---
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata: {{name: soak}}
spec:
  hosts: [{HOST}]
  routes:{routes}
    - name: rest
      requestMutation: [{{key: x-soak, value: metaprotocol}}]
      route: [{{destination: {{host: {HOST}, port: {{number: 20880}}, subset: small}}}}]
---
apiVersion: proxy.metaprotocol.io/v1alpha1
kind: ProxyConfig
metadata: {{name: soak}}
spec:
  listeners: [{{host: {HOST}, port: 20880, bind: "127.0.0.1:0"}}]
  admin: {{bind: "127.0.0.1:0"}}
"""


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in nanoseconds."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # the thread just exited
            total += int((task / "schedstat").read_text().split()[0])
    return total


class RssSampler:
    """Samples the engine's VmRSS four times a second in a thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, status_kib(self.pid, "VmRSS"))

    def __enter__(self) -> RssSampler:
        self.peak = status_kib(self.pid, "VmRSS")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Drain:
    """Reads a child's pipe in a thread (so a chatty engine never blocks on a full pipe);
    counts the lines and keeps the first few."""

    def __init__(self, pipe: IO[str] | None, keep: int = 20) -> None:
        self.lines = 0
        self.first: list[str] = []
        self._pipe, self._keep = pipe, keep
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        if self._pipe is None:
            return
        for line in self._pipe:
            self.lines += 1
            if len(self.first) < self._keep:
                self.first.append(line.rstrip())


@dataclass
class Phase:
    """What one phase measured."""

    name: str
    clients: dict[str, float] = field(default_factory=dict)
    attackers: dict[str, dict[str, int]] = field(default_factory=dict)
    rss_start: int = 0
    rss_peak: int = 0
    rss_end: int = 0
    cpu_s: float = 0.0
    seconds: float = 0.0
    started: float = field(default_factory=time.monotonic)
    counters: dict[str, float] = field(default_factory=dict)


def fetch_json(admin: str, path: str) -> dict[str, object]:
    """GET a JSON admin path."""
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=10) as response:
        data: dict[str, object] = json.load(response)
        return data


def counters(admin: str) -> dict[str, float]:
    """The engine's counters that say how it treated traffic (limits, local replies, results)."""
    keep = (
        "metaprotocol_downstream_connections_closed_total",
        "metaprotocol_downstream_connections_rejected_total",
        "metaprotocol_downstream_connections_total",
        "metaprotocol_local_replies_total",
        "metaprotocol_requests_total",
    )
    snapshot = fetch_json(admin, "/stats?format=json")
    return {k: float(v) for k, v in snapshot.items() if k.startswith(keep)}  # type: ignore[arg-type]


@contextlib.contextmanager
def upstream(reply: int, delay: float) -> Iterator[int]:
    """A canned Dubbo upstream (``reply``-byte replies, ``delay`` seconds late); its port."""
    proc = Proc([PY, str(UPSTREAM), "dubbo", str(reply), str(delay)], LOAD_CORE)
    try:
        yield int(proc.expect(r"READY (\d+)").group(1))
    finally:
        proc.stop()


def run_phase(
    name: str, pid: int, target: str, admin: str, seconds: float, scale: float, attacks: list[str]
) -> Phase:
    """Run the clients (and ``attacks``) for ``seconds``; measure the engine."""
    phase = Phase(name)
    before = counters(admin)
    cpu0, t0 = cpu_ns(pid), time.monotonic()
    with RssSampler(pid) as rss, contextlib.ExitStack() as stack:
        phase.rss_start = rss.peak
        attackers = {}
        for kind in attacks:
            argv = [PY, str(SOAKLOAD), "attack", kind, target]
            argv += ["--duration", str(seconds + 2), "--scale", str(scale)]
            attackers[kind] = stack.enter_context(contextlib.closing(_Closing(argv)))
        argv = [PY, str(SOAKLOAD), "clients", target, "--duration", str(seconds)]
        clients = Proc(argv, LOAD_CORE)
        try:
            phase.clients = json.loads(
                clients.expect(r"RESULT (.*)", timeout=seconds + 60).group(1)
            )
        finally:
            clients.stop()
        for kind, proc in attackers.items():
            with contextlib.suppress(Exception):  # a failed attacker is reported as missing
                phase.attackers[kind] = json.loads(proc.expect(r"RESULT (.*)", 60).group(1))
        phase.rss_peak = rss.peak
    phase.cpu_s = (cpu_ns(pid) - cpu0) / 1e9
    phase.seconds = time.monotonic() - t0
    phase.rss_end = status_kib(pid, "VmRSS")
    after = counters(admin)
    phase.counters = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return phase


class _Closing(Proc):
    """A pinned attacker process with a ``close`` for ``contextlib.closing``."""

    def __init__(self, argv: list[str]) -> None:
        super().__init__(argv, LOAD_CORE)

    def close(self) -> None:
        self.stop()


_ERRORS = ("error_replies", "timeouts", "lost", "connect_failed")


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 0.0


def _slowest(windows: list[Phase]) -> str:
    """The slowest reply of ``windows`` and when it came, in seconds into its window."""
    w = max(windows, key=lambda w: w.clients["max_us"])
    return f"{w.clients['max_us']:.0f} ({w.clients.get('max_at_s', 0.0):.1f})"


def _row(label: str, windows: list[Phase], rss: bool = True) -> str:
    """One table row summing ``windows`` (latency: median over windows of each window's);
    with ``rss``, the RSS at the first window's start, the peak, and at the last one's end."""
    seconds = sum(w.seconds for w in windows)
    ok = sum(w.clients["ok"] for w in windows)
    errors = {k: int(sum(w.clients[k] for w in windows)) for k in _ERRORS}
    detail = ", ".join(f"{k} {v}" for k, v in errors.items() if v)
    total = sum(errors.values())
    return (
        f"| {label} | {ok / seconds:.0f} | {_median([w.clients['p50_us'] for w in windows]):.0f} "
        f"| {_median([w.clients['p99_us'] for w in windows]):.0f} "
        f"| {_slowest(windows)} "
        f"| {total}{f' ({detail})' if detail else ''} "
        f"| {100 * sum(w.cpu_s for w in windows) / seconds:.0f} "
        + (f"| {windows[0].rss_start / 1024:.1f} " if rss else "")
        + f"| {max(w.rss_peak for w in windows) / 1024:.1f} "
        + (f"| {windows[-1].rss_end / 1024:.1f} " if rss else "")
        + f"| {sum(w.clients['cpu_s'] for w in windows):.1f} |"
    )


def report(rounds: list[tuple[Phase, Phase]]) -> str:
    """Markdown tables: each window, each phase summed, per-round ratios, attackers, counters."""
    head = (
        "| window | good req/s | p50 us | p99 us | max us (at s) | good errors | engine CPU "
        "(% of a core) | RSS start MiB | RSS peak MiB | RSS end MiB | clients' own CPU s |"
    )
    lines = [head, "|" + "---|" * 11]
    ordered = sorted((w for pair in rounds for w in pair), key=lambda w: w.started)
    for w in ordered:
        lines.append(_row(w.name, [w]))
    quiet = [q for q, _ in rounds]
    loud = [a for _, a in rounds]
    lines += ["", "Summed over the rounds (latency: median of the windows' figures):", ""]
    summary = head.replace("| window |", "| phase |").replace(" RSS start MiB |", "")
    lines += [summary.replace(" RSS end MiB |", ""), "|" + "---|" * 9]
    lines.append(_row("without attackers", quiet, rss=False))
    lines.append(_row("with attackers", loud, rss=False))
    lines.append(
        f"\nEngine RSS: {ordered[0].rss_start / 1024:.1f} MiB at the start, "
        f"{max(w.rss_peak for w in ordered) / 1024:.1f} MiB at the peak, "
        f"{ordered[-1].rss_end / 1024:.1f} MiB at the end"
    )
    for q in ("p50_us", "p99_us"):
        ratios = sorted(a.clients[q] / w.clients[q] for w, a in rounds if w.clients[q])
        if ratios:
            lines.append(
                f"\nGood clients' {q[:3]}, with / without attackers, round by round: median "
                f"{_median(ratios):.2f}, range {ratios[0]:.2f} - {ratios[-1]:.2f}"
            )
    attackers: dict[str, dict[str, float]] = {}
    for w in loud:
        for kind, a in w.attackers.items():
            into = attackers.setdefault(kind, {})
            for key, value in a.items():
                into[key] = (
                    max(into.get(key, 0), value)
                    if key == "max_open"
                    else (into.get(key, 0) + value)
                )
    if attackers:
        lines += ["", "Attackers (all windows with attackers):", ""]
        lines.append(
            "| attacker | opened | closed by the engine | given up | connect failed "
            "| max open | sent MiB | replies ok | error replies | own CPU s |"
        )
        lines.append("|" + "---|" * 10)
        for kind, a in attackers.items():
            lines.append(
                f"| {kind} | {a['opened']:.0f} | {a['closed_by_engine']:.0f} | {a['recycled']:.0f} "
                f"| {a['connect_failed']:.0f} | {a['max_open']:.0f} "
                f"| {a['sent_bytes'] / MiB:.1f} | {a['replies_ok']:.0f} "
                f"| {a['replies_error']:.0f} | {a['cpu_s']:.1f} |"
            )
    for name, windows in (("without attackers", quiet), ("with attackers", loud)):
        changed: dict[str, float] = {}
        for w in windows:
            for key, value in w.counters.items():
                changed[key] = changed.get(key, 0.0) + value
        if any(changed.values()):
            lines += ["", f"Engine counters, windows {name} (increase):", ""]
            lines += [f"- `{k}` {v:.0f}" for k, v in sorted(changed.items()) if v]
    return "\n".join(lines)


def main() -> int:
    """Run the soak and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--duration", type=float, default=120.0, help="seconds per phase (with, without attackers)"
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="each phase is cut into this many alternating windows"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies attacker counts")
    parser.add_argument(
        "--engine-tree", metavar="PATH", help="run the engine of this source tree instead"
    )
    parser.add_argument(
        "--attack", action="append", choices=ATTACKS, help="only these attackers (default: all)"
    )
    args = parser.parse_args()
    attackers = args.attack or ATTACKS
    tree = Path(args.engine_tree).resolve() if args.engine_tree else None
    print(
        f"# soak: {args.duration:.0f} s per phase in {args.rounds} windows each, alternating; "
        f"attackers {', '.join(attackers)} (scale {args.scale}); engine on core(s) "
        f"{sorted(PROXY_CORE)}, upstreams, clients and attackers on {sorted(LOAD_CORE)}; "
        f"{cpu_model()}, {CORES} cores",
        flush=True,
    )
    if tree is not None:
        print(f"# engine tree {tree}, imports " + ", ".join(check_tree(tree)), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp, contextlib.ExitStack() as stack:
        ports = {}
        for name, reply, delay in (("small", 16, 0.0), ("big", MiB, 0.0), ("slow", 16, 5.0)):
            ports[name] = stack.enter_context(upstream(reply, delay))
        path = Path(tmp) / "soak.yaml"
        path.write_text(engine_yaml(ports))
        argv = [str(METAPROTOCOL), "proxy", "-c", str(path)]
        env = None
        if tree is not None:
            argv, env = [PY, "-P", "-c", _LAUNCH_TREE, "proxy", "-c", str(path)], tree_env(tree)
        engine = Proc(argv, PROXY_CORE, env=env)
        stack.callback(engine.stop)
        port = int(engine.expect(r"listening \S+ on [\d.]+:(\d+)").group(1))
        admin = engine.expect(r"admin on (\S+)").group(1)
        out, err = Drain(engine.p.stdout), Drain(engine.p.stderr)
        dump = fetch_json(admin, "/config_dump")
        settings = {k: v for k, v in _find_settings(dump).items() if k in _SETTINGS}
        print(f"# engine configuration ({path.name}):\n{path.read_text()}", flush=True)
        print("# effective limits (/config_dump): " + json.dumps(settings), flush=True)
        target = f"127.0.0.1:{port}"
        pid = engine.p.pid
        window = args.duration / args.rounds
        rounds = []
        for r in range(args.rounds):
            # Alternate which phase goes first, so a drift in the machine's load weighs on both.
            pair = {}
            for on in (False, True) if r % 2 == 0 else (True, False):
                name = f"round {r + 1}, {'with' if on else 'without'} attackers"
                print(f"  {name} ({window:.0f} s) ...", file=sys.stderr, flush=True)
                attacks = attackers if on else []
                pair[on] = run_phase(name, pid, target, admin, window, args.scale, attacks)
            rounds.append((pair[False], pair[True]))
        print("\n" + report(rounds), flush=True)
        print(f"\nEngine output during the soak: {out.lines} stdout, {err.lines} stderr lines")
        for line in out.first + err.first:
            print(f"    {line}")
    return 0


_SETTINGS = ("limits", "overload", "timeouts")


def _find_settings(dump: object) -> dict[str, object]:
    """The mapping of ``/config_dump`` that holds ``limits`` (the engine's settings)."""
    if isinstance(dump, dict):
        if "limits" in dump:
            return dump
        for value in dump.values():
            if found := _find_settings(value):
                return found
    if isinstance(dump, list):
        for value in dump:
            if found := _find_settings(value):
                return found
    return {}


if __name__ == "__main__":
    raise SystemExit(main())
