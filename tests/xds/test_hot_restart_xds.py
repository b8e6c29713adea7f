"""A hot restart under a control plane: the new process takes over only once it has its first
configuration from it (as Envoy's finishes its initial fetch first); until then the running
one serves every connection."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from control_plane import ControlPlane
from snapshots import CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE, hello_snapshots
from test_engine_xds import HOST, NODE, PORT, config_yaml

from metaprotocol_sdk.demo.idl import hello, untyped
from metaprotocol_sdk.demo.thrift_server import HelloServer

WAIT = 15.0


def say(port: int, name: str) -> str:
    client = untyped("thriftpy2.rpc").make_client(
        hello().Hello,
        "127.0.0.1",
        port,
        trans_factory=untyped("thriftpy2.transport").TFramedTransportFactory(),
        timeout=int(WAIT * 1000),
    )
    try:
        return str(client.sayHello(name))
    finally:
        client.close()


def dump(admin: str) -> Any:
    with urllib.request.urlopen(f"http://{admin}/config_dump", timeout=WAIT) as reply:
        return json.loads(reply.read())["hotRestart"]


def test_the_successor_takes_over_once_it_has_the_control_planes_routes(tmp_path: Path) -> None:
    v1, v2 = HelloServer("v1").start(), HelloServer("v2").start()
    cp = ControlPlane().start()
    config = tmp_path / "sidecar.yaml"
    extra = '\n    initialFetchTimeout: 60s\n  admin: {bind: "127.0.0.1:0"}'
    config.write_text(config_yaml(cp.port, extra))
    path = tmp_path / "engine.sock"
    command = [sys.executable, "-m", "metaprotocol_sdk", "proxy", "-c", str(config)]
    command += ["--hot-restart", str(path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[str]] = []
    try:
        version, resources = hello_snapshots([("127.0.0.1", v1.port)], [("127.0.0.1", v2.port)])[1]
        cp.set_snapshot(version, resources)  # sayHello goes to v2
        first = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        procs.append(first)
        assert first.stdout is not None
        first.stdout.readline()  # xds from ...
        port = int(first.stdout.readline().rsplit(":", 1)[1])
        admin = first.stdout.readline().split()[-1]
        for type_url in (CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE):
            cp.wait(lambda _r, t=type_url: cp.acked(t, version, NODE))
        assert say(port, "one") == "v2: hello one"
        cp.stop()  # a successor gets nothing from it for now

        def incoming(pid: int) -> None:
            deadline = time.monotonic() + WAIT
            while dump(admin)["incoming"] != pid:  # it holds the sockets, not draining us
                assert time.monotonic() < deadline, "the successor never asked for the sockets"
                time.sleep(0.02)  # polling the first process's state (no event to wait on)

        # One stopped while it waits for its routes gives up; the running one serves on.
        stopped = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
        procs.append(stopped)
        incoming(stopped.pid)
        stopped.send_signal(signal.SIGTERM)
        _, err = stopped.communicate(timeout=WAIT)
        assert stopped.returncode == 1
        assert (
            f"error: hot restart: stopped (SIGTERM) before taking over; pid {first.pid} serves on"
            in err.splitlines()
        ), err
        assert dump(admin)["incoming"] is None
        second = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        procs.append(second)
        incoming(second.pid)
        for i in range(20):  # its routes not there, the successor leaves every one to us
            assert say(port, str(i)) == f"v2: hello {i}"
        assert dump(admin)["successor"] is None and first.poll() is None
        cp.start()  # the same port: the successor's stream gets its configuration
        assert second.stdout is not None
        assert second.stdout.readline().startswith("xds from")
        assert int(second.stdout.readline().rsplit(":", 1)[1]) == port
        assert first.wait(WAIT) == 0
        assert say(port, "two") == "v2: hello two"  # the control plane's route, at once
        second.send_signal(signal.SIGTERM)
        assert second.wait(WAIT) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        cp.close()
        v1.close()
        v2.close()


#: A running engine's side of the hot restart: it gives its listening socket and its (no)
#: counts, says so, and waits to be killed.
GIVES_THEN_WAITS = """\
import array, json, os, socket, struct, sys, time
path, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
listening = socket.create_server(("127.0.0.1", 0))
hot = socket.socket(socket.AF_UNIX)
hot.bind(path)
hot.listen()
print(listening.getsockname()[1], flush=True)
conn, _ = hot.accept()

def read():
    (size,) = struct.unpack("!I", conn.recv(4, socket.MSG_WAITALL))
    return conn.recv(size, socket.MSG_WAITALL)

def send(message, fds=()):
    body = json.dumps(message).encode()
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    conn.sendmsg([struct.pack("!I", len(body)) + body], rights)

read()
send({"op": "sockets", "pid": os.getpid(), "generation": 0,
      "listeners": [[host, port, 1]], "admin": 0}, [listening.fileno()])
read()
send({"op": "stats_end"})
print("given", flush=True)
time.sleep(600)
"""


def test_a_predecessor_killed_while_the_successor_waits_for_the_control_plane(
    tmp_path: Path,
) -> None:
    """The running engine dies while its successor waits for its first routes (the control
    plane down): nobody accepts any more, so the successor stops waiting and serves on the
    sockets it was given, its files' configuration alone, at once rather than after
    ``initialFetchTimeout``."""
    v1 = HelloServer("v1").start()
    config = tmp_path / "sidecar.yaml"
    with socket.socket() as closed:  # a control plane that is not there
        closed.bind(("127.0.0.1", 0))
        down = closed.getsockname()[1]
    extra = '\n    initialFetchTimeout: 60s\n  admin: {bind: "127.0.0.1:0"}'
    config.write_text(config_yaml(down, extra))
    path = tmp_path / "engine.sock"
    dying = subprocess.Popen(
        [sys.executable, "-c", GIVES_THEN_WAITS, str(path), HOST, str(PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    command = [sys.executable, "-m", "metaprotocol_sdk", "proxy", "-c", str(config)]
    command += ["--hot-restart", str(path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    successor = None
    try:
        assert dying.stdout is not None
        port = int(dying.stdout.readline())
        successor = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        assert dying.stdout.readline() == "given\n"
        dying.kill()
        lines: queue.Queue[str] = queue.Queue()
        assert successor.stdout is not None
        out = successor.stdout
        threading.Thread(target=lambda: [lines.put(line) for line in out], daemon=True).start()
        assert lines.get(timeout=WAIT).startswith("xds from")
        assert lines.get(timeout=WAIT) == f"listening {HOST}:{PORT} on 127.0.0.1:{port}\n"
        successor.send_signal(signal.SIGTERM)
        _, err = successor.communicate(timeout=WAIT)
        assert successor.returncode == 0, err
        assert f"hot restart: pid {dying.pid} died during the takeover" in err, err
    finally:
        for proc in (dying, successor):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(5)
        v1.close()
