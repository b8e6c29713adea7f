"""Validated configuration: what the loader builds and the engine reads.

Every object here is already checked: hosts exist, subsets exist, codecs load, durations parse.
The engine never re-validates; it only compiles these into its runtime structures.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from metaprotocol_sdk.codec import Codec
from metaprotocol_sdk.enums import ErrorType
from metaprotocol_sdk.filters import Filter

if TYPE_CHECKING:
    from ..authorization import Authorization

#: Load balancing policies (Istio ``DestinationRule.trafficPolicy.loadBalancer``).
LbPolicy = Literal["ROUND_ROBIN", "RANDOM", "LEAST_REQUEST", "CONSISTENT_HASH"]
#: Attribute match kinds; ``present`` is the empty matcher ``{}``.
MatchKind = Literal["exact", "prefix", "regex", "present"]


@dataclass(frozen=True)
class Protocol:
    """An ``ApplicationProtocol``: a protocol name bound to a codec class and its options."""

    name: str
    codec_name: str
    codec_class: type[Codec]
    options: dict[str, Any] = field(default_factory=dict)

    def create_codec(self) -> Codec:
        """A new codec instance."""
        return codec_maker(self.codec_class, self.options)()


def codec_maker(cls: type[Codec], options: Mapping[str, Any]) -> Callable[[], Codec]:
    """What makes a connection's codec: ``cls(**options)``, the options checked once when
    they were loaded (``Codec.from_options`` checks them against ``__init__``'s signature,
    13-21 us per connection for the KV and Dubbo codecs, against 0.2 and 1 us for the
    construction itself), or the codec's own ``from_options`` when it overrides it."""
    if getattr(cls.from_options, "__func__", None) is _FROM_OPTIONS:
        return partial(cls, **options)
    return partial(cls.from_options, options)


_FROM_OPTIONS = Codec.__dict__["from_options"].__func__


@dataclass(frozen=True)
class ServicePort:
    """One ``ServiceEntry`` port. ``protocol`` is the MetaProtocol protocol, or ``None``."""

    number: int
    name: str
    protocol: str | None
    target_port: int | None = None


#: Where the xDS translation puts an endpoint's failover priority in one cluster (EDS
#: ``LocalityLbEndpoints.priority``; Istio's ``ServiceEntry`` has no such field): the label
#: :func:`priority_label` names holds it, when it is not 0.
PRIORITY_LABEL = "xds.metaprotocol.io/priority-"


def priority_label(port: int, subset: str | None) -> str:
    """The label holding an endpoint's failover priority in the cluster of a service port
    and subset (a port's clusters, and a subset's, may each have their own priorities)."""
    return f"{PRIORITY_LABEL}{port}" if subset is None else f"{PRIORITY_LABEL}{port}.{subset}"


#: Where the xDS translation puts an endpoint's locality weight in one cluster with
#: ``common_lb_config.locality_weighted_lb_config`` (EDS ``LocalityLbEndpoints``'
#: ``load_balancing_weight`` and ``locality``): the label :func:`locality_weight_label` names
#: holds ``"{weight} {region}/{zone}/{subzone}"``.
LOCALITY_WEIGHT_LABEL = "xds.metaprotocol.io/locality-weight-"


def locality_weight_label(port: int, subset: str | None) -> str:
    """The label holding an endpoint's locality and locality weight in the cluster of a
    service port and subset (see :meth:`Endpoint.locality_weight_in`)."""
    name = LOCALITY_WEIGHT_LABEL
    return f"{name}{port}" if subset is None else f"{name}{port}.{subset}"


#: Istio's label of a workload with a sidecar (``istio``): automatic mutual TLS sends it
#: ``ISTIO_MUTUAL``, and plain text to an endpoint without it (or with ``disabled``).
TLS_MODE_LABEL = "security.istio.io/tlsMode"
#: Where the xDS translation puts an endpoint's ``tlsMode`` in one cluster (its EDS
#: ``envoy.transport_socket_match`` metadata, which istiod writes per cluster).
TLS_MODE_XDS_LABEL = "xds.metaprotocol.io/tls-mode-"


#: The key of a translated ``tls`` block (``ISTIO_MUTUAL``) saying that it is istiod's
#: automatic mutual TLS (a cluster's ``transport_socket_matches``): read from the control
#: plane only, never from a file.
AUTO_MTLS_KEY = "xds.metaprotocol.io/autoMtls"
#: The key of a translated ``tls`` block (``ISTIO_MUTUAL``) saying that istiod's ALPN for the
#: cluster lacks ``istio-peer-exchange`` (its metadata exchange is off): read from the
#: control plane only, never from a file.
PEER_EXCHANGE_KEY = "xds.metaprotocol.io/peerExchange"

#: The key of a translated ``ringHash`` block holding Envoy's ``maximum_ring_size`` (Istio has
#: no such field): read from the control plane only, never from a file.
MAXIMUM_RING_SIZE = "xds.metaprotocol.io/maximumRingSize"

#: The key of a translated ``portLevelSettings`` entry holding its cluster's retry budget
#: (Istio's port settings have no ``retryBudget``): read from the control plane only.
PORT_RETRY_BUDGET = "xds.metaprotocol.io/retryBudget"
#: The key of a translated ``portLevelSettings`` entry holding its cluster's PROXY protocol
#: version (Istio's port settings have no ``proxyProtocol``): read from the control plane only.
PORT_PROXY_PROTOCOL = "xds.metaprotocol.io/proxyProtocol"


def tls_mode_label(port: int, subset: str | None) -> str:
    """The label holding an endpoint's ``tlsMode`` in the cluster of a service port and
    subset, as the xDS translation writes it (see :meth:`Endpoint.mesh_tls_in`)."""
    return (
        f"{TLS_MODE_XDS_LABEL}{port}" if subset is None else f"{TLS_MODE_XDS_LABEL}{port}.{subset}"
    )


def _uint32_text(value: str) -> bool:
    """Whether ``value`` is a number the xDS translation writes in a label (a uint32: ASCII
    digits, at most ten; a file may write any label, and ``int`` of 5000 digits raised)."""
    return 0 < len(value) <= 10 and value.isascii() and value.isdigit()


@dataclass(frozen=True)
class Endpoint:
    """One ``ServiceEntry`` endpoint."""

    address: str
    ports: dict[str, int]
    labels: dict[str, str]
    #: Load balancing weight, 1 to 2^32 - 1 (Istio's ``weight``; 1 when unset).
    weight: int = 1
    #: ``region/zone/subzone`` (Istio's ``locality``; ``""``: not given).
    locality: str = ""

    def port_for(self, port: ServicePort) -> int:
        """The endpoint's port for a service port (named port, targetPort, or the number)."""
        return self.ports.get(port.name, port.target_port or port.number)

    def priority_in(self, port: int, subset: str | None) -> int:
        """The endpoint's failover priority in the cluster of service port ``port`` and
        ``subset``: its :func:`priority_label`, 0 (the first level) without one."""
        value = self.labels.get(priority_label(port, subset))
        return int(value) if value is not None and _uint32_text(value) else 0

    def locality_weight_in(self, port: int, subset: str | None) -> tuple[str, int] | None:
        """The endpoint's locality and its locality's weight in the cluster of ``port`` and
        ``subset`` (from xDS: its :func:`locality_weight_label`); ``None``: not weighted."""
        value = self.labels.get(locality_weight_label(port, subset))
        if value is None:
            return None
        weight, _, locality = value.partition(" ")
        return (locality, int(weight)) if _uint32_text(weight) else None

    def mesh_tls_in(self, port: int, subset: str | None) -> bool:
        """Whether automatic mutual TLS sends ``ISTIO_MUTUAL`` to this endpoint in the
        cluster of ``port`` and ``subset``: its ``tlsMode`` there (from xDS) is ``istio``,
        else its ``security.istio.io/tlsMode`` label is."""
        value = self.labels.get(tls_mode_label(port, subset))
        return (value if value is not None else self.labels.get(TLS_MODE_LABEL)) == "istio"


@dataclass(frozen=True)
class Service:
    """A ``ServiceEntry``: hosts, ports and endpoints."""

    name: str
    hosts: tuple[str, ...]
    ports: dict[int, ServicePort]
    endpoints: tuple[Endpoint, ...]
    source: str = ""
    #: ``metadata.namespace`` (Istio's ``destination_service_namespace``).
    namespace: str = "default"
    #: ``spec.subjectAltNames``: the identities a server of this service may have, checked
    #: by ``ISTIO_MUTUAL`` when the DestinationRule's ``tls`` names none (as in Istio).
    subject_alt_names: tuple[str, ...] = ()
    #: ``spec.location: MESH_INTERNAL`` (Istio's default is ``MESH_EXTERNAL``): automatic
    #: mutual TLS applies to mesh-internal services only, as in istiod.
    mesh_internal: bool = False


@dataclass(frozen=True)
class LocalityDistribute:
    """One rule of ``localityLbSetting.distribute``: for an engine in a locality ``origin``
    matches (Istio's ``from``), the share of traffic (percent, adding up to 100) of the
    localities each pattern of ``to`` matches. Patterns are ``region[/zone[/subzone]]``,
    ``*`` standing for the rest (a region alone: any zone of it)."""

    origin: str
    to: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class LocalityLbSetting:
    """Istio's ``loadBalancer.localityLbSetting``: locality failover on or off,
    ``failover``: ``(from region, to region)`` pairs, ``failover_priority``: the labels
    that order endpoints into failover priorities, each ``(label, value)`` with the value to
    compare with (``None``: the engine's own label), and ``distribute``: locality weighted
    load balancing (the first rule whose ``from`` matches the engine's locality applies;
    with it, no failover)."""

    enabled: bool = True
    failover: tuple[tuple[str, str], ...] = ()
    failover_priority: tuple[tuple[str, str | None], ...] = ()
    distribute: tuple[LocalityDistribute, ...] = ()


@dataclass(frozen=True)
class LoadBalancer:
    """A load balancing policy; ``locality``: its ``localityLbSetting`` (``None``: not set,
    istiod's default applies).

    ``CONSISTENT_HASH`` hashes the metadata attribute ``hash_attribute``
    (``consistentHash.httpHeaderName``) or, when it is ``None``, the client's IP address
    (``useSourceIp``); on a ring of at least ``ring_size`` points (``ringHash.minimumRingSize``;
    ``None``: Istio's default, 1024) and at most ``ring_maximum`` (xDS ``maximum_ring_size``;
    ``None``: the engine's bound), or in a Maglev table of ``maglev_table_size`` slots
    (``maglev.tableSize``; ``None``: a ring).
    """

    policy: LbPolicy = "ROUND_ROBIN"
    hash_attribute: str | None = None
    locality: LocalityLbSetting | None = None
    ring_size: int | None = None
    ring_maximum: int | None = None
    maglev_table_size: int | None = None
    #: Slow start of new endpoints (``warmup``; ``ROUND_ROBIN`` and ``LEAST_REQUEST`` only).
    warmup: Warmup | None = None


@dataclass(frozen=True)
class Warmup:
    """Istio's ``loadBalancer.warmup`` (or ``warmupDurationSecs``), Envoy's slow start: an
    endpoint new to a cluster takes a growing part of its share for ``duration`` seconds
    (see :mod:`~metaprotocol_sdk.proxy.slow_start`)."""

    duration: float
    #: The least part of its weight an endpoint warming has, in percent (Envoy's default 10).
    minimum_percent: float = 10.0
    #: How fast the share grows: 1.0 linearly, more is faster at first.
    aggression: float = 1.0


@dataclass(frozen=True)
class TcpKeepalive:
    """Istio's ``connectionPool.tcp.tcpKeepalive`` (``None``: the system's setting)."""

    probes: int | None = None
    time: float | None = None
    interval: float | None = None


@dataclass(frozen=True)
class ConnectionPool:
    """Istio's ``trafficPolicy.connectionPool``: circuit-breaker limits of a cluster.

    ``tcp``: ``max_connections``, ``connect_timeout``, ``keepalive``, ``max_connection_duration``
    (an upstream connection's lifetime, then it is retired) and ``tcp_idle_timeout``
    (``tcp.idleTimeout``: used when ``idleTimeout`` is not set). The request pool reuses
    Istio's ``http`` field names where they mean the same here: ``http1MaxPendingRequests``
    (requests waiting for an upstream connection: opening, or with room, see
    ``maxConcurrentStreams``), ``http2MaxRequests`` (requests in flight),
    ``maxRequestsPerConnection``, ``idleTimeout``, ``maxRetries`` (retries in flight),
    ``maxConcurrentStreams`` (requests in flight per connection: more open connections, or
    wait for room).
    ``None``: no limit (the engine's own limits still apply).
    """

    max_connections: int | None = None
    connect_timeout: float | None = None
    keepalive: TcpKeepalive | None = None
    max_connection_duration: float | None = None
    tcp_idle_timeout: float | None = None
    max_pending_requests: int | None = None
    max_requests: int | None = None
    max_requests_per_connection: int | None = None
    idle_timeout: float | None = None
    max_retries: int | None = None
    max_concurrent_streams: int | None = None

    @property
    def inert(self) -> bool:
        """Whether it sets nothing (``connectionPool: {}``): no limits, the engine's
        defaults, exactly as no pool."""
        return self == _NO_POOL

    @property
    def upstream_idle_timeout(self) -> float | None:
        """How long an upstream connection may have nothing in flight: ``http.idleTimeout``
        when set, else ``tcp.idleTimeout`` (istiod gives the Envoy cluster the same one);
        ``None``: neither is set."""
        return self.tcp_idle_timeout if self.idle_timeout is None else self.idle_timeout


_NO_POOL = ConnectionPool()


@dataclass(frozen=True)
class RetryBudget:
    """Istio's ``trafficPolicy.retryBudget``, Envoy's circuit-breaker ``retry_budget``: the
    retries in flight to a cluster are at most ``percent`` of its requests in flight (those
    waiting for a connection too), and at least ``min_retry_concurrency``. A cluster with a
    budget does not check ``connectionPool.http.maxRetries`` (Envoy ignores ``max_retries``
    then)."""

    #: Istio's and Envoy's default, 20 %.
    percent: float = 20.0
    #: Istio's and Envoy's default, 3 (Istio's ``0`` is the default too).
    min_retry_concurrency: int = 3

    def allowed(self, active: int) -> int:
        """How many retries may be in flight while ``active`` requests are: Envoy's
        ``max(percent / 100 * active, min_retry_concurrency)``, the product rounded down."""
        return max(int(self.percent / 100.0 * active), self.min_retry_concurrency)


@dataclass(frozen=True)
class ProxyProtocol:
    """Istio's ``trafficPolicy.proxyProtocol``, Envoy's ``upstream_proxy_protocol`` transport
    socket: each upstream connection starts with a PROXY protocol header naming the client
    it carries (see proxy_protocol.py), so a client's requests never share a connection
    with another client's."""

    #: 1 (the text header, Istio's default ``V1``) or 2 (the binary one, ``V2``).
    version: int = 1

    @property
    def name(self) -> str:
        """Istio's name of the version: ``V1`` or ``V2``."""
        return f"V{self.version}"


@dataclass(frozen=True)
class Tunnel:
    """Istio's ``trafficPolicy.tunnel`` (``TunnelSettings``), Envoy's tcp_proxy
    ``tunneling_config``: each upstream connection is made to the endpoint, an HTTP proxy,
    and opens an HTTP/1.1 tunnel to ``target_host:target_port`` before it carries anything
    else (see tunnel.py)."""

    target_host: str
    target_port: int
    #: ``CONNECT`` (Istio's default).
    protocol: str = "CONNECT"

    @property
    def authority(self) -> str:
        """``host:port`` of the target (an IPv6 address in brackets)."""
        host = f"[{self.target_host}]" if ":" in self.target_host else self.target_host
        return f"{host}:{self.target_port}"


@dataclass(frozen=True)
class OutlierDetection:
    """Istio's ``trafficPolicy.outlierDetection`` (consecutive-error detection).

    ``consecutive_gateway_errors``: connect failures, resets and timeouts in a row;
    ``consecutive_errors`` (``consecutive5xxErrors``): those plus upstream ``Error`` replies.
    An ejected endpoint is skipped by every load balancer for ``base_ejection_time`` times the
    number of times it was ejected; at most ``max_ejection_percent`` of a cluster (at least one
    endpoint) is ejected; below ``min_health_percent`` healthy endpoints, or with none, the
    cluster balances over all of them (Envoy's panic mode).

    ``split_local_origin`` (``splitExternalLocalOriginErrors``): connect failures, resets and
    timeouts (local-origin errors) are counted apart, ``consecutive_local_origin_failures`` in
    a row ejecting, and are no longer errors or gateway errors (those count the upstream's
    ``Error`` replies only), as Envoy's split mode.
    """

    consecutive_gateway_errors: int | None = None
    consecutive_errors: int | None = 5
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10
    min_health_percent: int = 0
    split_local_origin: bool = False
    consecutive_local_origin_failures: int | None = 5

    @property
    def inert(self) -> bool:
        """Whether every count is off (``consecutive5xxErrors: 0``, no gateway errors, and no
        local-origin count): nothing is ever ejected, exactly as without detection."""
        local = self.split_local_origin and self.consecutive_local_origin_failures is not None
        return (
            self.consecutive_errors is None
            and self.consecutive_gateway_errors is None
            and not local
        )


#: ``DestinationRule.trafficPolicy.tls.mode`` values this engine honours.
UpstreamTlsMode = Literal["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]
#: ``ProxyConfig.spec.listeners[].tls.mode`` values (Istio Gateway ``ServerTLSSettings``).
ListenerTlsMode = Literal["SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL", "ISTIO_MUTUAL"]
#: A PeerAuthentication's effective ``mtls.mode`` (``UNSET`` resolved to its parent's).
PeerMode = Literal["STRICT", "PERMISSIVE", "DISABLE"]


@dataclass(frozen=True)
class UpstreamTls:
    """Istio's ``ClientTLSSettings`` (a DestinationRule's ``trafficPolicy.tls``), validated.

    The files were read when the configuration was loaded: ``context`` holds what they
    said then, and ``digest`` their bytes' hash, so that a reload after a certificate
    rotation is a changed cluster (new connections use the new files) while an unchanged
    one keeps its connections. ``DISABLE`` is kept as a value (it overrides a rule's
    ``SIMPLE`` in a subset); it has no context. Neither has ``ISTIO_MUTUAL``: its
    connections take the engine's :class:`MeshIdentity` context of the moment (rotated
    without a reload), so only its settings (``sni``, ``subject_alt_names``) are compared.
    """

    mode: UpstreamTlsMode
    ca_certificates: str | None = None
    client_certificate: str | None = None
    private_key: str | None = None
    #: The SNI sent (``None``: the destination service's host).
    sni: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    insecure_skip_verify: bool = False
    ca_crl: str | None = None
    #: sha256 of the files' contents when they were read.
    digest: str = ""
    #: ``(path, expiry in Unix seconds)`` of each certificate file read.
    expiry: tuple[tuple[str, float], ...] = ()
    context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    #: istiod's automatic mutual TLS (``ISTIO_MUTUAL`` only): the endpoints whose
    #: ``tlsMode`` is ``istio`` (:meth:`Endpoint.mesh_tls_in`) get it, the others plain TCP.
    auto: bool = False
    #: ``ISTIO_MUTUAL`` offers ALPN ``istio-peer-exchange`` (then ``istio``) and speaks Istio's
    #: metadata exchange when the server selects it; ``False`` (a control plane's cluster
    #: whose ALPN lacks it) offers ``istio`` alone.
    peer_exchange: bool = True

    @property
    def enabled(self) -> bool:
        """Whether connections are TLS (any mode but ``DISABLE``)."""
        return self.mode != "DISABLE"


@dataclass(frozen=True)
class ListenerTls:
    """A listener's ``tls`` (Istio Gateway ``ServerTLSSettings`` field names), validated;
    files read at load as for :class:`UpstreamTls`. With ``ISTIO_MUTUAL`` the certificate
    and CAs are the :class:`MeshIdentity`'s (its paths are shown here); ``context`` is the
    one built at load, and the engine serves the identity's current one."""

    mode: ListenerTlsMode
    server_certificate: str
    private_key: str
    ca_certificates: str | None = None
    #: ``TLSV1_2`` or ``TLSV1_3``.
    min_protocol_version: str = "TLSV1_2"
    #: ``None``: the highest the TLS library has.
    max_protocol_version: str | None = None
    cipher_suites: tuple[str, ...] = ()
    #: A client's certificate must name one of these (``MUTUAL``, ``OPTIONAL_MUTUAL``).
    subject_alt_names: tuple[str, ...] = ()
    #: Pins: the base64 SHA-256 of an allowed client certificate's public key, or the hex
    #: SHA-256 of an allowed certificate (lower case, no colons); one match of either allows.
    verify_certificate_spki: tuple[str, ...] = ()
    verify_certificate_hash: tuple[str, ...] = ()
    #: Revocation lists for client certificates (a CRL of each CA of the chain).
    ca_crl: str | None = None
    #: A client's certificate must have a URI SAN starting with one of these (istiod's
    #: trust domains, ``spiffe://<trust domain>/``, from its inbound listener).
    subject_alt_name_prefixes: tuple[str, ...] = ()
    digest: str = ""
    expiry: tuple[tuple[str, float], ...] = ()
    context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class SdsSource:
    """``spec.meshIdentity.sds``: the workload identity from a Secret Discovery Service
    server (istio-agent's socket, or SPIRE's agent), pushed at each rotation."""

    #: The server, ``unix:<path>`` (istio-agent: its workload socket) or ``host:port``.
    address: str = "unix:/var/run/secrets/workload-spiffe-uds/socket"
    #: The secret of the workload certificate and key (istio-agent's ``default``).
    certificate: str = "default"
    #: The secret of the mesh root (istio-agent's ``ROOTCA``).
    root: str = "ROOTCA"
    #: How long the engine waits at start (or at a reload naming another server) for both
    #: secrets before the configuration is refused.
    initial_fetch_timeout: float = 30.0
    #: ``Node.id`` sent (an Istio sidecar's form, from the pod's variables).
    node_id: str = ""
    #: HTTP/2 keepalive on the stream's connection (as ``spec.xds.keepalive``): a PING after
    #: this many seconds without traffic, the stream given up when none is answered within
    #: ``keepalive_timeout`` (a server at ``host:port`` gone without closing the connection).
    keepalive_time: float = 330.0
    keepalive_timeout: float = 20.0


@dataclass(frozen=True)
class MeshIdentity:
    """``spec.meshIdentity``: the workload's Istio identity, from the files istio-agent writes
    (``OUTPUT_CERTS``, or file-mounted certificates), checked for changes every
    ``check_interval`` seconds and rotated without a reload.

    ``material`` is what the loader read and built (compared by nothing: two loads of the
    same settings are the same identity, whose current files the engine follows)."""

    certificate_chain: str = "/etc/certs/cert-chain.pem"
    private_key: str = "/etc/certs/key.pem"
    root_certificates: str = "/etc/certs/root-cert.pem"
    check_interval: float = 5.0
    #: Automatic mutual TLS (Istio's ``enableAutoMtls``, on by default): a cluster whose
    #: DestinationRule sets no ``tls`` sends ``ISTIO_MUTUAL`` to its endpoints labelled
    #: ``security.istio.io/tlsMode: istio`` (of a ``MESH_INTERNAL`` service).
    auto_mtls: bool = True
    #: The SDS server the identity comes from (``None``: the files above, written by
    #: istio-agent). With it, the paths above are the engine's own private copies.
    sds: SdsSource | None = None
    material: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class TrafficPolicy:
    """What a ``trafficPolicy`` sets, group by group (``None``: not set).

    A set group may change nothing (``connectionPool: {}``, ``outlierDetection:
    {consecutive5xxErrors: 0}``, ``tls: {mode: DISABLE}``): it still overrides the group it
    is over, as in Istio; :meth:`applied` drops it where the engine builds a cluster.
    """

    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    tls: UpstreamTls | None = None
    #: ``retryBudget``; port settings, which cannot set one, hold the one istiod gives them
    #: (see :class:`Subset`).
    retry_budget: RetryBudget | None = None
    #: ``proxyProtocol``; port settings, which cannot set one, hold the one istiod gives
    #: them (as ``retry_budget``).
    proxy_protocol: ProxyProtocol | None = None
    #: ``tunnel``; port settings, which cannot set one, hold the one istiod gives them (as
    #: ``retry_budget``).
    tunnel: Tunnel | None = None

    def over(self, base: TrafficPolicy) -> TrafficPolicy:
        """Each group this policy sets (even to nothing), else ``base``'s (Istio's
        ``mergeTrafficPolicy`` of a subset's over a rule's)."""
        return TrafficPolicy(
            base.load_balancer if self.load_balancer is None else self.load_balancer,
            base.connection_pool if self.connection_pool is None else self.connection_pool,
            base.outlier_detection if self.outlier_detection is None else self.outlier_detection,
            base.tls if self.tls is None else self.tls,
            base.retry_budget if self.retry_budget is None else self.retry_budget,
            base.proxy_protocol if self.proxy_protocol is None else self.proxy_protocol,
            base.tunnel if self.tunnel is None else self.tunnel,
        )

    def applied(self) -> TrafficPolicy:
        """What the engine applies: a group that changes nothing (see ``inert`` and
        :attr:`UpstreamTls.enabled`) as ``None``, so that it costs nothing per request."""
        pool, outlier, tls = self.connection_pool, self.outlier_detection, self.tls
        return TrafficPolicy(
            self.load_balancer,
            None if pool is None or pool.inert else pool,
            None if outlier is None or outlier.inert else outlier,
            tls if tls is not None and tls.enabled else None,
            self.retry_budget,
            self.proxy_protocol,
            self.tunnel,
        )


@dataclass(frozen=True)
class Subset:
    """A ``DestinationRule`` subset: endpoints whose labels include ``labels``.

    ``policy`` is the subset's ``trafficPolicy`` over the rule's; ``own`` the subset's alone
    and ``ports`` its ``portLevelSettings`` (see :meth:`DestinationRule.policy_for`).

    Port settings cannot set a ``retryBudget`` or a ``proxyProtocol``; the loader gives them
    the ones istiod's merge does: none for the rule's, the rule's for the port for a
    subset's (not the subset's own). From xDS, each has its cluster's
    (``xds.metaprotocol.io/retryBudget``, ``xds.metaprotocol.io/proxyProtocol``).
    """

    name: str
    labels: dict[str, str]
    load_balancer: LoadBalancer | None = None
    policy: TrafficPolicy = TrafficPolicy()
    own: TrafficPolicy = TrafficPolicy()
    ports: dict[int, TrafficPolicy] = field(default_factory=dict)


@dataclass(frozen=True)
class DestinationRule:
    """A ``DestinationRule`` for one host; ``ports``: its ``portLevelSettings`` by port."""

    name: str
    host: str
    load_balancer: LoadBalancer
    subsets: dict[str, Subset]
    policy: TrafficPolicy = TrafficPolicy()
    ports: dict[int, TrafficPolicy] = field(default_factory=dict)

    def policy_for(self, port: int, subset: str | None = None) -> TrafficPolicy:
        """The policy of traffic to service port ``port`` (of ``subset``), as Istio resolves it.

        A port's settings replace the policy they override whole: a group they leave out has
        its default, not the overridden policy's. Most specific first: the subset's settings
        for the port; else the subset's ``trafficPolicy``, group by group, over the rule's
        settings for the port, else over the rule's ``trafficPolicy``.
        A port's settings hold the ``retryBudget`` and ``proxyProtocol`` istiod gives them
        (see :class:`Subset`).
        """
        if subset is None:
            return self.ports.get(port, self.policy)
        sub = self.subsets[subset]
        own = sub.ports.get(port)
        if own is not None:
            return own
        base = self.ports.get(port)
        return sub.policy if base is None else sub.own.over(base)


@dataclass(frozen=True)
class AttributeMatch:
    """One attribute condition of a route."""

    attribute: str
    kind: MatchKind
    value: str = ""


@dataclass(frozen=True)
class Destination:
    """A weighted route destination; ``port`` is resolved by the loader when omitted."""

    host: str
    subset: str | None
    port: int | None
    weight: int


@dataclass(frozen=True)
class Fault:
    """A route's ``fault`` (Istio's VirtualService fault, with a MetaProtocol error type):
    delay a share of requests, abort a share with a local reply. Percentages in 0-100."""

    delay_percent: float = 0.0
    delay: float = 0.0
    abort_percent: float = 0.0
    abort_error: ErrorType = ErrorType.Unspecified


@dataclass(frozen=True)
class TokenBucket:
    """Aeraki's ``tokenBucket``: ``max_tokens`` at most, ``tokens_per_fill`` added every
    ``fill_interval`` seconds."""

    max_tokens: int
    tokens_per_fill: int
    fill_interval: float


@dataclass(frozen=True)
class RateLimitCondition:
    """A ``localRateLimit.conditions`` entry: requests matching ``match`` use ``bucket``."""

    match: tuple[AttributeMatch, ...]
    bucket: TokenBucket


@dataclass(frozen=True)
class LocalRateLimit:
    """A MetaRouter's ``localRateLimit``: the first matching condition's bucket, else the
    default ``bucket``, else no limit."""

    bucket: TokenBucket | None
    conditions: tuple[RateLimitCondition, ...] = ()


@dataclass(frozen=True)
class RateLimitDescriptor:
    """A ``globalRateLimit.descriptors`` entry: the request attribute ``property`` is sent to
    the rate limit service as the descriptor entry ``key``."""

    property: str
    key: str


@dataclass(frozen=True)
class GlobalRateLimit:
    """A MetaRouter's ``globalRateLimit`` (Aeraki): requests matching ``match`` are held while
    the rate limit service (Envoy's RLS API) at ``endpoints`` is asked about their descriptors.

    ``service`` is the cluster name as written (``outbound|8081||rls.example``); ``endpoints``
    are its ServiceEntry endpoints, ``(address, port)``. ``request_timeout`` in seconds bounds
    each call; on a failed, slow or refused call, ``deny_on_fail`` decides.
    """

    match: tuple[AttributeMatch, ...]
    domain: str
    service: str
    endpoints: tuple[tuple[str, int], ...]
    descriptors: tuple[RateLimitDescriptor, ...]
    #: Aeraki's and Envoy's default: 20 ms.
    request_timeout: float = 0.02
    deny_on_fail: bool = False


@dataclass(frozen=True)
class Mirror:
    """A route's ``mirror`` and ``mirrorPercentage`` (0-100; absent means 100)."""

    destination: Destination
    percent: float = 100.0


#: ``retryOn`` conditions: the first three never reach a server that could have executed the
#: request twice only for ``reset`` (the connection broke after the request was written).
RETRY_ON = ("connect-failure", "reset", "unavailable", "timeout", "error")


@dataclass(frozen=True)
class Retries:
    """A route's ``retries`` (Istio's shape): up to ``attempts`` more tries."""

    attempts: int
    per_try_timeout: float | None = None
    retry_on: frozenset[str] = frozenset(("connect-failure", "reset", "unavailable"))


@dataclass(frozen=True)
class Route:
    """One ``MetaRouter`` route. ``timeout`` in seconds (``None``: the engine default)."""

    name: str
    match: tuple[AttributeMatch, ...]
    destinations: tuple[Destination, ...]
    request_mutation: dict[str, str]
    response_mutation: dict[str, str]
    timeout: float | None = None
    fault: Fault | None = None
    mirror: Mirror | None = None
    retries: Retries | None = None


@dataclass(frozen=True)
class MetaRouter:
    """A ``MetaRouter``: ordered routes for some hosts."""

    name: str
    hosts: tuple[str, ...]
    routes: tuple[Route, ...]
    source: str = ""
    local_rate_limit: LocalRateLimit | None = None
    global_rate_limit: GlobalRateLimit | None = None
    #: No routes, in a file: the hosts' traffic takes the default route (to each host
    #: itself), as Aeraki reads a MetaRouter of rate limits only. An empty route table
    #: from a control plane stays empty (every request RouteNotFound, as in Envoy).
    default_route: bool = False


@dataclass(frozen=True)
class FilterSpec:
    """A filter in a listener's chain: its name, class and configuration."""

    name: str
    filter_class: type[Filter]
    config: dict[str, Any] = field(default_factory=dict)

    def create(self) -> Filter:
        """A new instance (one per listener)."""
        return self.filter_class.from_config(self.config)


@dataclass(frozen=True)
class Listener:
    """Where one service port listens, and its filter chain (the router comes last)."""

    host: str
    port: int
    bind_host: str
    bind_port: int
    filters: tuple[FilterSpec, ...] = ()
    #: TLS termination (``None``: plain TCP, exactly as without TLS support).
    tls: ListenerTls | None = None
    #: ``connectionRateLimit.tokenBucket``: new connections beyond it are closed at the
    #: accept, before any handshake (``None``: no limit, and no cost).
    connection_rate_limit: TokenBucket | None = None
    #: The PeerAuthentication mode of a listener without ``tls`` when a ``meshIdentity`` is
    #: set (``STRICT``: ``tls`` is then ``ISTIO_MUTUAL``; ``PERMISSIVE``: that, or plain text,
    #: by the connection's first bytes; ``DISABLE``: plain text only). ``None``: not governed
    #: by one (its own ``tls``, or no identity: plain TCP as always).
    peer_mode: PeerMode | None = None
    #: ``maxConnectionDuration``: a client connection this old is sent its codec's drain
    #: notice and closed once quiet (Envoy's ``max_connection_duration``); ``None``: never.
    max_connection_duration: float | None = None
    #: The listener's own policies, from the control plane's inbound listener
    #: (``spec.xds.inboundListener``), in place of the ProxySettings' (``None``: those).
    authorization: Authorization | None = None
    #: The names of the inbound listener's filter chains read for it (``()``: none read).
    inbound_chains: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """``host:port``, the listener's name in stats and logs."""
        return f"{self.host}:{self.port}"


MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Connection, request and buffer ceilings (see the Limits page of the docs).

    ``max_connections`` and ``max_upstream_connections`` ``None`` mean "from
    ``RLIMIT_NOFILE``": client and upstream connections together never take the descriptors
    kept for the listeners, admin endpoint, control plane and log files.
    """

    max_connections: int | None = None
    #: Upstream connections open at once, shared and per client: opening one more is refused
    #: (``OverLimit``) past it.
    max_upstream_connections: int | None = None
    max_pending_requests: int = 10000
    max_pending_requests_per_connection: int = 1000
    #: Per-connection high-water mark of unsent replies: above it the engine stops reading
    #: the client's requests (Envoy's ``per_connection_buffer_limit_bytes``).
    connection_buffer_bytes: int = 1 * MiB
    #: Per-connection ceiling of unsent replies: a reply that would take a client that is
    #: already above ``connection_buffer_bytes`` past it closes the client instead.
    connection_buffer_max_bytes: int = 16 * MiB
    #: Stats series held at most (a histogram is one); past it, new series naming listeners,
    #: routes, clusters or services fold into the ``stats="overflow"`` series of their metric.
    max_stats_series: int = 50_000
    #: Calls to rate limit services (``globalRateLimit``) outstanding at once, per process;
    #: past it a request gets the failure policy at once (``denyOnFail``), uncalled.
    max_rate_limit_calls: int = 1000
    #: Streams open at once on one client connection (each has an upstream connection of
    #: its own); a ``Stream_Init`` past it gets ``OverLimit``.
    max_streams_per_connection: int = 100
    #: The points of every hash ring and the slots of every Maglev table of the clusters,
    #: together (each is built on the engine's only thread): a configuration needing more is
    #: refused. 64 Maglev tables of 65 537 slots, or 4096 rings of Istio's 1024 points.
    max_hash_slots: int = 2**22
    #: The endpoints of every cluster together (each subset and port is a cluster with
    #: endpoints of its own, built on the engine's only thread): a configuration needing more
    #: is refused. A few subsets that select all of a large host's endpoints multiply them.
    max_cluster_endpoints: int = 2**20


@dataclass(frozen=True)
class Overload:
    """Process-wide ceilings beyond which new work is refused (Envoy's overload manager)."""

    #: Bytes held in buffers (partial frames read, requests awaiting replies, unsent bytes).
    max_buffered_bytes: int = 512 * MiB
    #: Resident set size; ``None``: not watched.
    max_rss_bytes: int | None = None


@dataclass(frozen=True)
class Timeouts:
    """Timeouts in seconds."""

    connect: float = 5.0
    route: float = 30.0
    drain: float = 10.0
    #: A client connection with nothing in flight and nothing received for this long closes.
    idle: float = 3600.0
    #: A frame that started arriving must be complete within this long.
    frame: float = 10.0
    #: A client whose unsent replies stay above ``connection_buffer_bytes`` this long closes.
    write: float = 30.0
    #: An upstream connection whose unsent requests make no progress this long is aborted
    #: (``timeouts.upstreamWrite``; ``None``: the same as ``write``).
    upstream_write: float | None = None
    #: A TLS client connection must finish its handshake within this long (counted from
    #: the accept), or it is closed (``timeouts.handshake``).
    handshake: float = 10.0
    #: A stream with no frame either way for this long is reset (``timeouts.streamIdle``;
    #: Envoy's ``stream_idle_timeout``).
    stream_idle: float = 300.0
    #: An upstream connection that sent its codec's drain notice is kept open (its endpoint
    #: avoided meanwhile) until its upstream closes it, at most this long
    #: (``timeouts.upstreamDrain``).
    upstream_drain: float = 30.0


@dataclass(frozen=True)
class Watchdog:
    """When the event loop counts as stuck, and what then (Envoy's ``watchdogs``), in seconds.

    The loop is stalled while its heartbeat is overdue; each stall counts once as a miss past
    ``miss_timeout``, once as a mega-miss (with the loop's stack logged) past
    ``megamiss_timeout``, and ends the process past ``kill_timeout`` (``None``: never).
    """

    miss_timeout: float = 0.2
    megamiss_timeout: float = 1.0
    kill_timeout: float | None = None


@dataclass(frozen=True)
class Admin:
    """The admin HTTP endpoint (``ProxyConfig.spec.admin``)."""

    bind: tuple[str, int]
    #: A bind address other than loopback must be asked for: the endpoint has no
    #: authentication and shows the whole configuration.
    allow_remote: bool = False
    #: Open admin connections; more are answered ``503`` and closed.
    max_connections: int = 16
    #: Time for a whole exchange (request received, response written), in seconds.
    request_timeout: float = 5.0


@dataclass(frozen=True)
class Workload:
    """A workload's identity in Istio's metric labels (``unknown`` where not known)."""

    name: str = "unknown"
    namespace: str = "unknown"
    app: str = "unknown"
    version: str = "unknown"
    canonical_service: str = "unknown"
    canonical_revision: str = "latest"
    cluster: str = "Kubernetes"
    principal: str = "unknown"
    #: The pod's labels (``ISTIO_METAJSON_LABELS``): what a policy's ``selector`` matches.
    labels: Mapping[str, str] = field(default_factory=dict)
    #: ``region/zone/subzone`` (``""``: not known): which endpoints are nearest.
    locality: str = ""


@dataclass(frozen=True)
class Telemetry:
    """``ProxyConfig.spec.telemetry``: Istio's standard metrics and this proxy's identity."""

    #: Emit ``istio_requests_total`` and the other standard metrics (off by default: they
    #: cost about 1.5 us of CPU per request; turn them on for Kiali and Istio's dashboards).
    istio_metrics: bool = False
    #: ``source`` (the proxy sits with the client, as an outbound sidecar) or ``destination``.
    reporter: str = "source"
    #: This proxy's workload (the source side of ``reporter: source``).
    workload: Workload = Workload()


@dataclass(frozen=True)
class Tracing:
    """``ProxyConfig.spec.tracing``: a span per request, exported with OTLP over gRPC."""

    #: The OTLP/gRPC collector, ``host:port`` (plain text, as on a node-local collector).
    endpoint: str
    #: Percent of new traces sampled (Aeraki's ``random_sampling``); a request that carries a
    #: ``traceparent`` follows its sampled flag instead.
    random_sampling: float = 100.0
    #: The ``service.name`` resource attribute of the spans.
    service_name: str = "metaprotocol-proxy"
    #: ``ingress`` or ``egress``: the first word of every span's name.
    operation: str = "egress"
    #: Ended spans waiting for export; more are dropped (and counted).
    max_queue_size: int = 2048
    #: Bound on one export call to the collector (its retries included), in seconds.
    export_timeout: float = 10.0


@dataclass(frozen=True)
class XdsNode:
    """The proxy's identity towards the control plane (an Istio sidecar's ``Node``)."""

    #: ``sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local``, Istio's node id form.
    id: str
    #: ``Node.cluster`` (Istio sets the workload's ``<app>.<namespace>``).
    cluster: str
    #: ``Node.metadata`` string fields (``CLUSTER_ID``, ``NAMESPACE``, ``ISTIO_VERSION``...).
    metadata: dict[str, str] = field(default_factory=dict)
    #: ``Node.locality``, ``region/zone/subzone`` (``""``: not sent).
    locality: str = ""


@dataclass(frozen=True)
class Xds:
    """``ProxyConfig.spec.xds``: routes, clusters and endpoints from a control plane (ADS)."""

    #: The ADS server, ``host:port`` (plain-text gRPC, as istiod's port 15010).
    address: str
    node: XdsNode
    #: Where routes come from when not over the ADS stream: Aeraki's RouteDiscoveryService
    #: (``host:port``; ``None``: RDS on the ADS stream too).
    rds_address: str | None = None
    #: Largest discovery response accepted (gRPC's maximum receive message length).
    max_message_bytes: int = 4 * MiB
    #: Most bytes of resources held at once, all types together (their encoded size): an
    #: update that would hold more is refused (NACKed), so that what a control plane makes
    #: the engine keep is bounded by this setting, not by how many responses it sends.
    max_resource_bytes: int = 16 * MiB
    #: Reconnect backoff: the first wait and the cap, in seconds (doubling, with jitter).
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    #: HTTP/2 keepalive on the control-plane connection: a PING after this many seconds
    #: without one, and the stream is given up (then reopened) when a PING is not answered
    #: within ``keepalive_timeout``. The default stays above the 5 minutes gRPC
    #: servers accept by default between PINGs.
    keepalive_time: float = 330.0
    keepalive_timeout: float = 20.0
    #: Longest a route update waits for the endpoints of a new cluster it sends to (Envoy's
    #: ``initial_fetch_timeout``): it applies when they arrive, or after this anyway.
    initial_fetch_timeout: float = 15.0
    #: The name of the control plane's inbound listener (istiod's ``virtualInbound``): the
    #: PeerAuthentication mode and AuthorizationPolicies of each listener come from its
    #: filter chains (LDS). ``None``: from the files.
    inbound_listener: str | None = None


@dataclass(frozen=True)
class PolicyScope:
    """The workload istiod would select PeerAuthentications and AuthorizationPolicies for:
    this engine's namespace and pod labels (``spec.telemetry.workload``), and the mesh's
    root namespace (``spec.mesh.rootNamespace``)."""

    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)
    root_namespace: str = "istio-system"
    #: Why the labels are not known (``ISTIO_METAJSON_LABELS`` unreadable): a selector
    #: cannot be matched, and is refused rather than taken as not matching.
    labels_error: str | None = None


@dataclass(frozen=True)
class PeerAuthentication:
    """Istio's PeerAuthentications composed for this workload (istiod's
    ``ComposePeerAuthentication``): the workload level (a ``selector`` matching it) over the
    namespace level (its namespace's, no selector) over the mesh level (the root
    namespace's, no selector), ``UNSET`` inheriting, ``PERMISSIVE`` when none says (the
    workload's namespace unknown: the one without a selector is the namespace-or-mesh
    level); ``ports``: the workload level's ``portLevelMtls``, by the port the engine accepts
    on (a listener's ``bind`` port, Istio's container port)."""

    mode: PeerMode = "PERMISSIVE"
    ports: dict[int, PeerMode] = field(default_factory=dict)
    #: ``kind/name`` of the documents composed (for ``/config_dump``).
    sources: tuple[str, ...] = ()

    def mode_for(self, port: int) -> PeerMode:
        """The mode of a listener accepting on ``port``."""
        return self.ports.get(port, self.mode)


@dataclass(frozen=True)
class OtlpLogs:
    """``spec.accessLog.otlp``: the access log to an OpenTelemetry collector (OTLP logs over
    gRPC, as Istio's ``envoyOtelAls`` provider)."""

    #: The collector, ``host:port`` (plain-text gRPC, as a node-local collector's 4317).
    endpoint: str
    #: The ``service.name`` resource attribute of the records.
    service_name: str = "metaprotocol-proxy"
    #: Bound on one export call, in seconds.
    export_timeout: float = 10.0


@dataclass(frozen=True)
class AccessLogSettings:
    """``spec.accessLog``: where the access log goes (a file, standard error, a collector, or
    a file and a collector), which request attributes it writes (``attributes``, as
    configured; each value cut to ``max_value_length`` characters) and which requests
    (``filter``: those that failed, or were slow)."""

    #: The file (``-``: standard error; ``None``: no file, the collector only).
    path: str | None
    attributes: tuple[str, ...] = ()
    max_value_length: int = 256
    #: Write only requests that failed (any status but ``Ok``) ...
    failures_only: bool = False
    #: ... or took at least this long, seconds (``None``: no such condition). With
    #: neither, every request is written.
    slower_than: float | None = None
    #: The collector the lines are exported to too (``None``: none).
    otlp: OtlpLogs | None = None


@dataclass(frozen=True)
class UpstreamHeartbeat:
    """``spec.upstream.heartbeat``: the pings the engine sends on its upstream connections
    whose codec builds heartbeat requests, in seconds (the defaults are those of a common RPC
    client: a ping every 60 s; see the connection pool page of the docs)."""

    #: A connection that received nothing for this long (plus up to 15 %, drawn once per
    #: connection) is sent a ping (``None``: never).
    interval: float | None = 60.0
    #: A ping not answered (nothing at all received) within this long: the connection is
    #: aborted, its requests in flight answered ``UpstreamReset``.
    timeout: float = 60.0


@dataclass(frozen=True)
class ProxySettings:
    """The ``ProxyConfig`` document: the engine's own settings."""

    listeners: tuple[Listener, ...] = ()
    admin: Admin | None = None
    codec_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    limits: Limits = Limits()
    overload: Overload = Overload()
    timeouts: Timeouts = Timeouts()
    watchdog: Watchdog = Watchdog()
    access_log: AccessLogSettings | None = None
    connections_per_endpoint: int = 1
    #: Pings on the upstream connections (``spec.upstream.heartbeat``).
    upstream_heartbeat: UpstreamHeartbeat = UpstreamHeartbeat()
    telemetry: Telemetry = Telemetry()
    #: Tracing (``None``: off, and nothing of it in the data path).
    tracing: Tracing | None = None
    #: The control plane (``None``: routes, clusters and endpoints come from the files).
    xds: Xds | None = None
    #: The workload's Istio identity (``ISTIO_MUTUAL``; ``None``: not configured).
    mesh_identity: MeshIdentity | None = None
    #: How often ``metaprotocol proxy`` looks at the listeners' and DestinationRules' TLS
    #: files, reloading when one changed (``spec.tlsFiles``; ``None``: never).
    tls_files_check: float | None = 5.0
    #: The PeerAuthentications read (``None``: none), applied to the listeners' ``peer_mode``.
    peer_authentication: PeerAuthentication | None = None
    #: The AuthorizationPolicies read, compiled (``None``: none, and nothing of them runs).
    authorization: Authorization | None = None
    #: The workload the policies were selected for (``None``: its namespace is not known,
    #: and every policy read applies).
    policy_scope: PolicyScope | None = None
    #: ``Kind/namespace/name: why`` of each policy read that does not apply to this workload.
    policies_not_applied: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    """A complete, validated configuration."""

    protocols: dict[str, Protocol]
    services: dict[str, Service]
    destination_rules: dict[str, DestinationRule]
    routers: dict[str, MetaRouter]
    proxy: ProxySettings
    documents: tuple[dict[str, Any], ...] = ()
    sources: tuple[str, ...] = ()

    def protocol_of(self, host: str, port: int) -> Protocol:
        """The protocol served on a service port (validated to exist by the loader)."""
        name = self.services[host].ports[port].protocol
        assert name is not None
        return self.protocols[name]
