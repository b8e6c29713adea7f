"""The watchdog: a codec that holds the event loop is counted, named, and (with killTimeout)
ends its process.

The fault is injected by ``proxy_kit.StallingKVCodec``: a ``stall`` request makes its decode
busy-loop (or sleep) on the event loop for ``stall-ms``, as a pathological codec would. The
tests wait on conditions with bounded polling, never on a sleep of their own.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from proxy_kit import (
    WAIT,
    Client,
    Upstream,
    address,
    engine_for,
    http_get,
    mesh,
    refusing_port,
    run,
    until,
)

from metaprotocol_sdk.errors import ConfigError
from metaprotocol_sdk.proxy import loads_config
from metaprotocol_sdk.proxy.config.models import Watchdog
from metaprotocol_sdk.proxy.output import flush_before_exit
from metaprotocol_sdk.proxy.stats import Stats
from metaprotocol_sdk.proxy.watchdog import (
    KILL_STATUS,
    STACK_FRAMES,
    GuardDog,
    format_stack,
)

STALLING = {"protocol": "kvs", "codec": "proxy_kit:StallingKVCodec"}


def test_a_stall_counts_a_miss_and_a_megamiss_and_logs_the_stuck_stack_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    watchdog = "watchdog: {missTimeout: 100ms, megamissTimeout: 300ms}\n"

    async def main() -> None:
        up = await Upstream("up").start()
        text = mesh([(up.port, "v1")], proxy=watchdog, **STALLING)
        async with engine_for(text) as engine:
            client = await Client.connect(address(engine))
            reply = await client.call("stall", {"stall-ms": "1000"})  # busy on the loop
            assert reply.attributes.get("server") == "up"  # served once the loop runs again

            def over() -> bool:
                return any("ran again" in r.getMessage() for r in caplog.records)

            await until(over, "the watchdog to see the loop run again")
            assert (await client.call("get")).attributes.get("server") == "up"
            stats = engine.stats_snapshot()
            stuck = [r.getMessage() for r in caplog.records if "stuck for" in r.getMessage()]
            assert stats["metaprotocol_watchdog_miss_total"] >= 1
            assert stats["metaprotocol_watchdog_megamiss_total"] == len(stuck) >= 1
            named = [m for m in stuck if "stall_the_loop" in m]
            assert len(named) == 1, stuck  # once per stall, naming the codec's function
            assert "in decode" in named[0] and "proxy_kit.py" in named[0], named[0]
            assert len(named[0].splitlines()) <= 2 * STACK_FRAMES + 2
            assert not any(r.levelno >= logging.ERROR for r in caplog.records)
            status, text = await http_get(engine.admin_address or ("", 0), "/stats/prometheus")
            assert status == 200
            assert "# HELP metaprotocol_watchdog_megamiss_total Event loop stalls" in text
            assert "# TYPE metaprotocol_watchdog_miss_total counter" in text
            status, body = await http_get(engine.admin_address or ("", 0), "/config_dump")
            assert json.loads(body)["settings"]["watchdog"] == {
                "miss_timeout": 0.1,
                "megamiss_timeout": 0.3,
                "kill_timeout": None,
            }
            client.close()
        await up.close()

    with caplog.at_level(logging.WARNING, logger="metaprotocol.proxy.watchdog"):
        run(main())


def test_the_logged_stack_is_capped_to_its_innermost_frames() -> None:
    def ping(n: int) -> list[str]:
        return pong(n - 1) if n else format_stack(sys._getframe())

    def pong(n: int) -> list[str]:
        return ping(n - 1)

    lines = ping(200)
    assert lines[0].startswith("... ") and lines[0].endswith(" outer frames left out"), lines
    assert len(lines) == 1 + 2 * STACK_FRAMES
    assert "in ping" in lines[-2] and "format_stack(sys._getframe())" in lines[-1]


def test_kill_timeout_ends_the_stuck_process_with_its_exit_status(tmp_path: Path) -> None:
    watchdog = "watchdog: {missTimeout: 50ms, megamissTimeout: 200ms, killTimeout: 500ms}\n"
    config = tmp_path / "mesh.yaml"
    config.write_text(mesh([(refusing_port(), "v1")], proxy=watchdog, **STALLING))
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-m", "metaprotocol_sdk", "proxy", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
    )

    async def main() -> None:
        assert proc.stdout is not None
        listening = proc.stdout.readline().split()
        assert listening[:2] == ["listening", "svc.test:9000"], listening
        host, port = listening[-1].rsplit(":", 1)
        client = await Client.connect((host, int(port)))
        stalled = client.start("stall", {"stall-ms": "30000", "how": "sleep"})
        await until(lambda: proc.poll() is not None, "the watchdog to end the process")
        await asyncio.wait_for(client.closed, 5)
        with pytest.raises(ConnectionResetError):
            stalled.result()

    try:
        run(main())
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == KILL_STATUS, (proc.returncode, err)
    assert "watchdog.megamissTimeout" in err and "watchdog.killTimeout 0.5 s" in err, err
    assert f"exit status {KILL_STATUS}" in err and "stall_the_loop" in err, err


def _error(watchdog: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        loads_config(mesh([(1, "v1")], proxy=f"watchdog: {watchdog}\n"), "test.yaml")
    return caught.value


@pytest.mark.parametrize(
    ("watchdog", "field", "words"),
    [
        ("{missTimeout: fast}", "missTimeout", "invalid duration 'fast'"),
        ("{missTimeout: 0s}", "missTimeout", "duration must be positive"),
        ("{missTimeout: 5ms}", "missTimeout", "must be at least 10ms"),
        ("{missTimeout: 500ms, megamissTimeout: 200ms}", "megamissTimeout", "at least missTimeout"),
        ("{killTimeout: 500ms}", "killTimeout", "at least megamissTimeout (1s), or 0s for never"),
        ("{killTimeout: -1s}", "killTimeout", "invalid duration '-1s'"),
        ("{killTimeout: true}", "killTimeout", "invalid duration True"),
        ("{multikillTimeout: 2s}", "multikillTimeout", "killTimeout is its only kill"),
        ("{missTimout: 1s}", "missTimout", "unknown field; expected one of killTimeout, "),
        ("1s", "", "must be a mapping"),
    ],
)
def test_bad_watchdog_settings_are_refused_naming_the_field(
    watchdog: str, field: str, words: str
) -> None:
    error = _error(watchdog)
    assert error.field == "spec.watchdog" + (f".{field}" if field else ""), error
    assert words in error.reason, error.reason
    assert "ProxyConfig/engine" in (error.source or "")


def test_watchdog_defaults_are_envoys_and_0s_means_never_kill() -> None:
    config = loads_config(mesh([(1, "v1")]), "test.yaml")
    assert vars(config.proxy.watchdog) == {
        "miss_timeout": 0.2,
        "megamiss_timeout": 1.0,
        "kill_timeout": None,
    }
    for off in ("0s", 0, "0ms"):
        text = mesh([(1, "v1")], proxy=f"watchdog: {{killTimeout: {off!r}}}\n")
        assert loads_config(text, "test.yaml").proxy.watchdog.kill_timeout is None
    text = mesh([(1, "v1")], proxy="watchdog: {missTimeout: 2s, killTimeout: 1m}\n")
    assert vars(loads_config(text, "test.yaml").proxy.watchdog) == {
        "miss_timeout": 2.0,
        "megamiss_timeout": 2.0,  # at least missTimeout when not set
        "kill_timeout": 60.0,
    }


class _Checks(threading.Event):
    """The watchdog's stop event, noting when each of its checks (a wait's end) ran."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float | None] = []
        self.at: list[float] = []
        self.changed = threading.Condition()

    def wait(self, timeout: float | None = None) -> bool:
        self.timeouts.append(timeout)
        stopped = super().wait(timeout)
        with self.changed:
            self.at.append(time.monotonic())
            self.changed.notify_all()
        return stopped


def test_a_loop_that_is_not_running_is_not_stuck_and_a_closed_one_ends_the_watch() -> None:
    # A program that runs its loop in steps (run_until_complete) or whose loop ended without
    # engine.stop(): no heartbeat, but nothing is stuck. Counted and killed, it was.
    settings = Watchdog(miss_timeout=0.01, megamiss_timeout=0.02, kill_timeout=0.04)
    stats = Stats()
    kills: list[int] = []
    checks = _Checks()

    def exit(status: int) -> None:
        with checks.changed:
            kills.append(status)
            checks.changed.notify_all()

    guard = GuardDog(settings, stats, exit=exit)
    guard._stopping = checks
    loop = asyncio.new_event_loop()

    async def start() -> None:
        guard.start()

    loop.run_until_complete(start())  # the loop stops running; the heartbeat with it
    thread = guard._thread
    assert thread is not None
    past_kill = time.monotonic() + 2 * settings.megamiss_timeout + 2 * (settings.kill_timeout or 0)
    with checks.changed:
        assert checks.changed.wait_for(lambda: kills or checks.at[-1:] > [past_kill], WAIT)
    assert kills == []
    snapshot = stats.snapshot()
    assert snapshot["metaprotocol_watchdog_miss_total"] == 0
    assert snapshot["metaprotocol_watchdog_megamiss_total"] == 0
    loop.close()  # without guard.stop(): the watch ends by itself
    thread.join(WAIT)
    assert not thread.is_alive() and kills == []


def test_a_miss_timeout_of_years_does_not_end_the_watch_with_an_overflow() -> None:
    settings = Watchdog(miss_timeout=4e10, megamiss_timeout=4e10)  # threading.TIMEOUT_MAX: 9e9
    guard = GuardDog(settings, Stats(), exit=lambda status: None)
    checks = _Checks()
    checks.set()  # the first check returns at once
    guard._stopping = checks
    guard._loop = asyncio.new_event_loop()
    try:
        guard._watch()
    finally:
        guard._loop.close()
    # Capped: an Event.wait beyond TIMEOUT_MAX raises OverflowError, which ended the thread.
    assert checks.timeouts == [threading.TIMEOUT_MAX]


class _BlockedStream(io.StringIO):
    """A standard stream that is not the engine's: its flush blocks (a pipe nobody reads, or
    its lock held by the stuck loop thread, blocked writing to it)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def flush(self) -> None:
        self.release.wait()


def test_the_kill_waits_a_bounded_time_for_a_stream_whose_flush_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stdout = _BlockedStream()
    monkeypatch.setattr(sys, "stdout", stdout)
    flushing = threading.Thread(target=flush_before_exit, args=(0.05,), daemon=True)
    try:
        flushing.start()
        flushing.join(WAIT)
        assert not flushing.is_alive(), "flush_before_exit blocked: the kill would never come"
    finally:
        stdout.release.set()
