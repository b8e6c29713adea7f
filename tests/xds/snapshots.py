"""xDS resources shaped like Aeraki's MetaRDS and istiod's CDS/EDS output.

Aeraki (``internal/xds/utils.go``): one ``RouteConfiguration`` per MetaProtocol service port,
named ``<host>_<port>``, one virtual host ``dummy`` with domains ``*``, each route matching
prefix ``/`` plus header matchers for the attributes, a ``cluster`` or ``weighted_clusters``
action, mirrors as ``request_mirror_policies`` with a ``runtime_fraction`` in millionths,
hash policies on headers (one per weighted destination, as Aeraki's ``constructAction``
writes them), mutations as ``request_headers_to_add`` / ``response_headers_to_add``.

istiod: outbound clusters ``outbound|<port>|<subset>|<host>`` of type EDS with an ADS
``eds_cluster_config`` naming the cluster, a connect timeout, DEFAULT circuit-breaker
thresholds, Istio service metadata and ``transport_socket_matches`` (here only istiod's
plain-text ``tlsMode-disabled`` match: the mutual-TLS one needs SDS certificates); endpoints
as a ``ClusterLoadAssignment`` per cluster, grouped by locality, each endpoint HEALTHY with
weight 1 and Istio's workload metadata. For a DestinationRule ``tls`` with files, istiod's
``transport_socket`` (:func:`tls_socket`) and the SDS secrets istio-agent serves for it
(:func:`file_secrets`). Each version also carries clusters of other services of the mesh
that no route sends to (:func:`mesh_clusters`: a headless service, a DNS ServiceEntry), as
istiod sends every sidecar.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    grpc_service_pb2,
    health_check_pb2,
    protocol_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.network.dns_resolver.cares.v3 import cares_dns_resolver_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import duration_pb2, struct_pb2, wrappers_pb2

ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"


@dataclass
class MetaRoute:
    """One Aeraki MetaRoute: attribute matches, weighted clusters, mutations, mirror."""

    name: str
    clusters: Sequence[tuple[str, int]]
    exact: dict[str, str] = field(default_factory=dict)
    prefix: dict[str, str] = field(default_factory=dict)
    regex: dict[str, str] = field(default_factory=dict)
    present: Sequence[str] = ()
    request_mutation: dict[str, str] = field(default_factory=dict)
    response_mutation: dict[str, str] = field(default_factory=dict)
    mirror: tuple[str, float] | None = None
    hash_header: str | None = None


def route_configuration(name: str, routes: Sequence[MetaRoute]) -> route_pb2.RouteConfiguration:
    """A RouteConfiguration as Aeraki's metaProtocolRoute2HttpRoute writes it."""
    vh = rc.VirtualHost(name="dummy", domains=["*"])
    for r in routes:
        headers = [rc.HeaderMatcher(name=k, exact_match=v) for k, v in r.exact.items()]
        headers += [rc.HeaderMatcher(name=k, prefix_match=v) for k, v in r.prefix.items()]
        headers += [
            rc.HeaderMatcher(
                name=k,
                safe_regex_match=regex_pb2.RegexMatcher(
                    google_re2=regex_pb2.RegexMatcher.GoogleRE2(), regex=v
                ),
            )
            for k, v in r.regex.items()
        ]
        headers += [rc.HeaderMatcher(name=k, present_match=True) for k in r.present]
        action = rc.RouteAction()
        if len(r.clusters) == 1:
            action.cluster = r.clusters[0][0]
        else:
            action.weighted_clusters.CopyFrom(
                rc.WeightedCluster(
                    clusters=[
                        rc.WeightedCluster.ClusterWeight(
                            name=c, weight=wrappers_pb2.UInt32Value(value=w)
                        )
                        for c, w in r.clusters
                    ],
                    # Aeraki writes the sum (deprecated in Envoy, which still reads it).
                    total_weight=wrappers_pb2.UInt32Value(value=sum(w for _, w in r.clusters)),
                )
            )
        if r.mirror is not None:
            action.request_mirror_policies.append(
                rc.RouteAction.RequestMirrorPolicy(
                    cluster=r.mirror[0],
                    runtime_fraction=base_pb2.RuntimeFractionalPercent(
                        default_value=percent_pb2.FractionalPercent(
                            numerator=int(r.mirror[1] * 10000),
                            denominator=percent_pb2.FractionalPercent.MILLION,
                        )
                    ),
                )
            )
        if r.hash_header:
            # Aeraki's constructAction: one per destination (each subset's consistentHash).
            action.hash_policy.extend(
                rc.RouteAction.HashPolicy(
                    header=rc.RouteAction.HashPolicy.Header(header_name=r.hash_header)
                )
                for _ in r.clusters
            )
        vh.routes.append(
            rc.Route(
                name=r.name,
                match=rc.RouteMatch(prefix="/", headers=headers),
                route=action,
                request_headers_to_add=_headers(r.request_mutation),
                response_headers_to_add=_headers(r.response_mutation),
            )
        )
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[vh])


def _headers(values: dict[str, str]) -> list[base_pb2.HeaderValueOption]:
    return [
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v))
        for k, v in values.items()
    ]


def cluster(name: str, *, lb: int = cluster_pb2.Cluster.ROUND_ROBIN) -> cluster_pb2.Cluster:
    """An outbound EDS cluster as istiod writes it (its transport-socket match included)."""
    _, port, subset, host = name.split("|")
    c = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            eds_config=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(),
                resource_api_version=config_source_pb2.V3,
            ),
            service_name=name,
        ),
        connect_timeout=duration_pb2.Duration(seconds=10),
        lb_policy=lb,
        circuit_breakers=circuit_breaker_pb2.CircuitBreakers(
            thresholds=[
                circuit_breaker_pb2.CircuitBreakers.Thresholds(
                    max_connections=wrappers_pb2.UInt32Value(value=4294967295),
                    max_pending_requests=wrappers_pb2.UInt32Value(value=4294967295),
                    max_requests=wrappers_pb2.UInt32Value(value=4294967295),
                    max_retries=wrappers_pb2.UInt32Value(value=4294967295),
                    track_remaining=True,
                )
            ]
        ),
    )
    services = struct_pb2.Struct()
    services.update(
        {
            "services": [{"host": host, "name": host.split(".")[0], "namespace": "default"}],
            "default_original_port": int(port),
            **({"subset": subset} if subset else {}),
        }
    )
    c.metadata.filter_metadata["istio"].CopyFrom(services)
    # istiod's plain-text match for endpoints without an Istio sidecar (the mutual-TLS match,
    # tlsMode-istio, needs SDS certificates that no control plane here can issue).
    raw = base_pb2.TransportSocket(name="envoy.transport_sockets.raw_buffer")
    raw.typed_config.Pack(raw_buffer_pb2.RawBuffer())
    c.transport_socket_matches.append(
        cluster_pb2.Cluster.TransportSocketMatch(name="tlsMode-disabled", transport_socket=raw)
    )
    return c


def load_assignment(
    name: str, endpoints: Sequence[tuple[str, int]]
) -> endpoint_pb2.ClusterLoadAssignment:
    """A ClusterLoadAssignment as istiod writes it (one locality, HEALTHY, weight 1)."""
    lbs = []
    for address, port in endpoints:
        meta = struct_pb2.Struct()
        meta.update({"workload": "server;default;server;v1;Kubernetes"})
        lb = endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address=address, port_value=port)
                )
            ),
            health_status=health_check_pb2.HEALTHY,
            load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
        )
        lb.metadata.filter_metadata["istio"].CopyFrom(meta)
        lbs.append(lb)
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(region="local"),
                lb_endpoints=lbs,
                load_balancing_weight=wrappers_pb2.UInt32Value(value=len(lbs) or 1),
            )
        ],
    )


def dns_cluster(name: str, endpoints: Sequence[tuple[str, int]]) -> cluster_pb2.Cluster:
    """An outbound cluster of a ServiceEntry with ``resolution: DNS``, as istiod's
    ``buildCluster`` writes it: ``STRICT_DNS`` with its endpoints in ``load_assignment`` (host
    names), an IPv4 lookup family, the c-ares resolver's settings (``udp_max_queries``, 100 by
    default), a DNS jitter of 100 ms, the mesh's refresh rate (60 s) and ``respect_dns_ttl``."""
    c = cluster(name)
    c.ClearField("eds_cluster_config")
    c.type = cluster_pb2.Cluster.STRICT_DNS
    c.dns_lookup_family = cluster_pb2.Cluster.V4_ONLY
    c.typed_dns_resolver_config.name = "envoy.network.dns_resolver.cares"
    c.typed_dns_resolver_config.typed_config.Pack(
        cares_dns_resolver_pb2.CaresDnsResolverConfig(
            udp_max_queries=wrappers_pb2.UInt32Value(value=100)
        )
    )
    c.dns_jitter.FromMilliseconds(100)
    c.dns_refresh_rate.FromSeconds(60)
    c.respect_dns_ttl = True
    c.load_assignment.CopyFrom(load_assignment(name, endpoints))
    return c


def headless_cluster(name: str) -> cluster_pb2.Cluster:
    """The outbound cluster of a Kubernetes headless service (``clusterIP: None``), as istiod
    writes it by default (``PILOT_ENABLE_EDS_FOR_HEADLESS_SERVICES`` off): ``ORIGINAL_DST``
    with the ``CLUSTER_PROVIDED`` balancer and no endpoints."""
    c = cluster(name)
    c.ClearField("eds_cluster_config")
    c.type = cluster_pb2.Cluster.ORIGINAL_DST
    c.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
    return c


#: Clusters of other services of the mesh, which istiod sends every sidecar (CDS names every
#: service it may reach) and no MetaProtocol route of the tests sends to: a headless service
#: and a ServiceEntry with ``resolution: DNS`` (its endpoint an address, resolved at once).
MESH_CLUSTERS = (
    "outbound|3306||mysql-headless.db.svc.cluster.local",
    "outbound|8443||external.example.com",
)


def mesh_clusters() -> list[cluster_pb2.Cluster]:
    """The clusters of :data:`MESH_CLUSTERS`, as istiod writes them."""
    headless, external = MESH_CLUSTERS
    return [headless_cluster(headless), dns_cluster(external, [("127.0.0.1", 8443)])]


def sds_config() -> config_source_pb2.ConfigSource:
    """istiod's ``ConstructSdsSecretConfig`` source: istio-agent's ``sds-grpc`` cluster."""
    return config_source_pb2.ConfigSource(
        api_config_source=config_source_pb2.ApiConfigSource(
            api_type=config_source_pb2.ApiConfigSource.GRPC,
            set_node_on_first_message_only=True,
            transport_api_version=config_source_pb2.V3,
            grpc_services=[
                grpc_service_pb2.GrpcService(
                    envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name="sds-grpc")
                )
            ],
        ),
        resource_api_version=config_source_pb2.V3,
    )


def tls_socket(
    ca: str | None,
    cert: tuple[str, str] | None = None,
    *,
    sni: str = "",
    sans: Sequence[str] = (),
    crl: str | None = None,
    insecure: bool = False,
) -> base_pb2.TransportSocket:
    """A DestinationRule's ``tls`` with files (SIMPLE, or MUTUAL with ``cert``), as istiod's
    ``constructUpstreamTLS`` writes it: TLS 1.2 to 1.3, the client certificate as the SDS
    secret ``file-cert:<cert>~<key>``, the CAs as ``file-root:<ca>`` (``file-root:system``
    without ``ca``) combined with the subject alt names (exact) and the CRL; with
    ``insecure`` (insecureSkipVerify) an empty validation context."""
    common = tls_pb2.CommonTlsContext(
        tls_params=common_pb2.TlsParameters(
            tls_minimum_protocol_version=common_pb2.TlsParameters.TLSv1_2,
            tls_maximum_protocol_version=common_pb2.TlsParameters.TLSv1_3,
        )
    )
    if cert is not None:
        common.tls_certificate_sds_secret_configs.append(
            secret_pb2.SdsSecretConfig(
                name=f"file-cert:{cert[0]}~{cert[1]}", sds_config=sds_config()
            )
        )
    if insecure:
        common.validation_context.SetInParent()
    else:
        default = common_pb2.CertificateValidationContext(
            match_subject_alt_names=[string_pb2.StringMatcher(exact=n) for n in sans]
        )
        if crl is not None:
            default.crl.filename = crl
        common.combined_validation_context.CopyFrom(
            tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
                default_validation_context=default,
                validation_context_sds_secret_config=secret_pb2.SdsSecretConfig(
                    name=f"file-root:{ca or 'system'}", sds_config=sds_config()
                ),
            )
        )
    socket = base_pb2.TransportSocket(name="envoy.transport_sockets.tls")
    socket.typed_config.Pack(tls_pb2.UpstreamTlsContext(common_tls_context=common, sni=sni))
    return socket


def istio_mutual_socket(
    sni: str, sans: Sequence[str] = (), alpn: Sequence[str] = ("istio-peer-exchange", "istio")
) -> base_pb2.TransportSocket:
    """``ISTIO_MUTUAL`` as istiod's ``buildUpstreamClusterTLSContext`` writes it: TLS 1.2 to
    1.3, istio-agent's SDS secrets ``default`` (the workload certificate) and ``ROOTCA``
    (combined with the names, exact), ALPN ``istio-peer-exchange``/``istio`` and the SNI
    ``outbound_.<port>_.<subset>_.<host>``. ``alpn``: for a stock Envoy client, ``istio``
    alone (it has no metadata exchange filter, which a sidecar offering
    ``istio-peer-exchange`` has)."""
    common = tls_pb2.CommonTlsContext(
        tls_params=common_pb2.TlsParameters(
            tls_minimum_protocol_version=common_pb2.TlsParameters.TLSv1_2,
            tls_maximum_protocol_version=common_pb2.TlsParameters.TLSv1_3,
        ),
        alpn_protocols=list(alpn),
    )
    common.tls_certificate_sds_secret_configs.append(
        secret_pb2.SdsSecretConfig(name="default", sds_config=sds_config())
    )
    common.combined_validation_context.CopyFrom(
        tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=common_pb2.CertificateValidationContext(
                match_subject_alt_names=[string_pb2.StringMatcher(exact=n) for n in sans]
            ),
            validation_context_sds_secret_config=secret_pb2.SdsSecretConfig(
                name="ROOTCA", sds_config=sds_config()
            ),
        )
    )
    socket = base_pb2.TransportSocket(name="envoy.transport_sockets.tls")
    socket.typed_config.Pack(tls_pb2.UpstreamTlsContext(common_tls_context=common, sni=sni))
    return socket


def tls_cluster(name: str, socket: base_pb2.TransportSocket) -> cluster_pb2.Cluster:
    """:func:`cluster` with a DestinationRule's ``tls``: istiod then sends the cluster's
    ``transport_socket`` and no ``transport_socket_matches``."""
    c = cluster(name)
    del c.transport_socket_matches[:]
    c.transport_socket.CopyFrom(socket)
    return c


def auto_mtls_cluster(name: str, socket: base_pb2.TransportSocket) -> cluster_pb2.Cluster:
    """:func:`cluster` with istiod's automatic mutual TLS (``applyUpstreamTLSSettings``): the
    match ``tlsMode-istio`` (``{tlsMode: istio}``) with ``socket`` (ISTIO_MUTUAL) before its
    ``tlsMode-disabled`` one (every other endpoint, raw_buffer)."""
    c = cluster(name)
    plain = list(c.transport_socket_matches)
    del c.transport_socket_matches[:]
    match = c.transport_socket_matches.add(name="tlsMode-istio")
    match.match.update({"tlsMode": "istio"})
    match.transport_socket.CopyFrom(socket)
    c.transport_socket_matches.extend(plain)
    return c


def mark_sidecars(
    cla: endpoint_pb2.ClusterLoadAssignment, sidecars: Sequence[tuple[str, int]]
) -> endpoint_pb2.ClusterLoadAssignment:
    """``cla`` with the endpoints ``sidecars`` marked as istiod marks a workload labelled
    ``security.istio.io/tlsMode: istio``: ``envoy.transport_socket_match: {tlsMode: istio}``."""
    for group in cla.endpoints:
        for lb in group.lb_endpoints:
            sa = lb.endpoint.address.socket_address
            if (sa.address, sa.port_value) in sidecars:
                lb.metadata.filter_metadata["envoy.transport_socket_match"].update(
                    {"tlsMode": "istio"}
                )
    return cla


def istio_secrets(chain: str | None, key: str, root: str) -> list[secret_pb2.Secret]:
    """istio-agent's SDS secrets: ``default`` (the workload certificate; none when ``chain``
    is None) and ``ROOTCA`` (the mesh root), naming the files."""
    out = [
        secret_pb2.Secret(
            name="ROOTCA",
            validation_context=common_pb2.CertificateValidationContext(
                trusted_ca=base_pb2.DataSource(filename=root)
            ),
        )
    ]
    if chain is not None:
        out.append(
            secret_pb2.Secret(
                name="default",
                tls_certificate=common_pb2.TlsCertificate(
                    certificate_chain=base_pb2.DataSource(filename=chain),
                    private_key=base_pb2.DataSource(filename=key),
                ),
            )
        )
    return out


def file_secrets(socket: base_pb2.TransportSocket) -> list[secret_pb2.Secret]:
    """The SDS secrets istio-agent serves for the ``file-cert:`` and ``file-root:`` names a
    :func:`tls_socket` holds (it reads the files; these name them)."""
    ctx = tls_pb2.UpstreamTlsContext()
    socket.typed_config.Unpack(ctx)
    common = ctx.common_tls_context
    out = []
    for sds in common.tls_certificate_sds_secret_configs:
        chain, key = sds.name.removeprefix("file-cert:").split("~")
        out.append(
            secret_pb2.Secret(
                name=sds.name,
                tls_certificate=common_pb2.TlsCertificate(
                    certificate_chain=base_pb2.DataSource(filename=chain),
                    private_key=base_pb2.DataSource(filename=key),
                ),
            )
        )
    root = common.combined_validation_context.validation_context_sds_secret_config.name
    if root:
        out.append(
            secret_pb2.Secret(
                name=root,
                validation_context=common_pb2.CertificateValidationContext(
                    trusted_ca=base_pb2.DataSource(filename=root.removeprefix("file-root:"))
                ),
            )
        )
    return out


HOST, PORT = "hello.svc", 9090
RDS_NAME = f"{HOST}_{PORT}"
ALL, V1, V2 = (f"outbound|{PORT}|{s}|{HOST}" for s in ("", "v1", "v2"))

#: Aeraki's Dubbo sample: the service host (the interface, lowercased, as Aeraki's
#: dubbo2istio registers it), its port and the interface its requests name.
DUBBO_HOST, DUBBO_PORT = "org.apache.dubbo.samples.basic.api.demoservice", 20880
DUBBO_INTERFACE = "org.apache.dubbo.samples.basic.api.DemoService"
DUBBO_RDS_NAME = f"{DUBBO_HOST}_{DUBBO_PORT}"


def hello_snapshots(
    v1: Sequence[tuple[str, int]],
    v2: Sequence[tuple[str, int]],
    *,
    host: str = HOST,
    port: int = PORT,
    match: dict[str, str] | None = None,
    rest_match: dict[str, str] | None = None,
    extra: Sequence[MetaRoute] = (),
) -> list[tuple[str, dict[str, list[Any]]]]:
    """The versions a test walks through, as Aeraki and istiod would send them.

    ``1``: the route ``hello`` (``match``: sayHello by default) goes to subset v1; ``2``: a
    route change sends it to v2; ``3``: a weight change splits it 50/50; ``4``: the first v1
    endpoint is removed (EDS only). ``extra`` routes come next, then ``rest`` (``rest_match``,
    else everything) to v1. ``host`` and ``port`` name the service.
    """
    every, sub1, sub2 = (f"outbound|{port}|{s}|{host}" for s in ("", "v1", "v2"))
    hello = {"method": "sayHello"} if match is None else match

    def snapshot(
        clusters: Sequence[tuple[str, int]], v1_eps: Sequence[tuple[str, int]]
    ) -> dict[str, list[Any]]:
        routes = [
            MetaRoute("hello", clusters, exact=hello),
            *extra,
            MetaRoute("rest", [(sub1, 100)], exact=rest_match or {}),
        ]
        return {
            CLUSTER_TYPE: [cluster(every), cluster(sub1), cluster(sub2), *mesh_clusters()],
            ENDPOINT_TYPE: [
                load_assignment(every, [*v1_eps, *v2]),
                load_assignment(sub1, v1_eps),
                load_assignment(sub2, v2),
            ],
            ROUTE_TYPE: [route_configuration(f"{host}_{port}", routes)],
        }

    split = [(sub1, 50), (sub2, 50)]
    return [
        ("1", snapshot([(sub1, 100)], v1)),
        ("2", snapshot([(sub2, 100)], v1)),
        ("3", snapshot(split, v1)),
        ("4", snapshot(split, v1[1:])),
    ]


def dubbo_snapshots(
    v1: Sequence[tuple[str, int]], v2: Sequence[tuple[str, int]]
) -> list[tuple[str, dict[str, list[Any]]]]:
    """:func:`hello_snapshots` for Aeraki's Dubbo sample, as its MetaRouter reads: routes
    matching the ``interface`` and ``method`` attributes, and a request mutation (a Dubbo
    attachment) on the ``attachments`` method's route."""
    sub2 = f"outbound|{DUBBO_PORT}|v2|{DUBBO_HOST}"
    mutated = MetaRoute(
        "mutated",
        [(sub2, 100)],
        exact={"interface": DUBBO_INTERFACE, "method": "attachments"},
        request_mutation={"x-mesh": "xds"},
    )
    return hello_snapshots(
        v1,
        v2,
        host=DUBBO_HOST,
        port=DUBBO_PORT,
        match={"interface": DUBBO_INTERFACE, "method": "sayHello"},
        rest_match={"interface": DUBBO_INTERFACE},
        extra=[mutated],
    )


def refused_route(version: str) -> route_pb2.RouteConfiguration:
    """Valid xDS that Envoy accepts and this engine refuses: a route with a retry policy."""
    rc_ = route_configuration(RDS_NAME, [MetaRoute("hello", [(V2, 100)])])
    rc_.virtual_hosts[0].routes[0].route.retry_policy.num_retries.value = 3
    return rc_


#: The second port of :func:`port_policy_snapshot`'s host.
OTHER_PORT = PORT + 1


def istiod_pool_options(
    c: cluster_pb2.Cluster, idle_s: int, max_requests: int, keepalive: tuple[int, int, int]
) -> None:
    """Give ``c`` a DestinationRule's ``http.idleTimeout``, ``maxRequestsPerConnection`` and
    ``tcp.tcpKeepalive`` where istiod writes them: HttpProtocolOptions under
    ``typed_extension_protocol_options`` (with the HTTP/1 config Envoy requires there) and
    ``upstream_connection_options``."""
    options = http_protocol_options_pb2.HttpProtocolOptions(
        common_http_protocol_options=protocol_pb2.HttpProtocolOptions(
            idle_timeout=duration_pb2.Duration(seconds=idle_s),
            max_requests_per_connection=wrappers_pb2.UInt32Value(value=max_requests),
        ),
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http_protocol_options=protocol_pb2.Http1ProtocolOptions()
        ),
    )
    c.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ].Pack(options)
    probes, time, interval = keepalive
    alive = c.upstream_connection_options.tcp_keepalive
    alive.keepalive_probes.value = probes
    alive.keepalive_time.value = time
    alive.keepalive_interval.value = interval


def port_policy_snapshot(
    a: dict[int, int], b: dict[int, int], *, host: str = HOST
) -> dict[str, list[Any]]:
    """istiod's clusters for a DestinationRule with ``portLevelSettings``: port ``PORT`` round
    robin with at most 3 connections; port ``OTHER_PORT`` a ring hash with at most 7 requests
    in flight; subset v1 (endpoint ``a``) least request with outlier detection on
    ``OTHER_PORT``. Endpoints ``127.0.0.1`` (``a``: port by service port) and ``127.0.0.2``
    (``b``); one route sends half to each port, hashed on the ``method`` attribute."""
    names = {port: f"outbound|{port}||{host}" for port in (PORT, OTHER_PORT)}
    subset = f"outbound|{OTHER_PORT}|v1|{host}"
    first = cluster(names[PORT])
    first.circuit_breakers.thresholds[0].max_connections.value = 3
    istiod_pool_options(first, idle_s=300, max_requests=1000, keepalive=(3, 600, 60))
    second = cluster(names[OTHER_PORT], lb=cluster_pb2.Cluster.RING_HASH)
    second.ring_hash_lb_config.minimum_ring_size.value = 1024  # istiod's, for consistentHash
    v1_lb = cluster_pb2.Cluster.LEAST_REQUEST
    second.circuit_breakers.thresholds[0].max_requests.value = 7
    v1 = cluster(subset, lb=v1_lb)
    v1.least_request_lb_config.choice_count.value = 2
    v1.outlier_detection.consecutive_5xx.value = 3  # as istiod writes Istio's field:
    v1.outlier_detection.enforcing_consecutive_5xx.value = 100
    v1.outlier_detection.enforcing_success_rate.value = 0
    v1.common_lb_config.healthy_panic_threshold.value = 0  # istiod's minHealthPercent
    route = MetaRoute("hello", [(names[PORT], 50), (names[OTHER_PORT], 50)], hash_header="method")
    return {
        CLUSTER_TYPE: [first, second, v1],
        ENDPOINT_TYPE: [
            *(
                load_assignment(names[port], [("127.0.0.1", a[port]), ("127.0.0.2", b[port])])
                for port in (PORT, OTHER_PORT)
            ),
            load_assignment(subset, [("127.0.0.1", a[OTHER_PORT])]),
        ],
        ROUTE_TYPE: [route_configuration(f"{host}_{PORT}", [route])],
    }


def failover_snapshot(
    near: Sequence[tuple[str, int]], far: Sequence[tuple[str, int]], *, host: str = HOST
) -> dict[str, list[Any]]:
    """istiod's resources for a DestinationRule with ``outlierDetection`` while locality load
    balancing is on (the mesh's default): the cluster of port ``PORT`` with consecutive
    gateway errors and the panic threshold 0, and its endpoints by zone, ``near`` in the
    proxy's zone at priority 0 and ``far`` in another zone of its region at priority 1 (one
    ``LocalityLbEndpoints`` per zone, locality weight the number of its endpoints); subset v1
    (the first of each) as istiod writes a subset's cluster. One route to the cluster."""
    name = f"outbound|{PORT}||{host}"
    subset = f"outbound|{PORT}|v1|{host}"
    clusters = []
    for cname in (name, subset):
        c = cluster(cname)
        c.outlier_detection.consecutive_gateway_failure.value = 1
        c.outlier_detection.enforcing_consecutive_gateway_failure.value = 100
        c.outlier_detection.consecutive_5xx.value = 0
        c.outlier_detection.enforcing_consecutive_5xx.value = 0
        c.outlier_detection.enforcing_success_rate.value = 0
        c.outlier_detection.max_ejection_percent.value = 50
        c.common_lb_config.healthy_panic_threshold.value = 0  # istiod's minHealthPercent
        clusters.append(c)

    def assignment(cname: str, zones: Sequence[Sequence[tuple[str, int]]]) -> Any:
        cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=cname)
        for priority, (zone, endpoints) in enumerate(zip(("a", "b"), zones, strict=True)):
            group = load_assignment(cname, endpoints).endpoints[0]
            group.locality.CopyFrom(base_pb2.Locality(region="region", zone=zone))
            group.priority = priority
            cla.endpoints.append(group)
        return cla

    return {
        CLUSTER_TYPE: clusters,
        ENDPOINT_TYPE: [assignment(name, [near, far]), assignment(subset, [near[:1], far[:1]])],
        ROUTE_TYPE: [route_configuration(RDS_NAME, [MetaRoute("hello", [(name, 100)])])],
    }


def distribute_snapshot(
    near: Sequence[tuple[str, int]], far: Sequence[tuple[str, int]], *, host: str = HOST
) -> dict[str, list[Any]]:
    """istiod's resources for a DestinationRule with ``distribute`` (locality weighted load
    balancing): :func:`failover_snapshot`'s, both zones at priority 0, zone ``a`` (``near``)
    with locality weight 80 and zone ``b`` (``far``) with 20, and
    ``locality_weighted_lb_config`` on the clusters."""
    snap = failover_snapshot(near, far, host=host)
    for c in snap[CLUSTER_TYPE]:
        c.common_lb_config.locality_weighted_lb_config.SetInParent()
    for cla in snap[ENDPOINT_TYPE]:
        cla.endpoints[1].priority = 0
        cla.endpoints[0].load_balancing_weight.value = 80
        cla.endpoints[1].load_balancing_weight.value = 20
    return snap
