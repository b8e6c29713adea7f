"""The demo's orchestration: servers, engine, clients, live view, summary and cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Protocol, TextIO

from . import configs
from .clients import DubboLoad, Tally, ThriftLoad
from .display import PROGRESS_LEGEND, LiveView, RouteRow, proxy_counts, route_rows, summary
from .procs import Child, ChildError, node_child, python_child, stop_all

PROTOCOLS = ("thrift", "dubbo")


class Load(Protocol):
    """What the runner needs from a load client."""

    protocol: str

    def start(self) -> None: ...
    def snapshot(self) -> Tally: ...
    def stop(self) -> None: ...


@dataclass
class DemoResult:
    """What a demo run observed."""

    elapsed: float
    tallies: dict[str, Tally]
    stats_url: str = ""
    config_path: str = ""
    rows: list[RouteRow] = field(default_factory=list)
    interrupted: bool = False
    proxy_stats: str = ""
    hosts: dict[str, str] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        """Failed calls, all protocols."""
        return sum(t.errors for t in self.tallies.values())

    def to_json(self) -> str:
        """The summary as one JSON document."""
        return json.dumps(
            {
                "elapsed": round(self.elapsed, 3),
                "errors": self.errors,
                "stats_url": self.stats_url,
                "config": self.config_path,
                "routes": [r.to_dict() for r in self.rows],
            },
            indent=2,
        )


def _start_servers(protocols: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Start v1 and v2 of each protocol's server; returns protocol -> version -> port."""
    if "thrift" in protocols and find_spec("thriftpy2") is None:
        # Else each server child dies with an ImportError traceback.
        raise ChildError(
            "thriftpy2 is not installed: the demo's Thrift servers and clients are thriftpy2 "
            "peers; `pip install thriftpy2`, or run `./dev setup` in the repository (or run "
            "the Dubbo half alone with --protocol dubbo)"
        )
    children: dict[tuple[str, str], Child] = {}
    for version in ("v1", "v2"):
        if "thrift" in protocols:
            children["thrift", version] = python_child(
                f"thrift-server-{version}", "metaprotocol_sdk.demo.thrift_server", version
            )
        if "dubbo" in protocols:
            children["dubbo", version] = node_child(
                f"dubbo-provider-{version}", "provider", version
            )
    ports: dict[str, dict[str, int]] = {}
    for (protocol, version), child in children.items():
        ports.setdefault(protocol, {})[version] = child.wait_ready()
    return ports


def fetch_text(url: str, timeout: float = 2.0) -> str:
    """GET ``url`` and return the body as text."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
    return body.decode()


async def run_demo(
    *,
    duration: float | None,
    out: TextIO,
    tty: bool,
    rate: float = 100.0,
    protocols: tuple[str, ...] = PROTOCOLS,
    workdir: Path | None = None,
) -> DemoResult:
    """Run the demo until ``duration`` seconds pass (``None``: until cancelled).

    Everything started here is stopped in ``finally``, including on Ctrl-C (cancellation).
    """
    from metaprotocol_sdk.proxy import Engine, load_config

    loads: list[Load] = []
    engine: Engine | None = None
    started = time.monotonic()
    result = DemoResult(0.0, {p: Tally() for p in protocols})
    # The configuration stays on disk after the run, so it can be read and reused.
    workdir = workdir or Path(tempfile.mkdtemp(prefix="metaprotocol-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        out.write(f"starting servers v1 and v2 for {', '.join(protocols)} ...\n")
        out.flush()
        ports = await asyncio.to_thread(_start_servers, protocols)
        services = []
        if "thrift" in ports:
            services.append(configs.thrift_service(ports["thrift"]))
        if "dubbo" in ports:
            services.append(configs.dubbo_service(ports["dubbo"]))
        result.hosts = {svc.host: svc.protocol for svc in services}
        path = workdir / "demo.yaml"
        path.write_text(configs.demo_yaml(services))
        result.config_path = str(path)
        engine = Engine(load_config([str(path)]))
        await engine.start()
        assert engine.admin_address is not None, "the demo config enables the admin endpoint"
        admin_host, admin_port = engine.admin_address
        result.stats_url = f"http://{admin_host}:{admin_port}/stats"
        out.write(f"config   {path}\n")
        for svc in services:
            host, port = engine.listener_addresses[svc.host, svc.port]
            endpoints = ", ".join(f"{v} on 127.0.0.1:{p}" for v, p in sorted(svc.endpoints.items()))
            out.write(
                f"{svc.protocol:<8} {svc.host}:{svc.port} -> engine {host}:{port} -> {endpoints}\n"
            )
            load: Load = (
                ThriftLoad(port, rate) if svc.protocol == "thrift" else DubboLoad(port, rate)
            )
            loads.append(load)
        out.write(f"stats    {result.stats_url}\n")
        out.write(f"page     http://{admin_host}:{admin_port}/  (live, open in a browser)\n")
        out.write(
            "routes   sayhello-to-v2: method sayHello -> v2;  "
            "split-20-80: everything else -> v1 20% / v2 80%\n"
        )
        if duration is None:
            out.write("press Ctrl-C to stop\n")
        if not tty:
            out.write(f"{PROGRESS_LEGEND}\n")
        out.write("\n")
        out.flush()
        # The node consumer needs a moment to connect, so it starts first; then the clock.
        for load in sorted(loads, key=lambda load: load.protocol != "dubbo"):
            await asyncio.to_thread(load.start)
        view = LiveView(out, tty=tty)
        started = time.monotonic()
        while True:
            elapsed = time.monotonic() - started
            result.tallies = {load.protocol: load.snapshot() for load in loads}
            result.elapsed = elapsed
            view.update(result.tallies, elapsed)
            if duration is not None and elapsed >= duration:
                break
            await asyncio.sleep(0.25 if duration is None else min(0.25, duration - elapsed))
    except asyncio.CancelledError:
        # Ctrl-C: asyncio.Runner cancels this task; stop cleanly and report what we saw.
        result.interrupted = True
    finally:
        # Stop the clients first so that nothing counts the shutdown as errors.
        for load in loads:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(load.stop)
        if loads:
            result.tallies = {load.protocol: load.snapshot() for load in loads}
            result.elapsed = time.monotonic() - started
        if engine is not None:
            with contextlib.suppress(OSError):
                result.proxy_stats = await asyncio.to_thread(fetch_text, result.stats_url)
            with contextlib.suppress(Exception):
                await engine.stop(drain=0.5)
        await asyncio.to_thread(stop_all)
    result.rows = route_rows(result.tallies)
    return result


def print_summary(result: DemoResult, out: TextIO) -> None:
    """The final table."""
    proxy = proxy_counts(result.proxy_stats, result.hosts) if result.proxy_stats else None
    out.write("\n" + summary(result.tallies, result.elapsed, proxy) + "\n")
    for protocol, tally in result.tallies.items():
        if tally.last_error:
            out.write(f"last {protocol} error: {tally.last_error}\n")
    out.flush()
