"""``metaprotocol proxy``: run the proxy engine from Istio/Aeraki-shaped YAML files."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import hashlib
import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

import click

from metaprotocol_sdk.errors import ConfigError

from ._logging import DEFAULT_LEVEL, FORMATS, LEVELS
from ._logging import configure as configure_logging

if TYPE_CHECKING:
    from collections.abc import Callable

    from metaprotocol_sdk.proxy import Config, Engine
    from metaprotocol_sdk.proxy.hot_restart import HandoverServer, Predecessor
    from metaprotocol_sdk.proxy.output import BackgroundOutput
    from metaprotocol_sdk.proxy.service_manager import Successor
    from metaprotocol_sdk.proxy.workers import WorkerSpec
    from metaprotocol_sdk.proxy.xds.client import XdsClient


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


#: The command's own lines: startup errors, ``draining`` (written as :mod:`._logging` says).
log = logging.getLogger("metaprotocol.proxy")
#: One line per reload: ``reload ok`` (info), ``reload refused`` (warning), ``reload failed``.
reload_log = logging.getLogger("metaprotocol.proxy.reload")

#: ``--watch``: a change is acted on once the files' directories have been quiet this long, so
#: changes closer together are one (an editor's save is often several writes and a rename;
#: a writer that pauses mid-file must not have its first half applied).
WATCH_QUIET_MS = 300
#: ``--watch``: the longest a change waits while the directories never stay quiet.
WATCH_MAX_WAIT_MS = 5000


class EarlySighup:
    """A ``SIGHUP`` that comes while the process starts (reading its files, starting its
    engine or its workers), before its reload handler is in place: the signal's default
    action would end the process. It is remembered instead, and served once the process
    serves (a reload then reads the files again)."""

    wanted = False

    @classmethod
    def catch(cls) -> None:
        """Remember a ``SIGHUP`` from now on, until the reload handler replaces this."""
        with contextlib.suppress(AttributeError, ValueError):  # no SIGHUP; not main thread
            signal.signal(signal.SIGHUP, cls._note)

    @classmethod
    def _note(cls, signum: int, frame: object) -> None:
        cls.wanted = True

    @classmethod
    def take(cls) -> bool:
        """Whether a ``SIGHUP`` came since :meth:`catch` (and forget it)."""
        wanted, cls.wanted = cls.wanted, False
        return wanted


class Reloader:
    """Reloads the files given with ``-c`` on request (``SIGHUP``, ``--watch``), one at a time,
    writing one line per reload; a refused reload leaves the engine serving as it was."""

    def __init__(
        self,
        engine: Engine,
        files: tuple[str, ...],
        prepare: Callable[[Config], Config] | None = None,
    ) -> None:
        self.engine = engine
        self.files = files
        #: What a worker of ``--workers N`` changes in each configuration it loads.
        self.prepare = prepare
        self._wanted = asyncio.Event()
        self._source = "sighup"
        #: Content hash of the files at the last reload (or start): ``--watch`` skips events
        #: that changed nothing in them (a touched file, a neighbour in the same directory).
        self.seen: str | None = self.digest()
        #: With ``spec.xds``: reloads go through it, keeping the control plane's routes.
        self.control_plane: XdsClient | None = None
        #: When the configuration in force began to be read (``time.time_ns()``): a TLS
        #: file changed after it may not be what it read.
        self.read_at = 0

    def digest(self) -> str | None:
        """A hash of the files' bytes (``None``: one cannot be read now).

        Each file is read in chunks and at most one byte past the loader's limit (a larger
        file is refused by the loader anyway), so memory stays bounded whatever the file.
        """
        from metaprotocol_sdk.proxy.config.documents import MAX_CONFIG_BYTES

        h = hashlib.sha256()
        try:
            for name in self.files:
                with open(name, "rb") as f:
                    left = MAX_CONFIG_BYTES + 1
                    while left > 0 and (chunk := f.read(min(left, 1 << 16))):
                        h.update(chunk)
                        left -= len(chunk)
                h.update(b"\0")
        except OSError:
            return None
        return h.hexdigest()

    def request(self, source: str) -> None:
        """Ask for a reload (requests made while one runs make one more, not several)."""
        self._source = source
        self._wanted.set()

    async def run(self) -> None:
        """Serve reload requests until cancelled. A reload that fails unexpectedly (a bug, or
        a control-plane stream that broke mid-reload) is logged and counted as refused; the
        next request is served as usual."""
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            source = self._source
            try:
                await self.reload(source)
            except Exception as exc:  # one failed reload must not end reloading
                # The trace, on demand (--log-level debug).
                reload_log.debug("reload failed (%s)", source, exc_info=True)
                self.engine.refused(source, f"reload failed: {type(exc).__name__}: {exc}")
                reload_log.error("reload failed (%s): %s: %s", source, type(exc).__name__, exc)

    async def reload(self, source: str) -> bool:
        """Load the files, apply them; one line on stderr either way. ``True``: applied."""
        from metaprotocol_sdk.proxy import load_config

        digest = await asyncio.to_thread(self.digest)  # off the loop, like the load
        if source == "watch" and digest is not None and digest == self.seen:
            return False  # the files' contents did not change
        self.seen = digest
        try:
            read_at = time.time_ns()
            # Off the loop: parsing a large file must not stall the requests being served.
            config = await asyncio.to_thread(load_config, list(self.files))
            if self.prepare is not None:
                config = self.prepare(config)
        except (ConfigError, OSError) as exc:
            self.engine.refused(source, str(exc))
            reload_log.warning("reload refused (%s): %s", source, exc)
            return False
        try:
            if self.control_plane is not None:
                await self.control_plane.rebase(config, source=source)
            else:
                await self.engine.apply(config, source=source)
        except ConfigError as exc:
            reload_log.warning("reload refused (%s): %s", source, exc)
            return False
        self.read_at = read_at
        reload_log.info("reload ok (%s): version %s", source, self.engine.config_version)
        return True


async def _watch(files: tuple[str, ...], reloader: Reloader, stop: asyncio.Event) -> None:
    """Ask for a reload whenever something changes in the files' directories (the reloader
    skips changes that leave the files' contents as they were). Directories, not the files,
    are watched: editors and Kubernetes ConfigMaps replace a file by a rename (a ConfigMap
    swaps its ``..data`` symlink, in the directory itself: subdirectories are not watched)."""
    from watchfiles import awatch

    directories = sorted({os.path.dirname(os.path.abspath(f)) for f in files})
    try:
        async for _ in awatch(
            *directories,
            debounce=WATCH_MAX_WAIT_MS,
            step=WATCH_QUIET_MS,
            stop_event=stop,
            recursive=False,
        ):
            reloader.request("watch")
    except Exception as exc:  # a directory removed, a watch limit reached: say so, keep serving
        reload_log.warning("watch stopped: %s; SIGHUP still reloads", exc)


async def _follow_tls_files(engine: Engine, reloader: Reloader, stop: asyncio.Event) -> None:
    """Reload when a TLS file of the configuration in force changed (``spec.tlsFiles``; see
    :mod:`metaprotocol_sdk.proxy.tls_files`): a certificate renewed on disk serves without a
    ``SIGHUP``. Files caught half-written make a refused reload; the next change makes
    another."""
    from metaprotocol_sdk.proxy.tls_files import FileSignature, signatures, tls_paths

    seen: tuple[tuple[str, ...], tuple[FileSignature, ...]] | None = None
    read: tuple[Config, tuple[str, ...]] | None = None  # the paths of the configuration in force
    while True:
        config = engine.config
        interval = config.proxy.tls_files_check
        if interval is None:
            seen = None
        else:
            if read is None or read[0] is not config:  # off the loop: xDS makes them many
                read = (config, await asyncio.to_thread(tls_paths, config))
            paths = read[1]
            now = (paths, await asyncio.to_thread(signatures, paths))
            if seen is None or paths != seen[0]:  # first look at these: changed since read?
                changed = any(s is not None and s.mtime_ns > reloader.read_at for s in now[1])
            else:
                changed = now != seen
            if changed:
                reload_log.info("TLS files changed: reloading")
                reloader.request("tls_files")
            seen = now
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 5.0 if interval is None else interval)
            return


def _refuse_while_draining(engine: Engine) -> None:
    """A ``SIGHUP`` after ``SIGTERM``: nothing to reload into; counted and said, not fatal."""
    error = "the engine is draining (SIGTERM); nothing was changed"
    engine.refused("sighup", error)
    reload_log.warning("reload refused (sighup): %s", error)


async def _serve(
    config: Config,
    drain: float | None,
    files: tuple[str, ...] = (),
    watch: bool = False,
    worker: WorkerSpec | None = None,
    output: BackgroundOutput | None = None,
    hot_restart: str | None = None,
    *,
    read_at: int = 0,
) -> int:
    from metaprotocol_sdk.proxy import Engine
    from metaprotocol_sdk.proxy.hot_restart import HotRestartError
    from metaprotocol_sdk.proxy.service_manager import Successor, notify
    from metaprotocol_sdk.proxy.workers import bind_failure

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # From the start: whoever reads the addresses may stop us at once, and SIGTERM's default
    # action would end the process undrained (a supervisor would count it unclean); one that
    # comes while a hot restart's successor starts makes it give up (its predecessor serves).
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    predecessor = None
    if hot_restart is not None:
        from metaprotocol_sdk.proxy.hot_restart import take_over

        try:
            predecessor = await take_over(hot_restart, config)
        except HotRestartError as exc:
            log.error("hot restart: %s", exc)
            return 1
    engine = Engine(
        config,
        reuse_port=worker is not None,
        inherited=None if predecessor is None else predecessor.inherited,
    )
    if output is not None:
        output.count_into(engine.stats.counter("metaprotocol_output_dropped_bytes_total"))
    try:
        await engine.start(serve=predecessor is None)
    except (OSError, ConfigError) as exc:
        if predecessor is not None:  # it keeps serving, as it was
            predecessor.abandon()
        if isinstance(exc, ConfigError):
            log.error("invalid configuration: %s", exc)
            return 2
        log.error("%s", bind_failure(exc))
        return 1
    handover = None
    successor = Successor()
    if hot_restart is not None:
        handover = _handover(engine, hot_restart, predecessor, stop, successor)
        if handover is None:
            await engine.stop(drain=0)
            return 1
    on_usr2: Callable[[], object] = _no_hot_restart
    if worker is not None:  # (one of --workers N: its supervisor replaces it)
        on_usr2 = _not_to_a_worker
    elif handover is not None:
        on_usr2 = successor.start
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGUSR2, on_usr2)
    reloader = Reloader(engine, files, worker.apply if worker is not None else None)
    reloader.read_at = read_at
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGHUP, reloader.request, "sighup")
    if EarlySighup.take():  # it came while the engine started
        reloader.request("sighup")
    control_plane = None
    if config.proxy.xds is not None:  # imported only here: an engine without xDS needs no gRPC
        from metaprotocol_sdk.proxy.xds.client import XdsClient

        # Each worker of --workers N holds its own stream to the control plane.
        control_plane = XdsClient(engine, config)
        control_plane.start()
        reloader.control_plane = control_plane  # file reloads keep the routes received
    tasks = [asyncio.ensure_future(reloader.run())]
    if predecessor is not None:
        assert handover is not None
        try:
            await _take_over(engine, predecessor, control_plane, stop)
        except HotRestartError as exc:
            if stop.is_set() or not await predecessor.died():
                log.error("hot restart: %s; pid %d serves on", exc, predecessor.pid)
                predecessor.abandon()
                handover.close()
                for task in tasks:
                    task.cancel()
                if control_plane is not None:
                    await control_plane.stop()
                await engine.stop(drain=0)
                return 1
            # It crashed with its sockets in this process: serving them beats leaving
            # nothing serving (the counts it had sent are in).
            log.warning(
                "hot restart: pid %d died during the takeover (%s); serving on its sockets",
                predecessor.pid,
                exc,
            )
            predecessor.orphaned()
            await engine.begin_serving()
            handover.publish()
        else:
            tasks.append(asyncio.ensure_future(_follow(predecessor, handover)))
    elif handover is not None:
        handover.publish()
    if worker is not None:  # one of --workers N: its supervisor prints the addresses
        worker.announce(engine)
        await worker.watch_supervisor(stop.set)
    else:
        if config.proxy.xds is not None:
            click.echo(f"xds from {config.proxy.xds.address} as {config.proxy.xds.node.id}")
        for (host, port), (ip, bound) in engine.listener_addresses.items():
            click.echo(f"listening {host}:{port} on {ip}:{bound}")
        if engine.admin_address is not None:
            click.echo(f"admin on {engine.admin_address[0]}:{engine.admin_address[1]}")
    sys.stdout.flush()
    if worker is None:  # systemd's Type=notify: serving, and (a successor) the main process
        notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving")
    _tune_gc()
    _tune_malloc()
    if watch:
        tasks.append(asyncio.ensure_future(_watch(files, reloader, stop)))
    tasks.append(asyncio.ensure_future(_follow_tls_files(engine, reloader, stop)))
    await stop.wait()
    sds = sys.modules.get("metaprotocol_sdk.proxy.sds")  # imported: an SDS identity was loaded
    if sds is not None:  # a reload waiting for its server must not hold the exit
        sds.cancel_fetches()
    taken = handover is not None and handover.successor is not None
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal stops at once (default action)
        with contextlib.suppress(NotImplementedError):
            if taken:  # no signal came yet: the first one drains on
                loop.add_signal_handler(sig, _signalled_while_taken_over, loop)
            else:
                loop.remove_signal_handler(sig)
    with contextlib.suppress(NotImplementedError):
        # Not removed: without a handler SIGHUP's default action ends the process, cutting
        # the drain short and every request in flight with it.
        loop.add_signal_handler(signal.SIGHUP, _refuse_while_draining, engine)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if worker is None and not taken:  # (a successor serves the unit on)
        notify("STOPPING=1")
    log.info("draining (taken over)" if taken else "draining")
    if control_plane is not None:
        await control_plane.stop()
    # Taken over: the successor accepts on the same sockets; the open connections are
    # served a while longer (see Engine.stop).
    await engine.stop(drain=drain, serve_first=taken)
    if handover is not None:
        await handover.finish()
    return 0


def _signalled_while_taken_over(loop: asyncio.AbstractEventLoop) -> None:
    """``SIGTERM`` or ``SIGINT`` to a process draining for its successor (a service manager's
    stop reaches every process of the unit): it drains on, as at any first signal."""
    log.warning("draining for the successor already; a second signal ends at once")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)


def _no_hot_restart() -> None:
    log.warning("SIGUSR2 starts a hot restart only with --hot-restart PATH; ignored")


def _not_to_a_worker() -> None:
    log.warning("SIGUSR2 to a worker is ignored: send it to the supervisor (it replaces them)")


def _handover(
    engine: Engine,
    path: str,
    predecessor: Predecessor | None,
    stop: asyncio.Event,
    successor: Successor,
) -> HandoverServer | None:
    """Listen for this engine's own successor (``--hot-restart``); ``None``: cannot (said)."""
    from metaprotocol_sdk.proxy.hot_restart import HandoverServer

    generation = 0 if predecessor is None else predecessor.generation

    def taken_over(pid: int) -> None:
        engine.hand_over()  # the successor accepts on the same sockets from now on
        successor.taken_over.set()
        stop.set()

    handover = HandoverServer(engine, path, generation, taken_over)
    try:
        handover.open()
    except OSError as exc:
        log.error("hot restart: cannot listen at %s: %s", path, exc.strerror or exc)
        if predecessor is not None:
            predecessor.abandon()
        return None
    engine.stats.gauge("metaprotocol_hot_restart_generation").value = generation
    engine.dump_sections["hotRestart"] = lambda: {
        **handover.dump(),
        "predecessor": None if predecessor is None else predecessor.dump(),
    }
    return handover


async def _take_over(
    engine: Engine,
    predecessor: Predecessor,
    control_plane: XdsClient | None,
    stop: asyncio.Event,
) -> None:
    """The new process's part of a hot restart, once its engine is built: the predecessor's
    counts, the control plane's first routes (as Envoy waits for its initial fetch), then the
    predecessor stops accepting and this engine starts."""
    from metaprotocol_sdk.proxy.hot_restart import HotRestartError

    await predecessor.import_stats(engine.stats)
    if control_plane is not None:
        settings = engine.config.proxy.xds
        assert settings is not None
        fetched = asyncio.ensure_future(
            control_plane.wait_for(
                lambda client: client.initialized, settings.initial_fetch_timeout
            )
        )
        stopping = asyncio.ensure_future(stop.wait())
        # A predecessor that dies meanwhile leaves nobody accepting: no more waiting then.
        died = asyncio.ensure_future(predecessor.died(within=None))
        await asyncio.wait((fetched, stopping, died), return_when=asyncio.FIRST_COMPLETED)
        for task in (stopping, fetched, died):
            task.cancel()
        # (each one's outcome retrieved: one failing in the same turn is no stray exception)
        await asyncio.gather(stopping, died, return_exceptions=True)
        if died.done() and not died.cancelled():
            raise HotRestartError("it exited while this process waited for the control plane")
        if fetched.done() and not fetched.cancelled() and fetched.exception() is not None:
            log.warning(
                "hot restart: no configuration from the control plane within "
                "spec.xds.initialFetchTimeout; taking over with the files' alone"
            )
    if stop.is_set():  # SIGTERM while starting: the predecessor serves on
        raise HotRestartError("stopped (SIGTERM) before taking over")
    await predecessor.drain()
    await engine.begin_serving()
    log.info(
        "hot restart: took over from pid %d (generation %d)",
        predecessor.pid,
        predecessor.generation,
    )


async def _follow(predecessor: Predecessor, handover: HandoverServer) -> None:
    """Add the predecessor's counts while it drains; then be the next one's predecessor."""
    await predecessor.follow()
    if predecessor.state == "done":
        log.info("hot restart: pid %d has drained; its counts are in", predecessor.pid)
    handover.publish()


def _load(files: tuple[str, ...], quiet: bool = False) -> Config:
    """The validated configuration, or exit 2 with one line on stderr.

    A configuration that serves nothing (no listeners) is refused here too, with what is
    missing: started anyway, it would sit silent forever. ``quiet``: the configuration's
    warnings are not logged (a worker starting for the first time: its supervisor has just
    logged them, for the same files).
    """
    from metaprotocol_sdk.proxy import load_config

    config_log = logging.getLogger("metaprotocol.config")
    drop = _drop_every_record
    if quiet:
        config_log.addFilter(drop)
    try:
        config = load_config(list(files))
    except ConfigError as exc:
        log.error("invalid configuration: %s", exc)
        sys.exit(2)
    finally:
        config_log.removeFilter(drop)
    if log.isEnabledFor(logging.DEBUG):  # the hash costs a walk over the whole configuration
        from metaprotocol_sdk.proxy.reload import config_version

        log.debug("loaded %s: version %s", ", ".join(files), config_version(config))
    if not config.proxy.listeners:
        log.error("invalid configuration: %s", _nothing_to_serve(config, files))
        sys.exit(2)
    return config


def _drop_every_record(record: logging.LogRecord) -> bool:
    return False


def _said_by_worker_0(record: logging.LogRecord) -> bool:
    """The filter of the other workers' configuration warnings, for good (not the one
    ``_load`` adds and removes around a quiet load)."""
    return False


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
    policies = _policies_summary(config)
    if policies:
        click.echo(policies)


def _policies_summary(config: Config) -> str:
    """Which PeerAuthentication and AuthorizationPolicies apply, for which workload (``""``:
    the files have none)."""
    settings = config.proxy
    if settings.xds is not None and settings.xds.inbound_listener is not None:
        return (
            "policies: mutual TLS modes and AuthorizationPolicies from the control plane's "
            f"inbound listener {settings.xds.inbound_listener!r} (every request is denied "
            "until it arrives)"
        )
    authz, peer, skipped = (
        settings.authorization,
        settings.peer_authentication,
        settings.policies_not_applied,
    )
    if authz is None and peer is None and not skipped:
        return ""
    parts = [f"PeerAuthentication {peer.mode if peer is not None else 'none'}"]
    parts.append(
        "AuthorizationPolicy "
        + (
            "none"
            if authz is None
            else f"{len(authz.allow)} ALLOW, {len(authz.deny)} DENY, {len(authz.audit)} AUDIT"
        )
        + (
            f" ({len(authz.dry_allow)} ALLOW, {len(authz.dry_deny)} DENY in dry run)"
            if authz is not None and (authz.dry_allow or authz.dry_deny)
            else ""
        )
    )
    scope = settings.policy_scope
    if scope is None:
        return (
            "policies: the workload's namespace is not known (POD_NAMESPACE, "
            "spec.telemetry.workload.namespace), so every policy in the files applies: "
            + "; ".join(parts)
        )
    labels = ", ".join(f"{k}={v}" for k, v in sorted(scope.labels.items())) or "none"
    if skipped:
        parts.append(
            f"{len(skipped)} not applied (see the info lines, or /config_dump policiesNotApplied)"
        )
    return (
        f"policies for namespace {scope.namespace} (labels {labels}; root namespace "
        f"{scope.root_namespace}): " + "; ".join(parts)
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
    "--drain",
    type=float,
    default=None,
    metavar="SECONDS",
    help="Drain deadline in seconds (default: timeouts.drain).",
)
@click.option("--no-uvloop", is_flag=True, help="Use the default asyncio event loop.")
@click.option("--check", is_flag=True, help="Validate the configuration, print a summary, exit.")
@click.option(
    "--watch",
    is_flag=True,
    help="Reload when a configuration file changes (as on SIGHUP; see docs/reload.md).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 1024),
    default=1,
    metavar="N",
    show_default=True,
    help="Serving processes sharing the listeners (SO_REUSEPORT) under one supervisor.",
)
@click.option(
    "-l",
    "--log-level",
    type=click.Choice(list(LEVELS)),
    default=DEFAULT_LEVEL,
    show_default=True,
    help="Lowest level of the log records written to stderr.",
)
@click.option(
    "--log-format",
    type=click.Choice(FORMATS),
    default="text",
    show_default=True,
    help="Log records as 'LEVEL: message' lines, or one JSON object per line.",
)
@click.option(
    "--hot-restart",
    "hot_restart",
    metavar="PATH",
    type=click.Path(dir_okay=False),
    default=None,
    help="Take over the engine serving at this Unix socket, if any (its listening sockets and "
    "counters; it drains), then listen there for the next one (see docs/hot-restart.md).",
)
@click.option("--worker", "worker_of", hidden=True, help="Internal: run as one of --workers.")
def command(
    files: tuple[str, ...],
    drain: float | None,
    no_uvloop: bool,
    check: bool,
    watch: bool,
    workers: int,
    log_level: str,
    log_format: str,
    hot_restart: str | None,
    worker_of: str | None,
) -> None:
    """Run the proxy engine: print the bound addresses, serve until SIGTERM/SIGINT, drain.

    SIGHUP reloads the files (a bad configuration is refused and the old one keeps serving).
    Log records (configuration warnings, reloads, the watchdog) go to stderr, one per line.
    """
    spec = None
    if worker_of is not None:
        from metaprotocol_sdk.proxy.workers import WorkerSpec

        spec = WorkerSpec.from_json(worker_of)
    configure_logging(log_level, log_format, None if spec is None else spec.index)
    if check:
        _check(files)
        return
    EarlySighup.catch()  # before the files are read: a SIGHUP now must not end the process
    from metaprotocol_sdk.proxy.output import background_output

    if hot_restart is not None:
        from metaprotocol_sdk.proxy.hot_restart import available

        refused = available(hot_restart) or (
            f"not with --workers {workers}: SIGUSR2 to the supervisor replaces its workers "
            "(see docs/hot-restart.md)"
            if workers > 1
            else None
        )
        if refused:
            log.error("--hot-restart: %s", refused)
            sys.exit(2)
    if workers > 1 and spec is None:
        from metaprotocol_sdk.proxy import workers as several

        refused = several.reuse_port_unavailable()
        if refused:
            log.error("--workers %d needs shared listeners: %s", workers, refused)
            sys.exit(2)
        argv = several.worker_command(files, drain, no_uvloop, watch, log_level, log_format)
        config = _load(files)
        with background_output():
            code = several.supervise(config, argv, workers, drain, EarlySighup.take)
        sys.exit(code)
    factory = None
    if not no_uvloop:
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            factory = None
    if spec is not None and not spec.reports_config:  # worker 0 says it for every worker
        logging.getLogger("metaprotocol.config").addFilter(_said_by_worker_0)
    read_at = time.time_ns()  # a TLS file changed after this may not be what was read
    config = _load(files, quiet=spec is not None and spec.quiet_config)
    if spec is not None:
        config = spec.apply(config)
    with background_output() as output, asyncio.Runner(loop_factory=factory) as runner:
        code = runner.run(
            _serve(config, drain, files, watch, spec, output, hot_restart, read_at=read_at)
        )
    sys.exit(code)
