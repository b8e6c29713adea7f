"""The hot restart handover in one process: a real engine behind its ``HandoverServer``, and
successors (``take_over``) that fail or follow at chosen steps. Real sockets on 127.0.0.1 and
a Unix socket in a temporary directory."""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import resource
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from proxy_kit import run

from metaprotocol_sdk.proxy import Engine
from metaprotocol_sdk.proxy.config.loader import loads_config
from metaprotocol_sdk.proxy.hot_restart import (
    MAX_SUCCESSOR_MESSAGE,
    REPLY_TIMEOUT,
    Channel,
    HandoverServer,
    HotRestartError,
    PeerProcess,
    take_over,
)
from metaprotocol_sdk.proxy.stats import Stats

MESH = """\
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: ApplicationProtocol
metadata: {name: thrift}
spec: {protocol: thrift, codec: aeraki.meta_protocol.codec.thrift}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: hello}
spec:
  hosts: [hello.test]
  ports: [{number: 9090, name: tcp-metaprotocol-thrift-hello, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, ports: {tcp-metaprotocol-thrift-hello: 1}}]
---
apiVersion: proxy.metaprotocol.io/v1alpha1
kind: ProxyConfig
metadata: {name: engine}
spec:
  listeners: [{host: hello.test, port: 9090, bind: "127.0.0.1:0"}]
  admin: {bind: "127.0.0.1:0"}
  timeouts: {drain: 1s}
"""
COUNTER = "metaprotocol_hot_restart_test_total"


class Running:
    """An engine serving, with the hot restart socket at ``path``."""

    def __init__(self, path: Path) -> None:
        self.engine = Engine(loads_config(MESH))
        self.server = HandoverServer(self.engine, str(path), 0, self._taken_over)
        self.stopping: asyncio.Task[None] | None = None

    def _taken_over(self, pid: int) -> None:  # what the command does (cli/proxy.py)
        self.engine.hand_over()
        self.stopping = asyncio.ensure_future(self.engine.stop(drain=0.2, serve_first=True))

    async def __aenter__(self) -> Running:
        await self.engine.start()
        self.server.open()
        self.server.publish()
        return self

    async def __aexit__(self, *_: object) -> None:
        if self.stopping is not None:
            await self.stopping
        await self.engine.stop(drain=0)
        await self.server.finish(1.0)

    def count(self, n: int = 1) -> None:
        self.engine.stats.counter(COUNTER, kind="a").value += n


def value(stats: Stats) -> int:
    return int(stats.counter(COUNTER, kind="a").value)


def test_a_successor_that_gave_up_after_the_counts_takes_none_from_the_next(
    tmp_path: Path,
) -> None:
    """A successor that imported the counts, then gave up (killed, stopped while it waited
    for its control plane), does not make the next one miss them: each successor is sent
    every series, not what changed since the one before it."""
    path = tmp_path / "engine.sock"

    async def scenario() -> None:
        async with Running(path) as running:
            running.count(3)
            quitter = await take_over(str(path), running.engine.config)
            assert quitter is not None
            await quitter.import_stats(Stats())
            quitter.abandon()
            successor = await take_over(str(path), running.engine.config)
            assert successor is not None
            mine = Stats()
            await successor.import_stats(mine)
            assert value(mine) == 3
            successor.abandon()

    run(scenario())


def test_the_counts_made_before_the_drain_are_in_when_it_returns(
    tmp_path: Path,
) -> None:
    """What the predecessor counted between the successor's import and the drain (a
    control plane's first routes can take seconds) is in the successor's stats once it
    starts serving: a scrape of it never shows less than the predecessor's last."""
    path = tmp_path / "engine.sock"

    async def scenario() -> None:
        async with Running(path) as running:
            running.count(3)
            successor = await take_over(str(path), running.engine.config)
            assert successor is not None
            mine = Stats()
            await successor.import_stats(mine)
            running.count(2)  # served while the successor waited
            await successor.drain()
            assert value(mine) == 5
            successor.inherited.close()
            await successor.follow()
            assert successor.state == "done" and value(mine) == 5

    run(scenario())


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_descriptors_sent_to_the_running_engine_are_refused(tmp_path: Path) -> None:
    """A successor sends no descriptor: a peer that does (a message cut into many pieces,
    each carrying hundreds, held for the 10 s of the answer's wait) would fill the running
    engine's descriptor table, and its clients would be refused at the accept. The
    connection is closed at the first, and none of them stays open."""
    path = tmp_path / "engine.sock"

    async def scenario() -> None:
        async with Running(path) as running:
            before = _fds()
            hello = json.dumps(
                {"op": "hello", "protocol": 1, "pid": 1, "listeners": [], "admin": None}
            ).encode()
            data = struct.pack("!I", len(hello)) + hello
            loop = asyncio.get_running_loop()
            with socket.socket(socket.AF_UNIX) as peer:
                peer.setblocking(False)
                await loop.sock_connect(peer, str(path))
                carried = array.array("i", [peer.fileno()] * 200)
                with contextlib.suppress(OSError):  # (closed after the first, with the fix)
                    peer.sendmsg([data[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, carried)])
                    peer.sendmsg([data[1:]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, carried)])
                try:
                    reply = await asyncio.wait_for(loop.sock_recv(peer, 1 << 16), 5.0)
                except ConnectionResetError:  # closed with the rest unread
                    reply = b""
            assert reply == b""  # closed, no sockets given
            assert _fds() <= before
            assert running.server.incoming is None and not running.engine.draining

    run(scenario())


def test_a_successor_gone_while_the_engine_drains_does_not_hold_its_exit(
    tmp_path: Path,
) -> None:
    """The successor dies (SIGKILL) after taking over: the draining engine, done, exits at
    once rather than wait the whole answer time for the last counts nobody will read."""
    path = tmp_path / "engine.sock"

    async def scenario() -> None:
        async with Running(path) as running:
            successor = await take_over(str(path), running.engine.config)
            assert successor is not None
            await successor.import_stats(Stats())
            await successor.drain()
            successor.abandon()  # its socket closes, as when it is killed
            assert running.stopping is not None
            await running.stopping
            loop = asyncio.get_running_loop()
            started = loop.time()
            await running.server.finish(REPLY_TIMEOUT)
            assert loop.time() - started < REPLY_TIMEOUT / 4

    run(scenario())


def test_more_sockets_than_one_sendmsg_carries(tmp_path: Path) -> None:
    """Linux passes at most 253 descriptors per ``sendmsg`` (``SCM_MAX_FD``): an engine with
    more listening sockets than that (listeners, the addresses of their names, the admin
    endpoint) still hands every one over, in order."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        left, right = socket.socketpair(socket.AF_UNIX)
        sender, receiver = Channel(left, loop), Channel(right, loop)
        files = [os.open(tmp_path / str(i), os.O_RDONLY | os.O_CREAT) for i in range(600)]
        try:
            _, (message, fds) = await asyncio.gather(
                sender.send({"op": "sockets"}, files), receiver.receive(5.0)
            )
            try:
                assert message == {"op": "sockets"} and len(fds) == len(files)
                inodes = [os.fstat(fd).st_ino for fd in fds]
                assert inodes == [os.fstat(fd).st_ino for fd in files]
            finally:
                for fd in fds:
                    os.close(fd)
        finally:
            for fd in files:
                os.close(fd)
            sender.close()
            receiver.close()

    run(scenario())


def test_the_access_log_counters_go_on_from_the_predecessors(tmp_path: Path) -> None:
    """The access log's failed writes and dropped lines are counters like the others: the
    successor's own add to the predecessor's, rather than replace them at its first sweep
    (Prometheus would see a counter reset)."""
    path = tmp_path / "engine.sock"
    logged = MESH.replace(
        "  timeouts:", f"  accessLog: {{path: {tmp_path / 'access.log'}}}\n  timeouts:"
    )
    names = (
        "metaprotocol_access_log_write_failures_total",
        "metaprotocol_access_log_dropped_lines_total",
    )

    async def scenario() -> None:
        async with Running(path) as running:
            for name in names:
                running.engine.stats.counter(name).value = 7
            config = loads_config(logged)
            predecessor = await take_over(str(path), config)
            assert predecessor is not None
            engine = Engine(config, inherited=predecessor.inherited)
            await engine.start(serve=False)
            try:
                await predecessor.import_stats(engine.stats)
                engine._flush_access_log()  # what each sweep does
                assert [engine.stats.counter(name).value for name in names] == [7, 7]
            finally:
                predecessor.abandon()
                await engine.stop(drain=0)

    run(scenario())


def test_a_message_nested_too_deep_is_refused_like_any_bad_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """JSON nested deeper than the parser recurses (``[[[[...``, well under the size limit)
    is a bad message: said in one line and the connection closed, not a traceback of the
    task that read it."""
    path = tmp_path / "engine.sock"

    async def scenario() -> None:
        async with Running(path):
            body = b"[" * 200_000
            loop = asyncio.get_running_loop()
            with socket.socket(socket.AF_UNIX) as peer:
                peer.setblocking(False)
                await loop.sock_connect(peer, str(path))
                await loop.sock_sendall(peer, struct.pack("!I", len(body)) + body)
                assert await asyncio.wait_for(loop.sock_recv(peer, 1 << 16), 5.0) == b""

    with caplog.at_level(logging.WARNING, "metaprotocol.proxy.hot_restart"):
        run(scenario())
    failed = [r.getMessage() for r in caplog.records if "a successor failed" in r.getMessage()]
    assert failed == ["hot restart: a successor failed: not a JSON message: nested too deep"]


def test_an_accept_that_fails_for_want_of_descriptors_is_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A moment without a free descriptor (``EMFILE``) when a successor connects does not
    end listening for successors for good: the accept is tried again, and the next one takes
    over."""
    path = tmp_path / "engine.sock"

    async def scenario() -> None:
        async with Running(path) as running:
            loop = asyncio.get_running_loop()
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            early = socket.socket(socket.AF_UNIX)
            early.setblocking(False)
            try:
                lowest = os.dup(0)  # the lowest free descriptor: none from here on
                os.close(lowest)
                resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
                try:
                    with contextlib.suppress(BlockingIOError):
                        early.connect(str(path))  # queued; its accept finds no descriptor
                    deadline = loop.time() + 5.0
                    while not any("cannot accept" in r.getMessage() for r in caplog.records):
                        assert loop.time() < deadline, "no accept was tried"
                        await asyncio.sleep(0.01)  # polling the log: no event to wait on
                finally:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            finally:
                early.close()
            successor = await asyncio.wait_for(take_over(str(path), running.engine.config), 5)
            assert successor is not None
            successor.abandon()

    with caplog.at_level(logging.WARNING, "metaprotocol.proxy.hot_restart"):
        run(scenario())


def test_once_the_predecessor_drains_the_successor_serves_whatever_follows(
    tmp_path: Path,
) -> None:
    """After ``draining`` the predecessor accepts no more: if its counts then fail to come
    (it dies, it sends garbage), the successor still starts (it says what was lost), rather
    than give up and leave nobody accepting."""
    path = tmp_path / "engine.sock"

    def frame(message: dict[str, object]) -> bytes:
        body = json.dumps(message).encode()
        return struct.pack("!I", len(body)) + body

    async def predecessor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for reply in (
            {"op": "sockets", "pid": os.getpid(), "generation": 0, "listeners": [], "admin": 0},
            {"op": "stats_end"},
            {"op": "draining"},
        ):
            (size,) = struct.unpack("!I", await reader.readexactly(4))
            await reader.readexactly(size)
            writer.write(frame(reply))
        writer.write(b"\x00\x00\x00\x02{]")  # its counts: garbage, then it is gone
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_unix_server(predecessor, str(path))
        async with server:
            successor = await take_over(str(path), loads_config(MESH))
            assert successor is not None
            await successor.import_stats(Stats())
            await successor.drain()  # no error: it drains, this process serves
            await successor.follow()
            assert successor.state == "lost"

    run(scenario())


def test_the_running_engine_takes_no_message_larger_than_a_successors(tmp_path: Path) -> None:
    """A successor sends a hello and short asks: a length above ``MAX_SUCCESSOR_MESSAGE`` is
    refused at once, before its bytes are read (four peers sending ``MAX_MESSAGE`` of
    ``[{},{},...`` made 115 MB of parsed objects)."""
    path = tmp_path / "engine.sock"

    async def scenario() -> None:
        async with Running(path):
            loop = asyncio.get_running_loop()
            with socket.socket(socket.AF_UNIX) as peer:
                peer.setblocking(False)
                await loop.sock_connect(peer, str(path))
                await loop.sock_sendall(peer, struct.pack("!I", MAX_SUCCESSOR_MESSAGE + 1))
                closed = await asyncio.wait_for(loop.sock_recv(peer, 1 << 16), REPLY_TIMEOUT / 4)
                assert closed == b""

    run(scenario())


def test_a_temporary_socket_someone_listens_at_is_kept(tmp_path: Path) -> None:
    """A temporary name whose pid is not a process here may be a live process of another
    pid namespace (a container sharing the directory): kept while someone listens there."""
    path = tmp_path / "engine.sock"
    pid = 1
    while True:  # a pid no process has here
        pid += 1
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        except PermissionError:
            continue
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(tmp_path / f"engine.sock.{pid}"))
    listening.listen()

    async def scenario() -> None:
        async with Running(path):
            pass

    try:
        run(scenario())
        assert (tmp_path / f"engine.sock.{pid}").exists()
    finally:
        listening.close()


def test_a_socket_file_removed_before_it_is_published_is_said_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The temporary socket removed by hand (a cleanup of the directory) while a successor
    follows: it serves on and says the path could not be taken, rather than end its task
    with a traceback."""
    path = tmp_path / "engine.sock"

    async def scenario() -> None:
        async with Running(path) as running:
            server = HandoverServer(running.engine, str(tmp_path / "next.sock"), 1, print)
            server.open()
            (tmp_path / f"next.sock.{os.getpid()}").unlink()
            server.publish()
            server.close()

    with caplog.at_level(logging.WARNING, "metaprotocol.proxy.hot_restart"):
        run(scenario())
    assert any("cannot put the socket at" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_wait_for_the_peers_exit_cancelled_leaves_the_other_watching(
    tmp_path: Path, loop: str
) -> None:
    """Two waits for the predecessor's exit, the first cancelled (the control plane
    answered first) once the second watches (its socket closed as it died): the second
    sees the exit, rather than lose its watch to the first one's cleanup and say, a second
    later, that the predecessor lives (the successor then exits, leaving nobody serving)."""
    path = tmp_path / "peer.sock"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen()
    child = subprocess.Popen([sys.executable, "-c", PEER, str(path)], stdin=subprocess.PIPE)
    conn, _ = listening.accept()

    async def scenario() -> None:
        peer = PeerProcess(conn)
        try:
            assert peer.pid == child.pid
            first = asyncio.ensure_future(peer.exited(within=None))
            await asyncio.sleep(0)  # it watches
            second = asyncio.ensure_future(peer.exited(within=REPLY_TIMEOUT))
            await asyncio.sleep(0)  # it watches too
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
            assert child.stdin is not None
            child.stdin.close()  # it exits
            assert await second
            assert await peer.exited(within=0)  # (and goes on saying so)
        finally:
            peer.close()

    try:
        run(scenario(), loop=loop)
    finally:
        conn.close()
        listening.close()
        if child.poll() is None:
            child.kill()
        child.wait()


def test_a_predecessor_leaves_the_path_to_its_successor(tmp_path: Path) -> None:
    """Taken over, the draining engine does not remove the socket file at the path as it
    closes, even while it is still its own: the successor renames its socket over it as
    the drain ends, at the same moment, and a check of the file then its removal could
    remove the successor's (the next hot restart would find nobody and fail to bind)."""
    path = tmp_path / "engine.sock"

    async def scenario() -> None:
        async with Running(path) as running:
            successor = await take_over(str(path), running.engine.config)
            assert successor is not None
            await successor.import_stats(Stats())
            await successor.drain()
            successor.inherited.close()
            assert running.stopping is not None
            await running.stopping
            following = asyncio.ensure_future(successor.follow())
            await running.server.finish(REPLY_TIMEOUT)
            await following
            assert successor.state == "done"
            assert path.exists()  # its successor publishes over it
            assert not (tmp_path / f"engine.sock.{os.getpid()}").exists()

    run(scenario())


def test_a_descriptor_that_is_no_socket_from_the_predecessor_is_refused(
    tmp_path: Path,
) -> None:
    """A process at the path that passes something other than a socket (a pipe) as a
    listener's: the successor says so (a hot restart error: it exits 1, no traceback) and
    closes every descriptor it was given."""
    path = tmp_path / "engine.sock"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen()
    config = loads_config(MESH)

    def predecessor() -> None:
        conn, _ = listening.accept()
        with conn:
            (size,) = struct.unpack("!I", conn.recv(4, socket.MSG_WAITALL))
            conn.recv(size, socket.MSG_WAITALL)
            body = json.dumps(
                {
                    "op": "sockets",
                    "pid": os.getpid(),
                    "generation": 0,
                    "listeners": [["hello.test", 9090, 2]],
                    "admin": 0,
                }
            ).encode()
            read, write = os.pipe()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                rights = array.array("i", [sock.fileno(), read])
                conn.sendmsg(
                    [struct.pack("!I", len(body)) + body],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)],
                )
            finally:
                sock.close()
                os.close(read)
                os.close(write)
            conn.recv(1)  # until the successor closes

    async def scenario() -> None:
        before = _fds()
        serving = asyncio.ensure_future(asyncio.to_thread(predecessor))
        with pytest.raises(HotRestartError, match="not a socket"):
            await take_over(str(path), config)
        await serving
        assert _fds() <= before

    try:
        run(scenario())
    finally:
        listening.close()


def test_a_path_that_cannot_be_looked_at_is_a_hot_restart_error(tmp_path: Path) -> None:
    """A path under a file (or a directory this user cannot search): said as a hot restart
    error (status 1, one line), not an OSError out of the takeover (a traceback)."""
    (tmp_path / "file").write_text("")

    async def scenario() -> None:
        with pytest.raises(HotRestartError, match="cannot use"):
            await take_over(str(tmp_path / "file" / "engine.sock"), loads_config(MESH))

    run(scenario())


PEER = """\
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
sys.stdin.read()
"""
