"""Istio's TCP metadata exchange (ALPN ``istio-peer-exchange``) on the engine's upstream mesh
connections (``ISTIO_MUTUAL``, explicit or automatic): the engine offers it first, as a
sidecar client does, writes its own workload before its first request and reads the
server's before its first reply; with ``reporter: source`` the server's workload fills the
destination labels of Istio's metrics. Against a sidecar-like server built from the test
helpers (tests/mesh_pki.py: the protobuf library's own Any and Struct) and against the
engine's own mesh listener. Hostile servers too. Real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from mesh_pki import ALPN_SIDECAR, EXCHANGE_MAGIC, MeshCa, exchange_header, spiffe
from proxy_kit import (
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
from test_auto_mtls import in_mesh
from test_mesh_identity import identity, with_sans
from test_telemetry import istio_series

from metaprotocol_sdk import ConfigError
from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.peer_exchange import MAX_HEADER

CLUSTER = "outbound|9000|v1|svc.test"
#: Every request to the endpoint of version v1, without a route timeout.
ROUTER = "- name: all\n  route: [{destination: {host: svc.test, subset: v1}}]\n"
#: The engine's own workload (``reporter: source``: the client side).
CLIENT_WORKLOAD = (
    "telemetry:\n  istioMetrics: true\n  reporter: source\n"
    "  workload: {name: orders, namespace: shop, app: orders, version: v2,\n"
    "             canonicalService: orders, canonicalRevision: v2, cluster: west}\n"
)
#: What the sidecar server says of its workload (its endpoint's labels say other things).
SERVER_METADATA: dict[str, Any] = {
    "NAME": "greeter-6c8d-q7w2e",
    "NAMESPACE": "default",
    "WORKLOAD_NAME": "greeter-v9",
    "CLUSTER_ID": "east",
    "LABELS": {
        "app": "greeter",
        "version": "v9",
        "service.istio.io/canonical-name": "greeter",
        "service.istio.io/canonical-revision": "v9",
    },
}
DESTINATION = {
    "destination_workload": "greeter-v9",
    "destination_app": "greeter",
    "destination_version": "v9",
    "destination_canonical_service": "greeter",
    "destination_canonical_revision": "v9",
    "destination_cluster": "east",
}
#: What the engine's header says of it (CLIENT_WORKLOAD), as a sidecar reads it.
ENGINE_SAID = {
    "NAMESPACE": "shop",
    "WORKLOAD_NAME": "orders",
    "CLUSTER_ID": "west",
    "LABELS": {
        "app": "orders",
        "version": "v2",
        "service.istio.io/canonical-name": "orders",
        "service.istio.io/canonical-revision": "v2",
    },
    "OWNER": "kubernetes://apis/apps/v1/namespaces/shop/deployments/orders",
}


@pytest.fixture
def ca() -> MeshCa:
    return MeshCa()


def client_config(
    ca: MeshCa, tmp: Path, port: int, proxy: str = CLIENT_WORKLOAD, policy: str = ""
) -> str:
    """The engine as a client: ISTIO_MUTUAL (automatic: the endpoint is a sidecar's, or
    ``policy``) to the endpoint on ``port``."""
    if not (tmp / "certs").exists():
        ca.write(tmp / "certs", "orders", ns="shop")
    text = mesh(
        [(port, "v1")],
        router=ROUTER,
        proxy=identity(tmp / "certs") + proxy,
        traffic_policy=policy or "{}",
    )
    return in_mesh(text) if not policy else with_sans(text, spiffe("greeter"))


async def sidecar_server(ca: MeshCa, tmp: Path, exchange: bytes | None) -> Upstream:
    """A KV server behind a sidecar's TLS (ALPN istio-peer-exchange and istio) that writes
    ``exchange`` once it read the client's header (see ``Upstream.exchange``)."""
    up = Upstream("v1")
    up.exchange = exchange
    return await up.start(ssl=ca.server_context(tmp / "server", "greeter", alpn=ALPN_SIDECAR))


def selected_alpn(up: Upstream) -> set[str | None]:
    return {
        c.transport.get_extra_info("ssl_object").selected_alpn_protocol()
        for c in up.connections
        if c.transport is not None
    }


def ok_series(engine: Engine) -> dict[str, str]:
    (series,) = [s for s in istio_series(engine) if s["response_code"] == "200"]
    return series


def tcp_series(engine: Engine, name: str) -> dict[str, int]:
    return {
        k: int(v) for k, v in engine.stats_snapshot().items() if k.startswith(f"istio_tcp_{name}")
    }


@pytest.mark.parametrize("mode", ["auto", "ISTIO_MUTUAL"])
def test_the_engine_and_a_sidecar_server_exchange_their_workloads(
    ca: MeshCa, tmp_path: Path, mode: str
) -> None:
    """The engine offers istio-peer-exchange first; the server selects it, reads the engine's
    workload (before the first request's bytes) and says its own, which names the
    destination of the engine's series (requests and TCP), over the endpoint's labels."""

    async def main() -> None:
        up = await sidecar_server(ca, tmp_path, exchange_header(SERVER_METADATA))
        policy = "{tls: {mode: ISTIO_MUTUAL}}" if mode == "ISTIO_MUTUAL" else ""
        async with engine_for(client_config(ca, tmp_path, up.port, policy=policy)) as engine:
            client = await Client.connect(address(engine))
            for rid in (1, 2):
                reply = await client.call("get", rid=rid)
                assert reply.request_id == rid and error_type(reply) is None, reply
            assert selected_alpn(up) == {"istio-peer-exchange"}
            (said,) = up.peers
            metadata = said["x-envoy-peer-metadata"]
            assert {k: metadata[k] for k in ENGINE_SAID} == ENGINE_SAID
            assert len(up.received) == 2  # the header was no request of the server's
            series = ok_series(engine)
            assert series["value"] == "2"
            assert {k: series[k] for k in DESTINATION} == DESTINATION
            assert series["destination_principal"] == spiffe("greeter")
            assert series["source_workload"] == "orders"
            opened = tcp_series(engine, "connections_opened")
            assert list(opened.values()) == [1]
            (key,) = opened
            assert 'destination_workload="greeter-v9"' in key
            assert 'destination_cluster="east"' in key
            (sent,) = tcp_series(engine, "sent_bytes").values()
            assert sent == sum(len(m.frame) for m in up.received)
            (received,) = tcp_series(engine, "received_bytes").values()
            assert 0 < received < len(exchange_header(SERVER_METADATA))  # replies, no header
            client.close()
        await up.close()

    run(main())


def test_the_engine_as_client_and_as_server_exchange_workloads(ca: MeshCa, tmp_path: Path) -> None:
    """Engine to engine: the client engine's ISTIO_MUTUAL reaches the server engine's mesh
    listener; each reports the other's workload (reporter source: the destination's; reporter
    destination: the source's)."""
    server_workload = (
        "telemetry:\n  istioMetrics: true\n  reporter: destination\n"
        "  workload: {name: greeter-v9, namespace: default, app: greeter, version: v9,\n"
        "             canonicalService: greeter, canonicalRevision: v9, cluster: east}\n"
    )
    ca.write(tmp_path / "server-certs", "greeter")

    async def main() -> None:
        up = await Upstream("v1").start()
        server_text = mesh(
            [(up.port, "v1")],
            router=ROUTER,
            proxy=identity(tmp_path / "server-certs") + server_workload,
            listener_tls="{mode: ISTIO_MUTUAL}",
        )
        async with engine_for(server_text) as server:
            port = address(server)[1]
            text = client_config(ca, tmp_path, port, policy="{tls: {mode: ISTIO_MUTUAL}}")
            async with engine_for(text) as engine:
                client = await Client.connect(address(engine))
                assert error_type(await client.call("get")) is None
                series = ok_series(engine)
                assert {k: series[k] for k in DESTINATION} == DESTINATION
                inbound = ok_series(server)
                assert inbound["source_workload"] == "orders"
                assert inbound["source_app"] == "orders" and inbound["source_cluster"] == "west"
                assert inbound["source_principal"] == spiffe("orders", "shop")
                (downstream,) = server.downstreams
                assert downstream.transport is not None
                ssl_object = downstream.transport.get_extra_info("ssl_object")
                assert ssl_object.selected_alpn_protocol() == "istio-peer-exchange"
                client.close()
        await up.close()

    run(main())


def test_a_server_that_says_its_workload_before_reading_the_engines(
    ca: MeshCa, tmp_path: Path
) -> None:
    """A server that writes its header as the connection is accepted, before any byte of
    the engine's: read all the same."""

    async def main() -> None:
        up = await sidecar_server(ca, tmp_path, b"")
        up.greeting = exchange_header(SERVER_METADATA)
        async with engine_for(client_config(ca, tmp_path, up.port)) as engine:
            client = await Client.connect(address(engine))
            assert error_type(await client.call("get")) is None
            assert len(up.peers) == 1
            assert {k: ok_series(engine)[k] for k in DESTINATION} == DESTINATION
            client.close()
        await up.close()

    run(main())


def test_a_server_whose_replies_come_first_is_served_by_the_endpoints_labels(
    ca: MeshCa, tmp_path: Path
) -> None:
    """A server that selects the exchange but answers without a header of its own: its
    bytes are its codec's (as Envoy's filter passes them on), and the destination labels
    are the endpoint's."""

    async def main() -> None:
        up = await sidecar_server(ca, tmp_path, b"")
        async with engine_for(client_config(ca, tmp_path, up.port)) as engine:
            client = await Client.connect(address(engine))
            for rid in (1, 2, 3):
                assert error_type(await client.call("get", rid=rid)) is None
            assert selected_alpn(up) == {"istio-peer-exchange"} and len(up.peers) == 1
            series = ok_series(engine)
            assert series["value"] == "3" and series["destination_version"] == "v1"
            assert series["destination_cluster"] == "west"  # the engine's (Istio's fallback)
            client.close()
        await up.close()

    run(main())


def test_a_server_header_in_pieces_and_a_malformed_one(ca: MeshCa, tmp_path: Path) -> None:
    """The server's header in a write per byte, then a reply: read whole. A malformed
    header (a length past its end): the connection is served without its labels."""
    header = exchange_header(SERVER_METADATA)

    async def main() -> None:
        up = await sidecar_server(ca, tmp_path, b"")
        async with engine_for(client_config(ca, tmp_path, up.port)) as engine:
            client = await Client.connect(address(engine))
            pending = asyncio.ensure_future(client.call("slow", rid=5))
            await until(lambda: len(up.received) == 1, "the request")
            (conn,) = up.connections
            assert conn.transport is not None
            for byte in header:
                conn.transport.write(bytes([byte]))
            up.release.set()
            assert error_type(await pending) is None
            assert {k: ok_series(engine)[k] for k in DESTINATION} == DESTINATION
            client.close()
        await up.close()
        body = b"\x0a\xff\xff\xff\xff\x0f" + bytes(20)  # a length past the end
        bad = await sidecar_server(
            ca, tmp_path, struct.pack(">II", EXCHANGE_MAGIC, len(body)) + body
        )
        async with engine_for(client_config(ca, tmp_path, bad.port)) as engine:
            client = await Client.connect(address(engine))
            assert error_type(await client.call("get")) is None
            assert ok_series(engine)["destination_version"] == "v1"
            client.close()
        await bad.close()

    run(main())


def test_a_server_header_above_its_bound_resets_the_connection(ca: MeshCa, tmp_path: Path) -> None:
    """A server announcing a header above MAX_HEADER bytes: the connection is reset at once
    (counted ``peer_exchange``), its requests answered ``BadResponse``, nothing buffered."""

    async def main() -> None:
        up = await sidecar_server(
            ca, tmp_path, struct.pack(">II", EXCHANGE_MAGIC, MAX_HEADER + 1) + b"x" * 100
        )
        async with engine_for(client_config(ca, tmp_path, up.port)) as engine:
            client = await Client.connect(address(engine))
            assert error_type(await client.call("get")) == "BadResponse"
            closed = engine.stats.get(
                "metaprotocol_upstream_connections_closed_total",
                cluster=CLUSTER,
                reason="peer_exchange",
            )
            assert closed == 1
            assert engine.buffered == 0
            client.close()
        await up.close()

    run(main())


def test_a_partial_server_header_is_budgeted_and_closed_at_the_frame_timeout(
    ca: MeshCa, tmp_path: Path
) -> None:
    """Half a header and nothing more: held as a partial reply (in the buffer budget) and
    closed at ``timeouts.frame`` (``frame_timeout``), its request answered."""
    half = exchange_header(SERVER_METADATA)[:40]
    proxy = "timeouts: {frame: 0.3s, idle: 60s}\n" + CLIENT_WORKLOAD

    async def main() -> None:
        up = await sidecar_server(ca, tmp_path, half)
        async with engine_for(client_config(ca, tmp_path, up.port, proxy=proxy)) as engine:
            client = await Client.connect(address(engine))
            pending = asyncio.ensure_future(client.call("hang"))
            await until(lambda: engine.buffered >= len(half), "the half header held")
            reply = await pending
            assert error_type(reply) == "UpstreamReset"
            closed = engine.stats.get(
                "metaprotocol_upstream_connections_closed_total",
                cluster=CLUSTER,
                reason="frame_timeout",
            )
            assert closed == 1 and engine.buffered == 0
            client.close()
        await up.close()

    run(main())


def test_a_server_that_closes_within_its_header(ca: MeshCa, tmp_path: Path) -> None:
    """Half a header, then the server closes: the request is answered ``UpstreamReset``,
    what the header held released, and the connection counted (opened and closed) in the
    TCP series of the endpoint's labels, the server having said no workload."""
    half = exchange_header(SERVER_METADATA)[:40]

    async def main() -> None:
        up = await sidecar_server(ca, tmp_path, half)
        async with engine_for(client_config(ca, tmp_path, up.port)) as engine:
            client = await Client.connect(address(engine))
            assert error_type(await client.call("close")) == "UpstreamReset"
            assert len(up.peers) == 1  # the exchange was selected: the engine's header read
            await until(lambda: not engine.upstreams, "the connection's end")
            assert engine.buffered == 0
            for name in ("connections_opened", "connections_closed"):
                ((key, value),) = tcp_series(engine, name).items()
                assert value == 1 and 'destination_version="v1"' in key, key
            client.close()
        await up.close()

    run(main())


def test_istio_metrics_off_still_say_the_engines_workload(ca: MeshCa, tmp_path: Path) -> None:
    """Without Istio's metrics the engine still speaks the exchange (the server's sidecar
    reports the engine's workload, as istiod's clusters offer it whatever the telemetry);
    the server's header is skipped, unread."""

    async def main() -> None:
        up = await sidecar_server(ca, tmp_path, exchange_header(SERVER_METADATA))
        async with engine_for(client_config(ca, tmp_path, up.port, proxy="")) as engine:
            client = await Client.connect(address(engine))
            for rid in (1, 2):
                assert error_type(await client.call("get", rid=rid)) is None
            assert len(up.peers) == 1 and len(up.received) == 2
            assert istio_series(engine) == []
            client.close()
        await up.close()

    run(main())


def test_a_cluster_whose_control_plane_turned_the_exchange_off_offers_istio_alone(
    ca: MeshCa, tmp_path: Path
) -> None:
    """istiod with its metadata exchange off writes ALPN ``istio`` alone on the cluster
    (the translation's ``peer_exchange`` false): the engine offers that, and a sidecar
    server selects ``istio``; no header either way."""

    async def main() -> None:
        up = await sidecar_server(ca, tmp_path, exchange_header(SERVER_METADATA))
        text = client_config(ca, tmp_path, up.port, policy="{tls: {mode: ISTIO_MUTUAL}}")
        config = loads_config(text, "test.yaml")
        rule = config.destination_rules["svc.test"]
        assert rule.policy.tls is not None and rule.policy.tls.peer_exchange
        tls = replace(rule.policy.tls, peer_exchange=False)  # as the translation writes it
        subsets = {
            name: replace(subset, policy=replace(subset.policy, tls=tls))
            for name, subset in rule.subsets.items()
        }
        rule = replace(rule, policy=replace(rule.policy, tls=tls), subsets=subsets)
        engine = Engine(replace(config, destination_rules={"svc.test": rule}))
        await engine.start()
        try:
            client = await Client.connect(address(engine))
            assert error_type(await client.call("get")) is None
            assert selected_alpn(up) == {"istio"} and up.peers == []
            assert ok_series(engine)["destination_version"] == "v1"
            assert engine.admin_address is not None
            _, body = await http_get(engine.admin_address, "/config_dump")
            (dumped,) = [c for c in json.loads(body)["clusters"] if c["name"] == CLUSTER]
            assert dumped["tls"]["peerExchange"] is False
            client.close()
        finally:
            await engine.stop(drain=1.0)
        await up.close()

    run(main())


def test_the_translations_key_is_refused_in_a_file(ca: MeshCa, tmp_path: Path) -> None:
    """The key the xDS translation turns the exchange off with is not a file's."""
    ca.write(tmp_path / "certs", "orders", ns="shop")
    policy = '{tls: {mode: ISTIO_MUTUAL, "xds.metaprotocol.io/peerExchange": false}}'
    text = mesh([(1, "v1")], traffic_policy=policy, proxy=identity(tmp_path / "certs"))
    with pytest.raises(ConfigError, match=r"xds\.metaprotocol\.io/peerExchange: unknown field"):
        loads_config(text, "test.yaml")
