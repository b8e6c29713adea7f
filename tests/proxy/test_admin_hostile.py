"""Admin endpoint under hostile clients: bounded size, connections and time; never a traceback."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from proxy_kit import WAIT, engine_for, http_get, mesh, run, until

from metaprotocol_sdk.errors import ConfigError
from metaprotocol_sdk.proxy import loads_config
from metaprotocol_sdk.proxy.admin import DUMP_DOCUMENTS_BYTES, MAX_REQUEST_BYTES, bounded_copy
from metaprotocol_sdk.proxy.reload import config_version

ADMIN = "  admin: {bind: '127.0.0.1:0'}\n"


def admin_mesh(admin: str = "{bind: '127.0.0.1:0'}", port: int = 1, extra: str = "") -> str:
    text = mesh([(port, "v1")]).replace(ADMIN, f"  admin: {admin}\n")
    return text.replace("metadata: {name: svc}\n", f"metadata:\n  name: svc\n{extra}", 1)


async def exchange(addr: tuple[str, int], data: bytes) -> bytes:
    """Send ``data``, then read until the server closes."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr), WAIT)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), WAIT)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /" + b"a" * (64 * 1024) + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),  # was a traceback
        (b"GET /ready HTTP/1.1\r\nX-Pad: " + b"p" * 2 * MAX_REQUEST_BYTES + b"\r\n\r\n", 431),
        (b"\x00\x01\x02 garbage\r\n\r\n", 400),
        (b"GET /ready HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET /ready HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 requires Host
        (b"POST /ready HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi", 405),
        (b"DELETE /config_dump HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"GET /ready HTTP/1.0\r\n\r\n", 200),
    ],
    ids=["64k-line", "16k-header", "garbage", "bad-header", "no-host", "post", "delete", "http10"],
)
def test_bad_requests_get_an_http_error(request_bytes: bytes, status: int) -> None:
    async def main() -> None:
        async with engine_for(admin_mesh()) as engine:
            assert engine.admin_address is not None
            reply = await exchange(engine.admin_address, request_bytes)
            assert status_of(reply) == status, reply[:200]
            assert b"Connection: close" in reply
            assert await http_get(engine.admin_address, "/ready") == (200, "LIVE\n")
            key = f'metaprotocol_admin_requests_total{{code="{status}"}}'
            assert engine.stats_snapshot()[key] == (2 if status == 200 else 1)  # + /ready

    run(main())


def test_a_slow_client_is_cut_off_by_the_request_timeout() -> None:
    """One header line every 100 ms: each line used to restart a 5 s timer, forever."""

    async def main() -> None:
        async with engine_for(admin_mesh("{bind: '127.0.0.1:0', requestTimeout: 500ms}")) as engine:
            assert engine.admin_address is not None
            reader, writer = await asyncio.open_connection(*engine.admin_address)
            writer.write(b"GET /ready HTTP/1.1\r\n")
            start = time.monotonic()
            reply = b""
            for i in range(100):  # the attacker's pace: a line per 100 ms, 10 s in all
                try:
                    writer.write(b"X-Slow-%d: y\r\n" % i)
                    reply = await asyncio.wait_for(reader.read(1024), 0.1)
                    break
                except TimeoutError:
                    continue
                except ConnectionError:
                    break
            elapsed = time.monotonic() - start
            writer.close()
            assert elapsed < 3.0, elapsed
            assert reply.startswith(b"HTTP/1.1 408"), reply
            assert engine.stats_snapshot()['metaprotocol_admin_requests_total{code="408"}'] == 1

    run(main())


def test_connections_over_the_limit_are_refused_and_counted() -> None:
    async def main() -> None:
        async with engine_for(admin_mesh("{bind: '127.0.0.1:0', maxConnections: 4}")) as engine:
            addr = engine.admin_address
            assert addr is not None
            idle = [await asyncio.open_connection(*addr) for _ in range(4)]
            # Same event loop: the server accepts in order, so these four come first.
            reply = await exchange(addr, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 503") and b"too many admin connections" in reply
            snapshot = engine.stats_snapshot()
            assert snapshot["metaprotocol_admin_connections_rejected_total"] == 1
            _, writer = idle.pop()
            writer.close()
            await writer.wait_closed()
            for _ in range(100):  # until the server has seen that one go
                if (await exchange(addr, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(
                    b"HTTP/1.1 200"
                ):
                    break
            else:
                raise AssertionError("a freed admin slot was never reused")
            for _, w in idle:
                w.close()

    run(main())


def shared_blob_mesh(copies: int = 200) -> str:
    """10 KB written once and referenced ``copies`` times: within the loader's alias bound,
    but 2 MB of JSON if the dump expanded it."""
    refs = ", ".join(["*blob"] * copies)
    annotations = f"  annotations:\n    blob: &blob {'x' * 10_000}\n    copies: [{refs}]\n"
    return admin_mesh(extra=annotations)


def test_config_dump_shows_the_model_and_caps_the_documents() -> None:
    text = shared_blob_mesh()
    assert len(text) < 20_000

    async def main() -> None:
        async with engine_for(text) as engine:
            assert engine.admin_address is not None
            status, body = await http_get(engine.admin_address, "/config_dump")
            assert status == 200
            assert len(body) < DUMP_DOCUMENTS_BYTES + 64 * 1024, len(body)
            dump = json.loads(body)
            assert dump["documentsTruncated"] is True
            assert "...truncated: /config_dump shows the documents up to" in body
            # The validated model is whole: what the engine runs.
            assert dump["listeners"][0]["name"] == "svc.test:9000"
            assert dump["clusters"][0]["name"] == "outbound|9000||svc.test"
            assert dump["settings"]["admin"]["maxConnections"] == 16
            assert dump["settings"]["admin"]["requestTimeout"] == 5.0
            # Served from one build: asking again costs no second serialisation.
            assert (await http_get(engine.admin_address, "/config_dump"))[1] == body

    run(main())


def test_a_small_config_dump_is_not_truncated() -> None:
    async def main() -> None:
        router = """\
        - name: by-host
          match: {attributes: {host: {regex: 'api-.*'}, method: {}}}
          route: [{destination: {host: svc.test}}]
        """
        async with engine_for(mesh([(1, "v1")], router=router)) as engine:
            dump = engine.config_dump()
            assert dump["documentsTruncated"] is False
            assert dump["documents"][1]["kind"] == "ServiceEntry"
            assert dump["listeners"][0]["routes"][0]["match"] == [
                {"attribute": "host", "regex": "api-.*"},
                {"attribute": "method", "present": True},
            ]

    run(main())


@pytest.mark.parametrize("bind", ["0.0.0.0:0", "[::]:9901", "10.1.2.3:9901", "admin.example:80"])
def test_a_remote_admin_bind_needs_allow_remote(bind: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads_config(admin_mesh(f"{{bind: '{bind}'}}"), "mesh.yaml")
    assert info.value.field == "spec.admin.bind"
    assert "is not a loopback address" in info.value.reason
    assert "admin.allowRemote: true" in info.value.reason
    config = loads_config(admin_mesh(f"{{bind: '{bind}', allowRemote: true}}"))
    assert config.proxy.admin is not None and config.proxy.admin.allow_remote


@pytest.mark.parametrize(
    ("admin", "field", "reason"),
    [
        ("{bind: '127.0.0.1:0', allowRemote: 'yes'}", "spec.admin.allowRemote", "true or false"),
        ("{bind: '127.0.0.1:0', maxConnections: 0}", "spec.admin.maxConnections", "[1, 1024]"),
        ("{bind: '127.0.0.1:0', requestTimeout: 5}", "spec.admin.requestTimeout", "5"),
        ("{bind: '127.0.0.1:0', user: root}", "spec.admin.user", "unknown field"),
        ("{allowRemote: true}", "spec.admin.bind", "required field is missing"),
    ],
)
def test_admin_settings_are_validated(admin: str, field: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads_config(admin_mesh(admin), "mesh.yaml")
    assert info.value.field == field
    assert reason in info.value.reason


def test_an_allowed_remote_bind_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with engine_for(admin_mesh("{bind: '0.0.0.0:0', allowRemote: true}")) as engine:
            assert engine.admin_address is not None

    with caplog.at_level(logging.WARNING, logger="metaprotocol.proxy"):
        run(main())
    (record,) = [r for r in caplog.records if "admin endpoint" in r.getMessage()]
    assert "reachable from other hosts" in record.getMessage()


# -- a real engine process: hostile admin clients leave stderr clean and memory bounded -------


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


#: Bound on each blocking socket call against the engine process (the machine may be busy).
PROCESS_WAIT = 30.0


def _send(addr: tuple[str, int], data: bytes, read: bool = True) -> bytes:
    with socket.create_connection(addr, timeout=PROCESS_WAIT) as sock:
        try:
            sock.sendall(data)
            if not read:
                return b""
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)
        except ConnectionResetError:
            return b""


def test_a_real_engine_answers_hostile_admin_clients_without_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "mesh.yaml"
    config.write_text(
        shared_blob_mesh(copies=400).replace(
            "admin: {bind: '127.0.0.1:0'}", "admin: {bind: '127.0.0.1:0', requestTimeout: 1s}", 1
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "metaprotocol_sdk", "proxy", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        admin = None
        for _ in range(5):
            line = proc.stdout.readline()
            if line.startswith("admin on "):
                host, port = line.split()[-1].rsplit(":", 1)
                admin = (host, int(port))
                break
        assert admin is not None, "the engine did not start"
        before = _rss_kib(proc.pid)
        for _ in range(3):
            assert _send(admin, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n").startswith(
                b"HTTP/1.1 431"
            )
            assert _send(admin, b"\xff\xfe garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
            _send(admin, b"GET /ready HTTP/1.1\r\nHost: x\r\nX-Half: ", read=False)  # then gone
            dump = _send(admin, b"GET /config_dump HTTP/1.1\r\nHost: x\r\n\r\n")
            assert dump.startswith(b"HTTP/1.1 200") and len(dump) < 2 * DUMP_DOCUMENTS_BYTES
        slow = [socket.create_connection(admin, timeout=PROCESS_WAIT) for _ in range(20)]
        for sock in slow:
            sock.sendall(b"GET /ready HTTP/1.1\r\n")  # and never finish
        replies = [sock.recv(1024) for sock in slow]  # 503 at once, 408 after 1 s
        # 16 slots (one may still be finishing an earlier exchange): the rest refused at once.
        busy = sum(r.startswith(b"HTTP/1.1 503") for r in replies)
        late = sum(r.startswith(b"HTTP/1.1 408") for r in replies)
        assert busy >= 4 and busy + late == 20, replies
        for sock in slow:
            sock.close()
        grown_mib = (_rss_kib(proc.pid) - before) / 1024
        assert grown_mib < 50, grown_mib  # the unbounded dump took 1.4 GB
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, err
    # The annotations are named once as ignored (they cannot change traffic), then the drain.
    warning, drain = err.splitlines()
    assert warning.startswith("warning: "), err
    assert "metadata.annotations: accepted and ignored" in warning, err
    assert drain == "info: draining", err


def test_a_bug_behind_an_admin_path_is_a_500_and_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with engine_for(admin_mesh()) as engine:
            assert engine.admin_address is not None

            def broken() -> None:
                raise RuntimeError("planted")

            engine.config_dump = broken  # type: ignore[assignment,method-assign]
            status, body = await http_get(engine.admin_address, "/config_dump")
            assert (status, body) == (500, "internal error (logged by the engine)\n")
            assert await http_get(engine.admin_address, "/ready") == (200, "LIVE\n")

    with caplog.at_level(logging.ERROR):
        run(main())
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage() == "admin: RuntimeError: planted"
    assert record.exc_info is None  # no traceback


def test_config_dump_never_expands_an_alias() -> None:
    """An alias is one object shared by PyYAML: written once, then pointed to."""
    annotations = (
        "  annotations:\n"
        "    l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
        "    l1: &l1 [*l0, *l0, *l0, *l0, *l0, *l0, *l0, *l0, *l0, *l0]\n"
        "    l2: [*l1, *l1, *l1, *l1, *l1, *l1, *l1, *l1, *l1, *l1]\n"
    )

    async def main() -> None:
        async with engine_for(admin_mesh(extra=annotations)) as engine:
            assert engine.admin_address is not None
            status, body = await http_get(engine.admin_address, "/config_dump")
            assert status == 200
            dump = json.loads(body)
            meta = dump["documents"][1]["metadata"]["annotations"]
            assert meta["l0"] == ["lol"] * 10
            assert meta["l1"][0] == {"$ref": "/documents/1/metadata/annotations/l0"}
            assert meta["l2"] == [{"$ref": "/documents/1/metadata/annotations/l1"}] * 10
            assert body.count("lol") == 10  # 1000 when expanded
            assert dump["documentsTruncated"] is False

    run(main())


def _version_peak(n: int) -> int:
    """The memory the version of a config takes at its peak (bytes, deterministic), when the
    config's annotations hold a key of ``n`` characters above ``n`` empty lists (a file of
    about ``4 n`` bytes)."""
    extra = f"  annotations:\n    ? {'k' * n}\n    : [{','.join(['[]'] * n)}]\n"
    config = loads_config(admin_mesh(extra=extra))
    tracemalloc.start()
    try:
        config_version(config)
        documents, cut = bounded_copy(list(config.documents), DUMP_DOCUMENTS_BYTES, "/documents")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        assert not cut and len(documents[1]["metadata"]["annotations"]["k" * n]) == n


def test_config_version_and_dump_take_linear_memory_and_time_under_a_long_key() -> None:
    """The bounded copy behind the config version (computed at start and at every reload, on
    the event loop) and ``/config_dump`` built each container's JSON Pointer as a string and
    kept it: the path of a long key was copied once per container below it (a 160 KB file
    took 1.4 s and 3 GB; 4 MiB, the file limit, would take a terabyte)."""
    small, large = _version_peak(2_500), _version_peak(10_000)
    # Four times the size: about 4 when linear, about 16 when quadratic.
    assert large / small < 8, f"four times the size took {large / small:.1f}x the memory"


def test_an_admin_exchange_cancelled_by_the_process_end_logs_no_traceback() -> None:
    """A connection's task cancelled mid-exchange (the loop's shutdown cancels what is left,
    as when a drained worker exits under a scrape): it ends quietly. Python 3.11's stream
    callback calls ``task.exception()``, which raises for a cancelled task: the loop then
    logged ``Exception in callback`` with a traceback."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, object]] = []
        loop.set_exception_handler(lambda _, context: errors.append(context))
        async with engine_for(mesh([])) as engine:
            assert engine.admin_address is not None
            reader, writer = await asyncio.open_connection(*engine.admin_address)
            writer.write(b"GET /stats HTTP/1.1\r\n")  # the request's head is not complete
            await writer.drain()

            def exchanges() -> list[asyncio.Task[object]]:
                return [t for t in asyncio.all_tasks() if "serve" in repr(t.get_coro())]

            (task,) = await until(exchanges, "the exchange started")
            task.cancel()
            assert await reader.read() == b""  # closed
            writer.close()
            for _ in range(5):  # the stream callback runs after the task is done
                await asyncio.sleep(0)
        assert errors == []

    run(main())
