"""``/config_dump``: the validated configuration and the runtime built from it, as JSON."""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, Any

from metaprotocol_sdk import compilation

from .admin import DUMP_DOCUMENTS_BYTES, bounded_copy
from .balancer import RING_SIZE
from .config.models import LoadBalancer, Route
from .tls import dump_listener, dump_upstream
from .upstream import AvoidUnfit, Cluster

if TYPE_CHECKING:
    from .engine import Engine


def config_dump(engine: Engine) -> dict[str, Any]:
    """A JSON-ready view of the validated configuration and the runtime built from it.

    The documents as parsed come last, capped (``admin.DUMP_DOCUMENTS_BYTES``, a marker
    where cut): YAML aliases are shared references there, and expanding them unbounded
    is how a 1 KB file became a 378 MB response.
    """
    settings = engine.config.proxy
    matches = {  # route conditions as validated, by (MetaRouter host, route name)
        (host, route.name): [
            {"attribute": m.attribute, m.kind: m.value if m.kind != "present" else True}
            for m in route.match
        ]
        for host, router in engine.config.routers.items()
        for route in router.routes
    }
    policies = {  # route policies as validated, by (MetaRouter host, route name)
        (host, route.name): route_policies(route)
        for host, router in engine.config.routers.items()
        for route in router.routes
    }
    documents, truncated = bounded_copy(
        list(engine.config.documents), DUMP_DOCUMENTS_BYTES, "/documents"
    )
    admin = settings.admin
    return {
        "version": engine.config_version,
        "lastReload": None if engine.last_reload is None else engine.last_reload.as_dict(),
        "sources": list(engine.config.sources),
        "meshIdentity": None if engine.identity is None else engine.identity.dump(),
        "peerAuthentication": plain(settings.peer_authentication),
        # The AuthorizationPolicies in force, by action (None: none).
        "authorizationPolicies": None
        if settings.authorization is None
        else {
            "DENY": [p.name for p in settings.authorization.deny],
            "ALLOW": [p.name for p in settings.authorization.allow],
            "AUDIT": [p.name for p in settings.authorization.audit],
        },
        # Those in dry run (istio.io/dry-run), judged and counted, never enforced.
        "authorizationPoliciesDryRun": None
        if settings.authorization is None
        else {
            "DENY": [p.name for p in settings.authorization.dry_deny],
            "ALLOW": [p.name for p in settings.authorization.dry_allow],
        },
        # The workload PeerAuthentications and AuthorizationPolicies were selected for (None:
        # its namespace is not known, and every one read applies), and those that do not.
        "policyScope": plain(settings.policy_scope),
        "policiesNotApplied": list(settings.policies_not_applied),
        "listeners": [
            {
                "name": listener.name,
                "bind": f"{listener.bind_host}:{listener.bind_port}",
                "address": ":".join(
                    map(str, engine.listener_addresses.get((listener.host, listener.port), ()))
                ),
                "protocol": engine.config.protocol_of(listener.host, listener.port).name,
                "filters": [spec.name for spec in listener.filters],
                "tls": dump_listener(listener.tls),
                # The PeerAuthentication mode it follows (None: its own tls, or no identity).
                "peerAuthentication": listener.peer_mode,
                # Its own policies, from the control plane's inbound listener (None: the
                # ProxyConfig's, above), and the filter chains of it they were read from.
                "authorizationPolicies": None
                if listener.authorization is None
                else {
                    "DENY": [p.name for p in listener.authorization.deny],
                    "ALLOW": [p.name for p in listener.authorization.allow],
                    "AUDIT": [p.name for p in listener.authorization.audit],
                    "dryRun": {
                        "DENY": [p.name for p in listener.authorization.dry_deny],
                        "ALLOW": [p.name for p in listener.authorization.dry_allow],
                    },
                    "inboundChains": list(listener.inbound_chains),
                },
                "connectionRateLimit": plain(listener.connection_rate_limit),
                # Seconds after which a client connection is noticed and closed once quiet.
                "maxConnectionDuration": listener.max_connection_duration,
                "localRateLimit": plain(
                    getattr(engine.config.routers.get(listener.host), "local_rate_limit", None)
                ),
                "globalRateLimit": plain(
                    getattr(engine.config.routers.get(listener.host), "global_rate_limit", None)
                ),
                "routes": [
                    {
                        "name": route.name,
                        "match": matches.get((listener.host, route.name), []),
                        "timeout": route.timeout,
                        "destinations": [
                            {"name": t.name, "weight": t.weight, "known": t.cluster is not None}
                            for t in route.targets
                        ],
                        "requestMutation": route.request_mutation or {},
                        "responseMutation": route.response_mutation or {},
                        "chain": [f.name or type(f).__name__ for f in route.request_filters],
                        **policies.get((listener.host, route.name), {}),
                    }
                    for route in engine.listeners[(listener.host, listener.port)].table.routes
                ]
                if (listener.host, listener.port) in engine.listeners
                else [],
            }
            for listener in settings.listeners
        ],
        "clusters": [
            {
                "name": c.name,
                "protocol": c.protocol.name,
                "codec": c.protocol.codec_name,
                "pooling": "shared" if c.shared else "dedicated",
                "loadBalancer": _balancer_name(c),
                "hashAttribute": c.policy.hash_attribute,
                **(_hashing(c.policy) if c.policy.policy == "CONSISTENT_HASH" else {}),
                "endpoints": [h.key for h in c.hosts],
                "weights": (  # in the order of endpoints
                    c.slow_start.endpoint_weights
                    if c.slow_start is not None
                    else [h.weight for h in c.hosts]
                ),
                "connectionPool": plain(c.pool),
                "retryBudget": plain(c.retry_budget),
                # The PROXY protocol header each connection starts with (``None``: none).
                "proxyProtocol": (
                    None if c.proxy_protocol is None else {"version": c.proxy_protocol.name}
                ),
                # The HTTP tunnel each connection opens through its endpoint (``None``: none).
                "tunnel": (
                    None
                    if c.tunnel is None
                    else {
                        "protocol": c.tunnel.protocol,
                        "targetHost": c.tunnel.target_host,
                        "targetPort": c.tunnel.target_port,
                    }
                ),
                "outlierDetection": None if c.outlier is None else plain(c.outlier.spec),
                "ejected": [h.key for h in c.hosts if h.ejected],
                # Endpoints that sent their codec's drain notice on a connection still open.
                "draining": [h.key for h in c.hosts if h.draining],
                # Slow start's settings (the endpoints warming: the "slowStart" section).
                **({"warmup": plain(c.policy.warmup)} if c.policy.warmup is not None else {}),
                # Failover priorities (xDS only): each endpoint's, and each level's load.
                **(
                    {
                        "priorities": [h.priority for h in c.hosts],
                        "priorityLoad": {str(p): v for p, v in c.priority_load.items()},
                    }
                    if c.prioritised
                    else {}
                ),
                # Locality weighted balancing: each endpoint's locality and its weight.
                **(
                    {
                        "localities": [h.locality for h in c.hosts],
                        "localityWeights": [h.locality_weight for h in c.hosts],
                    }
                    if c.locality_weighted
                    else {}
                ),
                "tls": dump_upstream(c.tls, c),
            }
            for c in engine.clusters.values()
        ],
        "protocols": {
            p.name: {
                "codec": p.codec_name,
                "options": bounded_copy(
                    p.options, DUMP_DOCUMENTS_BYTES, f"/protocols/{p.name}/options"
                )[0],
            }
            for p in engine.config.protocols.values()
        },
        "compiled": {  # modules running compiled (mypyc), by package
            package: list(compilation.compiled(package))
            for package in sorted(
                {"metaprotocol_sdk"}
                | {
                    p.codec_class.__module__.partition(".")[0]
                    for p in engine.config.protocols.values()
                }
            )
        },
        "settings": {
            "limits": {
                **vars(settings.limits),
                "max_connections": engine.max_connections,
                "max_upstream_connections": engine.max_upstream_connections,
            },
            "overload": vars(settings.overload),
            "timeouts": vars(settings.timeouts),
            "watchdog": vars(settings.watchdog),
            "accessLog": None
            if settings.access_log is None
            else {
                "path": settings.access_log.path,
                "otlp": None
                if settings.access_log.otlp is None
                else vars(settings.access_log.otlp),
                "attributes": list(settings.access_log.attributes),
                "maxValueLength": settings.access_log.max_value_length,
                "filter": {
                    "failures": settings.access_log.failures_only,
                    "slowerThan": settings.access_log.slower_than,
                },
            },
            "connectionsPerEndpoint": settings.connections_per_endpoint,
            "upstreamHeartbeat": vars(settings.upstream_heartbeat),
            "admin": None
            if admin is None
            else {
                "bind": f"{admin.bind[0]}:{admin.bind[1]}",
                "allowRemote": admin.allow_remote,
                "maxConnections": admin.max_connections,
                "requestTimeout": admin.request_timeout,
            },
        },
        "documents": documents,
        "documentsTruncated": truncated,
        **{key: section() for key, section in engine.dump_sections.items()},
    }


def _hashing(policy: LoadBalancer) -> dict[str, Any]:
    """A consistent hash's key and algorithm, as the balancer applies them."""
    key = {"useSourceIp": policy.hash_attribute is None}
    if policy.maglev_table_size is not None:
        return {**key, "maglev": {"tableSize": policy.maglev_table_size}}
    size = RING_SIZE if policy.ring_size is None else policy.ring_size
    ring: dict[str, Any] = {"minimumRingSize": size}
    if policy.ring_maximum is not None:
        ring["maximumRingSize"] = policy.ring_maximum
    return {**key, "ringHash": ring}


def plain(value: Any) -> Any:
    """A validated model object as JSON-ready data (``None`` stays ``None``)."""
    if value is None:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, enum.Enum):
        return value.name
    return value


def route_policies(route: Route) -> dict[str, Any]:
    """A route's fault, mirror and retries for ``/config_dump`` (only those it has)."""
    out: dict[str, Any] = {}
    for key, value in (
        ("fault", route.fault),
        ("mirror", route.mirror),
        ("retries", route.retries),
    ):
        if value is not None:
            out[key] = plain(value)
    return out


def _balancer_name(cluster: Cluster) -> str:
    """The class of ``cluster``'s balancer (the one built, while a rebuild waits its turn)."""
    balancer = cluster.balancer
    if isinstance(balancer, AvoidUnfit):
        return type(balancer.built).__name__
    return type(balancer).__name__
