"""Real-peer harness for the Dubbo codec tests: child processes and a loopback relay.

* :class:`LineProcess` runs a peer script that speaks JSON lines on stdin/stdout.
* :class:`Relay` sits between a real consumer and a real provider on 127.0.0.1 and runs OUR
  codec on every frame: decode, then encode (with a mutation and a rewritten request id),
  ``on_error`` or ``heartbeat_reply``. It records every decoded message per direction.

Every wait is bounded; nothing sleeps to synchronise (waits are on lines, queues and events).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from metaprotocol_dubbo import DubboCodec, heartbeat_request

from metaprotocol_sdk import (
    CodecError,
    ErrorType,
    LocalError,
    MessageType,
    Metadata,
    Mutation,
    NeedData,
    join_encoded,
)

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parents[2]
NODE_MODULES = REPO_ROOT / "peers" / "node" / "node_modules"
PEERS_DIR = TESTS_DIR / "peers"
TIMEOUT = 10.0


class PeerMissing(RuntimeError):
    """A real peer is not installed (tests fail with this message; they never skip)."""


def node_env() -> dict[str, str]:
    """Environment for node peers: modules resolved from the repo's pinned node_modules."""
    if shutil.which("node") is None:
        raise PeerMissing("node is not on PATH; the Dubbo peer tests need node 20")
    for package in ("sofa-rpc-node", "dubbo-remoting", "hessian.js", "js-to-java"):
        if not (NODE_MODULES / package).is_dir():
            raise PeerMissing(
                f"{package} is missing from {NODE_MODULES}; run `npm ci` in {NODE_MODULES.parent}"
            )
    env = dict(os.environ)
    env["NODE_PATH"] = str(NODE_MODULES)
    return env


def run_node_script(script: str, *args: str) -> str:
    """Run ``peers/<script>`` with ``args`` under node (the pinned modules); its stdout, the
    test failing (never skipping) when node or a module is missing or the script fails."""
    try:
        env = node_env()
    except PeerMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    proc = subprocess.run(
        ["node", str(PEERS_DIR / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def python_peer_env() -> dict[str, str]:
    """Environment for the dubbo-ssl-python consumer (checked importable first)."""
    check = subprocess.run(
        [sys.executable, "-c", "import kazoo, dubbo_ssl; print(dubbo_ssl.__version__)"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    if check.returncode != 0:
        raise PeerMissing(
            "dubbo-ssl-python 0.9.6 (and kazoo) must be installed in the venv: "
            + check.stderr.strip()[-300:]
        )
    return dict(os.environ)


class LineProcess:
    """A child process speaking JSON lines; its stdout is read by a thread into a queue."""

    def __init__(self, argv: list[str], env: dict[str, str], name: str) -> None:
        self.name = name
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
            env=env,
            cwd=str(REPO_ROOT),
        )
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stash: dict[int, dict[str, Any]] = {}
        self._ids = itertools.count(1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                self._lines.put(json.loads(line))
        self._lines.put(None)

    def stderr_tail(self) -> str:
        """The last part of the child's stderr, for failure messages."""
        self._stderr.seek(0)
        return self._stderr.read()[-2000:]

    def next_line(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next JSON line, or an AssertionError naming the peer and its stderr."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"{self.name}: no output within {timeout}s; stderr:\n{self.stderr_tail()}"
            ) from None
        if line is None:
            raise AssertionError(f"{self.name} exited; stderr:\n{self.stderr_tail()}")
        return line

    def call(self, timeout: float = TIMEOUT, **message: Any) -> dict[str, Any]:
        """Send one JSON request line and wait for the reply line with the same id."""
        ident = next(self._ids)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"id": ident, **message}) + "\n")
        self.proc.stdin.flush()
        while ident not in self._stash:
            line = self.next_line(timeout)
            self._stash[line.get("id", -1)] = line
        return self._stash.pop(ident)

    def close(self) -> None:
        """Close stdin (the peers exit on EOF), then make sure the process is gone."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._stderr.close()


def start_node_provider() -> tuple[LineProcess, int]:
    """Start the sofa-rpc-node provider; returns it and its port."""
    proc = LineProcess(
        ["node", str(PEERS_DIR / "provider.js")], node_env(), "sofa-rpc-node provider"
    )
    try:
        port = int(proc.next_line()["port"])
    except BaseException:
        proc.close()
        raise
    return proc, port


def start_node_consumer(port: int) -> LineProcess:
    """Start the sofa-rpc-node consumer aimed at 127.0.0.1:port."""
    proc = LineProcess(
        ["node", str(PEERS_DIR / "consumer.js"), f"127.0.0.1:{port}"],
        node_env(),
        "sofa-rpc-node consumer",
    )
    try:
        assert proc.next_line().get("ready") is True
    except BaseException:
        proc.close()
        raise
    return proc


def start_python_consumer(port: int) -> LineProcess:
    """Start the dubbo-ssl-python consumer aimed at 127.0.0.1:port."""
    proc = LineProcess(
        [sys.executable, str(PEERS_DIR / "dubbo_ssl_consumer.py"), f"127.0.0.1:{port}"],
        python_peer_env(),
        "dubbo-ssl-python consumer",
    )
    try:
        assert proc.next_line().get("ready") is True
    except BaseException:
        proc.close()
        raise
    return proc


# -- the relay ---------------------------------------------------------------------------------


@dataclass
class Seen:
    """One message the relay decoded: ``direction`` is "down" (from the consumer) or "up"."""

    direction: str
    metadata: Metadata
    connection: int


RequestHook = Callable[[Metadata], "Mutation | LocalError | None"]


@dataclass
class Relay:
    """A loopback relay between a real consumer and a real provider, running our codec.

    ``request_hook(metadata)`` returns a mutation to forward with, or a :class:`LocalError`
    to answer locally with ``on_error``. ``response_mutation`` is written into every
    response. Request ids are rewritten upstream (from ``id_base``) and restored downstream
    unless ``rewrite_ids`` is false.
    """

    upstream_port: int
    codec_options: dict[str, Any] = field(default_factory=dict)
    rewrite_ids: bool = True
    id_base: int = 1_000_000
    request_hook: RequestHook = lambda md: None
    response_mutation: Mutation | None = None
    seen: list[Seen] = field(default_factory=list)
    #: (direction, bytes) of every frame the relay wrote: "up" to the provider, "down" back.
    sent: list[tuple[str, bytes]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self._events: queue.Queue[Seen] = queue.Queue()
        self._ids = itertools.count(self.id_base)
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.downstreams: list[socket.socket] = []
        self.upstreams: list[socket.socket] = []
        self._write_locks: list[tuple[threading.Lock, threading.Lock]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        """Default behaviour and no history (called between tests)."""
        self.request_hook = lambda md: None
        self.response_mutation = None
        self.seen.clear()
        self.sent.clear()
        self.errors.clear()
        while not self._events.empty():
            self._events.get_nowait()

    def wait_for(self, predicate: Callable[[Seen], bool], timeout: float = TIMEOUT) -> Seen:
        """The first recorded message (from now on) that matches ``predicate``."""
        while True:
            try:
                item = self._events.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"relay: no matching message within {timeout}s; errors={self.errors!r}"
                ) from None
            if predicate(item):
                return item

    def close(self) -> None:
        """Close the listener and every relayed connection (the pump threads then end)."""
        self.listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    # -- internals -----------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=TIMEOUT)
            up.settimeout(None)
            with self._lock:
                index = len(self.downstreams)
                self._sockets += [down, up]
                self.downstreams.append(down)
                self.upstreams.append(up)
            pending: dict[int, int] = {}
            locks = (threading.Lock(), threading.Lock())  # one writer lock per socket
            self._write_locks.append(locks)
            args = (down, up, pending, locks, index)
            threading.Thread(target=self._pump_down, args=args, daemon=True).start()
            threading.Thread(target=self._pump_up, args=args, daemon=True).start()

    def _record(self, direction: str, md: Metadata, index: int) -> None:
        item = Seen(direction, md, index)
        self.seen.append(item)
        self._events.put(item)

    def _messages(self, sock: socket.socket) -> Any:
        codec = DubboCodec(**self.codec_options)
        buffer = bytearray()
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buffer += data
            while True:
                result = codec.decode(buffer)
                if isinstance(result, NeedData):
                    break
                yield codec, result

    def _pump_down(
        self,
        down: socket.socket,
        up: socket.socket,
        pending: dict[int, int],
        locks: tuple[threading.Lock, threading.Lock],
        index: int,
    ) -> None:
        try:
            for codec, md in self._messages(down):
                self._record("down", md, index)
                if md.message_type is MessageType.Heartbeat:
                    reply = codec.heartbeat_reply(md)
                    if reply is not None:
                        with locks[0]:
                            down.sendall(reply)
                    continue
                action = self.request_hook(md)
                if isinstance(action, LocalError):
                    reply = codec.on_error(md, action)
                    self.sent.append(("down", reply))
                    with locks[0]:
                        down.sendall(reply)
                    continue
                new_id = next(self._ids) if self.rewrite_ids else md.request_id
                pending[new_id] = md.request_id
                out = codec.encode(md, action, request_id=new_id if self.rewrite_ids else None)
                data = join_encoded(out)
                self.sent.append(("up", data))
                with locks[1]:
                    up.sendall(data)
        except CodecError as exc:
            # What an engine does: answer the request the bad frame belongs to (the partial
            # metadata carries its id), then stop reading this connection.
            self.errors.append(exc)
            if exc.metadata is not None and exc.metadata.message_type.is_request_side:
                reply = DubboCodec().on_error(
                    exc.metadata, LocalError(ErrorType.BadRequest, exc.reason)
                )
                self.sent.append(("down", reply))
                with locks[0]:
                    down.sendall(reply)
        except BaseException as exc:  # recorded for the test to assert on
            self.errors.append(exc)

    def _pump_up(
        self,
        down: socket.socket,
        up: socket.socket,
        pending: dict[int, int],
        locks: tuple[threading.Lock, threading.Lock],
        index: int,
    ) -> None:
        try:
            for codec, md in self._messages(up):
                self._record("up", md, index)
                if md.message_type is MessageType.Heartbeat:
                    reply = codec.heartbeat_reply(md)
                    if reply is not None:
                        with locks[1]:
                            up.sendall(reply)
                    continue
                original = pending.pop(md.request_id, md.request_id)
                out = codec.encode(
                    md,
                    self.response_mutation,
                    request_id=original if self.rewrite_ids else None,
                )
                data = join_encoded(out)
                self.sent.append(("down", data))
                with locks[0]:
                    down.sendall(data)
        except BaseException as exc:
            self.errors.append(exc)

    def heartbeat_upstream(self, index: int = -1, request_id: int = 77) -> None:
        """Send a heartbeat request to the provider on a relayed connection."""
        with self._write_locks[index][1]:
            self.upstreams[index].sendall(heartbeat_request(request_id))

    def heartbeat_downstream(self, index: int = -1, request_id: int = 78) -> None:
        """Send a heartbeat request to the consumer on a relayed connection."""
        self.write_downstream(heartbeat_request(request_id), index)

    def write_downstream(self, data: bytes, index: int = -1) -> None:
        """Write ``data`` to the consumer on a relayed connection, as the provider would."""
        with self._write_locks[index][0]:
            self.downstreams[index].sendall(data)
