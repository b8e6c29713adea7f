"""The engine: builds runtime structures from a :class:`Config`, binds, serves, drains."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import math
import os
import resource
import socket
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from metaprotocol_sdk.enums import ErrorType
from metaprotocol_sdk.errors import ConfigError
from metaprotocol_sdk.filters import Filter

from .accesslog import AccessLog
from .addresses import is_loopback, reaches, resolve_all
from .authorization import STALE, ListenerAuthorization
from .balancer import hash_slots
from .codec_bugs import CodecBugs, CodecUnavailable
from .config.models import (
    Config,
    Destination,
    Endpoint,
    GlobalRateLimit,
    Listener,
    LoadBalancer,
    ProxySettings,
    Route,
    TrafficPolicy,
    UpstreamTls,
)
from .deadlines import Deadlines
from .detection import Detecting, attach_detection, detecting
from .downstream import QUIET_CLOSE, Downstream, ListenerRuntime, Refused
from .endpoint_drains import EndpointDrains
from .global_ratelimit import CallBudget, GlobalRateLimiter
from .hot_restart import Inherited
from .identity import (
    DEFAULT_SERVER,
    IdentityMaterial,
    IdentityWatch,
    ServerKey,
    istio_sni,
    server_key,
)
from .listening import ServerGroup, serve_on
from .locality import cluster_localities, failover_priorities
from .matcher import compile_match
from .mirror import MirrorSink
from .peer_exchange import exchange_header
from .policies import ConnectionRateLimit, FaultAbort, FaultDelay, LocalRateLimiter
from .rebuilds import Rebuilds
from .reload import ClusterSpec, ReloadRecord, config_version, restart_needed
from .router import CompiledRoute, MirrorTarget, RouteTable, Target
from .slow_start import attach_slow_start, start_slow_starts
from .stats import Counter, Stats, Value
from .stats_pruning import StatsPruner
from .steps import Steps, finish, paced
from .subsets import SubsetIndex
from .telemetry import IstioTelemetry, TargetTelemetry
from .tls import (
    TlsDownstream,
    TlsSettingError,
    attach_cluster,
    attach_listener,
    show_expiry,
    tls_accept,
)
from .upstream import Cluster, UpstreamConnection, UpstreamHost
from .watchdog import GuardDog

if TYPE_CHECKING:
    from .sds import SdsWatch

log = logging.getLogger("metaprotocol.proxy")

#: Descriptors kept free for what is not a client or upstream connection (listeners, admin
#: connections, xDS and rate limit service channels, log files, stdio, the event loop's own):
#: client and upstream connections together never take more than ``RLIMIT_NOFILE`` less this.
FD_RESERVE = 64
#: How long :meth:`Engine.stop` waits for queued spans to be exported.
TRACING_FLUSH = 2.0
#: Longest interval of the housekeeping sweep (idle, frame, write and upstream write
#: timeouts; overload).
SWEEP_MAX = 1.0


@dataclasses.dataclass(frozen=True)
class ConnectionBudget:
    """How many connections the engine keeps open at most (see :func:`connection_budget`)."""

    #: Client connections (``limits.maxConnections``).
    clients: int
    #: Upstream connections (``limits.maxUpstreamConnections``).
    upstreams: int
    #: Client and upstream connections together: ``RLIMIT_NOFILE`` less ``FD_RESERVE``.
    descriptors: int


def nofile_limit() -> int:
    """The soft ``RLIMIT_NOFILE`` (2**20 when unlimited or above)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > 1 << 20:
        soft = 1 << 20
    return soft


def connection_budget(
    nofile: int,
    max_connections: int | None,
    max_upstream_connections: int | None,
    shared_upstreams: int,
    dedicated: bool,
) -> ConnectionBudget:
    """The connection limits for ``nofile`` descriptors, with the defaults of those unset.

    Client and upstream connections share what ``FD_RESERVE`` leaves. By default the shared
    upstream connections of the clusters known at start come first; when clients may have
    upstream connections of their own (``dedicated``: a cluster pools per client connection,
    or clusters come later over xDS), the rest is halved, a half for clients and the other for
    their upstream connections (at least one each). Otherwise clients get it all and upstream
    connections have no cap of their own: they take what clients leave.

    One set leaves the other what it does not take, but never less than half the
    descriptors: a ``maxUpstreamConnections`` at or above them would leave clients one (a
    ``maxConnections`` above them, per-client upstream connections all of them: one client
    reaching many endpoints then had every new client refused at the accept).
    """
    descriptors = max(2, nofile - FD_RESERVE)
    half = max(1, descriptors // 2)
    clients = max_connections
    if clients is None:
        if max_upstream_connections is not None:
            clients = max(half, descriptors - max_upstream_connections)
        else:
            free = max(1, descriptors - shared_upstreams)
            clients = max(1, free // 2) if dedicated else free
    upstreams = max_upstream_connections
    if upstreams is None:
        upstreams = max(half, descriptors - clients) if dedicated else descriptors
    return ConnectionBudget(clients, upstreams, descriptors)


#: ``errno`` values of a process (or system) out of descriptors.
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


class _LoopErrors:
    """The event loop's exception handler while an engine runs: running out of descriptors
    in the loop's own code (an accept: the asyncio loop retries it a second later, uvloop
    closes the pending connections) is a line of log at most once a second, with how many
    more there were, never a traceback; the rest as by default."""

    def __init__(self) -> None:
        self.logged = float("-inf")
        self.quiet = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not (isinstance(exc, OSError) and exc.errno in _OUT_OF_DESCRIPTORS):
            loop.default_exception_handler(context)
            return
        now = loop.time()
        if now - self.logged < 1.0:
            self.quiet += 1
            return
        more = f" ({self.quiet} more since the last)" if self.quiet else ""
        log.error("%s: %s%s", context.get("message", "event loop"), exc.strerror or exc, more)
        self.logged, self.quiet = now, 0


def _rss_bytes() -> int:
    """This process's resident set size (Linux ``/proc``; 0 where unknown)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _warn_plain_auto(build: _Build) -> None:
    """One warning for the clusters of ``build`` whose automatic mutual TLS is plain TCP."""
    names = build.plain_auto
    if not names:
        return
    settings = build.config.proxy.mesh_identity
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    log.warning(
        "the control plane's automatic mutual TLS is served as plain TCP (%s): %s%s",
        "spec.meshIdentity.autoMtls is false"
        if settings is not None
        else "no spec.meshIdentity is configured",
        ", ".join(names[:5]),
        more,
    )


def _count_hash_slots(
    build: _Build, name: str, policy: LoadBalancer, weights: list[int], priorities: list[int]
) -> None:
    """Add cluster ``name``'s hash ring points or Maglev slots to the build's, or raise
    ``ConfigError`` past ``limits.maxHashSlots``, before its ring or table is built."""
    levels: dict[int, list[int]] = {}
    for weight, priority in zip(weights, priorities, strict=True):
        levels.setdefault(priority, []).append(weight)
    slots = hash_slots(policy, list(levels.values()))
    build.hash_slots += slots
    most = build.config.proxy.limits.max_hash_slots
    if build.hash_slots > most:
        field = "maglev.tableSize" if policy.maglev_table_size else "ringHash.minimumRingSize"
        raise ConfigError(
            f"cluster {name}: its consistentHash needs {slots} hash slots, the clusters so far "
            f"{build.hash_slots} in all, more than limits.maxHashSlots ({most}); each ring or "
            f"table is built on the engine's only thread (about 1 s a million slots): lower "
            f"{field} or raise limits.maxHashSlots"
        )


def _count_endpoints(build: _Build, name: str, count: int) -> None:
    """Add cluster ``name``'s endpoints to the build's, or raise ``ConfigError`` past
    ``limits.maxClusterEndpoints``, before its hosts are made."""
    build.endpoints += count
    most = build.config.proxy.limits.max_cluster_endpoints
    if build.endpoints > most:
        raise ConfigError(
            f"cluster {name}: its {count} endpoints make {build.endpoints} for the clusters "
            f"so far, more than limits.maxClusterEndpoints ({most}); each subset and port "
            "is a cluster with endpoints of its own, built on the engine's only thread: "
            "select fewer endpoints per subset, or raise limits.maxClusterEndpoints"
        )


#: Endpoints of a cluster made between two steps of a build (:mod:`.steps`).
ENDPOINT_STEP = 1000


def _loop_back(
    suspects: list[tuple[Cluster, UpstreamHost]],
    bound: dict[int, list[tuple[str, str]]],
    resolved: dict[str, set[str]],
) -> tuple[Cluster, UpstreamHost, str, str, str] | None:
    """The first of ``suspects`` that reaches a listener bound on its port: its cluster and
    endpoint, the listener, its bound IP and the address that reaches it (``None``: none
    does). Each (address, bound IP) is judged once."""
    judged: dict[tuple[str, str], bool] = {}
    for cluster, upstream in suspects:
        for listener, ip in bound[upstream.port]:
            for address in sorted(resolved[upstream.address]):
                hit = judged.get((address, ip))
                if hit is None:
                    hit = judged[(address, ip)] = reaches(address, ip)
                if hit:
                    return cluster, upstream, listener, ip, address
    return None


def cluster_name(host: str, port: int, subset: str | None) -> str:
    """Envoy-style cluster name: ``outbound|9000|v2|greeter.example``."""
    return f"outbound|{port}|{subset or ''}|{host}"


@dataclasses.dataclass
class _Build:
    """One build of the runtime structures: the configuration read, the clusters made (or
    kept from the serving runtime, when unchanged) so far, and what each was made from."""

    config: Config
    clusters: dict[str, Cluster] = dataclasses.field(default_factory=dict)
    specs: dict[str, ClusterSpec] = dataclasses.field(default_factory=dict)
    #: Rate limit service clients by cluster name (``RateLimitServiceClient``; kept from the
    #: serving runtime when the cluster's endpoints are unchanged).
    rls: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: The workload identity the configuration serves with (kept from the serving runtime
    #: when its settings are unchanged: it follows the files' rotations).
    identity: IdentityWatch | None = None
    #: Clusters made now whose control plane asks for automatic mutual TLS served as plain
    #: TCP (no identity, or ``autoMtls`` off): logged once per build, not once per cluster
    #: (istiod asks it of every cluster of the mesh).
    plain_auto: list[str] = dataclasses.field(default_factory=list)
    #: The hash ring points and Maglev table slots of the clusters so far (``maxHashSlots``).
    hash_slots: int = 0
    #: The endpoints of the clusters so far (``maxClusterEndpoints``).
    endpoints: int = 0
    #: Each service's endpoints by label, by host (made at its first cluster).
    subsets: dict[str, SubsetIndex] = dataclasses.field(default_factory=dict)
    #: Each endpoint's sorted labels, by the endpoint's ``id`` (the configuration holds it),
    #: made once however many clusters it is in, and the same object for the same labels
    #: (:meth:`Engine._label_key`).
    label_keys: dict[int, tuple[tuple[str, str], ...]] = dataclasses.field(default_factory=dict)
    #: The label tuples of ``label_keys``, by value.
    interned: dict[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] = dataclasses.field(
        default_factory=dict
    )


@dataclasses.dataclass
class _Staged:
    """A validated new configuration, built in full and ready to swap in."""

    config: Config
    version: str
    build: _Build
    runtimes: dict[tuple[str, int], ListenerRuntime]
    #: Servers of the listeners added (bound, not yet accepting), and their addresses.
    servers: dict[tuple[str, int], asyncio.Server | ServerGroup]
    addresses: dict[tuple[str, int], tuple[str, int]]


def _accepts(runtime: ListenerRuntime, conn: Downstream | Detecting) -> bool:
    """Whether a listener's transport of now (``runtime``) still takes an open connection:
    plain text (or a connection still detecting, which may be plain text) only where plain
    text is taken (a plain, PERMISSIVE or DISABLE listener); TLS everywhere (a listener
    made plain keeps the TLS sessions begun on it: they are no weaker)."""
    if isinstance(conn, TlsDownstream):
        return True
    return runtime.detect is not None or runtime.tls is None


class Engine:
    """A running proxy for one :class:`Config`.

    ``await start()`` binds every listener (and the admin endpoint); ``listener_addresses``
    then maps ``(host, port)`` to the bound ``(ip, port)``. ``await stop()`` drains.
    """

    def __init__(
        self, config: Config, *, reuse_port: bool = False, inherited: Inherited | None = None
    ) -> None:
        self.config = config
        #: Listening sockets a predecessor handed over (``--hot-restart``): :meth:`start`
        #: serves on them instead of binding their addresses anew.
        self.inherited = inherited
        #: Called by :meth:`begin_serving`, once the listeners accept (``start(serve=False)``).
        self.on_serving: list[Callable[[], object]] = []
        #: Bind the listeners with ``SO_REUSEPORT``, so several engine processes (the workers
        #: of ``metaprotocol proxy --workers N``) share each port and the kernel spreads the
        #: connections over them.
        self.reuse_port = reuse_port
        settings = config.proxy
        limits = settings.limits
        self.stats = Stats(limits.max_stats_series)
        #: Drops the series of names a reload removed (see :meth:`prune_stats`).
        self._stats_pruner = StatsPruner()
        timeouts = settings.timeouts
        #: ``limits.maxConnections`` and ``limits.maxUpstreamConnections``, and the
        #: descriptors client and upstream connections may take together (start() sets them,
        #: from ``RLIMIT_NOFILE`` where unset; see :func:`connection_budget`).
        self.max_connections = limits.max_connections or 1
        self.max_upstream_connections = limits.max_upstream_connections or 1
        self.descriptors = 2
        self.max_pending = limits.max_pending_requests
        self.max_pending_per_connection = limits.max_pending_requests_per_connection
        self.connection_buffer = limits.connection_buffer_bytes
        self.connection_buffer_max = limits.connection_buffer_max_bytes
        self.max_buffered = settings.overload.max_buffered_bytes
        self.max_rss = settings.overload.max_rss_bytes
        self.idle_timeout = timeouts.idle
        self.frame_timeout = timeouts.frame
        #: Streams (see ``streams``): open at once per client connection, and the time a
        #: stream may pass with no frame either way.
        self.max_streams_per_connection = limits.max_streams_per_connection
        self.stream_idle_timeout = timeouts.stream_idle
        self.write_timeout = timeouts.write
        #: An upstream connection whose unsent bytes make no progress this long is aborted.
        self.upstream_write_timeout = (
            timeouts.write if timeouts.upstream_write is None else timeouts.upstream_write
        )
        #: How long an upstream connection that sent a drain notice is held open at most.
        self.upstream_drain_timeout = timeouts.upstream_drain
        #: Bytes held in buffers now (partial frames, requests in flight, unsent replies): an
        #: upper bound kept by the data path and made exact by every housekeeping sweep.
        self.buffered = 0
        #: The resident set size was above ``overload.maxRssBytes`` at the last sweep.
        self.rss_over = False
        self._sweeper: asyncio.TimerHandle | None = None
        #: When a failed sweep was last logged with its traceback (see :meth:`_sweep`).
        self._sweep_error_logged = -math.inf
        self._buffered_gauge = self.stats.gauge("metaprotocol_buffered_bytes")
        self._overloaded_gauge = self.stats.gauge("metaprotocol_overloaded")
        self.connect_timeout = timeouts.connect
        self.connections_per_endpoint = settings.connections_per_endpoint
        self.pending = 0
        self.draining = False
        #: While set (the first half of a hot restart's drain), each sweep closes the client
        #: connections with nothing in flight quiet for this long.
        self.quiet_close: float | None = None
        self.downstreams: set[Downstream] = set()
        #: Client connections of TLS listeners still shaking hands (they count against
        #: ``limits.maxConnections``), and how long they may take (``timeouts.handshake``).
        self.handshaking: set[TlsDownstream | Detecting] = set()
        self.handshake_timeout = timeouts.handshake
        #: Client connections gone with requests a filter still holds (those sent upstream are
        #: given up when the client goes): their frames count until each hold ends, and the
        #: sweep's recount must still see them.
        self.departed: set[Downstream] = set()
        self.upstreams: set[UpstreamConnection] = set()
        #: Client connections with upstream connections of their own (codecs without id
        #: rewriting), for the fair share of the upstream connection budget.
        self.clients_with_upstream = 0
        #: Upstream connections of clients' own that had nothing in flight when last seen, the
        #: longest idle first: each is added (or moved last) when its last request in flight
        #: is answered, and taken out when it closes; one busy again stays listed until
        #: :meth:`reclaim_upstream` reaches it (and drops it: it is listed anew once idle).
        self.idle_upstreams: OrderedDict[UpstreamConnection, None] = OrderedDict()
        self.access_log: AccessLog | None = None
        #: The access log's failed writes and dropped lines already in the counters.
        self._access_log_counted = (0, 0)
        self._access_log_exported = (0, 0)
        self.listener_addresses: dict[tuple[str, int], tuple[str, int]] = {}
        self.admin_address: tuple[str, int] | None = None
        self.clusters: dict[str, Cluster] = {}
        #: Which serving clusters hold each endpoint, and the endpoints draining after their
        #: upstream's drain notice (see endpoint_drains.py).
        self.drains = EndpointDrains()
        #: Endpoints of the clusters whose warm-up rebuilds are running (slow_start.py).
        self.warming_hosts = 0
        #: What each serving cluster was built from (a reload keeps the unchanged ones).
        self._cluster_specs: dict[str, ClusterSpec] = {}
        #: The serving build's endpoint label tuples, by value (:meth:`_label_key`).
        self._label_keys: dict[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] = {}
        self.listeners: dict[tuple[str, int], ListenerRuntime] = {}
        self._servers: dict[tuple[str, int], asyncio.Server | ServerGroup] = {}
        #: The serving configuration's version (a content hash, or what :meth:`apply` got).
        self.config_version = config_version(config)
        #: The last :meth:`apply` (``None``: none yet), shown in ``/config_dump``.
        self.last_reload: ReloadRecord | None = None
        #: Balancers rebuilt for a change of health (ejections, readmissions, slow start):
        #: ``/config_dump`` shows each cluster's ejected endpoints and priority load, so a
        #: dump built before the last one is stale.
        self.rebalances = 0
        self._reloading: asyncio.Lock | None = None
        #: Deadlines of the drains reloads started (cancelled by :meth:`stop`).
        self._drain_timers: set[asyncio.TimerHandle] = set()
        self._admin: asyncio.Server | ServerGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drained: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None
        self._pending_gauge = self.stats.gauge("metaprotocol_requests_pending")
        #: Where mirrored requests' replies go (counted, dropped).
        self.mirror_sink = MirrorSink(self.stats)
        #: Exceptions codecs raise against the contract: counted, logged (rate-limited).
        self.codec_bugs = CodecBugs(self.stats)
        telemetry = settings.telemetry
        #: Istio's standard metrics (``None`` when ``telemetry.istioMetrics`` is false).
        self.istio = (
            IstioTelemetry(self.stats, telemetry.workload, telemetry.reporter)
            if telemetry.istio_metrics
            else None
        )
        #: What the mesh listeners send a client that speaks Istio's metadata exchange
        #: (peer_exchange.py): this workload, its pod, its node id.
        self.peer_header = exchange_header(
            telemetry.workload,
            os.environ.get("POD_NAME") or socket.gethostname(),
            settings.xds.node.id if settings.xds is not None else "",
        )
        #: Watches the event loop for stalls (its thread runs between start and stop).
        self.watchdog = GuardDog(settings.watchdog, self.stats)
        #: Rate limit service clients of the serving configuration, by cluster name
        #: (``globalRateLimit``; empty without it).
        self.rate_limit_services: dict[str, Any] = {}
        #: Outstanding calls to them (made on the first ``globalRateLimit``).
        self._rls_budget: CallBudget | None = None
        #: Closing the channels of clients a reload dropped (awaited by :meth:`stop`).
        self._rls_closing: set[asyncio.Task[None]] = set()
        #: The workload's Istio identity (``spec.meshIdentity``; ``None``: not configured).
        self.identity: IdentityWatch | None = None
        #: The SDS stream the identity comes from (``spec.meshIdentity.sds``; ``None``: files).
        self.sds: SdsWatch | None = None
        #: Streams of identities a reload replaced, being ended (awaited by :meth:`stop`).
        self._sds_closing: set[asyncio.Task[None]] = set()
        #: Extra ``/config_dump`` sections, by key, computed on each dump (the xDS client's).
        self.dump_sections: dict[str, Callable[[], Any]] = {}
        #: The event loop the engine runs on (set by :meth:`start`).
        self.loop: asyncio.AbstractEventLoop
        #: Request timeouts (created by :meth:`start`, on the running loop).
        self.deadlines: Deadlines
        #: Balancer rebuilds after changes of health, within a share of the loop's time.
        self.rebuilds: Rebuilds

    @property
    def ready(self) -> bool:
        """True between a successful :meth:`start` and the beginning of :meth:`stop`."""
        return bool(self._servers) and not self.draining

    # -- building ------------------------------------------------------------------------------

    def _label_key(self, build: _Build, ep: Endpoint) -> tuple[tuple[str, str], ...]:
        """``ep``'s labels, sorted, for its clusters' specs: sorted once per build, and the
        serving build's object when its labels did not change, so that comparing a cluster's
        spec with the serving one's takes one identity check per endpoint. (Each subset's
        spec sorted them again, and a reload compared them in full: an endpoint in 4 000
        subsets, labelled for each, took 2.3 s to build.)"""
        key = build.label_keys.get(id(ep))
        if key is None:
            fresh = tuple(sorted(ep.labels.items()))
            key = build.interned.setdefault(fresh, self._label_keys.get(fresh, fresh))
            build.label_keys[id(ep)] = key
        return key

    def _cluster(self, build: _Build, host: str, port: int, subset: str | None) -> Cluster:
        """The cluster of ``host``, ``port`` and ``subset`` in ``build`` (made if it is not
        yet: :meth:`_cluster_steps` in one piece)."""
        return finish(self._cluster_steps(build, host, port, subset))

    def _cluster_steps(
        self, build: _Build, host: str, port: int, subset: str | None
    ) -> Steps[Cluster]:
        """:meth:`_cluster`, in steps: one every :data:`ENDPOINT_STEP` endpoints (a cluster
        of 100 000 endpoints took 2.5 s to build)."""
        name = cluster_name(host, port, subset)
        cluster = build.clusters.get(name)
        if cluster is not None:
            return cluster
        config = build.config
        service = config.services[host]
        sport = service.ports[port]
        rule = config.destination_rules.get(host)
        # Clusters are per port already: a port's settings (portLevelSettings) apply here.
        # Groups set to nothing are dropped: an empty pool checks no limits per request, a
        # detection with both counts off makes no detector, and a reload between the two
        # spellings keeps the cluster.
        given = rule.policy_for(port, subset) if rule else TrafficPolicy()
        traffic = given.applied()
        tls = traffic.tls
        identity = config.proxy.mesh_identity
        automatic = identity is not None and identity.auto_mtls
        if given.tls is None and automatic and service.mesh_internal:
            # istiod's automatic mutual TLS: no tls set for the port or subset (an explicit
            # DISABLE, SIMPLE or MUTUAL turns it off), a service in the mesh.
            tls = UpstreamTls("ISTIO_MUTUAL", auto=True)
        if tls is not None and tls.mode == "ISTIO_MUTUAL":  # as istiod sets them per cluster
            tls = dataclasses.replace(
                tls,
                sni=tls.sni or istio_sni(host, port, subset),
                subject_alt_names=tls.subject_alt_names or service.subject_alt_names,
            )
        policy = traffic.load_balancer or LoadBalancer()
        labels = rule.subsets[subset].labels if subset is not None and rule is not None else {}
        index = build.subsets.get(host)
        if index is None:
            index = build.subsets[host] = SubsetIndex(service.endpoints)
        endpoints = index.select(labels)
        _count_endpoints(build, name, len(endpoints))
        yield
        workload = config.proxy.telemetry.workload
        endpoints, localities = cluster_localities(
            workload.locality, endpoints, policy.locality, port, subset
        )
        mutual = None
        if tls is not None and tls.auto:  # per endpoint, by its tlsMode (xDS: the cluster's)
            mutual = tuple(automatic and ep.mesh_tls_in(port, subset) for ep in endpoints)
        protocol = config.protocol_of(host, port)
        yield
        priorities = [ep.priority_in(port, subset) for ep in endpoints]
        yield
        # istiod asks only whether the rule has outlierDetection (one that ejects nothing,
        # ``given`` but not ``traffic``'s, still keeps the traffic in the nearest locality).
        if given.outlier_detection is not None:
            nearest = failover_priorities(
                workload.locality,
                [ep.locality for ep in endpoints],
                policy.locality,
                workload.labels,
                [ep.labels for ep in endpoints],
            )
            priorities = nearest or priorities
        entries = []
        for i, (ep, priority) in enumerate(zip(endpoints, priorities, strict=True), 1):
            key = self._label_key(build, ep)
            entries.append((ep.address, ep.port_for(sport), key, ep.weight, priority))
            if not i % ENDPOINT_STEP:
                yield
        spec = ClusterSpec(
            protocol,
            tuple(entries),
            policy,
            traffic.connection_pool,
            traffic.outlier_detection,
            service.namespace,
            tls,
            mutual,
            None if localities is None else tuple(localities),
            traffic.retry_budget,
            traffic.proxy_protocol,
            traffic.tunnel,
        )
        _count_hash_slots(build, name, policy, [ep.weight for ep in endpoints], priorities)
        yield
        serving = self.clusters.get(name)
        if serving is not None and self._cluster_specs.get(name) == spec:
            cluster = serving  # unchanged: keep its connections and outlier state
        else:
            hosts = []
            for i, (ep, priority) in enumerate(zip(endpoints, priorities, strict=True), 1):
                hosts.append(
                    UpstreamHost(ep.address, ep.port_for(sport), ep.labels, ep.weight, priority)
                )
                if not i % ENDPOINT_STEP:
                    yield
            for upstream, (locality, weight) in zip(hosts, localities or (), strict=False):
                upstream.locality, upstream.locality_weight = locality, weight
            cluster = Cluster(
                self,
                name,
                protocol,
                hosts,
                policy,
                traffic.connection_pool,
                traffic.outlier_detection,
                traffic.retry_budget,
                traffic.proxy_protocol,
                traffic.tunnel,
            )
            cluster.namespace = service.namespace  # of the configuration being built
            attach_cluster(cluster, tls, mutual)
            attach_slow_start(cluster, serving)
            if mutual is not None and not automatic:
                build.plain_auto.append(name)
        build.clusters[name] = cluster
        build.specs[name] = spec
        return cluster

    def _cluster_of(self, build: _Build, dest: Destination, listener: Listener) -> Steps[None]:
        """Make the cluster ``dest`` sends to, in steps, ahead of :meth:`_target` (which
        then finds it made)."""
        if dest.host in build.config.services:
            port = dest.port if dest.port is not None else listener.port
            yield from self._cluster_steps(build, dest.host, port, dest.subset)

    def _target(
        self,
        build: _Build,
        dest: Destination,
        listener: Listener,
        route: str,
        weight: int | None = None,
    ) -> Target:
        port = dest.port if dest.port is not None else listener.port
        cluster = None
        if dest.host in build.config.services:
            cluster = self._cluster(build, dest.host, port, dest.subset)
        name = cluster_name(dest.host, port, dest.subset)
        weight = dest.weight if weight is None else weight
        target = Target(name, cluster, weight, self.stats, listener.name, route)
        target.telemetry = self.target_telemetry(dest.host, listener, build.config)
        return target

    def target_telemetry(
        self, host: str, listener: Listener, config: Config | None = None
    ) -> TargetTelemetry | None:
        """Istio's series for requests to ``host`` through ``listener`` (``None``: off), as
        ``config`` (default: the serving one) describes them."""
        if self.istio is None:
            return None
        config = config or self.config
        service = config.services.get(host)
        protocol = config.protocol_of(listener.host, listener.port).name
        return TargetTelemetry(
            self.istio, protocol, host, service.namespace if service else "unknown"
        )

    def _build_checked(self, build: _Build, listener: Listener) -> Steps[ListenerRuntime]:
        """:meth:`_build_listener`, with the listener's codec built once from its options:
        whatever a filter or the codec raises is a ``ConfigError`` naming the listener (at
        start as at a reload: a plugin's own check, or its bug, is not the engine's)."""
        try:
            runtime = yield from self._build_listener(build, listener)
            runtime.codec_class.from_options(runtime.options)  # the codec accepts them
        except ConfigError as exc:
            raise ConfigError(str(exc), source=f"listener {listener.name}") from exc
        except Exception as exc:
            raise ConfigError(
                f"{type(exc).__name__}: {exc}", source=f"listener {listener.name}"
            ) from exc
        return runtime

    def _build_listener(self, build: _Build, listener: Listener) -> Steps[ListenerRuntime]:
        """The listener's runtime, in steps: one after each route and each of its
        destinations (a reload's build is :func:`.steps.paced`)."""
        config = build.config
        timeout = config.proxy.timeouts.route
        router = config.routers.get(listener.host)
        protocol = config.protocol_of(listener.host, listener.port)
        # The listener's own series first: past ``limits.maxStatsSeries`` its routes' series
        # fold into the overflow ones before its own do. Its routes are set below.
        runtime = ListenerRuntime(
            self, listener.name, protocol.codec_class, RouteTable(()), dict(protocol.options)
        )
        runtime._unrouted.telemetry = self.target_telemetry(listener.host, listener, config)
        attach_listener(runtime, listener.tls, build.identity)
        attach_detection(runtime, listener.peer_mode)
        policies = listener.authorization or config.proxy.authorization
        if policies is not None and policies.names:
            runtime.authz = ListenerAuthorization(
                policies,
                self.stats,
                listener.name,
                logged=config.proxy.access_log is not None,
            )
        runtime.max_duration = listener.max_connection_duration
        if listener.connection_rate_limit is not None:
            refused = self.stats.counter(
                "metaprotocol_downstream_connections_rejected_total",
                listener=listener.name,
                reason="rate_limited",
            )
            runtime.accept_limit = ConnectionRateLimit(
                listener.connection_rate_limit, self.loop.time(), refused
            )
        # The chain of every route: the MetaRouter's rate limit, the route's fault injection,
        # then the listener's own filters; the router comes last (Downstream._dispatch).
        chain = [spec.create() for spec in listener.filters]
        limiters: list[Filter] = []
        if router is not None and router.local_rate_limit is not None:
            limiters.append(
                LocalRateLimiter(router.local_rate_limit, self.loop.time, self.stats, listener.name)
            )
        if router is not None and router.global_rate_limit is not None:
            limiters.append(self._global_rate_limiter(build, router.global_rate_limit, listener))
        routes: list[CompiledRoute] = []
        if router is None or router.default_route:
            # No MetaRouter, or one with rate limits only: everything goes to the service
            # itself, as in Aeraki (which reads a MetaRouter without routes so).
            dest = Destination(listener.host, None, listener.port, 100)
            default = Route("default", (), (dest,), {}, {})
            yield from self._cluster_of(build, dest, listener)
            target = self._target(build, dest, listener, "default")
            routes.append(
                self._compile_route(build, default, listener, [target], timeout, chain, limiters)
            )
        else:
            for route in router.routes:
                single = 100 if len(route.destinations) == 1 else None
                targets = []
                for d in route.destinations:
                    yield from self._cluster_of(build, d, listener)
                    targets.append(self._target(build, d, listener, route.name, single))
                    yield
                if route.mirror is not None:
                    yield from self._cluster_of(build, route.mirror.destination, listener)
                routes.append(
                    self._compile_route(build, route, listener, targets, timeout, chain, limiters)
                )
                yield
        runtime.table = RouteTable(routes)
        return runtime

    def _compile_route(
        self,
        build: _Build,
        route: Route,
        listener: Listener,
        targets: list[Target],
        default_timeout: float,
        chain: list[Filter],
        limiters: list[Filter],
    ) -> CompiledRoute:
        # Tracing heads every chain (its span covers the policies' local replies too); when it
        # is not configured nothing of it is imported or run.
        head: list[Filter] = []
        if self.config.proxy.tracing is not None:
            from .tracing import tracing_filter

            head.append(tracing_filter(self))
        request_filters: list[Filter] = head + limiters
        fault = route.fault
        if fault is not None:

            def counter(kind: str) -> Counter:
                return self.stats.counter(
                    "metaprotocol_faults_total", listener=listener.name, route=route.name, type=kind
                )

            if fault.delay_percent > 0:
                request_filters.append(FaultDelay(fault, self.loop, counter("delay")))
            if fault.abort_percent > 0:
                request_filters.append(FaultAbort(fault, counter("abort")))
        request_filters += [f for f in chain if f.handles_requests]
        mirror = None
        if route.mirror is not None:
            mirror_target = self._target(build, route.mirror.destination, listener, route.name, 100)
            mirror = MirrorTarget(mirror_target, route.mirror.percent)
        compiled = CompiledRoute(
            route.name,
            compile_match(route.match),
            targets,
            route.request_mutation,
            route.response_mutation,
            route.timeout or default_timeout,
            request_filters=request_filters,
            response_filters=head + [f for f in chain if f.handles_responses],
            mirror=mirror,
            retries=route.retries,
        )
        compiled.local = Target("", None, 0, self.stats, listener.name, route.name)
        first = route.destinations[0].host if route.destinations else listener.host
        compiled.local.telemetry = self.target_telemetry(first, listener, build.config)
        return compiled

    def _global_rate_limiter(
        self, build: _Build, limit: GlobalRateLimit, listener: Listener
    ) -> GlobalRateLimiter:
        """The ``globalRateLimit`` filter of a listener, with its service's client (one per
        cluster; the serving one when its endpoints are unchanged)."""
        from .rls_client import RateLimitServiceClient  # gRPC: only when configured

        client = build.rls.get(limit.service)
        if client is None:
            client = self.rate_limit_services.get(limit.service)
            if client is None or client.endpoints != limit.endpoints:
                client = RateLimitServiceClient(limit.service, limit.endpoints)
            build.rls[limit.service] = client
        if self._rls_budget is None:
            self._rls_budget = CallBudget(
                self.config.proxy.limits.max_rate_limit_calls,
                self.stats.gauge("metaprotocol_global_ratelimit_calls_active"),
            )
        return GlobalRateLimiter(
            limit, client, self._rls_budget, self.loop, self.stats, listener.name
        )

    def _retire_rate_limit_services(self, kept: dict[str, Any]) -> None:
        """Close the channels of the clients no longer used (calls in flight get their
        ``requestTimeout`` at most: the longest a call can take)."""
        for name, client in self.rate_limit_services.items():
            if kept.get(name) is not client:
                task = self.loop.create_task(client.close(grace=self._rls_grace()))
                self._rls_closing.add(task)
                task.add_done_callback(self._rls_closing.discard)
        self.rate_limit_services = kept

    def _rls_grace(self) -> float:
        limits = [r.global_rate_limit for r in self.config.routers.values()]
        return max((g.request_timeout for g in limits if g is not None), default=0.0)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, *, serve: bool = True) -> None:
        """Bind every listener and the admin endpoint; on any failure nothing stays open.

        ``serve=False``: bound, not accepting until :meth:`begin_serving` (a hot restart's
        successor waits for its predecessor to stop accepting first).
        """
        from .admin import start_admin

        if self._loop is not None:
            raise RuntimeError("an Engine starts once; create a new one")
        if not self.config.proxy.listeners:  # it would serve nothing, silently, forever
            raise ConfigError("no listeners: add a ProxyConfig with spec.listeners")
        self._loop = self.loop = asyncio.get_running_loop()
        self.deadlines = Deadlines(self._loop, _expire)
        self.rebuilds = Rebuilds(self._loop)
        self._drained = asyncio.Event()
        self._stopped = asyncio.Event()
        try:
            settings = self.config.proxy
            build = _Build(self.config, identity=self._identity_for(self.config))
            for listener in settings.listeners:  # before serving: in one piece
                self.listeners[(listener.host, listener.port)] = finish(
                    self._build_checked(build, listener)
                )
            self.clusters, self._cluster_specs = build.clusters, build.specs
            self._label_keys = build.interned
            for cluster in self.clusters.values():
                self.drains.add(cluster)
            self.rate_limit_services = build.rls
            self._adopt_identity(build.identity)
            self._show_expiry()
            _warn_plain_auto(build)
            self._budget(settings)
            if self._loop.get_exception_handler() is None:
                self._loop.set_exception_handler(_LoopErrors())
            for listener in settings.listeners:
                key = (listener.host, listener.port)
                server = await self._listen(listener, self.listeners[key], start=serve)
                self._servers[key] = server
                sockname = server.sockets[0].getsockname()
                self.listener_addresses[key] = (sockname[0], sockname[1])
            await self._refuse_own_listeners(self.listener_addresses, self.clusters)
            if settings.admin is not None:
                self._admin = await start_admin(
                    self,
                    settings.admin,
                    self.inherited.take_admin() if self.inherited is not None else [],
                    serve,
                )
                sockname = self._admin.sockets[0].getsockname()
                self.admin_address = (sockname[0], sockname[1])
                if settings.admin.allow_remote and not is_loopback(settings.admin.bind[0]):
                    log.warning(
                        "admin endpoint on %s:%d is reachable from other hosts "
                        "(admin.allowRemote): it has no authentication and shows the whole "
                        "configuration",
                        *self.admin_address,
                    )
            if settings.access_log is not None:
                logged = settings.access_log
                self.access_log = AccessLog(
                    logged.path,
                    logged.attributes,
                    logged.max_value_length,
                    logged.failures_only,
                    logged.slower_than,
                    logged.otlp,
                )
        except BaseException:
            await self._close_servers()
            if self.inherited is not None:
                self.inherited.close()
            await self._stop_tracing()  # its exporter thread, made with the routes
            if isinstance(self._loop.get_exception_handler(), _LoopErrors):
                self._loop.set_exception_handler(None)
            raise
        if self.inherited is not None:  # those of binds this configuration does not have
            self.inherited.close()
        self._schedule_sweep()
        start_slow_starts(self.clusters.values())
        self.watchdog.start()

    async def begin_serving(self) -> None:
        """Start accepting on every listener and the admin endpoint (after
        ``start(serve=False)``)."""
        for server in list(self._servers.values()):
            await server.start_serving()
        if self._admin is not None:
            await self._admin.start_serving()
        for call in self.on_serving:
            call()
        self.on_serving.clear()

    def handover_sockets(
        self, wanted: list[tuple[str, int, str, int]], admin: tuple[str, int] | None
    ) -> tuple[list[list[Any]], int, list[int]]:
        """The listening sockets a hot restart's successor may take: for each of its
        listeners ``(host, port, bind_host, bind_port)`` whose bind this engine serves (for
        port 0, the same listener's), ``[host, port, count]``; the admin endpoint's count when
        its bind is this one's; and the descriptors, in that order. They stay open here until
        :meth:`hand_over`."""
        rows: list[list[Any]] = []
        fds: list[int] = []
        serving = {(item.bind_host, item.bind_port): item for item in self.config.proxy.listeners}
        by_key = {(item.host, item.port): item for item in self.config.proxy.listeners}
        for host, port, bind_host, bind_port in wanted:
            listener = (
                by_key.get((host, port)) if bind_port == 0 else serving.get((bind_host, bind_port))
            )
            if listener is None or (listener.bind_host, listener.bind_port) != (
                bind_host,
                bind_port,
            ):
                continue
            server = self._servers.get((listener.host, listener.port))
            if server is None:
                continue
            sockets = list(server.sockets)
            rows.append([host, port, len(sockets)])
            fds.extend(sock.fileno() for sock in sockets)
        admin_count = 0
        settings = self.config.proxy.admin
        if self._admin is not None and settings is not None and settings.bind == admin:
            sockets = list(self._admin.sockets)
            admin_count = len(sockets)
            fds.extend(sock.fileno() for sock in sockets)
        return rows, admin_count, fds

    def hand_over(self) -> None:
        """Stop accepting now, listeners and admin endpoint alike: a successor accepts on the
        same sockets from here on. The drain follows (:meth:`stop`)."""
        for server in self._servers.values():
            server.close()
        if self._admin is not None:
            self._admin.close()

    @property
    def stopped(self) -> bool:
        """True once :meth:`stop` has finished."""
        return self._stopped is not None and self._stopped.is_set()

    def _budget(self, settings: ProxySettings) -> None:
        """Set the connection limits from ``RLIMIT_NOFILE`` and the clusters known now."""
        limits = settings.limits
        hosts = sum(len(c.hosts) for c in self.clusters.values() if c.shared)
        shared = hosts * self.connections_per_endpoint
        nofile = nofile_limit()
        budget = connection_budget(
            nofile,
            limits.max_connections,
            limits.max_upstream_connections,
            shared,
            settings.xds is not None or any(not c.shared for c in self.clusters.values()),
        )
        self.max_connections = budget.clients
        self.max_upstream_connections = budget.upstreams
        self.descriptors = budget.descriptors
        if budget.clients > budget.descriptors - shared or (
            limits.max_upstream_connections is not None
            and budget.clients + budget.upstreams > budget.descriptors
        ):
            log.warning(
                "limits.maxConnections %d and maxUpstreamConnections %d are more than the %d "
                "connections RLIMIT_NOFILE (%d) leaves beyond the %d descriptors kept for the "
                "rest: past it, connections are refused (clients at the accept, upstream "
                "connections with OverLimit)",
                budget.clients,
                budget.upstreams,
                budget.descriptors,
                nofile,
                FD_RESERVE,
            )

    async def _listen(
        self, listener: Listener, runtime: ListenerRuntime, start: bool
    ) -> asyncio.Server | ServerGroup:
        """Bind ``listener``'s address; it accepts connections once ``start`` or, later,
        ``start_serving``."""
        assert self._loop is not None

        loop = self._loop

        inherited = (
            self.inherited.take((listener.host, listener.port))
            if self.inherited is not None
            else []
        )

        def accept() -> asyncio.BaseProtocol:
            # A reload may change the listener's rate limit and TLS: looked at per connection.
            limit = runtime.accept_limit
            if limit is not None and not limit.take(loop.time()):
                return Refused(limit.refused)  # before any handshake
            detect = runtime.detect
            if detect is not None:  # PERMISSIVE or DISABLE: its first bytes say
                return detecting(runtime, detect)
            context = runtime.tls
            try:
                return Downstream(runtime) if context is None else tls_accept(runtime, context)
            except CodecUnavailable:  # counted and logged as the codec's bug
                return Refused(runtime.rejected["codec_error"])

        if inherited:
            return await serve_on(
                inherited,
                lambda sock: loop.create_server(
                    accept, sock=sock, backlog=1024, start_serving=start
                ),
            )
        return await self._loop.create_server(
            accept,
            listener.bind_host,
            listener.bind_port,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
            backlog=1024,
            start_serving=start,
        )

    # -- reloading -----------------------------------------------------------------------------

    async def apply(
        self, config: Config, *, source: str = "file", version: str | None = None
    ) -> None:
        """Serve ``config`` from now on, or raise :class:`ConfigError` and change nothing.

        Every runtime structure of ``config`` is built first (route tables, clusters, filter
        chains, codecs from their options, the new listeners' binds); only when all of that
        succeeded is it swapped in, at once, between requests. Requests in flight finish on
        the route they were given; new requests, on new and open connections alike, use the
        new routes. Clusters whose definition changed or that are gone drain: their
        connections take no new requests and close once idle (at the latest after
        ``timeouts.drain``). Listeners added start accepting; listeners removed stop
        accepting and their connections drain. Codec options apply to new connections;
        open connections keep their codec (those whose listener changed codec class drain).
        Settings read only at start (``reload.RESTART_NEEDED``) must not change.

        ``source`` labels ``metaprotocol_reloads_total{source, result}`` and the
        ``lastReload`` of ``/config_dump``; ``version`` replaces the content hash as
        :attr:`config_version`.
        """
        if self._reloading is None:
            self._reloading = asyncio.Lock()
        async with self._reloading:  # one reload at a time, each against the serving state
            # In a thread: it hashes every document (12 000 routes: 0.4 s).
            new_version = version
            if not new_version:
                new_version = await asyncio.to_thread(config_version, config)
            try:
                staged = await self._stage(config, new_version)
            except ConfigError as exc:
                self._stats_pruner.stale = True  # the series its build made (at zero)
                self._record(ReloadRecord.now(source, "refused", str(exc), new_version))
                raise
            self._commit(staged)
            # Still under the lock: no other build is under way.
            await self._stats_pruner.prune_paced(self, self._loop_time())
            self._record(ReloadRecord.now(source, "ok", None, new_version))
        for key, server in staged.servers.items():
            with contextlib.suppress(RuntimeError):  # stopped meanwhile: nothing to serve
                if self._servers.get(key) is server:
                    await server.start_serving()

    def refused(self, source: str, error: str, version: str = "") -> None:
        """Record a reload refused before it reached :meth:`apply` (say, a file that did not
        parse): counted and shown in ``/config_dump`` like the refusals of ``apply``."""
        self._record(ReloadRecord.now(source, "refused", error, version))

    def _record(self, record: ReloadRecord) -> None:
        self.last_reload = record
        self.stats.counter(
            "metaprotocol_reloads_total", source=record.source, result=record.result
        ).value += 1
        # Debug only: the caller (the CLI, an xDS client) writes its own line for each.
        log.debug(
            "reload %s (%s)%s%s",
            record.result,
            record.source,
            f": version {record.version}" if record.version else "",
            f": {record.error}" if record.error else "",
        )

    async def _stage(self, config: Config, version: str) -> _Staged:
        """Build (and bind) everything ``config`` needs next to the serving runtime."""
        if self._loop is None or self.draining:
            raise ConfigError("the engine is not serving (not started, or stopping)")
        if not config.proxy.listeners:
            raise ConfigError("no listeners: add a ProxyConfig with spec.listeners")
        why = restart_needed(self.config.proxy, config.proxy)
        if why is not None:
            raise ConfigError(why)
        build = _Build(config, identity=self._identity_for(config))
        runtimes: dict[tuple[str, int], ListenerRuntime] = {}
        for listener in config.proxy.listeners:  # in slices, serving between them
            runtimes[(listener.host, listener.port)] = await paced(
                self._build_checked(build, listener)
            )
        serving = {(lst.host, lst.port): lst for lst in self.config.proxy.listeners}
        addresses = {
            key: self.listener_addresses[key]
            for key, listener in serving.items()
            if key in runtimes and _same_bind(listener, runtimes, config)
        }
        servers: dict[tuple[str, int], asyncio.Server | ServerGroup] = {}
        try:
            for listener in config.proxy.listeners:
                key = (listener.host, listener.port)
                if key in addresses:
                    continue
                try:
                    server = await self._listen(listener, runtimes[key], start=False)
                except OSError as exc:
                    raise ConfigError(
                        f"cannot bind {listener.bind_host}:{listener.bind_port}: "
                        f"{exc.strerror or exc}",
                        source=f"listener {listener.name}",
                    ) from exc
                servers[key] = server
                sockname = server.sockets[0].getsockname()
                addresses[key] = (sockname[0], sockname[1])
            await self._refuse_own_listeners(addresses, build.clusters)
            if self.draining:
                raise ConfigError("the engine began stopping during the reload")
        except BaseException:
            for server in servers.values():
                server.close()
            raise
        return _Staged(config, version, build, runtimes, servers, addresses)

    def _commit(self, staged: _Staged) -> None:
        """Swap ``staged`` in (no await: nothing runs between its first and last line)."""
        retired = [
            c for name, c in self.clusters.items() if staged.build.clusters.get(name) is not c
        ]
        draining: list[Downstream] = []
        # Connections still shaking hands were made by a listener's runtime with its codec
        # and routes of then; those the reload would drain have nothing in flight: reset.
        aborted: list[TlsDownstream | Detecting] = []
        listeners: dict[tuple[str, int], ListenerRuntime] = {}
        for key, runtime in staged.runtimes.items():
            current = self.listeners.get(key)
            if current is None or key in staged.servers:
                listeners[key] = runtime
                continue
            same_codec = current.codec_class is runtime.codec_class
            # The listener's runtime object stays (the server's factory and every connection
            # hold it): its routes and codec settings are replaced in place.
            current.table = runtime.table
            current.codec_class = runtime.codec_class
            current.options = runtime.options
            current.new_codec = runtime.new_codec
            current._unrouted = runtime._unrouted
            current.tls = runtime.tls  # new connections shake hands with the new files
            current.tls_stats = runtime.tls_stats
            current.tls_check = runtime.tls_check
            current.mesh_tls = runtime.mesh_tls
            current.local_uris = runtime.local_uris
            current.detect = runtime.detect
            current.authz = runtime.authz
            current.max_duration = runtime.max_duration  # open connections age by it now
            # Each open connection is judged again by the new policies at its next request.
            verdict = None if runtime.authz is None else STALE
            kept = current.accept_limit
            if (
                kept is None
                or runtime.accept_limit is None
                or kept.spec != runtime.accept_limit.spec
            ):
                current.accept_limit = runtime.accept_limit  # else its tokens carry over
            match = runtime.table.match
            for conn in self.downstreams:
                if conn.listener is current:
                    conn.authz = verdict
                    if same_codec:
                        conn._route = match
                    if not same_codec or not _accepts(runtime, conn):
                        # Its codec cannot feed the new protocol's routes, or the listener
                        # no longer takes its transport (a PeerAuthentication made STRICT:
                        # a plain text client may not go on, as Envoy drains the
                        # connections of a filter chain an update removed).
                        draining.append(conn)
            for shaking in self.handshaking:
                if shaking.listener is current:
                    if not same_codec or not _accepts(runtime, shaking):
                        # Its first bytes may be plain text on a port made STRICT: reset,
                        # as the open plain ones are drained.
                        aborted.append(shaking)
                    elif isinstance(shaking, TlsDownstream):
                        shaking._route = match  # (a Detecting one takes the runtime's later)
                    elif runtime.detect is not None:
                        # Its first bytes are judged by the mode of now (a TLS client on a
                        # port made PERMISSIVE from DISABLE was refused).
                        shaking.detection = runtime.detect
            listeners[key] = current
        for key, current in self.listeners.items():
            if key in listeners and listeners[key] is current:
                continue
            server = self._servers.pop(key, None)
            if server is not None:
                server.close()
            draining.extend(c for c in self.downstreams if c.listener is current)
            aborted.extend(c for c in self.handshaking if c.listener is current)
        self._retire_rate_limit_services(staged.build.rls)
        if staged.config.proxy.upstream_heartbeat != self.config.proxy.upstream_heartbeat:
            for upstream in self.upstreams:  # each looked at again by the settings of now
                if upstream.ping_due != math.inf:
                    upstream.ping_due = 0.0
        self.config = staged.config
        self.config_version = staged.version
        previous = self.clusters
        self.clusters = staged.build.clusters
        self._cluster_specs = staged.build.specs
        self._label_keys = staged.build.interned
        # The index of endpoints follows (removed first: a replaced cluster's draining
        # endpoints are then avoided by the one replacing it, until their drain ends).
        for cluster in retired:
            self.drains.remove(cluster)
        for name, cluster in self.clusters.items():
            if previous.get(name) is not cluster:
                self.drains.add(cluster)
        start_slow_starts(self.clusters.values(), retired)
        self.listeners = listeners
        self._servers.update(staged.servers)
        self.listener_addresses = dict(staged.addresses)
        self._adopt_identity(staged.build.identity)
        self._show_expiry()
        _warn_plain_auto(staged.build)
        for conn in draining:
            conn.start_drain()
        for shaking in aborted:
            shaking.abort()
        for cluster in retired:
            cluster.retired = True
        if retired:
            gone = set(retired)
            for upstream in list(self.upstreams):
                if upstream.cluster in gone:
                    upstream.retire()  # no new requests; closes once its replies are in
            for cluster in retired:  # requests waiting for room: to the cluster of now
                cluster.reroute_waiting()
        if retired or draining:

            def deadline() -> None:
                self._drain_timers.discard(timer)
                self._end_drain(retired, draining)

            timer = self.loop.call_later(self.config.proxy.timeouts.drain, deadline)
            self._drain_timers.add(timer)

    # -- the workload identity (ISTIO_MUTUAL) --------------------------------------------------

    def _identity_for(self, config: Config) -> IdentityWatch | None:
        """The identity ``config`` serves with: the serving one when its settings are the
        same (it follows the files since), else one from what the loader read."""
        settings = config.proxy.mesh_identity
        if settings is None:
            return None
        serving = self.identity
        if serving is not None and serving.settings == settings:
            return serving
        return IdentityWatch(settings.material, self.stats, self.loop.time())

    def _adopt_identity(self, identity: IdentityWatch | None) -> None:
        """Serve ``identity``'s current files on the ``ISTIO_MUTUAL`` listeners: a rotation
        during a reload's awaits gave the serving listeners the new files, and left the
        staged ones with the contexts they were built with."""
        if identity is not self.identity:
            if self.identity is not None:
                self.identity.on_rotate = None
            self.identity = identity
            if identity is not None:
                identity.on_rotate = self._identity_rotated
            self._follow_sds(identity)
        if identity is not None:
            self._serve_identity(identity)

    def _follow_sds(self, identity: IdentityWatch | None) -> None:
        """Hold the SDS stream of ``identity``'s server (``spec.meshIdentity.sds``), ending
        the one of an identity it replaced."""
        source = None if identity is None else identity.settings.sds
        watch = self.sds
        if watch is not None and watch.source == source:
            assert identity is not None
            identity.source_dump = watch.dump
            return
        if watch is not None:
            self.sds = None
            watch.halt()  # now: a load from here on fetches its server's secrets again
            task = self.loop.create_task(watch.stop())
            self._sds_closing.add(task)
            task.add_done_callback(self._sds_closing.discard)
        if source is None:
            return
        from .sds import SdsWatch, existing_store

        store = existing_store(source)
        if store is None:  # not loaded by this process's loader: nothing to follow
            log.warning("mesh identity: no secrets held from %s", source.address)
            return
        self.sds = SdsWatch(
            store, self._sds_pushed, self._sds_refused, servers=self._identity_servers
        )
        self.sds.start()
        assert identity is not None
        identity.source_dump = self.sds.dump

    def _sds_pushed(self, material: IdentityMaterial) -> None:
        """New secrets written by the SDS stream: rotate in the contexts its thread built
        from them (at the paths the identity reads)."""
        identity = self.identity
        if identity is not None and identity.material.digest != material.digest:
            identity.adopt(material.moved(identity.settings))

    def _identity_servers(self) -> tuple[ServerKey, ...]:
        """The server contexts the identity keeps (asked from the SDS stream's thread)."""
        identity = self.identity
        return (DEFAULT_SERVER,) if identity is None else identity.material.server_keys()

    def _sds_refused(self, reason: str) -> None:
        if self.identity is not None:
            self.identity.refused(f"spec.meshIdentity.sds: {reason}")

    def _serve_identity(self, identity: IdentityWatch) -> None:
        material = identity.material
        for runtime in self.listeners.values():
            if runtime.mesh_tls is not None:
                try:  # built again if the material no longer keeps it
                    runtime.tls = material.server(server_key(runtime.mesh_tls))
                except TlsSettingError as exc:
                    log.warning("listener %s keeps its mesh identity: %s", runtime.name, exc)

    def _identity_rotated(self) -> None:
        """New files: the ``ISTIO_MUTUAL`` listeners' new connections shake hands with them
        (clusters take the identity's client context at each connect)."""
        identity = self.identity
        assert identity is not None
        self._serve_identity(identity)
        self._show_expiry()

    def _show_expiry(self) -> None:
        show_expiry(self.stats, (*self.listeners.values(), *self.clusters.values()), self.identity)

    def _end_drain(self, clusters: list[Cluster], downstreams: list[Downstream]) -> None:
        """A reload's drain deadline: close what is still open of what it retired. A stream
        (whose connection is its own, with no end foreseen) goes on while the cluster of its
        name still has its endpoint, through this reload and those after it. A connection
        held open for its endpoint's drain with nothing in flight is left to its hold (the
        upstream's close, or ``timeouts.upstreamDrain``): the drain goes on for the clusters
        of now."""
        gone = set(clusters)
        for upstream in list(self.upstreams):
            if upstream.stream is not None:
                if upstream.cluster.retired and not self._endpoint_kept(upstream):
                    upstream.abort(ErrorType.UpstreamReset, "a reload removed its endpoint")
            elif upstream.notice_hold is not None and not upstream.in_flight:
                continue
            elif upstream.cluster in gone:
                upstream.abort(ErrorType.UpstreamReset, "a reload changed or removed its cluster")
        for conn in downstreams:
            conn.abort()

    def _endpoint_kept(self, upstream: UpstreamConnection) -> bool:
        """The cluster of ``upstream``'s cluster's name still has its endpoint."""
        cluster = self.clusters.get(upstream.cluster.name)
        key = upstream.host.key
        return cluster is not None and any(host.key == key for host in cluster.hosts)

    # -- limits --------------------------------------------------------------------------------

    def refuse_connection(self) -> str | None:
        """Why a new downstream connection must be refused now (``None``: accept it)."""
        if self.draining:
            return "draining"
        clients = len(self.downstreams) + len(self.handshaking)
        if (
            clients >= self.max_connections
            or clients + len(self.upstreams) >= self.descriptors  # upstream took the rest
        ):
            return "max_connections"
        if self.buffered > self.max_buffered or self.rss_over:
            return "overload"
        return None

    def upstream_room(self, reserve: int = 0) -> bool:
        """Whether one more upstream connection fits in ``maxUpstreamConnections`` and in
        the descriptors the client connections leave, with room for ``reserve`` more after
        it (asked only when one is to open)."""
        upstreams = len(self.upstreams) + reserve
        return upstreams < self.max_upstream_connections and (
            upstreams + len(self.downstreams) + len(self.handshaking) < self.descriptors
        )

    def make_upstream_room(self) -> bool:
        """Make room for one more upstream connection when the budget is spent, by closing the
        clients' own connections idle longest (see :meth:`reclaim_upstream`); ``False``: not
        enough were idle, no room. Usually one is closed; more only where the connections
        open are more than the budget allows (client connections took descriptors since),
        and none when the idle list is too short for it: nothing is closed for nothing."""
        upstreams = len(self.upstreams) + 1
        clients = len(self.downstreams) + len(self.handshaking)
        need = max(
            upstreams - self.max_upstream_connections, upstreams + clients - self.descriptors
        )
        if need > len(self.idle_upstreams):
            return False
        while not self.upstream_room():
            if not self.reclaim_upstream():
                return False
        return True

    def reclaim_upstream(self) -> bool:
        """Close the client's own upstream connection idle longest: nothing in flight on it,
        nothing unsent, neither connecting nor retiring. Its client opens another at its next
        request (or reuses one it has to another endpoint). Connections busy again are
        dropped from the list on the way (each entry is looked at once per time listed);
        one still connecting or with bytes unsent (one-way messages) is listed anew by the
        sweep once they are out. ``False``: none could be closed."""
        idle = self.idle_upstreams
        while idle:
            conn = idle.popitem(last=False)[0]
            if conn.closed or conn.retiring or len(conn.order) > conn.stale:
                continue  # going, or busy: listed anew when idle
            if conn.connecting or conn.account_unsent():
                conn.unlisted = True  # one-way messages not out yet: the sweep lists it anew
                continue
            conn.give_up(
                "reclaimed",
                ErrorType.UpstreamReset,
                "closed for another client: the upstream connection budget is spent",
            )
            return True
        return False

    def clients_without_upstream(self) -> int:
        """Client connections open that have no upstream connection of their own (yet)."""
        return len(self.downstreams) + len(self.handshaking) - self.clients_with_upstream

    def upstream_refusal(self) -> str:
        """Why :meth:`upstream_room` said no: the local reply's message."""
        upstreams = len(self.upstreams)
        if upstreams >= self.max_upstream_connections:
            limit = self.max_upstream_connections
            return f"too many upstream connections (limits.maxUpstreamConnections {limit})"
        clients = len(self.downstreams) + len(self.handshaking)
        return (
            f"no descriptors left for an upstream connection ({clients} client and "
            f"{upstreams} upstream connections open, {self.descriptors} allowed by "
            "RLIMIT_NOFILE)"
        )

    def _schedule_sweep(self) -> None:
        t = self.config.proxy.timeouts
        shortest = min(t.idle, t.frame, t.write, self.upstream_write_timeout)
        for cluster in self.clusters.values():
            if cluster.idle_timeout is not None:
                shortest = min(shortest, cluster.idle_timeout)
            if cluster.max_duration is not None:
                shortest = min(shortest, cluster.max_duration)
        for runtime in self.listeners.values():
            if runtime.max_duration is not None:
                shortest = min(shortest, runtime.max_duration)
        heartbeat = self.config.proxy.upstream_heartbeat
        if heartbeat.interval is not None:
            shortest = min(shortest, heartbeat.interval, heartbeat.timeout)
        if self.identity is not None:
            shortest = min(shortest, self.identity.interval)
        interval = min(SWEEP_MAX, max(0.02, shortest / 4))
        self._sweeper = self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        """Enforce the per-connection timeouts and recount the buffered bytes exactly; the
        next sweep is scheduled whatever this one raised (every timeout of the engine hangs
        on it): the error is logged, with its traceback at most once a minute."""
        try:
            self._sweep_now()
        except Exception:
            now = self.loop.time()
            if now >= self._sweep_error_logged + 60.0:
                self._sweep_error_logged = now
                log.exception("the housekeeping sweep failed (it runs again all the same)")
        self._schedule_sweep()

    def _sweep_now(self) -> None:
        now = self.loop.time()
        # Upstream connections first, in a pass before the recount: one closed for a stalled
        # reply or stalled writes answers its clients' requests locally, and may send them
        # again (retries) on new connections, whose bytes the recount must see.
        upstream_write = self.upstream_write_timeout
        for upstream in list(self.upstreams):
            if upstream.partial_since and upstream.check_partial(now):
                continue  # aborted: it released what it held
            unsent = upstream.account_unsent()
            if unsent:
                upstream.write_sweep(now, upstream_write, unsent)
            elif upstream.stalled_since or upstream.expired or upstream.unlisted:
                upstream.writes_caught_up()
        buffered = 0
        heartbeat = self.config.proxy.upstream_heartbeat
        interval = heartbeat.interval
        for upstream in list(self.upstreams):
            if interval is not None and now >= upstream.ping_due and not upstream.closed:
                upstream.heartbeat_sweep(now, interval, heartbeat.timeout)
                if upstream.closed:
                    continue  # aborted: it released what it held
            buffered += upstream.held + upstream.account_unsent()  # with a ping queued now
            cluster = upstream.cluster
            if cluster.max_duration is not None:
                upstream.lifetime_sweep(now, cluster.max_duration)
            if cluster.idle_timeout is not None:
                upstream.idle_sweep(now, cluster.idle_timeout)
        for downstream in list(self.downstreams):
            buffered += downstream.sweep(now)
        if self.quiet_close is not None:
            self._close_quiet(now, self.quiet_close)
        for downstream in list(self.departed):
            if downstream.inflight:
                buffered += downstream.inflight_bytes
            else:
                self.departed.discard(downstream)
        self.buffered = buffered
        self.rss_over = self.max_rss is not None and _rss_bytes() > self.max_rss
        self._flush_access_log()
        identity = self.identity
        if identity is not None and now >= identity.next_check:
            identity.check(now)
        # Not while a reload builds: its series name nothing serving yet.
        building = self._reloading is not None and self._reloading.locked()
        if not building and self._stats_pruner.due(self, now):
            self._stats_pruner.prune_safely(self, now)

    def _close_quiet(self, now: float, quiet: float) -> None:
        """Close the client connections with nothing in flight or held that have been quiet
        for ``quiet`` seconds (a hot restart's drain: their clients' next connections reach
        the successor)."""
        for downstream in list(self.downstreams):
            if (
                not downstream.inflight
                and not downstream.held
                and not downstream.closed
                and now - downstream.last_seen >= quiet
            ):
                downstream.start_drain()  # nothing in flight: it closes now

    def _flush_access_log(self) -> None:
        """Write the access log's gathered lines (each sweep: a reader sees a line within a
        second) and show its failures as counters."""
        access_log = self.access_log
        if access_log is None:
            return
        access_log.flush()
        # Added, not set: a hot restart's successor goes on from its predecessor's counts.
        failed, dropped = access_log.failed_writes, access_log.dropped_lines
        was_failed, was_dropped = self._access_log_counted
        stats = self.stats
        stats.counter("metaprotocol_access_log_write_failures_total").value += failed - was_failed
        stats.counter("metaprotocol_access_log_dropped_lines_total").value += dropped - was_dropped
        self._access_log_counted = (failed, dropped)
        if self.config.proxy.access_log is not None and self.config.proxy.access_log.otlp:
            exports, records = access_log.failed_exports, access_log.dropped_records
            was_exports, was_records = self._access_log_exported
            stats.counter("metaprotocol_access_log_export_failures_total").value += (
                exports - was_exports
            )
            stats.counter("metaprotocol_access_log_dropped_records_total").value += (
                records - was_records
            )
            self._access_log_exported = (exports, records)

    def prune_stats(self) -> int:
        """Drop the stats series of names that left the configuration, once nothing uses
        them; return how many went (see :mod:`.stats_pruning`)."""
        return self._stats_pruner.prune(self, self._loop_time())

    def _loop_time(self) -> float | None:
        """The loop's time, ``None`` before :meth:`start`."""
        return self._loop.time() if self._loop is not None else None

    def overloaded(self) -> bool:
        """True while new requests and connections are refused for overload."""
        return self.buffered > self.max_buffered or self.rss_over

    async def _refuse_own_listeners(
        self,
        addresses: dict[tuple[str, int], tuple[str, int]],
        clusters: dict[str, Cluster],
    ) -> None:
        """Refuse an endpoint that is one of this engine's own listeners (once bound).

        Requests sent there would come back in and be routed out again until a limit stops
        them; Envoy has no such check, and the loop is easy to build with ephemeral ports.
        Endpoint names (``localhost``, a ``DNS`` service's hosts) are resolved here, once and
        bounded in time (``addresses.RESOLVE_TIMEOUT``); what a name resolves to later, at
        connect time, is not checked again.
        """
        bound: dict[int, list[tuple[str, str]]] = {}
        for (host, port), (ip, bound_port) in addresses.items():
            bound.setdefault(bound_port, []).append((f"{host}:{port}", ip))
        suspects = [
            (cluster, upstream)
            for cluster in clusters.values()
            for upstream in cluster.hosts
            if upstream.port in bound  # only these can be a listener: resolve nothing else
        ]
        if not suspects:
            return
        resolved = await resolve_all(self.loop, (u.address for _, u in suspects))
        # In a thread, each address looked at once: behind a wildcard bind each is probed
        # with a socket of its own (addresses.is_local), and a sidecar's endpoints usually
        # share its listener's port (20 000 of them held the event loop 1.3 s per reload,
        # once more for each subset they are in).
        found = await asyncio.to_thread(_loop_back, suspects, bound, resolved)
        if found is not None:
            cluster, upstream, listener, ip, address = found
            via = "" if address == upstream.address else f", {address} for its name"
            raise ConfigError(
                f"endpoint {upstream.key} is this engine's own listener for {listener} "
                f"(bound on {ip}:{upstream.port}{via}): requests would loop back into it",
                source=f"cluster {cluster.name}",
            )

    async def _close_servers(self) -> None:
        servers = [*self._servers.values(), *([self._admin] if self._admin else [])]
        self._servers = {}
        self._admin = None
        for server in servers:
            server.close()
        for server in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    def downstream_gone(self) -> None:
        """Called when a downstream connection closes."""
        if self.draining and not self.downstreams and self._drained is not None:
            self._drained.set()

    def upstream_gone(self) -> None:
        """Called when an upstream connection closes."""

    def requests_drained(self) -> None:
        """Called when the last pending request finishes during a drain."""

    async def stop(self, drain: float | None = None, *, serve_first: bool = False) -> None:
        """Stop accepting, let in-flight requests finish (up to ``drain`` seconds), close all.

        New requests on open connections get a ``ShuttingDown`` local reply meanwhile;
        each connection closes as soon as it has nothing in flight, and one that must wait is
        sent its codec's drain notice first. ``serve_first`` (a hot restart's predecessor):
        every open connection is sent the notice, and for the first half of ``drain`` they
        are served as before, each closed once quiet for :data:`QUIET_CLOSE` seconds with
        nothing in flight; the rest drain as above in the second half.
        """
        if self._loop is None or self.draining:
            return
        if drain is None:
            drain = self.config.proxy.timeouts.drain
        self.draining = True
        assert self._drained is not None
        for timer in self._drain_timers:
            timer.cancel()
        self._drain_timers.clear()
        for server in self._servers.values():
            server.close()
        if serve_first and self.downstreams:
            for conn in list(self.downstreams):  # their clients may move now, not at the close
                conn.notify_drain()
            self.quiet_close = QUIET_CLOSE
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), drain / 2)
            self.quiet_close = None
            drain /= 2
        for conn in list(self.downstreams):
            conn.start_drain()
        for handshake in list(self.handshaking):  # nothing in flight on them
            handshake.abort()
        if self.downstreams:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), drain)
        # Deadline passed (or all drained): close whatever is left.
        for conn in list(self.downstreams):
            conn.abort()
        # Aborted, not closed: a close waits until the upstream takes what is unsent, for
        # good if it reads nothing, and its requests would stay pending and uncounted.
        for upstream in list(self.upstreams):
            upstream.abort(ErrorType.UpstreamReset, "proxy is shutting down")
        await self._close_servers()
        if isinstance(self._loop.get_exception_handler(), _LoopErrors):
            self._loop.set_exception_handler(None)
        # Let connection_lost callbacks run so no transport outlives stop().
        for _ in range(100):
            if not self.downstreams and not self.upstreams and not self.handshaking:
                break
            await asyncio.sleep(0)
        # After them: a client aborted above with a request a filter holds is added there.
        self.departed.clear()  # no sweep looks at them any more
        self._retire_rate_limit_services({})
        if self._rls_closing:
            await asyncio.wait(self._rls_closing)
        if self.sds is not None:
            await self.sds.stop()
            self.sds = None
        if self._sds_closing:
            await asyncio.wait(self._sds_closing)
        self.deadlines.close()
        self.rebuilds.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.watchdog.stop()
        await self._stop_tracing()
        if self.access_log is not None:
            self._flush_access_log()
            self.access_log.close()
            self.access_log = None
        assert self._stopped is not None
        self._stopped.set()

    async def _stop_tracing(self) -> None:
        """Export the spans still queued, off the loop, for a bounded time (a dead collector
        must not hold the shutdown; the exporter gives up on its own later), and end the
        exporter's thread."""
        if self.config.proxy.tracing is not None:
            from .tracing import shutdown

            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.to_thread(shutdown, self), TRACING_FLUSH)

    async def wait_stopped(self) -> None:
        """Wait until :meth:`stop` has finished."""
        assert self._stopped is not None, "engine not started"
        await self._stopped.wait()

    # -- introspection -------------------------------------------------------------------------

    def _refresh_gauges(self) -> None:
        self._pending_gauge.value = self.pending
        self._buffered_gauge.value = self.buffered
        self._overloaded_gauge.value = int(self.overloaded())

    def stats_snapshot(self) -> dict[str, float]:
        """Every stats series as ``{'name{labels}': value}`` (gauges refreshed)."""
        self._refresh_gauges()
        return self.stats.snapshot()

    def stats_snapshot_parts(self) -> Iterator[list[tuple[str, Value]]]:
        """:meth:`stats_snapshot` in pieces (see :meth:`.stats.Stats.snapshot_parts`)."""
        self._refresh_gauges()
        return self.stats.snapshot_parts()

    def prometheus(self) -> str:
        """Stats in Prometheus text format (gauges refreshed)."""
        self._refresh_gauges()
        return self.stats.prometheus()

    def prometheus_parts(self) -> Iterator[str]:
        """:meth:`prometheus` in pieces (see :meth:`.stats.Stats.prometheus_parts`)."""
        self._refresh_gauges()
        return self.stats.prometheus_parts()

    def worker_parts(self) -> Iterator[str]:
        """The stats for a ``--workers`` supervisor (see :meth:`.stats.Stats.worker_parts`)."""
        self._refresh_gauges()
        return self.stats.worker_parts()

    def config_dump(self) -> dict[str, Any]:
        """A JSON-ready view of the validated configuration and the runtime built from it
        (``/config_dump``; see :func:`.config_dump.config_dump`)."""
        from .config_dump import config_dump

        return config_dump(self)


def _same_bind(
    serving: Listener, runtimes: dict[tuple[str, int], ListenerRuntime], config: Config
) -> bool:
    """Whether ``config`` keeps ``serving``'s bind address (then its socket stays)."""
    for listener in config.proxy.listeners:
        if (listener.host, listener.port) == (serving.host, serving.port):
            return (listener.bind_host, listener.bind_port) == (
                serving.bind_host,
                serving.bind_port,
            )
    return False


def _expire(item: Any) -> None:
    """A deadline passed: a request in flight or one a filter holds (both have ``expire``)."""
    item.expire()
