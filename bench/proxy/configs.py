"""Configurations for the proxy benchmark: the engine's (Aeraki/Istio resources) and Envoy's.

Both route the same way: method ``sayHello`` to subset v2, everything else split 20/80
between v1 and v2. v1 and v2 are the same canned upstream, so the split costs routing work
without changing the upstream's load. The engine also applies a request mutation on the split
route (for Thrift framed binary, which has no headers, the codec skips it; Dubbo writes an
attachment) and keeps its stats; Envoy's thrift_proxy and dubbo_proxy have no mutation.

For ``kv`` (the streams benchmark: the SDK's example KV codec) the split route matches the
stream open's ``method: echo`` and writes the mutation into it; Envoy has no KV proxy, only
``tcp``.
"""

from __future__ import annotations

from pathlib import Path

from tls import SERVER_NAME
from wire import DUBBO_HOST, DUBBO_INTERFACE, THRIFT_HOST

SERVICE = {
    "thrift": (THRIFT_HOST, 9090),
    "dubbo": (DUBBO_HOST, 20880),
    "kv": ("kv-streams.bench.svc.cluster.local", 9000),
}
#: The codec of each protocol's ApplicationProtocol.
CODECS = {
    "thrift": "aeraki.meta_protocol.codec.thrift",
    "dubbo": "aeraki.meta_protocol.codec.dubbo",
    "kv": "metaprotocol_sdk.examples.kv:KVCodec",
}
#: The split route's match: any request, or (``kv``) the stream open of ``kvstreams.py``.
_SPLIT_MATCH = {"kv": "\n      match: {attributes: {method: {exact: echo}}}"}


# Framed binary has no headers to carry a mutation: the Thrift codec is told to skip it
# (its default refuses the request).
_THRIFT_CODEC_OPTIONS = """
  codecOptions:
    thrift: {mutation_without_headers: skip}"""


def engine_yaml(protocol: str, upstream_port: int, tls_dir: Path | None = None) -> str:
    """The engine's configuration for ``protocol`` in front of the canned upstream; with
    ``tls_dir`` (see ``tls.py``), TLS on the listener and to the upstream."""
    host, port = SERVICE[protocol]
    origination = listener_tls = ""
    if tls_dir is not None:  # as Envoy's: TLS from the load generator and to the upstream
        origination = f"""
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: {tls_dir / "ca.pem"}, sni: {SERVER_NAME}}}"""
        listener_tls = (
            f", tls: {{mode: SIMPLE, serverCertificate: {tls_dir / 'cert.pem'}, "
            f"privateKey: {tls_dir / 'key.pem'}}}"
        )
    port_name = f"tcp-metaprotocol-{protocol}-bench"
    dest = f"{{host: {host}, port: {{number: {port}}}, subset: %s}}"
    return f"""\
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: ApplicationProtocol
metadata: {{name: {protocol}}}
spec: {{protocol: {protocol}, codec: "{CODECS[protocol]}"}}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: bench}}
spec:
  hosts: [{host}]
  ports: [{{number: {port}, name: {port_name}, protocol: TCP}}]
  resolution: STATIC
  endpoints:
    - {{address: 127.0.0.1, ports: {{{port_name}: {upstream_port}}}, labels: {{version: v1}}}}
    - {{address: 127.0.0.1, ports: {{{port_name}: {upstream_port}}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: bench}}
spec:
  host: {host}{origination}
  subsets:
    - {{name: v1, labels: {{version: v1}}}}
    - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata: {{name: bench}}
spec:
  hosts: [{host}]
  routes:
    - name: sayhello-to-v2
      match: {{attributes: {{method: {{exact: sayHello}}}}}}
      route: [{{destination: {dest % "v2"}}}]
    - name: split-20-80{_SPLIT_MATCH.get(protocol, "")}
      requestMutation: [{{key: x-bench, value: metaprotocol}}]
      route:
        - {{destination: {dest % "v1"}, weight: 20}}
        - {{destination: {dest % "v2"}, weight: 80}}
---
apiVersion: proxy.metaprotocol.io/v1alpha1
kind: ProxyConfig
metadata: {{name: bench}}
spec:
  listeners: [{{host: {host}, port: {port}, bind: "127.0.0.1:0"{listener_tls}}}]
  admin: {{bind: "127.0.0.1:0"}}
  limits: {{maxConnections: 100000}}{_THRIFT_CODEC_OPTIONS if protocol == "thrift" else ""}
"""


_T = "type.googleapis.com/envoy.extensions.filters.network"


_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"


def _upstream_tls(tls_dir: Path | None) -> str:
    """A cluster's TLS origination (verifying the canned upstream against the test CA)."""
    if tls_dir is None:
        return ""
    return f"""
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": {_TLS}.UpstreamTlsContext
        sni: {SERVER_NAME}
        common_tls_context:
          validation_context: {{trusted_ca: {{filename: {tls_dir / "ca.pem"}}}}}"""


def _downstream_tls(tls_dir: Path | None) -> str:
    """The listener's TLS termination."""
    if tls_dir is None:
        return ""
    return f"""
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": {_TLS}.DownstreamTlsContext
          common_tls_context:
            tls_certificates:
            - certificate_chain: {{filename: {tls_dir / "cert.pem"}}}
              private_key: {{filename: {tls_dir / "key.pem"}}}"""


def _cluster(name: str, upstream_port: int, options: str, tls_dir: Path | None = None) -> str:
    address = f"{{socket_address: {{address: 127.0.0.1, port_value: {upstream_port}}}}}"
    return f"""
  - name: {name}
    connect_timeout: 1s
    type: STATIC
    circuit_breakers:
      thresholds: [{{max_connections: 100000, max_pending_requests: 100000, max_requests: 100000}}]
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {address}}}{options}{_upstream_tls(tls_dir)}"""


_THRIFT_OPTIONS = f"""
    typed_extension_protocol_options:
      envoy.filters.network.thrift_proxy:
        "@type": {_T}.thrift_proxy.v3.ThriftProtocolOptions
        transport: FRAMED
        protocol: BINARY"""

_FILTERS = {
    "thrift": f"""
      - name: envoy.filters.network.thrift_proxy
        typed_config:
          "@type": {_T}.thrift_proxy.v3.ThriftProxy
          stat_prefix: thrift
          transport: FRAMED
          protocol: BINARY
          route_config:
            name: bench
            routes:
            - match: {{method_name: sayHello}}
              route: {{cluster: v2}}
            - match: {{method_name: ""}}
              route:
                weighted_clusters:
                  clusters: [{{name: v1, weight: 20}}, {{name: v2, weight: 80}}]
          thrift_filters:
          - name: envoy.filters.thrift.router
            typed_config:
              "@type": {_T}.thrift_proxy.router.v3.Router""",
    "dubbo": f"""
      - name: envoy.filters.network.dubbo_proxy
        typed_config:
          "@type": {_T}.dubbo_proxy.v3.DubboProxy
          stat_prefix: dubbo
          protocol_type: Dubbo
          serialization_type: Hessian2
          route_config:
          - name: bench
            interface: {DUBBO_INTERFACE}
            routes:
            - match: {{method: {{name: {{exact: sayHello}}}}}}
              route: {{cluster: v2}}
            - match: {{method: {{name: {{safe_regex: {{regex: ".*"}}}}}}}}
              route:
                weighted_clusters:
                  clusters: [{{name: v1, weight: 20}}, {{name: v2, weight: 80}}]
          dubbo_filters:
          - name: envoy.filters.dubbo.router""",
    "tcp": f"""
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": {_T}.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: v1""",
}


def envoy_yaml(kind: str, upstream_port: int, tls_dir: Path | None = None) -> str:
    """Envoy with one listener: ``thrift`` (thrift_proxy), ``dubbo`` (dubbo_proxy) or ``tcp``;
    with ``tls_dir`` (see ``tls.py``), TLS on the listener and to the upstream."""
    options = _THRIFT_OPTIONS if kind == "thrift" else ""
    clusters = "".join(_cluster(n, upstream_port, options, tls_dir) for n in ("v1", "v2"))
    return f"""\
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
static_resources:
  listeners:
  - name: bench
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:{_FILTERS[kind]}{_downstream_tls(tls_dir)}
  clusters:{clusters}
"""
