"""Aeraki's MetaRDS and istiod's CDS/EDS resources as the engine's validated configuration."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trustme
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from snapshots import (
    ALL,
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    HOST,
    MESH_CLUSTERS,
    RDS_NAME,
    ROUTE_TYPE,
    V1,
    V2,
    MetaRoute,
    auto_mtls_cluster,
    cluster,
    dns_cluster,
    failover_snapshot,
    headless_cluster,
    hello_snapshots,
    istio_mutual_socket,
    istiod_pool_options,
    load_assignment,
    mark_sidecars,
    refused_route,
    route_configuration,
    tls_cluster,
    tls_socket,
)

from metaprotocol_sdk.errors import ConfigError
from metaprotocol_sdk.proxy.config import loads_config
from metaprotocol_sdk.proxy.config.loader import build_config
from metaprotocol_sdk.proxy.config.models import (
    AttributeMatch,
    Config,
    ConnectionPool,
    LoadBalancer,
    TrafficPolicy,
    UpstreamTls,
    Warmup,
    locality_weight_label,
    priority_label,
)
from metaprotocol_sdk.proxy.engine import Engine
from metaprotocol_sdk.proxy.workers import WorkerSpec
from metaprotocol_sdk.proxy.xds.translate import (
    INTERNAL_ADDRESS,
    Resources,
    XdsRefused,
    eds_names,
    parse_cluster_name,
    route_config_names,
    translate,
)

BASE = """
kind: ServiceEntry
metadata: {name: hello, namespace: demo}
spec:
  hosts: [hello.svc]
  ports: [{number: 9090, name: tcp-metaprotocol-thrift-hello}]
  endpoints: [{address: 127.0.0.9}]
---
kind: ProxyConfig
metadata: {name: proxy}
spec:
  listeners: [{host: hello.svc, port: 9090, bind: "127.0.0.1:0"}]
  xds: {address: "127.0.0.1:15010"}
"""


def base() -> Config:
    return loads_config(BASE)


def resources(snapshot: dict[str, list[Any]]) -> Resources:
    def named(items: list[Any]) -> dict[str, Any]:
        return {i.cluster_name if hasattr(i, "cluster_name") else i.name: i for i in items}

    return Resources(
        routes=named(snapshot.get(ROUTE_TYPE, [])),
        clusters=named(snapshot.get(CLUSTER_TYPE, [])),
        endpoints=named(snapshot.get(ENDPOINT_TYPE, [])),
    )


EPS1 = [("127.0.0.1", 20001), ("127.0.0.1", 20002)]
EPS2 = [("127.0.0.1", 20003)]


def snapshot(index: int = 0) -> dict[str, list[Any]]:
    return hello_snapshots(EPS1, EPS2)[index][1]


def with_routes(*routes: MetaRoute, clusters: list[Any] | None = None) -> Resources:
    snap = snapshot()
    snap[ROUTE_TYPE] = [route_configuration(RDS_NAME, list(routes))]
    if clusters is not None:
        snap[CLUSTER_TYPE] = clusters
    return resources(snap)


def refusal(res: Resources, config: Config | None = None) -> str:
    with pytest.raises((XdsRefused, ConfigError)) as info:
        translate(config or base(), res)
    return str(info.value)


def test_names() -> None:
    assert route_config_names(base()) == ["hello.svc_9090"]
    assert str(parse_cluster_name("outbound|9090|v1|hello.svc")) == "outbound|9090|v1|hello.svc"
    for other in ("inbound|9090||hello.svc", "BlackHoleCluster", "outbound|x||h", "outbound|0||h"):
        assert parse_cluster_name(other) is None
    assert eds_names(snapshot()[CLUSTER_TYPE]) == sorted([ALL, V1, V2])


@pytest.mark.parametrize(
    "port",
    ["9" * 5000, "\uff19\uff10\uff19\uff10", "09090"],
    ids=["5000-digits", "fullwidth", "leading-zero"],
)
def test_a_cluster_name_whose_port_is_not_ascii_digits_is_no_istio_name(port: str) -> None:
    """A port of more than 4300 digits made ``int`` raise ``ValueError``: no NACK, a
    traceback and a reconnect per push; fullwidth digits and a leading zero read as 9090, a
    second name for the cluster of port 9090. Now the name is not an Istio name: a route to
    it is NACKed saying so, a cluster of it is held unused."""
    name = f"outbound|{port}||{HOST}"
    assert parse_cluster_name(name) is None
    detail = refusal(with_routes(MetaRoute("odd", [(name, 100)])))
    assert "is not an Istio name outbound|<port>|<subset>|<host>" in detail, detail
    snap = snapshot()
    snap[CLUSTER_TYPE].append(cluster(ALL))
    snap[CLUSTER_TYPE][-1].name = name
    unused: list[str] = []
    translate(base(), resources(snap), unused=unused)


def test_istiod_clusters_and_endpoints() -> None:
    config = translate(base(), resources(snapshot(3)))
    service = config.services["hello.svc"]
    assert service.namespace == "demo"  # the file's ServiceEntry still names the namespace
    assert service.ports[9090].protocol == "thrift"
    # The file's endpoint (127.0.0.9) is replaced by EDS; version 4 has one v1 endpoint left.
    got = sorted(
        (e.address, e.port_for(service.ports[9090]), tuple(e.labels)) for e in service.endpoints
    )
    assert got == [
        ("127.0.0.1", 20002, ("xds.metaprotocol.io/subset-v1",)),
        ("127.0.0.1", 20003, ("xds.metaprotocol.io/subset-v2",)),
    ]
    rule = config.destination_rules["hello.svc"]
    assert sorted(rule.subsets) == ["v1", "v2"]
    assert rule.policy.connection_pool is not None
    assert rule.policy.connection_pool.connect_timeout == 10.0
    # istiod's "unlimited" thresholds (2^32 - 1) set no limit.
    assert rule.policy.connection_pool.max_connections is None


def _outlier(**fields: int) -> Any:
    """The whole-service cluster of snapshot 3 with ``outlier_detection`` as ``fields`` say
    (``wrapper=value``; ``interval_s`` for the interval), as istiod writes it."""
    snap = snapshot(3)
    c = next(c for c in snap[CLUSTER_TYPE] if c.name == ALL)
    od = c.outlier_detection
    od.SetInParent()
    for key, value in fields.items():
        if key == "interval_s":
            od.interval.seconds = value
        else:
            getattr(od, key).value = value
    return translate(base(), resources(snap)).destination_rules["hello.svc"].policy


def test_istiod_outlier_detection_is_read_as_istio_meant_it() -> None:
    """istiod writes enforcing_success_rate 0 on every cluster with outlier detection (it was
    refused: any DestinationRule with outlierDetection was NACKed), each enforcing field 0
    or 100 for an Istio field off or on (consecutive5xxErrors: 0 became Envoy's default, 5,
    on), and Envoy's defaults hold for what it leaves out (an empty outlier_detection
    ejects after 5 errors in a row: it became no detection)."""
    # Istio {consecutive5xxErrors: 0, consecutiveGatewayErrors: 3, interval: 5s}
    got = _outlier(
        enforcing_success_rate=0,
        consecutive_5xx=0,
        enforcing_consecutive_5xx=0,
        consecutive_gateway_failure=3,
        enforcing_consecutive_gateway_failure=100,
        interval_s=5,
    ).outlier_detection
    assert got is not None
    assert (got.consecutive_errors, got.consecutive_gateway_errors, got.interval) == (None, 3, 5.0)
    # Istio {consecutive5xxErrors: 7}
    got = _outlier(
        enforcing_success_rate=0, consecutive_5xx=7, enforcing_consecutive_5xx=100
    ).outlier_detection
    assert got is not None and (got.consecutive_errors, got.consecutive_gateway_errors) == (7, None)
    # Istio {} (and Envoy's outlier_detection {}): 5 in a row, Envoy's and Istio's default
    for fields in ({"enforcing_success_rate": 0}, {}):
        got = _outlier(**fields).outlier_detection
        assert got is not None and got.consecutive_errors == 5
    # Envoy's enforcing_consecutive_gateway_failure without the count: its default, 5
    got = _outlier(enforcing_consecutive_gateway_failure=100).outlier_detection
    assert got is not None and got.consecutive_gateway_errors == 5
    # Success-rate ejection on: refused, naming the field
    snap = snapshot(3)
    next(
        c for c in snap[CLUSTER_TYPE] if c.name == ALL
    ).outlier_detection.enforcing_success_rate.value = 100
    assert "outlier_detection.enforcing_success_rate" in refusal(resources(snap))


def test_istiod_split_local_origin_errors() -> None:
    """Istio's splitExternalLocalOriginErrors (istiod: split_external_local_origin_errors,
    consecutive_local_origin_failure with enforcing 100 when set, local-origin success rate
    0) was refused; now local-origin failures are counted apart, Envoy's default 5."""
    snap = snapshot(3)
    c = next(c for c in snap[CLUSTER_TYPE] if c.name == ALL)
    od = c.outlier_detection
    od.split_external_local_origin_errors = True
    od.enforcing_local_origin_success_rate.value = 0

    def detection() -> Any:
        rule = translate(base(), resources(snap)).destination_rules["hello.svc"]
        return rule.policy.outlier_detection

    got = detection()
    assert (got.split_local_origin, got.consecutive_local_origin_failures) == (True, 5)
    od.consecutive_local_origin_failure.value = 3
    od.enforcing_consecutive_local_origin_failure.value = 100
    assert detection().consecutive_local_origin_failures == 3
    od.enforcing_consecutive_local_origin_failure.value = 0
    assert "enforcing_consecutive_local_origin_failure: not supported" in refusal(resources(snap))
    od.enforcing_consecutive_local_origin_failure.value = 100
    od.enforcing_local_origin_success_rate.value = 100
    assert "enforcing_local_origin_success_rate: not supported" in refusal(resources(snap))


def test_istiod_connection_pool_options_are_read_where_istiod_writes_them() -> None:
    """istiod writes a rule's http.idleTimeout, maxRequestsPerConnection and
    tcp.maxConnectionDuration in the HttpProtocolOptions of typed_extension_protocol_options,
    and tcp.tcpKeepalive in upstream_connection_options: all four were ignored. Another
    extension's options are refused, naming the key."""
    snap = snapshot(3)
    c = next(c for c in snap[CLUSTER_TYPE] if c.name == ALL)
    istiod_pool_options(c, idle_s=30, max_requests=100, keepalive=(4, 120, 15))
    key = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    options = http_protocol_options_pb2.HttpProtocolOptions()
    c.typed_extension_protocol_options[key].Unpack(options)
    options.common_http_protocol_options.max_connection_duration.seconds = 3600
    c.typed_extension_protocol_options[key].Pack(options)
    pool = translate(base(), resources(snap)).destination_rules["hello.svc"].policy.connection_pool
    assert pool is not None and pool.keepalive is not None
    assert (pool.idle_timeout, pool.max_requests_per_connection) == (30.0, 100)
    assert pool.max_connection_duration == 3600.0
    assert (pool.keepalive.probes, pool.keepalive.time, pool.keepalive.interval) == (4, 120, 15)
    other = "envoy.extensions.upstreams.tcp.v3.TcpProtocolOptions"
    c.typed_extension_protocol_options[other].CopyFrom(c.typed_extension_protocol_options[key])
    assert f"typed_extension_protocol_options[{other!r}]" in refusal(resources(snap))
    del c.typed_extension_protocol_options[other]
    c.common_lb_config.healthy_panic_threshold.value = 12.5
    c.outlier_detection.consecutive_5xx.value = 3
    assert "common_lb_config.healthy_panic_threshold" in refusal(resources(snap))


def test_max_concurrent_streams_is_read_where_istiod_writes_it() -> None:
    """istiod writes ``http.maxConcurrentStreams`` as the HTTP/2 options'
    ``max_concurrent_streams`` (in ``explicit_http_config`` of the cluster's
    HttpProtocolOptions): read as the pool's, Envoy's default (2^31 - 1) as no limit, and
    the rest of the HTTP/2 settings ignored as before (a MetaProtocol connection has none)."""
    snap = snapshot(3)
    c = next(c for c in snap[CLUSTER_TYPE] if c.name == ALL)
    key = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

    def pool_with(streams: int) -> ConnectionPool | None:
        options = http_protocol_options_pb2.HttpProtocolOptions()
        h2 = options.explicit_http_config.http2_protocol_options
        h2.max_concurrent_streams.value = streams
        h2.initial_stream_window_size.value = 65536  # an HTTP/2 setting: nothing here
        c.typed_extension_protocol_options[key].Pack(options)
        rules = translate(base(), resources(snap)).destination_rules
        return rules["hello.svc"].policy.connection_pool

    pool = pool_with(16)
    assert pool is not None and pool.max_concurrent_streams == 16
    default = pool_with(2**31 - 1)  # Envoy's default: no limit
    assert default is not None and default.max_concurrent_streams is None


def test_a_balancer_s_own_settings_as_istiod_writes_them() -> None:
    """istiod writes ring_hash_lb_config (a minimum ring size of 1024) on every cluster of a
    consistentHash rule: it was refused, so any such rule was NACKed. Sizes and choice counts
    are accepted; slow start is read as Istio's warmup (see the next test)."""
    snap = snapshot(3)
    c = next(c for c in snap[CLUSTER_TYPE] if c.name == ALL)
    c.lb_policy = cluster_pb2.Cluster.RING_HASH
    c.ring_hash_lb_config.minimum_ring_size.value = 1024
    translate(base(), resources(snap))
    c.lb_policy = cluster_pb2.Cluster.LEAST_REQUEST
    c.ClearField("ring_hash_lb_config")
    c.least_request_lb_config.choice_count.value = 2
    translate(base(), resources(snap))


def test_slow_start_as_istiod_writes_it_is_istio_s_warmup() -> None:
    """istiod writes a rule's warmup as slow_start_config in round_robin_lb_config or
    least_request_lb_config (aggression as a RuntimeDouble with runtime key "(", the minimum
    as a Percent): it was refused, NACKing the clusters. It is the cluster's warmup now, read
    as Envoy reads it: from its own policy's config only, the window in whole milliseconds
    (under 1ms: off), an aggression not above 0 as 1.0; a minimum above 100% is refused."""

    def warmup_of(snap: dict[str, list[Any]]) -> Warmup | None:
        return (
            translate(base(), resources(snap)).destination_rules["hello.svc"].load_balancer.warmup
        )

    snap = snapshot(3)
    c = next(c for c in snap[CLUSTER_TYPE] if c.name == ALL)
    c.lb_policy = cluster_pb2.Cluster.LEAST_REQUEST
    ss = c.least_request_lb_config.slow_start_config
    ss.slow_start_window.seconds = 60
    ss.aggression.default_value = 2.0
    ss.aggression.runtime_key = "("
    ss.min_weight_percent.value = 5
    assert warmup_of(snap) == Warmup(60.0, 5.0, 2.0)
    ss.slow_start_window.seconds, ss.slow_start_window.nanos = 0, 1_500_000  # 1.5ms: 1ms
    ss.aggression.default_value = -1
    ss.ClearField("min_weight_percent")
    assert warmup_of(snap) == Warmup(0.001, 10.0, 1.0)
    ss.slow_start_window.nanos = 999_999  # Envoy's window is 0 ms: no slow start
    assert warmup_of(snap) is None
    ss.slow_start_window.seconds = 30
    c.lb_policy = cluster_pb2.Cluster.ROUND_ROBIN  # Envoy reads round_robin_lb_config only
    assert warmup_of(snap) is None
    c.round_robin_lb_config.slow_start_config.slow_start_window.seconds = 45
    assert warmup_of(snap) == Warmup(45.0)
    c.lb_policy = cluster_pb2.Cluster.RANDOM
    assert warmup_of(snap) is None
    c.lb_policy = cluster_pb2.Cluster.ROUND_ROBIN
    c.round_robin_lb_config.slow_start_config.min_weight_percent.value = 150
    assert "minimumPercent" in refusal(resources(snap))


def test_a_dns_cluster_as_istiod_writes_it() -> None:
    """istiod writes typed_dns_resolver_config (c-ares settings) and dns_jitter on the
    cluster of every ServiceEntry with resolution DNS: both were refused, so such a host
    (routed to or not: CDS names every service of the mesh) NACKed the clusters."""
    name = "localhost"
    res = with_routes(
        MetaRoute("r", [(ALL, 100)]), clusters=[dns_cluster(ALL, [(name, 20001), (name, 20002)])]
    )
    res = Resources(routes=res.routes, clusters=res.clusters)
    service = translate(base(), res).services["hello.svc"]
    assert sorted((e.address, e.port_for(service.ports[9090])) for e in service.endpoints) == [
        (name, 20001),
        (name, 20002),
    ]


def test_the_engine_settings_stay_those_given_not_those_of_the_documents() -> None:
    # A worker of --workers N serves the files with the shared ports, a private admin
    # endpoint and its own node metadata; an update must not rebind it to the files' ":0".
    given = WorkerSpec(1, {"hello.svc:9090": 41000}).apply(base())
    config = translate(given, resources(snapshot(1)))
    assert config.proxy == given.proxy
    assert [lsn.bind_port for lsn in config.proxy.listeners] == [41000]
    assert config.proxy.xds is not None
    assert config.proxy.xds.node.metadata["METAPROTOCOL_WORKER"] == "1"


def test_aeraki_routes() -> None:
    res = with_routes(
        MetaRoute(
            "all-kinds",
            [(V1, 30), (V2, 70)],
            exact={"method": "sayHello"},
            prefix={"interface": "org.apache"},
            regex={"version": "v[0-9]+"},
            present=["x-user"],
            request_mutation={"x-a": "1"},
            response_mutation={"x-b": "2"},
            mirror=(ALL, 12.5),
        ),
        MetaRoute("rest", [(ALL, 100)]),
    )
    router = translate(base(), res).routers["hello.svc"]
    first, rest = router.routes
    assert set(first.match) == {
        AttributeMatch("method", "exact", "sayHello"),
        AttributeMatch("interface", "prefix", "org.apache"),
        AttributeMatch("version", "regex", "v[0-9]+"),
        AttributeMatch("x-user", "present"),
    }
    assert [(d.subset, d.port, d.weight) for d in first.destinations] == [
        ("v1", 9090, 30),
        ("v2", 9090, 70),
    ]
    assert first.request_mutation == {"x-a": "1"}
    assert first.response_mutation == {"x-b": "2"}
    assert first.mirror is not None and first.mirror.percent == 12.5
    assert first.mirror.destination.subset is None
    assert rest.match == () and [d.subset for d in rest.destinations] == [None]


def test_hash_policy_makes_a_ring_hash_cluster_consistent() -> None:
    clusters = [cluster(ALL, lb=cluster_pb2.Cluster.RING_HASH), cluster(V1), cluster(V2)]
    res = with_routes(MetaRoute("h", [(ALL, 100)], hash_header="x-user"), clusters=clusters)
    lb = translate(base(), res).destination_rules["hello.svc"].load_balancer
    assert (lb.policy, lb.hash_attribute) == ("CONSISTENT_HASH", "x-user")
    # Ring hash with no hash policy: Envoy picks at random, and so does the engine.
    res = with_routes(MetaRoute("h", [(ALL, 100)]), clusters=clusters)
    assert translate(base(), res).destination_rules["hello.svc"].load_balancer.policy == "RANDOM"


def test_a_ring_s_sizes_and_maglev_s_table_are_applied() -> None:
    """The ring's minimum and maximum size and Maglev's table size were read and ignored (the
    engine had one ring of 100 points per host): now they size the balancer, within the
    engine's bounds, and a route's source IP hash policy is Istio's useSourceIp."""
    ring, maglev = cluster_pb2.Cluster.RING_HASH, cluster_pb2.Cluster.MAGLEV
    clusters = [cluster(ALL, lb=ring), cluster(V1), cluster(V2)]
    res = with_routes(MetaRoute("h", [(ALL, 100)], hash_header="x-user"), clusters=clusters)
    config = clusters[0].ring_hash_lb_config

    def balancer() -> LoadBalancer:
        lb = translate(base(), res).destination_rules["hello.svc"].load_balancer
        assert lb is not None
        return lb

    assert (balancer().ring_size, balancer().ring_maximum) == (1024, None)  # Envoy's default
    config.minimum_ring_size.value = 4096
    config.maximum_ring_size.value = 8192
    assert (balancer().ring_size, balancer().ring_maximum) == (4096, 8192)
    config.maximum_ring_size.value = 2048
    assert "maximum_ring_size: 2048 is less than minimum_ring_size 4096" in refusal(res)
    config.ClearField("maximum_ring_size")
    config.minimum_ring_size.value = 8388608
    assert "ring_hash_lb_config.minimum_ring_size: at most 131072 points" in refusal(res)
    clusters[0].ClearField("ring_hash_lb_config")
    clusters[0].lb_policy = maglev
    assert balancer().maglev_table_size == 65537  # Envoy's default
    clusters[0].maglev_lb_config.table_size.value = 1021
    assert balancer() == LoadBalancer("CONSISTENT_HASH", "x-user", maglev_table_size=1021)
    for bad in (1024, 5000011):
        clusters[0].maglev_lb_config.table_size.value = bad
        assert "maglev_lb_config.table_size: must be a prime of at most 131071" in refusal(res)
    clusters[0].maglev_lb_config.table_size.value = 1021
    # The source IP: Envoy's connection_properties hash policy.
    action = res.routes[RDS_NAME].virtual_hosts[0].routes[0].route
    action.hash_policy[0].ClearField("header")
    action.hash_policy[0].connection_properties.source_ip = True
    assert balancer() == LoadBalancer("CONSISTENT_HASH", None, maglev_table_size=1021)
    action.hash_policy[0].connection_properties.source_ip = False
    assert "connection_properties.source_ip: false hashes nothing" in refusal(res)
    # A hash policy with no key, or a header without a name (Envoy's validation NACKs
    # both): each hashed the attribute '' and went round robin, silently.
    action.hash_policy[0].ClearField("connection_properties")
    assert "hash_policy[0]: hashes nothing: set header or connection_properties" in refusal(res)
    action.hash_policy[0].header.header_name = ""
    assert "hash_policy[0]: hashes nothing: set header or connection_properties" in refusal(res)


def test_aeraki_s_hash_policy_per_weighted_destination() -> None:
    """Aeraki writes one hash policy per weighted destination whose DestinationRule subset has
    a consistentHash: a split between two subsets hashing on one header repeats it, which
    was refused ("one hash policy per route"). Two different headers are still refused."""
    ring = cluster_pb2.Cluster.RING_HASH
    clusters = [cluster(ALL), cluster(V1, lb=ring), cluster(V2, lb=ring)]
    res = with_routes(MetaRoute("h", [(V1, 50), (V2, 50)], hash_header="x-user"), clusters=clusters)
    action = res.routes[RDS_NAME].virtual_hosts[0].routes[0].route
    assert [hp.header.header_name for hp in action.hash_policy] == ["x-user", "x-user"]
    rule = translate(base(), res).destination_rules["hello.svc"]
    for subset in ("v1", "v2"):
        lb = rule.subsets[subset].policy.load_balancer
        assert (lb.policy, lb.hash_attribute) == ("CONSISTENT_HASH", "x-user")
    action.hash_policy[1].header.header_name = "x-tenant"
    assert "hash_policy[1]: hashes on 'x-tenant' and 'x-user'" in refusal(res)


def test_unsubscribed_and_non_outbound_resources_are_ignored() -> None:
    snap = snapshot()
    snap[ROUTE_TYPE].append(route_configuration("other.svc_1", [MetaRoute("x", [(ALL, 100)])]))
    snap[CLUSTER_TYPE].append(
        cluster_pb2.Cluster(name="BlackHoleCluster", type=cluster_pb2.Cluster.STATIC)
    )
    config = translate(base(), resources(snap))
    assert set(config.routers) == {"hello.svc"}


def _route(mutate: Any) -> Resources:
    rc_ = route_configuration(RDS_NAME, [MetaRoute("r", [(V1, 100)], exact={"method": "m"})])
    mutate(rc_)
    snap = snapshot()
    snap[ROUTE_TYPE] = [rc_]
    return resources(snap)


def _set_retry(r: Any) -> None:
    r.virtual_hosts[0].routes[0].route.retry_policy.num_retries.value = 3


@pytest.mark.parametrize(
    ("mutate", "detail"),
    [
        (_set_retry, "virtual_hosts[0].routes[0].route.retry_policy: not supported by this engine"),
        (
            lambda r: r.virtual_hosts[0].routes[0].direct_response.SetInParent(),
            "routes[0].direct_response: not supported by this engine",
        ),
        (
            lambda r: setattr(r.virtual_hosts[0].routes[0].match.headers[0], "invert_match", True),
            "match.headers[0].invert_match: not supported",
        ),
        (lambda r: setattr(r.virtual_hosts[0].routes[0].match, "prefix", "/x"), "must be '/'"),
        (lambda r: r.virtual_hosts.add(name="second"), "expected one virtual host"),
        (
            lambda r: r.virtual_hosts[0].routes[0].match.headers.add(name="p", present_match=False),
            "only present_match: true",
        ),
        (
            lambda r: setattr(r.virtual_hosts[0].routes[0].route, "cluster", "BlackHoleCluster"),
            "not an Istio name",
        ),
        (
            lambda r: (
                r.virtual_hosts[0].routes[0].match.headers.add(name="method", exact_match="n")
            ),
            "attribute 'method' is matched twice",
        ),
        (
            lambda r: r.virtual_hosts[0].routes[0].route.request_mirror_policies.add(cluster=V1),
            "mirror",  # not refused: one mirror is fine; see the next case
        ),
    ],
)
def test_refused_route_fields(mutate: Any, detail: str) -> None:
    res = _route(mutate)
    if detail == "mirror":
        translate(base(), res)
        res.routes[RDS_NAME].virtual_hosts[0].routes[0].route.request_mirror_policies.add(
            cluster=V2
        )
        detail = "at most one mirror per route"
    message = refusal(res)
    assert message.startswith(f"RDS {RDS_NAME}: ") and detail in message


def test_loader_rules_apply_to_routes_from_the_control_plane() -> None:
    bad_regex = with_routes(MetaRoute("r", [(V1, 100)], regex={"method": "(("}))
    message = refusal(bad_regex)
    assert f"xDS RDS {RDS_NAME}" in message and "invalid regular expression" in message
    weights = with_routes(MetaRoute("r", [(V1, 30), (V2, 30)]))
    assert "100" in refusal(weights)


def test_a_route_to_a_cluster_cds_has_not_sent_applies_with_no_endpoints() -> None:
    """As Envoy: the update applies, requests to that cluster fail until CDS sends it (with
    RDS from Aeraki and CDS from istiod, routes to a new subset may come first)."""
    config = translate(base(), with_routes(MetaRoute("r", [("outbound|9090|v9|hello.svc", 100)])))
    subset = config.destination_rules["hello.svc"].subsets["v9"]
    endpoints = config.services["hello.svc"].endpoints
    assert endpoints and not [e for e in endpoints if subset.labels.items() <= e.labels.items()]
    # Routes before any cluster at all: the file's host gets the subsets the routes name.
    routes_only = Resources(routes=with_routes(MetaRoute("r", [(V1, 100)])).routes)
    config = translate(base(), routes_only)
    assert list(config.destination_rules["hello.svc"].subsets) == ["v1"]
    assert config.routers["hello.svc"].routes[0].destinations[0].subset == "v1"


def test_failover_priorities_are_carried_to_each_cluster_endpoint() -> None:
    """istiod's locality failover (:func:`failover_snapshot`): each LocalityLbEndpoints'
    priority reaches the endpoints of the cluster it came in (an internal label per port and
    subset, only where it is not 0), so the engine's clusters balance by priority."""
    near, far = [("10.0.0.1", 9090), ("10.0.0.2", 9090)], [("10.0.1.1", 9090)]
    config = translate(base(), resources(failover_snapshot(near, far)))
    endpoints = {ep.address: ep for ep in config.services[HOST].endpoints}
    plain, v1 = priority_label(9090, None), priority_label(9090, "v1")
    assert {a: ep.priority_in(9090, None) for a, ep in endpoints.items()} == {
        "10.0.0.1": 0,
        "10.0.0.2": 0,
        "10.0.1.1": 1,
    }
    assert {a: ep.priority_in(9090, "v1") for a, ep in endpoints.items()} == {
        "10.0.0.1": 0,
        "10.0.0.2": 0,  # not in the subset
        "10.0.1.1": 1,
    }
    assert endpoints["10.0.1.1"].labels[plain] == "1" == endpoints["10.0.1.1"].labels[v1]
    assert not any(
        k.startswith("xds.metaprotocol.io/priority") for k in endpoints["10.0.0.1"].labels
    )
    # Priorities without outlier detection or without locality failover: none at all.
    plain_docs = translate(base(), resources(snapshot()))
    assert not any(
        k.startswith("xds.metaprotocol.io/priority")
        for ep in plain_docs.services[HOST].endpoints
        for k in ep.labels
    )
    # A subset with its own priorities (its own localityLbSetting): per cluster.
    snap = failover_snapshot(near, far)
    snap[ENDPOINT_TYPE][1].endpoints[1].priority = 2
    endpoints = {
        ep.address: ep for ep in translate(base(), resources(snap)).services[HOST].endpoints
    }
    assert (
        endpoints["10.0.1.1"].priority_in(9090, None),
        endpoints["10.0.1.1"].priority_in(9090, "v1"),
    ) == (1, 2)
    # An overprovisioning factor other than Envoy's default would change the loads.
    snap = failover_snapshot(near, far)
    snap[ENDPOINT_TYPE][0].policy.overprovisioning_factor.value = 200
    message = refusal(resources(snap))
    assert "policy.overprovisioning_factor" in message and "140" in message
    snap[ENDPOINT_TYPE][0].policy.overprovisioning_factor.value = 140
    translate(base(), resources(snap))


def test_locality_weights_are_carried_to_each_cluster_endpoint() -> None:
    """``locality_weighted_lb_config`` (istiod's, for ``distribute``): each
    LocalityLbEndpoints' locality and ``load_balancing_weight`` reach the endpoints of the
    cluster it came in (an internal label per port and subset), so the engine picks a
    locality by its weight first; without the cluster's config they are not read (as in
    Envoy). It refused weights not in proportion to the endpoints'."""
    near, far = [("10.0.0.1", 9090), ("10.0.0.2", 9090)], [("10.0.1.1", 9090)]
    snap = failover_snapshot(near, far)
    for cla in snap[ENDPOINT_TYPE]:
        cla.endpoints[1].priority = 0  # both zones at one level
        cla.endpoints[0].load_balancing_weight.value = 80
        cla.endpoints[1].load_balancing_weight.value = 20
    plain = translate(base(), resources(snap))
    assert not any(
        ep.locality_weight_in(9090, None) or ep.locality_weight_in(9090, "v1")
        for ep in plain.services[HOST].endpoints
    )
    for c in snap[CLUSTER_TYPE]:
        c.common_lb_config.locality_weighted_lb_config.SetInParent()
    endpoints = {
        ep.address: ep for ep in translate(base(), resources(snap)).services[HOST].endpoints
    }
    assert {a: ep.locality_weight_in(9090, None) for a, ep in endpoints.items()} == {
        "10.0.0.1": ("region/a/", 80),
        "10.0.0.2": ("region/a/", 80),
        "10.0.1.1": ("region/b/", 20),
    }
    assert endpoints["10.0.0.2"].locality_weight_in(9090, "v1") is None  # not in the subset
    assert endpoints["10.0.1.1"].labels[locality_weight_label(9090, "v1")] == "20 region/b/"
    # A locality's name is copied into each of its endpoints' labels, per cluster: a region
    # of 200 KB over 2000 endpoints (585 KB of EDS) took 369 MB. At most 253 characters.
    snap[ENDPOINT_TYPE][0].endpoints[1].locality.zone = "z" * 250
    assert "endpoints[1].locality: region/zone/sub_zone of 258 characters" in refusal(
        resources(snap)
    )
    # One locality given two weights at one priority: which one Envoy keeps is not said.
    snap[ENDPOINT_TYPE][0].endpoints[1].locality.zone = "a"
    assert "locality region/a/ at priority 0 has two weights, 80 and 20" in refusal(resources(snap))
    # A hash ring: only weights in proportion to the endpoints' (Envoy sizes it by them).
    snap = failover_snapshot(near, far)
    for c in snap[CLUSTER_TYPE]:
        c.common_lb_config.locality_weighted_lb_config.SetInParent()
        c.lb_policy = cluster_pb2.Cluster.RING_HASH
    for cla in snap[ENDPOINT_TYPE]:
        cla.endpoints[1].priority = 0
        cla.endpoints[0].load_balancing_weight.value = 2 * len(cla.endpoints[0].lb_endpoints)
        cla.endpoints[1].load_balancing_weight.value = 2
    ring = translate(base(), resources(snap))
    assert not any(ep.locality_weight_in(9090, None) for ep in ring.services[HOST].endpoints)
    snap[ENDPOINT_TYPE][0].endpoints[1].load_balancing_weight.value = 7
    assert "not supported with a hash ring" in refusal(resources(snap))


def test_refused_cluster_and_endpoint_fields() -> None:
    snap = snapshot()
    snap[ENDPOINT_TYPE][1] = load_assignment(V1, [("127.0.0.1", 29999)])
    assert "is in the subset but not in outbound|9090||hello.svc" in refusal(resources(snap))
    snap = snapshot()
    snap[ENDPOINT_TYPE][0].endpoints[0].lb_endpoints[0].load_balancing_weight.value = 5
    assert "an endpoint has one weight in every cluster of its host" in refusal(resources(snap))
    snap = snapshot()
    snap[CLUSTER_TYPE][0].health_checks.add()
    assert refusal(resources(snap)).startswith(f"CDS {ALL}: health_checks: not supported")
    snap = snapshot()
    snap[CLUSTER_TYPE][0].lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
    assert "load balancer 6 is not supported" in refusal(resources(snap))
    # Envoy refuses a connect timeout that is not above 0; it was ignored (5 s instead).
    for seconds, nanos in ((-5, 0), (0, 0), (0, -1), (1, 2_000_000_000)):
        snap = snapshot()
        snap[CLUSTER_TYPE][0].connect_timeout.seconds = seconds
        snap[CLUSTER_TYPE][0].connect_timeout.nanos = nanos
        assert refusal(resources(snap)).startswith(f"CDS {ALL}: connect_timeout: "), (
            seconds,
            nanos,
        )


def test_an_internal_listener_endpoint_is_refused_naming_the_tunnel() -> None:
    """istiod sends the endpoints of a DestinationRule with a ``tunnel`` as internal
    listeners' addresses (the tunnel is a listener's tcp_proxy): refused, saying so."""
    snap = snapshot()
    address = snap[ENDPOINT_TYPE][0].endpoints[0].lb_endpoints[0].endpoint.address
    address.envoy_internal_address.server_listener_name = "outbound-tunnel-lis"
    assert refusal(resources(snap)) == (
        f"EDS {ALL}: endpoints[0].lb_endpoints[0].endpoint.address: {INTERNAL_ADDRESS}"
    )


def test_connection_lifetime_and_idle_timeout() -> None:
    """``common_http_protocol_options``: ``max_connection_duration`` (where istiod writes
    ``tcp.maxConnectionDuration``) and ``idle_timeout``; zero is no limit."""
    snap = snapshot()
    opts = snap[CLUSTER_TYPE][0].common_http_protocol_options
    opts.max_connection_duration.FromMilliseconds(1500)
    opts.idle_timeout.FromSeconds(30)
    policy = translate(base(), resources(snap)).destination_rules["hello.svc"].policy
    assert policy.connection_pool is not None
    assert policy.connection_pool.max_connection_duration == 1.5
    assert policy.connection_pool.idle_timeout == 30.0
    opts.max_connection_duration.FromSeconds(0)
    policy = translate(base(), resources(snap)).destination_rules["hello.svc"].policy
    assert policy.connection_pool is not None
    assert policy.connection_pool.max_connection_duration is None


def test_unhealthy_endpoints_are_not_routed_to() -> None:
    snap = snapshot()
    for cla in snap[ENDPOINT_TYPE]:
        for group in cla.endpoints:
            for lb in group.lb_endpoints:
                if lb.endpoint.address.socket_address.port_value == 20001:
                    lb.health_status = 3  # DRAINING
    service = translate(base(), resources(snap)).services["hello.svc"]
    assert sorted(e.ports["tcp-metaprotocol-thrift-hello"] for e in service.endpoints) == [
        20002,
        20003,
    ]


def test_engine_refuses_what_envoy_accepts() -> None:
    snap = snapshot()
    snap[ROUTE_TYPE] = [refused_route("bad")]
    assert "retry_policy" in refusal(resources(snap))


def test_weighted_cluster_total_weight_must_match() -> None:
    res = with_routes(MetaRoute("r", [(V1, 50), (V2, 50)]))
    action = res.routes[RDS_NAME].virtual_hosts[0].routes[0].route
    action.weighted_clusters.total_weight.value = 1000
    assert "total_weight: is 1000, the weights add up to 100" in refusal(res)


def test_header_string_match() -> None:
    res = with_routes(MetaRoute("r", [(V1, 100)]))
    route = res.routes[RDS_NAME].virtual_hosts[0].routes[0]
    route.match.headers.append(rc.HeaderMatcher(name="method"))
    route.match.headers[0].string_match.prefix = "say"
    (match,) = translate(base(), res).routers["hello.svc"].routes[0].match
    assert match == AttributeMatch("method", "prefix", "say")
    route.match.headers[0].string_match.ignore_case = True
    assert "string_match.ignore_case: not supported" in refusal(res)


def test_an_empty_exact_match_is_a_presence_match_as_in_envoy() -> None:
    """Aeraki sends a MetaRouter's ``exact: ""`` as the deprecated ``exact_match: ""``, which
    Envoy's header matcher reads as "present"; ``string_match.exact: ""`` is the empty value."""
    res = with_routes(MetaRoute("r", [(V1, 100)]))
    route = res.routes[RDS_NAME].virtual_hosts[0].routes[0]
    route.match.headers.append(rc.HeaderMatcher(name="method", exact_match=""))
    (match,) = translate(base(), res).routers["hello.svc"].routes[0].match
    assert match == AttributeMatch("method", "present")
    del route.match.headers[:]
    route.match.headers.append(rc.HeaderMatcher(name="method"))
    route.match.headers[0].string_match.exact = ""
    (match,) = translate(base(), res).routers["hello.svc"].routes[0].match
    assert match == AttributeMatch("method", "regex", "^$")


def test_a_route_configuration_without_routes_stays_empty() -> None:
    """Envoy answers no route to every request of an empty MetaRDS table; a file's
    MetaRouter without routes (Aeraki's rate limit examples) takes the default route."""
    router = translate(base(), with_routes()).routers["hello.svc"]
    assert router.routes == () and not router.default_route


# -- ProxyConfig spec.xds ----------------------------------------------------------------------


def test_xds_settings_defaults_like_an_istio_sidecar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSTANCE_IP", "10.1.2.3")
    monkeypatch.setenv("POD_NAME", "hello-7d9")
    monkeypatch.setenv("POD_NAMESPACE", "shop")
    xds = base().proxy.xds
    assert xds is not None
    assert xds.node.id == "sidecar~10.1.2.3~hello-7d9.shop~shop.svc.cluster.local"
    assert xds.node.metadata["NAMESPACE"] == "shop"
    assert xds.node.metadata["CLUSTER_ID"] == "Kubernetes"
    assert "ISTIO_VERSION" in xds.node.metadata
    assert (xds.max_message_bytes, xds.backoff_initial, xds.backoff_max) == (4 << 20, 0.5, 30.0)
    assert xds.max_resource_bytes == 16 << 20


def test_the_node_carries_the_workloads_locality_for_istiods_failover() -> None:
    """istiod computes each endpoint's failover priority from the proxy's ``Node.locality``:
    the workload's (``spec.telemetry.workload.locality``, else its pod's locality label)."""
    from metaprotocol_sdk.proxy.xds.client import node_message

    xds = base().proxy.xds
    assert xds is not None and xds.node.locality == ""
    assert not node_message(xds).HasField("locality")
    text = BASE.replace(
        'xds: {address: "127.0.0.1:15010"}',
        'xds: {address: "127.0.0.1:15010"}\n  telemetry: {workload: {locality: r1/z1/s1}}',
    )
    xds = loads_config(text).proxy.xds
    assert xds is not None and xds.node.locality == "r1/z1/s1"
    locality = node_message(xds).locality
    assert (locality.region, locality.zone, locality.sub_zone) == ("r1", "z1", "s1")
    labels = '{"app": "hello", "topology.istio.io/locality": "r2.z2"}'
    text = BASE.replace(
        'xds: {address: "127.0.0.1:15010"}',
        f'xds: {{address: "127.0.0.1:15010"}}\n  telemetry: {{workload: {{labels: {labels}}}}}',
    )
    xds = loads_config(text).proxy.xds
    assert xds is not None and (node_message(xds).locality.region, xds.node.locality) == (
        "r2",
        "r2/z2",
    )


def test_xds_settings_given() -> None:
    text = BASE.replace(
        'xds: {address: "127.0.0.1:15010"}',
        'xds: {address: "istiod:15010", node: {id: n1, cluster: c1, metadata: {CLUSTER_ID: k2}},'
        " maxMessageBytes: 65536, maxResourceBytes: 1048576, backoff: {initial: 100ms, max: 2s},"
        ' rdsAddress: "aeraki:15010"}',
    )
    xds = loads_config(text).proxy.xds
    assert xds is not None
    assert (xds.node.id, xds.node.cluster, xds.node.metadata["CLUSTER_ID"]) == ("n1", "c1", "k2")
    assert (xds.max_message_bytes, xds.backoff_initial, xds.backoff_max) == (65536, 0.1, 2.0)
    assert xds.max_resource_bytes == 1 << 20
    assert xds.rds_address == "aeraki:15010" and base().proxy.xds.rds_address is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("xds", "detail"),
    [
        ("{address: nowhere}", "spec.xds.address: must be host:port"),
        ('{address: "a:1", node: {ip: x}}', "spec.xds.node"),
        ('{address: "a:1", maxMessageBytes: 10}', "spec.xds.maxMessageBytes"),
        ('{address: "a:1", maxResourceBytes: 10}', "spec.xds.maxResourceBytes"),
        ('{address: "a:1", backoff: {initial: 2s, max: 1s}}', "spec.xds.backoff.max"),
        ('{address: "a:1", watch: true}', "spec.xds"),
        ('{address: "a:1", rdsAddress: aeraki}', "spec.xds.rdsAddress: must be host:port"),
        ('{address: "unix:/' + "x" * 200 + '"}', "spec.xds.address: a Unix socket's path"),
    ],
)
def test_xds_settings_refused(xds: str, detail: str) -> None:
    with pytest.raises(ConfigError, match=detail.replace(".", r"\.")):
        loads_config(BASE.replace('xds: {address: "127.0.0.1:15010"}', f"xds: {xds}"))


def test_files_cannot_route_when_the_control_plane_does() -> None:
    router = """
---
kind: MetaRouter
metadata: {name: r}
spec:
  hosts: [hello.svc]
  routes: [{name: a, route: [{destination: {host: hello.svc}}]}]
"""
    with pytest.raises(ConfigError, match="routes and clusters come from the control plane"):
        loads_config(BASE + router)
    loads_config(BASE.replace('  xds: {address: "127.0.0.1:15010"}\n', "") + router)


def test_every_ignored_field_is_documented() -> None:
    from pathlib import Path

    from metaprotocol_sdk.proxy.xds.translate import IGNORED

    text = (Path(__file__).parents[2] / "docs" / "xds.md").read_text()
    missing = [
        f"{kind}.{name}"
        for kind, names in IGNORED.items()
        for name in names
        if f"`{name}`" not in text
    ]
    assert not missing


def test_unknown_enum_values_are_refused_not_crashed_on() -> None:
    res = with_routes(MetaRoute("m", [(V1, 100)], mirror=(V2, 10)))
    policy = res.routes[RDS_NAME].virtual_hosts[0].routes[0].route.request_mirror_policies[0]
    policy.runtime_fraction.default_value.denominator = 7  # proto3 keeps unknown enum values
    assert "unknown denominator 7" in refusal(res)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_corrupted_resources_are_refused_or_applied_never_crash(data: st.DataObject) -> None:
    """Hostile control plane: any decodable mutation of a real snapshot either translates or
    is refused with a readable detail (XdsRefused or ConfigError), nothing else."""
    snap = snapshot()
    kind = data.draw(st.sampled_from([ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE]))
    index = data.draw(st.integers(0, len(snap[kind]) - 1))
    wire = bytearray(snap[kind][index].SerializeToString())
    for _ in range(data.draw(st.integers(1, 4))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    message = type(snap[kind][index])()
    try:
        message.ParseFromString(bytes(wire))
    except DecodeError:
        return  # the client refuses undecodable resources before translating
    snap[kind][index] = message
    try:
        translate(base(), resources(snap))
    except (XdsRefused, ConfigError) as exc:
        assert str(exc)


# -- TLS: a cluster's transport_socket ------------------------------------------------------


class Files:
    """A trustme CA, a server name's and a client's certificates, as files under ``root``."""

    def __init__(self, root: Path) -> None:
        ca = trustme.CA()
        self.ca = str(root / "ca.pem")
        ca.cert_pem.write_to_path(self.ca)
        leaf = ca.issue_cert("client.local")
        self.cert, self.key = str(root / "client.pem"), str(root / "client.key")
        leaf.cert_chain_pems[0].write_to_path(self.cert)
        leaf.private_key_pem.write_to_path(self.key)


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


def with_tls(socket: Any, names: tuple[str, ...] = (V1,)) -> Resources:
    """The first snapshot, the clusters ``names`` with ``socket`` as istiod sends it."""
    snap = snapshot()
    snap[CLUSTER_TYPE] = [
        tls_cluster(c.name, socket) if c.name in names else c for c in snap[CLUSTER_TYPE]
    ]
    return resources(snap)


def test_istiod_tls_with_files_is_the_destination_rule_tls(files: Files) -> None:
    socket = tls_socket(files.ca, (files.cert, files.key), sni="tls.hello.svc", sans=["a", "b"])
    rule = translate(base(), with_tls(socket)).destination_rules["hello.svc"]
    tls = rule.subsets["v1"].policy.tls
    assert tls is not None and tls.context is not None
    assert (tls.mode, tls.ca_certificates, tls.client_certificate, tls.private_key) == (
        "MUTUAL",
        files.ca,
        files.cert,
        files.key,
    )
    assert (tls.sni, tls.subject_alt_names, tls.insecure_skip_verify) == (
        "tls.hello.svc",
        ("a", "b"),
        False,
    )
    assert tls.digest and [path for path, _ in tls.expiry] == [files.ca, files.cert]
    # The other clusters stay plain TCP.
    assert rule.policy.tls is None and rule.subsets["v2"].policy.tls is None


def test_istiod_simple_tls_system_roots_and_insecure_skip_verify(files: Files) -> None:
    rule = translate(base(), with_tls(tls_socket(None))).destination_rules["hello.svc"]
    tls = rule.subsets["v1"].policy.tls
    assert tls is not None  # file-root:system: the system's trust store, verified
    assert (tls.mode, tls.ca_certificates, tls.insecure_skip_verify) == ("SIMPLE", None, False)
    rule = translate(base(), with_tls(tls_socket(None, insecure=True))).destination_rules[
        "hello.svc"
    ]
    tls = rule.subsets["v1"].policy.tls
    assert tls is not None and tls.insecure_skip_verify and tls.mode == "SIMPLE"


def test_a_plain_subset_of_a_tls_host_stays_plain(files: Files) -> None:
    # The host's cluster has TLS, subset v2's does not: it must not inherit the host's tls.
    rule = translate(base(), with_tls(tls_socket(files.ca), (ALL, V1))).destination_rules[
        "hello.svc"
    ]
    assert rule.policy.tls is not None and rule.policy.tls.mode == "SIMPLE"
    # A subset's policy falls back to the host's, field by field.
    assert rule.subsets["v1"].policy.over(rule.policy).tls == rule.policy.tls
    v2 = rule.subsets["v2"].policy.over(rule.policy).tls
    assert v2 == UpstreamTls("DISABLE") and not v2.enabled


def inline_files(files: Files) -> Any:
    """What a control plane without SDS sends: file names in the context itself."""
    ctx = tls_pb2.UpstreamTlsContext(sni="hello.svc")
    cert = ctx.common_tls_context.tls_certificates.add()
    cert.certificate_chain.filename = files.cert
    cert.private_key.filename = files.key
    vc = ctx.common_tls_context.validation_context
    vc.trusted_ca.filename = files.ca
    vc.match_typed_subject_alt_names.add(san_type=2).matcher.exact = "hello.svc"
    socket = base_pb2.TransportSocket(name="envoy.transport_sockets.tls")
    socket.typed_config.Pack(ctx)
    return socket


def test_file_names_from_a_control_plane_without_sds(files: Files) -> None:
    rule = translate(base(), with_tls(inline_files(files))).destination_rules["hello.svc"]
    tls = rule.subsets["v1"].policy.tls
    assert tls is not None
    assert (tls.mode, tls.ca_certificates, tls.client_certificate, tls.private_key) == (
        "MUTUAL",
        files.ca,
        files.cert,
        files.key,
    )
    assert tls.subject_alt_names == ("hello.svc",)


def _ctx(socket: Any) -> Any:
    ctx = tls_pb2.UpstreamTlsContext()
    socket.typed_config.Unpack(ctx)
    return ctx


def _repack(socket: Any, ctx: Any) -> Any:
    socket.typed_config.Pack(ctx)
    return socket


def _tls_case(edit: Any) -> Any:
    """A MUTUAL istiod socket (files that need not exist: refused before they are read)
    changed by ``edit(context)``."""
    socket = tls_socket("/ca.pem", ("/c.pem", "/c.key"), sans=["hello.svc"])
    ctx = _ctx(socket)
    edit(ctx)
    return _repack(socket, ctx)


_COMMON = "transport_socket.typed_config.common_tls_context"
_COMBINED = f"{_COMMON}.combined_validation_context"


def _istio_mutual(ctx: Any) -> None:
    ctx.common_tls_context.tls_certificate_sds_secret_configs[0].name = "default"


def _istio_root(ctx: Any) -> None:
    combined = ctx.common_tls_context.combined_validation_context
    combined.validation_context_sds_secret_config.name = "ROOTCA"


def _credential(ctx: Any) -> None:
    ctx.common_tls_context.tls_certificate_sds_secret_configs[0].name = "kubernetes://secret"


def _inline_key(ctx: Any) -> None:
    del ctx.common_tls_context.tls_certificate_sds_secret_configs[:]
    cert = ctx.common_tls_context.tls_certificates.add()
    cert.certificate_chain.filename = "/c.pem"
    cert.private_key.inline_bytes = b"-----BEGIN PRIVATE KEY-----"


def _bad_cert_name(ctx: Any) -> None:
    ctx.common_tls_context.tls_certificate_sds_secret_configs[0].name = "file-cert:/c.pem"


def _two_certs(ctx: Any) -> None:
    ctx.common_tls_context.tls_certificates.add().certificate_chain.filename = "/x"


def _pin(ctx: Any) -> None:
    default = ctx.common_tls_context.combined_validation_context.default_validation_context
    default.verify_certificate_spki.append("x" * 44)


def _untrusted(ctx: Any) -> None:
    default = ctx.common_tls_context.combined_validation_context.default_validation_context
    default.trust_chain_verification = 1  # ACCEPT_UNTRUSTED


def _prefix_san(ctx: Any) -> None:
    default = ctx.common_tls_context.combined_validation_context.default_validation_context
    default.match_subject_alt_names[0].prefix = "hello"


def _email_san(ctx: Any) -> None:
    default = ctx.common_tls_context.combined_validation_context.default_validation_context
    default.match_typed_subject_alt_names.add(san_type=1).matcher.exact = "a@b"


def _sans_without_ca(ctx: Any) -> None:
    ctx.common_tls_context.validation_context.match_subject_alt_names.add(exact="hello.svc")


def _two_cas(ctx: Any) -> None:
    default = ctx.common_tls_context.combined_validation_context.default_validation_context
    default.trusted_ca.filename = "/other.pem"


@pytest.mark.parametrize(
    ("edit", "detail"),
    [
        (
            _istio_mutual,
            "SDS secret 'default' is istio-agent's workload certificate (tls mode "
            "ISTIO_MUTUAL): set spec.meshIdentity in the ProxyConfig",
        ),
        (
            _istio_root,
            "SDS secret 'ROOTCA' is istio-agent's mesh root certificate (tls mode "
            "ISTIO_MUTUAL), with a secret that is not istio-agent's",
        ),
        (_credential, "SDS secret 'kubernetes://secret': only Istio's names for files"),
        (
            _inline_key,
            f"{_COMMON}.tls_certificates[0].private_key.inline_bytes: not supported "
            "by this engine: certificates and keys are files named by path",
        ),
        (_bad_cert_name, "expected file-cert:<certificate>~<key>, got 'file-cert:/c.pem'"),
        (_two_certs, "one client certificate at most"),
        (
            lambda c: c.common_tls_context.alpn_protocols.append("h2"),
            f"{_COMMON}.alpn_protocols: not supported by this engine: no ALPN is offered",
        ),
        (
            lambda c: setattr(c, "allow_renegotiation", True),
            "allow_renegotiation: not supported by this engine: the engine never renegotiates",
        ),
        (lambda c: setattr(c, "auto_host_sni", True), "auto_host_sni: not supported"),
        (
            lambda c: c.common_tls_context.tls_params.cipher_suites.append("AES128-SHA"),
            f"{_COMMON}.tls_params.cipher_suites: not supported by this engine: OpenSSL's defaults",
        ),
        (
            lambda c: setattr(c.common_tls_context.tls_params, "tls_minimum_protocol_version", 4),
            "tls_minimum_protocol_version: not supported by this engine: TLSv1_3",
        ),
        (
            lambda c: setattr(c.common_tls_context.tls_params, "tls_minimum_protocol_version", 1),
            "TLSv1_0: TLS 1.0 and 1.1 are deprecated",
        ),
        (
            lambda c: setattr(c.common_tls_context.tls_params, "tls_maximum_protocol_version", 3),
            "tls_maximum_protocol_version: not supported by this engine: TLSv1_2",
        ),
        (_pin, "verify_certificate_spki: not supported by this engine: certificate pinning"),
        (
            _untrusted,
            "trust_chain_verification: not supported by this engine: the chain is always verified",
        ),
        (
            _prefix_san,
            f"{_COMBINED}.default_validation_context.match_subject_alt_names[0]"
            ".prefix: not supported by this engine: only exact names",
        ),
        (_email_san, "san_type: only DNS, URI and IP_ADDRESS names are matched"),
        (_sans_without_ca, "subject alt names or a CRL without trusted CAs"),
        (_two_cas, "trusted_ca: the trusted CAs are given by"),
    ],
)
def test_refused_tls(edit: Any, detail: str) -> None:
    got = refusal(with_tls(_tls_case(edit)))
    assert got.startswith(f"CDS {V1}: ") and detail in got, got


def with_identity(files: Files) -> Config:
    """:func:`base` with a workload identity (``spec.meshIdentity``)."""
    text = BASE.replace(
        '  xds: {address: "127.0.0.1:15010"}',
        '  xds: {address: "127.0.0.1:15010"}\n'
        f"  meshIdentity: {{certificateChain: {files.cert}, privateKey: {files.key}, "
        f"rootCertificates: {files.ca}}}",
    )
    return loads_config(text)


ISTIO_SNI = "outbound_.9090_.v1_.hello.svc"
SA = "spiffe://cluster.local/ns/demo/sa/hello"


def test_istiods_istio_mutual_is_served_with_the_workload_identity(files: Files) -> None:
    config = with_identity(files)
    Path(files.key).unlink()  # read with the ProxyConfig, not again at each update
    rule = translate(config, with_tls(istio_mutual_socket(ISTIO_SNI, [SA]))).destination_rules[
        "hello.svc"
    ]
    tls = rule.subsets["v1"].policy.tls
    assert tls is not None and tls.context is None  # the identity's, at each connect
    assert (tls.mode, tls.sni, tls.subject_alt_names) == ("ISTIO_MUTUAL", ISTIO_SNI, (SA,))
    assert rule.policy.tls is None and rule.subsets["v2"].policy.tls is None


def test_istiods_alpn_says_whether_the_metadata_exchange_is_offered(files: Files) -> None:
    """istiod writes ALPN ``istio-peer-exchange``/``istio`` on an ISTIO_MUTUAL cluster when
    its metadata exchange is on (``ALPNInMeshWithMxc``, the default), ``istio`` alone when
    it is off (``ALPNInMesh``): the engine offers what the cluster says, automatic mutual
    TLS too."""
    config = with_identity(files)
    for alpn, offered in ((("istio-peer-exchange", "istio"), True), (("istio",), False)):
        socket = istio_mutual_socket(ISTIO_SNI, [SA], alpn=alpn)
        rule = translate(config, with_tls(socket)).destination_rules["hello.svc"]
        tls = rule.subsets["v1"].policy.tls
        assert tls is not None and tls.peer_exchange is offered, alpn
        rule = translate(config, auto_mtls(socket)).destination_rules["hello.svc"]
        tls = rule.subsets["v1"].policy.tls
        assert tls is not None and tls.auto and tls.peer_exchange is offered, alpn


def test_only_the_hosts_in_use_are_translated() -> None:
    """istiod sends every service of the mesh (without a Sidecar resource scoping it), and
    every one was translated at each update: 40 000 small clusters took 254 MiB and 4.9 s of
    CPU, for the few the routes here send to. Only the hosts of the files, the listeners and
    the routes (weighted clusters and mirrors too) are; the others are named as unused. A
    route update that starts sending to one translates it then, from the resources held."""
    snap = snapshot()
    extra = [cluster(f"outbound|9000||b{i}.svc") for i in range(2000)]
    snap[CLUSTER_TYPE] = [*snap[CLUSTER_TYPE], *extra]
    snap[ENDPOINT_TYPE] = [
        *snap[ENDPOINT_TYPE],
        *(load_assignment(c.name, [("10.0.0.1", 9000)]) for c in extra),
    ]
    assert set(translate(base(), resources(snap)).services) == {HOST}
    unused: list[str] = []
    translate(base(), resources(snap), None, unused)
    assert len(unused) == 2000 + len(MESH_CLUSTERS) and unused == sorted(unused)
    # A route to one of them (weighted, with a mirror to another): both are translated then.
    first, mirror = "outbound|9000||b7.svc", "outbound|9000||b8.svc"
    snap[ROUTE_TYPE] = [
        route_configuration(RDS_NAME, [MetaRoute("r", [(V1, 90), (first, 10)], mirror=(mirror, 5))])
    ]
    unused.clear()
    config = translate(base(), resources(snap), None, unused)
    assert set(config.services) == {HOST, "b7.svc", "b8.svc"}
    assert [e.address for e in config.services["b7.svc"].endpoints] == ["10.0.0.1"]
    assert first not in unused and mirror not in unused
    assert len(unused) == 1998 + len(MESH_CLUSTERS)
    # A route to a subset CDS has not sent, of a host it holds that nothing used yet: the
    # host is translated, with the subset's placeholder (no endpoint).
    subset = "outbound|9000|v9|b9.svc"
    to_b9 = MetaRoute("r", [(subset, 100)], mirror=("outbound|9000||b9.svc", 5))
    snap[ROUTE_TYPE] = [route_configuration(RDS_NAME, [to_b9])]
    config = translate(base(), resources(snap))
    assert set(config.services) == {HOST, "b9.svc"}
    assert "v9" in config.destination_rules["b9.svc"].subsets


def test_istiods_istio_mutual_without_an_identity_names_the_setting(files: Files) -> None:
    got = refusal(with_tls(istio_mutual_socket(ISTIO_SNI, [SA])))
    assert got.startswith(f"CDS {V1}: ") and "set spec.meshIdentity" in got, got
    # A cluster nothing routes to or serves (a port of a host in use) is left out with that
    # reason, not refused.
    left_out: dict[str, str] = {}
    snap = snapshot()
    other = tls_cluster(f"outbound|7777||{HOST}", istio_mutual_socket("x", [SA]))
    snap[CLUSTER_TYPE].append(other)
    translate(base(), resources(snap), left_out)
    assert "set spec.meshIdentity" in left_out[f"outbound|7777||{HOST}"]


def _no_istio_alpn(ctx: Any) -> None:
    ctx.common_tls_context.alpn_protocols[:] = ["istio-peer-exchange"]


def _file_root(ctx: Any) -> None:
    combined = ctx.common_tls_context.combined_validation_context
    combined.validation_context_sds_secret_config.name = "file-root:/ca.pem"


def _pinned(ctx: Any) -> None:
    default = ctx.common_tls_context.combined_validation_context.default_validation_context
    default.verify_certificate_spki.append("x")


@pytest.mark.parametrize(
    ("edit", "detail"),
    [
        (_no_istio_alpn, "alpn_protocols: the engine offers ALPN 'istio-peer-exchange' then"),
        (_file_root, "expected 'ROOTCA' with 'default', got 'file-root:/ca.pem'"),
        (_pinned, "verify_certificate_spki: not supported by this engine"),
        (lambda c: setattr(c, "auto_host_sni", True), "auto_host_sni: not supported"),
    ],
)
def test_refused_istio_mutual(files: Files, edit: Any, detail: str) -> None:
    socket = istio_mutual_socket(ISTIO_SNI, [SA])
    ctx = _ctx(socket)
    edit(ctx)
    got = refusal(with_tls(_repack(socket, ctx)), with_identity(files))
    assert got.startswith(f"CDS {V1}: ") and detail in got, got


def test_refused_transport_sockets() -> None:
    socket = base_pb2.TransportSocket(name="envoy.transport_sockets.tap")
    socket.typed_config.Pack(cluster_pb2.Cluster())  # any other message
    assert "transport socket 'envoy.config.cluster.v3.Cluster' is not supported" in refusal(
        with_tls(socket)
    )
    # A TLS transport_socket and transport_socket_matches: which endpoint gets which socket?
    snap = snapshot()
    snap[CLUSTER_TYPE][1].transport_socket.CopyFrom(tls_socket(None))
    assert f"CDS {V1}: transport_socket_matches: with a TLS transport_socket" in refusal(
        resources(snap)
    )
    # A raw-buffer transport_socket is plain TCP.
    raw = snapshot()[CLUSTER_TYPE][1].transport_socket_matches[0].transport_socket
    rule = translate(base(), with_tls(raw)).destination_rules["hello.svc"]
    assert rule.subsets["v1"].policy.tls is None
    # istiod's plain-text match alone (every endpoint, raw_buffer): plain TCP.
    rule = translate(base(), resources(snapshot())).destination_rules["hello.svc"]
    assert rule.policy.tls is None and rule.subsets["v1"].policy.tls is None


# -- istiod's automatic mutual TLS: transport_socket_matches ------------------------------------

SIDECAR = ("127.0.0.1", 20001)  # of EPS1: the endpoint with a sidecar (tlsMode: istio)


def auto_mtls(socket: Any, names: tuple[str, ...] = (ALL, V1, V2)) -> Resources:
    """The first snapshot, the clusters ``names`` with istiod's automatic mutual TLS (a match
    ``{tlsMode: istio}`` with ``socket`` before its ``tlsMode-disabled`` one), and the
    endpoint :data:`SIDECAR` with ``tlsMode: istio`` in every cluster's EDS metadata."""
    snap = snapshot()
    snap[CLUSTER_TYPE] = [
        auto_mtls_cluster(c.name, socket) if c.name in names else c for c in snap[CLUSTER_TYPE]
    ]
    snap[ENDPOINT_TYPE] = [mark_sidecars(cla, [SIDECAR]) for cla in snap[ENDPOINT_TYPE]]
    return resources(snap)


def _sidecars(config: Config, subset: str | None) -> dict[int, bool]:
    """Each endpoint port of hello.svc: whether automatic mutual TLS sends it ISTIO_MUTUAL
    in the cluster of ``subset``."""
    service = config.services["hello.svc"]
    port = service.ports[9090]
    return {ep.port_for(port): ep.mesh_tls_in(9090, subset) for ep in service.endpoints}


def test_istiods_automatic_mutual_tls_is_read_per_endpoint(files: Files) -> None:
    """Each cluster is ISTIO_MUTUAL marked automatic with istiod's SNI and names, and the
    endpoint whose EDS metadata says ``tlsMode: istio`` is the one that gets it."""
    config = translate(with_identity(files), auto_mtls(istio_mutual_socket(ISTIO_SNI, [SA])))
    rule = config.destination_rules["hello.svc"]
    for name in ("", "v1", "v2"):
        tls = rule.policy_for(9090, name or None).tls
        assert tls is not None and tls.auto, name
        assert (tls.mode, tls.sni, tls.subject_alt_names) == ("ISTIO_MUTUAL", ISTIO_SNI, (SA,))
    assert _sidecars(config, None) == {20001: True, 20002: False, 20003: False}
    assert _sidecars(config, "v1") == {20001: True, 20002: False, 20003: False}


def test_automatic_mutual_tls_is_per_cluster(files: Files) -> None:
    """A cluster without the matches stays plain, its endpoints unmarked, even the sidecar's
    (istiod decided per cluster: a DestinationRule's tls DISABLE on the subset, say)."""
    config = translate(
        with_identity(files), auto_mtls(istio_mutual_socket(ISTIO_SNI, [SA]), (ALL,))
    )
    rule = config.destination_rules["hello.svc"]
    tls = rule.policy_for(9090).tls
    assert tls is not None and tls.auto
    assert rule.policy_for(9090, "v1").tls in (None, UpstreamTls("DISABLE"))
    assert _sidecars(config, None)[20001] and not _sidecars(config, "v1")[20001]


def test_automatic_mutual_tls_without_an_identity_is_kept_to_be_served_plain() -> None:
    """No spec.meshIdentity: not refused (istiod sends it to every sidecar), kept marked so
    that the engine serves it plain and says why (see test_engine_xds)."""
    config = translate(base(), auto_mtls(istio_mutual_socket(ISTIO_SNI, [SA])))
    tls = config.destination_rules["hello.svc"].policy_for(9090).tls
    assert tls is not None and tls.auto and tls.mode == "ISTIO_MUTUAL"


def test_automatic_mutual_tls_served_plain_is_one_warning_per_build(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """istiod asks automatic mutual TLS of every cluster of the mesh: an engine without an
    identity says once per build which clusters it serves plain, not once per cluster."""
    snap = snapshot(2)  # the route split 50/50 over v1 and v2: two clusters built
    socket = istio_mutual_socket(ISTIO_SNI, [SA])
    snap[CLUSTER_TYPE] = [auto_mtls_cluster(c.name, socket) for c in snap[CLUSTER_TYPE]]
    config = translate(base(), resources(snap))

    async def main() -> None:
        engine = Engine(config)
        await engine.start()
        await engine.stop(drain=0.1)

    with caplog.at_level(logging.WARNING, logger="metaprotocol.proxy"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if "automatic mutual TLS" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "no spec.meshIdentity is configured" in lines[0]
    assert "outbound|9090|v1|hello.svc, outbound|9090|v2|hello.svc" in lines[0]


def test_a_sidecar_match_with_raw_buffer_is_plain_text() -> None:
    raw = snapshot()[CLUSTER_TYPE][1].transport_socket_matches[0].transport_socket
    rule = translate(base(), auto_mtls(raw)).destination_rules["hello.svc"]
    assert rule.policy.tls is None and rule.subsets["v1"].policy.tls is None


def _hbone(c: Any) -> None:
    c.transport_socket_matches[0].match.update({"tunnel": "http"})
    del c.transport_socket_matches[0].match.fields["tlsMode"]


def _other_key(c: Any) -> None:
    c.transport_socket_matches[0].match.update({"acceptMTLS": "true"})


def _two_istio(c: Any) -> None:
    c.transport_socket_matches.insert(1, c.transport_socket_matches[0])


def _after_every(c: Any) -> None:
    c.transport_socket_matches.append(c.transport_socket_matches[0])


def _tls_for_every(c: Any) -> None:
    c.transport_socket_matches[1].transport_socket.CopyFrom(istio_mutual_socket(ISTIO_SNI))


def _file_tls(c: Any) -> None:
    c.transport_socket_matches[0].transport_socket.CopyFrom(tls_socket(None))


def _no_socket(c: Any) -> None:
    c.transport_socket_matches[0].ClearField("transport_socket")


@pytest.mark.parametrize(
    ("edit", "detail"),
    [
        (
            _hbone,
            'transport_socket_matches[0].match: not supported by this engine: {"tunnel": '
            '"http"} (HBONE tunnels, Istio\'s ambient mode, are not supported)',
        ),
        (_other_key, "transport_socket_matches[0].match: not supported by this engine"),
        (_two_istio, "transport_socket_matches[1].match: not supported by this engine"),
        (_after_every, "transport_socket_matches[2]: follows a match of every endpoint"),
        (_tls_for_every, "transport_socket_matches[1].transport_socket: TLS to every endpoint"),
        (
            _file_tls,
            "transport_socket_matches[0].transport_socket: per-endpoint TLS other than "
            "ISTIO_MUTUAL is not supported",
        ),
        (_no_socket, "transport_socket_matches[0].transport_socket: required"),
        (
            lambda c: c.transport_socket.CopyFrom(tls_socket(None)),
            "transport_socket_matches: with a TLS transport_socket",
        ),
    ],
)
def test_refused_transport_socket_matches(files: Files, edit: Any, detail: str) -> None:
    res = auto_mtls(istio_mutual_socket(ISTIO_SNI, [SA]), (V1,))
    edit(res.clusters[V1])
    got = refusal(res, with_identity(files))
    assert got.startswith(f"CDS {V1}: ") and detail in got, got


def test_a_tls_file_that_cannot_be_used_names_the_cluster_and_xds_field(
    files: Files, tmp_path: Path
) -> None:
    missing = str(tmp_path / "missing.pem")
    got = refusal(with_tls(tls_socket(missing, (files.cert, files.key))))
    assert got == (
        f"xDS CDS {V1}: {_COMBINED}.validation_context_sds_secret_config.name: no such file: "
        f"{missing} (DestinationRule spec.subsets[0].trafficPolicy.tls.caCertificates)"
    )
    got = refusal(with_tls(tls_socket(files.ca, (files.cert, files.ca))))
    assert got.startswith(f"xDS CDS {V1}: {_COMMON}.tls_certificate_sds_secret_configs[0].name: ")
    assert "holds no PEM private key" in got
    got = refusal(with_tls(tls_socket(files.ca, crl=missing), (ALL,)))
    assert got.startswith(
        f"xDS CDS {ALL}: {_COMBINED}.default_validation_context.crl.filename: no such file"
    )
    socket = inline_files(files)
    ctx = _ctx(socket)
    ctx.common_tls_context.tls_certificates[0].private_key.filename = missing
    got = refusal(with_tls(_repack(socket, ctx)))
    assert f"{_COMMON}.tls_certificates[0].private_key.filename: " in got


# -- per-port policies: portLevelSettings ------------------------------------------------------

#: A front service whose listener routes to hello.svc: hello.svc is then all from xDS (its
#: ServiceEntry has the ports its clusters have, so one cluster alone can be translated).
FRONT = """
kind: ServiceEntry
metadata: {name: front}
spec:
  hosts: [front.svc]
  ports: [{number: 9000, name: tcp-metaprotocol-thrift-front}]
---
kind: ProxyConfig
metadata: {name: proxy}
spec:
  listeners: [{host: front.svc, port: 9000, bind: "127.0.0.1:0"}]
  xds: {address: "127.0.0.1:15010"}
"""
FRONT_RDS = "front.svc_9000"
#: A multi-port host's endpoints: each address has one port per service port (port + 10000).
ADDRESSES = {None: ("127.0.0.1", "127.0.0.2"), "v1": ("127.0.0.1",), "v2": ("127.0.0.2",)}
PORTS = (9090, 9091, 9092)


@dataclass(frozen=True)
class Policy:
    """What one test cluster sets: its load balancer (hashed on ``user`` by its route when
    ``hashed``), circuit-breaker ``max_connections``, ``consecutive_5xx``, TLS."""

    lb: int = cluster_pb2.Cluster.ROUND_ROBIN
    max_connections: int | None = None
    consecutive_5xx: int | None = None
    tls: str | None = None  # "simple", "mutual"
    hashed: bool = False


def policy_cluster(name: str, p: Policy, files: Files | None = None) -> Any:
    c = cluster(name)
    if p.tls is not None:
        assert files is not None
        cert = (files.cert, files.key) if p.tls == "mutual" else None
        c = tls_cluster(name, tls_socket(files.ca, cert))
    c.lb_policy = p.lb
    if p.max_connections is not None:
        c.circuit_breakers.thresholds[0].max_connections.value = p.max_connections
    if p.consecutive_5xx is not None:
        c.outlier_detection.consecutive_5xx.value = p.consecutive_5xx
    return c


def ports_resources(
    policies: dict[tuple[int, str | None], Policy], files: Files | None = None
) -> Resources:
    """hello.svc's clusters ``outbound|<port>|<subset>|hello.svc`` with their policies, their
    endpoints, and a route to each (hashed on ``user`` where the policy says)."""
    clusters, endpoints, routes = [], [], []
    for i, ((port, subset), p) in enumerate(sorted(policies.items(), key=str)):
        name = f"outbound|{port}|{subset or ''}|hello.svc"
        clusters.append(policy_cluster(name, p, files))
        endpoints.append(load_assignment(name, [(a, port + 10000) for a in ADDRESSES[subset]]))
        route = MetaRoute(f"r{i}", [(name, 100)], exact={"method": f"m{i}"})
        route.hash_header = "user" if p.hashed else None
        routes.append(route)
    return Resources(
        routes={FRONT_RDS: route_configuration(FRONT_RDS, routes)},
        clusters={c.name: c for c in clusters},
        endpoints={e.cluster_name: e for e in endpoints},
    )


def front() -> Config:
    return loads_config(FRONT)


def rule_doc(config: Config) -> dict[str, Any]:
    return next(
        d for d in config.documents if d["kind"] == "DestinationRule" and d["spec"]["host"] == HOST
    )


def effective(policy: TrafficPolicy) -> TrafficPolicy:
    """What the engine does with ``policy`` (as ``Engine._cluster`` builds it): no load
    balancer is round robin, and a group set to nothing (``connectionPool: {}``,
    ``outlierDetection: {consecutive5xxErrors: 0}``, tls DISABLE) is none.

    Compared so, not as loaded: a port's entry writes those explicit defaults where the
    cluster translated alone leaves the group out, the same traffic in two spellings; a
    wrong merge still shows, as another applied policy."""
    applied = policy.applied()
    return replace(applied, load_balancer=applied.load_balancer or LoadBalancer())


def assert_each_cluster_has_its_own_policy(
    policies: dict[tuple[int, str | None], Policy], files: Files | None = None
) -> Config:
    """Every cluster's effective policy in the translation of all of them is the one the
    translation of that cluster alone gives it; the documents load as files without a
    caution (no portLevelSettings entry leaves out a group the policy it replaces sets)."""
    config = translate(front(), ports_resources(policies, files))
    rule = config.destination_rules[HOST]
    for (port, subset), p in policies.items():
        alone = translate(front(), ports_resources({(port, subset): p}, files))
        want = alone.destination_rules[HOST].policy_for(port, subset)
        assert effective(rule.policy_for(port, subset)) == effective(want), (port, subset)
    documents = [d for d in config.documents if d["kind"] in ("ServiceEntry", "DestinationRule")]
    log = logging.getLogger("metaprotocol.config")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log.addHandler(handler)
    try:
        build_config([("files", documents)])
    finally:
        log.removeHandler(handler)
    assert not [r.getMessage() for r in records if "sets no" in r.getMessage()]
    return config


def test_ports_of_different_policies_become_port_level_settings() -> None:
    """istiod's clusters for a DestinationRule with ``portLevelSettings``: port 9091 has
    another load balancer and a connection limit; subset v1 has its own load balancer on
    9090 and the rule's port-9091 settings with outlier detection on 9091."""
    lr = cluster_pb2.Cluster.LEAST_REQUEST
    limited = Policy(lb=lr, max_connections=10)
    policies = {
        (9090, None): Policy(),
        (9091, None): limited,
        (9092, None): Policy(),
        (9090, "v1"): Policy(lb=cluster_pb2.Cluster.RANDOM),
        (9091, "v1"): Policy(lb=lr, max_connections=10, consecutive_5xx=3),
        (9091, "v2"): Policy(lb=cluster_pb2.Cluster.RING_HASH, hashed=True),
    }
    config = assert_each_cluster_has_its_own_policy(policies)
    spec = rule_doc(config)["spec"]
    pool = {"tcp": {"connectTimeout": "10s", "maxConnections": 10}}
    # The policy of two of three ports is the rule's; port 9091 has its own.
    assert spec["trafficPolicy"] == {
        "loadBalancer": {"simple": "ROUND_ROBIN"},
        "connectionPool": {"tcp": {"connectTimeout": "10s"}},
        "portLevelSettings": [
            {
                "port": {"number": 9091},
                "loadBalancer": {"simple": "LEAST_REQUEST"},
                "connectionPool": pool,
            }
        ],
    }
    v1, v2 = spec["subsets"]
    assert v1["trafficPolicy"] == {
        "loadBalancer": {"simple": "RANDOM"},
        "connectionPool": {"tcp": {"connectTimeout": "10s"}},
        "portLevelSettings": [
            {
                "port": {"number": 9091},
                "loadBalancer": {"simple": "LEAST_REQUEST"},
                "connectionPool": pool,
                "outlierDetection": {"consecutive5xxErrors": 3, "minHealthPercent": 50},
            }
        ],
    }
    # v2 has clusters on 9091 only: its trafficPolicy is that cluster's, no entry needed
    # (it sets the load balancer and the connection pool, which are all 9091's settings set).
    assert v2["trafficPolicy"] == {
        "loadBalancer": {
            "consistentHash": {"httpHeaderName": "user", "ringHash": {"minimumRingSize": 1024}}
        },
        "connectionPool": {"tcp": {"connectTimeout": "10s"}},
    }
    rule = config.destination_rules[HOST]
    lb = rule.policy_for(9091, "v2").load_balancer
    assert lb == LoadBalancer("CONSISTENT_HASH", "user", ring_size=1024)
    assert rule.policy_for(9092).load_balancer == LoadBalancer("ROUND_ROBIN")


def test_a_port_entry_says_the_defaults_of_what_it_replaces(files: Files) -> None:
    """Where the rule's policy sets outlier detection, a connection limit and TLS, a port
    whose cluster has none of them gets an entry that says so (an entry replaces the policy
    whole, so leaving them out would say it too, with a caution when read from a file).
    Detection off is ``consecutive5xxErrors: 0``: an empty ``outlierDetection`` is detection
    on with the defaults, as in Istio (it was written for "off")."""
    full = Policy(max_connections=5, consecutive_5xx=2, tls="simple")
    bare = cluster(f"outbound|9091||{HOST}")
    del bare.circuit_breakers.thresholds[:]
    bare.ClearField("connect_timeout")
    policies = {(9090, None): full, (9092, None): full, (9091, None): Policy()}
    res = ports_resources(policies, files)
    res.clusters[bare.name] = bare  # type: ignore[index]
    config = translate(front(), res)
    (entry,) = rule_doc(config)["spec"]["trafficPolicy"]["portLevelSettings"]
    assert entry == {
        "port": {"number": 9091},
        "loadBalancer": {"simple": "ROUND_ROBIN"},
        "connectionPool": {},
        "outlierDetection": {"consecutive5xxErrors": 0},
        "tls": {"mode": "DISABLE"},
    }
    rule = config.destination_rules[HOST]
    port = rule.policy_for(9091)
    # Set, to nothing: what the engine applies is no pool, no detection, plain TCP.
    assert port.connection_pool == ConnectionPool()
    assert port.outlier_detection is not None and port.outlier_detection.inert
    assert port.applied() == TrafficPolicy(LoadBalancer())
    assert_each_cluster_has_its_own_policy({**policies, (9090, "v1"): Policy()}, files)


def test_a_subsets_policy_says_the_defaults_of_the_groups_the_rule_sets() -> None:
    """A subset whose clusters have no outlier detection, on a host whose clusters have it:
    its ``trafficPolicy`` turns detection off itself (a subset's group replaces the rule's,
    as in Istio), where it took a ``portLevelSettings`` entry per port; the subset's
    clusters on every port have none, the host's keep the rule's."""
    policies = {
        (9090, None): Policy(consecutive_5xx=3),
        (9091, None): Policy(consecutive_5xx=3),
        (9090, "v1"): Policy(),
        (9091, "v1"): Policy(),
    }
    config = assert_each_cluster_has_its_own_policy(policies)
    (v1,) = rule_doc(config)["spec"]["subsets"]
    assert v1["trafficPolicy"]["outlierDetection"] == {"consecutive5xxErrors": 0}
    assert "portLevelSettings" not in v1["trafficPolicy"]
    rule = config.destination_rules[HOST]
    for port in (9090, 9091):
        assert rule.policy_for(port, "v1").applied().outlier_detection is None
        detection = rule.policy_for(port).outlier_detection
        assert detection is not None and detection.consecutive_errors == 3


def test_tls_per_port_and_per_subset_port(files: Files) -> None:
    """TLS on one port of the host and on one port of a subset: each entry has its cluster's
    tls; the subset's clusters on other ports stay plain TCP."""
    policies = {
        (9090, None): Policy(),
        (9091, None): Policy(tls="mutual"),
        (9090, "v1"): Policy(),
        (9091, "v1"): Policy(),
        (9092, "v1"): Policy(tls="simple"),
    }
    config = assert_each_cluster_has_its_own_policy(policies, files)
    rule = config.destination_rules[HOST]
    tls = rule.policy_for(9091).tls
    assert tls is not None and tls.mode == "MUTUAL"
    assert effective(rule.policy_for(9091, "v1")).tls is None
    tls = rule.policy_for(9092, "v1").tls
    assert tls is not None and tls.mode == "SIMPLE"
    # v1's trafficPolicy says DISABLE: the rule has TLS on a port.
    assert rule_doc(config)["spec"]["subsets"][0]["trafficPolicy"]["tls"] == {"mode": "DISABLE"}


def test_a_tls_file_of_a_port_entry_names_its_cluster(files: Files, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    plain = cluster(f"outbound|9090||{HOST}")
    for name, block in (
        (f"outbound|9091||{HOST}", "spec.trafficPolicy.portLevelSettings[0].tls"),
        (f"outbound|9091|v1|{HOST}", "spec.subsets[0].trafficPolicy.portLevelSettings[0].tls"),
    ):
        res = ports_resources(
            {(9090, None): Policy(), (9091, None): Policy(), (9090, "v1"): Policy()}
        )
        res.clusters[name] = tls_cluster(name, tls_socket(missing))  # type: ignore[index]
        if "v1" in name:
            res.endpoints[name] = load_assignment(name, [("127.0.0.1", 19091)])  # type: ignore[index]
        assert plain.name in res.clusters
        assert refusal(res, front()) == (
            f"xDS CDS {name}: {_COMBINED}.validation_context_sds_secret_config.name: no such "
            f"file: {missing} (DestinationRule {block}.caCertificates)"
        )


@pytest.fixture(scope="module")
def module_files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return Files(tmp_path_factory.mktemp("tls"))


_LBS = st.sampled_from(
    [
        cluster_pb2.Cluster.ROUND_ROBIN,
        cluster_pb2.Cluster.LEAST_REQUEST,
        cluster_pb2.Cluster.RANDOM,
        cluster_pb2.Cluster.RING_HASH,
    ]
)
_POLICIES = st.builds(
    Policy,
    lb=_LBS,
    max_connections=st.sampled_from([None, 10, 20]),
    consecutive_5xx=st.sampled_from([None, 3]),
    tls=st.sampled_from([None, None, "simple", "mutual"]),
    hashed=st.booleans(),
)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.tuples(st.sampled_from(PORTS), st.sampled_from([None, "v1", "v2"])),
        _POLICIES,
        min_size=1,
        max_size=9,
    )
)
def test_every_cluster_keeps_its_own_policy(
    module_files: Files, policies: dict[tuple[int, str | None], Policy]
) -> None:
    assert_each_cluster_has_its_own_policy(policies, module_files)


def weigh(snap: dict[str, list[Any]], weights: dict[int, int]) -> None:
    """Give the endpoints of every cluster the weights by port, and each locality the sum of
    its endpoints' weights (as istiod does)."""
    for cla in snap[ENDPOINT_TYPE]:
        for group in cla.endpoints:
            for lb in group.lb_endpoints:
                port = lb.endpoint.address.socket_address.port_value
                lb.load_balancing_weight.value = weights.get(port, 1)
            total = sum(lb.load_balancing_weight.value for lb in group.lb_endpoints)
            group.load_balancing_weight.value = total or 1


def endpoint_weights(config: Config) -> dict[int, int]:
    service = config.services["hello.svc"]
    return {e.port_for(service.ports[9090]): e.weight for e in service.endpoints}


def test_endpoint_weights_become_the_service_entry_weights() -> None:
    snap = snapshot()
    weigh(snap, {20001: 3, 20003: 2**32 - 5})  # Envoy: a locality's sum fits in 32 bits
    config = translate(base(), resources(snap))
    assert endpoint_weights(config) == {20001: 3, 20002: 1, 20003: 2**32 - 5}
    # Locality weighted load balancing with istiod's locality weights (the sums): the same.
    for c in snap[CLUSTER_TYPE]:
        c.common_lb_config.locality_weighted_lb_config.SetInParent()
    assert endpoint_weights(translate(base(), resources(snap))) == endpoint_weights(config)


def test_refused_endpoint_weights() -> None:
    snap = snapshot()
    snap[ENDPOINT_TYPE][1].endpoints[0].lb_endpoints[0].load_balancing_weight.value = 0
    assert refusal(resources(snap)) == (
        f"EDS {V1}: endpoints[0].lb_endpoints[0].load_balancing_weight: must be at least 1 "
        "(as in Envoy)"
    )
    # One endpoint, two weights: in the host's cluster and in its subset's.
    snap = snapshot()
    snap[ENDPOINT_TYPE][1].endpoints[0].lb_endpoints[0].load_balancing_weight.value = 2
    assert refusal(resources(snap)) == (
        f"EDS {ALL}: endpoint 127.0.0.1:20001 has load_balancing_weight 1, and 2 in {V1}: an "
        "endpoint has one weight in every cluster of its host"
    )
    # Locality weights that change the shares: honoured with locality weighted balancing
    # (they were refused), and read only with it.
    snap = snapshot()
    weigh(snap, {20001: 3})
    cla = snap[ENDPOINT_TYPE][0]
    second = cla.endpoints.add()
    second.CopyFrom(cla.endpoints[0])
    del second.lb_endpoints[:2]  # 20003 (weight 1) alone
    del cla.endpoints[0].lb_endpoints[2:]  # 20001 and 20002 (weights 3 + 1)
    cla.endpoints[0].load_balancing_weight.value = 4
    second.load_balancing_weight.value = 4  # 1 would be in proportion
    plain = translate(base(), resources(snap))  # without locality weighting Envoy ignores them
    assert not any(ep.locality_weight_in(9090, None) for ep in plain.services[HOST].endpoints)
    snap[CLUSTER_TYPE][0].common_lb_config.locality_weighted_lb_config.SetInParent()
    weighted = translate(base(), resources(snap))
    assert [ep.locality_weight_in(9090, None) for ep in weighted.services[HOST].endpoints] == [
        ("local//", 4)
    ] * 3
    assert endpoint_weights(weighted) == {20001: 3, 20002: 1, 20003: 1}


def test_clusters_of_the_mesh_no_route_sends_to_are_left_out_when_they_cannot_be_honoured() -> None:
    """istiod's CDS names every service of the mesh: a headless service's ORIGINAL_DST
    cluster, a DestinationRule this engine cannot apply on an HTTP service... Each was
    refused, so one such service anywhere in the mesh NACKed every CDS response. A host no
    listener serves and no route sends to is not translated at all (only named, as unused);
    a port of a host in use that nothing sends to is left out when its clusters cannot be
    honoured; a route to either is refused then."""
    headless = "outbound|3306||mysql-headless.db.svc.cluster.local"
    snap = snapshot()
    snap[CLUSTER_TYPE] = [*snap[CLUSTER_TYPE][:3], headless_cluster(headless)]
    mutual = cluster("outbound|8080||web.svc")
    mutual.transport_socket.name = "envoy.transport_sockets.tls"  # ISTIO_MUTUAL's SDS names
    mutual.ClearField("transport_socket_matches")
    mutual.transport_socket.typed_config.Pack(
        tls_pb2.UpstreamTlsContext(
            common_tls_context=tls_pb2.CommonTlsContext(
                tls_certificate_sds_secret_configs=[{"name": "default"}]
            )
        )
    )
    snap[CLUSTER_TYPE].append(mutual)
    snap[ENDPOINT_TYPE].append(load_assignment("outbound|8080||web.svc", [("10.0.0.1", 8080)]))
    snap[ENDPOINT_TYPE][-1].endpoints[0].priority = 1  # istiod's locality failover
    own = f"outbound|3306||{HOST}"  # a port of the host in use that nothing sends to
    snap[CLUSTER_TYPE].append(headless_cluster(own))
    left_out: dict[str, str] = {}
    unused: list[str] = []
    config = translate(base(), resources(snap), left_out, unused)
    assert "mysql-headless.db.svc.cluster.local" not in config.services
    assert "web.svc" not in config.services
    assert unused == [headless, "outbound|8080||web.svc"]  # not translated: /config_dump counts
    # The port left out is reported with the refusal it would have been.
    assert set(left_out) == {own}
    assert left_out[own].startswith(f"CDS {own}: lb_policy")
    assert set(config.destination_rules) == {"hello.svc"}
    assert translate(base(), resources(snapshot())).services.keys() == {"hello.svc"}
    # A route to the headless service: refused, naming its cluster.
    snap[ROUTE_TYPE][0].virtual_hosts[0].routes[0].route.cluster = headless
    message = refusal(resources(snap))
    assert message.startswith(f"CDS {headless}: lb_policy")
    # The shared snapshots carry such clusters; the engine and Envoy accept them.
    assert all(name in resources(snapshot()).clusters for name in MESH_CLUSTERS)
