"""``metaprotocol proxy --hot-restart PATH``: a new process takes over a running one's
listening sockets and counters. Real processes, thriftpy2 servers and clients on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from proxy_kit import ProxyProcess

from metaprotocol_sdk.demo.idl import hello, untyped
from metaprotocol_sdk.demo.thrift_server import HelloServer

WAIT = 15.0  # bound on every single wait


def mesh(port: int, *, drain: str = "4s", bind: str = "127.0.0.1:0") -> str:
    return f"""\
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: ApplicationProtocol
metadata: {{name: thrift}}
spec: {{protocol: thrift, codec: aeraki.meta_protocol.codec.thrift}}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: hello}}
spec:
  hosts: [hello.test]
  ports: [{{number: 9090, name: tcp-metaprotocol-thrift-hello, protocol: TCP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{tcp-metaprotocol-thrift-hello: {port}}}}}]
---
apiVersion: proxy.metaprotocol.io/v1alpha1
kind: ProxyConfig
metadata: {{name: engine}}
spec:
  listeners: [{{host: hello.test, port: 9090, bind: "{bind}"}}]
  admin: {{bind: "127.0.0.1:0"}}
  timeouts: {{drain: {drain}}}
"""


class Proxy(ProxyProcess):
    """A ``metaprotocol proxy --hot-restart PATH`` process (``None``: without the option)."""

    def __init__(
        self,
        config: Path,
        path: Path | None,
        *args: str,
        serving: bool = True,
        env: dict[str, str] | None = None,
    ) -> None:
        restart = [] if path is None else ["--hot-restart", str(path)]
        super().__init__(
            config,
            *restart,
            *args,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            serving=serving,
        )

    def stderr(self) -> list[str]:
        """The lines written so far."""
        out = []
        while not self.lines.empty():
            out.append(self.lines.get())
        return out

    def requests_ok(self) -> int:
        stats = self.get("/stats?format=json")
        return sum(
            v
            for k, v in stats.items()
            if k.startswith("metaprotocol_requests_total{") and 'status="Ok"' in k
        )

    def durations_counted(self) -> int:
        """Requests in the request duration histogram."""
        stats = self.get("/stats?format=json")
        return sum(
            v
            for k, v in stats.items()
            if k.startswith("metaprotocol_request_duration_milliseconds_count")
        )


def client(port: int) -> Any:
    return untyped("thriftpy2.rpc").make_client(
        hello().Hello,
        "127.0.0.1",
        port,
        trans_factory=untyped("thriftpy2.transport").TFramedTransportFactory(),
        timeout=int(WAIT * 1000),
    )


@pytest.fixture
def server() -> Iterator[HelloServer]:
    upstream = HelloServer("v1").start()
    yield upstream
    upstream.close()


@pytest.fixture
def setup(tmp_path: Path, server: HelloServer) -> tuple[Path, Path]:
    config = tmp_path / "mesh.yaml"
    config.write_text(mesh(server.port))
    return config, tmp_path / "engine.sock"


class Load:
    """Threads each sending requests, a new connection for each, until stopped; every
    failure is kept."""

    def __init__(self, port: int, threads: int = 4) -> None:
        self.port = port
        self.ok = [0] * threads
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int) -> None:
        while not self._stop.is_set():
            try:
                c = client(self.port)
                try:
                    assert c.sayHello("load") == "v1: hello load"
                finally:
                    c.close()
                self.ok[index] += 1
            except Exception as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")

    def at_least(self, n: int) -> None:
        """Wait until every thread has made ``n`` more requests than now."""
        goal = [k + n for k in self.ok]
        deadline = time.monotonic() + WAIT
        while any(k < g for k, g in zip(self.ok, goal, strict=True)) and not self.failures:
            assert time.monotonic() < deadline, "the load stopped making progress"
            time.sleep(0.01)  # polling the threads' counts (not synchronisation with the engine)

    def stop(self) -> int:
        self._stop.set()
        for thread in self._threads:
            thread.join(WAIT)
        return sum(self.ok)


def test_a_hot_restart_under_load_refuses_no_connection_and_keeps_every_count(
    setup: tuple[Path, Path],
) -> None:
    """New connections all through the restart: none refused or reset (the listening socket
    never closes), the port unchanged, and the successor's counters go on from the
    predecessor's: they agree with what the clients saw."""
    config, path = setup
    first = Proxy(config, path)
    second: Proxy | None = None
    try:
        assert first.get("/stats?format=json")["metaprotocol_hot_restart_generation"] == 0
        load = Load(first.port)
        load.at_least(20)
        second = Proxy(config, path)
        assert (second.port, second.admin) == (first.port, first.admin)
        second.wait_line("hot restart: took over from pid")
        load.at_least(20)
        assert first.proc.wait(WAIT) == 0
        second.wait_line(f"hot restart: pid {first.proc.pid} has drained")
        load.at_least(20)
        assert load.failures == []
        answered = sum(load.ok)  # before the scrape: the clients go on meanwhile
        assert second.requests_ok() >= answered
        stats = second.get("/stats?format=json")
        assert stats["metaprotocol_hot_restart_generation"] == 1
        dump = second.get("/config_dump")["hotRestart"]
        assert dump["predecessor"] == {"pid": first.proc.pid, "state": "done"}
        assert dump["generation"] == 1 and dump["successor"] is None and dump["incoming"] is None
        first_lines = first.stderr()
        assert f"info: hot restart: pid {second.proc.pid} takes over; draining" in first_lines
        assert "info: draining (taken over)" in first_lines
        # The next restart, under the same load, goes on from the second (the socket is its
        # own now).
        third = Proxy(config, path)
        try:
            assert third.port == first.port
            assert second.proc.wait(WAIT) == 0
            third.wait_line(f"hot restart: pid {second.proc.pid} has drained")
            load.at_least(20)
            total = load.stop()
            assert load.failures == []
            assert third.requests_ok() == total
            assert third.durations_counted() == total  # histograms too
            assert third.get("/stats?format=json")["metaprotocol_hot_restart_generation"] == 2
        finally:
            load.stop()
            third.stop()
        assert third.proc.returncode == 0
        assert not path.exists(), "the last engine left its socket behind"
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_open_connections_are_served_then_closed_once_quiet(
    setup: tuple[Path, Path], server: HelloServer
) -> None:
    """The predecessor keeps serving the connections it has (no ShuttingDown reply): a
    request in flight at the hand-over is answered, and so is the next one on the same
    connection; a connection quiet for a second is closed, so its client's next connection
    reaches the successor, and the predecessor exits well before its drain deadline."""
    config, path = setup
    config.write_text(mesh(server.port, drain="60s"))
    first = Proxy(config, path)
    second: Proxy | None = None
    try:
        busy, quiet = client(first.port), client(first.port)
        assert quiet.sayHello("q") == "v1: hello q"
        result: list[str] = []
        slow = threading.Thread(target=lambda: result.append(busy.sleep(1500)))
        slow.start()
        assert server.handler.sleeping.wait(WAIT)
        started = time.monotonic()
        second = Proxy(config, path)
        second.wait_line("hot restart: took over from pid")
        slow.join(WAIT)
        assert result == ["v1: slept 1500"]
        assert busy.sayHello("again") == "v1: hello again"  # served, not ShuttingDown
        assert first.proc.wait(WAIT) == 0
        assert time.monotonic() - started < 20, "the predecessor waited for its deadline"
        for c in (busy, quiet):  # closed by the predecessor
            with pytest.raises(Exception, match=r"TSocket read 0 bytes|reset|closed|Broken"):
                c.sayHello("late")
            c.close()
        assert second.requests_ok() == 3  # the predecessor's, handed over
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_a_sigterm_to_the_predecessor_draining_for_its_successor_lets_it_drain(
    setup: tuple[Path, Path], server: HelloServer
) -> None:
    """The process draining for its successor gets its first ``SIGTERM`` (a service
    manager's stop reaches every process of the unit): it drains on, its request in flight
    answered, rather than end at once as at a second signal (that request lost)."""
    config, path = setup
    config.write_text(mesh(server.port, drain="60s"))
    first = Proxy(config, path)
    second: Proxy | None = None
    busy = client(first.port)
    try:
        result: list[str] = []
        slow = threading.Thread(target=lambda: result.append(busy.sleep(1500)))
        slow.start()
        assert server.handler.sleeping.wait(WAIT)
        second = Proxy(config, path)
        first.wait_line("draining (taken over)")
        first.proc.send_signal(signal.SIGTERM)
        slow.join(WAIT)
        assert result == ["v1: slept 1500"]
        assert first.proc.wait(WAIT) == 0
        line = first.wait_line("a second signal ends at once")
        assert line == "warning: draining for the successor already; a second signal ends at once"
    finally:
        busy.close()
        first.stop()
        if second is not None:
            second.stop()


def test_a_successor_that_cannot_start_leaves_the_engine_serving(
    setup: tuple[Path, Path], tmp_path: Path, server: HelloServer
) -> None:
    config, path = setup
    first = Proxy(config, path)
    try:
        c = client(first.port)
        broken = tmp_path / "broken.yaml"
        broken.write_text(mesh(server.port).replace("port: 9090, bind", "port: 9091, bind"))
        failed = Proxy(broken, path, serving=False)
        assert failed.proc.wait(WAIT) == 2
        # Its own files are checked before it asks for anything: a bind that cannot be had is
        # found with the sockets in hand, and those are given back.
        taken = socket.create_server(("127.0.0.1", 0))
        clash = tmp_path / "clash.yaml"
        clash.write_text(
            mesh(server.port).replace(
                'admin: {bind: "127.0.0.1:0"}',
                f'admin: {{bind: "127.0.0.1:{taken.getsockname()[1]}"}}',
            )
        )
        refused = Proxy(clash, path, serving=False)
        assert refused.proc.wait(WAIT) == 1
        taken.close()
        assert any("cannot bind" in line for line in refused.stderr())
        assert first.proc.poll() is None
        assert c.sayHello("still") == "v1: hello still"
        assert client(first.port).sayHello("new") == "v1: hello new"
        with urllib.request.urlopen(f"http://{first.admin}/ready", timeout=WAIT) as reply:
            assert reply.read() == b"LIVE\n"
        c.close()
    finally:
        first.stop()
    assert first.proc.returncode == 0


def test_one_takeover_at_a_time(setup: tuple[Path, Path], server: HelloServer) -> None:
    """While an engine drains for its successor, a third process is refused (the path still
    leads to the draining one) and says so; the successor is not disturbed."""
    config, path = setup
    config.write_text(mesh(server.port, drain="60s"))
    first = Proxy(config, path)
    second: Proxy | None = None
    try:
        held = client(first.port)
        result: list[str] = []
        slow = threading.Thread(target=lambda: result.append(held.sleep(3000)))
        slow.start()
        assert server.handler.sleeping.wait(WAIT)
        second = Proxy(config, path)
        second.wait_line("hot restart: took over from pid")
        third = Proxy(config, path, serving=False)
        assert third.proc.wait(WAIT) == 1
        line = third.wait_line("hot restart:")
        assert f"pid {second.proc.pid} has taken over; this engine is draining" in line, line
        slow.join(WAIT)
        assert result == ["v1: slept 3000"]
        held.close()
        assert client(second.port).sayHello("ok") == "v1: hello ok"
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_a_stale_socket_or_another_file_at_the_path(setup: tuple[Path, Path]) -> None:
    """A process killed with SIGKILL leaves its socket file: the next one starts afresh
    (generation 0). A path that is not a socket is refused."""
    config, path = setup
    first = Proxy(config, path)
    first.proc.kill()
    first.proc.wait(WAIT)
    assert path.exists()
    fresh = Proxy(config, path)
    try:
        assert fresh.get("/stats?format=json")["metaprotocol_hot_restart_generation"] == 0
        assert client(fresh.port).sayHello("x") == "v1: hello x"
    finally:
        fresh.stop()
    path.write_text("not a socket")
    refused = Proxy(config, path, serving=False)
    assert refused.proc.wait(WAIT) == 1
    assert (
        refused.wait_line("hot restart:")
        == f"error: hot restart: {path} exists and is not a socket"
    )


def test_not_with_several_workers_nor_a_path_too_long(setup: tuple[Path, Path]) -> None:
    config, path = setup
    refused = Proxy(config, path, "--workers", "2", serving=False)
    assert refused.proc.wait(WAIT) == 2
    assert "--hot-restart: not with --workers 2" in refused.wait_line("--hot-restart")
    long = path.parent / ("x" * 100)
    refused = Proxy(config, long, serving=False)
    assert refused.proc.wait(WAIT) == 2
    line = refused.wait_line("--hot-restart")
    assert line == "error: --hot-restart: the path is longer than 96 bytes (a Unix socket's limit)"


def test_hostile_peers_on_the_socket_change_nothing(setup: tuple[Path, Path]) -> None:
    """Whatever a local process of the same user writes to the socket (garbage, a length
    above the limit, another protocol version, half a message then silence), the engine
    serves on, and a real successor still takes over."""
    config, path = setup
    first = Proxy(config, path)
    second: Proxy | None = None
    try:

        def talk(data: bytes) -> bytes:
            with socket.socket(socket.AF_UNIX) as peer:
                peer.settimeout(WAIT)
                peer.connect(str(path))
                peer.sendall(data)
                peer.shutdown(socket.SHUT_WR)
                return peer.recv(1 << 16)

        def message(body: dict[str, Any]) -> bytes:
            raw = json.dumps(body).encode()
            return struct.pack("!I", len(raw)) + raw

        assert talk(b"\x00\x00\x00\x05hello") == b""  # not JSON: closed
        assert talk(struct.pack("!I", 1 << 30)) == b""  # above the limit: closed at once
        reply = talk(message({"op": "hello", "protocol": 99, "listeners": [], "admin": None}))
        assert b"hot restart protocol 99" in reply
        bad = talk(message({"op": "hello", "protocol": 1, "listeners": [["x", -1]]}))
        assert bad == b""
        silent = socket.socket(socket.AF_UNIX)
        silent.connect(str(path))
        silent.sendall(b"\x00\x00")  # half a length, then nothing: it does not block others
        assert client(first.port).sayHello("x") == "v1: hello x"
        second = Proxy(config, path)
        assert second.port == first.port
        assert first.proc.wait(WAIT) == 0
        silent.close()
        assert any("a successor failed" in line for line in first.stderr())
    finally:
        first.stop()
        if second is not None:
            second.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_another_user_is_refused(setup: tuple[Path, Path]) -> None:
    """The socket is mode 0600; opened to all, the engine still refuses a peer of another
    user (SO_PEERCRED) and serves on."""
    config, _ = setup
    shared = Path(tempfile.mkdtemp(prefix="hot-restart-"))
    shared.chmod(0o755)  # pytest's own directories are 0700: nobody else could reach the path
    path = shared / "engine.sock"
    first = Proxy(config, path)
    try:
        assert (path.stat().st_mode & 0o777) == 0o600
        os.chmod(path, 0o666)
        code = (
            "import os, socket, struct, json\n"
            "os.setgid(65534); os.setuid(65534)\n"
            f"s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect({str(path)!r})\n"
            "raw = json.dumps({'op': 'hello', 'protocol': 1, 'listeners': [], 'admin': None})\n"
            "try:\n"
            "    s.sendall(struct.pack('!I', len(raw)) + raw.encode())\n"
            "    print(len(s.recv(65536)))\n"
            "except (BrokenPipeError, ConnectionResetError):\n"
            "    print(0)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT
        )
        assert out.stdout.strip() == "0", out  # closed without an answer
        assert "runs as uid 65534" in first.wait_line("a successor failed")
        assert client(first.port).sayHello("x") == "v1: hello x"
    finally:
        first.stop()
        shutil.rmtree(shared, ignore_errors=True)


def test_sigusr2_starts_the_successor_and_systemd_hears_from_each(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    """``SIGUSR2`` runs the same command again, which takes over; with ``NOTIFY_SOCKET``
    (systemd's ``Type=notify``) each process says it is ready and the unit's main process,
    and only the last one says it is stopping."""
    config, path = setup
    notes = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notes.bind(str(tmp_path / "notify"))
    notes.settimeout(WAIT)
    first = Proxy(config, path, env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
    successor = 0
    try:
        assert notes.recv(4096).decode() == f"READY=1\nMAINPID={first.proc.pid}\nSTATUS=serving"
        c = client(first.port)
        assert c.sayHello("before") == "v1: hello before"
        first.proc.send_signal(signal.SIGUSR2)
        line = first.wait_line("hot restart: started pid")
        successor = int(line.split("started pid ")[1].split()[0])
        assert notes.recv(4096).decode() == f"READY=1\nMAINPID={successor}\nSTATUS=serving"
        assert first.proc.wait(WAIT) == 0
        assert client(first.port).sayHello("after") == "v1: hello after"
        first.wait_line(f"hot restart: pid {first.proc.pid} has drained")
        notes.setblocking(False)
        with pytest.raises(BlockingIOError):  # the first one, gone, said nothing more
            notes.recv(4096)
        notes.settimeout(WAIT)
        os.kill(successor, signal.SIGTERM)
        assert notes.recv(4096).decode() == "STOPPING=1"
        first.reader.join(WAIT)  # the successor closed the shared stderr: it has exited
        assert not first.reader.is_alive()
        successor = 0
        assert not path.exists()
        c.close()
    finally:
        notes.close()
        first.stop()
        if successor:
            os.kill(successor, signal.SIGKILL)


def test_sigusr2_without_hot_restart_is_ignored(setup: tuple[Path, Path]) -> None:
    """Its default action would end the process: with no ``--hot-restart`` it is said and
    ignored."""
    config, _ = setup
    proxy = Proxy(config, None)
    try:
        proxy.proc.send_signal(signal.SIGUSR2)
        line = proxy.wait_line("SIGUSR2")
        assert line == "warning: SIGUSR2 starts a hot restart only with --hot-restart PATH; ignored"
        assert client(proxy.port).sayHello("x") == "v1: hello x"
    finally:
        proxy.stop()
    assert proxy.proc.returncode == 0


#: A running engine's side of the hot restart, cut short: it listens at the path, reads the
#: hello, then (``hello``) is killed, or (``stats``) gives its listening socket, reads the ask
#: for the counts and is killed (a crash, the OOM killer).
DYING = """\
import array, json, os, signal, socket, struct, sys
path, when = sys.argv[1], sys.argv[2]
listening = socket.create_server(("127.0.0.1", 0))
hot = socket.socket(socket.AF_UNIX)
hot.bind(path)
hot.listen()
print(listening.getsockname()[1], flush=True)
conn, _ = hot.accept()
(size,) = struct.unpack("!I", conn.recv(4, socket.MSG_WAITALL))
conn.recv(size, socket.MSG_WAITALL)
if when == "stats":
    body = json.dumps({"op": "sockets", "pid": os.getpid(), "generation": 0,
                       "listeners": [["hello.test", 9090, 1]], "admin": 0}).encode()
    fds = array.array("i", [listening.fileno()])
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
    conn.sendmsg([struct.pack("!I", len(body)) + body], rights)
    conn.recv(4, socket.MSG_WAITALL)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("when", ["hello", "stats"])
def test_a_predecessor_killed_during_the_takeover_leaves_the_successor_serving(
    setup: tuple[Path, Path], when: str
) -> None:
    """The running engine dies (SIGKILL) while its successor takes over: before it gave its
    sockets, the successor starts afresh (generation 0); after, it serves on them (the same
    port, the counts it had), rather than exit and leave nothing serving."""
    config, path = setup
    dying = subprocess.Popen(
        [sys.executable, "-c", DYING, str(path), when], stdout=subprocess.PIPE, text=True
    )
    assert dying.stdout is not None
    port = int(dying.stdout.readline())
    successor = Proxy(config, path)
    try:
        assert dying.wait(WAIT) == -signal.SIGKILL
        assert (successor.port == port) is (when == "stats")
        assert client(successor.port).sayHello("x") == "v1: hello x"
        stats = successor.get("/stats?format=json")
        assert stats["metaprotocol_hot_restart_generation"] == (when == "stats")
        line = successor.wait_line(f"pid {dying.pid}")
        assert line.startswith(f"warning: hot restart: pid {dying.pid} died"), line
        if when == "stats":
            dump = successor.get("/config_dump")["hotRestart"]
            assert dump["predecessor"] == {"pid": dying.pid, "state": "lost"}
        assert path.exists()  # the successor's, for the next one
        third = Proxy(config, path)
        try:
            assert third.port == successor.port
            assert successor.proc.wait(WAIT) == 0
        finally:
            third.stop()
    finally:
        successor.stop()
        if dying.poll() is None:
            dying.kill()


def test_the_temporary_socket_of_a_killed_successor_is_removed(
    setup: tuple[Path, Path], server: HelloServer
) -> None:
    """A successor killed before it took the path over (its predecessor still drains)
    leaves its socket under its temporary name (``PATH.<pid>``): the next engine at the path
    removes those of processes that are gone, and nothing else."""
    config, path = setup
    first = Proxy(config, path)
    try:
        busy = client(first.port)
        slow = threading.Thread(target=busy.sleep, args=(1000,))
        slow.start()
        assert server.handler.sleeping.wait(WAIT)
        second = Proxy(config, path)
        second.wait_line("took over")
        temporary = path.parent / f"{path.name}.{second.proc.pid}"
        assert temporary.exists()  # the first drains: the path is still its own
        second.proc.kill()
        second.proc.wait(WAIT)
        slow.join(WAIT)
        busy.close()
        assert first.proc.wait(WAIT) == 0
        assert temporary.exists()
        alive = path.parent / f"{path.name}.{os.getpid()}"
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(alive))  # a live process's: kept
        other = path.parent / f"{path.name}.backup"
        other.write_text("")  # not a temporary name: kept
        third = Proxy(config, path)
        try:
            assert not temporary.exists()
            assert alive.exists() and other.exists()
        finally:
            third.stop()
    finally:
        first.stop()
