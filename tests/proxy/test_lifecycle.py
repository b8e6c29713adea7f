"""Startup, graceful shutdown, connection limits, the CLI, and no leaks."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from proxy_kit import (
    WAIT,
    Client,
    Upstream,
    address,
    engine_for,
    error_type,
    http_get,
    mesh,
    run,
    until,
)

from metaprotocol_sdk import ConfigError
from metaprotocol_sdk.proxy import Engine, loads_config


def test_drain_finishes_in_flight_then_closes() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        engine = Engine(loads_config(mesh([(up.port, "v1")]), "t.yaml"))
        await engine.start()
        c = await Client.connect(address(engine))
        slow = c.start("slow", rid=1)
        await up.wait_received(1)
        stopping = asyncio.ensure_future(engine.stop(drain=5.0))
        await asyncio.sleep(0)  # let stop() start: it only yields to the loop, no timing
        assert engine.draining and not engine.ready
        assert engine.admin_address is not None
        assert await http_get(engine.admin_address, "/ready") == (503, "DRAINING\n")
        late = await c.call(rid=2)  # open connection, new request: refused politely
        assert (late.request_id, error_type(late)) == (2, "ShuttingDown")
        with pytest.raises(OSError):  # no longer accepting
            await Client.connect(address(engine))
        assert not stopping.done()
        up.release.set()
        reply = await asyncio.wait_for(slow, 5)
        assert reply.request_id == 1 and error_type(reply) is None
        await asyncio.wait_for(stopping, 5)
        await asyncio.wait_for(c.closed, 5)
        assert not engine.downstreams and not engine.upstreams
        await up.close()

    run(main())


def test_drain_deadline_closes_stuck_connections() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        engine = Engine(loads_config(mesh([(up.port, "v1")]), "t.yaml"))
        await engine.start()
        c = await Client.connect(address(engine))
        hung = c.start("hang", rid=1)
        await up.wait_received(1)
        await asyncio.wait_for(engine.stop(drain=0.2), 5)
        await asyncio.wait_for(c.closed, 5)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(hung, 5)
        assert not engine.downstreams and not engine.upstreams and engine.pending == 0
        await up.close()

    run(main())


def test_idle_connections_close_at_once_on_stop() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        engine = Engine(loads_config(mesh([(up.port, "v1")]), "t.yaml"))
        await engine.start()
        clients = [await Client.connect(address(engine)) for _ in range(3)]
        await clients[0].call()
        await asyncio.wait_for(engine.stop(drain=30.0), 5)  # nothing in flight: no waiting
        for c in clients:
            await asyncio.wait_for(c.closed, 5)
        await up.close()

    run(main())


def test_max_connections() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh([(up.port, "v1")], proxy="limits: {maxConnections: 1}\n")
        async with engine_for(text) as engine:
            first = await Client.connect(address(engine))
            await first.call()
            second = await Client.connect(address(engine))
            await asyncio.wait_for(second.closed, 5)
            assert (await first.call()).attributes["server"] == "a"
            assert engine.stats.total("metaprotocol_downstream_connections_rejected_total") == 1
            first.close()
        await up.close()

    run(main())


def test_bind_failure_leaves_nothing_open() -> None:
    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            text = mesh([(1, "v1")]).replace(
                "bind: '127.0.0.1:0'}]", f"bind: '127.0.0.1:{port}'}}]"
            )
            engine = Engine(loads_config(text, "t.yaml"))
            with pytest.raises(OSError):
                await engine.start()
            assert not engine.ready
            assert engine.admin_address is None

    run(main())


def test_upstream_connections_closed_with_downstream_in_dedicated_mode() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh([(up.port, "v1")], protocol="kvnr", codec="proxy_test_codecs:NoRewriteKVCodec")
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            await c.call()
            assert len(engine.upstreams) == 1
            c.close()
            await asyncio.wait_for(c.closed, 5)
            # The engine learns of the close on a later loop turn.
            await until(lambda: not engine.upstreams, "the upstream connection to close")
        await up.close()

    run(main())


def test_cli_prints_addresses_and_drains_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "mesh.yaml"
    config.write_text(mesh([(1, "v1")]))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    with subprocess.Popen(
        [sys.executable, "-m", "metaprotocol_sdk", "proxy", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    ) as proc:
        try:
            assert proc.stdout is not None
            listening = proc.stdout.readline()
            admin = proc.stdout.readline()
            assert listening.startswith("listening svc.test:9000 on 127.0.0.1:")
            assert admin.startswith("admin on 127.0.0.1:")
            host, port = admin.split()[-1].rsplit(":", 1)
            status, body = asyncio.run(http_get((host, int(port)), "/config_dump"))
            assert status == 200 and json.loads(body)["listeners"][0]["name"] == "svc.test:9000"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)


@pytest.mark.parametrize("codec", ["PrintingKVCodec", "StderrPrintingKVCodec"])
def test_output_nobody_reads_costs_output_not_requests(tmp_path: Path, codec: str) -> None:
    """A codec prints 1 KiB per request and nobody reads the proxy's standard output or error
    (this test reads only the first lines): every request is still answered, and the output
    beyond the writer's backlog is dropped and counted. (A print used to block the event loop
    once the pipe was full: no request was answered again.)"""
    config = tmp_path / "mesh.yaml"

    async def main() -> None:
        up = await Upstream("up").start()
        config.write_text(mesh([(up.port, "v1")], protocol="kvp", codec=f"proxy_kit:{codec}"))
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "metaprotocol_sdk", "proxy", "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            assert proc.stdout is not None
            host, port = proc.stdout.readline().split()[-1].decode().rsplit(":", 1)
            admin = proc.stdout.readline().split()[-1].decode().rsplit(":", 1)
            client = await Client.connect((host, int(port)))
            for _ in range(3000):  # 3 MB printed: the pipe and the 1 MiB backlog fill
                reply = await asyncio.wait_for(client.call(), WAIT)
                assert reply.attributes.get("server") == "up"
            client.close()

            async def dropped() -> bool:
                status, body = await http_get((admin[0], int(admin[1])), "/stats?format=json")
                assert status == 200, body
                stats = json.loads(body)
                return bool(stats.get("metaprotocol_output_dropped_bytes_total", 0) >= 1 << 20)

            await until(dropped, "1 MiB of output counted as dropped")
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            await up.close()
        assert proc.returncode == 0 and b"Traceback" not in err

    run(main(), timeout=120)


def test_cli_bad_config_is_one_line_and_nonzero(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(mesh([(1, "v1")]).replace("kind: DestinationRule", "kind: DestRule"))
    proc = subprocess.run(
        [sys.executable, "-m", "metaprotocol_sdk", "proxy", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "DestRule" in lines[0] and "bad.yaml" in lines[0]


def test_cli_port_in_use_says_what_to_do(tmp_path: Path) -> None:
    # The tutorial's ports (9000, 9100, 9901) are often taken on a developer's machine.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "mesh.yaml"
        config.write_text(
            mesh([(1, "v1")]).replace("bind: '127.0.0.1:0'}]", f"bind: '127.0.0.1:{port}'}}]")
        )
        proc = subprocess.run(
            [sys.executable, "-m", "metaprotocol_sdk", "proxy", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: cannot bind:") and str(port) in line, line
    assert "another process listens there" in line and "'127.0.0.1:0'" in line, line


def test_cli_check(tmp_path: Path) -> None:
    config = tmp_path / "mesh.yaml"
    config.write_text(mesh([(1, "v1")], router="- route: [{destination: {host: svc.test}}]\n"))
    proc = subprocess.run(
        [sys.executable, "-m", "metaprotocol_sdk", "proxy", "--check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("configuration OK: 1 listener(s), 1 service(s), 1 route(s)")


def test_cli_sets_the_collector_up_for_serving() -> None:
    # Run in a child: the tuning is process-wide, as it is for `metaprotocol proxy`.
    code = (
        "import gc; from metaprotocol_sdk.cli.proxy import GC_YOUNG_THRESHOLD, _tune_gc; "
        "default = gc.get_threshold(); _tune_gc(); "
        "print(gc.get_threshold()[0] == GC_YOUNG_THRESHOLD, gc.get_threshold()[1:] == default[1:], "
        "gc.get_freeze_count() > 1000)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["True", "True", "True"], done.stderr


def test_an_endpoint_that_is_the_engine_itself_is_refused() -> None:
    """Routing to the engine's own listener would loop: start refuses it, nothing stays open."""
    # Held (not listening, SO_REUSEADDR) so the engine can bind it and nothing else takes it.
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    text = mesh([(port, "v1")]).replace("bind: '127.0.0.1:0'}]", f"bind: '127.0.0.1:{port}'}}]")

    async def main() -> None:
        engine = Engine(loads_config(text, "test.yaml"))
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port} is this engine's own listener"):
            await engine.start()
        assert not engine.ready and engine.admin_address is None
        with socket.create_server(("127.0.0.1", port)) as again:
            assert again.getsockname()[1] == port  # the listener was closed again

    try:
        run(main())
    finally:
        holder.close()


def test_cli_keeps_large_frames_on_the_heap() -> None:
    # glibc maps each large allocation on its own (page faults, then unmapped on free); the
    # CLI raises that threshold. Seen through mallinfo2's count of mapped chunks in use.
    code = """
import ctypes
from metaprotocol_sdk.cli.proxy import _tune_malloc
names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
def mapped(size):
    before = libc.mallinfo2().hblks
    block = bytearray(size)
    return libc.mallinfo2().hblks - before
print(mapped(4 << 20), _tune_malloc(), mapped(8 << 20))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["1", "True", "0"], done.stdout + done.stderr


def test_a_sweep_that_raises_is_logged_and_the_next_one_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The sweep rescheduled itself last: one error in it (two such were found, asyncio's
    TLS transport closed twice) ended it for good, and with it every timeout, the buffer
    recount and the identity's rotation. The next sweep runs all the same; the error is
    logged with its traceback once a minute at most."""

    async def main() -> None:
        up = await Upstream("v1").start()
        text = mesh([(up.port, "v1")], proxy="timeouts: {write: 200ms}\n")
        async with engine_for(text) as engine:
            calls = 0

            def failing() -> None:
                nonlocal calls
                calls += 1
                if calls <= 2:
                    raise RuntimeError("a bug")

            engine._flush_access_log = failing  # type: ignore[method-assign]
            await until(lambda: calls >= 4, "four sweeps")
        await up.close()

    with caplog.at_level(logging.ERROR, logger="metaprotocol.proxy"):
        run(main())
    failed = [r for r in caplog.records if "sweep failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None
