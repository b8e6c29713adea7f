"""Hot restart: a new engine process takes over a running one's sockets, as Envoy's does.

``metaprotocol proxy --hot-restart PATH`` makes the engine listen on a Unix socket at
``PATH`` for its successor. A new process started with the same option finds it there and:

1. says hello (its protocol version and the binds of its listeners and admin endpoint);
2. is given the listening sockets of the binds both configurations have (``SCM_RIGHTS``: the
   same kernel sockets, with the connections waiting in their accept queues) and the old
   process's counters and histograms;
3. builds its engine on them, not accepting yet (listeners the old one lacks are bound anew);
4. asks the old process to drain: it stops accepting (closes its copies of the sockets, which
   stay open in the new process), answers ``draining``, and drains (its open connections
   served a while first: :meth:`Engine.stop`'s ``serve_first``);
5. starts accepting, and adds the old process's counts as they grow (sent every
   :data:`STATS_INTERVAL` until it has drained, then once more): the counters go on from
   where they were, as Envoy's do over a hot restart. Gauges are the new process's own.

Then the new process takes ``PATH`` over (an atomic rename of its own socket) for the next
restart. No connection is refused or reset on the way: the listening sockets never close.
Connections open on the old process are not moved; they finish within its drain.

Only a process of the same user may connect (``SO_PEERCRED``, and the socket's mode 0600).
Each message is bounded (:data:`MAX_MESSAGE`) and each wait timed; a successor that goes
away before asking for the drain leaves the old process serving as it was. Linux only.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .stats import GAUGES, Labels, Stats

if TYPE_CHECKING:
    from .config.models import Config
    from .engine import Engine

log = logging.getLogger("metaprotocol.proxy.hot_restart")

#: Version of the messages below; a successor speaking another one is refused.
PROTOCOL = 1
#: Largest message either side accepts (a piece of the stats is at most a quarter of it).
MAX_MESSAGE = 4 << 20
#: Largest message the running process accepts: a successor sends its hello (a few hundred
#: bytes per listener, at most :data:`MAX_SOCKETS`) and short asks, never stats. Parsed, a
#: JSON message can take ten times its size: four peers at :data:`MAX_MESSAGE` were 115 MB.
MAX_SUCCESSOR_MESSAGE = 1 << 20
#: Bytes of stats per message, about (several series each).
STATS_PIECE = MAX_MESSAGE // 4
#: How long each answer may take.
REPLY_TIMEOUT = 10.0
#: How long a successor may take between getting the sockets and asking for the drain (its
#: start: codecs imported, clusters built, the first routes of a control plane).
TAKEOVER_TIMEOUT = 300.0
#: How often the draining process sends its counts to its successor.
STATS_INTERVAL = 1.0
#: Most listening sockets one message carries (listeners and the admin endpoint).
MAX_SOCKETS = 1024
#: Most descriptors one ``sendmsg`` passes (Linux's ``SCM_MAX_FD``): more go with the
#: following bytes of the message.
FDS_PER_SEND = 253
#: Connections to the hot restart socket served at once (more are closed at once).
MAX_PEERS = 4
#: How long after a failed accept (no descriptor free) the hot restart socket accepts again.
ACCEPT_RETRY = 1.0
#: Most temporary sockets of processes gone (``PATH.<pid>``) an engine removes as it starts.
MAX_STALE = 64
#: How long a process whose hot restart socket closed is given to have exited (a crash: its
#: socket closes as it exits, just before the kernel says it has).
EXIT_WAIT = 1.0
#: Longest socket path (``sun_path`` holds 108 bytes; the temporary name adds ``.<pid>``).
MAX_PATH = 96
_LENGTH = struct.Struct("!I")


class HotRestartError(Exception):
    """The hot restart socket, or the process behind it, did not do what was expected."""


def available(path: str) -> str | None:
    """``None`` where hot restart at ``path`` works, else why not."""
    if not hasattr(socket, "SO_PEERCRED") or not hasattr(socket, "AF_UNIX"):
        return "hot restart needs Unix sockets with SO_PEERCRED (Linux)"
    if len(os.fsencode(path)) > MAX_PATH:
        return f"the path is longer than {MAX_PATH} bytes (a Unix socket's limit)"
    return None


@dataclass(frozen=True)
class _Credentials:
    pid: int
    uid: int


def _peer(sock: socket.socket) -> _Credentials:
    """The process at the other end of the Unix socket ``sock`` (``SO_PEERCRED``)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    return _Credentials(pid, uid)


class PeerProcess:
    """The process at the other end of a hot restart socket, watched (a pidfd): when the
    socket closes, whether it died (its sockets are this process's alone now) or is alive
    (it gave up, it serves on)."""

    def __init__(self, sock: socket.socket) -> None:
        self.pid = _peer(sock).pid
        self._fd: int | None = None
        #: Done once it has exited: one watch, however many wait (each its own would take
        #: the others' place in the loop, and end them as it ends).
        self._exit: asyncio.Future[None] | None = None
        with contextlib.suppress(OSError, AttributeError):  # no pidfd: never said dead
            self._fd = os.pidfd_open(self.pid)

    async def exited(self, within: float | None = EXIT_WAIT) -> bool:
        """Whether it has exited, or does within ``within`` seconds (``None``: wait until
        it does; without a pidfd, for ever)."""
        fd = self._fd
        loop = asyncio.get_running_loop()
        if fd is None:
            if within is not None:
                return False
            await loop.create_future()  # (until cancelled)
            return False
        if self._exit is None:
            self._exit = _when_ready(loop, fd)
        try:
            await asyncio.wait_for(asyncio.shield(self._exit), within)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """Stop watching."""
        if self._fd is not None:
            if self._exit is not None and not self._exit.done():
                self._exit.get_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None


def _when_ready(
    loop: asyncio.AbstractEventLoop, fd: int, writing: bool = False
) -> asyncio.Future[None]:
    """Done once ``fd`` is readable (or writable), its watch then removed; a caller that stops
    waiting before then removes it."""
    ready: asyncio.Future[None] = loop.create_future()
    remove = loop.remove_writer if writing else loop.remove_reader

    def fired() -> None:
        remove(fd)
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if writing else loop.add_reader)(fd, fired)
    return ready


def _check_peer(sock: socket.socket) -> None:
    uid = _peer(sock).uid
    if uid != os.geteuid():
        raise HotRestartError(f"the peer runs as uid {uid}, not {os.geteuid()}")


class Channel:
    """Length-prefixed JSON messages (and passed descriptors) on a non-blocking Unix socket.

    ``max_fds``: the most descriptors one message may bring (the running process's side
    takes none: the kernel closes those it is sent, and the connection ends);
    ``max_message``: the largest message it takes."""

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        max_fds: int = MAX_SOCKETS,
        max_message: int = MAX_MESSAGE,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = loop
        self.max_fds = max_fds
        self.max_message = max_message
        self._buffer = bytearray()
        self._fds: list[int] = []

    def close(self) -> None:
        """Close the socket and any descriptor received and not taken."""
        _close_all(self._fds)
        self._fds = []
        self.sock.close()

    async def _ready(self, reading: bool, deadline: float) -> None:
        fd = self.sock.fileno()
        waiter = _when_ready(self.loop, fd, writing=not reading)
        try:
            await asyncio.wait_for(waiter, max(0.0, deadline - self.loop.time()))
        except TimeoutError:
            raise HotRestartError("no answer in time") from None
        finally:
            if waiter.cancelled():  # (by wait_for: the watch is still there)
                (self.loop.remove_reader if reading else self.loop.remove_writer)(fd)

    async def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        """Send ``message`` (with ``fds`` passed alongside its first byte)."""
        body = json.dumps(message, separators=(",", ":")).encode()
        if len(body) > MAX_MESSAGE:
            raise HotRestartError(f"a message of {len(body)} bytes is above {MAX_MESSAGE}")
        data = memoryview(_LENGTH.pack(len(body)) + body)
        deadline = self.loop.time() + REPLY_TIMEOUT
        fds = list(fds or [])
        if len(fds) > len(data) * FDS_PER_SEND:  # (a byte carries each batch)
            raise HotRestartError(f"{len(fds)} descriptors for a message of {len(data)} bytes")
        while data:
            # Each batch goes with one byte of its own; the last with the rest of the message.
            batch, fds = fds[:FDS_PER_SEND], fds[FDS_PER_SEND:]
            chunk = data[:1] if fds else data
            ancillary = (
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", batch))] if batch else []
            )
            while chunk:
                try:
                    sent = self.sock.sendmsg([chunk], ancillary)
                except BlockingIOError:
                    await self._ready(False, deadline)
                    continue
                except OSError as exc:
                    raise HotRestartError(f"cannot send: {exc}") from None
                ancillary = []  # passed with the first bytes sent
                chunk, data = chunk[sent:], data[sent:]

    async def receive(self, timeout: float) -> tuple[dict[str, Any], list[int]]:
        """The next message and the descriptors that came with it (the caller owns them)."""
        deadline = self.loop.time() + timeout
        buffer = self._buffer
        space = socket.CMSG_SPACE(self.max_fds * array.array("i").itemsize) if self.max_fds else 0
        while True:
            if len(buffer) >= _LENGTH.size:
                (size,) = _LENGTH.unpack_from(buffer)
                if size > self.max_message:
                    raise HotRestartError(f"a message of {size} bytes is above {self.max_message}")
                if len(buffer) >= _LENGTH.size + size:
                    body = bytes(buffer[_LENGTH.size : _LENGTH.size + size])
                    del buffer[: _LENGTH.size + size]
                    fds, self._fds = self._fds, []
                    try:
                        message = json.loads(body)
                    except ValueError as exc:
                        _close_all(fds)
                        raise HotRestartError(f"not a JSON message: {exc}") from None
                    except RecursionError:  # ``[[[[...``: deeper than the parser recurses
                        _close_all(fds)
                        raise HotRestartError("not a JSON message: nested too deep") from None
                    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
                        _close_all(fds)
                        raise HotRestartError("a message without its op")
                    return message, fds
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(1 << 16, space)
            except BlockingIOError:
                await self._ready(True, deadline)
                continue
            except OSError as exc:
                raise HotRestartError(f"cannot receive: {exc}") from None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                    self._fds.extend(received)
            if flags & socket.MSG_CTRUNC or len(self._fds) > self.max_fds:
                raise HotRestartError("more descriptors than expected")
            if not data:
                raise HotRestartError("the other process closed the hot restart socket")
            buffer += data


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# -- stats ------------------------------------------------------------------------------------


def stats_pieces(stats: Stats, sent: dict[tuple[str, Labels], Any]) -> Iterator[dict[str, Any]]:
    """The counters and histograms of ``stats`` (not the gauges) that changed since ``sent``
    (what was sent before, updated here), as ``stats`` messages of about :data:`STATS_PIECE`
    bytes each, made one by one (the caller lets the loop run between them)."""
    counters: list[Any] = []
    histograms: list[Any] = []
    size = 0
    for counter in stats.all_counters():
        key = (counter.name, counter.labels)
        if counter.name in GAUGES or not counter.value or sent.get(key) == counter.value:
            continue
        sent[key] = counter.value
        counters.append([counter.name, counter.labels, counter.value])
        size += 32 + sum(len(k) + len(v) + 8 for k, v in counter.labels)
        if size >= STATS_PIECE:
            yield {"op": "stats", "counters": counters, "histograms": histograms}
            counters, histograms, size = [], [], 0
    for histogram in stats.all_histograms():
        key, total = (histogram.name, histogram.labels), histogram.count
        if not total or sent.get(key) == total:
            continue  # (a histogram's count grows with any change)
        sent[key] = total
        labels = histogram.labels
        row = [histogram.name, labels, histogram.bounds, histogram.counts, histogram.sum]
        histograms.append(row)
        size += 64 + 24 * len(histogram.counts) + sum(len(k) + len(v) + 8 for k, v in labels)
        if size >= STATS_PIECE:
            yield {"op": "stats", "counters": counters, "histograms": histograms}
            counters, histograms, size = [], [], 0
    yield {"op": "stats", "counters": counters, "histograms": histograms}


def _labels(raw: Any) -> Labels | None:
    if not isinstance(raw, list):
        return None
    out: list[tuple[str, str]] = []
    for pair in raw:
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not isinstance(pair[0], str)
            or not isinstance(pair[1], str)
        ):
            return None
        out.append((pair[0], pair[1]))
    return tuple(out)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass
class StatsImport:
    """Adds a predecessor's counts to this engine's stats: each time, what grew since the
    last time (a series the predecessor shows for the first time, in full). At most
    ``stats.max_series`` series are followed; the engine's own limit folds the rest."""

    stats: Stats
    #: The predecessor's value of each series when last seen (counters), or its bucket
    #: counts and sum (histograms). Rows not of the expected shape are skipped.
    seen: dict[tuple[str, Labels], Any] = field(default_factory=dict)

    def add(self, message: dict[str, Any]) -> None:
        """Add one ``stats`` message."""
        counters, histograms = message.get("counters"), message.get("histograms")
        for row in counters if isinstance(counters, list) else ():
            self._counter(row)
        for row in histograms if isinstance(histograms, list) else ():
            self._histogram(row)

    def _room(self, key: tuple[str, Labels]) -> bool:
        return key in self.seen or len(self.seen) < self.stats.max_series

    def _counter(self, row: Any) -> None:
        labels = _labels(row[1]) if isinstance(row, list) and len(row) == 3 else None
        if labels is None or not isinstance(row[0], str) or not _count(row[2]):
            return
        name, value = row[0], row[2]
        key = (name, labels)
        if name in GAUGES or not self._room(key):
            return
        grown = value - self.seen.get(key, 0)
        self.seen[key] = value
        if grown > 0:
            self.stats.counter(name, **dict(labels)).value += grown

    def _histogram(self, row: Any) -> None:
        labels = _labels(row[1]) if isinstance(row, list) and len(row) == 5 else None
        if labels is None:
            return
        name, bounds, counts, total = row[0], row[2], row[3], row[4]
        if (
            not isinstance(name, str)
            or not isinstance(bounds, list)
            or not all(isinstance(b, int | float) for b in bounds)
            or not isinstance(counts, list)
            or len(counts) != len(bounds) + 1
            or not all(_count(n) for n in counts)
            or not isinstance(total, int | float)
        ):
            return
        key = (name, labels)
        if not self._room(key):
            return
        histogram = self.stats.histogram(name, bounds, **dict(labels))
        if list(histogram.bounds) != bounds:
            return  # this engine counts that histogram in other buckets
        last_counts, last_sum = self.seen.get(key, ([0] * len(counts), 0.0))
        for i, (n, was) in enumerate(zip(counts, last_counts, strict=True)):
            if n > was:
                histogram.counts[i] += n - was
        if total > last_sum:
            histogram.sum += total - last_sum
        self.seen[key] = (counts, total)


# -- the new process ----------------------------------------------------------------------


@dataclass
class Inherited:
    """Listening sockets given by the predecessor: those of the listeners whose bind its
    configuration has too (for a bind with port 0, the same listener's)."""

    #: By the listener's ``(host, port)``.
    listeners: dict[tuple[str, int], list[socket.socket]] = field(default_factory=dict)
    admin: list[socket.socket] = field(default_factory=list)

    def take(self, listener: tuple[str, int]) -> list[socket.socket]:
        """The sockets of ``listener`` (given once; empty: bind anew)."""
        return self.listeners.pop(listener, [])

    def take_admin(self) -> list[socket.socket]:
        """The admin endpoint's sockets (given once)."""
        taken, self.admin = self.admin, []
        return taken

    def close(self) -> None:
        """Close the sockets not taken (their binds are not in this configuration)."""
        for sockets in (*self.listeners.values(), self.admin):
            for sock in sockets:
                sock.close()
        self.listeners.clear()
        self.admin = []


def _binds(config: Config) -> tuple[list[list[Any]], list[Any] | None]:
    settings = config.proxy
    listeners = [
        [item.host, item.port, item.bind_host, item.bind_port] for item in settings.listeners
    ]
    admin = None if settings.admin is None else [settings.admin.bind[0], settings.admin.bind[1]]
    return listeners, admin


class Predecessor:
    """The running engine this process takes over from (the new process's side)."""

    def __init__(
        self,
        channel: Channel,
        pid: int,
        generation: int,
        inherited: Inherited,
        process: PeerProcess | None = None,
    ):
        self.channel = channel
        self.pid = pid
        self.process = process
        #: This process's hot restart generation: its predecessor's plus one.
        self.generation = generation
        self.inherited = inherited
        #: ``taking over``, ``following`` (it drains), ``done`` or ``lost``.
        self.state = "taking over"
        self.imported: StatsImport | None = None
        #: The predecessor said ``done`` (it has drained) in the round read by :meth:`drain`.
        self._done = False
        #: Why the round read by :meth:`drain` failed (said by :meth:`follow`).
        self._broken: HotRestartError | None = None

    async def import_stats(self, stats: Stats) -> None:
        """Add the predecessor's counts as they were when it gave its sockets."""
        self.imported = StatsImport(stats)
        await self.channel.send({"op": "stats"})
        if not await self._read_round():
            raise HotRestartError("the predecessor ended the hot restart")

    async def _read_round(self) -> bool:
        """Read one round of ``stats`` messages up to its ``stats_end``; ``False``: the
        predecessor said ``done`` instead."""
        assert self.imported is not None
        while True:
            message, fds = await self.channel.receive(REPLY_TIMEOUT)
            _close_all(fds)
            op = message["op"]
            if op == "stats":
                self.imported.add(message)
            elif op == "stats_end":
                return True
            elif op == "done":
                return False
            else:
                raise HotRestartError(f"unexpected {op!r} from the predecessor")

    async def drain(self) -> None:
        """Ask the predecessor to stop accepting and drain; return once it has stopped
        accepting and its counts up to then are in (what it counted since the import: a
        scrape of this engine never shows less than one of the predecessor did)."""
        await self.channel.send({"op": "drain"})
        message, fds = await self.channel.receive(REPLY_TIMEOUT)
        _close_all(fds)
        if message["op"] != "draining":
            raise HotRestartError(f"the predecessor answered {message['op']!r} to drain")
        self.state = "following"
        try:
            self._done = not await self._read_round()
        except HotRestartError as exc:  # it has stopped accepting: this process must serve
            self._broken = exc

    async def follow(self) -> None:
        """Add the predecessor's counts while it drains, until it is done (or gone)."""
        try:
            if self._broken is not None:
                raise self._broken
            while not self._done and await self._read_round():
                pass
            self.state = "done"
        except HotRestartError as exc:
            self.state = "lost"
            log.warning(
                "hot restart: lost the predecessor (pid %d) while it drained: %s", self.pid, exc
            )
        finally:
            self._close()

    def _close(self) -> None:
        self.channel.close()
        if self.process is not None:
            self.process.close()

    async def died(self, within: float | None = EXIT_WAIT) -> bool:
        """Whether the predecessor has exited, or does within ``within`` seconds (``None``:
        return once it does; if that cannot be known, never)."""
        if self.process is None:
            if within is None:
                await asyncio.get_running_loop().create_future()  # (until cancelled)
            return False
        return await self.process.exited(within)

    def abandon(self) -> None:
        """Give up (this process could not start): the predecessor keeps serving."""
        self.inherited.close()
        self._close()
        self.state = "lost"

    def orphaned(self) -> None:
        """The predecessor died before it drained: its sockets are this process's alone."""
        self._close()
        self.state = "lost"

    def dump(self) -> dict[str, Any]:
        """``/config_dump``'s view."""
        return {"pid": self.pid, "state": self.state}


async def take_over(path: str, config: Config) -> Predecessor | None:
    """Connect to the engine serving at ``path`` and take its sockets for ``config``'s binds;
    ``None`` when no engine serves there (a first start, or a stale socket file)."""
    loop = asyncio.get_running_loop()
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:  # a path under a file, a directory not searchable...
        raise HotRestartError(f"cannot use {path}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(mode):
        raise HotRestartError(f"{path} exists and is not a socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, path), REPLY_TIMEOUT)
    except (ConnectionRefusedError, FileNotFoundError):
        sock.close()
        return None  # nobody listens: what a process that ended left behind
    except (OSError, TimeoutError) as exc:
        sock.close()
        raise HotRestartError(f"cannot connect to {path}: {exc or 'timed out'}") from None
    channel = Channel(sock, loop)
    process: PeerProcess | None = None
    try:
        _check_peer(sock)
        process = PeerProcess(sock)
        listeners, admin = _binds(config)
        await channel.send(
            {
                "op": "hello",
                "protocol": PROTOCOL,
                "pid": os.getpid(),
                "listeners": listeners,
                "admin": admin,
            }
        )
        try:
            message, fds = await channel.receive(REPLY_TIMEOUT)
        except HotRestartError as exc:
            if not await process.exited():
                raise
            log.warning(
                "hot restart: pid %d died before giving its sockets (%s); starting afresh",
                process.pid,
                exc,
            )
            channel.close()
            process.close()
            return None
        if message["op"] == "refused":
            _close_all(fds)
            raise HotRestartError(f"the engine at {path} refused: {message.get('reason')}")
        if message["op"] != "sockets":
            _close_all(fds)
            raise HotRestartError(f"the engine at {path} answered {message['op']!r}")
        inherited = _inherit(message, fds)
        pid, generation = message.get("pid"), message.get("generation")
        if not isinstance(pid, int) or not isinstance(generation, int) or generation < 0:
            inherited.close()
            raise HotRestartError("the predecessor did not say its pid and generation")
    except BaseException:
        channel.close()
        if process is not None:
            process.close()
        raise
    return Predecessor(channel, pid, generation + 1, inherited, process)


def _inherit(message: dict[str, Any], fds: list[int]) -> Inherited:
    """The sockets of a ``sockets`` message: ``listeners`` is ``[[host, port, count], ...]``
    and ``admin`` a count, the descriptors in that order."""
    inherited = Inherited()
    sockets: list[socket.socket] = []
    try:
        for i, fd in enumerate(fds):
            try:
                sockets.append(socket.socket(fileno=fd))
            except OSError:
                _close_all(fds[i:])
                raise HotRestartError("a descriptor from the predecessor is not a socket") from None
        at = 0
        for row in message.get("listeners") or []:
            if (
                not isinstance(row, list)
                or len(row) != 3
                or not isinstance(row[0], str)
                or not _count(row[1])
                or not _count(row[2])
            ):
                raise HotRestartError("a malformed listener in the sockets message")
            inherited.listeners[(row[0], row[1])] = sockets[at : at + row[2]]
            at += row[2]
        admin = message.get("admin") or 0
        if not _count(admin):
            raise HotRestartError("a malformed admin count in the sockets message")
        inherited.admin = sockets[at : at + admin]
        at += admin
        if at != len(sockets):
            raise HotRestartError(f"{len(sockets)} sockets came for {at} announced")
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return inherited


# -- the running process --------------------------------------------------------------------


class HandoverServer:
    """Listens at the hot restart path for a successor (the running process's side).

    The socket is made under a temporary name and renamed over ``path`` by :meth:`publish`,
    so the path always leads to a process that can hand over (or says why not).
    """

    def __init__(
        self,
        engine: Engine,
        path: str,
        generation: int,
        on_takeover: Callable[[int], None],
    ) -> None:
        self.engine = engine
        self.path = path
        self.generation = generation
        self.on_takeover = on_takeover
        #: The successor's pid once it asked for the drain.
        self.successor: int | None = None
        #: The pid of a process holding the sockets, not yet asking for the drain (starting).
        self.incoming: int | None = None
        self._sock: socket.socket | None = None
        self._temporary = f"{path}.{os.getpid()}"
        self._inode: int | None = None
        self._busy = False
        #: What the successor was sent of each series (only what changed is sent again).
        self._sent: dict[tuple[str, Labels], Any] = {}
        #: Connections being served (at most :data:`MAX_PEERS`).
        self._peers = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._finished: asyncio.Event | None = None

    def open(self) -> None:
        """Make the socket (mode 0600) under the temporary name and start accepting."""
        loop = asyncio.get_running_loop()
        self._finished = asyncio.Event()
        _remove_stale(self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._temporary)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self._temporary)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        sock.listen(8)
        sock.setblocking(False)
        self._sock = sock
        self._inode = os.stat(self._temporary).st_ino
        self._spawn(self._accept(loop, sock))

    def publish(self) -> None:
        """Put the socket at ``path`` (replacing what was there); if its file went (removed
        by hand), say so: this engine serves on, and the next one starts afresh."""
        if self._sock is not None and self.successor is None:
            try:
                os.replace(self._temporary, self.path)
            except OSError as exc:
                log.warning(
                    "hot restart: cannot put the socket at %s (%s): the next engine there "
                    "will start afresh",
                    self.path,
                    exc.strerror or exc,
                )

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE, ENOBUFS...: for now, not for good
                log.warning(
                    "hot restart: cannot accept on %s: %s; again in %g s",
                    self.path,
                    exc,
                    ACCEPT_RETRY,
                )
                await asyncio.sleep(ACCEPT_RETRY)
                continue
            if self._peers >= MAX_PEERS:  # a descriptor each: the engine's clients need them
                conn.close()
                continue
            self._spawn(self._serve(Channel(conn, loop, 0, MAX_SUCCESSOR_MESSAGE)))

    async def _serve(self, channel: Channel) -> None:
        self._peers += 1
        try:
            _check_peer(channel.sock)
            hello, fds = await channel.receive(REPLY_TIMEOUT)
            _close_all(fds)
            reason = self._refusal(hello)
            if reason is not None:
                await channel.send({"op": "refused", "reason": reason})
                return
            self._busy = True
            try:
                await self._hand_over(channel, hello)
            finally:
                self._busy = self.successor is not None
                self.incoming = None
                if self.successor is not None and self._finished is not None:
                    self._finished.set()  # the last counts sent, or nobody left to read them
        except HotRestartError as exc:
            log.warning("hot restart: a successor failed: %s", exc)
        finally:
            self._peers -= 1
            channel.close()

    def _refusal(self, hello: dict[str, Any]) -> str | None:
        if hello["op"] != "hello":
            return f"expected hello, got {hello['op']!r}"
        if hello.get("protocol") != PROTOCOL:
            return f"hot restart protocol {hello.get('protocol')!r}; this engine speaks {PROTOCOL}"
        if self.successor is not None:
            return f"pid {self.successor} has taken over; this engine is draining"
        if self._busy:
            return "another process is taking over"
        if self.engine.draining:
            return "this engine is draining"
        return None

    async def _hand_over(self, channel: Channel, hello: dict[str, Any]) -> None:
        wanted = _wanted_binds(hello)
        self._sent = {}  # this successor has none of the counts (one before it may have)
        rows, admin, fds = self.engine.handover_sockets(wanted.listeners, wanted.admin)
        pid = hello["pid"] if _count(hello.get("pid")) else 0
        await channel.send(
            {
                "op": "sockets",
                "pid": os.getpid(),
                "generation": self.generation,
                "listeners": rows,
                "admin": admin,
            },
            fds,
        )
        self.incoming = pid
        deadline = asyncio.get_running_loop().time() + TAKEOVER_TIMEOUT
        while True:  # the successor starts; it asks for the counts, then for the drain
            left = deadline - asyncio.get_running_loop().time()
            ask, fds = await channel.receive(max(0.0, left))
            _close_all(fds)
            if ask["op"] == "stats":
                await self._send_stats(channel)
            elif ask["op"] == "drain":
                break
            else:
                raise HotRestartError(f"the successor asked {ask['op']!r}")
        self.successor, self.incoming = pid, None
        log.info("hot restart: pid %d takes over; draining", pid)
        self.on_takeover(pid)
        await channel.send({"op": "draining"})
        while True:  # at once (what grew since the import, all accepted here), then each second
            await self._send_stats(channel)
            if self.engine.stopped:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.engine.wait_stopped(), STATS_INTERVAL)
        await channel.send({"op": "done"})

    async def _send_stats(self, channel: Channel) -> None:
        for piece in stats_pieces(self.engine.stats, self._sent):
            await channel.send(piece)
            await asyncio.sleep(0)  # requests run between the pieces
        await channel.send({"op": "stats_end"})

    async def finish(self, timeout: float = REPLY_TIMEOUT) -> None:
        """After the drain: let the successor have the last counts, then close."""
        if self.successor is not None and self._finished is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._finished.wait(), timeout)
        self.close()

    def close(self) -> None:
        """Stop listening; remove the socket file when it is still this process's (once
        taken over, not the one at ``path``: the successor renames its own over it, maybe
        between a check and a removal here)."""
        for task in list(self._tasks):
            task.cancel()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            names = (
                [self._temporary] if self.successor is not None else [self._temporary, self.path]
            )
            for name in names:
                with contextlib.suppress(OSError):
                    if os.stat(name).st_ino == self._inode:
                        os.unlink(name)

    def dump(self) -> dict[str, Any]:
        """``/config_dump``'s view."""
        return {
            "socket": self.path,
            "generation": self.generation,
            "incoming": self.incoming,
            "successor": self.successor,
        }


def _remove_stale(path: str) -> None:
    """Remove the temporary sockets (``PATH.<pid>``) left by processes that are gone: a
    successor killed before it took ``path`` over (at most :data:`MAX_STALE`)."""
    directory, name = os.path.split(path)
    prefix = name + "."
    removed = 0
    try:
        entries = os.scandir(directory or ".")
    except OSError:
        return
    with entries:
        for entry in entries:
            pid = entry.name[len(prefix) :]
            if not entry.name.startswith(prefix) or not (pid.isascii() and pid.isdigit()):
                continue
            try:
                if not stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
                    continue
                os.kill(int(pid), 0)
            except ProcessLookupError:
                if _answers(entry.path):
                    continue  # a process of another pid namespace (a container's)
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                removed += 1
                if removed >= MAX_STALE:
                    return
            except (OSError, ValueError, OverflowError):
                continue  # alive (another user's), or gone meanwhile


def _answers(path: str) -> bool:
    """Whether a process listens at the Unix socket ``path`` (a refused connection: none)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # (a full backlog: someone listens)
    return True


@dataclass
class _Wanted:
    #: ``(host, port, bind_host, bind_port)`` of each listener of the successor.
    listeners: list[tuple[str, int, str, int]]
    admin: tuple[str, int] | None


def _bind_row(row: Any, size: int) -> bool:
    return (
        isinstance(row, list)
        and len(row) == size
        and all(isinstance(v, str) if i % 2 == 0 else _count(v) for i, v in enumerate(row))
    )


def _wanted_binds(hello: dict[str, Any]) -> _Wanted:
    raw = hello.get("listeners")
    if not isinstance(raw, list) or len(raw) > MAX_SOCKETS:
        raise HotRestartError("a malformed listener list in the hello")
    listeners: list[tuple[str, int, str, int]] = []
    for row in raw:
        if not _bind_row(row, 4):
            raise HotRestartError("a malformed listener in the hello")
        listeners.append((row[0], row[1], row[2], row[3]))
    admin = hello.get("admin")
    if admin is not None and not _bind_row(admin, 2):
        raise HotRestartError("a malformed admin bind in the hello")
    return _Wanted(listeners, None if admin is None else (admin[0], admin[1]))
