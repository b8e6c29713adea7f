"""Several serving processes: the supervisor behind ``metaprotocol proxy --workers N``.

The supervisor serves no traffic. It binds every listener's port first (``SO_REUSEPORT``,
never listening, so the kernel gives it no connection), which fixes the port of a ``:0``
listener for every worker and keeps it across worker restarts. It then starts N workers,
each a fresh interpreter running ``metaprotocol proxy`` with the hidden ``--worker`` option
(no fork of a process that has threads or an event loop): an ordinary engine whose listeners
bind the same ports with ``SO_REUSEPORT``, so the kernel spreads new connections over them,
and whose admin endpoint listens on ``127.0.0.1:0`` for the supervisor only.

* The configured admin endpoint is the supervisor's (:class:`WorkersAdmin`): ``/stats`` sums
  the workers' counters and histograms, shows gauges per worker and summed, and adds
  ``metaprotocol_worker_restarts_total`` and ``metaprotocol_worker_up``; ``/config_dump`` is a
  worker's, plus a ``workers`` list. Each worker is asked with a bounded timeout, so a stuck
  worker costs one timeout, not the endpoint; requests that come while one is being answered
  share its answer (:meth:`Supervisor.shared`).
* ``SIGTERM``/``SIGINT`` drain: forwarded once to every worker, which drains as a single
  engine does; a worker still running after the drain deadline (plus :data:`STOP_GRACE`) is
  killed. A second signal kills them at once. The exit status is 0 only when every serving
  worker drained cleanly: else that of the first worker that did not (:func:`stop_status`:
  70 for its watchdog, 137 for a kill). ``SIGHUP`` is forwarded: each worker reloads its own
  configuration (one not serving yet, once it serves).
* A worker that exits (a crash, or its watchdog ending it: ``watchdog.killTimeout``) is
  started again after a capped exponential delay (:func:`restart_delay`) and counted. A
  worker watches its standard input, a pipe from the supervisor: when the supervisor is gone
  (even killed with ``SIGKILL``), the worker drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .admin import PROMETHEUS, WORKER_FORMAT, Streamed, _AdminServer, _response, json_parts
from .admin_page import merge_live, page_html
from .config.models import Admin
from .service_manager import notify
from .stats import Stats
from .stats_merge import WORKER_LABEL, CounterFloor, MergedStats, WorkerFeed
from .watchdog import KILL_STATUS
from .writer import BackgroundWriter

if TYPE_CHECKING:
    from .config.models import Config
    from .engine import Engine

log = logging.getLogger("metaprotocol.proxy.workers")

T = TypeVar("T")


def bind_failure(exc: OSError) -> str:
    """The error line for a listener or admin address the engine cannot bind, with what to
    do when another process holds it."""
    line = f"cannot bind: {exc}"
    if exc.errno == errno.EADDRINUSE:
        line += (
            "; another process listens there: stop it, or change that bind in the "
            "ProxyConfig ('127.0.0.1:0' picks a free port)"
        )
    return line


#: What a worker prints on its standard output, then one line of JSON, once it serves.
READY = "metaprotocol-worker-ready "
#: How long a worker may take to start serving before it is killed (and started again).
START_TIMEOUT = 60.0
#: First and largest delay before a worker that exited is started again, in seconds.
RESTART_MIN = 0.1
RESTART_MAX = 10.0
#: A worker that served this long before exiting restarts after :data:`RESTART_MIN` again.
STABLE_AFTER = 30.0
#: Beyond the drain deadline: time a worker gets to finish stopping before it is killed.
STOP_GRACE = 5.0
#: Longest wait for one worker's admin answer (at most half of ``admin.requestTimeout``).
WORKER_TIMEOUT = 1.0
#: Largest admin answer read from a worker (``/config_dump``, ``/stats/live``); the stats
#: are read line by line instead (:func:`read_stats`).
WORKER_REPLY_BYTES = 64 * 1024 * 1024
#: Longest line of a worker's stats (one series: its labels once, a histogram's counts).
STATS_LINE_BYTES = 1024 * 1024
#: Series a worker may send beyond its ``limits.maxStatsSeries``: the process-wide series
#: (made whatever the cap) and the ``stats="overflow"``/``"removed"`` folds, a bounded set.
STATS_SLACK = 10_000
#: Lines of a worker's stats merged between two turns of the supervisor's event loop.
STATS_TURN_LINES = 2000
#: Access log paths that mean standard error (``accesslog.AccessLog``), shared as it is.
STDERR_NAMES = ("-", "stderr", "/dev/stderr")

#: Bytes of the workers' output waiting to be written to ours, above which it is dropped.
OUTPUT_BACKLOG = 1 << 20

#: How long the supervisor, exiting, waits for the workers' last output to be written.
OUTPUT_CLOSE_WAIT = 2.0
#: ``Node.metadata`` field naming the worker of an xDS stream. Every worker sends the
#: configured node id unchanged: istiod parses it (``type~ip~pod.namespace~domain``) and tells
#: streams apart by a connection id of its own, and Aeraki's snapshot cache answers every
#: stream of a node id; this field lets a control plane's logs say which worker is which.
WORKER_METADATA = "METAPROTOCOL_WORKER"
#: Series of the workers' own admin endpoints, which only the supervisor queries: the
#: supervisor's replace them.
_ADMIN_SERIES = ("metaprotocol_admin_",)


def reuse_port_unavailable() -> str | None:
    """Why listeners cannot be shared by several processes here (``None``: they can)."""
    option = getattr(socket, "SO_REUSEPORT", None)
    if option is None:
        return "this platform has no SO_REUSEPORT"
    if not sys.platform.startswith("linux"):
        # macOS and the BSDs accept the option but do not spread connections with it
        # (FreeBSD's balancing option is another one, SO_REUSEPORT_LB).
        return f"SO_REUSEPORT does not spread connections over processes on {sys.platform}"
    try:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, option, 1)
    except OSError as exc:
        return f"SO_REUSEPORT is refused here: {exc}"
    return None


def restart_delay(failures: int) -> float:
    """Seconds before starting a worker again after ``failures`` earlier quick exits in a row
    (0: the first, or the first after a stable run)."""
    return float(min(RESTART_MAX, RESTART_MIN * 2 ** min(max(failures, 0), 32)))


def hold_ports(config: Config) -> tuple[list[socket.socket], dict[str, int]]:
    """Bind (never listen on) every listener's address with ``SO_REUSEPORT``.

    Returns the sockets, to keep open while the workers serve, and each listener's port by
    listener name (a ``:0`` listener's port as chosen here, shared by every worker).
    """
    held: list[socket.socket] = []
    ports: dict[str, int] = {}
    try:
        for listener in config.proxy.listeners:
            port = listener.bind_port
            infos = socket.getaddrinfo(
                listener.bind_host or None,
                port,
                type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE,
            )
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                held.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address[0], port, *address[2:]))
                port = sock.getsockname()[1]
            ports[listener.name] = port
    except OSError:
        for sock in held:
            sock.close()
        raise
    return held, ports


@dataclass(frozen=True)
class WorkerSpec:
    """What the supervisor tells one worker (the hidden ``--worker`` option, as JSON)."""

    index: int
    #: Each listener's port by listener name (``host:port``).
    ports: dict[str, int]
    #: The worker's first start: the supervisor has just logged the configuration's warnings,
    #: so the worker's own load of the same files does not repeat them.
    quiet_config: bool = False

    @property
    def reports_config(self) -> bool:
        """Whether this worker logs the configuration's warnings at all (its restarts, its
        reloads, its xDS updates): worker 0 only. Every worker loads the same files, and N
        copies of each warning would be noise (see docs/workers.md)."""
        return self.index == 0

    def to_json(self) -> str:
        """The option's value."""
        return json.dumps({"index": self.index, "ports": self.ports, "quiet": self.quiet_config})

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        """Read the option's value."""
        data = json.loads(text)
        ports = {str(k): int(v) for k, v in data["ports"].items()}
        return cls(int(data["index"]), ports, bool(data.get("quiet", False)))

    def apply(self, config: Config) -> Config:
        """``config`` as this worker serves it: the shared ports, a private admin endpoint,
        and an access log file of its own (``PATH.workerN``: buffered lines written by
        several processes to one file could interleave mid-line; stderr is line-buffered)."""
        settings = config.proxy
        listeners = tuple(
            replace(lsn, bind_port=self.ports.get(lsn.name, lsn.bind_port))
            for lsn in settings.listeners
        )
        shown = settings.admin or Admin(("127.0.0.1", 0))
        admin = replace(shown, bind=("127.0.0.1", 0), allow_remote=False)
        access_log = settings.access_log
        if access_log is not None and access_log.path not in (None, *STDERR_NAMES):
            access_log = replace(access_log, path=f"{access_log.path}.worker{self.index}")
        xds = settings.xds
        if xds is not None:  # the same node id (see docs/workers.md); its streams told apart
            metadata = {**xds.node.metadata, WORKER_METADATA: str(self.index)}
            xds = replace(xds, node=replace(xds.node, metadata=metadata))
        return replace(
            config,
            proxy=replace(
                settings, listeners=listeners, admin=admin, access_log=access_log, xds=xds
            ),
        )

    def announce(self, engine: Engine) -> None:
        """Tell the supervisor (one line on standard output) that this worker serves."""
        listeners = [
            {"name": f"{host}:{port}", "ip": ip, "port": bound}
            for (host, port), (ip, bound) in engine.listener_addresses.items()
        ]
        ready = {"pid": os.getpid(), "listeners": listeners, "admin": engine.admin_address}
        sys.stdout.write(READY + json.dumps(ready) + "\n")
        sys.stdout.flush()

    @staticmethod
    async def watch_supervisor(gone: Callable[[], None]) -> None:
        """Call ``gone`` when standard input (the supervisor's pipe) closes."""

        class _Watch(asyncio.Protocol):
            def connection_lost(self, exc: Exception | None) -> None:
                gone()

        await asyncio.get_running_loop().connect_read_pipe(_Watch, sys.stdin)


@dataclass
class Worker:
    """The supervisor's record of one worker slot."""

    index: int
    process: asyncio.subprocess.Process | None = None
    #: The running worker's admin endpoint (``None`` until it serves).
    admin: tuple[str, int] | None = None
    #: Its listeners as it announced them: ``{"name", "ip", "port"}``.
    listeners: list[dict[str, Any]] = field(default_factory=list)
    started: float = 0.0
    restarts: int = 0
    #: Quick exits in a row (the restart delay grows with them).
    failures: int = 0
    #: A ``SIGHUP`` came while it was not serving: it is sent one once it serves.
    reload_wanted: bool = False
    #: Times a successor took its place (``SIGUSR2``, a hot restart).
    hot_restarts: int = 0
    #: While a successor starts: done once it serves (``True``) or failed (``False``).
    replacing: asyncio.Future[bool] | None = None

    @property
    def running(self) -> bool:
        """True while its process has not exited."""
        return self.process is not None and self.process.returncode is None


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    if code == KILL_STATUS:
        return f"exit status {code}: its watchdog ended it, its event loop was stuck"
    return f"exit status {code}"


def stop_status(code: int) -> int:
    """The supervisor's exit status for a worker's unclean exit ``code`` (a process's return
    code: negative for a signal): its own status, or 128 + the signal's number, as a shell
    reports a process a signal ended (137 for ``SIGKILL``)."""
    return code if code > 0 else 128 - code


async def admin_get(address: tuple[str, int], path: str, timeout: float) -> tuple[int, bytes]:
    """GET ``path`` from a worker's admin endpoint: ``(status, body)``, within ``timeout``."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(*address)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: worker\r\n\r\n".encode())
            data = bytearray()
            while chunk := await reader.read(65536):
                data += chunk
                if len(data) > WORKER_REPLY_BYTES:
                    raise ValueError(f"answer over {WORKER_REPLY_BYTES} bytes")
        finally:
            writer.close()
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


class StatsTruncated(Exception):
    """A worker sent more series than the supervisor reads from one worker."""


async def read_stats(
    address: tuple[str, int], feed: WorkerFeed, first: float, whole: float, most: int
) -> None:
    """Merge a worker's ``/stats?format=worker`` into ``feed`` as it arrives, line by line:
    the answer starts within ``first`` seconds and ends within ``whole``; over ``most``
    series and families raises :class:`StatsTruncated` (what was read stays merged)."""
    async with asyncio.timeout(whole):
        async with asyncio.timeout(first):
            reader, writer = await asyncio.open_connection(*address, limit=STATS_LINE_BYTES)
        try:
            writer.write(f"GET /stats?{WORKER_FORMAT} HTTP/1.1\r\nHost: worker\r\n\r\n".encode())
            async with asyncio.timeout(first):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    raise ValueError(f"a head over {STATS_LINE_BYTES} bytes") from None
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                raise ValueError(f"status {status}")
            lines = 0
            while line := await reader.readline():
                if not line.endswith(b"\n"):
                    raise ValueError("the answer ended mid-line")
                feed.line(line[:-1].decode("utf-8", "replace"))
                if feed.series > most:
                    raise StatsTruncated(f"over {most} series")
                lines += 1
                if lines % STATS_TURN_LINES == 0:
                    await asyncio.sleep(0)  # /ready and the other workers' answers
        finally:
            writer.close()


class Supervisor:
    """Starts, watches, restarts and stops the workers; serves the combined admin endpoint.

    ``command`` is how a worker starts, before its ``--worker`` option (``metaprotocol
    proxy`` with the same configuration files and options).
    """

    def __init__(
        self, config: Config, command: Sequence[str], count: int, drain: float | None
    ) -> None:
        self.config = config
        self.command = list(command)
        self.workers = [Worker(i) for i in range(count)]
        self.drain = config.proxy.timeouts.drain if drain is None else drain
        self.stats = Stats()
        #: The summed counters and histograms last published: none goes down (a worker
        #: that did not answer, or started again after a crash; see CounterFloor).
        self.floor = CounterFloor()
        self.ports: dict[str, int] = {}
        self.stopping = False
        self._held: list[socket.socket] = []
        self._admin: asyncio.Server | None = None
        self._stop = asyncio.Event()
        self._kill = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Copies the workers' own output to ours (see :meth:`_pass_output`).
        self._output: BackgroundWriter | None = None
        self._output_dropped = self.stats.counter("metaprotocol_worker_output_dropped_bytes_total")
        #: The admin answers being made, by path and bounds: requests that come meanwhile
        #: share them (:meth:`shared`).
        self._fanouts: dict[tuple[object, ...], asyncio.Future[Any]] = {}
        #: Where each worker listens for its successor (``SIGUSR2``): a private directory.
        self._restart_dir: str | None = None
        #: Workers a successor replaced, draining, and successors starting: signalled and
        #: waited for at the stop, their exits not counted.
        self._others: set[asyncio.subprocess.Process] = set()
        self._rolling = False
        #: The last hot restart of the workers (``/config_dump``'s ``hotRestart``): its
        #: ``state`` (``running``, ``done``, ``failed``), workers ``replaced``, ``error``.
        self.hot_restart: dict[str, Any] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self, early_sighup: Callable[[], bool] | None = None) -> int:
        """Serve until ``SIGTERM``/``SIGINT``, then drain; the exit status. ``SIGHUP`` is
        forwarded from the start (each worker gets it once it serves); ``early_sighup``: whether
        one came before."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.forward, signal.SIGHUP)
        if early_sighup is not None and early_sighup():
            self.forward(signal.SIGHUP)
        sys.stdout.flush()
        self._output = BackgroundWriter(sys.stdout.fileno(), "worker output", OUTPUT_BACKLOG)
        self._restart_dir = restart_directory(len(self.workers))
        try:
            self._held, self.ports = hold_ports(self.config)
            admin = self.config.proxy.admin
            if admin is not None:
                self._admin = await WorkersAdmin(self, admin).listen(*admin.bind)
        except OSError as exc:
            self._close()
            log.error("%s", bind_failure(exc))
            return 1
        code = await self._start_all()
        if code:
            await self._stop_workers()
            self._close()
            return code
        # Handlers first: the lines below invite signals.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGUSR2, self._on_hot_restart)
        xds = self.config.proxy.xds
        if xds is not None:  # each worker holds its own stream, as the same node
            print(f"xds from {xds.address} as {xds.node.id}")
        first = self.workers[0]
        for listener in first.listeners:
            print(f"listening {listener['name']} on {listener['ip']}:{listener['port']}")
        if self._admin is not None:
            host, port = self._admin.sockets[0].getsockname()[:2]
            print(f"admin on {host}:{port}")
        pids = ", ".join(str(w.process.pid) for w in self.workers if w.process is not None)
        log.info("%d workers (pids %s)", len(self.workers), pids)
        sys.stdout.flush()
        notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving ({len(self.workers)} workers)")
        for worker in self.workers:
            self._spawn_task(self._keep(worker))
        await self._stop.wait()
        notify("STOPPING=1")
        log.info("draining")
        code = await self._stop_workers()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
            loop.remove_signal_handler(sig)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # its default action would end us mid-exit
        if code:
            log.error("exit status %d: a worker did not stop cleanly", code)
        self._close()
        return code

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_stop_signal(self) -> None:
        if self._stop.is_set():
            self._kill.set()  # a second signal: no more waiting
        self.stopping = True
        self._stop.set()

    def forward(self, sig: int) -> None:
        """Send ``sig`` to every running worker; ``SIGHUP`` only to those serving (one still
        starting has no handler for it yet, and may have read the files before they
        changed): the others get it once they serve, as does a hot restart's successor (the
        worker it replaces gets it too: it serves on if the successor fails). ``SIGTERM``
        and ``SIGKILL`` also reach the workers of a hot restart (draining, or starting)."""
        for worker in self.workers:
            if sig == signal.SIGHUP and worker.admin is None:
                worker.reload_wanted = True
                continue
            if sig == signal.SIGHUP and worker.replacing is not None:
                worker.reload_wanted = True
            if worker.running and worker.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(sig)
        if sig in (signal.SIGTERM, signal.SIGKILL):
            for process in self._others:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.send_signal(sig)

    def _socket(self, index: int) -> str:
        """Where worker ``index`` listens for its successor."""
        assert self._restart_dir is not None
        return os.path.join(self._restart_dir, f"worker-{index}.sock")

    def _on_hot_restart(self) -> None:
        if self.stopping:
            return
        if self._rolling:
            log.warning("hot restart of the workers already under way; SIGUSR2 ignored")
            return
        self._rolling = True
        self._spawn_task(self._roll())

    async def _roll(self) -> None:
        """Replace every serving worker by a successor, one after the other (``SIGUSR2``):
        each takes its predecessor's sockets and counters, which drains (see
        docs/hot-restart.md). A successor that fails to start ends the roll: the workers
        not yet replaced serve on."""
        state: dict[str, Any] = {"state": "running", "replaced": 0, "error": None}
        self.hot_restart = state
        try:
            log.info("hot restart of %d workers", len(self.workers))
            for worker in self.workers:
                if self.stopping:
                    state.update(state="failed", error="the supervisor stopped")
                    return
                if not worker.running or worker.admin is None:
                    continue  # not serving: it starts with the code of now anyway
                if not await self._replace(worker):
                    if self.stopping:  # the successor gave up for it, or drains with the rest
                        state.update(state="failed", error="the supervisor stopped")
                        return
                    state.update(
                        state="failed",
                        error=f"the successor of worker {worker.index} did not start",
                    )
                    log.error(
                        "hot restart of the workers stopped at worker %d: its successor did "
                        "not start (it serves on, with the workers not yet replaced)",
                        worker.index,
                    )
                    return
                state["replaced"] += 1
            state["state"] = "done"
            log.info("hot restart of the workers done")
        finally:
            self._rolling = False

    async def _replace(self, worker: Worker) -> bool:
        """Start ``worker``'s successor and, once it serves (it has taken over), make it the
        worker of that slot; ``False``: it did not start."""
        old = worker.process
        assert old is not None
        # The predecessor may drain and exit before the successor's ready line is read: its
        # exit is then no crash (see _keep).
        worker.replacing = asyncio.get_running_loop().create_future()
        try:
            replaced = await self._start_successor(worker, old)
        finally:
            if worker.process is old:  # (a SIGHUP meanwhile reached it)
                worker.reload_wanted = False
            worker.replacing.set_result(worker.process is not old)
            worker.replacing = None
        return replaced

    async def _start_successor(self, worker: Worker, old: asyncio.subprocess.Process) -> bool:
        try:  # not quiet: the files may have changed with the code (worker 0's says so)
            process = await self._exec(worker.index, quiet=False)
        except OSError as exc:  # no descriptor or process to be had now: the roll ends
            log.error("worker %d: cannot start its successor: %s", worker.index, exc)
            return False
        self._others.add(process)
        ready = await self._ready(worker.index, process)
        if ready is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            self._others.discard(process)
            return False
        if self.stopping:  # it took over: it drains with the rest (SIGTERM), not killed
            assert process.stdout is not None
            self._spawn_task(self._copy_output(process.stdout))  # (a full pipe would stop it)
            return False
        self._others.discard(process)
        self._others.add(old)  # drains: its exit is awaited, not counted
        self._spawn_task(self._retired(worker.index, old))
        self._serving(worker, process, ready)
        worker.started = asyncio.get_running_loop().time()
        worker.hot_restarts += 1
        log.info("worker %d: pid %d took over from pid %d", worker.index, process.pid, old.pid)
        return True

    async def _retired(self, index: int, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        self._others.discard(process)
        if code != 0:
            log.warning(
                "worker %d: pid %d, replaced, did not drain cleanly (%s)",
                index,
                process.pid,
                _exit_text(code),
            )

    async def _start_all(self) -> int:
        """Start the first worker, then the others: 0, or the exit status of one that failed.

        The first goes alone so that a configuration its engine refuses at start is
        reported once, not once per worker.
        """
        if not await self._start(self.workers[0]):
            return await self._failed(self.workers[0])
        rest = self.workers[1:]
        started = await asyncio.gather(*(self._start(w) for w in rest))
        for worker, ok in zip(rest, started, strict=True):
            if not ok:
                return await self._failed(worker)
        return 0

    async def _failed(self, worker: Worker) -> int:
        assert worker.process is not None
        code = await worker.process.wait()
        return code if code > 0 else 1

    async def _start(self, worker: Worker) -> bool:
        """Start ``worker``'s process and wait until it serves; False if it did not."""
        worker.admin = None
        worker.process = process = await self._exec(worker.index, quiet=worker.restarts == 0)
        worker.started = asyncio.get_running_loop().time()
        ready = await self._ready(worker.index, process)
        if ready is None:
            await process.wait()
            return False
        self._serving(worker, process, ready)
        return True

    async def _exec(self, index: int, quiet: bool) -> asyncio.subprocess.Process:
        """Start a process for worker ``index`` (``quiet``: see :class:`WorkerSpec`)."""
        spec = WorkerSpec(index, self.ports, quiet_config=quiet)
        return await asyncio.create_subprocess_exec(
            *self.command,
            "--hot-restart",  # where its successor finds it (SIGUSR2)
            self._socket(index),
            "--worker",
            spec.to_json(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,  # a terminal's ^C reaches the supervisor only
            limit=1024 * 1024,
        )

    def _serving(
        self, worker: Worker, process: asyncio.subprocess.Process, ready: dict[str, Any]
    ) -> None:
        """``process`` serves as ``worker`` (it said ``ready``): its output is passed through,
        and a ``SIGHUP`` that came while it started is sent to it."""
        worker.process = process
        worker.listeners = ready["listeners"]
        host, port = ready["admin"]
        worker.admin = (str(host), int(port))
        assert process.stdout is not None
        self._spawn_task(self._copy_output(process.stdout))
        if worker.reload_wanted:
            worker.reload_wanted = False
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGHUP)

    async def _ready(
        self, index: int, process: asyncio.subprocess.Process
    ) -> dict[str, Any] | None:
        """What a starting worker says once it serves (its ``READY`` line); ``None``: it did
        not say it in time, or said it wrong (then it is killed)."""
        assert process.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while line := await process.stdout.readline():
                    text = line.decode("utf-8", "replace")
                    if text.startswith(READY):
                        ready = json.loads(text[len(READY) :])
                        if not isinstance(ready, dict):
                            raise ValueError("not an object")
                        host, port = ready["admin"]
                        str(host), int(port), list(ready["listeners"])
                        return ready
                    self._pass_output(line)  # a codec's or filter's own output
        except (TimeoutError, ValueError, KeyError, TypeError) as exc:
            log.warning("worker %d did not start: %s", index, exc or "timed out")
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        return None

    async def _keep(self, worker: Worker) -> None:
        """Start ``worker`` again each time it exits, until the supervisor stops."""
        loop = asyncio.get_running_loop()
        while True:
            process = worker.process
            assert process is not None
            code = await process.wait()
            if self.stopping:
                return
            if worker.replacing is not None:  # it drained for a successor still starting
                await worker.replacing
            if worker.process is not process:
                continue  # a successor took its place (hot restart): watch that one
            ran = loop.time() - worker.started
            worker.failures = 0 if ran >= STABLE_AFTER and worker.admin else worker.failures + 1
            worker.restarts += 1
            delay = restart_delay(max(0, worker.failures - 1))
            log.warning(
                "worker %d (pid %d) stopped (%s) after %.1f s; starting it again in %.1f s",
                worker.index,
                worker.process.pid,
                _exit_text(code),
                ran,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if self.stopping:
                return
            await self._start(worker)

    async def _stop_workers(self) -> int:
        """Drain every worker: forward ``SIGTERM``, wait up to the deadline, kill the rest.

        Returns the supervisor's exit status: 0 when every worker that was serving exited
        cleanly, else the status of the first one that did not (:func:`stop_status`), each
        of those logged. A worker still starting, or waiting to be started again, served
        nothing: how it ends is not counted.
        """
        self.stopping = True
        serving = {w.index for w in self.workers if w.running and w.admin is not None}
        self.forward(signal.SIGTERM)
        ended: list[tuple[Worker, int]] = []  # in the order they exited

        async def wait(worker: Worker, process: asyncio.subprocess.Process) -> None:
            code = await process.wait()
            if worker.index in serving:
                ended.append((worker, code))

        async def wait_other(process: asyncio.subprocess.Process) -> None:
            await process.wait()  # a hot restart's: how it ends is not counted

        waits = [wait(w, w.process) for w in self.workers if w.process is not None]
        waits += [wait_other(process) for process in list(self._others)]
        if waits:
            done: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*waits))
            killed: asyncio.Future[Any] = asyncio.ensure_future(self._kill.wait())
            await asyncio.wait(
                [done, killed],
                timeout=self.drain + STOP_GRACE,
                return_when=asyncio.FIRST_COMPLETED,
            )
            killed.cancel()
            if not done.done():
                if not self._kill.is_set():
                    log.warning(
                        "workers still running %.1f s after the drain began: killing them",
                        self.drain + STOP_GRACE,
                    )
                self.forward(signal.SIGKILL)
                await done
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        unclean = [(w, code) for w, code in ended if code != 0]
        for worker, code in unclean:
            assert worker.process is not None
            pid = worker.process.pid
            log.warning(
                "worker %d (pid %d) did not stop cleanly (%s)", worker.index, pid, _exit_text(code)
            )
        return stop_status(unclean[0][1]) if unclean else 0

    async def _copy_output(self, stream: asyncio.StreamReader) -> None:
        """Pass a worker's later standard output (a codec's or filter's prints) through."""
        while chunk := await stream.read(65536):
            self._pass_output(chunk)

    def _pass_output(self, data: bytes) -> None:
        """Hand a worker's output to the writer thread: a standard output nobody reads never
        stops the supervisor (nor, through its full pipe, the workers' prints). Beyond
        :data:`OUTPUT_BACKLOG` waiting bytes, the output is dropped and counted."""
        if self._output is None or not self._output.submit([data], len(data)):
            self._output_dropped.value += len(data)

    def _close(self) -> None:
        if self._output is not None:
            self._output.close(OUTPUT_CLOSE_WAIT)
            self._output = None
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        for sock in self._held:
            sock.close()
        self._held = []
        if self._restart_dir is not None:
            shutil.rmtree(self._restart_dir, ignore_errors=True)
            self._restart_dir = None

    # -- admin ---------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True while not stopping and at least one worker serves."""
        return not self.stopping and any(w.running and w.admin for w in self.workers)

    def worker_timeout(self, settings: Admin) -> float:
        """The bound on one worker's admin answer."""
        return min(WORKER_TIMEOUT, settings.request_timeout / 2)

    async def ask(self, path: str, timeout: float) -> list[bytes | str]:
        """Every worker's answer to ``path`` (the body), or why there is none (a string)."""

        async def one(worker: Worker) -> bytes | str:
            if not worker.running or worker.admin is None:
                return "not running"
            try:
                status, body = await admin_get(worker.admin, path, timeout)
            except TimeoutError:
                return f"no answer within {timeout:g} s"
            except (OSError, ValueError, IndexError) as exc:
                return f"{type(exc).__name__}: {exc}"
            return body if status == 200 else f"status {status}"

        return list(await asyncio.gather(*(one(w) for w in self.workers)))

    async def shared(self, key: tuple[object, ...], make: Callable[[], Awaitable[T]]) -> T:
        """``make()``'s result, made once for the requests that come while it is being made.

        Each admin request asked every worker and held every answer, parsed and combined
        (up to :data:`WORKER_REPLY_BYTES` each): ``admin.maxConnections`` requests at once
        held that many copies and had each worker answer that many times. Requests with the
        same ``key`` (the path and the bounds the workers are asked with) now share the one
        being made; the next one after it ends makes it anew. A request joins only one made
        with its own bounds: it waits no longer than it would alone, and gets no answer cut
        by a shorter bound. One that leaves early does not stop it for the others. The
        result is shared: read-only.
        """
        making = self._fanouts.get(key)
        if making is None:
            making = self._fanouts[key] = asyncio.ensure_future(make())
            making.add_done_callback(functools.partial(self._made, key))
        return cast(T, await asyncio.shield(making))

    def _made(self, key: tuple[object, ...], making: asyncio.Future[Any]) -> None:
        """A shared answer ended: the next request makes it anew."""
        if self._fanouts.get(key) is making:
            del self._fanouts[key]
        if not making.cancelled():
            making.exception()  # retrieved: nobody may be waiting any more

    async def merged_stats(self, first: float, whole: float) -> MergedStats:
        """The workers' stats combined (:meth:`_merge`), shared by the scrapes that come
        meanwhile (:meth:`shared`): about 69 MiB for two workers of 50 000 series, and each
        worker writes its series once, whatever the number of scrapes."""
        return await self.shared(("/stats", first, whole), lambda: self._merge(first, whole))

    async def _merge(self, first: float, whole: float) -> MergedStats:
        """The workers' stats combined, with the supervisor's own series: each worker's
        merged as it arrives (:func:`read_stats`), at most its ``maxStatsSeries`` plus
        :data:`STATS_SLACK` series each, so the merged series are bounded by the workers'
        count times that."""
        merged = MergedStats()
        most = self.config.proxy.limits.max_stats_series + STATS_SLACK

        async def one(worker: Worker) -> str | None:
            """``None``: read whole; ``"truncated"``; else why there is no answer."""
            if not worker.running or worker.admin is None:
                return "not running"
            feed = WorkerFeed(merged, str(worker.index), _ADMIN_SERIES)
            try:
                await read_stats(worker.admin, feed, first, whole, most)
            except StatsTruncated:
                return "truncated"
            except TimeoutError:
                return "no answer in time"
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
                return f"{type(exc).__name__}: {exc}"
            return None

        outcomes = await asyncio.gather(*(one(w) for w in self.workers))
        up = merged.family(
            "metaprotocol_worker_up", "gauge", "1 when the worker answered this scrape."
        )
        cut = merged.family(
            "metaprotocol_worker_stats_truncated",
            "gauge",
            "1 when the worker sent more series than maxStatsSeries plus the process-wide "
            "ones: this scrape holds its first ones only.",
        )
        restarts = merged.family(
            "metaprotocol_worker_restarts_total",
            "counter",
            "Workers started again after they exited, by worker.",
        )
        replaced = merged.family(
            "metaprotocol_worker_hot_restarts_total",
            "counter",
            "Workers a successor took the place of (SIGUSR2), by worker.",
        )
        for worker, outcome in zip(self.workers, outcomes, strict=True):
            label = f'{{{WORKER_LABEL}="{worker.index}"}}'
            answered = outcome is None or outcome == "truncated"
            up.samples[f"metaprotocol_worker_up{label}"] = float(answered)
            cut.samples[f"metaprotocol_worker_stats_truncated{label}"] = float(
                outcome == "truncated"
            )
            restarts.samples[f"metaprotocol_worker_restarts_total{label}"] = float(worker.restarts)
            replaced.samples[f"metaprotocol_worker_hot_restarts_total{label}"] = float(
                worker.hot_restarts
            )
            if outcome is not None:
                log.warning("worker %d: stats: %s", worker.index, outcome)
        complete = all(outcome is None for outcome in outcomes)
        self.floor.apply(merged, complete, sum(w.restarts for w in self.workers))
        merged.add(self.stats.prometheus())  # the supervisor's admin counters
        return merged

    async def live(self, timeout: float) -> dict[str, Any]:
        """The live page's data of every answering worker, combined (:func:`merge_live`)."""
        answers = await self.ask("/stats/live", timeout)
        parts = []
        for answer in answers:
            with contextlib.suppress(ValueError):
                data = json.loads(answer) if isinstance(answer, bytes) else None
                if isinstance(data, dict):
                    parts.append(data)
        return merge_live(parts)

    async def config_dump(self, timeout: float) -> dict[str, Any]:
        """The first answering worker's ``/config_dump``, and every worker's state."""
        answers = await self.ask("/config_dump", timeout)
        dumps: list[dict[str, Any] | None] = []
        for answer in answers:
            try:
                dumps.append(json.loads(answer) if isinstance(answer, bytes) else None)
            except ValueError:
                dumps.append(None)
        shown = next((d for d in dumps if d is not None), None)
        out: dict[str, Any] = dict(shown) if shown is not None else {}
        admin = self.config.proxy.admin
        if "settings" in out and admin is not None and self._admin is not None:
            host, port = self._admin.sockets[0].getsockname()[:2]
            out["settings"] = {**out["settings"]}
            out["settings"]["admin"] = {
                "bind": f"{host}:{port}",
                "allowRemote": admin.allow_remote,
                "maxConnections": admin.max_connections,
                "requestTimeout": admin.request_timeout,
            }
        workers = []
        for worker, answer, dump in zip(self.workers, answers, dumps, strict=True):
            entry: dict[str, Any] = {
                "worker": worker.index,
                "pid": worker.process.pid if worker.running and worker.process else None,
                "up": dump is not None,
                "restarts": worker.restarts,
                "hotRestarts": worker.hot_restarts,
                "admin": None if worker.admin is None else "{}:{}".format(*worker.admin),
            }
            if dump is None:
                entry["error"] = answer if isinstance(answer, str) else "unreadable answer"
            else:  # each worker reloads itself: its version and last reload are its own
                entry["version"] = dump.get("version")
                entry["lastReload"] = dump.get("lastReload")
                entry["hotRestart"] = dump.get("hotRestart")
                if "xds" in dump:  # and its own stream: versions, nonces, ACKs, errors
                    entry["xds"] = dump["xds"]
                if shown is not None and _served(dump) != _served(shown):
                    entry["config"] = dump  # it serves something else (a refused reload?)
            workers.append(entry)
        out["workers"] = workers
        out["hotRestart"] = self.hot_restart
        return out


def _served(dump: dict[str, Any]) -> dict[str, Any]:
    """What a worker serves, from its ``/config_dump``: neither the reload record (its time)
    nor the state of its own xDS stream (nonces, times; the versions it applied are in
    ``version``) nor of its hot restarts (its own socket, predecessor, generation)."""
    return {k: v for k, v in dump.items() if k not in ("lastReload", "xds", "hotRestart")}


_PATHS = (
    "/\n/paths\n/ready\n/config_dump\n/stats\n/stats?format=json\n/stats/prometheus\n/stats/live\n"
)


class WorkersAdmin(_AdminServer):
    """The supervisor's admin endpoint: the workers' state, combined.

    It shares the engine's bounded serving (one request per connection; the size, connection
    and time limits of ``admin``) and answers with :meth:`respond`; it has no engine.
    """

    def __init__(self, supervisor: Supervisor, settings: Admin) -> None:
        self.supervisor = supervisor
        self.stats = supervisor.stats
        self.settings = settings
        self.active = 0
        self._rejected = self.stats.counter("metaprotocol_admin_connections_rejected_total")
        self._page: bytes | None = None

    async def respond(self, method: str, target: str) -> bytes | Streamed:
        """The full HTTP response for one request (workers asked with a bounded wait), or
        the merged stats, sent piece by piece as they are made."""
        supervisor = self.supervisor
        if method != "GET":
            return _response(405, "only GET is supported\n")
        path, _, query = target.partition("?")
        timeout = supervisor.worker_timeout(self.settings)
        if path == "/ready":
            return _response(200, "LIVE\n") if supervisor.ready else _response(503, "DRAINING\n")
        if path == "/config_dump":  # each answer's dump parsed, combined and written once
            return await supervisor.shared((path, timeout), lambda: self._config_dump(timeout))
        if path in ("/stats", "/stats/prometheus"):
            # Many series take longer than one worker's bound to send: the answer must start
            # within it (a stuck worker), and end within half the request's time.
            whole = max(timeout, self.settings.request_timeout / 2)
            merged = await supervisor.merged_stats(timeout, whole)
            if "format=json" in query:
                return Streamed("application/json", json_parts(merged.snapshot_parts()))
            return Streamed(PROMETHEUS, merged.prometheus_parts())
        if path == "/paths":
            return _response(200, _PATHS)
        if path == "/":
            if self._page is None:
                self._page = _response(200, page_html(), "text/html; charset=utf-8")
            return self._page
        if path == "/stats/live":
            return await supervisor.shared((path, timeout), lambda: self._live(timeout))
        return _response(404, f"unknown path {path[:200]}; /paths lists the paths\n")

    async def _config_dump(self, timeout: float) -> bytes:
        text = json.dumps(await self.supervisor.config_dump(timeout), indent=2, default=str)
        return _response(200, text + "\n", "application/json")

    async def _live(self, timeout: float) -> bytes:
        body = json.dumps(await self.supervisor.live(timeout), default=str)
        return _response(200, body + "\n", "application/json")


def restart_directory(count: int) -> str:
    """A private directory (mode 0700) for the workers' hot restart sockets: under
    ``$TMPDIR``, or ``/tmp`` when that would make a socket's path too long for a Unix socket."""
    from .hot_restart import MAX_PATH

    directory = tempfile.mkdtemp(prefix="metaprotocol-workers-")
    longest = os.path.join(directory, f"worker-{count - 1}.sock")
    if len(os.fsencode(longest)) > MAX_PATH:
        os.rmdir(directory)
        directory = tempfile.mkdtemp(prefix="metaprotocol-workers-", dir="/tmp")
    return directory


def worker_command(
    files: Sequence[str],
    drain: float | None,
    no_uvloop: bool,
    watch: bool = False,
    log_level: str = "info",
    log_format: str = "text",
) -> list[str]:
    """How a worker starts: this interpreter running ``metaprotocol proxy`` on ``files``
    (with ``--watch``, each worker watches the files and reloads itself), logging as the
    supervisor does (its records name the worker: ``--worker`` gives its index)."""
    command = [sys.executable, "-m", "metaprotocol_sdk", "proxy"]
    command += ["--log-level", log_level, "--log-format", log_format]
    for name in files:
        command += ["-c", os.path.abspath(name)]
    if drain is not None:
        command += ["--drain", repr(drain)]
    if no_uvloop:
        command.append("--no-uvloop")
    if watch:
        command.append("--watch")
    return command


def supervise(
    config: Config,
    command: Sequence[str],
    count: int,
    drain: float | None,
    early_sighup: Callable[[], bool] | None = None,
) -> int:
    """Run the supervisor of ``count`` workers until it is stopped; the exit status.
    ``early_sighup``: whether a ``SIGHUP`` came before the supervisor's handler was set."""
    identity = config.proxy.mesh_identity
    if identity is not None and identity.sds is not None:  # each worker fetches its own
        from .sds import release_idle

        release_idle()
    return asyncio.run(Supervisor(config, command, count, drain).run(early_sighup))
