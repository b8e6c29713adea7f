"""``metaprotocol proxy``: run the proxy engine from Istio/Aeraki-shaped YAML files."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import signal
import sys
from typing import TYPE_CHECKING

import click

from metaprotocol_sdk.errors import ConfigError

if TYPE_CHECKING:
    from metaprotocol_sdk.proxy import Config


#: Young-generation threshold of the cyclic garbage collector while serving (CPython's default
#: is 700): the request path allocates many short-lived containers that die by reference
#: counting, and collecting every 700 of them cost about 2 % of the CPU under load.
GC_YOUNG_THRESHOLD = 20_000


#: glibc ``mallopt`` parameters: frames up to this size are allocated from the heap, not
#: with a fresh ``mmap`` each (whose pages fault in one by one, then go back on ``free``).
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's upper bound for the setting
#: Free memory at the top of the heap kept for reuse rather than returned to the system.
TRIM_THRESHOLD = 64 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _tune_malloc() -> bool:
    """Keep large frames' memory for reuse (glibc only; elsewhere nothing changes).

    By default glibc maps each allocation above 128 KiB (rising dynamically) separately and
    unmaps it on free, so every large frame costs page faults for each of its pages: with
    1 MiB messages that was most of the engine's time outside the kernel's own copies.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def _tune_gc() -> None:
    """Set the collector up for serving: startup objects out of the way, fewer young passes."""
    gc.collect()
    gc.freeze()  # configuration, codecs, routes: permanent, never scanned again
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def _serve(config: Config, drain: float | None) -> int:
    from metaprotocol_sdk.proxy import Engine

    engine = Engine(config)
    try:
        await engine.start()
    except OSError as exc:
        click.echo(f"error: cannot bind: {exc}", err=True)
        return 1
    except ConfigError as exc:
        click.echo(f"error: invalid configuration: {exc}", err=True)
        return 2
    control_plane = None
    if config.proxy.xds is not None:  # imported only here: an engine without xDS needs no gRPC
        from metaprotocol_sdk.proxy.xds.client import XdsClient

        control_plane = XdsClient(engine, config)
        control_plane.start()
        click.echo(f"xds from {config.proxy.xds.address} as {config.proxy.xds.node.id}")
    for (host, port), (ip, bound) in engine.listener_addresses.items():
        click.echo(f"listening {host}:{port} on {ip}:{bound}")
    if engine.admin_address is not None:
        click.echo(f"admin on {engine.admin_address[0]}:{engine.admin_address[1]}")
    sys.stdout.flush()
    _tune_gc()
    _tune_malloc()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal stops at once (default action)
        with contextlib.suppress(NotImplementedError):
            loop.remove_signal_handler(sig)
    click.echo("draining", err=True)
    if control_plane is not None:
        await control_plane.stop()
    await engine.stop(drain=drain)
    return 0


def _load(files: tuple[str, ...]) -> Config:
    """The validated configuration, or exit 2 with one line on stderr.

    A configuration that serves nothing (no listeners) is refused here too, with what is
    missing: started anyway, it would sit silent forever.
    """
    from metaprotocol_sdk.proxy import load_config

    try:
        config = load_config(list(files))
    except ConfigError as exc:
        click.echo(f"error: invalid configuration: {exc}", err=True)
        sys.exit(2)
    if not config.proxy.listeners:
        click.echo(f"error: invalid configuration: {_nothing_to_serve(config, files)}", err=True)
        sys.exit(2)
    return config


def _nothing_to_serve(config: Config, files: tuple[str, ...]) -> str:
    """Why a configuration without listeners serves nothing, and what to add."""
    named = ", ".join(files)
    if not (config.services or config.routers or config.protocols):
        return (
            f"{named}: no resources: expected mesh resources (ApplicationProtocol, ServiceEntry, "
            "DestinationRule, MetaRouter) and a ProxyConfig whose spec.listeners says which "
            "service ports to serve"
        )
    services = {id(s): s for s in config.services.values()}.values()
    example = next(
        (
            f" (e.g. {{host: {s.hosts[0]}, port: {p}, bind: '127.0.0.1:{p}'}})"
            for s in services
            for p in s.ports
        ),
        "",
    )
    return (
        f"{named}: no listeners, so nothing would be served: add a ProxyConfig document "
        f"(kind: ProxyConfig) with spec.listeners, one per service port to serve{example}"
    )


def _check(files: tuple[str, ...]) -> None:
    config = _load(files)
    routes = sum(len(r.routes) for r in {id(r): r for r in config.routers.values()}.values())
    click.echo(
        f"configuration OK: {len(config.proxy.listeners)} listener(s), "
        f"{len({id(s) for s in config.services.values()})} service(s), {routes} route(s), "
        f"protocols: {', '.join(sorted(config.protocols)) or 'none'}"
    )


@click.command("proxy")
@click.option(
    "-c",
    "--config",
    "files",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False),
    help="YAML file (multi-document); repeat for several files.",
)
@click.option(
    "--drain", type=float, default=None, help="Drain deadline in seconds (default: config)."
)
@click.option("--no-uvloop", is_flag=True, help="Use the default asyncio event loop.")
@click.option("--check", is_flag=True, help="Validate the configuration, print a summary, exit.")
def command(files: tuple[str, ...], drain: float | None, no_uvloop: bool, check: bool) -> None:
    """Run the proxy engine: print the bound addresses, serve until SIGTERM/SIGINT, drain."""
    if check:
        _check(files)
        return
    factory = None
    if not no_uvloop:
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            factory = None
    config = _load(files)
    with asyncio.Runner(loop_factory=factory) as runner:
        code = runner.run(_serve(config, drain))
    sys.exit(code)
