"""Streams where they meet the mesh features: mutual TLS and PERMISSIVE detection,
AuthorizationPolicies (enforced and dry run) judging a ``Stream_Init``, the access log, Istio's
standard metrics, the admin endpoint; over real sockets on 127.0.0.1 with the KV stream
server and client of ``test_streams``."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from mesh_pki import MeshCa
from peer_check import missing
from proxy_kit import (
    address,
    engine_for,
    error_type,
    http_get,
    mesh,
    refusing_port,
    run,
    until,
)
from rls_kit import Redis, rate_limit_service
from test_authorization import config, policy, rbac
from test_global_ratelimit import config as rl_config
from test_streams import LISTENER, StreamClient, StreamServer, active, kinds, streams
from test_tls import Pki, listener_tls
from test_workers import Supervisor, total
from test_workers import until as wait_for

from metaprotocol_sdk.examples.kv import STREAM_DATA, STREAM_HALF_CLOSE, STREAM_OPEN
from metaprotocol_sdk.proxy import Engine


@pytest.fixture
def ca() -> MeshCa:
    return MeshCa()


@pytest.fixture(scope="module")
def redis() -> Iterator[Redis]:
    if shutil.which("redis-server") is None:
        missing("redis-server", "./dev installs Debian's redis-server")
    server = Redis()
    yield server
    server.stop()


async def connect(engine: Engine, ca: MeshCa, tmp_path: Path, sa: str | None) -> StreamClient:
    """A stream client of identity ``sa`` (``None``: plain text)."""
    if sa is None:
        return await StreamClient.connect(address(engine))
    ctx = ca.client_context(tmp_path / "default", None)
    ctx.load_cert_chain(*ca.files(tmp_path / "default", sa, "default"))
    client = await StreamClient.connect(address(engine), ssl=ctx)
    assert isinstance(client, StreamClient)
    return client


def log_lines(log: Path) -> dict[int, dict[str, Any]]:
    return {r["request_id"]: r for r in map(json.loads, log.read_text().splitlines())}


def test_a_stream_init_as_the_first_bytes_of_a_permissive_port_is_judged_by_its_policies(
    ca: MeshCa, tmp_path: Path
) -> None:
    """On a PERMISSIVE port a ``Stream_Init`` may be a connection's first frame, in plain
    text or after a mutual TLS handshake. ALLOW by principal and DENY by ``request.headers``
    of the ``Stream_Init`` judge it as a request: the plain client and the denied method get
    ``PermissionDenied`` with the stream's id (the frames behind it are dropped and counted,
    nothing reaches the upstream), the allowed stream goes both ways. Its access log line
    names the client's principal and what the dry-run policy would do."""
    log = tmp_path / "access.log"
    allow = policy(
        "frontend-only",
        "rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/frontend]}}]}]",
    )
    deny = policy(
        "no-admin",
        "action: DENY\nrules: [{when: [{key: 'request.headers[method]', values: [admin]}]}]",
    )
    dry = policy(
        "no-secrets",
        "action: DENY\nrules: [{when: [{key: 'request.headers[key]', values: [secret]}]}]",
        dry_run='"true"',
    )
    proxy = f"accessLog: {{path: '{log}', attributes: [method, key]}}\n"

    async def main() -> None:
        up = await StreamServer().start()
        async with engine_for(config(ca, tmp_path, up.port, allow, deny, dry, proxy=proxy)) as e:
            plain = await connect(e, ca, tmp_path, None)
            plain.frame(STREAM_OPEN, 1, {"method": "chat"})
            plain.frame(STREAM_DATA, 1, {}, b"plain")
            (refused,) = await plain.until(1, 1)
            assert error_type(refused) == "PermissionDenied"
            frontend = await connect(e, ca, tmp_path, "frontend")
            frontend.frame(STREAM_OPEN, 2, {"method": "admin"})
            frontend.frame(STREAM_DATA, 2, {}, b"x")
            frontend.frame(STREAM_OPEN, 3, {"method": "chat", "key": "secret"})
            frontend.frame(STREAM_DATA, 3, {}, b"over mtls")
            frontend.frame(STREAM_HALF_CLOSE, 3)
            three = await frontend.until(3, 3)
            assert kinds(three) == ["Stream_Init", "Stream_Data", "Stream_Close_One_Way"]
            assert bytes(three[1].body) == b"OVER MTLS"
            assert [error_type(f) for f in frontend.frames[2]] == ["PermissionDenied"]
            await until(lambda: streams(e, "closed") == 1, "stream 3 closed")
            dropped = "metaprotocol_stream_frames_dropped_total"
            await until(lambda: e.stats.get(dropped, listener=LISTENER) == 2, "2 dropped")
            assert rbac(e, "no-admin", "DENY", "denied") == 1
            assert rbac(e, "no-secrets", "DENY", "shadow_denied") == 1
            assert active(e) == 0
            (conn,) = up.connections  # only the allowed stream reached the upstream
            assert kinds(conn.frames) == ["Stream_Init", "Stream_Data", "Stream_Close_One_Way"]
            plain.close()
            frontend.close()
        await up.close()

    run(main())
    lines = log_lines(log)
    assert lines[3]["status"] == "closed"
    assert lines[3]["source_principal"] == "spiffe://cluster.local/ns/default/sa/frontend"
    assert lines[3]["attributes"] == {"method": "chat", "key": "secret"}
    assert lines[3]["dry_run"] == {"deny": {"result": "denied", "policy": "no-secrets"}}
    assert lines[2]["status"] == lines[1]["status"] == "PermissionDenied"


def test_a_streams_access_log_line_carries_the_response_flags_of_its_end(
    tmp_path: Path,
) -> None:
    """A stream reset (its upstream dropped it, its endpoint refused, the client left) gets
    Envoy's response flag in its access log line as a request that ended so does (``UR``,
    ``UF``, ``DC``), so that a filter on the flags finds it; a closed stream gets ``-``."""
    log = tmp_path / "access.log"

    async def main() -> None:
        up = await StreamServer().start()
        refusing = refusing_port()
        router = (
            "- name: refusing\n"
            "  match: {attributes: {method: {exact: refused}}}\n"
            "  route: [{destination: {host: svc.test, subset: v2}}]\n"
            "- name: default\n"
            "  route: [{destination: {host: svc.test, subset: v1}}]\n"
        )
        proxy = f"accessLog: {{path: '{log}'}}\n"
        text = mesh([(up.port, "v1"), (refusing, "v2")], router=router, proxy=proxy)
        async with engine_for(text) as engine:
            c = await StreamClient.connect(address(engine))
            c.frame(STREAM_OPEN, 1, {"method": "chat"})
            c.frame(STREAM_HALF_CLOSE, 1)
            await c.until(1, 2)
            c.frame(STREAM_OPEN, 2, {"method": "drop"})
            c.frame(STREAM_OPEN, 3, {"method": "refused"})
            await c.until(2, 1)
            await c.until(3, 1)
            c.frame(STREAM_OPEN, 4, {"method": "silent"})
            await up.wait(lambda: len(up.connections) == 3, "stream 4 open")
            await until(lambda: streams(engine, "closed") == 1, "stream 1 closed")
            c.reset()  # a reset: gone at once (a FIN would be a half-close)
            await until(lambda: streams(engine, "DownstreamClosed") == 1, "stream 4 ended")
        await up.close()

    run(main())
    lines = log_lines(log)
    flags = {rid: line["response_flags"] for rid, line in lines.items()}
    assert flags == {1: "-", 2: "UR", 3: "UF", 4: "DC"}, lines


def rotations(engine: Engine, result: str) -> int:
    return int(engine.stats.get("metaprotocol_tls_identity_rotations_total", result=result) or 0)


def peer_serial(transport: Any) -> int:
    der = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return int(x509.load_der_x509_certificate(der).serial_number)


def negatives(engine: Engine) -> dict[str, Any]:
    """The series whose value is below zero."""
    return {
        k: v for k, v in engine.stats.snapshot().items() if isinstance(v, int | float) and v < 0
    }


def test_streams_over_istio_mutual_both_ways_across_a_rotation_with_istios_metrics(
    ca: MeshCa, tmp_path: Path
) -> None:
    """An ``ISTIO_MUTUAL`` listener and cluster, Istio's standard metrics on. A stream open
    across a rotation of the workload identity goes on with its connection's certificate;
    the next stream's connection presents the new one. Istio's TCP series count each
    stream connection once opened and once closed, and the bytes each way are those the
    upstream got and sent; no series is below zero."""
    certs = tmp_path / "certs"
    first = ca.write(certs, "engine")
    server = ca.server_context(tmp_path, "greeter")
    proxy = (
        f"meshIdentity: {{directory: '{certs}', checkInterval: 100ms}}\n"
        "telemetry: {istioMetrics: true}\n"
    )

    async def main() -> None:
        up = await StreamServer().start(ssl=server)
        text = mesh(
            [(up.port, "v1")],
            traffic_policy="{tls: {mode: ISTIO_MUTUAL}}",
            listener_tls="{mode: ISTIO_MUTUAL}",
            proxy=proxy,
        )
        async with engine_for(text) as engine:
            ctx = ca.client_context(tmp_path, "frontend")
            c = await StreamClient.connect(address(engine), ssl=ctx)
            c.frame(STREAM_OPEN, 1, {"method": "chat"})
            c.frame(STREAM_DATA, 1, {}, b"before")
            await c.until(1, 2)
            second = ca.write(certs, "engine", hours=48)
            await until(lambda: rotations(engine, "ok") == 1, "the rotation")
            c.frame(STREAM_DATA, 1, {}, b"after")
            c.frame(STREAM_OPEN, 2, {"method": "chat"})
            c.frame(STREAM_DATA, 2, {}, b"new")
            assert [bytes(f.body) for f in (await c.until(1, 3))[1:]] == [b"BEFORE", b"AFTER"]
            assert bytes((await c.until(2, 2))[1].body) == b"NEW"
            old, new = up.connections
            assert peer_serial(old.transport) == first and peer_serial(new.transport) == second
            c.frame(STREAM_HALF_CLOSE, 1)
            c.frame(STREAM_HALF_CLOSE, 2)
            await c.until(1, 4)
            await c.until(2, 3)
            await until(lambda: streams(engine, "closed") == 2, "both streams closed")
            await until(lambda: not engine.upstreams, "their connections closed")
            stats = engine.stats
            assert stats.total("istio_tcp_connections_opened_total") == 2
            assert stats.total("istio_tcp_connections_closed_total") == 2
            to_upstream = sum(len(f.frame) for conn in up.connections for f in conn.frames)
            from_upstream = sum(len(f.frame) for sid in (1, 2) for f in c.frames[sid])
            assert stats.total("istio_tcp_sent_bytes_total") == to_upstream
            assert stats.total("istio_tcp_received_bytes_total") == from_upstream
            assert not negatives(engine)
            c.close()
        await up.close()

    run(main())


STREAMS = 24  # connections of one stream each: P(all on one of two workers) = 2**-23


def summed(stats: dict[str, float], name: str, *parts: str) -> float:
    """The supervisor's sum over its workers (not the per-worker series of a gauge)."""
    return total(stats, name, *parts) - total(stats, name, 'worker="', *parts)


def test_streams_on_two_workers_are_summed_and_a_crashed_workers_go_with_it(
    tmp_path: Path,
) -> None:
    """``--workers 2``: streams open on both workers; the supervisor's ``/stats`` sums
    ``metaprotocol_streams_active`` (and shows it per worker), the live page answers. A
    SIGHUP reload keeps every open stream. A worker killed with streams open takes its
    streams along (its clients and their upstream connections see the close); the other
    worker's streams go on, and the sums then are that worker's alone."""

    async def main() -> None:
        up = await StreamServer().start()
        sup = Supervisor(tmp_path, mesh([(up.port, "v1")]))
        clients: list[StreamClient] = []
        try:
            for _ in range(STREAMS):
                c = await StreamClient.connect(sup.address)
                c.frame(STREAM_OPEN, 1, {"method": "chat"})
                await c.until(1, 1)
                clients.append(c)
            workers = await sup.workers()

            async def opened() -> dict[str, float] | None:
                stats = await sup.stats()
                return stats if summed(stats, "metaprotocol_streams_active") == STREAMS else None

            stats = await wait_for(opened, "every stream counted")
            mine = [
                total(await sup.worker_stats(w), "metaprotocol_streams_active") for w in workers
            ]
            assert sum(mine) == STREAMS and all(mine), mine
            assert total(stats, "metaprotocol_streams_active", 'worker="0"') == mine[0]
            live = await sup.get("/stats/live")
            assert live["workers"] == 2 and live["streams"] == STREAMS
            assert sup.proc.pid
            os.kill(sup.proc.pid, signal.SIGHUP)

            async def reloaded() -> bool:
                stats = await sup.stats()
                return summed(stats, "metaprotocol_reloads_total", 'result="ok"') == 2

            await wait_for(reloaded, "both workers reloaded")
            for c in clients:  # every stream still goes both ways
                c.frame(STREAM_DATA, 1, {}, b"after")
            for c in clients:
                assert bytes((await c.until(1, 2))[1].body) == b"AFTER"
            os.kill(workers[0]["pid"], signal.SIGKILL)
            lost = [c for c in clients if c.transport is not None]

            async def survivors() -> dict[str, float] | None:
                stats = await sup.stats()
                active = summed(stats, "metaprotocol_streams_active")
                return stats if active == mine[1] else None

            await wait_for(survivors, "the killed worker's streams gone")
            gone = [c for c in lost if c.closed.done()]
            assert len(gone) == mine[0], (len(gone), mine)
            await up.wait(
                lambda: sum(conn.lost.done() for conn in up.connections) == mine[0],
                "the killed worker's stream connections closed",
            )
            for c in clients:
                if not c.closed.done():
                    c.frame(STREAM_HALF_CLOSE, 1)

            async def closed() -> dict[str, float] | None:
                stats = await sup.stats()
                done = summed(stats, "metaprotocol_streams_total", 'outcome="closed"') == mine[1]
                return stats if done and summed(stats, "metaprotocol_streams_active") == 0 else None

            stats = await wait_for(closed, "the other worker's streams closed")
            assert not {k: v for k, v in stats.items() if v < 0}
        finally:
            for c in clients:
                c.close()
            code, _ = sup.stop()
            await up.close()
        assert code == 0

    run(main(), timeout=90)


def test_a_global_rate_limit_holds_a_stream_init_and_its_frames(
    redis: Redis, tmp_path: Path
) -> None:
    """A global rate limit (a real RLS counting in redis) judges each ``Stream_Init``: the
    frames sent right behind it wait for the answer; the streams under the limit get them,
    the one over it gets ``OverLimit`` with its id (its frames dropped, its access log line
    flagged ``RL``). A client that leaves while a ``Stream_Init`` waits for a service that
    never answers cancels the call, and nothing of it stays (pending, bytes, streams)."""
    log = tmp_path / "access.log"

    async def main() -> None:
        up = await StreamServer().start()
        with rate_limit_service(redis, {("method", "gchat"): 2}) as rls:
            proxy = f"accessLog: {{path: '{log}'}}\ntimeouts: {{route: 30s}}\n"
            text = rl_config(up.port, rls.port, "streams", timeout="20s", proxy=proxy)
            async with engine_for(text) as engine:
                c = await StreamClient.connect(address(engine))
                for sid in (1, 2, 3):
                    c.frame(STREAM_OPEN, sid, {"method": "gchat"})
                    c.frame(STREAM_DATA, sid, {}, f"behind-{sid}".encode())
                # The three calls are at the service at once: which one is third is its say.
                await until(lambda: sum(len(c.frames[sid]) for sid in (1, 2, 3)) == 5, "all")
                (limited,) = (c.frames[sid][0] for sid in (1, 2, 3) if len(c.frames[sid]) == 1)
                assert error_type(limited) == "OverLimit"
                opened = [sid for sid in (1, 2, 3) if len(c.frames[sid]) == 2]
                for sid in opened:
                    frames = c.frames[sid]
                    assert kinds(frames) == ["Stream_Init", "Stream_Data"]
                    assert bytes(frames[1].body) == f"BEHIND-{sid}".encode()
                dropped = "metaprotocol_stream_frames_dropped_total"
                await until(lambda: engine.stats.get(dropped, listener=LISTENER) == 1, "drop")
                assert len(up.connections) == 2
                rls.mode = "hang"
                leaving = await StreamClient.connect(address(engine))
                leaving.frame(STREAM_OPEN, 7, {"method": "gchat"})
                leaving.frame(STREAM_DATA, 7, {}, b"x" * 1000)
                await until(lambda: rls.calls == 4, "the call at the service")
                await until(lambda: engine.buffered > 1000, "the init and its frame held")
                leaving.reset()
                await until(lambda: rls.cancelled == 1, "the call cancelled")
                await until(lambda: engine.pending == 0, "nothing held")
                for sid in opened:
                    c.frame(STREAM_HALF_CLOSE, sid)
                await until(lambda: streams(engine, "closed") == 2, "both streams closed")
                await until(lambda: engine.buffered == 0, "no byte left")
                assert active(engine) == 0 and len(up.connections) == 2
                assert not negatives(engine)
                c.close()
        await up.close()

    run(main())
    statuses = sorted((line["status"], line["response_flags"]) for line in log_lines(log).values())
    assert statuses == [("OverLimit", "RL"), ("closed", "-"), ("closed", "-")], statuses


def test_the_admin_endpoint_with_many_open_streams() -> None:
    """300 streams open on three connections (``maxStreamsPerConnection`` each): ``/stats``
    (both forms), the live page's data (which showed three connections and nothing pending,
    not the streams) and ``/config_dump`` answer while they are open and count them; once all
    closed, the gauge is back to zero and no series is below it."""
    per, conns = 100, 3

    async def main() -> None:
        up = await StreamServer().start()
        async with engine_for(mesh([(up.port, "v1")])) as engine:
            assert engine.admin_address is not None
            clients = [await StreamClient.connect(address(engine)) for _ in range(conns)]
            for c in clients:
                for sid in range(1, per + 1):
                    c.frame(STREAM_OPEN, sid, {"method": "chat"})
            for c in clients:
                for sid in range(1, per + 1):
                    await c.until(sid, 1)
            assert active(engine) == per * conns
            status, text = await http_get(engine.admin_address, "/stats")
            assert status == 200
            assert f'metaprotocol_streams_active{{listener="{LISTENER}"}} {per * conns}' in text
            status, body = await http_get(engine.admin_address, "/stats?format=json")
            series = f'metaprotocol_streams_active{{listener="{LISTENER}"}}'
            assert status == 200 and json.loads(body)[series] == per * conns
            status, body = await http_get(engine.admin_address, "/stats/live")
            live = json.loads(body)
            assert status == 200 and live["connections"] == conns
            assert live["streams"] == per * conns  # the page showed 3 connections, 0 pending
            status, body = await http_get(engine.admin_address, "/config_dump")
            assert status == 200 and json.loads(body)["listeners"]
            for c in clients:
                for sid in range(1, per + 1):
                    c.frame(STREAM_HALF_CLOSE, sid)
            await until(lambda: streams(engine, "closed") == per * conns, "all closed")
            assert active(engine) == 0 and not negatives(engine)
            await until(lambda: not engine.upstreams, "their connections closed")
            for c in clients:
                c.close()
        await up.close()

    run(main())


def test_a_client_of_a_tls_listener_that_stops_reading_slows_its_streams_upstream(
    tmp_path: Path,
) -> None:
    """A SIMPLE TLS listener: a client that reads nothing of a stream flooding it stops the
    engine reading the stream's upstream (through the TLS layer's buffers too), and gets
    every frame, in order, once it reads again."""
    pki = Pki(tmp_path)
    count, size = 4096, 16384
    proxy = "limits: {connectionBufferBytes: 262144, connectionBufferMaxBytes: 4194304}\n"

    async def main() -> None:
        up = await StreamServer().start()
        text = mesh([(up.port, "v1")], listener_tls=listener_tls(pki), proxy=proxy)
        async with engine_for(text) as engine:
            ctx = pki.client_context()
            c = await StreamClient.connect(address(engine), ssl=ctx, server_hostname="svc.test")
            assert c.transport is not None
            c.transport.pause_reading()
            c.frame(STREAM_OPEN, 1, {"method": "flood", "count": str(count), "size": str(size)})
            await up.wait(lambda: any(conn.paused for conn in up.connections), "a pause")
            assert up.sent[1] < count // 2, up.sent[1]
            assert engine.buffered < 16 * 1024 * 1024, engine.buffered
            c.transport.resume_reading()
            flood = await c.until(1, count + 1)
            assert [int(f.attributes.get("n") or -1) for f in flood[:count]] == list(range(count))
            c.frame(STREAM_HALF_CLOSE, 1)
            await until(lambda: streams(engine, "closed") == 1, "the stream closed")
            c.close()
        await up.close()

    run(main())
