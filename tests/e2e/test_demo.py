"""The demo end to end: `metaprotocol demo` with real servers, clients and the engine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from metaprotocol_dubbo import DubboCodec
from metaprotocol_dubbo.frames import build_response

from metaprotocol_sdk import MessageType, Metadata
from metaprotocol_sdk.demo.clients import DubboLoad


def tagged_processes(tag: str) -> list[int]:
    """Pids of live processes whose environment carries ``tag`` (the demo's children inherit
    the environment, so this finds any of them however they were detached)."""
    needle = f"METAPROTOCOL_DEMO_TAG={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def assert_no_leftovers(tag: str) -> None:
    """Every process the demo started is gone (bounded wait for the kernel to reap them)."""
    deadline = time.monotonic() + 5
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"demo left processes behind: {left}"


def demo(tag: str, workdir: Path, *args: str, **kwargs: object) -> subprocess.Popen[str]:
    """``metaprotocol demo`` writing its configuration into ``workdir`` (a test's tmp_path,
    so no ``metaprotocol-demo-*`` folder is left in the system's temp directory)."""
    env = {**os.environ, "METAPROTOCOL_DEMO_TAG": tag}
    return subprocess.Popen(
        [sys.executable, "-m", "metaprotocol_sdk", "demo", "--workdir", str(workdir), *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,  # type: ignore[call-overload]
    )


def test_demo_duration_summary_matches_configured_split(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    proc = demo(tag, tmp_path, "--duration", "3", "--rate", "150", "--json")
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["errors"] == 0
    routes = {(r["protocol"], r["route"]): r for r in summary["routes"]}
    assert set(routes) == {
        (p, r) for p in ("thrift", "dubbo") for r in ("sayhello-to-v2", "split-20-80")
    }
    for key, route in routes.items():
        assert route["total"] >= 20, key
        # within_bound: 4.5 binomial standard deviations around the configured weight.
        assert route["within_bound"], route
    assert routes["thrift", "sayhello-to-v2"]["observed"]["v1"] == 0
    assert routes["dubbo", "sayhello-to-v2"]["observed"]["v1"] == 0
    assert "/stats" in summary["stats_url"]
    assert "summary after" not in err  # the table goes to stdout only without --json
    assert summary["config"] == str(tmp_path / "demo.yaml")
    # Not a terminal: short progress lines, one per protocol, after a legend.
    assert "progress: requests per route, as v1/v2" in err
    progress = [line for line in err.splitlines() if line.startswith("[")]
    assert progress and all(len(line) <= 80 for line in progress), progress
    assert_no_leftovers(tag)


def test_demo_ctrl_c_stops_everything(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    proc = demo(tag, tmp_path)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # not a TTY: periodic single progress lines
            if line.startswith("["):
                break
        else:
            pytest.fail(f"demo ended before showing progress: {proc.stderr.read()}")  # type: ignore[union-attr]
        assert tagged_processes(tag), "the demo's servers should be running"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "stopped (Ctrl-C)" in out
    assert "summary after" in out
    assert_no_leftovers(tag)


def test_demo_parent_killed_leaves_nothing(tmp_path: Path) -> None:
    """Even SIGKILL of the demo (no cleanup code runs) leaves no servers: children exit when
    their stdin pipe closes."""
    tag = uuid.uuid4().hex
    proc = demo(tag, tmp_path)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("["):
                break
        proc.kill()
        proc.wait(timeout=10)
    finally:
        proc.kill()
    assert_no_leftovers(tag)


def test_live_view_redraws_in_place_on_a_terminal() -> None:
    import io
    from collections import Counter

    from metaprotocol_sdk.demo.clients import Tally
    from metaprotocol_sdk.demo.display import LiveView

    out = io.StringIO()
    view = LiveView(out, tty=True)
    tally = Tally(Counter({("split-20-80", "v1"): 2, ("split-20-80", "v2"): 8}))
    view.update({"thrift": tally}, 0.25)
    first = out.getvalue()
    assert "\x1b[" not in first  # nothing to erase yet
    view.update({"thrift": tally}, 0.5)
    second = out.getvalue()[len(first) :]
    # The second frame moves up over exactly the lines of the first, clears, and redraws.
    assert second.startswith(f"\x1b[{first.count(chr(10))}F\x1b[J")
    assert second.count("\n") == first.count("\n")


def test_live_view_prints_short_lines_without_a_terminal() -> None:
    import io
    from collections import Counter

    from metaprotocol_sdk.demo.clients import Tally
    from metaprotocol_sdk.demo.display import LiveView

    out = io.StringIO()
    view = LiveView(out, tty=False, line_every=2.0)
    # Counts of a long run (17 minutes at 100 requests a second per protocol) still fit.
    routes = ("sayhello-to-v2", "split-20-80")
    busy = Counter({(r, v): 99_999 for r in routes for v in ("v1", "v2")})
    for tick in range(20):  # 5 seconds of updates, four a second
        view.update({"thrift": Tally(busy, errors=99), "dubbo": Tally()}, tick * 0.25)
    lines = out.getvalue().splitlines()
    assert len(lines) == 6  # at 0 s, 2 s and 4 s, one line per protocol
    assert all(line.startswith("[") and "\x1b" not in line for line in lines)
    assert max(len(line) for line in lines) <= 80, lines
    assert lines[0] == (
        "[  0.0s] thrift sayhello-to-v2 99999/99999  split-20-80 99999/99999  errors 99"
    )


class HoldingProvider(threading.Thread):
    """A Dubbo provider that answers no request until ``release`` is set, then all of them
    (and any later one at once): calls in flight at a moment the test chooses."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.received = 0
        self.first = threading.Event()
        self.release = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        self.listener.settimeout(10)
        conn, _ = self.listener.accept()
        conn.settimeout(0.01)
        codec, buffer, held = DubboCodec(), bytearray(), []
        with conn:
            while not self.done.is_set():
                try:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                except TimeoutError:
                    pass
                while isinstance(message := codec.decode(buffer), Metadata):
                    if message.message_type is MessageType.Heartbeat:
                        conn.sendall(codec.heartbeat_reply(message) or b"")
                        continue
                    self.received += 1
                    held.append(message.request_id)
                    self.first.set()
                if self.release.is_set():
                    for request_id in held:
                        conn.sendall(build_response("v1:mesh", request_id=request_id))
                    held.clear()


def test_dubbo_load_counts_calls_answered_after_stop() -> None:
    # The demo's summary sets what the consumer saw answered against the engine's /stats; a
    # consumer that exits on stop with calls in flight misses replies the engine counted
    # (a first run showed dubbo split-20-80 ANSWERED 781, PROXY /stats 782).
    provider = HoldingProvider()
    provider.start()
    load = DubboLoad(provider.port, rate=200)
    try:
        load.start()
        assert provider.first.wait(10), "the consumer sent no request"
        assert load.child is not None and load.child.proc.stdin is not None
        load.child.proc.stdin.close()  # what DubboLoad.stop does first
        provider.release.set()
        load.child.proc.wait(timeout=5)
        load.stop()
        tally = load.snapshot()
        assert tally.errors == 0, tally.last_error
        assert sum(tally.counts.values()) == provider.received > 0
    finally:
        load.stop()
        provider.done.set()
        provider.listener.close()
        provider.join(timeout=5)
