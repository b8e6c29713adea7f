"""Admin endpoint and access log: readiness, config dump, Prometheus stats, JSON lines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import threading
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from proxy_kit import (
    WAIT,
    Client,
    Upstream,
    address,
    engine_for,
    http_get,
    mesh,
    run,
    stall_the_loop,
    until,
)

from metaprotocol_sdk import Attributes, ConfigError, compiled
from metaprotocol_sdk.examples.kv import REQUEST, build_frame
from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.accesslog import AccessLog, ClientFacts, client_facts
from metaprotocol_sdk.proxy.stats import GAUGES, HELP, Stats
from metaprotocol_sdk.proxy.telemetry import IstioTelemetry, workload_from_environment


def test_admin_ready_config_dump_and_stats() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        router = """\
        - name: main
          match: {attributes: {method: {exact: get}}}
          route: [{destination: {host: svc.test, subset: v1}}]
        """
        async with engine_for(mesh([(up.port, "v1")], router=router)) as engine:
            admin = engine.admin_address
            assert admin is not None
            assert await http_get(admin, "/ready") == (200, "LIVE\n")
            status, body = await http_get(admin, "/config_dump")
            dump = json.loads(body)
            assert status == 200
            assert dump["listeners"][0]["routes"][0]["name"] == "main"
            assert dump["clusters"][0]["name"] == "outbound|9000|v1|svc.test"
            assert dump["clusters"][0]["pooling"] == "shared"
            # Which modules run compiled (mypyc): none in a pure install.
            assert dump["compiled"]["metaprotocol_sdk"] == list(compiled())

            c = await Client.connect(address(engine))
            for _ in range(3):
                await c.call("get")
            await c.call("nothing")
            _, text = await http_get(admin, "/stats")
            ok = (
                'metaprotocol_requests_total{listener="svc.test:9000",route="main",'
                'destination="outbound|9000|v1|svc.test",status="Ok"} 3'
            )
            assert ok in text
            assert (
                'metaprotocol_local_replies_total{listener="svc.test:9000",type="RouteNotFound"} 1'
                in text
            )
            assert 'metaprotocol_downstream_connections_active{listener="svc.test:9000"} 1' in text
            assert (
                'metaprotocol_upstream_connections_active{cluster="outbound|9000|v1|svc.test"} 1'
                in text
            )
            assert "# TYPE metaprotocol_requests_total counter" in text
            assert "# TYPE metaprotocol_downstream_connections_active gauge" in text
            _, js = await http_get(admin, "/stats?format=json")
            assert json.loads(js)["metaprotocol_requests_pending"] == 0
            status, text = await http_get(admin, "/nope")
            assert status == 404 and "/paths lists the paths" in text, text
            c.close()
            await c.closed
        await up.close()

    run(main())


def _scrape(admin: tuple[str, int], path: str) -> tuple[int, bytes]:
    host, port = admin
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=30) as reply:
        return reply.status, reply.read()


@pytest.mark.alone  # ci20, beside another process: one request waited 0.35 s of 1.08 s
@pytest.mark.parametrize("path", ["/stats", "/stats?format=json"])
def test_a_scrape_of_many_series_lets_requests_through(path: str) -> None:
    """The stats of many series are made and sent in pieces, the event loop serving requests
    between them. (They were made in one go: at the default ``maxStatsSeries``, 50 000
    series of Istio's labels, that held every request for 11.7 s per scrape, a 463 MiB
    text; 9.2 s for the JSON, 497 MiB.)"""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        up = await Upstream("a").start()
        router = "- name: main\n  route: [{destination: {host: svc.test, subset: v1}}]\n"
        async with engine_for(mesh([(up.port, "v1")], router=router)) as engine:
            admin = engine.admin_address
            assert admin is not None
            istio = IstioTelemetry(engine.stats, workload_from_environment({}), "source")
            for i in range(2000):  # 8 000 series, each a line per bucket: 74 MB of text
                labels = {"app": f"app{i}", "version": "v1"}
                istio.series("kv", f"svc{i}.test", "default", labels, "Ok").record(1, 10, 10)
            c = await Client.connect(address(engine))
            await c.call("get")
            start = loop.time()
            # Read in a thread, as a Prometheus server does in a process of its own.
            scrape = asyncio.ensure_future(asyncio.to_thread(_scrape, admin, path))
            waits = []
            while not scrape.done():
                sent = loop.time()
                await c.call("get")
                waits.append(loop.time() - sent)
            took = loop.time() - start
            status, text = await scrape
            c.close()
            assert status == 200
            if path == "/stats":
                assert text.count(b"\nistio_requests_total{") == 2000
            else:
                stats = json.loads(text)
                assert sum(k.startswith("istio_requests_total{") for k in stats) == 2000
            # Made in one go, a request waited for the whole scrape (seconds: it then takes 9
            # to 12 s); in pieces, for a few. Half the scrape, or 0.5 s when the whole is fast
            # (the compiled engine's took 0.52 s, and one wait of 0.14 s, a collector's pause,
            # failed a quarter alone: ci62; on a machine shared with other test runs a wait of
            # 0.27 s of 0.55 s failed 0.25 s: ci66). A scrape made in one go still fails it.
            bound = max(took / 2, 0.5)
            assert max(waits) < bound, f"a request waited {max(waits):.2f} s of {took:.2f} s"
        await up.close()

    run(main(), timeout=60)


def logged(
    tmp_path: Path, calls: Callable[[Client], Awaitable[object]], log: str = ""
) -> list[dict[str, Any]]:
    """The access log's records of the requests ``calls`` makes through an engine whose
    ``spec.accessLog`` is ``{path: ..., <log>}`` (one service, one upstream)."""
    path = tmp_path / "access.log"

    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh([(up.port, "v1")], proxy=f"accessLog: {{path: '{path}'{log}}}\n")
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            await calls(c)
            c.close()
        await up.close()

    run(main())
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_access_log_one_json_line_per_request(tmp_path: Path) -> None:
    async def calls(c: Client) -> None:
        await c.call(rid=5)
        await c.call("fail", rid=6)

    records = logged(tmp_path, calls)
    assert [(r["request_id"], r["status"]) for r in records] == [(5, "Ok"), (6, "Error")]
    first = records[0]
    assert first["route"] == "default" and first["destination"] == "outbound|9000||svc.test"
    assert first["listener"] == "svc.test:9000" and first["duration_ms"] >= 0


def test_access_log_says_who_asked_what_and_how_much(tmp_path: Path) -> None:
    """Each line names the client's address, the bytes each way and the request attributes
    configured (matched ignoring case, written as configured, long values cut); a local
    reply's line too."""
    log = tmp_path / "access.log"
    proxy = (
        f"accessLog: {{path: '{log}', attributes: [Method, x-user, x-absent], maxValueLength: 8}}\n"
    )
    router = """\
    - name: main
      match: {attributes: {method: {exact: get}}}
      route: [{destination: {host: svc.test, subset: v1}}]
    """
    sent: dict[int, int] = {}
    got: dict[int, int] = {}

    async def main() -> tuple[str, int]:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")], router=router, proxy=proxy)) as engine:
            c = await Client.connect(address(engine))
            assert c.transport is not None
            host, port = c.transport.get_extra_info("sockname")[:2]
            for rid, method, headers, body in [
                (1, "get", {"x-user": "alice"}, b"x" * 100),
                (2, "nothing", {"X-USER": "bob-the-builder"}, b""),
            ]:
                sent[rid] = len(build_frame(REQUEST, rid, {"method": method, **headers}, body))
                reply = await c.call(method, headers, body, rid=rid)
                got[rid] = len(reply.frame)
            c.close()
        await up.close()
        return host, port

    host, port = run(main())
    records = {r["request_id"]: r for r in map(json.loads, log.read_text().splitlines())}
    ok, local = records[1], records[2]
    assert (ok["status"], local["status"]) == ("Ok", "RouteNotFound")
    for rid, record in records.items():
        assert record["downstream"] == f"{host}:{port}"
        assert (record["bytes_received"], record["bytes_sent"]) == (sent[rid], got[rid])
        assert "source_principal" not in record  # plain text
    assert ok["attributes"] == {"Method": "get", "x-user": "alice"}
    assert local["attributes"] == {"Method": "nothing", "x-user": "bob-the-..."}


@pytest.mark.parametrize("slow", [False, True])
def test_an_access_log_filter_writes_failures_or_slow_requests_only(
    tmp_path: Path, slow: bool
) -> None:
    """``filter: {failures: true}`` writes the requests that failed (an upstream's error
    reply, a local reply), not those answered Ok; with ``slowerThan`` too, a slow Ok one."""
    log = tmp_path / "access.log"
    rule = "{failures: true, slowerThan: 500ms}" if slow else "{failures: true}"
    router = """\
    - name: main
      match: {attributes: {method: {regex: "get|fail|slow"}}}
      route: [{destination: {host: svc.test, subset: v1}}]
    """

    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh(
            [(up.port, "v1")],
            router=router,
            proxy=f"accessLog: {{path: '{log}', filter: {rule}}}\n",
        )
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            await c.call("get", rid=1)
            await c.call("fail", rid=2)
            await c.call("nothing", rid=3)
            asyncio.get_running_loop().call_later(0.6, up.release.set)  # a slow answer
            await c.call("slow", rid=4)
            await c.call("get", rid=5)
            dump = engine.config_dump()["settings"]["accessLog"]
            assert dump["filter"] == {"failures": True, "slowerThan": 0.5 if slow else None}
            c.close()
        await up.close()

    run(main())
    records = [json.loads(line) for line in log.read_text().splitlines()]
    expected = [(2, "Error"), (3, "RouteNotFound")] + ([(4, "Ok")] if slow else [])
    assert [(r["request_id"], r["status"]) for r in records] == expected


def test_access_log_client_addresses_as_envoy_writes_them() -> None:
    """IPv6 addresses in brackets; only SPIFFE URI SANs are principals."""

    class Transport:
        def __init__(self, extra: dict[str, object]) -> None:
            self.extra = extra

        def get_extra_info(self, name: str) -> object:
            return self.extra.get(name)

    cert = {"subjectAltName": (("URI", "spiffe://td/ns/a/sa/b"), ("URI", "https://x"))}
    v6 = client_facts(Transport({"peername": ("::1", 5, 0, 0), "peercert": cert}))
    assert (v6.address, v6.principal) == ("[::1]:5", "spiffe://td/ns/a/sa/b")
    unix = client_facts(Transport({"peername": "", "peercert": {"subjectAltName": ()}}))
    assert (unix.address, unix.principal) == ("", None)


def test_access_log_lines_are_json_whatever_the_values(tmp_path: Path) -> None:
    """A line is one JSON object on one line for any value a client or a config can put in
    it: quotes, backslashes, newlines, control characters, non-ASCII, a lone surrogate."""
    path = tmp_path / "access.log"
    hostile = 'a"b\\c\nd\re\x00f\x1f\u2028g\u00e9\U0001f600\ud800'
    log = AccessLog(str(path), ("v", "w"), 4096)
    attributes = Attributes({"v": hostile, "W": "plain"})
    outcome = {"deny": {"result": "denied", "policy": hostile}}
    client = ClientFacts("[::1]:5", hostile)
    log.log(
        hostile,
        hostile,
        "d",
        "Ok",
        0.25,
        2**63,
        hostile,
        hostile,
        "-",
        hostile,
        client,
        1,
        2,
        attributes,
        outcome,
    )
    log.close()
    text = path.read_text(encoding="utf-8")
    assert text.count("\n") == 1 and text.isascii()
    record = json.loads(text)
    assert record["listener"] == record["route"] == record["message_type"] == hostile
    assert record["upstream"] == record["response_code_details"] == hostile
    assert record["source_principal"] == hostile and record["downstream"] == "[::1]:5"
    assert record["attributes"] == {"v": hostile, "w": "plain"}
    assert record["dry_run"] == outcome
    assert (record["request_id"], record["duration_ms"]) == (2**63, 250.0)
    assert (record["bytes_received"], record["bytes_sent"]) == (1, 2)


def test_access_log_without_attributes_configured_writes_none(tmp_path: Path) -> None:
    (record,) = logged(tmp_path, lambda c: c.call(headers={"x-user": "alice"}))
    assert "attributes" not in record and record["bytes_received"] > 0


def test_durations_are_measured_finer_than_the_loops_millisecond_clock(tmp_path: Path) -> None:
    """uvloop's clock counts whole milliseconds: durations read from it were whole numbers
    of milliseconds (a 0.3 ms exchange was 0 or 1), which made the latency histogram's
    first buckets and the access log's duration_ms meaningless for fast requests."""

    async def calls(c: Client) -> None:
        for _ in range(20):
            await c.call()

    durations = [record["duration_ms"] for record in logged(tmp_path, calls)]
    assert len(durations) == 20 and all(d > 0 for d in durations)
    assert sum(d != int(d) for d in durations) >= 10, durations


def test_access_log_lines_reach_the_file_within_a_sweep(tmp_path: Path) -> None:
    """Lines are gathered, but a reader tailing the file sees each one within a second."""
    log = tmp_path / "access.log"

    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh([(up.port, "v1")], proxy=f"accessLog: {{path: '{log}'}}\n")
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            await c.call(rid=7)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while not log.read_text():  # the engine still serves: the sweep wrote it
                assert loop.time() < deadline, "the line stayed in memory"
                await asyncio.sleep(0.05)
            assert json.loads(log.read_text())["request_id"] == 7
            c.close()
        await up.close()

    run(main())


def _try_open(path: str) -> object:
    try:
        return AccessLog(path)
    except ConfigError as exc:
        return exc


def test_an_access_log_fifo_without_a_reader_is_an_error_not_a_hang(tmp_path: Path) -> None:
    """A FIFO (a log shipper's named pipe) whose reader is not running: the engine says so at
    start instead of waiting in open() for good; with its reader, lines go through it."""
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    opened: list[object] = []  # in a thread: a regression would block in open() for good
    worker = threading.Thread(target=lambda: opened.append(_try_open(str(fifo))), daemon=True)
    worker.start()
    worker.join(WAIT)
    assert opened, "opening the access log waits for a reader"
    assert isinstance(opened[0], ConfigError), opened

    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh([(up.port, "v1")], proxy=f"accessLog: {{path: '{fifo}'}}\n")
        engine = Engine(loads_config(text, "test.yaml"))
        with pytest.raises(ConfigError, match="a FIFO that nobody reads") as refused:
            await asyncio.wait_for(engine.start(), WAIT)
        assert refused.value.field == "spec.accessLog.path"
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the shipper starts
        try:
            async with engine_for(text) as served:
                c = await Client.connect(address(served))
                await c.call(rid=9)
                c.close()
            got = b""
            async with asyncio.timeout(WAIT):
                while b"\n" not in got:
                    await asyncio.sleep(0.02)  # polling the pipe, bounded by the timeout
                    with contextlib.suppress(BlockingIOError):
                        got += os.read(reader, 65536)
            assert json.loads(got.splitlines()[0])["request_id"] == 9
        finally:
            os.close(reader)
        await up.close()

    run(main())


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_under_the_access_log_costs_lines_not_requests() -> None:
    """Writes to ``/dev/full`` fail with ENOSPC: every request is still answered, and the lost
    lines are counted (the engine stopped answering after the first failed write)."""

    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh([(up.port, "v1")], proxy="accessLog: {path: /dev/full}\n")
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            for i in range(1, 601):  # more than FLUSH_BYTES of lines: writes in the data path
                reply = await asyncio.wait_for(c.call(rid=i), WAIT)
                assert reply.request_id == i
            c.close()
            lost = "metaprotocol_access_log_dropped_lines_total"
            # The last lines go at the next sweep.
            await until(lambda: engine.stats.get(lost) == 600, "600 lines counted as lost")
            assert engine.stats.get("metaprotocol_access_log_write_failures_total") >= 2
        await up.close()

    run(main())


def test_a_log_nobody_reads_costs_lines_not_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FIFO whose reader never reads: the log's writes block, and the engine keeps answering;
    lines beyond the writer's backlog limit are dropped and counted. (The engine used to write
    on its event loop: once the pipe was full, no request was answered again.)"""
    import os
    import threading

    from metaprotocol_sdk.proxy import accesslog

    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # open, so the engine's open returns
    monkeypatch.setattr(accesslog, "MAX_PENDING_BYTES", 64 * 1024)
    monkeypatch.setattr(accesslog, "CLOSE_WAIT", 0.1)
    answered = threading.Event()
    rescued: list[bool] = []

    def rescue() -> None:
        """Without the writer thread the loop is stuck in a write: read the pipe after a while,
        so that the test fails instead of hanging."""
        if answered.wait(20):
            return
        rescued.append(True)
        while not answered.is_set():
            try:
                os.read(reader, 1 << 16)
            except BlockingIOError:
                answered.wait(0.01)

    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh([(up.port, "v1")], proxy=f"accessLog: {{path: '{fifo}'}}\n")
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            for i in range(1, 2001):  # ~500 KB of lines: the pipe and the backlog both fill
                reply = await asyncio.wait_for(c.call(rid=i), WAIT)
                assert reply.request_id == i
            answered.set()
            lost = "metaprotocol_access_log_dropped_lines_total"
            await until(lambda: engine.stats.get(lost), "lines counted as dropped (next sweep)")
            assert engine.stats.get("metaprotocol_access_log_write_failures_total") == 0
            c.close()
        await up.close()

    guard = threading.Thread(target=rescue, daemon=True)
    guard.start()
    try:
        run(main(), timeout=60)
    finally:
        answered.set()
        guard.join()
        os.close(reader)  # the stuck writer gets EPIPE and ends
    assert not rescued, "requests were answered only once the log was read"


def test_access_log_on_stderr_writes_whole_lines_a_pipe_keeps_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Workers share stderr: each write holds whole lines and at most PIPE_BUF bytes, so lines
    of two workers never interleave mid-line in a pipe."""
    import os
    import select

    from metaprotocol_sdk.proxy.accesslog import AccessLog

    writes: list[bytes] = []

    def write(fd: int, data: bytes | memoryview) -> int:
        writes.append(bytes(data))
        return len(data)

    log = AccessLog("-")
    monkeypatch.setattr(os, "write", write)
    for i in range(500):
        log.log("listener", "route", "dest", "Ok", 0.001, i, "Request", "127.0.0.1:1")
    log.close()  # hands the lines over and waits for the writer thread
    assert len(writes) > 1
    assert all(len(w) <= select.PIPE_BUF and w.endswith(b"\n") for w in writes)
    ids = [json.loads(line)["request_id"] for w in writes for line in w.splitlines()]
    assert ids == list(range(500))


def test_access_log_on_a_non_blocking_stderr_waits_for_the_reader(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stderr pipe left non-blocking by whoever shares it (``O_NONBLOCK`` belongs to the open
    pipe, not to this process): a full pipe makes the write fail with ``EAGAIN`` at once. The
    writer thread waits until the reader takes more, as it would on a blocking pipe; it used to
    drop the lines and count a failed write, with its backlog nowhere near full."""
    import io
    import os
    import select
    import sys
    import threading

    from metaprotocol_sdk.proxy.accesslog import AccessLog

    r, w = os.pipe()
    os.set_blocking(w, False)
    filled = 0
    with contextlib.suppress(BlockingIOError):
        while True:  # the reader is behind: the pipe is full before the log writes
            filled += os.write(w, b"f" * 4096)
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(io.FileIO(w, "w", closefd=False)))
    tried = threading.Event()
    real_write = os.write

    def write(fd: int, data: bytes | memoryview) -> int:
        try:
            return real_write(fd, data)
        finally:
            tried.set()

    monkeypatch.setattr(os, "write", write)
    log = AccessLog("-")
    try:
        for i in range(200):
            log.log("listener", "route", "dest", "Ok", 0.001, i, "Request", "127.0.0.1:1")
        log.flush()
        assert tried.wait(5)  # the writer met the full pipe before anything was read
        got = bytearray()
        while got.count(b"\n") < 200:
            assert select.select([r], [], [], 2.0)[0], f"lines lost: {log.dropped_lines}"
            got += os.read(r, 1 << 16)
        log.close()
        assert (log.failed_writes, log.dropped_lines) == (0, 0)
        ids = [json.loads(line)["request_id"] for line in got[filled:].splitlines()]
        assert ids == list(range(200))
    finally:
        log.close()
        os.close(r)
        os.close(w)


#: A series the SDK makes: ``stats.counter("name", ...)``, ``.gauge(``, ``.histogram(``, or the
#: upstream's ``self._count(self._made, "name", ...)``.
MADE = re.compile(
    r'(?:\.(counter|gauge|histogram)|_count)\(\s*(?:self\._\w+,\s*)?"((?:metaprotocol|istio)_\w+)"'
)


def test_every_series_has_help_and_gauges_are_typed_gauge() -> None:
    """``/stats`` explains every series (not ``# HELP name name``) and types each gauge as one
    (a gauge typed ``counter`` reads as a counter reset each time it goes down)."""
    made: dict[str, set[str]] = {}
    for path in (Path(__file__).parents[2] / "metaprotocol_sdk").rglob("*.py"):
        for kind, name in MADE.findall(path.read_text(encoding="utf-8")):
            made.setdefault(name, set()).add(kind or "counter")
    assert {"metaprotocol_requests_total", "metaprotocol_upstream_overflow_total"} <= set(made)
    assert sorted(name for name in made if name not in HELP) == []
    gauges = sorted(name for name, kinds in made.items() if "gauge" in kinds)
    assert "metaprotocol_outlier_ejections_active" in gauges
    stats = Stats()
    for name in gauges:
        stats.gauge(name).value = 1
    text = stats.prometheus()
    assert [name for name in gauges if f"# TYPE {name} gauge" not in text] == []
    assert set(gauges) <= GAUGES


def test_config_dump_builds_take_a_bounded_share_of_the_loop_while_endpoints_flap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``/config_dump`` is built again after a change of the clusters' health: with an
    endpoint flapping (an ejection or readmission between any two polls) every poll built it
    again, and an operator's polling loop held the event loop for the whole dump each time
    (0.4 s for a 30 000-endpoint file). Now a build for a health change waits until
    ``DUMP_SPACING`` times the last build's duration has passed since it, so builds take at
    most about a fifth of the loop however fast the polls; each reply still shows the health
    as it was when it was asked for."""

    async def main() -> None:
        text = mesh(
            [(9101, "v1"), (9102, "v1")],
            "- name: all\n  route: [{destination: {host: svc.test, subset: v1}}]\n",
        )
        async with engine_for(text) as engine:
            assert engine.admin_address is not None
            real = engine.config_dump
            built: list[float] = []

            def slow_dump() -> dict[str, Any]:  # a large configuration's cost, 20 ms
                start = engine.loop.time()
                dump = real()
                stall_the_loop(0.02)
                built.append(engine.loop.time() - start)
                return dump

            monkeypatch.setattr(engine, "config_dump", slow_dump)
            cluster = engine.clusters["outbound|9000|v1|svc.test"]
            host = cluster.hosts[0]
            start = engine.loop.time()
            for i in range(30):
                host.ejected = i % 2 == 1  # a flapping endpoint: the balancer rebuilt
                cluster.rebalance()
                status, body = await http_get(engine.admin_address, "/config_dump")
                assert status == 200
                (dumped,) = [c for c in json.loads(body)["clusters"] if c["name"] == cluster.name]
                assert dumped["ejected"] == ([host.key] if host.ejected else []), i
            elapsed = engine.loop.time() - start
            assert sum(built) < elapsed / 3, (len(built), sum(built), elapsed)

    run(main())
