"""Envoy v3 resources (RDS, CDS, EDS) as the engine's validated configuration.

Pure functions, no I/O. The resources are read the way Aeraki and istiod write them for a
MetaProtocol sidecar (see ``docs/xds.md``), turned into the same documents a user would write
(``ServiceEntry``, ``DestinationRule``, ``MetaRouter``) and validated by the YAML loader, so a
route from the control plane obeys exactly the rules of a route from a file.

Every field set in a resource is honoured, ignored for a reason listed in :data:`IGNORED`
(it cannot change this engine's traffic), or refused with :class:`XdsRefused`, whose message
is the NACK's ``error_detail``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, TypeVar

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.transport_sockets.proxy_protocol.v3 import upstream_proxy_protocol_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from metaprotocol_sdk.errors import ConfigError

from ..addresses import port_number
from ..balancer import (
    MAGLEV_TABLE_SIZE,
    MAX_MAGLEV_TABLE_SIZE,
    MAX_RING_SIZE,
    RING_SIZE,
    is_prime,
)
from ..config.loader import MAX_NAME_LENGTH, PORT_PREFIX, build_config
from ..config.models import (
    AUTO_MTLS_KEY,
    MAXIMUM_RING_SIZE,
    PEER_EXCHANGE_KEY,
    PORT_PROXY_PROTOCOL,
    PORT_RETRY_BUDGET,
    Config,
    RetryBudget,
    locality_weight_label,
    priority_label,
    tls_mode_label,
)
from ..peer_exchange import ALPN as PEER_EXCHANGE

#: Fields read from each resource type and ignored, with why they cannot change traffic here.
IGNORED: dict[str, dict[str, str]] = {
    "RouteConfiguration": {
        "validate_clusters": "a route to an unknown cluster is answered ClusterNotFound either way",
        "metadata": "opaque to routing",
    },
    "VirtualHost": {
        "domains": "MetaProtocol requests have no authority: the listener picks the route table",
        "metadata": "opaque to routing",
    },
    "Route": {
        "metadata": "opaque to routing",
        "decorator": "an HTTP tracing operation name",
        "stat_prefix": "HTTP route statistics",
    },
    "RouteMatch": {"case_sensitive": "applies to the HTTP path, which MetaProtocol lacks"},
    "RegexMatcher": {"google_re2": "RE2 is the only engine (deprecated field)"},
    "HeaderValueOption": {
        "append": "a mutation sets the attribute, as Aeraki's mutations do",
        "append_action": "a mutation sets the attribute, as Aeraki's mutations do",
        "keep_empty_value": "an empty value is written as given",
    },
    "RequestMirrorPolicy": {
        "trace_sampled": "tracing follows the original request's decision",
        "disable_shadow_host_suffix_append": "MetaProtocol requests have no HTTP host",
    },
    "RuntimeFractionalPercent": {"runtime_key": "this engine has no runtime layer"},
    "Cluster": {
        "metadata": "Istio's service bookkeeping (the name carries host, port and subset)",
        "alt_stat_name": "the engine names cluster statistics by the cluster name",
        "filters": "Istio's TCP metadata exchange filter (istio.metadata_exchange): the engine "
        "speaks the exchange itself on ISTIO_MUTUAL connections, as the socket's ALPN says",
        "common_lb_config": "its healthy_panic_threshold is read with outlier_detection (as "
        "minHealthPercent; without it no endpoint is ejected, so there is no panic); with "
        "locality_weighted_lb_config, the localities' weights are checked (see "
        "LocalityLbEndpoints)",
        "dns_lookup_family": "addresses are resolved by the system resolver",
        "dns_refresh_rate": "addresses are resolved by the system resolver",
        "respect_dns_ttl": "addresses are resolved by the system resolver",
        "typed_dns_resolver_config": "addresses are resolved by the system resolver (istiod "
        "writes c-ares settings on every DNS cluster)",
        "dns_jitter": "addresses are resolved by the system resolver",
        "eds_cluster_config": "endpoints come over the same ADS stream",
        "per_connection_buffer_limit_bytes": "the engine's limits.connectionBufferBytes applies",
        "track_cluster_stats": "Envoy's own statistics",
    },
    "RingHashLbConfig": {
        "hash_function": "the engine hashes with BLAKE2b: which endpoint a key goes to "
        "differs from Envoy's either way",
    },
    "RuntimeDouble": {"runtime_key": "the engine has no runtime: default_value applies"},
    "LeastRequestLbConfig": {
        "choice_count": "the engine compares every endpoint's requests in flight",
        "active_request_bias": "fixed at Envoy's default, 1.0, for unequal weights",
    },
    "UpstreamConnectionOptions": {
        "set_local_interface_name_on_upstream_connections": "a connection-level log field",
        "happy_eyeballs_config": "endpoints are addresses: there is no address family to try",
    },
    "UpstreamHttpProtocolOptions": {
        "upstream_http_protocol_options": "HTTP's SNI and Host settings",
        "explicit_http_config": "the HTTP version of upstream connections (its HTTP/2 "
        "max_concurrent_streams is read)",
        "use_downstream_protocol_config": "the HTTP version of upstream connections",
        "auto_config": "the HTTP version of upstream connections",
        "header_validation_config": "HTTP header validation",
    },
    "ClusterLoadAssignment": {
        "policy": "endpoint staleness is Envoy's; the overprovisioning factor is checked to be "
        "Envoy's default, 140, where endpoints have several priorities",
    },
    "LocalityLbEndpoints": {
        "locality": "read only with the cluster's common_lb_config.locality_weighted_lb_config "
        "(locality weighted load balancing); istiod's locality failover arrives as each "
        "locality's priority",
        "load_balancing_weight": "Envoy reads it only with the cluster's common_lb_config."
        "locality_weighted_lb_config, and so does the engine (a hash ring's must be in "
        "proportion to the sums of the localities' endpoint weights)",
        "metadata": "opaque to load balancing",
    },
    "LbEndpoint": {
        "metadata": "Istio's workload labels (of its filter_metadata, only the tlsMode of "
        "envoy.transport_socket_match is read: it selects among transport_socket_matches)",
    },
    "TransportSocketMatch": {"name": "a name for Envoy's statistics"},
    "InboundListener": {
        "address": "the engine's listeners bind the addresses of the ProxyConfig; the inbound "
        "listener is read for its filter chains",
        "additional_addresses": "the engine's listeners bind the addresses of the ProxyConfig",
        "listener_filters": "the sidecar's original destination and TLS and HTTP inspectors: "
        "the engine's listeners accept their own port and tell TLS from plain text themselves",
        "listener_filters_timeout": "the engine's timeouts.handshake bounds TLS detection",
        "continue_on_listener_filters_timeout": "a connection that sends nothing is closed at "
        "timeouts.handshake",
        "traffic_direction": "always inbound",
        "max_connections_to_accept_per_socket_event": "Envoy's accept loop",
        "transparent": "the engine intercepts no traffic",
        "freebind": "the engine intercepts no traffic",
        "use_original_dst": "the engine intercepts no traffic",
        "bind_to_port": "the engine's listeners bind their own ports",
        "socket_options": "socket options of Envoy's listening socket",
        "access_log": "the engine writes its own access log (spec.accessLog)",
        "stat_prefix": "Envoy's statistics",
        "metadata": "opaque to policies",
        "per_connection_buffer_limit_bytes": "the engine's limits.connectionBufferBytes applies",
        "tcp_backlog_size": "the engine's listen backlog",
        "reuse_port": "the engine's listening sockets",
        "enable_reuse_port": "the engine's listening sockets",
    },
    "InboundFilterChain": {
        "metadata": "Istio's bookkeeping (the Sidecar resource a chain came from)",
        "transport_socket_connect_timeout": "the engine's timeouts.handshake bounds the handshake",
    },
    "ProxyProtocolConfig": {
        "pass_through_tlvs": "the TLVs of the client's own PROXY protocol header: the engine "
        "reads none from its clients, so there are none to pass (as in Envoy without one)",
    },
    "Endpoint": {
        "hostname": "the address is connected to",
        "health_check_config": "no health checks; outlier detection ejects failing endpoints",
    },
    "SocketAddress": {"protocol": "TCP is the only protocol", "ipv4_compat": "an IPv6 detail"},
    "Thresholds": {"track_remaining": "Envoy's own statistics", "priority": "checked: DEFAULT"},
    "SdsSecretConfig": {
        "sds_config": "the name says which files to read (Istio's file-cert: and file-root: "
        "names), and the engine reads them itself, as istio-agent's SDS server does for them",
    },
    "UpstreamTlsContext": {
        "max_session_keys": "the engine resumes no TLS session: every connection makes a full "
        "handshake, so there is nothing to cache",
    },
}

#: Circuit-breaker thresholds at or above it mean "no limit" (istiod writes 2^32 - 1).
UNLIMITED = 2**31

#: Label keys the translation gives endpoints so that subset clusters can select them.
SUBSET_LABEL = "xds.metaprotocol.io/subset-"


class XdsRefused(ValueError):
    """A resource this engine cannot apply; ``str()`` is the NACK's ``error_detail``."""

    def __init__(self, resource: str, path: str, reason: str) -> None:
        self.resource = resource
        self.path = path
        self.reason = reason
        where = f"{resource}: {path}" if path else resource
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class ClusterName:
    """Istio's ``outbound|<port>|<subset>|<host>`` cluster name, parsed."""

    host: str
    port: int
    subset: str | None

    def __str__(self) -> str:
        return f"outbound|{self.port}|{self.subset or ''}|{self.host}"


def parse_cluster_name(name: str) -> ClusterName | None:
    """The parts of an outbound cluster name, or ``None`` for any other name (``inbound|...``,
    ``BlackHoleCluster``, ``PassthroughCluster``...)."""
    parts = name.split("|")
    if len(parts) != 4 or parts[0] != "outbound" or not parts[3]:
        return None
    port = port_number(parts[1])
    # As istiod writes it (no leading zero): one name per cluster, which ``str`` gives back.
    if port is None or not 0 < port < 65536 or str(port) != parts[1]:
        return None
    return ClusterName(parts[3], port, parts[2] or None)


class PackedClusters(Mapping[str, Message]):
    """CDS clusters held encoded, each decoded when read (a new message at each read).

    istiod sends every service of the mesh and only the clusters of the hosts in use are
    read; a decoded ``Cluster`` takes 10 to 50 times its encoded size (5.4 KiB for the 380
    bytes of istiod's, 1.3 KiB for a bare one of 25), the bytes (and their key) a tenth of
    it. Iterating the names, ``len`` and ``in`` decode nothing."""

    def __init__(self, encoded: Mapping[str, bytes]) -> None:
        self.encoded = encoded

    def __getitem__(self, name: str) -> Message:
        return cluster_pb2.Cluster.FromString(self.encoded[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.encoded)

    def __len__(self) -> int:
        return len(self.encoded)

    def __contains__(self, name: object) -> bool:
        return name in self.encoded


@dataclass(frozen=True)
class Resources:
    """The accepted state of the world: resources by name, per type."""

    routes: Mapping[str, Message] = field(default_factory=dict)
    clusters: Mapping[str, Message] = field(default_factory=dict)
    endpoints: Mapping[str, Message] = field(default_factory=dict)
    #: The inbound listener (``spec.xds.inboundListener``), if it came; no other.
    listeners: Mapping[str, Message] = field(default_factory=dict)


def route_config_name(host: str, port: int) -> str:
    """Aeraki's RDS name for a listener: ``<host>_<port>``."""
    return f"{host}_{port}"


def route_config_names(base: Config) -> list[str]:
    """The RDS names this proxy subscribes to: one per listener."""
    return [route_config_name(li.host, li.port) for li in base.proxy.listeners]


def eds_name(cluster: Message) -> str | None:
    """The EDS name of a CDS cluster (outbound, type EDS), or ``None``: its endpoints do not
    come over EDS."""
    if parse_cluster_name(cluster.name) is None:
        return None
    if cluster.WhichOneof("cluster_discovery_type") == "type" and cluster.type == 3:
        return cluster.eds_cluster_config.service_name or cluster.name  # type: ignore[no-any-return]
    return None


def eds_names(clusters: Iterable[Message]) -> list[str]:
    """The EDS names to subscribe to for these CDS clusters (outbound, type EDS)."""
    return sorted({name for cluster in clusters if (name := eds_name(cluster)) is not None})


def routed_clusters(routes: Iterable[Message]) -> set[str]:
    """The cluster names these RDS route configurations send to (a route's cluster or
    weighted clusters, and its mirror), read without validating them (:func:`translate`
    does that)."""
    names: set[str] = set()
    for rc in routes:
        for vh in rc.virtual_hosts:
            for r in vh.routes:
                if r.WhichOneof("action") != "route":
                    continue
                action = r.route
                which = action.WhichOneof("cluster_specifier")
                if which == "cluster":
                    names.add(action.cluster)
                elif which == "weighted_clusters":
                    names.update(cw.name for cw in action.weighted_clusters.clusters)
                names.update(mp.cluster for mp in action.request_mirror_policies)
    names.discard("")
    return names


def used_hosts(base: Config, routes: Mapping[str, Message]) -> set[str]:
    """The hosts this engine uses, whose clusters are translated (and their endpoints
    subscribed to): those of its files' ServiceEntries (its listeners' among them) and those
    its listeners' route tables send to, mirrors included. istiod's CDS names every service
    of the mesh; the others cannot change this engine's traffic until a route names them."""
    names = set(route_config_names(base))
    hosts = set(base.services)
    for name in routed_clusters(rc for key, rc in routes.items() if key in names):
        parsed = parse_cluster_name(name)
        if parsed is not None:
            hosts.add(parsed.host)
    return hosts


# -- field tables ------------------------------------------------------------------------------


def _retry_budget(res: str, budget: Any, path: str) -> dict[str, Any]:
    """A threshold's ``retry_budget`` as ``trafficPolicy.retryBudget``, with Envoy's defaults
    written and its ``0`` floor kept (the loader reads both as given from xDS). A
    ``budget_interval`` (field 3, newer than these protos) other than 0 s is refused."""
    check_fields(res, budget, path, "RetryBudget", {"budget_percent", "min_retry_concurrency"})
    for unknown in UnknownFieldSet(budget):
        if unknown.field_number != 3:
            raise XdsRefused(res, path, f"has field {unknown.field_number}, unknown to this engine")
        if unknown.wire_type != 2 or unknown.data:  # a Duration; empty: 0s, Envoy's default
            raise XdsRefused(
                res,
                f"{path}.budget_interval",
                "not supported by this engine: a budget over the requests of a past interval "
                "(the budget counts the requests in flight only)",
            )
    default = RetryBudget()  # Envoy's defaults are Istio's
    percent, floor = budget.budget_percent, budget.min_retry_concurrency
    return {
        "percent": percent.value if budget.HasField("budget_percent") else default.percent,
        "minRetryConcurrency": (
            floor.value
            if budget.HasField("min_retry_concurrency")
            else default.min_retry_concurrency
        ),
    }


_M = TypeVar("_M", bound=Message)


def _unpack(resource: str, packed: Any, into: _M, path: str) -> _M:
    """``packed`` (a protobuf ``Any``) unpacked into ``into``; refused, naming ``path``, when
    it holds another type or cannot be decoded."""
    try:
        if not packed.Unpack(into):
            raise DecodeError(f"not a {into.DESCRIPTOR.name}")
    except DecodeError as exc:
        raise XdsRefused(resource, path, f"cannot be decoded: {exc}") from None
    return into


def check_fields(resource: str, msg: Message, path: str, kind: str, honoured: set[str]) -> None:
    """Refuse any field set in ``msg`` that is neither honoured nor listed in IGNORED."""
    ignored = IGNORED.get(kind, {})
    for desc, _ in msg.ListFields():
        if desc.name in honoured or desc.name in ignored:
            continue
        where = f"{path}.{desc.name}" if path else desc.name
        raise XdsRefused(resource, where, f"not supported by this engine ({kind}.{desc.name})")


def _seconds(d: Duration) -> float:
    return float(d.seconds + d.nanos / 1e9)


def _duration(d: Duration) -> str:
    return f"{_seconds(d):.9f}".rstrip("0").rstrip(".") + "s"


# -- RDS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HashKey:
    """What a route's hash policy hashes: a metadata attribute (Envoy's ``header``) or, with
    ``attribute`` ``None``, the client's IP address (``connection_properties.source_ip``)."""

    attribute: str | None

    def __str__(self) -> str:
        return "the source IP" if self.attribute is None else repr(self.attribute)

    def consistent_hash(self) -> dict[str, Any]:
        """The key as a DestinationRule's ``consistentHash`` writes it."""
        if self.attribute is None:
            return {"useSourceIp": True}
        return {"httpHeaderName": self.attribute}


@dataclass
class _RouteTable:
    host: str
    port: int
    doc: dict[str, Any]
    #: The hash key the routes ask for, per cluster name they send to.
    hashes: dict[str, HashKey]
    #: Cluster names the routes send to (including mirrors).
    clusters: set[str]


def _header_match(res: str, m: Any, path: str) -> dict[str, str] | None:
    check_fields(
        res,
        m,
        path,
        "HeaderMatcher",
        {
            "name",
            "exact_match",
            "prefix_match",
            "safe_regex_match",
            "present_match",
            "string_match",
        },
    )
    which = m.WhichOneof("header_match_specifier")
    if which == "exact_match":
        # Envoy reads an empty exact_match as "present"; string_match.exact "" is not.
        return {"exact": m.exact_match} if m.exact_match else None
    if which == "prefix_match":
        return {"prefix": m.prefix_match}
    if which == "safe_regex_match":
        check_fields(res, m.safe_regex_match, f"{path}.safe_regex_match", "RegexMatcher", {"regex"})
        return {"regex": m.safe_regex_match.regex}
    if which == "present_match":
        if not m.present_match:
            raise XdsRefused(res, f"{path}.present_match", "only present_match: true is supported")
        return None
    if which == "string_match":
        sm = m.string_match
        spath = f"{path}.string_match"
        check_fields(res, sm, spath, "StringMatcher", {"exact", "prefix", "safe_regex"})
        kind = sm.WhichOneof("match_pattern")
        if kind == "safe_regex":
            check_fields(res, sm.safe_regex, f"{spath}.safe_regex", "RegexMatcher", {"regex"})
            return {"regex": sm.safe_regex.regex}
        if kind == "exact" and not sm.exact:
            return {"regex": "^$"}  # the empty value only (``exact: ""`` is "present")
        if kind in ("exact", "prefix"):
            return {kind: getattr(sm, kind)}
        raise XdsRefused(res, spath, "needs exact, prefix or safe_regex")
    return None  # no specifier: Envoy's "present"


def _mutation(res: str, options: Iterable[Any], path: str) -> list[dict[str, str]]:
    out = []
    for i, opt in enumerate(options):
        ipath = f"{path}[{i}]"
        check_fields(res, opt, ipath, "HeaderValueOption", {"header"})
        check_fields(
            res, opt.header, f"{ipath}.header", "HeaderValue", {"key", "value", "raw_value"}
        )
        value = opt.header.value
        if opt.header.raw_value:
            try:
                value = opt.header.raw_value.decode()
            except UnicodeDecodeError:
                raise XdsRefused(res, f"{ipath}.header.raw_value", "must be UTF-8") from None
        out.append({"key": opt.header.key, "value": value})
    return out


def _destination(res: str, name: str, path: str) -> dict[str, Any]:
    parsed = parse_cluster_name(name)
    if parsed is None:
        raise XdsRefused(
            res, path, f"cluster {name!r} is not an Istio name outbound|<port>|<subset>|<host>"
        )
    dest: dict[str, Any] = {"host": parsed.host, "port": {"number": parsed.port}}
    if parsed.subset:
        dest["subset"] = parsed.subset
    return dest


#: ``FractionalPercent.DenominatorType``: HUNDRED, TEN_THOUSAND, MILLION.
_DENOMINATORS = {0: 100, 1: 10_000, 2: 1_000_000}


def _route(res: str, r: Any, i: int, table: _RouteTable) -> dict[str, Any]:
    path = f"virtual_hosts[0].routes[{i}]"
    check_fields(
        res,
        r,
        path,
        "Route",
        {"name", "match", "route", "request_headers_to_add", "response_headers_to_add"},
    )
    if r.WhichOneof("action") != "route":
        raise XdsRefused(res, path, "only a route action (to clusters) is supported")
    check_fields(res, r.match, f"{path}.match", "RouteMatch", {"prefix", "headers"})
    if r.match.prefix not in ("", "/"):
        raise XdsRefused(
            res, f"{path}.match.prefix", f"must be '/' (MetaRDS), got {r.match.prefix!r}"
        )
    attributes: dict[str, Any] = {}
    for h, m in enumerate(r.match.headers):
        hpath = f"{path}.match.headers[{h}]"
        if m.name in attributes:
            raise XdsRefused(res, hpath, f"attribute {m.name!r} is matched twice")
        attributes[m.name] = _header_match(res, m, hpath)
    route: dict[str, Any] = {"name": r.name or f"route-{i}", "match": {"attributes": attributes}}
    action = r.route
    apath = f"{path}.route"
    check_fields(
        res,
        action,
        apath,
        "RouteAction",
        {"cluster", "weighted_clusters", "request_mirror_policies", "hash_policy", "timeout"},
    )
    targets: list[str] = []
    which = action.WhichOneof("cluster_specifier")
    if which == "cluster":
        route["route"] = [{"destination": _destination(res, action.cluster, f"{apath}.cluster")}]
        targets.append(action.cluster)
    elif which == "weighted_clusters":
        wc = action.weighted_clusters
        check_fields(
            res, wc, f"{apath}.weighted_clusters", "WeightedCluster", {"clusters", "total_weight"}
        )
        dests = []
        for c, cw in enumerate(wc.clusters):
            cpath = f"{apath}.weighted_clusters.clusters[{c}]"
            check_fields(res, cw, cpath, "ClusterWeight", {"name", "weight"})
            dests.append(
                {
                    "destination": _destination(res, cw.name, f"{cpath}.name"),
                    "weight": cw.weight.value,
                }
            )
            targets.append(cw.name)
        total = sum(d["weight"] for d in dests)
        if wc.HasField("total_weight") and wc.total_weight.value != total:
            raise XdsRefused(
                res,
                f"{apath}.weighted_clusters.total_weight",
                f"is {wc.total_weight.value}, the weights add up to {total}",
            )
        if len(dests) == 1:
            dests[0].pop("weight")
        route["route"] = dests
    else:
        raise XdsRefused(res, apath, "needs cluster or weighted_clusters")
    if action.HasField("timeout"):
        if _seconds(action.timeout) <= 0:
            raise XdsRefused(res, f"{apath}.timeout", "0 (no timeout) is not supported")
        route["timeout"] = _duration(action.timeout)
    mirrors = list(action.request_mirror_policies)
    if len(mirrors) > 1:
        raise XdsRefused(res, f"{apath}.request_mirror_policies", "at most one mirror per route")
    if mirrors:
        mp = mirrors[0]
        mpath = f"{apath}.request_mirror_policies[0]"
        check_fields(res, mp, mpath, "RequestMirrorPolicy", {"cluster", "runtime_fraction"})
        route["mirror"] = _destination(res, mp.cluster, f"{mpath}.cluster")
        table.clusters.add(mp.cluster)
        if mp.HasField("runtime_fraction"):
            rf = mp.runtime_fraction
            check_fields(
                res, rf, f"{mpath}.runtime_fraction", "RuntimeFractionalPercent", {"default_value"}
            )
            per = _DENOMINATORS.get(rf.default_value.denominator)
            if per is None:
                raise XdsRefused(
                    res,
                    f"{mpath}.runtime_fraction.default_value.denominator",
                    f"unknown denominator {rf.default_value.denominator}",
                )
            share = min(rf.default_value.numerator / per, 1.0) * 100
            route["mirrorPercentage"] = {"value": share}
    # Aeraki writes one hash policy per weighted destination whose DestinationRule subset
    # hashes on a header, so a split between two such subsets repeats it: Envoy combines the
    # hashes, which for one header is still a function of its value alone.
    keys = [
        _hash_key(res, hp, f"{apath}.hash_policy[{h}]") for h, hp in enumerate(action.hash_policy)
    ]
    for h, key in enumerate(keys):
        if key != keys[0]:
            raise XdsRefused(
                res,
                f"{apath}.hash_policy[{h}]",
                f"hashes on {key} and {keys[0]}: one key per route (Envoy combines the "
                "hashes of several)",
            )
    # One key, so each destination is checked once (per policy, it was quadratic: 16 000
    # policies over 16 000 destinations, 627 KB, took 35 s of CPU).
    for target in targets if keys else ():
        known = table.hashes.setdefault(target, keys[0])
        if known != keys[0]:
            raise XdsRefused(
                res,
                f"{apath}.hash_policy[0]",
                f"cluster {target!r} is hashed on {known} by another route",
            )
    table.clusters.update(targets)
    request = _mutation(res, r.request_headers_to_add, f"{path}.request_headers_to_add")
    response = _mutation(res, r.response_headers_to_add, f"{path}.response_headers_to_add")
    if request:
        route["requestMutation"] = request
    if response:
        route["responseMutation"] = response
    return route


def _hash_key(res: str, hp: Any, path: str) -> HashKey:
    """A route's hash policy: a header (a metadata attribute) or the source IP."""
    check_fields(res, hp, path, "HashPolicy", {"header", "connection_properties"})
    if hp.HasField("connection_properties"):
        cpath = f"{path}.connection_properties"
        check_fields(res, hp.connection_properties, cpath, "ConnectionProperties", {"source_ip"})
        if not hp.connection_properties.source_ip:
            raise XdsRefused(res, f"{cpath}.source_ip", "false hashes nothing")
        return HashKey(None)
    if not hp.header.header_name.strip():  # Envoy's validation refuses both
        raise XdsRefused(
            res, path, "hashes nothing: set header or connection_properties (a header name)"
        )
    return HashKey(hp.header.header_name)


def _route_table(name: str, rc: Any, listeners: Mapping[str, tuple[str, int]]) -> _RouteTable:
    res = f"RDS {name}"
    check_fields(res, rc, "", "RouteConfiguration", {"name", "virtual_hosts"})
    host, port = listeners[name]
    if len(rc.virtual_hosts) != 1:
        raise XdsRefused(
            res,
            "virtual_hosts",
            f"expected one virtual host (MetaRDS), got {len(rc.virtual_hosts)}",
        )
    vh = rc.virtual_hosts[0]
    check_fields(res, vh, "virtual_hosts[0]", "VirtualHost", {"name", "routes"})
    table = _RouteTable(host, port, {}, {}, set())
    routes = [_route(res, r, i, table) for i, r in enumerate(vh.routes)]
    table.doc = {
        "kind": "MetaRouter",
        "metadata": {"name": name},
        "spec": {"hosts": [host], "routes": routes},
    }
    return table


# -- CDS / EDS ---------------------------------------------------------------------------------


class _Endpoint(NamedTuple):
    """One endpoint of a cluster to route to."""

    address: str
    port: int
    #: Its ``load_balancing_weight`` (1 when unset).
    weight: int
    #: Its ``LocalityLbEndpoints.priority`` (failover level, 0 the first).
    priority: int
    #: Its ``envoy.transport_socket_match`` metadata says ``tlsMode: istio`` (a sidecar).
    mesh_tls: bool = False
    #: Locality weighted balancing: its ``LocalityLbEndpoints``' locality
    #: (``region/zone/subzone``) and ``load_balancing_weight`` (``None``: not weighted).
    locality: tuple[str, int] | None = None


@dataclass
class _HostPort:
    """One outbound cluster's parsed policy and endpoints."""

    name: ClusterName
    policy: dict[str, Any]
    #: Its ``consistentHash`` algorithm (``ringHash`` or ``maglev`` and their settings) when
    #: its policy is RING_HASH or MAGLEV, else ``None``.
    hashing: dict[str, Any] | None
    endpoints: list[_Endpoint]
    #: The xDS field each key of ``policy["tls"]`` came from.
    tls_origin: dict[str, str] = field(default_factory=dict)


_LB = {0: "ROUND_ROBIN", 1: "LEAST_REQUEST", 3: "RANDOM"}
#: The ``typed_extension_protocol_options`` key istiod writes a connection pool's
#: ``idleTimeout``, ``maxRequestsPerConnection`` and ``maxConnectionDuration`` under.
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _http_options(
    res: str, opts: Any, path: str, tcp: dict[str, Any], http: dict[str, Any]
) -> None:
    """A cluster's ``HttpProtocolOptions`` (``config.core.v3``): its connection lifetimes, as
    istiod writes a DestinationRule's (0 or unset: no limit)."""
    check_fields(
        res,
        opts,
        path,
        "HttpProtocolOptions",
        {"idle_timeout", "max_connection_duration", "max_requests_per_connection"},
    )
    if opts.HasField("idle_timeout") and _seconds(opts.idle_timeout) > 0:
        http["idleTimeout"] = _duration(opts.idle_timeout)
    if opts.HasField("max_connection_duration") and _seconds(opts.max_connection_duration) > 0:
        tcp["maxConnectionDuration"] = _duration(opts.max_connection_duration)
    if opts.HasField("max_requests_per_connection") and opts.max_requests_per_connection.value:
        http["maxRequestsPerConnection"] = opts.max_requests_per_connection.value


#: Envoy's default ``max_concurrent_streams`` (2^31 - 1): no limit here.
MAX_STREAMS = 2**31 - 1


def _concurrent_streams(explicit: Any, http: dict[str, Any]) -> None:
    """The ``max_concurrent_streams`` istiod writes for ``http.maxConcurrentStreams`` (in
    ``explicit_http_config.http2_protocol_options``): requests in flight per upstream
    connection. Envoy's default (2^31 - 1) and 0 (unset) are no limit. The rest of
    ``explicit_http_config`` chooses HTTP versions and HTTP/2 settings, which a MetaProtocol
    connection has none of: ignored, as before."""
    if not explicit.HasField("http2_protocol_options"):
        return
    h2 = explicit.http2_protocol_options
    streams = h2.max_concurrent_streams.value if h2.HasField("max_concurrent_streams") else 0
    if 0 < streams < MAX_STREAMS:
        http["maxConcurrentStreams"] = streams


#: The balancer config whose ``slow_start_config`` each ``lb_policy`` reads (Envoy ignores
#: the other's, and every other policy's: istiod writes it for these two only).
_SLOW_START = {0: "round_robin_lb_config", 1: "least_request_lb_config"}


def _slow_start(res: str, c: Any) -> dict[str, Any] | None:
    """The cluster's ``slow_start_config`` as Istio's ``loadBalancer.warmup`` (``None``:
    none, or a window under 1ms, which Envoy counts as 0: off)."""
    name = _SLOW_START.get(c.lb_policy)
    if name is None or not c.HasField(name) or not getattr(c, name).HasField("slow_start_config"):
        return None
    path = f"{name}.slow_start_config"
    ss = getattr(c, name).slow_start_config
    check_fields(
        res, ss, path, "SlowStartConfig", {"slow_start_window", "aggression", "min_weight_percent"}
    )
    millis = int(_seconds(ss.slow_start_window) * 1000)  # Envoy's window, in whole ms
    if millis <= 0:
        return None
    warmup: dict[str, Any] = {"duration": f"{millis}ms"}
    if ss.HasField("min_weight_percent"):
        check_fields(res, ss.min_weight_percent, f"{path}.min_weight_percent", "Percent", {"value"})
        warmup["minimumPercent"] = ss.min_weight_percent.value  # the loader checks 0-100
    if ss.HasField("aggression"):
        check_fields(res, ss.aggression, f"{path}.aggression", "RuntimeDouble", {"default_value"})
        aggression = ss.aggression.default_value
        if aggression > 0:  # else (or NaN) Envoy uses 1.0, the default
            warmup["aggression"] = aggression
    return warmup


def _cluster_policy(res: str, c: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    check_fields(
        res,
        c,
        "",
        "Cluster",
        {
            "name",
            "type",
            "lb_policy",
            "connect_timeout",
            "circuit_breakers",
            "outlier_detection",
            "load_assignment",
            "max_requests_per_connection",
            "common_http_protocol_options",
            "typed_extension_protocol_options",
            "upstream_connection_options",
            "transport_socket",
            "transport_socket_matches",
            "ring_hash_lb_config",
            "maglev_lb_config",
            "least_request_lb_config",
            "round_robin_lb_config",
        },
    )
    # The balancer's own settings (istiod writes a ring's minimum size for every
    # consistentHash): read for what changes traffic (slow start: above).
    for name, kind in (
        ("least_request_lb_config", "LeastRequestLbConfig"),
        ("round_robin_lb_config", "RoundRobinLbConfig"),
    ):
        if c.HasField(name):
            check_fields(res, getattr(c, name), name, kind, {"slow_start_config"})
    policy: dict[str, Any] = {}
    hashing = _hashing(res, c)
    if hashing is None:
        if c.lb_policy not in _LB:
            raise XdsRefused(res, "lb_policy", f"load balancer {c.lb_policy} is not supported")
        policy["loadBalancer"] = {"simple": _LB[c.lb_policy]}
        warmup = _slow_start(res, c)
        if warmup is not None:
            policy["loadBalancer"]["warmup"] = warmup
    tcp: dict[str, Any] = {}
    http: dict[str, Any] = {}
    if c.HasField("connect_timeout"):
        # Envoy refuses one not above 0 (it was ignored: the engine's 5 s applied instead).
        ct = c.connect_timeout
        if not 0 <= ct.nanos < 1_000_000_000 or _seconds(ct) <= 0:
            raise XdsRefused(
                res,
                "connect_timeout",
                f"must be above 0 with nanos in [0, 1e9) (as in Envoy), got {ct.seconds} s "
                f"{ct.nanos} ns",
            )
        tcp["connectTimeout"] = _duration(ct)
    if c.HasField("max_requests_per_connection"):
        http["maxRequestsPerConnection"] = c.max_requests_per_connection.value
    if c.HasField("common_http_protocol_options"):  # deprecated: istiod writes the one below
        _http_options(
            res, c.common_http_protocol_options, "common_http_protocol_options", tcp, http
        )
    for key in c.typed_extension_protocol_options:
        kpath = f"typed_extension_protocol_options[{key!r}]"
        if key != _HTTP_OPTIONS:
            raise XdsRefused(res, kpath, "not supported by this engine (only HttpProtocolOptions)")
        options = _unpack(
            res,
            c.typed_extension_protocol_options[key],
            http_protocol_options_pb2.HttpProtocolOptions(),
            kpath,
        )
        check_fields(
            res,
            options,
            kpath,
            "UpstreamHttpProtocolOptions",
            {"common_http_protocol_options", "explicit_http_config"},
        )
        if options.HasField("common_http_protocol_options"):
            path = f"{kpath}.common_http_protocol_options"
            _http_options(res, options.common_http_protocol_options, path, tcp, http)
        if options.HasField("explicit_http_config"):
            _concurrent_streams(options.explicit_http_config, http)
    if c.HasField("upstream_connection_options"):
        uco = c.upstream_connection_options
        check_fields(
            res, uco, "upstream_connection_options", "UpstreamConnectionOptions", {"tcp_keepalive"}
        )
        if uco.HasField("tcp_keepalive"):  # istiod's tcp.tcpKeepalive (or the mesh's)
            ka = uco.tcp_keepalive
            alive: dict[str, Any] = {}
            if ka.HasField("keepalive_probes"):
                alive["probes"] = ka.keepalive_probes.value
            for field_name, key in (("keepalive_time", "time"), ("keepalive_interval", "interval")):
                if getattr(ka, field_name).value > 0:
                    alive[key] = f"{getattr(ka, field_name).value}s"
            tcp["tcpKeepalive"] = alive
    for t, th in enumerate(c.circuit_breakers.thresholds):
        tpath = f"circuit_breakers.thresholds[{t}]"
        check_fields(
            res,
            th,
            tpath,
            "Thresholds",
            {
                "max_connections",
                "max_pending_requests",
                "max_requests",
                "max_retries",
                "retry_budget",
            },
        )
        if th.priority != 0:
            continue  # HIGH priority: routes here have no priority, so DEFAULT applies
        if th.HasField("retry_budget"):  # istiod's trafficPolicy.retryBudget
            policy["retryBudget"] = _retry_budget(res, th.retry_budget, f"{tpath}.retry_budget")
        for key, out, into in (
            ("max_connections", "maxConnections", tcp),
            ("max_pending_requests", "http1MaxPendingRequests", http),
            ("max_requests", "http2MaxRequests", http),
            ("max_retries", "maxRetries", http),
        ):
            # istiod writes 4294967295 (2^32 - 1) for "no limit": leave those unset.
            if th.HasField(key) and getattr(th, key).value < UNLIMITED:
                into[out] = getattr(th, key).value
    pool = {k: v for k, v in (("tcp", tcp), ("http", http)) if v}
    if pool:
        policy["connectionPool"] = pool
    if c.HasField("outlier_detection"):
        od = c.outlier_detection
        check_fields(
            res,
            od,
            "outlier_detection",
            "OutlierDetection",
            {
                "consecutive_5xx",
                "consecutive_gateway_failure",
                "interval",
                "base_ejection_time",
                "max_ejection_percent",
                "enforcing_consecutive_5xx",
                "enforcing_consecutive_gateway_failure",
                "enforcing_success_rate",
                "split_external_local_origin_errors",
                "consecutive_local_origin_failure",
                "enforcing_consecutive_local_origin_failure",
                "enforcing_local_origin_success_rate",
            },
        )
        # istiod turns Envoy's success-rate ejection off on every cluster it writes (0 %).
        if od.HasField("enforcing_success_rate") and od.enforcing_success_rate.value > 0:
            raise XdsRefused(
                res,
                "outlier_detection.enforcing_success_rate",
                "not supported by this engine: success-rate ejection (only consecutive "
                "errors are counted; istiod writes 0)",
            )
        if (
            od.HasField("enforcing_local_origin_success_rate")
            and od.enforcing_local_origin_success_rate.value > 0
        ):
            raise XdsRefused(
                res,
                "outlier_detection.enforcing_local_origin_success_rate",
                "not supported by this engine: success-rate ejection (only consecutive "
                "errors are counted; istiod writes 0)",
            )
        # Envoy enforces consecutive 5xx by default (5 in a row, 100 %) and gateway failures
        # only when asked (0 %); istiod sets each enforcing field to 0 or 100 to say whether
        # the Istio field is on. Each is written out, so that the loader's own defaults play
        # no part (consecutive5xxErrors 0 with no gateway errors: detection off).
        detection: dict[str, Any] = {}
        five = od.consecutive_5xx.value if od.HasField("consecutive_5xx") else 5
        if od.HasField("enforcing_consecutive_5xx") and od.enforcing_consecutive_5xx.value == 0:
            five = 0  # off, as Istio's consecutive5xxErrors: 0
        detection["consecutive5xxErrors"] = five
        if od.enforcing_consecutive_gateway_failure.value > 0:
            detection["consecutiveGatewayErrors"] = (
                od.consecutive_gateway_failure.value
                if od.HasField("consecutive_gateway_failure")
                else 5
            )
        if od.split_external_local_origin_errors:
            # Envoy counts local-origin failures apart, 5 in a row enforced at 100 % unless
            # told otherwise (istiod writes the Istio field's value with 100 when it is set).
            detection["splitExternalLocalOriginErrors"] = True
            local = (
                od.consecutive_local_origin_failure.value
                if od.HasField("consecutive_local_origin_failure")
                else 5
            )
            enforcing = od.enforcing_consecutive_local_origin_failure
            if od.HasField("enforcing_consecutive_local_origin_failure") and enforcing.value == 0:
                raise XdsRefused(
                    res,
                    "outlier_detection.enforcing_consecutive_local_origin_failure",
                    "not supported by this engine: counting local-origin failures without "
                    "ejecting (0 %); istiod writes 100",
                )
            detection["consecutiveLocalOriginFailures"] = local
        if od.HasField("interval"):
            detection["interval"] = _duration(od.interval)
        if od.HasField("base_ejection_time"):
            detection["baseEjectionTime"] = _duration(od.base_ejection_time)
        if od.HasField("max_ejection_percent"):
            detection["maxEjectionPercent"] = od.max_ejection_percent.value
        # Panic mode: istiod writes minHealthPercent (0 by default) as the healthy panic
        # threshold; Envoy's default is 50 %.
        lb_config = c.common_lb_config
        panic = (
            lb_config.healthy_panic_threshold.value
            if lb_config.HasField("healthy_panic_threshold")
            else 50.0
        )
        if not (0 <= panic <= 100 and panic == int(panic)):
            raise XdsRefused(
                res,
                "common_lb_config.healthy_panic_threshold",
                f"must be a whole percentage (minHealthPercent), got {panic!r}",
            )
        detection["minHealthPercent"] = int(panic)
        policy["outlierDetection"] = detection
    return policy, hashing


def _hashing(res: str, c: Any) -> dict[str, Any] | None:
    """A RING_HASH or MAGLEV cluster's algorithm as a ``consistentHash`` writes it, with its
    ``ring_hash_lb_config`` or ``maglev_lb_config`` (Envoy's defaults where unset: a ring of
    at least 1024 points, a table of 65537); ``None`` for other policies."""
    if c.HasField("ring_hash_lb_config"):
        honoured = {"minimum_ring_size", "maximum_ring_size"}
        check_fields(
            res, c.ring_hash_lb_config, "ring_hash_lb_config", "RingHashLbConfig", honoured
        )
    if c.HasField("maglev_lb_config"):
        check_fields(res, c.maglev_lb_config, "maglev_lb_config", "MaglevLbConfig", {"table_size"})
    if c.lb_policy == 2:  # RING_HASH
        config = c.ring_hash_lb_config
        ring: dict[str, Any] = {}
        low = config.minimum_ring_size.value if config.HasField("minimum_ring_size") else RING_SIZE
        if low > MAX_RING_SIZE:
            raise XdsRefused(
                res,
                "ring_hash_lb_config.minimum_ring_size",
                f"at most {MAX_RING_SIZE} points (the ring is built again at each change of "
                f"the endpoints, on the engine's only thread), got {low}",
            )
        ring["minimumRingSize"] = low
        if config.HasField("maximum_ring_size"):
            high = config.maximum_ring_size.value
            if high < low:  # as Envoy refuses it
                raise XdsRefused(
                    res,
                    "ring_hash_lb_config.maximum_ring_size",
                    f"{high} is less than minimum_ring_size {low}",
                )
            ring[MAXIMUM_RING_SIZE] = high
        return {"ringHash": ring}
    if c.lb_policy == 5:  # MAGLEV
        config = c.maglev_lb_config
        size = config.table_size.value if config.HasField("table_size") else MAGLEV_TABLE_SIZE
        if size > MAX_MAGLEV_TABLE_SIZE or not is_prime(size):
            raise XdsRefused(
                res,
                "maglev_lb_config.table_size",
                f"must be a prime of at most {MAX_MAGLEV_TABLE_SIZE}, got {size}",
            )
        return {"maglev": {"tableSize": size}}
    return None


# -- a cluster's transport socket: TLS ---------------------------------------------------------

_UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_RAW_BUFFER = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
#: istio-agent's SDS names (``ISTIO_MUTUAL``): the workload certificate and the mesh's root.
_ISTIO_SDS = {"default": "workload certificate", "ROOTCA": "mesh root certificate"}
#: Istio's SDS names for a DestinationRule's files (``SdsCertificateConfig``).
_FILE_CERT, _FILE_ROOT = "file-cert:", "file-root:"
#: ``file-root:system``: the system's trust store (istiod's name when caCertificates is unset).
_SYSTEM_ROOT = "system"
_PROVIDERS = "certificate providers are not supported: certificates come from files"
_NAMES = "only exact names are matched, as a DestinationRule's subjectAltNames are"
_CIPHERS = (
    "OpenSSL's defaults apply to clusters: a restricted list (Istio's meshConfig.tlsDefaults, "
    "FIPS compliance) cannot be applied to them in this version"
)
#: Fields that would change a connection's security and that the engine cannot honour.
_TLS_REFUSED: dict[str, dict[str, str]] = {
    "UpstreamTlsContext": {
        "auto_host_sni": "SNI from each endpoint's hostname: the engine sends the cluster's sni "
        "(else the service host) to every endpoint",
        "auto_sni_san_validation": "names checked against each endpoint's SNI: the engine checks "
        "them against the cluster's sni (else the service host)",
        "allow_renegotiation": "the engine never renegotiates (OpenSSL's OP_NO_RENEGOTIATION)",
        "enforce_rsa_key_usage": "the key usage checks are OpenSSL's own, not switchable here",
    },
    "CommonTlsContext": {
        "alpn_protocols": "no ALPN is offered: a MetaProtocol upstream speaks one protocol "
        "(istiod sets ALPN on HTTP/2 and ISTIO_MUTUAL clusters only)",
        "custom_handshaker": "only OpenSSL's handshake",
        "key_log": "TLS secrets are never written out",
        "tls_certificate_provider_instance": _PROVIDERS,
        "tls_certificate_certificate_provider": _PROVIDERS,
        "tls_certificate_certificate_provider_instance": _PROVIDERS,
        "custom_tls_certificate_selector": _PROVIDERS,
        "validation_context_certificate_provider": _PROVIDERS,
        "validation_context_certificate_provider_instance": _PROVIDERS,
    },
    "CombinedCertificateValidationContext": {
        "validation_context_certificate_provider": _PROVIDERS,
        "validation_context_certificate_provider_instance": _PROVIDERS,
    },
    "TlsParameters": {
        "cipher_suites": _CIPHERS,
        "ecdh_curves": _CIPHERS,
        "signature_algorithms": _CIPHERS,
        "compliance_policies": _CIPHERS,
    },
    "CertificateValidationContext": {
        "verify_certificate_spki": "certificate pinning is not supported",
        "verify_certificate_hash": "certificate pinning is not supported",
        "require_signed_certificate_timestamp": "certificate transparency is not checked",
        "allow_expired_certificate": "an expired certificate is always refused",
        "trust_chain_verification": "the chain is always verified",
        "custom_validator_config": "only OpenSSL's verification",
        "only_verify_leaf_cert_crl": "revocation lists are checked for every certificate of "
        "the chain",
        "max_verify_depth": "the chain depth allowed is OpenSSL's",
        "watched_directory": "the files are read at every update and reload, not watched",
        "ca_certificate_provider_instance": _PROVIDERS,
    },
    "TlsCertificate": {
        "pkcs12": "PEM files only",
        "password": "unencrypted keys only (no passphrase can be given)",
        "private_key_provider": "the key is read from its file",
        "watched_directory": "the files are read at every update and reload, not watched",
        "ocsp_staple": "a server's field",
        "signed_certificate_timestamp": "a server's field",
    },
    "DataSource": {
        "inline_bytes": "certificates and keys are files named by path (the configuration, "
        "/config_dump and rotation name files); key material is not taken from the control "
        "plane",
        "inline_string": "certificates and keys are files named by path (the configuration, "
        "/config_dump and rotation name files); key material is not taken from the control "
        "plane",
        "environment_variable": "certificates and keys are files named by path",
        "watched_directory": "the files are read at every update and reload, not watched",
    },
    "StringMatcher": {
        "prefix": _NAMES,
        "suffix": _NAMES,
        "safe_regex": _NAMES,
        "contains": _NAMES,
        "custom": _NAMES,
        "ignore_case": "names are compared as a DestinationRule's subjectAltNames are",
    },
    "SubjectAltNameMatcher": {"oid": "OTHER_NAME SANs are not matched"},
}


def check_tls_fields(res: str, msg: Message, path: str, kind: str, honoured: set[str]) -> None:
    """:func:`check_fields`, with the reason of each TLS field the engine refuses."""
    reasons = _TLS_REFUSED.get(kind, {})
    for desc, _ in msg.ListFields():
        if desc.name in reasons and desc.name not in honoured:
            raise XdsRefused(
                res, f"{path}.{desc.name}", f"not supported by this engine: {reasons[desc.name]}"
            )
    check_fields(res, msg, path, kind, honoured)


@dataclass
class _Tls:
    """A cluster's TLS as a DestinationRule's ``trafficPolicy.tls``, and the xDS field each of
    its keys came from (to name it when a file cannot be used)."""

    doc: dict[str, Any]
    origin: dict[str, str]


def _tls_file(res: str, ds: Any, path: str) -> str:
    check_tls_fields(res, ds, path, "DataSource", {"filename"})
    if not ds.filename:
        raise XdsRefused(res, path, "needs a filename")
    return str(ds.filename)


def _sds_name(res: str, sds: Any, path: str, prefix: str) -> str:
    """The part after ``prefix`` of an SDS secret name (Istio's ``file-cert:``/``file-root:``)."""
    check_tls_fields(res, sds, path, "SdsSecretConfig", {"name"})
    name = str(sds.name)
    if name in _ISTIO_SDS:  # with other names: one of them alone is not istiod's
        raise XdsRefused(
            res,
            f"{path}.name",
            f"SDS secret {name!r} is istio-agent's {_ISTIO_SDS[name]} (tls mode ISTIO_MUTUAL), "
            "with a secret that is not istio-agent's: istiod sends the two together",
        )
    if not name.startswith(prefix) or len(name) == len(prefix):
        raise XdsRefused(
            res,
            f"{path}.name",
            f"SDS secret {name!r}: only Istio's names for files on this machine "
            f"({_FILE_CERT}<certificate>~<key>, {_FILE_ROOT}<CA file>) are read here: this "
            "engine reads no secret over SDS but its own identity (spec.meshIdentity.sds)",
        )
    return name[len(prefix) :]


def _san_matcher(res: str, m: Any, path: str) -> str:
    check_tls_fields(res, m, path, "StringMatcher", {"exact"})
    if not m.exact:
        raise XdsRefused(res, path, "needs an exact name")
    return str(m.exact)


#: ``TlsParameters.TlsProtocol``: TLS_AUTO, TLSv1_0, TLSv1_1, TLSv1_2, TLSv1_3.
TLS_VERSIONS = {0: "TLS_AUTO", 1: "TLSv1_0", 2: "TLSv1_1", 3: "TLSv1_2", 4: "TLSv1_3"}


def _tls_params(res: str, p: Any, path: str) -> None:
    """Only what the engine's clusters do: TLS 1.2 at least, TLS 1.3 at most (istiod's
    values). ``TLS_AUTO`` as the maximum (Envoy's client then stops at TLS 1.2) lets the
    engine offer TLS 1.3 as well: never weaker."""
    check_tls_fields(
        res,
        p,
        path,
        "TlsParameters",
        {"tls_minimum_protocol_version", "tls_maximum_protocol_version"},
    )
    for key, fine in (
        ("tls_minimum_protocol_version", (0, 3)),
        ("tls_maximum_protocol_version", (0, 4)),
    ):
        value = getattr(p, key)
        if value in fine:
            continue
        name = TLS_VERSIONS.get(value)
        if name is None:
            why = f"unknown TLS version {value}"
        elif value in (1, 2):
            why = f"{name}: TLS 1.0 and 1.1 are deprecated (RFC 8996)"
        else:
            why = f"{name}: the engine's clusters speak TLS 1.2 and 1.3, not settable per cluster"
        raise XdsRefused(res, f"{path}.{key}", f"not supported by this engine: {why}")


def _common_context(res: str, common: Any, cpath: str, honoured: set[str]) -> None:
    """Refuse a ``CommonTlsContext`` field outside ``honoured``, and check its ``tls_params``."""
    check_tls_fields(res, common, cpath, "CommonTlsContext", honoured)
    if common.HasField("tls_params"):
        _tls_params(res, common.tls_params, f"{cpath}.tls_params")


def _istio_names(common: Any) -> tuple[str, ...]:
    """The SDS secret names of a context's certificate and trust."""
    names = [s.name for s in common.tls_certificate_sds_secret_configs]
    which = common.WhichOneof("validation_context_type")
    if which == "validation_context_sds_secret_config":
        names.append(common.validation_context_sds_secret_config.name)
    elif which == "combined_validation_context":
        names.append(common.combined_validation_context.validation_context_sds_secret_config.name)
    return tuple(names)


def istio_agent_secrets(res: str, common: Any, cpath: str) -> tuple[Any, str]:
    """Check that the ``CommonTlsContext`` ``common`` names istio-agent's SDS secrets as
    istiod writes them for Istio's mutual TLS, either side: ``default`` (the workload
    certificate) and, in a combined validation context, ``ROOTCA`` (the mesh root), both
    served from ``spec.meshIdentity``. Returns the default validation context and its path."""
    spath = f"{cpath}.tls_certificate_sds_secret_configs"
    secrets = common.tls_certificate_sds_secret_configs
    if len(secrets) != 1 or secrets[0].name != "default":
        raise XdsRefused(
            res,
            spath,
            "expected one secret: 'default' (istio-agent's workload certificate, served from "
            "spec.meshIdentity)",
        )
    check_tls_fields(res, secrets[0], f"{spath}[0]", "SdsSecretConfig", {"name"})
    ccpath = f"{cpath}.combined_validation_context"
    cvc = common.combined_validation_context
    check_tls_fields(
        res,
        cvc,
        ccpath,
        "CombinedCertificateValidationContext",
        {"default_validation_context", "validation_context_sds_secret_config"},
    )
    root = cvc.validation_context_sds_secret_config
    rpath = f"{ccpath}.validation_context_sds_secret_config"
    if root.name != "ROOTCA":
        raise XdsRefused(
            res,
            f"{rpath}.name",
            f"expected 'ROOTCA' with 'default', got {root.name[:100]!r} (the mesh root, "
            "served from spec.meshIdentity)",
        )
    check_tls_fields(res, root, rpath, "SdsSecretConfig", {"name"})
    return cvc.default_validation_context, f"{ccpath}.default_validation_context"


def _istio_mutual(res: str, ctx: Any, path: str, identity: bool) -> _Tls:
    """An ``ISTIO_MUTUAL`` context as istiod writes it (``buildUpstreamClusterTLSContext``):
    istio-agent's SDS secrets ``default`` (the workload certificate) and ``ROOTCA`` (the mesh
    root), names in the default validation context, ALPN ``istio-peer-exchange``/``istio``
    and the SNI ``outbound_.<port>_.<subset>_.<host>``. The engine serves it with its
    ``spec.meshIdentity`` (the same identity, as files)."""
    cpath = f"{path}.common_tls_context"
    common = ctx.common_tls_context
    spath = f"{cpath}.tls_certificate_sds_secret_configs[0]"
    if not identity:
        raise XdsRefused(
            res,
            f"{spath}.name",
            "SDS secret 'default' is istio-agent's workload certificate (tls mode "
            "ISTIO_MUTUAL): set spec.meshIdentity in the ProxyConfig (the files istio-agent "
            "writes with OUTPUT_CERTS: cert-chain.pem, key.pem, root-cert.pem) for the engine "
            "to speak Istio's mutual TLS",
        )
    _common_context(
        res,
        common,
        cpath,
        {
            "tls_params",
            "tls_certificate_sds_secret_configs",
            "combined_validation_context",
            "alpn_protocols",
        },
    )
    vc, vpath = istio_agent_secrets(res, common, cpath)
    if common.alpn_protocols and "istio" not in common.alpn_protocols:
        raise XdsRefused(
            res,
            f"{cpath}.alpn_protocols",
            "the engine offers ALPN 'istio-peer-exchange' then 'istio' (Istio's mutual TLS), "
            f"and {list(common.alpn_protocols)} lacks 'istio'",
        )
    check_tls_fields(
        res,
        vc,
        vpath,
        "CertificateValidationContext",
        {"match_subject_alt_names", "match_typed_subject_alt_names"},
    )
    sans = [
        _san_matcher(res, m, f"{vpath}.match_subject_alt_names[{i}]")
        for i, m in enumerate(vc.match_subject_alt_names)
    ]
    for i, t in enumerate(vc.match_typed_subject_alt_names):
        tpath = f"{vpath}.match_typed_subject_alt_names[{i}]"
        check_tls_fields(res, t, tpath, "SubjectAltNameMatcher", {"san_type", "matcher"})
        if t.san_type not in (2, 3, 4):  # DNS, URI, IP_ADDRESS
            raise XdsRefused(
                res, f"{tpath}.san_type", "only DNS, URI and IP_ADDRESS names are matched"
            )
        sans.append(_san_matcher(res, t.matcher, f"{tpath}.matcher"))
    doc: dict[str, Any] = {"mode": "ISTIO_MUTUAL"}
    if common.alpn_protocols and PEER_EXCHANGE not in common.alpn_protocols:
        doc[PEER_EXCHANGE_KEY] = False  # istiod's metadata exchange is off (ALPNInMesh)
    if ctx.sni:
        doc["sni"] = ctx.sni
    if sans:
        doc["subjectAltNames"] = sans
    return _Tls(doc, {})


#: The endpoint metadata key of ``transport_socket_matches``, and istiod's key and value in it.
_MATCH_METADATA, _TLS_MODE, _ISTIO_TLS_MODE = "envoy.transport_socket_match", "tlsMode", "istio"
_AUTO_SHAPE = (
    "istiod's automatic mutual TLS is read: a match {tlsMode: istio} with ISTIO_MUTUAL, then "
    "a match of every endpoint, {}, with raw_buffer"
)


def _transport_socket(
    res: str, c: Any, identity: bool = False, headers: list[str | None] | None = None
) -> _Tls | None:
    """A cluster's ``transport_socket`` as a DestinationRule ``tls`` block (``None``: plain
    TCP), read the way istiod writes a DestinationRule's ``tls`` with files (SDS names
    ``file-cert:<cert>~<key>`` and ``file-root:<ca>``) and the way a control plane without
    SDS would (``tls_certificates`` and ``trusted_ca`` with file names); istio-agent's SDS
    names (``ISTIO_MUTUAL``) with the engine's workload ``identity`` (``spec.meshIdentity``).
    Its ``transport_socket_matches`` in the shape of istiod's automatic mutual TLS are an
    ``ISTIO_MUTUAL`` block marked automatic (see :func:`_socket_matches`).

    Each socket may be wrapped in an ``upstream_proxy_protocol`` one (istiod's
    ``proxyProtocol``): ``headers`` gets the version of each socket read (``None``: not
    wrapped), in order."""
    headers = [] if headers is None else headers
    tls = None
    if c.HasField("transport_socket"):
        inner, path, version = _unwrap(res, c.transport_socket, "transport_socket")
        headers.append(version)
        tls = _socket(res, inner, path, identity)
    if c.transport_socket_matches:
        if tls is not None:
            raise XdsRefused(
                res,
                "transport_socket_matches",
                "with a TLS transport_socket (for the endpoints no match selects): not "
                f"supported: {_AUTO_SHAPE}, and istiod sends no transport_socket with it",
            )
        tls = _socket_matches(res, c.transport_socket_matches, headers)
    return tls


#: Why an endpoint that is an internal listener is refused (istiod's shape for a
#: DestinationRule ``tunnel``, whose tcp_proxy ``tunneling_config`` is in a listener).
INTERNAL_ADDRESS = (
    "not supported by this engine: an internal listener's address (envoy_internal_address, "
    "as istiod sends the endpoints of a DestinationRule with a tunnel, whose tunneling_config "
    "is in a listener): the engine reads no listeners; set trafficPolicy.tunnel in a "
    "configuration file"
)
_PROXY_PROTOCOL = (
    "type.googleapis.com/envoy.extensions.transport_sockets.proxy_protocol.v3."
    "ProxyProtocolUpstreamTransport"
)
_PROXY_PROTOCOL_NAME = "envoy.transport_sockets.upstream_proxy_protocol"


def _unwrap(res: str, ts: Any, path: str) -> tuple[Any, str, str | None]:
    """A ``TransportSocket`` without its ``upstream_proxy_protocol`` wrapper (istiod's
    ``applyUpstreamProxyProtocol``): the socket it wraps, that socket's path, and the
    header's version, ``V1`` or ``V2`` (``None``: ``ts`` is not wrapped). Only the version
    is read: TLVs to add, and any other field, are refused."""
    url = ts.typed_config.type_url if ts.HasField("typed_config") else ""
    if url != _PROXY_PROTOCOL:
        if not url and ts.name == _PROXY_PROTOCOL_NAME:
            raise XdsRefused(res, path, "the upstream_proxy_protocol socket needs typed_config")
        return ts, path, None
    check_fields(res, ts, path, "TransportSocket", {"name", "typed_config"})
    path = f"{path}.typed_config"
    wrapper = _unpack(
        res, ts.typed_config, upstream_proxy_protocol_pb2.ProxyProtocolUpstreamTransport(), path
    )
    honoured = {"config", "transport_socket"}
    check_fields(res, wrapper, path, "ProxyProtocolUpstreamTransport", honoured)
    for message, where in ((wrapper, path), (wrapper.config, f"{path}.config")):
        for unknown in UnknownFieldSet(message):
            raise XdsRefused(
                res, where, f"has field {unknown.field_number}, unknown to this engine"
            )
    check_fields(res, wrapper.config, f"{path}.config", "ProxyProtocolConfig", {"version"})
    if not wrapper.HasField("transport_socket"):
        raise XdsRefused(res, f"{path}.transport_socket", "required (as in Envoy)")
    inner = wrapper.transport_socket
    if inner.HasField("typed_config") and inner.typed_config.type_url == _PROXY_PROTOCOL:
        raise XdsRefused(res, f"{path}.transport_socket", "a PROXY protocol header is written once")
    return inner, f"{path}.transport_socket", "V2" if wrapper.config.version == 1 else "V1"


def _header_version(res: str, headers: list[str | None]) -> str | None:
    """The one PROXY protocol version of a cluster's sockets (``None``: none is wrapped);
    sockets that disagree (some endpoints with a header, some without, or another version)
    are refused: the engine writes one header, or none, for every endpoint of a cluster."""
    if len(set(headers)) > 1:
        raise XdsRefused(
            res,
            "transport_socket_matches",
            "not every transport socket has the same upstream_proxy_protocol wrapper "
            f"({', '.join(sorted(str(h) for h in set(headers)))}): the engine writes one "
            "PROXY protocol header, or none, to every endpoint of a cluster (istiod wraps "
            "every socket alike)",
        )
    return headers[0] if headers else None


def _socket_matches(res: str, matches: Any, headers: list[str | None] | None = None) -> _Tls | None:
    """istiod's automatic mutual TLS (``applyUpstreamTLSSettings``): a match ``{tlsMode:
    istio}`` with its ``ISTIO_MUTUAL`` socket for endpoints with a sidecar, then
    ``tlsMode-disabled``, ``{}`` with ``raw_buffer``, for the others. Read as that socket's
    ``ISTIO_MUTUAL`` block marked automatic (the endpoints' ``tlsMode`` choose), or ``None``
    when no endpoint gets TLS (only raw_buffer). Every other shape is refused: Envoy would
    choose per endpoint among sockets this engine does not choose among. ``headers`` gets
    each match's PROXY protocol version (see :func:`_unwrap`)."""
    headers = [] if headers is None else headers
    tls: _Tls | None = None
    seen_istio = False
    for i, m in enumerate(matches):
        path = f"transport_socket_matches[{i}]"
        check_fields(res, m, path, "TransportSocketMatch", {"match", "transport_socket"})
        if not m.HasField("transport_socket"):
            raise XdsRefused(res, f"{path}.transport_socket", "required (as in Envoy)")
        inner, spath, version = _unwrap(res, m.transport_socket, f"{path}.transport_socket")
        headers.append(version)
        fields = {k: v for k, v in m.match.fields.items()}
        if i and not dict(matches[i - 1].match.fields):
            raise XdsRefused(
                res, path, f"follows a match of every endpoint, so none reaches it: {_AUTO_SHAPE}"
            )
        if not fields:  # every endpoint (not selected before): plain TCP only
            if _socket(res, inner, spath, True) is not None:
                raise XdsRefused(
                    res,
                    spath,
                    f"TLS to every endpoint in a match of every endpoint is not supported: "
                    f"{_AUTO_SHAPE} (a transport_socket gives TLS to every endpoint)",
                )
            continue
        value = fields.get(_TLS_MODE)
        if (
            seen_istio
            or len(fields) != 1
            or value is None
            or value.WhichOneof("kind") != "string_value"
            or value.string_value != _ISTIO_TLS_MODE
        ):
            shown = json.dumps(
                {
                    k: v.string_value if v.WhichOneof("kind") == "string_value" else "..."
                    for k, v in fields.items()
                },
                sort_keys=True,
            )
            why = (
                " (HBONE tunnels, Istio's ambient mode, are not supported)"
                if "tunnel" in fields
                else ""
            )
            raise XdsRefused(
                res,
                f"{path}.match",
                f"not supported by this engine: {shown}{why}; only {_AUTO_SHAPE}",
            )
        seen_istio = True
        # Validated as ISTIO_MUTUAL even without an identity: then served as plain TCP.
        found = _socket(res, inner, spath, True)
        if found is None:
            continue  # raw_buffer for the sidecars too: plain TCP to every endpoint
        if found.doc.get("mode") != "ISTIO_MUTUAL":
            raise XdsRefused(
                res,
                spath,
                f"per-endpoint TLS other than ISTIO_MUTUAL is not supported: {_AUTO_SHAPE}",
            )
        tls = _Tls({**found.doc, AUTO_MTLS_KEY: True}, found.origin)
    return tls


def _socket(res: str, ts: Any, path: str, identity: bool) -> _Tls | None:
    """One ``TransportSocket`` (of a cluster or of one of its matches) as a ``tls`` block
    (``None``: plain TCP); see :func:`_transport_socket`."""
    check_fields(res, ts, path, "TransportSocket", {"name", "typed_config"})
    url = ts.typed_config.type_url if ts.HasField("typed_config") else ""
    if url == _RAW_BUFFER or (
        not url and ts.name in ("", "raw_buffer", "envoy.transport_sockets.raw_buffer")
    ):
        return None
    if url != _UPSTREAM_TLS:
        raise XdsRefused(
            res,
            f"{path}.typed_config" if url else path,
            f"transport socket {url.rsplit('/', 1)[-1] or ts.name!r} is not supported "
            "(UpstreamTlsContext or RawBuffer)",
        )
    path = f"{path}.typed_config"
    ctx = _unpack(res, ts.typed_config, tls_pb2.UpstreamTlsContext(), path)
    check_tls_fields(res, ctx, path, "UpstreamTlsContext", {"common_tls_context", "sni"})
    if "default" in _istio_names(ctx.common_tls_context):
        return _istio_mutual(res, ctx, path, identity)
    doc: dict[str, Any] = {}
    origin: dict[str, str] = {}
    common = ctx.common_tls_context
    cpath = f"{path}.common_tls_context"
    _common_context(
        res,
        common,
        cpath,
        {
            "tls_params",
            "tls_certificates",
            "tls_certificate_sds_secret_configs",
            "validation_context",
            "validation_context_sds_secret_config",
            "combined_validation_context",
        },
    )
    # The client certificate: MUTUAL with one, SIMPLE without.
    certs, secrets = common.tls_certificates, common.tls_certificate_sds_secret_configs
    if len(certs) + len(secrets) > 1:
        raise XdsRefused(res, cpath, "one client certificate at most (the engine sends one)")
    if certs:
        tpath = f"{cpath}.tls_certificates[0]"
        check_tls_fields(
            res, certs[0], tpath, "TlsCertificate", {"certificate_chain", "private_key"}
        )
        for key, field_ in (
            ("clientCertificate", "certificate_chain"),
            ("privateKey", "private_key"),
        ):
            if not certs[0].HasField(field_):
                raise XdsRefused(res, f"{tpath}.{field_}", "required with a client certificate")
            doc[key] = _tls_file(res, getattr(certs[0], field_), f"{tpath}.{field_}")
            origin[key] = f"{tpath}.{field_}.filename"
    elif secrets:
        spath = f"{cpath}.tls_certificate_sds_secret_configs[0]"
        files = _sds_name(res, secrets[0], spath, _FILE_CERT).split("~")
        if len(files) != 2 or not all(files):
            raise XdsRefused(
                res,
                f"{spath}.name",
                f"expected {_FILE_CERT}<certificate>~<key>, got {secrets[0].name!r}",
            )
        doc["clientCertificate"], doc["privateKey"] = files
        origin["clientCertificate"] = origin["privateKey"] = f"{spath}.name"
    doc["mode"] = "MUTUAL" if certs or secrets else "SIMPLE"
    if ctx.sni:
        doc["sni"] = ctx.sni
    # The server's verification: CAs from SDS (istiod) or a file; names; revocation.
    trust: str | None = None  # a CA file, _SYSTEM_ROOT, or None: nothing verified
    trust_at = ""
    vc, vpath = None, ""
    which = common.WhichOneof("validation_context_type")
    if which == "validation_context":
        vc, vpath = common.validation_context, f"{cpath}.validation_context"
    elif which == "validation_context_sds_secret_config":
        trust_at = f"{cpath}.validation_context_sds_secret_config"
        trust = _sds_name(res, common.validation_context_sds_secret_config, trust_at, _FILE_ROOT)
    elif which == "combined_validation_context":
        cvc = common.combined_validation_context
        ccpath = f"{cpath}.combined_validation_context"
        check_tls_fields(
            res,
            cvc,
            ccpath,
            "CombinedCertificateValidationContext",
            {"default_validation_context", "validation_context_sds_secret_config"},
        )
        if not cvc.HasField("validation_context_sds_secret_config"):
            raise XdsRefused(res, ccpath, "needs validation_context_sds_secret_config")
        trust_at = f"{ccpath}.validation_context_sds_secret_config"
        trust = _sds_name(res, cvc.validation_context_sds_secret_config, trust_at, _FILE_ROOT)
        vc, vpath = cvc.default_validation_context, f"{ccpath}.default_validation_context"
    sans: list[str] = []
    crl = None
    if vc is not None:
        check_tls_fields(
            res,
            vc,
            vpath,
            "CertificateValidationContext",
            {
                "trusted_ca",
                "system_root_certs",
                "match_subject_alt_names",
                "match_typed_subject_alt_names",
                "crl",
            },
        )
        for key in ("trusted_ca", "system_root_certs"):
            if vc.HasField(key):
                if trust is not None:
                    raise XdsRefused(
                        res, f"{vpath}.{key}", f"the trusted CAs are given by {trust_at} already"
                    )
                trust_at = f"{vpath}.{key}"
                if key == "trusted_ca":
                    trust = _tls_file(res, vc.trusted_ca, trust_at)
                    trust_at += ".filename"
                else:
                    check_fields(res, vc.system_root_certs, trust_at, "SystemRootCerts", set())
                    trust = _SYSTEM_ROOT
        for i, m in enumerate(vc.match_subject_alt_names):
            sans.append(_san_matcher(res, m, f"{vpath}.match_subject_alt_names[{i}]"))
        for i, t in enumerate(vc.match_typed_subject_alt_names):
            tpath = f"{vpath}.match_typed_subject_alt_names[{i}]"
            check_tls_fields(res, t, tpath, "SubjectAltNameMatcher", {"san_type", "matcher"})
            if t.san_type not in (2, 3, 4):  # DNS, URI, IP_ADDRESS
                raise XdsRefused(
                    res, f"{tpath}.san_type", "only DNS, URI and IP_ADDRESS names are matched"
                )
            sans.append(_san_matcher(res, t.matcher, f"{tpath}.matcher"))
        if vc.HasField("crl"):
            crl = _tls_file(res, vc.crl, f"{vpath}.crl")
            origin["caCrl"] = f"{vpath}.crl.filename"
    if trust is None:
        # Envoy verifies nothing without trusted CAs (istiod's insecureSkipVerify: an empty
        # validation_context); names or revocation without them Envoy refuses, and so do we.
        if sans or crl:
            raise XdsRefused(
                res,
                vpath,
                "subject alt names or a CRL without trusted CAs (Envoy refuses them too)",
            )
        doc["insecureSkipVerify"] = True
    else:
        if trust != _SYSTEM_ROOT:
            doc["caCertificates"] = trust
            origin["caCertificates"] = (
                trust_at if trust_at.endswith("filename") else f"{trust_at}.name"
            )
        if sans:
            doc["subjectAltNames"] = sans
        if crl is not None:
            doc["caCrl"] = crl
    return _Tls(doc, origin)


def _mesh_tls(lb: Any) -> bool:
    """Whether an endpoint's ``envoy.transport_socket_match`` metadata (istiod's, from the
    workload's ``security.istio.io/tlsMode`` label) is ``tlsMode: istio``."""
    meta = lb.metadata.filter_metadata
    if _MATCH_METADATA not in meta:
        return False
    value = meta[_MATCH_METADATA].fields.get(_TLS_MODE)
    return (
        value is not None
        and value.WhichOneof("kind") == "string_value"
        and (value.string_value == _ISTIO_TLS_MODE)
    )


def _endpoints(res: str, cla: Any, locality_weighted: bool, ring: bool) -> list[_Endpoint]:
    """The endpoints to route to, with their weights and failover priorities;
    ``locality_weighted``: the cluster has ``common_lb_config.locality_weighted_lb_config``
    (Envoy then picks a locality of a priority level by its weight first): each endpoint gets
    its locality and locality weight; ``ring``: the cluster hashes, and the weights must then
    be in proportion to the localities' endpoint weights (as istiod writes them without
    ``distribute``), which the ring's endpoint weights honour."""
    check_fields(res, cla, "", "ClusterLoadAssignment", {"cluster_name", "endpoints"})
    out = []
    # Per (priority, locality): its locality weight, and the sum of its endpoint weights.
    localities: dict[tuple[int, str], tuple[int, int]] = {}
    levels_seen: set[int] = set()
    for i, group in enumerate(cla.endpoints):
        gpath = f"endpoints[{i}]"
        check_fields(res, group, gpath, "LocalityLbEndpoints", {"lb_endpoints", "priority"})
        priority = group.priority
        where = group.locality
        locality = f"{where.region}/{where.zone}/{where.sub_zone}"
        total = 0
        for j, lb in enumerate(group.lb_endpoints):
            lpath = f"{gpath}.lb_endpoints[{j}]"
            check_fields(
                res, lb, lpath, "LbEndpoint", {"endpoint", "health_status", "load_balancing_weight"}
            )
            weight = 1
            if lb.HasField("load_balancing_weight"):
                weight = lb.load_balancing_weight.value
                if weight < 1:
                    raise XdsRefused(
                        res, f"{lpath}.load_balancing_weight", "must be at least 1 (as in Envoy)"
                    )
            total += weight
            if lb.health_status in (2, 3, 4):  # UNHEALTHY, DRAINING, TIMEOUT: not routed to
                continue
            ep = lb.endpoint
            check_fields(res, ep, f"{lpath}.endpoint", "Endpoint", {"address"})
            kind = ep.address.WhichOneof("address")
            if kind == "envoy_internal_address":
                raise XdsRefused(res, f"{lpath}.endpoint.address", INTERNAL_ADDRESS)
            if kind != "socket_address":
                raise XdsRefused(res, f"{lpath}.endpoint.address", "needs a socket_address")
            sa = ep.address.socket_address
            check_fields(
                res,
                sa,
                f"{lpath}.endpoint.address.socket_address",
                "SocketAddress",
                {"address", "port_value"},
            )
            if not sa.address or not 0 < sa.port_value < 65536:
                raise XdsRefused(
                    res, f"{lpath}.endpoint.address.socket_address", "needs an address and a port"
                )
            share = (locality, group.load_balancing_weight.value) if locality_weighted else None
            if share is not None and len(locality) > MAX_NAME_LENGTH:  # copied per endpoint
                raise XdsRefused(
                    res,
                    f"{gpath}.locality",
                    f"region/zone/sub_zone of {len(locality)} characters: at most "
                    f"{MAX_NAME_LENGTH} (as a locality in a ServiceEntry)",
                )
            out.append(_Endpoint(sa.address, sa.port_value, weight, priority, _mesh_tls(lb), share))
        if group.lb_endpoints:
            levels_seen.add(priority)
        if group.lb_endpoints and locality_weighted:
            weight = group.load_balancing_weight.value
            first, before = localities.setdefault((priority, locality), (weight, 0))
            if first != weight:
                raise XdsRefused(
                    res,
                    f"{gpath}.load_balancing_weight",
                    f"locality {locality} at priority {priority} has two weights, {first} and "
                    f"{weight}",
                )
            localities[priority, locality] = (weight, before + total)
    factor = cla.policy.overprovisioning_factor
    if (
        (len(levels_seen) > 1 or len(localities) > 1)
        and cla.policy.HasField("overprovisioning_factor")
        and factor.value != 140
    ):
        raise XdsRefused(
            res,
            "policy.overprovisioning_factor",
            "only Envoy's default, 140, is supported with failover priorities or locality weights",
        )
    if not ring:
        return out
    levels: dict[int, list[tuple[int, int]]] = {}
    for (priority, _), pair in localities.items():
        levels.setdefault(priority, []).append(pair)
    if all(w * level[0][1] == level[0][0] * t for level in levels.values() for w, t in level):
        return [ep._replace(locality=None) for ep in out]
    raise XdsRefused(
        res,
        "endpoints",
        "locality weights not in proportion to the sums of their endpoints' "
        "load_balancing_weight (locality weighted load balancing) are not supported with "
        "a hash ring (Envoy sizes it by them, the engine by the endpoints' weights)",
    )


def _host_port(
    resources: Resources, name: str, parsed: ClusterName, c: Any, identity: bool
) -> _HostPort:
    """One outbound cluster with its endpoints (``identity``: a workload identity is
    configured, for ``ISTIO_MUTUAL``)."""
    res = f"CDS {name}"
    policy, hashing = _cluster_policy(res, c)
    headers: list[str | None] = []
    tls = _transport_socket(res, c, identity, headers)
    if tls is not None:
        policy["tls"] = tls.doc
    version = _header_version(res, headers)
    if version is not None:
        policy["proxyProtocol"] = {"version": version}
    kind = c.WhichOneof("cluster_discovery_type")
    if kind == "cluster_type":
        raise XdsRefused(res, "cluster_type", "custom cluster types are not supported")
    by_locality = c.common_lb_config.HasField("locality_weighted_lb_config")
    ring = hashing is not None
    if c.type == 3:  # EDS
        service = c.eds_cluster_config.service_name or name
        cla = resources.endpoints.get(service)
        eps = [] if cla is None else _endpoints(f"EDS {service}", cla, by_locality, ring)
    elif c.type in (0, 1, 2):  # STATIC, STRICT_DNS, LOGICAL_DNS: inline endpoints
        eps = _endpoints(res + " load_assignment", c.load_assignment, by_locality, ring)
    else:
        raise XdsRefused(res, "type", "ORIGINAL_DST clusters are not supported")
    return _HostPort(parsed, policy, hashing, eps, tls.origin if tls else {})


def _host_ports(
    resources: Resources,
    hosts_used: set[str],
    used: set[tuple[str, int]],
    left_out: dict[str, str],
    unused: list[str],
    identity: bool = False,
) -> dict[str, list[_HostPort]]:
    """The outbound clusters of the ``hosts_used`` with their endpoints, by host; ``unused``
    gets the names of the other outbound clusters, in order (not translated: CDS names every
    service of the mesh, and translating them all cost seconds and hundreds of MiB per
    update).

    A cluster this engine cannot honour is refused only when its host and port are ``used``
    (a listener serves them or a route sends to them); otherwise it is left out, with every
    cluster of its port (the subsets with their service): it cannot change this engine's
    traffic, and the route update that first sends to it is refused then. ``left_out`` gets
    each such cluster's name and why it was (the refusal it would have been)."""
    hosts: dict[str, list[_HostPort]] = {}
    ports_out: dict[tuple[str, int], str] = {}
    for name in sorted(resources.clusters):  # the names: read only the clusters in use
        parsed = parse_cluster_name(name)
        if parsed is None:
            continue  # inbound, passthrough and black-hole clusters: not this proxy's routes
        if parsed.host not in hosts_used:
            unused.append(name)
            continue
        try:
            hp = _host_port(resources, name, parsed, resources.clusters[name], identity)
        except XdsRefused as exc:
            if (parsed.host, parsed.port) in used:
                raise
            ports_out.setdefault((parsed.host, parsed.port), str(exc))
            left_out[name] = str(exc)
            continue
        hosts.setdefault(parsed.host, []).append(hp)
    kept: dict[str, list[_HostPort]] = {}
    for host, hps in hosts.items():
        for hp in hps:
            why = ports_out.get((host, hp.name.port))
            if why is None:
                kept.setdefault(host, []).append(hp)
            else:  # a subset (or the service) of a port left out: with it
                left_out[str(hp.name)] = why
    return kept


# -- the whole -------------------------------------------------------------------------------


def _file_ports(base: Config, host: str) -> dict[int, tuple[str, str]]:
    """The file's ServiceEntry ports for ``host``: number -> (name, namespace)."""
    service = base.services.get(host)
    if service is None:
        return {}
    return {n: (p.name, service.namespace) for n, p in service.ports.items()}


def translate(
    base: Config,
    resources: Resources,
    left_out: dict[str, str] | None = None,
    unused: list[str] | None = None,
) -> Config:
    """The file configuration ``base`` with routes, clusters and endpoints from ``resources``
    (its engine settings, ``base.proxy``, kept exactly as given). Only the clusters of the
    hosts this engine uses (:func:`used_hosts`) are translated; ``unused``, if given, gets
    the names of the other outbound clusters, sorted. ``left_out``, if given, gets the
    clusters of those hosts left out because nothing here uses their port and they cannot be
    honoured, each with the reason (``/config_dump`` shows both).

    Raises :class:`XdsRefused` for a field this engine does not implement, and
    :class:`~metaprotocol_sdk.errors.ConfigError` for a resource the loader refuses (both
    name the resource; the message is the NACK's ``error_detail``).
    """
    if left_out is None:
        left_out = {}
    listeners = {
        route_config_name(li.host, li.port): (li.host, li.port) for li in base.proxy.listeners
    }
    tables: dict[str, _RouteTable] = {}
    for name, rc in sorted(resources.routes.items()):
        if name not in listeners:
            continue  # not subscribed to (a server may send more): ignored, as Envoy does
        table = _route_table(name, rc, listeners)
        if table.host in tables:
            raise XdsRefused(
                f"RDS {name}",
                "",
                f"host {table.host!r} already has route configuration "
                f"{route_config_name(table.host, tables[table.host].port)} "
                "(one route table per host)",
            )
        tables[table.host] = table
    protocol_of_listener = {
        (li.host, li.port): base.protocol_of(li.host, li.port).name for li in base.proxy.listeners
    }
    # A cluster not in a file's ServiceEntry speaks the protocol of the listeners routing to it.
    protocols: dict[str, str] = {}
    for table in tables.values():
        proto = protocol_of_listener[(table.host, table.port)]
        for cname in table.clusters:
            known = protocols.setdefault(cname, proto)
            if known != proto:
                raise XdsRefused(
                    f"RDS {route_config_name(table.host, table.port)}",
                    "",
                    f"cluster {cname!r} is routed to from {known!r} and {proto!r} listeners",
                )
    hashes: dict[str, HashKey] = {}
    for table in tables.values():
        for cname, key in table.hashes.items():
            if hashes.setdefault(cname, key) != key:
                raise XdsRefused(f"CDS {cname}", "", f"hashed on {hashes[cname]} and {key}")
    groups: list[tuple[str, list[dict[str, Any]]]] = []
    # The hosts and ports this proxy sends to: its listeners' and those its routes name.
    used = {(li.host, li.port) for li in base.proxy.listeners}
    for table in tables.values():
        used.update(
            (parsed.host, parsed.port)
            for parsed in map(parse_cluster_name, table.clusters)
            if parsed is not None
        )
    xds_hosts = _host_ports(
        resources,
        used_hosts(base, resources.routes),
        used,
        left_out,
        [] if unused is None else unused,
        base.proxy.mesh_identity is not None,
    )
    # Subsets the routes send to, by host: one CDS has not sent (yet) is kept with no
    # endpoints, as Envoy keeps a route to an unknown cluster (requests to it fail, the rest
    # of the update applies). With RDS and CDS from two servers (Aeraki, istiod), routes to a
    # new subset may well arrive first.
    wanted: dict[str, set[str]] = {}
    for table in tables.values():
        for cname in table.clusters:
            parsed = parse_cluster_name(cname)
            if parsed is not None and parsed.subset is not None:
                wanted.setdefault(parsed.host, set()).add(parsed.subset)
    #: Per (group, DestinationRule path of a tls block): the cluster and its fields' origin.
    origins: dict[tuple[str, str], tuple[ClusterName, dict[str, str]]] = {}
    for host, clusters in sorted(xds_hosts.items()):
        try:
            docs = _host_documents(base, host, clusters, protocols, hashes, origins)
        except XdsRefused as exc:
            if any((host, hp.name.port) in used for hp in clusters):
                raise
            del xds_hosts[host]  # a host no route sends to: left out, as in _host_ports
            left_out.update((str(hp.name), str(exc)) for hp in clusters)
            continue
        _placeholder_subsets(docs[1], wanted.get(host, set()))
        groups.append((f"CDS {host}", docs))
    for host, subsets in sorted(wanted.items()):
        if host not in xds_hosts and host in base.services:  # a file's host, no CDS clusters
            rule = {
                "kind": "DestinationRule",
                "metadata": {"name": host},
                "spec": {"host": host, "subsets": []},
            }
            _placeholder_subsets(rule, subsets)
            groups.append((f"RDS subsets of {host}", [rule]))
    groups.extend((f"RDS {route_config_name(t.host, t.port)}", [t.doc]) for t in tables.values())
    files = []
    for body in base.documents:
        kind = body.get("kind")
        if kind == "ServiceEntry":
            hosts = [h for h in body["spec"]["hosts"] if h not in xds_hosts]
            if not hosts:
                continue
            if len(hosts) != len(body["spec"]["hosts"]):
                body = copy.deepcopy(body)
                body["spec"]["hosts"] = hosts
        files.append(body)
    groups.insert(0, (", ".join(base.sources) or "<files>", files))
    try:
        config = build_config(groups, control_plane=True, mesh_identity=base.proxy.mesh_identity)
    except ConfigError as exc:
        raise _tls_error(exc, origins) or ConfigError(
            exc.reason, source=f"xDS {exc.source}", field=exc.field
        ) from exc
    # The engine's own settings stay ``base``'s as given, not as its documents read: a worker
    # of --workers N serves them with the shared ports and a private admin endpoint, and
    # rebinding its listeners to the files' ``:0`` would take it out of the shared group.
    config = replace(config, proxy=base.proxy)
    xds = base.proxy.xds
    if xds is not None and xds.inbound_listener is not None:
        from .inbound import apply_inbound  # it reads this module's TLS checks

        config = apply_inbound(config, resources.listeners.get(xds.inbound_listener))
    return config


def _tls_error(
    exc: ConfigError, origins: Mapping[tuple[str, str], tuple[ClusterName, dict[str, str]]]
) -> ConfigError | None:
    """A loader error in the ``tls`` block translated from a cluster (a file that cannot be
    used), naming the cluster and its xDS field; ``None`` for any other error."""
    group = (exc.source or "").split(" (document ", 1)[0]
    block, _, key = (exc.field or "").rpartition(".")
    found = origins.get((group, block))
    if found is None or key not in found[1]:
        return None
    name, origin = found
    return ConfigError(
        f"{exc.reason} (DestinationRule {block}.{key})",
        source=f"xDS CDS {name}",
        field=origin[key],
    )


def _placeholder_subsets(rule: dict[str, Any], wanted: set[str]) -> None:
    """Add the ``wanted`` subsets ``rule`` lacks, selecting no endpoint."""
    known = {sub["name"] for sub in rule["spec"]["subsets"]}
    for subset in sorted(wanted - known):
        rule["spec"]["subsets"].append(
            {"name": subset, "labels": {SUBSET_LABEL + subset: "not-sent-by-cds"}}
        )


def _host_documents(
    base: Config,
    host: str,
    clusters: list[_HostPort],
    protocols: Mapping[str, str],
    hashes: Mapping[str, HashKey],
    origins: dict[tuple[str, str], tuple[ClusterName, dict[str, str]]],
) -> list[dict[str, Any]]:
    """The ServiceEntry and DestinationRule for one host's outbound clusters (and, in
    ``origins``, where the fields of each ``tls`` block came from)."""
    file_ports = _file_ports(base, host)
    namespace = next(iter(file_ports.values()), ("", "default"))[1]
    # Each port's protocol: that of its first cluster that has one (found in one pass; a
    # search of every cluster per port was quadratic in a host's ports).
    port_protocols: dict[int, str] = {}
    for hp in clusters:
        proto = protocols.get(str(hp.name))
        if proto is not None:
            port_protocols.setdefault(hp.name.port, proto)
    ports: dict[int, str] = {}
    for hp in clusters:
        number = hp.name.port
        if number in ports:
            continue
        if number in file_ports:
            ports[number] = file_ports[number][0]
            continue
        proto = port_protocols.get(number)
        ports[number] = f"{PORT_PREFIX}{proto}-xds-{number}" if proto else f"tcp-xds-{number}"
    multi = len(ports) > 1
    plain = {hp.name.port: hp for hp in clusters if hp.name.subset is None}
    # Sets, not the lists: a subset's every endpoint is looked up in its service's.
    owned = {port: {(ep.address, ep.port) for ep in hp.endpoints} for port, hp in plain.items()}
    # Endpoint identity: (address, port) on a single-port host; the address on a multi-port one.
    entries: dict[Any, dict[str, Any]] = {}
    weights: dict[Any, tuple[int, ClusterName]] = {}  # an endpoint's weight, and whose
    for hp in clusters:
        seen = set()
        # istiod's automatic mutual TLS: the endpoints with a sidecar, in this cluster.
        auto = bool(hp.policy.get("tls", {}).get(AUTO_MTLS_KEY))
        for address, port, weight, priority, mesh_tls, locality in hp.endpoints:
            key = address if multi else (address, port)
            first, where = weights.setdefault(key, (weight, hp.name))
            if first != weight:
                raise XdsRefused(
                    f"EDS {hp.name}",
                    "",
                    f"endpoint {address if multi else f'{address}:{port}'} has "
                    f"load_balancing_weight {weight}, and {first} in "
                    f"{where}: an endpoint has one weight in every cluster of its host",
                )
            if multi and (address in seen):
                raise XdsRefused(
                    f"EDS {hp.name}",
                    "",
                    f"address {address} is listed twice; on a host with "
                    "several ports every address must be one endpoint",
                )
            seen.add(address)
            entry = entries.setdefault(key, {"address": address, "ports": {}, "labels": {}})
            if weight != 1:
                entry["weight"] = weight
            pname = ports[hp.name.port]
            if entry["ports"].setdefault(pname, port) != port:
                raise XdsRefused(
                    f"EDS {hp.name}", "", f"address {address} has two ports for port {pname}"
                )
            if priority:  # the engine reads it back per cluster (Endpoint.priority_in)
                entry["labels"][priority_label(hp.name.port, hp.name.subset)] = str(priority)
            if locality is not None:  # read back per cluster (Endpoint.locality_weight_in)
                label = locality_weight_label(hp.name.port, hp.name.subset)
                entry["labels"][label] = f"{locality[1]} {locality[0]}"
            if auto and mesh_tls:  # read back per cluster (Endpoint.mesh_tls_in)
                entry["labels"][tls_mode_label(hp.name.port, hp.name.subset)] = "istio"
            if hp.name.subset is not None:
                entry["labels"][SUBSET_LABEL + hp.name.subset] = "true"
                owner = plain.get(hp.name.port)
                if owner is not None and (address, port) not in owned[hp.name.port]:
                    raise XdsRefused(
                        f"EDS {hp.name}",
                        "",
                        f"endpoint {address}:{port} is in the subset but "
                        f"not in {owner.name}: subsets must be parts of the host's endpoints",
                    )
    service = {
        "kind": "ServiceEntry",
        "metadata": {"name": host, "namespace": namespace},
        "spec": {
            "hosts": [host],
            "ports": [{"number": n, "name": name} for n, name in sorted(ports.items())],
            "resolution": "STATIC",
            "endpoints": list(entries.values()),
        },
    }
    rule = _destination_rule(host, clusters, hashes, origins)
    return [service, rule]


# -- a host's clusters as one DestinationRule ---------------------------------------------------

#: A ``trafficPolicy``'s groups (those a ``portLevelSettings`` entry sets or leaves out).
_GROUPS = ("loadBalancer", "connectionPool", "outlierDetection", "tls")
#: Each group set to what the engine does without it: no limits, detection off (an empty
#: ``outlierDetection`` is detection on, as in Istio), plain TCP. A port's entry or a subset's
#: ``trafficPolicy`` says it for a group the policy it replaces or is over sets, so that it
#: is read as meant (and a port's entry loads without the loader's "sets no ..." caution).
_DEFAULTS: dict[str, Any] = {
    "loadBalancer": {"simple": "ROUND_ROBIN"},
    "connectionPool": {},
    "outlierDetection": {"consecutive5xxErrors": 0},
    "tls": {"mode": "DISABLE"},
}


def _inert(group: str, value: Mapping[str, Any]) -> bool:
    """Whether a set ``group`` changes nothing, as the engine applies it (``inert`` in the
    models): a pool without limits, detection with both counts off, ``tls`` ``DISABLE``."""
    if group == "connectionPool":
        return not any(value.values())
    if group == "outlierDetection":
        five, gateway = value.get("consecutive5xxErrors", 5), value.get("consecutiveGatewayErrors")
        return five == 0 and not gateway
    if group == "tls":
        return bool(value.get("mode", "DISABLE") == "DISABLE")
    return False


def _sets(policy: Mapping[str, Any], group: str) -> bool:
    """Whether ``policy`` sets ``group`` to something that changes traffic."""
    value = policy.get(group)
    return value is not None and not _inert(group, value)


#: What port settings carry under keys of their own (in Istio they have none): each
#: ``trafficPolicy`` field and its key.
_PORT_KEYS = {"retryBudget": PORT_RETRY_BUDGET, "proxyProtocol": PORT_PROXY_PROTOCOL}
#: The groups compared: those and the fields of ``_PORT_KEYS``.
_COMPARED = (*_GROUPS, *_PORT_KEYS)


def _effective(policy: Mapping[str, Any]) -> dict[str, Any]:
    """The groups ``policy`` sets, inert ones left out: two policies with the same are alike."""
    return {g: policy[g] for g in _COMPARED if _sets(policy, g)}


def _over(own: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """A subset's ``trafficPolicy`` over the policy of its port, group by group, as the loader
    resolves it: each group the subset's sets, even to nothing, overrides the rule's."""
    out = {g: own[g] for g in _COMPARED if own.get(g) is not None}
    out.update({g: base[g] for g in _COMPARED if g not in out and base.get(g) is not None})
    return out


def _key(policy: Mapping[str, Any]) -> str:
    return json.dumps(_effective(policy), sort_keys=True)


def _most_shared(policies: Mapping[int, dict[str, Any]]) -> int:
    """The port whose policy most of ``policies``' ports have (the lowest port on a tie)."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for port in sorted(policies):
        key = _key(policies[port])
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, port)
    return first[max(counts, key=lambda k: (counts[k], -first[k]))]


def _port_entry(
    port: int, policy: Mapping[str, Any], replaced: Mapping[str, Any]
) -> dict[str, Any]:
    """A ``portLevelSettings`` entry giving ``port`` exactly ``policy``: it replaces
    ``replaced`` whole, so a group ``replaced`` sets and ``policy`` does not is written as
    its default."""
    entry: dict[str, Any] = {"port": {"number": port}, **policy}
    for name, key in _PORT_KEYS.items():
        value = entry.pop(name, None)
        if value is not None:  # exactly the cluster's (Istio's port settings have none)
            entry[key] = value
    for group in _GROUPS:
        if group not in policy and _sets(replaced, group):
            entry[group] = dict(_DEFAULTS[group])
    if not any(g in entry for g in _GROUPS):  # the loader refuses an entry that sets nothing
        entry["loadBalancer"] = dict(_DEFAULTS["loadBalancer"])
    return entry


def _cluster_traffic(hp: _HostPort, hashes: Mapping[str, HashKey]) -> dict[str, Any]:
    """A cluster's ``trafficPolicy``, its ring hash or Maglev made a consistent hash on the
    key the routes to it hash on."""
    policy = dict(hp.policy)
    if hp.hashing is not None:
        key = hashes.get(str(hp.name))
        # Envoy's ring hash or Maglev without a hash key picks endpoints at random.
        policy["loadBalancer"] = (
            {"consistentHash": {**key.consistent_hash(), **hp.hashing}}
            if key is not None
            else {"simple": "RANDOM"}
        )
    return policy


def _destination_rule(
    host: str,
    clusters: list[_HostPort],
    hashes: Mapping[str, HashKey],
    origins: dict[tuple[str, str], tuple[ClusterName, dict[str, str]]],
) -> dict[str, Any]:
    """The DestinationRule giving each of a host's clusters (one per port and subset) exactly
    its own policy (and, in ``origins``, the cluster each ``tls`` block came from).

    The rule's ``trafficPolicy`` is the policy most whole-service clusters share; every other
    port gets a ``portLevelSettings`` entry. A subset's ``trafficPolicy`` is the policy most
    of its clusters share; a port where that policy over the rule's for the port (group by
    group, as the loader resolves it) is not the cluster's gets an entry in the subset's
    ``portLevelSettings``. Each entry replaces the policy it overrides whole, so it writes
    out as defaults the groups that policy sets and the cluster does not.
    """
    group = f"CDS {host}"
    by_name = {hp.name: hp for hp in clusters}

    def origin(block: str, port: int, subset: str | None) -> None:
        hp = by_name[ClusterName(host, port, subset)]
        if "tls" in hp.policy:
            origins.setdefault((group, block), (hp.name, hp.tls_origin))

    plain: dict[int, dict[str, Any]] = {}
    subsets: dict[str, dict[int, dict[str, Any]]] = {}
    for hp in clusters:
        policy = _cluster_traffic(hp, hashes)
        if hp.name.subset is None:
            plain[hp.name.port] = policy
        else:
            subsets.setdefault(hp.name.subset, {})[hp.name.port] = policy
    top: dict[str, Any] = {}
    ports: dict[int, dict[str, Any]] = {}  # the rule's policy for each port it has an entry for
    entries: list[dict[str, Any]] = []
    if plain:
        shared = _most_shared(plain)
        top = dict(plain[shared])
        origin("spec.trafficPolicy.tls", shared, None)
        for port, policy in sorted(plain.items()):
            if _effective(policy) != _effective(top):
                origin(f"spec.trafficPolicy.portLevelSettings[{len(entries)}].tls", port, None)
                entries.append(_port_entry(port, policy, top))
                ports[port] = policy
    # The groups the rule sets for some port.
    rule_sets = [g for g in _GROUPS if _sets(top, g) or any(_sets(p, g) for p in ports.values())]
    docs = []
    for k, (name, policies) in enumerate(subsets.items()):
        path = f"spec.subsets[{k}].trafficPolicy"
        shared = _most_shared(policies)
        own = dict(policies[shared])
        origin(f"{path}.tls", shared, name)
        for g in rule_sets:
            # A subset's policy falls back to the rule's group by group: a subset cluster
            # without a group the rule sets (plain TCP on a TLS host, no outlier detection)
            # says so.
            own.setdefault(g, dict(_DEFAULTS[g]))
        sub_entries: list[dict[str, Any]] = []
        for port, policy in sorted(policies.items()):
            replaced = _over(own, ports.get(port, top))
            if _effective(replaced) != _effective(policy):
                origin(f"{path}.portLevelSettings[{len(sub_entries)}].tls", port, name)
                sub_entries.append(_port_entry(port, policy, replaced))
        if sub_entries:
            own["portLevelSettings"] = sub_entries
        docs.append({"name": name, "labels": {SUBSET_LABEL + name: "true"}, "trafficPolicy": own})
    if entries:
        top["portLevelSettings"] = entries
    return {
        "kind": "DestinationRule",
        "metadata": {"name": host},
        "spec": {"host": host, "trafficPolicy": top, "subsets": docs},
    }
