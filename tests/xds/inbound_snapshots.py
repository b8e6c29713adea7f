"""istiod's inbound listener (``virtualInbound``) for a sidecar's TCP ports, as
``pilot/pkg/networking/core/listener_inbound.go`` and ``filterchain_options.go`` write it
(Istio 1.23-1.26), with the RBAC network filters of ``pilot/pkg/security/authz/builder``.

Per TCP port P, chains named ``0.0.0.0_P`` matching ``destination_port: P``: STRICT one
``tls`` chain with istiod's ``DownstreamTlsContext``; PERMISSIVE that chain restricted to
Istio's ALPNs, a ``tls`` chain without a transport socket (the client's own TLS, passed to
the application) and a ``raw_buffer`` chain; DISABLE a ``raw_buffer`` chain. Before them the
blackhole chain (``destination_port: 15006``) and the passthrough chains (no
``destination_port``: HTTP catch-all chains and TCP ``virtualInbound`` chains) of the
workload's mode. Each TCP chain holds ``istio.metadata_exchange``, the RBAC filters (AUDIT
as LOG, DENY, ALLOW), ``istio.stats`` and ``tcp_proxy``; ``mx=False`` leaves out the two
Istio-proxy filters, which stock Envoy does not have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, json_format, wrappers_pb2
from snapshots import sds_config

INBOUND = "virtualInbound"
#: istiod's default cipher suites for TLS 1.2 (``security.model``'s).
ISTIO_CIPHERS = (
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-GCM-SHA256",
)
MTLS_TCP_ALPNS = ("istio", "istio-peer-exchange", "istio-http/1.0", "istio-http/1.1", "istio-h2")


def _any(type_url: str, message: Any = None) -> any_pb2.Any:
    if message is not None:
        packed = any_pb2.Any()
        packed.Pack(message)
        return packed
    return any_pb2.Any(type_url=type_url)  # an Istio-proxy extension: opaque here


def filter_(name: str, config: Any) -> listener_components_pb2.Filter:
    return listener_components_pb2.Filter(name=name, typed_config=config)


def rbac(
    policies: dict[str, Any] | None,
    action: str = "ALLOW",
    *,
    shadow: dict[str, Any] | None = None,
) -> listener_components_pb2.Filter:
    """An RBAC network filter as istiod writes one (``policies`` in protojson, by name;
    ``None``: no ``rules``; ``shadow``: dry-run policies of the same action)."""
    body: dict[str, Any] = {"stat_prefix": "tcp."}
    if policies is not None:
        body["rules"] = {"policies": policies}
        if action != "ALLOW":
            body["rules"]["action"] = "LOG" if action == "AUDIT" else action
    if shadow is not None:
        body["shadow_rules"] = {"policies": shadow}
        if action != "ALLOW":
            body["shadow_rules"]["action"] = action
    prefix = "istio_dry_run_deny_" if shadow is not None and action == "DENY" else None
    body["shadow_rules_stat_prefix"] = prefix or "istio_dry_run_allow_"
    message = json_format.ParseDict(body, network_rbac_pb2.RBAC())
    return filter_("envoy.filters.network.rbac", _any("", message))


def principal_policy(principals: list[Any], ports: Sequence[int] = ()) -> dict[str, Any]:
    """One rule: ``from`` principals (protojson ids, OR'd), ``to`` ports (OR'd)."""
    permission: list[Any] = (
        [{"or_rules": {"rules": [{"destination_port": p} for p in ports]}}]
        if ports
        else [{"any": True}]
    )
    return {
        "permissions": [{"and_rules": {"rules": permission}}],
        "principals": [{"and_ids": {"ids": [{"or_ids": {"ids": principals}}]}}],
    }


def exact_principal(uri: str) -> dict[str, Any]:
    return {"authenticated": {"principal_name": {"exact": uri}}}


def namespace_principal(namespace: str) -> dict[str, Any]:
    return {"authenticated": {"principal_name": {"safe_regex": {"regex": f".*/ns/{namespace}/.*"}}}}


def ip_principal(address: str, length: int = 32, kind: str = "direct_remote_ip") -> dict[str, Any]:
    return {kind: {"address_prefix": address, "prefix_len": length}}


#: istiod's policy for a policy without rules: it matches nothing.
NEVER = {"permissions": [{"not_rule": {"any": True}}], "principals": [{"not_id": {"any": True}}]}


def istio_stats() -> listener_components_pb2.Filter:
    return filter_("istio.stats", _any("type.googleapis.com/stats.PluginConfig"))


def metadata_exchange() -> listener_components_pb2.Filter:
    return filter_("istio.metadata_exchange", _any("type.googleapis.com/udpa.type.v1.TypedStruct"))


def tcp_proxy(cluster: str) -> listener_components_pb2.Filter:
    return filter_(
        "envoy.filters.network.tcp_proxy",
        _any("", tcp_proxy_pb2.TcpProxy(stat_prefix=cluster, cluster=cluster)),
    )


def downstream_tls(
    *,
    trust_domains: Sequence[str] = ("cluster.local",),
    min_version: int = common_pb2.TlsParameters.TLSv1_2,
    max_version: int = common_pb2.TlsParameters.TLSv1_3,
    ciphers: Sequence[str] = ISTIO_CIPHERS,
    alpn: Sequence[str] = ("istio-peer-exchange", "h2", "http/1.1"),
    require_client_certificate: bool = True,
) -> base_pb2.TransportSocket:
    """istiod's ``BuildInboundTLS`` for a TCP chain: SDS ``default`` and ``ROOTCA``, one SAN
    prefix per trust domain, client certificates required."""
    common = tls_pb2.CommonTlsContext(
        tls_params=common_pb2.TlsParameters(
            tls_minimum_protocol_version=min_version,
            tls_maximum_protocol_version=max_version,
            cipher_suites=list(ciphers),
        ),
        alpn_protocols=list(alpn),
        tls_certificate_sds_secret_configs=[
            secret_pb2.SdsSecretConfig(name="default", sds_config=sds_config())
        ],
        combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=common_pb2.CertificateValidationContext(
                match_subject_alt_names=[
                    string_pb2.StringMatcher(prefix=f"spiffe://{td}/") for td in trust_domains
                ]
            ),
            validation_context_sds_secret_config=secret_pb2.SdsSecretConfig(
                name="ROOTCA", sds_config=sds_config()
            ),
        ),
    )
    socket = base_pb2.TransportSocket(name="envoy.transport_sockets.tls")
    socket.typed_config.Pack(
        tls_pb2.DownstreamTlsContext(
            common_tls_context=common,
            require_client_certificate=wrappers_pb2.BoolValue(value=require_client_certificate),
        )
    )
    return socket


def _chain(
    name: str,
    *,
    port: int | None,
    transport: str,
    alpns: Sequence[str] = (),
    filters: Sequence[listener_components_pb2.Filter],
    socket: base_pb2.TransportSocket | None = None,
) -> listener_components_pb2.FilterChain:
    match = listener_components_pb2.FilterChainMatch(
        transport_protocol=transport, application_protocols=list(alpns)
    )
    if port is not None:
        match.destination_port.value = port
    chain = listener_components_pb2.FilterChain(
        name=name, filter_chain_match=match, filters=list(filters)
    )
    if socket is not None:
        chain.transport_socket.CopyFrom(socket)
    return chain


def tcp_filters(
    policies: Sequence[listener_components_pb2.Filter], cluster: str, mx: bool = True
) -> list[listener_components_pb2.Filter]:
    """A TCP chain's filters: metadata exchange, the RBAC filters, stats, tcp_proxy."""
    if not mx:
        return [*policies, tcp_proxy(cluster)]
    return [metadata_exchange(), *policies, istio_stats(), tcp_proxy(cluster)]


def port_chains(
    port: int,
    mode: str,
    policies: Sequence[listener_components_pb2.Filter] = (),
    *,
    mx: bool = True,
    socket: base_pb2.TransportSocket | None = None,
) -> list[listener_components_pb2.FilterChain]:
    """The chains of a TCP port (``getFilterChainMatchOptions(mtls, TCP)``)."""
    name = f"0.0.0.0_{port}"
    filters = tcp_filters(policies, f"inbound|{port}||", mx)
    tls = socket or downstream_tls()
    if mode == "STRICT":
        return [_chain(name, port=port, transport="tls", filters=filters, socket=tls)]
    if mode == "DISABLE":
        return [_chain(name, port=port, transport="raw_buffer", filters=filters)]
    return [
        _chain(name, port=port, transport="tls", alpns=MTLS_TCP_ALPNS, filters=filters, socket=tls),
        _chain(name, port=port, transport="tls", filters=filters),
        _chain(name, port=port, transport="raw_buffer", filters=filters),
    ]


def passthrough_chains(
    mode: str,
    policies: Sequence[listener_components_pb2.Filter] = (),
    *,
    mx: bool = True,
) -> list[listener_components_pb2.FilterChain]:
    """The blackhole chain and the passthrough chains of the workload's mode (the HTTP
    catch-all ones hold an HTTP connection manager, shown here as its name only)."""
    blackhole = _chain(
        "virtualInbound-blackhole",
        port=15006,
        transport="",
        filters=tcp_filters((), "BlackHoleCluster", mx),
    )
    http = [
        filter_(
            "envoy.filters.network.http_connection_manager",
            _any(
                "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                "HttpConnectionManager"
            ),
        )
    ]
    filters = tcp_filters(policies, "InboundPassthroughCluster", mx)
    tls = downstream_tls()
    mtls_http = _chain(
        "virtualInbound-catchall-http",
        port=None,
        transport="tls",
        alpns=("istio-http/1.0", "istio-http/1.1", "istio-h2"),
        filters=http,
        socket=tls,
    )
    plain_http = _chain(
        "virtualInbound-catchall-http",
        port=None,
        transport="raw_buffer",
        alpns=("http/1.1", "h2c"),
        filters=http,
    )
    mtls_tcp = _chain(
        "virtualInbound",
        port=None,
        transport="tls",
        alpns=("istio-peer-exchange", "istio"),
        filters=filters,
        socket=tls,
    )
    plain_tcp = _chain("virtualInbound", port=None, transport="raw_buffer", filters=filters)
    tls_tcp = _chain("virtualInbound", port=None, transport="tls", filters=filters)
    if mode == "STRICT":
        mtls_tcp.filter_chain_match.ClearField("application_protocols")
        return [blackhole, mtls_http, mtls_tcp]
    if mode == "DISABLE":
        return [blackhole, plain_http, plain_tcp]
    return [blackhole, mtls_http, plain_http, mtls_tcp, plain_tcp, tls_tcp]


def virtual_inbound(
    chains: Sequence[listener_components_pb2.FilterChain], name: str = INBOUND
) -> listener_pb2.Listener:
    """istiod's ``virtualInbound`` listener holding ``chains`` (its listener filters as
    1.26 writes them for a PERMISSIVE workload)."""
    listener = listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="0.0.0.0", port_value=15006)
        ),
        filter_chains=list(chains),
        traffic_direction=base_pb2.INBOUND,
        continue_on_listener_filters_timeout=True,
    )
    listener.listener_filters_timeout.SetInParent()
    listener.max_connections_to_accept_per_socket_event.value = 1
    for filter_name, type_url in (
        (
            "envoy.filters.listener.original_dst",
            "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
        ),
        (
            "envoy.filters.listener.tls_inspector",
            "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
        ),
    ):
        listener.listener_filters.add(name=filter_name, typed_config=_any(type_url))
    return listener


def inbound(
    port: int,
    mode: str = "PERMISSIVE",
    policies: Sequence[listener_components_pb2.Filter] = (),
    *,
    mx: bool = True,
    workload_mode: str | None = None,
    socket: base_pb2.TransportSocket | None = None,
) -> listener_pb2.Listener:
    """A workload with one TCP port: the passthrough chains of ``workload_mode`` (default:
    ``mode``), then the port's chains of ``mode``, all holding ``policies``."""
    return virtual_inbound(
        [
            *passthrough_chains(workload_mode or mode, policies, mx=mx),
            *port_chains(port, mode, policies, mx=mx, socket=socket),
        ]
    )
