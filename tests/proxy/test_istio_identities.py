"""Istio's standard metrics name the TLS identities of a connection as an Istio sidecar's
stats filter does (istio/proxy ``istio_stats``): at the server side (``reporter:
destination``) the client certificate's SPIFFE id, the engine's own and ``mutual_tls``; at
the client side (``reporter: source``) the engine's id and each upstream endpoint's, as
automatic mutual TLS reaches it. Real sockets on 127.0.0.1, a mesh CA as istiod's."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from mesh_pki import ALPN_SIDECAR, SIDECAR_METADATA, MeshCa, spiffe
from proxy_kit import Client, Upstream, address, engine_for, error_type, mesh, run
from test_auto_mtls import in_mesh
from test_mesh_identity import identity
from test_telemetry import KIALI_LABELS, ROUTER, istio_series

from metaprotocol_sdk.proxy import Engine


@pytest.fixture
def ca() -> MeshCa:
    return MeshCa()


def telemetry(reporter: str) -> str:
    return f"telemetry: {{istioMetrics: true, reporter: {reporter}}}\n"


def by_principal(engine: Engine, side: str) -> dict[str, dict[str, str]]:
    """The ``Ok`` series of istio_requests_total by ``side``'s principal."""
    out = {}
    for labels in istio_series(engine):
        assert labels.keys() >= KIALI_LABELS
        if labels["response_code"] == "200":
            assert labels[f"{side}_principal"] not in out, labels
            out[labels[f"{side}_principal"]] = labels
    return out


def client_context(
    ca: MeshCa, tmp: Path, sa: str, ns: str, alpn: list[str] = ALPN_SIDECAR
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=ca.pem.decode())
    ctx.load_cert_chain(*ca.files(tmp / ns, sa, ns=ns))
    ctx.set_alpn_protocols(alpn)
    return ctx


@pytest.mark.parametrize("listener", ["PERMISSIVE", "ISTIO_MUTUAL"])
def test_the_server_side_reports_each_clients_principal_and_mutual_tls(
    ca: MeshCa, tmp_path: Path, listener: str
) -> None:
    """Clients of two identities (and, PERMISSIVE, a plain one) on one listener: each
    request is counted with its client's SPIFFE id as ``source_principal``, the engine's id
    as ``destination_principal`` and ``mutual_tls``; the plain client's with ``unknown`` and
    ``none``. The first client speaks Istio's metadata exchange (a sidecar's ALPN): its
    source labels are its workload's, as it said them; the second offers ALPN ``istio``
    only: Istio's fallback without the exchange, the id's namespace as
    ``source_workload_namespace`` and ``unknown`` for the others. A local reply (no route)
    carries them too."""
    ca.write(tmp_path / "certs", "engine")

    async def main() -> None:
        up = await Upstream("v1").start()
        text = mesh(
            [(up.port, "v1")],
            router=ROUTER,
            proxy=identity(tmp_path / "certs") + telemetry("destination"),
            listener_tls="{mode: ISTIO_MUTUAL}" if listener == "ISTIO_MUTUAL" else "",
        )
        async with engine_for(text) as engine:
            clients = [
                await Client.connect(
                    address(engine), ssl=client_context(ca, tmp_path, sa, ns, alpn)
                )
                for sa, ns, alpn in (
                    ("frontend", "web", ALPN_SIDECAR),
                    ("batch", "jobs", ["istio"]),
                )
            ]
            if listener == "PERMISSIVE":
                clients.append(await Client.connect(address(engine)))
            for n, client in enumerate(clients, 1):
                for _ in range(n):
                    assert error_type(await client.call("get")) is None
            assert error_type(await clients[0].call("nothing")) == "RouteNotFound"
            series = by_principal(engine, "source")
            frontend = series[spiffe("frontend", "web")]
            assert frontend["value"] == "1"
            assert frontend["destination_principal"] == spiffe("engine")
            assert frontend["connection_security_policy"] == "mutual_tls"
            assert frontend["reporter"] == "destination"
            said = SIDECAR_METADATA["LABELS"]
            assert {
                label: frontend[f"source_{label}"]
                for label in (
                    "workload",
                    "workload_namespace",
                    "app",
                    "version",
                    "canonical_service",
                    "canonical_revision",
                    "cluster",
                )
            } == {
                "workload": SIDECAR_METADATA["WORKLOAD_NAME"],
                "workload_namespace": SIDECAR_METADATA["NAMESPACE"],
                "app": said["app"],
                "version": said["version"],
                "canonical_service": said["service.istio.io/canonical-name"],
                "canonical_revision": said["service.istio.io/canonical-revision"],
                "cluster": SIDECAR_METADATA["CLUSTER_ID"],
            }
            batch = series[spiffe("batch", "jobs")]
            assert batch["value"] == "2" and batch["source_workload_namespace"] == "jobs"
            for label in ("source_workload", "source_app", "source_version", "source_cluster"):
                assert batch[label] == "unknown", label
            assert batch["connection_security_policy"] == "mutual_tls"
            if listener == "PERMISSIVE":
                plain = series["unknown"]
                assert plain["value"] == "3"
                assert plain["destination_principal"] == "unknown"
                assert plain["connection_security_policy"] == "none"
                assert plain["source_workload_namespace"] == "unknown"
            else:
                assert len(series) == 2
            (unrouted,) = [s for s in istio_series(engine) if s["response_code"] == "404"]
            assert unrouted["source_principal"] == spiffe("frontend", "web")
            assert unrouted["connection_security_policy"] == "mutual_tls"
            for client in clients:
                client.close()
        await up.close()

    run(main())


def test_the_client_side_reports_each_endpoints_principal_as_auto_mtls_reaches_it(
    ca: MeshCa, tmp_path: Path
) -> None:
    """Automatic mutual TLS to the sidecar's endpoint, plain text to the other: the first's
    requests and TCP series name the engine's id (``source_principal``) and the server
    certificate's (``destination_principal``, its namespace the destination's, as Istio's
    client side does), the other's ``unknown``; ``connection_security_policy`` is
    ``unknown`` at the client side, as in Istio. The request sent while the connection
    was shaking hands is in the TLS connection's bytes."""
    ca.write(tmp_path / "certs", "engine")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(*ca.files(tmp_path / "shop", "greeter", ns="shop"))
    server.load_verify_locations(cadata=ca.pem.decode())
    server.verify_mode = ssl.CERT_REQUIRED
    greeter = spiffe("greeter", "shop")

    async def main() -> None:
        strict = await Upstream("v1").start(ssl=server)
        plain = await Upstream("v2").start()
        text = in_mesh(
            mesh(
                [(strict.port, "v1"), (plain.port, "v2")],
                proxy=identity(tmp_path / "certs") + telemetry("source"),
            ),
            sans=(greeter,),
        )
        async with engine_for(text) as engine:
            client = await Client.connect(address(engine))
            for rid in range(1, 5):
                assert error_type(await client.call("get", rid=rid)) is None
            series = by_principal(engine, "destination")
            tls = series[greeter]
            assert tls["value"] == "2" and tls["destination_version"] == "v1"
            assert tls["source_principal"] == spiffe("engine")
            assert tls["connection_security_policy"] == "unknown"
            assert tls["destination_workload_namespace"] == "shop"
            assert tls["destination_service_namespace"] == "shop"
            clear = series["unknown"]
            assert clear["value"] == "2" and clear["destination_version"] == "v2"
            assert clear["source_principal"] == "unknown"
            assert clear["destination_workload_namespace"] == "default"
            snapshot = engine.stats_snapshot()
            tcp = {
                k: v
                for k, v in snapshot.items()
                if k.startswith("istio_tcp_") and 'destination_version="v1"' in k
            }
            assert tcp and all(f'destination_principal="{greeter}"' in k for k in tcp)
            assert all(f'source_principal="{spiffe("engine")}"' in k for k in tcp)
            assert all('connection_security_policy="unknown"' in k for k in tcp)
            opened = [v for k, v in tcp.items() if "connections_opened" in k]
            sent = [v for k, v in tcp.items() if "sent_bytes" in k]
            frame = len(strict.received[0].frame)
            assert opened == [1] and sent == [2 * frame]
            client.close()
        await strict.close()
        await plain.close()

    run(main())


def test_clients_with_many_certificates_stay_within_max_stats_series(
    ca: MeshCa, tmp_path: Path
) -> None:
    """Principals come from clients: 40 clients of 40 identities against
    ``maxStatsSeries: 120`` make at most that many series (and a few folds), remember at
    most a quarter as many identities, and the requests past the bound are counted in the
    ``overflow`` series: the counts still add up to what the clients sent."""
    ca.write(tmp_path / "certs", "engine")

    async def main() -> None:
        up = await Upstream("v1").start()
        text = mesh(
            [(up.port, "v1")],
            proxy=identity(tmp_path / "certs")
            + telemetry("destination")
            + "limits: {maxStatsSeries: 120}\n",
            listener_tls="{mode: ISTIO_MUTUAL}",
        )
        async with engine_for(text) as engine:
            for i in range(40):
                ctx = client_context(ca, tmp_path, f"sa{i}", f"ns{i}")
                client = await Client.connect(address(engine), ssl=ctx)
                assert error_type(await client.call("get")) is None
                client.close()
            istio = engine.istio
            assert istio is not None
            assert len(istio._identities) <= istio.max_identities == 30
            assert engine.stats.series_count <= 120 + 20
            series = istio_series(engine)
            assert sum(int(s["value"]) for s in series) == 40
            principals = {s["source_principal"] for s in series}
            assert spiffe("sa0", "ns0") in principals and "overflow" in principals
            assert len(principals) < 40
            caches = [
                t.telemetry
                for runtime in engine.listeners.values()
                for route in runtime.table.routes
                for t in route.targets
            ]
            assert sum(len(t.ok) for t in caches if t is not None) <= 31
        await up.close()

    run(main())


def test_the_server_side_reports_its_own_workload_as_the_destination() -> None:
    """With ``reporter: destination`` the engine is the destination workload, as an Istio
    inbound sidecar (istio/proxy ``istio_stats``: the server side takes ``destination_workload``,
    its namespace, ``app``, ``version`` and the canonical labels from its own node): the
    requests it sends to the upstream's v1 and v2 endpoints are one destination, the
    engine's ``telemetry.workload``, not the upstream endpoints' labels."""
    workload = (
        "  workload: {name: gateway-v3, namespace: edge, app: gateway, version: v3,"
        " canonicalService: gateway-svc, canonicalRevision: r3}\n"
    )

    async def main() -> None:
        up1, up2 = await Upstream("v1").start(), await Upstream("v2").start()
        text = mesh(
            [(up1.port, "v1"), (up2.port, "v2")],
            router=ROUTER,  # get: to v1, broken: to v2
            proxy="telemetry:\n  istioMetrics: true\n  reporter: destination\n" + workload,
        )
        async with engine_for(text) as engine:
            client = await Client.connect(address(engine))
            assert error_type(await client.call("get")) is None
            assert error_type(await client.call("broken")) is None
            series = [s for s in istio_series(engine) if s["response_code"] == "200"]
            assert len(series) == 1 and series[0]["value"] == "2", series
            (ok,) = series
            assert ok["destination_workload"] == "gateway-v3"
            assert ok["destination_workload_namespace"] == "edge"
            assert ok["destination_app"] == "gateway"
            assert ok["destination_version"] == "v3"
            assert ok["destination_canonical_service"] == "gateway-svc"
            assert ok["destination_canonical_revision"] == "r3"
            tcp = [
                k for k in engine.stats_snapshot() if k.startswith("istio_tcp_connections_opened")
            ]
            assert tcp and all('destination_version="v3"' in k for k in tcp), tcp
            client.close()
        await up1.close()
        await up2.close()

    run(main())
