"""Streams where they meet the mesh features: mutual TLS and PERMISSIVE detection,
AuthorizationPolicies (enforced and dry run) judging a ``Stream_Init``, the access log, Istio's
standard metrics, the admin endpoint; over real sockets on 127.0.0.1 with the KV stream
server and client of ``test_streams``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mesh_pki import MeshCa
from proxy_kit import address, engine_for, error_type, mesh, refusing_port, run, until
from test_authorization import config, policy, rbac
from test_streams import LISTENER, StreamClient, StreamServer, active, kinds, streams

from metaprotocol_sdk.examples.kv import STREAM_DATA, STREAM_HALF_CLOSE, STREAM_OPEN
from metaprotocol_sdk.proxy import Engine


@pytest.fixture
def ca() -> MeshCa:
    return MeshCa()


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
