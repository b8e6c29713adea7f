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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from metaprotocol_sdk.errors import ConfigError

from ..config.loader import PORT_PREFIX, build_config
from ..config.models import Config

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
        "transport_socket_matches": "mutual TLS to Istio workloads; upstream connections are "
        "plain TCP (as with a DestinationRule tls mode DISABLE)",
        "filters": "Istio's metadata exchange for HTTP telemetry",
        "common_lb_config": "locality weighting and panic thresholds (outlier detection has "
        "its own panic mode)",
        "typed_extension_protocol_options": "HTTP protocol options",
        "upstream_connection_options": "TCP keepalive of the system applies",
        "dns_lookup_family": "addresses are resolved by the system resolver",
        "dns_refresh_rate": "addresses are resolved by the system resolver",
        "respect_dns_ttl": "addresses are resolved by the system resolver",
        "eds_cluster_config": "endpoints come over the same ADS stream",
        "per_connection_buffer_limit_bytes": "the engine's limits.connectionBufferBytes applies",
        "track_cluster_stats": "Envoy's own statistics",
    },
    "ClusterLoadAssignment": {"policy": "overprovisioning and endpoint staleness are Envoy's"},
    "LocalityLbEndpoints": {
        "locality": "locality-aware load balancing is not done; every endpoint is alike",
        "load_balancing_weight": "locality weights (every endpoint is alike)",
        "metadata": "opaque to load balancing",
    },
    "LbEndpoint": {
        "metadata": "Istio's workload and tlsMode labels (connections are plain TCP)",
        "load_balancing_weight": "equal weights only (checked); the balancers treat endpoints "
        "alike",
    },
    "Endpoint": {
        "hostname": "the address is connected to",
        "health_check_config": "no health checks; outlier detection ejects failing endpoints",
    },
    "SocketAddress": {"protocol": "TCP is the only protocol", "ipv4_compat": "an IPv6 detail"},
    "Thresholds": {"track_remaining": "Envoy's own statistics", "priority": "checked: DEFAULT"},
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
    if len(parts) != 4 or parts[0] != "outbound" or not parts[3] or not parts[1].isdigit():
        return None
    port = int(parts[1])
    if not 0 < port < 65536:
        return None
    return ClusterName(parts[3], port, parts[2] or None)


@dataclass(frozen=True)
class Resources:
    """The accepted state of the world: resources by name, per type."""

    routes: Mapping[str, Message] = field(default_factory=dict)
    clusters: Mapping[str, Message] = field(default_factory=dict)
    endpoints: Mapping[str, Message] = field(default_factory=dict)


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


# -- field tables ------------------------------------------------------------------------------


def _check(resource: str, msg: Message, path: str, kind: str, honoured: set[str]) -> None:
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


@dataclass
class _RouteTable:
    host: str
    port: int
    doc: dict[str, Any]
    #: Hash attribute asked for by the routes, per cluster name they send to.
    hashes: dict[str, str]
    #: Cluster names the routes send to (including mirrors).
    clusters: set[str]


def _header_match(res: str, m: Any, path: str) -> dict[str, str] | None:
    _check(
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
        return {"exact": m.exact_match}
    if which == "prefix_match":
        return {"prefix": m.prefix_match}
    if which == "safe_regex_match":
        _check(res, m.safe_regex_match, f"{path}.safe_regex_match", "RegexMatcher", {"regex"})
        return {"regex": m.safe_regex_match.regex}
    if which == "present_match":
        if not m.present_match:
            raise XdsRefused(res, f"{path}.present_match", "only present_match: true is supported")
        return None
    if which == "string_match":
        sm = m.string_match
        spath = f"{path}.string_match"
        _check(res, sm, spath, "StringMatcher", {"exact", "prefix", "safe_regex"})
        kind = sm.WhichOneof("match_pattern")
        if kind == "safe_regex":
            _check(res, sm.safe_regex, f"{spath}.safe_regex", "RegexMatcher", {"regex"})
            return {"regex": sm.safe_regex.regex}
        if kind in ("exact", "prefix"):
            return {kind: getattr(sm, kind)}
        raise XdsRefused(res, spath, "needs exact, prefix or safe_regex")
    return None  # no specifier: Envoy's "present"


def _mutation(res: str, options: Iterable[Any], path: str) -> list[dict[str, str]]:
    out = []
    for i, opt in enumerate(options):
        ipath = f"{path}[{i}]"
        _check(res, opt, ipath, "HeaderValueOption", {"header"})
        _check(res, opt.header, f"{ipath}.header", "HeaderValue", {"key", "value", "raw_value"})
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
    _check(
        res,
        r,
        path,
        "Route",
        {"name", "match", "route", "request_headers_to_add", "response_headers_to_add"},
    )
    if r.WhichOneof("action") != "route":
        raise XdsRefused(res, path, "only a route action (to clusters) is supported")
    _check(res, r.match, f"{path}.match", "RouteMatch", {"prefix", "headers"})
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
    _check(
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
        _check(
            res, wc, f"{apath}.weighted_clusters", "WeightedCluster", {"clusters", "total_weight"}
        )
        dests = []
        for c, cw in enumerate(wc.clusters):
            cpath = f"{apath}.weighted_clusters.clusters[{c}]"
            _check(res, cw, cpath, "ClusterWeight", {"name", "weight"})
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
        _check(res, mp, mpath, "RequestMirrorPolicy", {"cluster", "runtime_fraction"})
        route["mirror"] = _destination(res, mp.cluster, f"{mpath}.cluster")
        table.clusters.add(mp.cluster)
        if mp.HasField("runtime_fraction"):
            rf = mp.runtime_fraction
            _check(
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
    for h, hp in enumerate(action.hash_policy):
        hpath = f"{apath}.hash_policy[{h}]"
        _check(res, hp, hpath, "HashPolicy", {"header"})
        if h:
            raise XdsRefused(res, hpath, "one hash policy per route (a header)")
        for target in targets:
            known = table.hashes.setdefault(target, hp.header.header_name)
            if known != hp.header.header_name:
                raise XdsRefused(
                    res, hpath, f"cluster {target!r} is hashed on {known!r} by another route"
                )
    table.clusters.update(targets)
    request = _mutation(res, r.request_headers_to_add, f"{path}.request_headers_to_add")
    response = _mutation(res, r.response_headers_to_add, f"{path}.response_headers_to_add")
    if request:
        route["requestMutation"] = request
    if response:
        route["responseMutation"] = response
    return route


def _route_table(name: str, rc: Any, listeners: Mapping[str, tuple[str, int]]) -> _RouteTable:
    res = f"RDS {name}"
    _check(res, rc, "", "RouteConfiguration", {"name", "virtual_hosts"})
    host, port = listeners[name]
    if len(rc.virtual_hosts) != 1:
        raise XdsRefused(
            res,
            "virtual_hosts",
            f"expected one virtual host (MetaRDS), got {len(rc.virtual_hosts)}",
        )
    vh = rc.virtual_hosts[0]
    _check(res, vh, "virtual_hosts[0]", "VirtualHost", {"name", "routes"})
    table = _RouteTable(host, port, {}, {}, set())
    routes = [_route(res, r, i, table) for i, r in enumerate(vh.routes)]
    table.doc = {
        "kind": "MetaRouter",
        "metadata": {"name": name},
        "spec": {"hosts": [host], "routes": routes},
    }
    return table


# -- CDS / EDS ---------------------------------------------------------------------------------


@dataclass
class _HostPort:
    """One outbound cluster's parsed policy and endpoints."""

    name: ClusterName
    policy: dict[str, Any]
    ring_hash: bool
    endpoints: list[tuple[str, int]]


_LB = {0: "ROUND_ROBIN", 1: "LEAST_REQUEST", 3: "RANDOM"}


def _cluster_policy(res: str, c: Any) -> tuple[dict[str, Any], bool]:
    _check(
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
        },
    )
    policy: dict[str, Any] = {}
    ring = c.lb_policy in (2, 5)
    if not ring:
        if c.lb_policy not in _LB:
            raise XdsRefused(res, "lb_policy", f"load balancer {c.lb_policy} is not supported")
        policy["loadBalancer"] = {"simple": _LB[c.lb_policy]}
    tcp: dict[str, Any] = {}
    http: dict[str, Any] = {}
    if c.HasField("connect_timeout") and _seconds(c.connect_timeout) > 0:
        tcp["connectTimeout"] = _duration(c.connect_timeout)
    if c.HasField("max_requests_per_connection"):
        http["maxRequestsPerConnection"] = c.max_requests_per_connection.value
    if c.HasField("common_http_protocol_options"):
        opts = c.common_http_protocol_options
        _check(res, opts, "common_http_protocol_options", "HttpProtocolOptions", {"idle_timeout"})
        if opts.HasField("idle_timeout") and _seconds(opts.idle_timeout) > 0:
            http["idleTimeout"] = _duration(opts.idle_timeout)
    for t, th in enumerate(c.circuit_breakers.thresholds):
        tpath = f"circuit_breakers.thresholds[{t}]"
        _check(
            res,
            th,
            tpath,
            "Thresholds",
            {"max_connections", "max_pending_requests", "max_requests", "max_retries"},
        )
        if th.priority != 0:
            continue  # HIGH priority: routes here have no priority, so DEFAULT applies
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
        _check(
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
            },
        )
        detection: dict[str, Any] = {}
        # Envoy enforces consecutive 5xx by default (100 %) and gateway failures only when
        # asked (0 %); istiod sets both enforcing fields to say which Istio field was given.
        enforce_5xx = od.enforcing_consecutive_5xx
        if od.HasField("consecutive_5xx") and (
            not od.HasField("enforcing_consecutive_5xx") or enforce_5xx.value > 0
        ):
            detection["consecutive5xxErrors"] = od.consecutive_5xx.value
        if od.HasField("consecutive_gateway_failure") and (
            od.enforcing_consecutive_gateway_failure.value > 0
        ):
            detection["consecutiveGatewayErrors"] = od.consecutive_gateway_failure.value
        if od.HasField("interval"):
            detection["interval"] = _duration(od.interval)
        if od.HasField("base_ejection_time"):
            detection["baseEjectionTime"] = _duration(od.base_ejection_time)
        if od.HasField("max_ejection_percent"):
            detection["maxEjectionPercent"] = od.max_ejection_percent.value
        policy["outlierDetection"] = detection
    return policy, ring


def _endpoints(res: str, cla: Any) -> list[tuple[str, int]]:
    _check(res, cla, "", "ClusterLoadAssignment", {"cluster_name", "endpoints"})
    out = []
    weights = set()
    for i, group in enumerate(cla.endpoints):
        gpath = f"endpoints[{i}]"
        _check(res, group, gpath, "LocalityLbEndpoints", {"lb_endpoints", "priority"})
        if group.priority:
            raise XdsRefused(res, f"{gpath}.priority", "failover priorities are not supported")
        for j, lb in enumerate(group.lb_endpoints):
            lpath = f"{gpath}.lb_endpoints[{j}]"
            _check(res, lb, lpath, "LbEndpoint", {"endpoint", "health_status"})
            if lb.HasField("load_balancing_weight"):
                weights.add(lb.load_balancing_weight.value)
            if lb.health_status in (2, 3, 4):  # UNHEALTHY, DRAINING, TIMEOUT: not routed to
                continue
            ep = lb.endpoint
            _check(res, ep, f"{lpath}.endpoint", "Endpoint", {"address"})
            if ep.address.WhichOneof("address") != "socket_address":
                raise XdsRefused(res, f"{lpath}.endpoint.address", "needs a socket_address")
            sa = ep.address.socket_address
            _check(
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
            out.append((sa.address, sa.port_value))
    if len(weights) > 1:
        raise XdsRefused(
            res, "endpoints", "endpoints of unequal load_balancing_weight are not supported"
        )
    return out


def _host_ports(resources: Resources) -> dict[str, list[_HostPort]]:
    """Outbound clusters with their endpoints, by host."""
    hosts: dict[str, list[_HostPort]] = {}
    for name, c in sorted(resources.clusters.items()):
        parsed = parse_cluster_name(name)
        if parsed is None:
            continue  # inbound, passthrough and black-hole clusters: not this proxy's routes
        res = f"CDS {name}"
        policy, ring = _cluster_policy(res, c)
        kind = c.WhichOneof("cluster_discovery_type")
        if kind == "cluster_type":
            raise XdsRefused(res, "cluster_type", "custom cluster types are not supported")
        if c.type == 3:  # EDS
            service = c.eds_cluster_config.service_name or name
            cla = resources.endpoints.get(service)
            eps = [] if cla is None else _endpoints(f"EDS {service}", cla)
        elif c.type in (0, 1, 2):  # STATIC, STRICT_DNS, LOGICAL_DNS: inline endpoints
            eps = _endpoints(res + " load_assignment", c.load_assignment)
        else:
            raise XdsRefused(res, "type", "ORIGINAL_DST clusters are not supported")
        hosts.setdefault(parsed.host, []).append(_HostPort(parsed, policy, ring, eps))
    return hosts


# -- the whole -------------------------------------------------------------------------------


def _file_ports(base: Config, host: str) -> dict[int, tuple[str, str]]:
    """The file's ServiceEntry ports for ``host``: number -> (name, namespace)."""
    service = base.services.get(host)
    if service is None:
        return {}
    return {n: (p.name, service.namespace) for n, p in service.ports.items()}


def translate(base: Config, resources: Resources) -> Config:
    """The file configuration ``base`` with routes, clusters and endpoints from ``resources``
    (its engine settings, ``base.proxy``, kept exactly as given).

    Raises :class:`XdsRefused` for a field this engine does not implement, and
    :class:`~metaprotocol_sdk.errors.ConfigError` for a resource the loader refuses (both
    name the resource; the message is the NACK's ``error_detail``).
    """
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
    hashes: dict[str, str] = {}
    for table in tables.values():
        for cname, attr in table.hashes.items():
            if hashes.setdefault(cname, attr) != attr:
                raise XdsRefused(f"CDS {cname}", "", f"hashed on {hashes[cname]!r} and {attr!r}")
    groups: list[tuple[str, list[dict[str, Any]]]] = []
    xds_hosts = _host_ports(resources)
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
    for host, clusters in sorted(xds_hosts.items()):
        docs = _host_documents(base, host, clusters, protocols, hashes)
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
        config = build_config(groups, control_plane=True)
    except ConfigError as exc:
        raise ConfigError(exc.reason, source=f"xDS {exc.source}", field=exc.field) from exc
    # The engine's own settings stay ``base``'s as given, not as its documents read: a worker
    # of --workers N serves them with the shared ports and a private admin endpoint, and
    # rebinding its listeners to the files' ``:0`` would take it out of the shared group.
    return replace(config, proxy=base.proxy)


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
    hashes: Mapping[str, str],
) -> list[dict[str, Any]]:
    """The ServiceEntry and DestinationRule for one host's outbound clusters."""
    res = f"CDS {host}"
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
    owned = {port: set(hp.endpoints) for port, hp in plain.items()}
    # Endpoint identity: (address, port) on a single-port host; the address on a multi-port one.
    entries: dict[Any, dict[str, Any]] = {}
    for hp in clusters:
        seen = set()
        for address, port in hp.endpoints:
            key = address if multi else (address, port)
            if multi and (address in seen):
                raise XdsRefused(
                    f"EDS {hp.name}",
                    "",
                    f"address {address} is listed twice; on a host with "
                    "several ports every address must be one endpoint",
                )
            seen.add(address)
            entry = entries.setdefault(key, {"address": address, "ports": {}, "labels": {}})
            pname = ports[hp.name.port]
            if entry["ports"].setdefault(pname, port) != port:
                raise XdsRefused(
                    f"EDS {hp.name}", "", f"address {address} has two ports for port {pname}"
                )
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
    top: dict[str, Any] = {}
    subsets: dict[str, dict[str, Any]] = {}
    for hp in clusters:
        policy = dict(hp.policy)
        if hp.ring_hash:
            attr = hashes.get(str(hp.name))
            # Envoy's ring hash without a hash key picks endpoints at random.
            policy["loadBalancer"] = (
                {"consistentHash": {"httpHeaderName": attr}} if attr else {"simple": "RANDOM"}
            )
        if hp.name.subset is None:
            if top and top != policy:
                raise XdsRefused(
                    res,
                    "",
                    f"{hp.name} has another policy than the host's other ports "
                    "(per-port policies are not supported)",
                )
            top = policy
        else:
            known = subsets.get(hp.name.subset)
            if known is not None and known["trafficPolicy"] != policy:
                raise XdsRefused(
                    res, "", f"{hp.name} has another policy than the subset on other ports"
                )
            subsets[hp.name.subset] = {
                "name": hp.name.subset,
                "labels": {SUBSET_LABEL + hp.name.subset: "true"},
                "trafficPolicy": policy,
            }
    rule = {
        "kind": "DestinationRule",
        "metadata": {"name": host},
        "spec": {"host": host, "trafficPolicy": top, "subsets": list(subsets.values())},
    }
    return [service, rule]
