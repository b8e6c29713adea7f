"""Upstream side: clusters, hosts, connection pools and the upstream connection protocol.

Two pooling modes, chosen by the codec's ``rewrite_request_id`` capability (and a cluster's
``proxyProtocol``: dedicated, see below):

* **shared**: a host's connections (``upstream.connectionsPerEndpoint``, default 1) carry the
  requests of every downstream connection. Each request gets a fresh id on the upstream
  connection (``encode(..., request_id=new)``) and the original id is put back on the
  response, so concurrent clients never collide. With a cap of requests per connection
  (``maxConcurrentStreams``, or a codec's few ids), full connections make a host open more,
  and requests wait for room past the limits (see room.py).
* **dedicated**: without id rewriting, each downstream connection gets its own upstream
  connection per host; responses are paired by request id, falling back to arrival order.
  A cluster with ``proxyProtocol`` is dedicated whatever its codec: each of its connections
  starts with a PROXY protocol header naming one client (Envoy keys its connection pools by
  those addresses), so the client's own ids go upstream unchanged.

A codec whose ``encode`` ignores the id it is given would send a client's own id on a shared
connection, and the reply would answer whichever request has that id there: another
client's. The first :data:`ENCODE_CHECKS` requests of each shared connection (whose own id
is not the engine's) are decoded again (by a fresh codec) to see the id written; one that is
not the id asked for is answered locally, not sent, and the codec's class is served dedicated
from then on (:func:`unshare`).
"""

from __future__ import annotations

import asyncio
import math
import random
import socket
import sys
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from metaprotocol_sdk.codec import Codec, Encoded, ReplyHead, join_encoded, take_frame
from metaprotocol_sdk.enums import ErrorType, MessageType
from metaprotocol_sdk.errors import CodecError
from metaprotocol_sdk.metadata import Metadata, Mutation

from .assembly import DECODE_TURN, LARGE_FRAME, Reads, parses_whole_frames
from .balancer import Balancer, Client, ConsistentHash, make_balancer
from .codec_bugs import CodecUnavailable, guarded_maker
from .config.models import (
    ConnectionPool,
    LoadBalancer,
    OutlierDetection,
    Protocol,
    codec_maker,
)
from .endpoint_drains import endpoint_identity
from .outlier import OutlierDetector
from .priority import priority_balancer
from .proxy_protocol import client_header
from .stats import Counter
from .tunnel import TunnelRefused, connect_error, hand_over, open_tunnel

if TYPE_CHECKING:
    from .config.models import ProxyProtocol, RetryBudget, Tunnel, UpstreamTls
    from .downstream import Downstream
    from .engine import Engine
    from .mirror import MirrorSink
    from .room import Queue
    from .router import CompiledRoute, Target
    from .slow_start import SlowStart
    from .streams import Stream
    from .telemetry import Identities
    from .tls import TlsStats

_RESPONSE = MessageType.Response
_ERROR = MessageType.Error
#: Messages up to this size that a codec encodes as several buffers are joined into one before
#: queueing: a copy of a few KiB costs less than the transport's per-buffer work. Larger ones
#: keep the codec's zero-copy slices.
JOIN_LIMIT = 16 * 1024


def append_encoded(out: list[bytes | memoryview], encoded: Encoded, size: int) -> None:
    """Queue what ``encode`` returned for a message of ``size`` bytes (see ``JOIN_LIMIT``)."""
    if type(encoded) is bytes:
        out.append(encoded)
    elif size <= JOIN_LIMIT:
        out.append(b"".join(encoded))  # type: ignore[arg-type]
    else:
        out.extend(encoded)  # type: ignore[arg-type]


_HEARTBEAT = MessageType.Heartbeat
#: What a finished (or timed-out) request keeps instead of its own: it may wait a while in its
#: deadline queue or, timed out, hold its place on a dedicated connection, and must not keep
#: its frame alive meanwhile.
RELEASED = Metadata(MessageType.Request)


#: What each decoded attribute of a request in flight counts in the buffer budget, besides its
#: frame: its key and value as strings, the case-folded key, a tuple and the table entries that
#: hold them. That is about 200 to 250 bytes of heap per key-value (measured with the example
#: KV codec and a reference codec),
#: whatever the few bytes it took on the wire: counting the frame alone, requests of many tiny
#: attributes held some 40 times what the budget saw.
ATTRIBUTE_BYTES = 256


def held_bytes(request: Metadata) -> int:
    """What a request holds in the buffer budget while it waits (held by a filter, for room
    on a connection): its frame and its decoded attributes (``Pending`` counts the same,
    inline: it is built for every request)."""
    return len(request.frame) + ATTRIBUTE_BYTES * len(request.attributes.folded_items)


#: Timed-out requests a dedicated connection remembers (so that their late replies are not
#: paired with later requests) before it is closed and replaced.
STALE_LIMIT = 64
#: Picks a retry makes to find another endpoint than the one that failed: Istio's default
#: retry policy (Envoy's previous_hosts predicate, host_selection_retry_max_attempts 5).
RETRY_HOST_PICKS = 5


class Pending:
    """A request waiting for its response."""

    __slots__ = (
        "conn",
        "deadline",
        "done",
        "downstream",
        "held",
        "host",
        "mutation",
        "request",
        "route",
        "seq",
        "size",
        "start",
        "target",
        "tries",
        "wire_id",
    )

    def __init__(
        self,
        downstream: Downstream | MirrorSink,
        request: Metadata,
        route: CompiledRoute,
        target: Target,
        host: UpstreamHost,
        conn: UpstreamConnection,
        start: float,
    ) -> None:
        self.downstream = downstream
        self.request = request
        self.route = route
        self.target = target
        self.host = host
        self.conn = conn
        self.start = start
        self.wire_id = request.request_id
        self.size = len(request.frame)
        #: What it holds, in the buffer budget: its frame and its decoded attributes.
        self.held = self.size + ATTRIBUTE_BYTES * len(request.attributes.folded_items)
        self.done = False
        self.deadline = 0.0
        #: Retries before this try. ``seq`` (the position on a dedicated connection) is set
        #: when sent there, ``mutation`` (what it was sent with) on routes with retries and
        #: on shared connections.
        self.tries = 0
        self.seq: int
        self.mutation: Mutation | None

    def expire(self) -> None:
        """The deadline passed (called by the engine's deadlines)."""
        self.downstream.timeout(self)


class Load:
    """The requests in flight to a cluster's endpoints together (their ``active``), kept
    where a limit reads it per request or per retry (``http2MaxRequests``, a retry budget):
    a sum over the endpoints cost 14 us per request at 1000 endpoints. Each place that
    counts a request on an endpoint counts it here too (``UpstreamHost.load``)."""

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = 0


class UpstreamHost:
    """One endpoint of a cluster."""

    __slots__ = (
        "active",
        "address",
        "cluster",
        "connection_class",
        "conns",
        "draining",
        "echoed",
        "echoes",
        "ejected",
        "ejections",
        "endpoint",
        "errors",
        "gateway_errors",
        "istio",
        "key",
        "labels",
        "leaving",
        "load",
        "local_errors",
        "locality",
        "locality_weight",
        "next_conn",
        "next_holder",
        "outlier",
        "port",
        "prev_holder",
        "priority",
        "roomy",
        "waiting",
        "weight",
    )

    def __init__(
        self,
        address: str,
        port: int,
        labels: dict[str, str] | None = None,
        weight: int = 1,
        priority: int = 0,
    ) -> None:
        #: Clients' own connections: the first id a reply was paired by, and whether replies
        #: have been paired by two ids (the upstream echoes them; see
        #: ``UpstreamConnection._candidate``).
        self.echoed: int | None = None
        self.echoes = False
        self.address = address
        self.port = port
        self.key = f"{address}:{port}"
        #: The server it reaches, as the engine's drains know it (``endpoint_drains.py``;
        #: set by its cluster, which knows whether its connections go through a tunnel), its
        #: cluster, and the hosts of serving clusters with the same identity before and
        #: after it (the engine's index of endpoints links them: no container is made per
        #: endpoint, and one leaves in one step).
        self.endpoint = self.key
        self.cluster: Cluster | None = None
        self.prev_holder: UpstreamHost | None = None
        self.next_holder: UpstreamHost | None = None
        #: The ServiceEntry endpoint's labels (Istio's destination labels).
        self.labels = labels or {}
        #: The TLS identities its last connection presented, for Istio's series of the
        #: requests answered without one (``None``: none, plain text).
        self.istio: Identities | None = None
        #: The endpoint's load balancing weight (``endpoints[].weight``; 1 when unset);
        #: while its cluster warms endpoints, the weight to balance by (see slow_start.py).
        self.weight = weight
        #: The endpoint's failover priority in its cluster (EDS ``LocalityLbEndpoints``), 0
        #: (the first level) unless the cluster came over xDS with priorities.
        self.priority = priority
        #: Its locality and its locality's weight, for locality weighted balancing
        #: (``distribute``, EDS locality weights; set by the engine): 0 without it.
        self.locality = ""
        self.locality_weight = 0
        #: Requests in flight (for LEAST_REQUEST), and its cluster's together, where a limit
        #: reads them (``None``: none does; see :class:`Load`).
        self.active = 0
        self.load: Load | None = None
        #: Shared connections (shared mode only).
        self.conns: list[UpstreamConnection] = []
        self.next_conn = 0
        #: Requests waiting for room on its shared connections (see room.py; ``None``: none
        #: ever did), and, with a cap of requests per connection, its shared connections that
        #: may have room (every one that has is there: a full one leaves when it is looked
        #: at, a connection comes back when a read or a timeout made room, as Envoy's ready
        #: list of connections).
        self.waiting: Queue | None = None
        self.roomy: OrderedDict[UpstreamConnection, None] | None = None
        #: Its shared connections that retired and are still open (``None``: none ever
        #: did): the close of each sends the requests waiting for room, on a connection
        #: opened in its place, so while there are some they wait rather than be refused.
        self.leaving: set[UpstreamConnection] | None = None
        #: The cluster's outlier detector, when it has one (see outlier.py).
        self.outlier: OutlierDetector | None = None
        self.errors = 0
        self.gateway_errors = 0
        #: Local-origin failures in a row (counted apart with splitExternalLocalOriginErrors).
        self.local_errors = 0
        self.ejected = False
        self.ejections = 0
        #: Its endpoint drains: a connection to it (of any cluster's) that carried its drain
        #: notice is held open (see ``UpstreamConnection._drain_notice``), and meanwhile the
        #: balancer avoids it.
        self.draining = False
        #: What its connections are: plain, or TLS (``tls.attach_cluster``), chosen per
        #: endpoint where istiod's automatic mutual TLS says so, once, when it is built.
        self.connection_class: type[UpstreamConnection] = UpstreamConnection

    def room(self, conn: UpstreamConnection) -> None:
        """List ``conn`` among the shared connections that may have room (see ``roomy``)."""
        roomy = self.roomy
        if roomy is None:
            roomy = self.roomy = OrderedDict()
        roomy[conn] = None


@dataclass
class _LevelBalancers:
    """The hash balancers a cluster keeps of one priority level: of all of its hosts, and
    the last one made of some of them (by the identities of those hosts)."""

    whole: Balancer[UpstreamHost]
    last: tuple[tuple[int, ...], Balancer[UpstreamHost]] | None = None


class Cluster:
    """A destination service port (and optional subset): hosts, balancer, pooling mode."""

    def __init__(
        self,
        engine: Engine,
        name: str,
        protocol: Protocol,
        hosts: list[UpstreamHost],
        policy: LoadBalancer,
        pool: ConnectionPool | None = None,
        outlier: OutlierDetection | None = None,
        retry_budget: RetryBudget | None = None,
        proxy_protocol: ProxyProtocol | None = None,
        tunnel: Tunnel | None = None,
    ) -> None:
        self.engine = engine
        #: ``trafficPolicy.tunnel``: each connection opens an HTTP/1.1 tunnel through its
        #: endpoint first (see tunnel.py); decided per connection, never per request.
        self.tunnel = tunnel
        self.name = name
        self.protocol = protocol
        #: Makes each connection's codec (see ``codec_maker``); one that fails raises
        #: ``CodecUnavailable`` and the request that needed the connection fails.
        self.new_codec = guarded_maker(
            codec_maker(protocol.codec_class, protocol.options),
            protocol.codec_class,
            engine.codec_bugs,
            "upstream connection not opened",
        )
        self.hosts = hosts
        for host in hosts:
            host.endpoint = endpoint_identity(host.address, host.port, tunnel)
            host.cluster = self
        self.policy = policy
        #: Whether the hosts have several failover priorities: then the balancer picks a
        #: level by Envoy's priority load first (see priority.py); decided once, here.
        self.prioritised = len({h.priority for h in hosts}) > 1
        #: Whether the hosts have locality weights: then a locality is picked first too.
        self.locality_weighted = any(h.locality_weight for h in hosts)
        #: Each priority's share of requests, in percent (prioritised clusters only).
        self.priority_load: dict[int, int] = {}
        #: Built by :meth:`rebalance`, once the outlier detector below exists.
        self.balancer: Balancer[UpstreamHost]
        #: ``trafficPolicy.proxyProtocol``: each connection starts with a header naming its
        #: client (see proxy_protocol.py), so connections are the clients' own.
        self.proxy_protocol = proxy_protocol
        #: Pooling mode (see the module's docstring); turned off for good by :meth:`unshare`
        #: (also for the clusters a reload builds later) when the codec's ``encode`` did not
        #: write the ids it was given.
        self.shared = (
            protocol.codec_class.capabilities.rewrite_request_id
            and proxy_protocol is None
            and protocol.codec_class not in engine.codec_bugs.unshared
        )
        #: Circuit-breaker limits (``trafficPolicy.connectionPool``), ``None``: none.
        self.pool = pool
        #: Whether the pool limits requests (``http2MaxRequests``, ``http1MaxPendingRequests``),
        #: which each request checks (:meth:`over_pool_limits`): a pool that sets only
        #: timeouts, keepalive or connections (every cluster istiod sends has a
        #: ``connectTimeout``) costs nothing per request.
        self.request_limits = pool is not None and (
            pool.max_requests is not None or pool.max_pending_requests is not None
        )
        #: Shared connections whose codec has no more ids than the engine may have requests
        #: in flight (its pending requests and mirrored copies): a request that times out
        #: (or whose client left) keeps its id until its late reply comes (see
        #: ``UpstreamConnection.forget``), as ids come round soon.
        ids = protocol.codec_class.max_request_id
        self.few_ids = self.shared and ids <= engine.max_pending + engine.mirror_sink.limit
        #: Requests in flight per connection (0: not checked), see :func:`stream_cap`; and
        #: the requests waiting for room (see room.py), for ``http1MaxPendingRequests``.
        self.stream_cap = stream_cap(pool, ids if self.few_ids else 0)
        self.queued = 0
        #: The destination service (host) and its namespace, for Istio's labels.
        self.service = name.rsplit("|", 1)[-1]
        service = engine.config.services.get(self.service)
        self.namespace = service.namespace if service is not None else "unknown"
        self.connect_timeout = engine.connect_timeout
        if pool is not None and pool.connect_timeout is not None:
            self.connect_timeout = pool.connect_timeout
        #: How long a connection may have nothing in flight (``http.idleTimeout``, else
        #: ``tcp.idleTimeout``) and be open (``tcp.maxConnectionDuration``); ``None``: no
        #: limit. Enforced by the engine's sweep, never per request.
        self.idle_timeout = None if pool is None else pool.upstream_idle_timeout
        self.max_duration = None if pool is None else pool.max_connection_duration
        #: Open or opening upstream connections, those still opening, and the requests sent
        #: on those (waiting for a connection to open, for ``http1MaxPendingRequests``:
        #: kept as a count, not summed per request over connections that may be many).
        self.connections = 0
        self.opening: set[UpstreamConnection] = set()
        self.opening_requests = 0
        #: Retries in flight (``connectionPool.http.maxRetries``, ``retryBudget``).
        self.retrying = 0
        #: ``trafficPolicy.retryBudget``: what bounds ``retrying`` when set, instead of
        #: ``maxRetries`` (which Envoy ignores then).
        self.retry_budget = retry_budget
        #: ``maxRetries`` (0 and unchecked with a budget or without a limit).
        self.max_retries = 0
        if retry_budget is None and pool is not None and pool.max_retries is not None:
            self.max_retries = pool.max_retries
        #: Whether a retry checks a limit (a budget or ``maxRetries``): decided once, here.
        self.limits_retries = retry_budget is not None or self.max_retries > 0
        #: The requests in flight to its endpoints, kept where http2MaxRequests or a retry
        #: budget reads them (``None``: nothing does, and nothing counts them).
        self.load: Load | None = None
        if retry_budget is not None or (pool is not None and pool.max_requests is not None):
            self.load = Load()
            for host in hosts:
                host.load = self.load
        #: A reload removed or replaced the cluster: requests still on its old routes (a
        #: retry, a request a filter held) may open connections to it, which are retiring
        #: from the start (they close once their replies are in, whenever that is).
        self.retired = False
        self.outlier: OutlierDetector | None = None
        #: Warm-up of new endpoints (``loadBalancer.warmup``; set by ``attach_slow_start``).
        self.slow_start: SlowStart | None = None
        #: The hash balancers kept of each priority level (``_hashed``). Its hosts' weights
        #: never change while it serves (slow start applies to no hashing policy; a reload
        #: that changes one builds a new cluster), so they stay right.
        self._hash_cache: dict[int, _LevelBalancers] = {}
        if outlier is not None:
            self.outlier = OutlierDetector(self, outlier, engine.loop, engine.stats)
            for host in hosts:
                host.outlier = self.outlier
        #: Its endpoints draining now (``UpstreamHost.draining``), and the drain notices its
        #: upstreams sent (made on first use: most codecs have none).
        self.draining = 0
        self._notices: Counter | None = None
        #: Pings sent to its endpoints (made on first use).
        self._pings: Counter | None = None
        self.build_balancer()
        stats = engine.stats
        self.connects = stats.counter("metaprotocol_upstream_connections_total", cluster=name)
        self.active = stats.gauge("metaprotocol_upstream_connections_active", cluster=name)
        self.connect_errors = stats.counter(
            "metaprotocol_upstream_connect_errors_total", cluster=name
        )
        self.resets = stats.counter("metaprotocol_upstream_resets_total", cluster=name)
        #: Replies that answered nothing (made on first use: most clusters see none).
        self._unmatched: Counter | None = None
        #: Requests that waited for room, and those waiting now (made on first use).
        self._waits: tuple[Counter, Counter] | None = None
        self.heartbeats = stats.counter(
            "metaprotocol_heartbeats_total", cluster=name, side="upstream"
        )
        self.decode_errors = stats.counter(
            "metaprotocol_decode_errors_total", cluster=name, side="upstream"
        )
        self._overflows: dict[str, Counter] = {}
        self._closed_by: dict[str, Counter] = {}
        #: TLS origination (``trafficPolicy.tls``; set by ``tls.attach_cluster``, which
        #: gives the hosts their connection class): ``None`` and plain
        #: ``UpstreamConnection``\ s without it.
        self.tls: UpstreamTls | None = None
        self.tls_stats: TlsStats | None = None
        #: The URI SANs of its client certificate (``MUTUAL``; read once, for Istio's
        #: metrics: ``tls.attach_cluster``).
        self.local_uris: tuple[str, ...] = ()

    def rebalance(self) -> None:
        """Rebuild the balancer over the endpoints to use now (after an ejection change, a
        slow-start step): now, or at its turn within the engine's budget (rebuilds.py)."""
        self.engine.rebuilds.request(self)

    def avoid_ejected(self) -> None:
        """Until its rebuild: the balancer's picks of endpoints ejected since it was built
        pick again (see rebuilds.py); so do picks of draining endpoints."""
        if not isinstance(self.balancer, AvoidUnfit):
            self.balancer = AvoidUnfit(self.balancer)

    def build_balancer(self) -> None:
        """Build the balancer over the endpoints to use now (avoiding the draining ones)."""
        self.engine.rebalances += 1
        if self.prioritised or self.locality_weighted:
            panic = 0 if self.outlier is None else self.outlier.spec.min_health_percent
            avoided = {h for h in self.hosts if h.draining} if self.draining else ()
            self.balancer, self.priority_load = priority_balancer(
                self.policy, self.hosts, panic, self.locality_weighted, self._hashed, avoided
            )
        else:
            hosts = self.hosts if self.outlier is None else self.outlier.balanced_hosts()
            kept = self._hashed(self.hosts[0].priority, hosts, self.hosts) if self.hosts else None
            self.balancer = (
                kept if kept is not None else make_balancer(self.policy, hosts, self.hosts)
            )
        if self.draining:
            self.balancer = AvoidUnfit(self.balancer)

    def drain_noticed(self) -> None:
        """One of its connections carried its upstream's drain notice: counted (the drain
        itself is the engine's, for every cluster with the endpoint: endpoint_drains.py)."""
        notices = self._notices
        if notices is None:
            notices = self._notices = self.engine.stats.counter(
                "metaprotocol_drain_notices_total", cluster=self.name, side="upstream"
            )
        notices.value += 1

    def drain_began(self, host: UpstreamHost) -> None:
        """``host``'s endpoint drains (a connection to it, of this cluster or another, carried
        its drain notice): avoided until :meth:`drain_ended`."""
        host.draining = True
        self.draining += 1
        self.avoid_ejected()
        if self.prioritised or self.locality_weighted:
            # Within its level a pick of it picks again (above); a level of draining
            # endpoints fails over to the next, as one of ejected endpoints does.
            self.rebalance()

    def drain_ended(self, host: UpstreamHost) -> None:
        """The connection held open for the drain of ``host``'s endpoint closed (or was held
        as long as ``timeouts.upstreamDrain`` allows), or this cluster no longer serves: the
        endpoint is picked again."""
        host.draining = False
        self.draining -= 1
        if self.prioritised or self.locality_weighted:
            self.rebalance()  # its level's load back (unwrapped if none left)
            return
        balancer = self.balancer
        if (
            not self.draining
            and isinstance(balancer, AvoidUnfit)
            and not self.engine.rebuilds.waiting(self)
        ):
            self.balancer = balancer.built

    def _hashed(
        self, priority: int, hosts: Sequence[UpstreamHost], level: Sequence[UpstreamHost]
    ) -> Balancer[UpstreamHost] | None:
        """The hash ring or Maglev table over ``hosts`` of a priority level's hosts
        (``level``) for a cluster with outlier detection, from those kept (``None``: any
        other cluster, built as usual). Each level keeps the balancer of all of its hosts,
        built the first time the level balances, and the last one of some of them: an
        endpoint ejected and readmitted again and again builds nothing after the first time,
        and a ring of some of them takes the whole ring's points (no hashing, no sorting)."""
        policy = self.policy
        if self.outlier is None or policy.policy != "CONSISTENT_HASH":
            return None
        kept = self._hash_cache.get(priority)
        if kept is None:
            kept = self._hash_cache[priority] = _LevelBalancers(make_balancer(policy, level, level))
        if len(hosts) == len(kept.whole.hosts):
            return kept.whole
        key = tuple(map(id, hosts))
        if kept.last is None or kept.last[0] != key:
            whole = kept.whole if isinstance(kept.whole, ConsistentHash) else None
            kept.last = (key, make_balancer(policy, hosts, level, whole))
        return kept.last[1]

    def _count(self, made: dict[str, Counter], name: str, label: str, value: str) -> None:
        """Add one to this cluster's series ``name`` with ``label=value``, made on first use
        and kept in ``made`` (most clusters never see most values)."""
        counter = made.get(value)
        if counter is None:
            labels = {"cluster": self.name, label: value}
            counter = made[value] = self.engine.stats.counter(name, **labels)
        counter.value += 1

    def overflow(self, limit: str) -> str:
        """Count a request refused by the circuit breaker ``limit``; the reply's message."""
        self._count(self._overflows, "metaprotocol_upstream_overflow_total", "limit", limit)
        return f"circuit breaker {limit} of {self.name} is open"

    def count_ping(self) -> None:
        """Count one ping sent to an endpoint (made on first use: most codecs send none)."""
        pings = self._pings
        if pings is None:
            pings = self._pings = self.engine.stats.counter(
                "metaprotocol_upstream_pings_total", cluster=self.name
            )
        pings.value += 1

    def closed_by(self, reason: str) -> None:
        """Count an upstream connection the engine closed for a limit (``reason``)."""
        self._count(
            self._closed_by, "metaprotocol_upstream_connections_closed_total", "reason", reason
        )

    def over_pool_limits(self, host: UpstreamHost) -> str | None:
        """Which request limit of ``connectionPool`` a new request to ``host`` would break."""
        pool = self.pool
        assert pool is not None
        if pool.max_requests is not None and (why := self.over_max_requests()) is not None:
            return why
        limit = pool.max_pending_requests
        if limit is not None and self.queued + self.opening_requests >= limit:
            return self.overflow("http1MaxPendingRequests")
        return None

    def over_max_requests(self) -> str | None:
        """``http2MaxRequests`` reached (the requests in flight to the cluster's endpoints):
        the overflow's message, counted; ``None``: below it, or no such limit. Checked for a
        new request, and for one that waited for room as it is sent, as Envoy checks
        ``max_requests`` when it attaches a pending request to a connection."""
        pool = self.pool
        limit = None if pool is None else pool.max_requests
        if limit is not None:
            assert self.load is not None
            if self.load.active >= limit:
                return self.overflow("http2MaxRequests")
        return None

    def queue_for(self, conn: UpstreamConnection) -> Queue:
        """The queue a request waits in for room on ``conn`` (see room.py): its endpoint's,
        for a shared connection, else the connection's own (made on first use)."""
        owner: UpstreamHost | UpstreamConnection = conn.host if conn.shared else conn
        queue = owner.waiting
        if queue is None:
            queue = owner.waiting = OrderedDict()
        return queue

    def wait_started(self) -> None:
        """Count a request that waits for room on a connection."""
        self.queued += 1
        counters = self._waits
        if counters is None:
            stats = self.engine.stats
            counters = self._waits = (
                stats.counter("metaprotocol_upstream_requests_queued_total", cluster=self.name),
                stats.gauge("metaprotocol_upstream_requests_queued_active", cluster=self.name),
            )
        counters[0].value += 1
        counters[1].value = self.queued

    def wait_ended(self) -> None:
        """A request stopped waiting for room (sent, answered, or its client left)."""
        self.queued -= 1
        if self._waits is not None:
            self._waits[1].value = self.queued

    def unmatched_reply(self) -> None:
        """Count a reply that answered no request waiting for one (it is dropped)."""
        counter = self._unmatched
        if counter is None:
            counter = self._unmatched = self.engine.stats.counter(
                "metaprotocol_upstream_unmatched_replies_total", cluster=self.name
            )
        counter.value += 1

    def at_max_connections(self) -> bool:
        """Whether ``connectionPool.tcp.maxConnections`` allows no more connections."""
        pool = self.pool
        return (
            pool is not None
            and pool.max_connections is not None
            and self.connections >= pool.max_connections
        )

    def may_open(self) -> bool:
        """Whether one more connection may open: below ``connectionPool.tcp.maxConnections``
        and within the process's upstream connection budget (see :meth:`refused`)."""
        return not self.at_max_connections() and self.engine.upstream_room()

    def may_reclaim(self) -> bool:
        """When :meth:`may_open` said no: whether closing idle connections of clients' own
        makes room for one (never past ``connectionPool.tcp.maxConnections``)."""
        return not self.at_max_connections() and self.engine.make_upstream_room()

    def refused(self) -> str:
        """Count a request refused because :meth:`may_open` said no; the reply's message."""
        if self.at_max_connections():
            return self.overflow("maxConnections")
        self._count(
            self._overflows,
            "metaprotocol_upstream_overflow_total",
            "limit",
            "maxUpstreamConnections",
        )
        return self.engine.upstream_refusal()

    def serving(self) -> Cluster:
        """The cluster for a try of a request routed to this one: itself, or, once a reload
        has replaced it, its successor of the same name, as Envoy looks a cluster up by name
        at each try (a request routed before the reload, held by a filter or retried, goes to
        the endpoints of now, not to those the reload removed). When the reload removed the
        cluster (or gave its port another codec), itself still: it drains, and the request
        was routed to it."""
        if not self.retired:
            return self
        now = self.engine.clusters.get(self.name)
        if now is None or now.protocol.codec_class is not self.protocol.codec_class:
            return self
        return now

    def own(self, host: UpstreamHost) -> UpstreamHost:
        """This cluster's host of ``host``'s endpoint (``host`` of the cluster a reload
        replaced with this one, which a retry avoids), or ``host`` when it has none."""
        for mine in self.hosts:
            if mine.key == host.key:
                return mine
        return host

    def pick_other(
        self, metadata: Metadata, avoid: UpstreamHost, client: Client | None = None
    ) -> UpstreamHost | None:
        """An endpoint for a retry of ``metadata`` (from ``client``), other than ``avoid``
        (the one that failed) when the cluster has others: the balancer picks up to
        :data:`RETRY_HOST_PICKS` times more, as weights (or a hash) may give the failed one
        again."""
        balancer = self.balancer
        host = balancer.pick(metadata, client)
        if host is avoid and len(self.hosts) > 1:
            for attempt in range(1, RETRY_HOST_PICKS + 1):
                host = balancer.pick_again(metadata, client, attempt)
                if host is not avoid:
                    break
        return host

    def shared_connection(
        self, host: UpstreamHost, reclaim: bool = True
    ) -> UpstreamConnection | None:
        """A shared connection to ``host``, opening one while below the per-host count (and
        the cluster's ``maxConnections`` and the process's budget); ``None`` when the limits
        leave it none. An endpoint with none may take the place of a client's own idle
        connection when the budget is spent (``reclaim``; not for a mirror's copy): it
        serves every client. With a :attr:`stream_cap`, one with room, or one more opened
        (past the per-host count); else a full one, which the request waits for room on.
        Requests already waiting for room on ``host`` go first (:meth:`admit`): room made
        where no reply or close of the endpoint's says so (a connection may open again, the
        budget freed elsewhere) is theirs, oldest first, not the next request's (a mirror's
        copy, ``reclaim`` off, lets them be: the copies of what is admitted would admit more,
        in a recursion as deep as the requests waiting)."""
        if self.stream_cap and host.waiting and reclaim:
            self.admit(host)
        conns = host.conns
        if len(conns) < self.engine.connections_per_endpoint:
            conn = self._open_shared(host, reclaim)
            if conn is not None:
                return conn
            if not conns:
                return None
        if self.stream_cap:
            return self.room_on(host) or conns[0]
        i = host.next_conn
        if i >= len(conns):
            i = 0
        host.next_conn = i + 1
        return conns[i]

    def _open_shared(self, host: UpstreamHost, reclaim: bool) -> UpstreamConnection | None:
        """Open one more shared connection to ``host`` when the limits allow (see
        :meth:`shared_connection`)."""
        conn = None
        if self.may_open():
            conn = host.connection_class(self, host, None)
        elif not host.conns and self.engine.upstream_room():
            # At maxConnections for other endpoints' connections: this one, which has none,
            # gets one anyway (counted as the limit's overflow), as Envoy's pool opens one
            # for a host that has none, "to prevent pending streams being queued to this
            # upstream with no way to be processed". The process's budget still holds.
            self.overflow("maxConnections")
            conn = host.connection_class(self, host, None)
        elif reclaim and not host.conns:
            # Built before another client's idle connection is closed for it: a codec
            # that cannot be built (CodecUnavailable) costs nobody's connection.
            conn = host.connection_class(self, host, None)
            if not self.may_reclaim():
                conn = None
        if conn is not None:
            host.conns.append(conn)
            if self.stream_cap:
                host.room(conn)
            conn.connect()
        return conn

    def room_on(self, host: UpstreamHost) -> UpstreamConnection | None:
        """A shared connection to ``host`` with room for a request (they take turns), or one
        more opened when the limits allow; ``None``: every one is full. O(1) amortised: a
        full connection is dropped from ``host.roomy`` as it is met, and comes back once."""
        roomy = host.roomy
        cap = self.stream_cap
        while roomy is not None and roomy:
            conn = next(iter(roomy))
            if len(conn.pending) < cap:
                roomy.move_to_end(conn)
                return conn
            del roomy[conn]
        return self._open_shared(host, False)

    def admit(self, host: UpstreamHost) -> None:
        """Send the requests waiting for room on ``host``'s shared connections, oldest
        first, while one has room (or can be opened). With none left at all and none to
        open, nor any retired one still open (whose close calls this again), they cannot be
        sent: each is answered as a request refused a connection. A request whose client
        left is dropped first: it opens nothing. A connection to open whose codec cannot be
        built fails them all, as a connect failure does (see ``_take_waiting``)."""
        waiting = host.waiting
        while waiting:
            if not self.shared:  # unshared (since they queued, or by the one just sent)
                host.waiting = None  # each to its client's own connection
                while waiting:
                    q = waiting.popitem(last=False)[0]
                    q.downstream.requeue(q)
                return
            q = waiting.popitem(last=False)[0]
            if q.downstream.closed:
                q.downstream.room_left(q)
                continue
            try:
                conn = self.room_on(host)
            except CodecUnavailable as exc:  # counted and logged as the codec's bug
                waiting[q] = None
                waiting.move_to_end(q, last=False)
                host.waiting = None  # their retries may wait anew
                failed = ErrorType.UpstreamConnectFailure
                while waiting:
                    q = waiting.popitem(last=False)[0]
                    q.downstream.room_failed(q, failed, str(exc))
                return
            if conn is None:
                waiting[q] = None
                waiting.move_to_end(q, last=False)
                if not (host.conns or host.leaving):
                    while waiting:  # each counted, as a request refused at once is
                        q = waiting.popitem(last=False)[0]
                        q.downstream.room_refused(q, self.refused())
                return
            q.downstream.send_queued(q, conn)

    def unshare(self) -> None:
        """Pool connections per client from now on (its codec's ``encode`` did not write a
        request id it was given, see :func:`unshare`): its shared connections retire (their
        requests in flight are answered there, with the ids that were checked) and the
        requests waiting for room on them are routed again, soon, to a client's own
        connection."""
        if not self.shared:
            return
        self.shared = False
        self.stream_cap = stream_cap(self.pool, 0)  # a client's own ids: no few-ids cap
        for host in self.hosts:
            for conn in list(host.conns):
                conn.retire()
            host.roomy = None
        self.engine.loop.call_soon(self.reroute_waiting)

    def reroute_waiting(self) -> None:
        """A reload retired the cluster: the requests waiting for room on its endpoints are
        routed again, to its successor of the same name (see :meth:`serving`), as a retry
        is (a removed cluster's go to its endpoints again: it drains)."""
        for host in self.hosts:
            waiting, host.waiting = host.waiting, None
            while waiting:
                q = waiting.popitem(last=False)[0]
                q.downstream.requeue(q)


def stream_cap(pool: ConnectionPool | None, few_ids: int) -> int:
    """Requests one upstream connection may carry at once (0: no cap to check): the pool's
    ``maxConcurrentStreams``; on shared connections whose codec has few ids (``few_ids``:
    its ``max_request_id``, 0: not so, see ``Cluster.few_ids``), also one less than those:
    the last id is left to one-way messages (a codec of one id has none to leave: a one-way
    message goes on a connection with nothing in flight, or one more opened, else is
    dropped), and a request past the ids waits for room or opens a connection, as past
    ``maxConcurrentStreams``."""
    cap = 0 if pool is None else pool.max_concurrent_streams or 0
    if few_ids:
        cap = min(cap or few_ids, max(1, few_ids - 1))
    return cap


class AvoidUnfit(Balancer[UpstreamHost]):
    """A cluster's balancer while it has endpoints to avoid that it was built with: ejected
    since it was built (waiting for its rebuild after a change of health, rebuilds.py), or
    draining (their upstream sent its codec's drain notice). A pick of one picks again, as
    a retry's does (:data:`RETRY_HOST_PICKS` times at most: then that one, as when every
    endpoint is to be avoided)."""

    def __init__(self, built: Balancer[UpstreamHost]) -> None:
        # The built balancer's list, not a copy: made at each drain's start for every
        # cluster with the endpoint, it costs the same with 3 or 3 000 endpoints.
        self.hosts = built.hosts
        self.built = built

    def pick(self, metadata: Metadata, client: Client | None = None) -> UpstreamHost | None:
        built = self.built
        host = built.pick(metadata, client)
        attempt = 0
        while host is not None and (host.ejected or host.draining) and attempt < RETRY_HOST_PICKS:
            attempt += 1
            host = built.pick_again(metadata, client, attempt)
        return host

    def pick_again(
        self, metadata: Metadata, client: Client | None, attempt: int
    ) -> UpstreamHost | None:
        built = self.built
        host = built.pick_again(metadata, client, attempt)
        more = attempt + RETRY_HOST_PICKS
        while host is not None and (host.ejected or host.draining) and attempt < more:
            attempt += 1
            host = built.pick_again(metadata, client, attempt)
        return host


#: Unmatched replies on a shared connection checked for an id the codec did not write.
ID_CHECKS = 8
#: Requests of each shared connection whose encoded frame is decoded again to check the id
#: written (a cost per connection, not per request: see ``UpstreamConnection._check_id``).
#: Only requests whose client's id is not the one the engine gives count: a codec that
#: ignores the id cannot pass them by chance (the first requests of a client that numbers
#: from 1 on a fresh connection have the engine's ids).
ENCODE_CHECKS = 4


class IdNotWritten(CodecError):
    """The codec's ``encode`` did not write the request id it was given: the request is
    answered locally (counted and logged as the codec's bug already, not again)."""


def unshare(engine: Engine, codec: Codec, cluster: Cluster, what: str) -> None:
    """``codec``'s ``encode`` did not write a request id it was given (on ``cluster``;
    ``what`` says how it was seen): count and log it, and serve its class dedicated from now
    on: the clusters of now (``cluster`` too, which a reload may have retired) pool
    connections per client, and those built later do (``Cluster.__init__``)."""
    engine.codec_bugs.ids_not_written(codec, what)
    cls = type(codec)
    cluster.unshare()
    for other in engine.clusters.values():
        if other.protocol.codec_class is cls:
            other.unshare()


class UpstreamConnection(asyncio.Protocol):
    """One connection to an upstream host."""

    __slots__ = (
        "_active",
        "_blocked",
        "acked",
        "buffer",
        "by_id",
        "cap",
        "closed",
        "cluster",
        "codec",
        "connecting",
        "drain_keys",
        "drained",
        "engine",
        "established",
        "expired",
        "heard",
        "heard_at",
        "held",
        "host",
        "id_checks",
        "id_probes",
        "idle_since",
        "istio",
        "limit_requests",
        "max_id",
        "need",
        "next_id",
        "next_seq",
        "notice_hold",
        "noticed",
        "order",
        "owner",
        "partial_since",
        "peek",
        "pending",
        "ping_due",
        "ping_jitter",
        "ping_sent",
        "queued",
        "reads",
        "retiring",
        "sent",
        "shared",
        "stale",
        "stall_unsent",
        "stalled_since",
        "stream",
        "task",
        "tcp",
        "transport",
        "turn",
        "unlisted",
        "unsent",
        "waiting",
        "whole",
        "write_paused",
    )

    def __init__(self, cluster: Cluster, host: UpstreamHost, owner: Downstream | None) -> None:
        self.cluster = cluster
        self.host = host
        self.owner = owner
        self.engine = cluster.engine
        self.shared = cluster.shared
        codec = cluster.new_codec()
        self.codec: Codec = codec
        self.max_id = codec.max_request_id
        #: The codec's peek_reply when it declares the capability (see _forward).
        self.peek = codec.peek_reply if codec.capabilities.peek_reply else None
        self.transport: asyncio.Transport | None = None
        self.connecting = True
        self.closed = False
        self.write_paused = False
        self._blocked: set[Downstream] = set()
        self.buffer = bytearray()
        self.need = 0
        #: The reads of a large reply being assembled (see ``assembly``).
        self.reads = Reads()
        #: The codec parses an assembled reply itself (``decode_frame``).
        self.whole = parses_whole_frames(codec)
        self.queued: list[bytes | memoryview] = []
        #: Shared mode: requests in flight by wire id.
        self.pending: dict[int, Pending] = {}
        #: Unmatched replies checked for an id the codec did not write (see ``_unmatched``).
        self.id_checks = 0
        #: Requests still to be checked for the id ``encode`` wrote (see ``_check_id``).
        self.id_probes = ENCODE_CHECKS if self.shared else 0
        # Dedicated mode: requests in flight in arrival order and by request id, so that a
        # reply pairs in O(1) with the first request of its id, else with the oldest.
        self.order: OrderedDict[int, Pending] = OrderedDict()
        self.by_id: dict[int, deque[Pending]] = {}
        self.next_seq = 0
        #: Timed-out requests still holding their place in ``order``, or their id in
        #: ``pending`` (a shared connection with few ids; see :meth:`forget`).
        self.stale = 0
        #: The rest of a long read waits for the next turn of the loop (see DECODE_TURN).
        self.turn = False
        #: Bytes of a partial reply held in ``buffer`` (the engine's buffer accounting).
        self.held = 0
        #: When the partial reply at the front started arriving (0: none), for
        #: ``timeouts.frame``.
        self.partial_since = 0.0
        #: Bytes queued or left in the transport for the upstream at the last look (counted
        #: too: an upstream that reads nothing must not hold memory outside the budget).
        self.unsent = 0
        self.next_id = 0
        self.task: asyncio.Task[None] | None = None
        self._active: Counter = cluster.active
        pool = cluster.pool
        #: ``maxRequestsPerConnection`` (0: no limit) and the requests sent so far.
        self.limit_requests = (pool.max_requests_per_connection or 0) if pool else 0
        self.sent = 0
        #: Requests it may carry at once (the cluster's ``stream_cap``; 0: any number), and
        #: a client's own connection's requests waiting for room (see room.py).
        self.cap = cluster.stream_cap
        self.waiting: Queue | None = None
        #: Taking no new requests; closes once nothing is in flight.
        self.retiring = cluster.retired
        #: The upstream sent its codec's drain notice on it (later ones change nothing), and
        #: the end of the hold on the connection that keeps its endpoint avoided until the
        #: upstream closes it (``timeouts.upstreamDrain``; ``None``: not held, or no more;
        #: see :meth:`_drain_notice`).
        self.noticed = False
        self.notice_hold: asyncio.TimerHandle | None = None
        #: While held: the endpoints whose drain it keeps (engine-wide, endpoint_drains.py).
        self.drain_keys: tuple[str, ...] = ()
        #: When the connection last had nothing in flight (for ``idleTimeout``), 0: busy.
        self.idle_since = 0.0
        #: When it was established (0: not yet), for ``maxConnectionDuration`` and pings.
        self.established = 0.0
        #: Pings (``spec.upstream.heartbeat``, codecs with heartbeat requests): when the
        #: sweep looks at the connection next (infinite: never, its codec builds none), when
        #: the ping waiting for its answer was sent (0: none waits), whether a message (any
        #: reply, heartbeat or frame the codec refused) arrived since the sweep last looked,
        #: and when the last one did as the sweep knows it (see :meth:`heartbeat_sweep`).
        self.ping_due = 0.0 if codec.active_capabilities.heartbeat_request else math.inf
        #: The share of ``interval`` added to this connection's (Envoy's keepalive
        #: ``interval_jitter``): connections that went quiet together are due apart.
        self.ping_jitter = 1.0 + PING_JITTER * random.random()
        self.ping_sent = 0.0
        self.heard = False
        self.heard_at = 0.0
        # The write watch of the engine's sweep (see :meth:`write_sweep`): since when the
        # unsent bytes made no progress (0: none unsent, or progress at the last sweep), the
        # kernel's count of bytes the upstream acknowledged and the unsent bytes then, whether
        # the transport drained below its low-water mark since, and whether a request timed
        # out here since the upstream last took anything.
        self.stalled_since = 0.0
        self.acked = -1
        self.stall_unsent = 0
        #: Idle, but left out of the engine's idle list, still connecting or with bytes unsent
        #: when a reclaim looked at it: the sweep lists it again once nothing is unsent (see
        #: ``Engine.reclaim_upstream``).
        self.unlisted = False
        self.drained = False
        self.expired = False
        #: Its TLS identities in Istio's series (``None``: plain text; set by a TLS
        #: connection once its handshake is done).
        self.istio: Identities | None = None
        #: The stream this connection carries alone (see ``streams``; ``None``: requests).
        self.stream: Stream | None = None
        istio = self.engine.istio
        #: Istio's TCP series for this endpoint (``None``: Istio metrics are off, or not
        #: yet: at the client side a TLS connection's name the server's identity).
        self.tcp = (
            None
            if istio is None or (type(self) is not UpstreamConnection and not istio.inbound)
            else istio.tcp(cluster.service, cluster.namespace, host.labels)
        )

    # -- connecting ----------------------------------------------------------------------------

    def connect(self) -> None:
        """Start connecting; requests sent meanwhile are queued."""
        self.engine.upstreams.add(self)
        self.cluster.connections += 1
        self.cluster.opening.add(self)
        self.task = self.engine.loop.create_task(self._connect())

    async def _connect(self) -> None:
        loop = self.engine.loop
        host = self.host
        try:
            # A timeout of this task's own, not wait_for's: that wraps the connect in a second
            # task (and a future), paid by every stream's connection.
            async with asyncio.timeout(self.cluster.connect_timeout):
                tunnel = self.cluster.tunnel
                if tunnel is None:
                    await loop.create_connection(lambda: self, host.address, host.port)
                else:  # the tunnel opens within the connect timeout (see tunnel.py)
                    raw, rest = await open_tunnel(loop, host.address, host.port, tunnel)
                    hand_over(raw, self, rest)
        except (OSError, TimeoutError, TunnelRefused) as exc:
            if not self.connecting:
                # Made just as the timeout fired: a connection (one outcome per attempt),
                # which the cancelled connect closed. asyncio's loop tells connection_lost;
                # uvloop's closes the socket without a word (the connection stayed in the
                # pool, dead: every request to the endpoint waited for its timeout), so
                # connection_lost is called here, once for both.
                self.connection_lost(None)
                return
            self._connect_failed(connect_error(exc))
        finally:
            self.task = None

    def _opened(self) -> None:
        """It is no longer opening (connected, or closed): its requests stop counting as
        waiting for a connection (``Cluster.opening_requests``)."""
        cluster = self.cluster
        opening = cluster.opening
        if self in opening:
            opening.remove(self)
            cluster.opening_requests -= len(self.pending) + len(self.order)

    def _connect_failed(self, reason: str) -> None:
        """Connecting failed: count it, and answer the requests queued meanwhile."""
        self.cluster.connect_errors.value += 1
        self._finish_close(
            ErrorType.UpstreamConnectFailure,
            f"cannot connect to {self.host.key} ({self.cluster.name}): {reason}",
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not inherit from asyncio.Transport: no isinstance check.
        self.transport = transport = cast(asyncio.Transport, transport)
        self._opened()
        self.connecting = False
        self.cluster.connects.value += 1
        if self.tcp is not None:
            self.tcp.opened.value += 1
        pool = self.cluster.pool
        if pool is not None and pool.keepalive is not None:
            _keepalive(
                transport, pool.keepalive.probes, pool.keepalive.time, pool.keepalive.interval
            )
        self.established = self.heard_at = self.engine.loop.time()
        self._active.value += 1
        if self.closed:  # closed while connecting
            transport.close()
            return
        if self.cluster.proxy_protocol is not None:
            self._preface(transport)
        if self.queued:
            transport.writelines(self.queued)
            self.queued = []
            self.account_unsent()
        if self.stream is not None:
            self.stream.connected()

    def proxy_header(self) -> bytes:
        """The PROXY protocol header naming the client this connection carries (its
        cluster's ``proxyProtocol`` version; see proxy_protocol.py)."""
        spec = self.cluster.proxy_protocol
        assert spec is not None  # asked for by a cluster with one only
        return client_header(spec.version, self.owner)

    def _preface(self, transport: asyncio.Transport) -> None:
        """Write the PROXY protocol header first (a TLS connection wrote it under its TLS
        layer, before the handshake)."""
        transport.write(self.proxy_header())

    # -- sending -------------------------------------------------------------------------------

    def _free_id(self) -> int:
        """The connection's next id that no request waits for (shared connections), from
        1 to the codec's ``max_request_id``, round. Once they wrapped around, any unmatched
        reply may be a late one: ``_unmatched`` checks no more of them. Every id in flight
        (a codec with few ids): a ``CodecError``, the request answered (it searched for a
        free id forever, and the event loop with it)."""
        wire_id = self.next_id + 1
        pending = self.pending
        max_id = self.max_id
        if len(pending) >= max_id:
            raise CodecError(
                f"no free request id on the upstream connection: all {max_id} ids of the "
                "codec (its max_request_id) are in flight"
            )
        while wire_id > max_id or wire_id in pending:
            if wire_id > max_id:
                wire_id = 1
                self.id_checks = ID_CHECKS
            else:
                wire_id += 1
        return wire_id

    def send(self, p: Pending, mutation: Mutation | None) -> None:
        """Encode and send a request that expects a response.

        A codec error from ``encode`` propagates with nothing registered or queued.
        """
        request = p.request
        if self.shared:
            wire_id = self.next_id + 1  # _free_id's first candidate, checked without the call
            if wire_id > self.max_id or wire_id in self.pending:  # ids wrapped around
                wire_id = self._free_id()
            encoded = self.codec.encode(request, mutation, request_id=wire_id)
            # The first few requests of the connection only, whose own id is another (one
            # that is the same tells nothing, and its reply cannot go astray).
            if self.id_probes and wire_id != request.request_id:
                self._check_id(encoded, wire_id)
            self.next_id = wire_id
            p.wire_id = wire_id
            p.mutation = mutation  # what it was sent with, should its id be questioned
            self.pending[wire_id] = p
        else:
            encoded = self.codec.encode(request, mutation)
            self.next_seq = p.seq = self.next_seq + 1
            self.order[p.seq] = p
            same = self.by_id.get(p.wire_id)
            if same is None:
                self.by_id[p.wire_id] = deque((p,))
            else:
                same.append(p)
        if type(encoded) is bytes:  # the usual case of _queue, without its calls
            queued = self.queued
            if not queued and self.transport is not None and not self.closed:
                self.engine.loop.call_soon(self._flush)
            queued.append(encoded)
            self.unsent += p.size
            self.engine.buffered += p.size
        else:
            self._queue(encoded, p.size)
        if self.tcp is not None:
            self.tcp.sent.value += p.size  # the frame's size (a mutation may change it a little)
        if self.connecting:
            self.cluster.opening_requests += 1
        if self.limit_requests:
            self.sent += 1
            if self.sent >= self.limit_requests:
                self.cluster.closed_by("max_requests")
                self.retire()

    def _check_id(self, encoded: Encoded, wire_id: int) -> None:
        """Decode ``encoded`` (a request encoded with ``request_id=wire_id``) with a fresh
        codec of the connection's class and raise :class:`IdNotWritten` when the id it
        carries is another (see :func:`unshare`). Only a decoded id says so: a frame the
        fresh codec cannot read, or one it cannot be built for, is no verdict (the check is
        spent all the same: the cost stays per connection)."""
        self.id_probes -= 1
        frame = encoded if type(encoded) is bytes else join_encoded(encoded)
        try:
            message = self.cluster.new_codec().decode(bytearray(frame))
        except Exception:  # CodecUnavailable (counted as such), or decode's: no verdict
            return
        if not isinstance(message, Metadata) or message.request_id == wire_id:
            return
        self.id_probes = 0
        unshare(
            self.engine,
            self.codec,
            self.cluster,
            f"a request on cluster {self.cluster.name} was encoded with id "
            f"{message.request_id}, not the id {wire_id} encode was asked to write: answered "
            "locally, not sent",
        )
        raise IdNotWritten("the codec did not write the request id it was given")

    def full(self) -> bool:
        """Whether it carries :attr:`cap` requests (a timed-out request's place counts where
        it is kept, see :meth:`forget`: its upstream may still be working on it)."""
        return len(self.pending if self.shared else self.order) >= self.cap

    def retire(self) -> None:
        """Take no new requests (the next one opens a fresh connection); close once the
        requests in flight are answered."""
        if self.retiring:
            return
        self.retiring = True
        host = self.host
        if self in host.conns:
            host.conns.remove(self)
            if host.roomy is not None:
                host.roomy.pop(self, None)
            if self.cap and not self.closed:
                if host.leaving is None:
                    host.leaving = set()
                host.leaving.add(self)
        if self.owner is not None:
            self.owner.upstream_closed(self)
        if self.waiting:
            self._move_waiting()
        self._close_if_idle()

    def idle_sweep(self, now: float, idle_timeout: float) -> None:
        """Close the connection after ``idle_timeout`` with nothing in flight (engine sweep;
        ``http.idleTimeout``, else ``tcp.idleTimeout``). A stream's connection has its own
        idle clock (``timeouts.streamIdle``)."""
        if self.stream is not None:
            return
        if len(self.pending) + len(self.order) > self.stale or self.connecting:
            self.idle_since = 0.0
        elif not self.idle_since:
            self.idle_since = now
        elif now - self.idle_since >= idle_timeout and not self.closed:
            self.cluster.closed_by("idle")
            self.retire()
            self.close()

    def lifetime_sweep(self, now: float, max_duration: float) -> None:
        """Retire the connection once it has been established for ``max_duration``
        (``tcp.maxConnectionDuration``; engine sweep): it takes no new requests, the
        requests in flight on it are answered, and it closes after the last of them. One
        already closed for another reason (its client left; a TLS connection waits for the
        upstream's ``close_notify`` meanwhile) is not counted."""
        if (
            self.established
            and not self.retiring
            and not self.closed
            and now - self.established >= max_duration
        ):
            self.cluster.closed_by("max_connection_duration")
            self.retire()

    def write_sweep(self, now: float, timeout: float, unsent: int) -> bool:
        """Abort the connection when the ``unsent`` bytes it holds made no progress for
        ``timeout`` (``timeouts.upstreamWrite``), or made none since the last sweep while
        every request that was waiting behind them has gone (timed out): an upstream that
        reads nothing would otherwise keep them, and the clients blocked on it, until it
        closes. A connection closing (retired, idle) waits for its bytes to be sent: one
        that took none since the last sweep is aborted too. ``True``: aborted (it holds
        nothing now). Called by the engine's sweep for connections with bytes unsent only,
        so it costs nothing while the upstreams read.

        Progress is any byte the upstream took: the kernel's count of acknowledged bytes
        (``TCP_INFO``, where the platform has it), fewer bytes unsent than at the last sweep,
        or a drain below the transport's low-water mark meanwhile. A slow reader that takes a
        few bytes between two sweeps restarts the clock; one that reads nothing does not.
        """
        transport = self.transport
        if transport is None:
            return False
        acked = _acked_bytes(transport)
        if not self.stalled_since:
            self.stalled_since = now  # the first look: progress is known from the next one
        elif (
            self.drained
            or unsent < self.stall_unsent
            or (acked is not None and acked != self.acked)
        ):
            self.stalled_since = now
            self.expired = False
        elif now - self.stalled_since >= timeout:
            self.give_up(
                "write_timeout",
                ErrorType.UpstreamReset,
                f"upstream {self.host.key} took none of {unsent} bytes in {timeout:g}s",
            )
            return True
        elif self.closed or (self.expired and len(self.pending) + len(self.order) == self.stale):
            why = "the connection closed" if self.closed else "its requests timed out"
            self.give_up(
                "write_abandoned",
                ErrorType.UpstreamReset,
                f"upstream {self.host.key} took none of {unsent} bytes before {why}",
            )
            return True
        self.acked = -1 if acked is None else acked
        self.stall_unsent = unsent
        self.drained = False
        return False

    def heartbeat_sweep(self, now: float, interval: float, timeout: float) -> None:
        """Pings (engine sweep, when :attr:`ping_due`): a connection on which no message
        arrived for ``interval`` is sent its codec's heartbeat request, and one on which
        none then arrives within ``timeout`` is aborted (its requests in flight get
        ``UpstreamReset``), as RPC clients ping their servers: an idle
        connection stays open past the peer's idle check, and a peer that is gone is found
        before a request waits for it. A message is any the codec decoded (a reply, a
        heartbeat, one it refused), as any HTTP/2 frame answers Envoy's keepalive: bytes
        that make none (a peer trickling a frame, or TLS records without data) are no
        answer. The data path only notes that one came (:attr:`heard`); when, the sweep
        takes from the kernel (``TCP_INFO``: when data last arrived) where the platform
        tells, else the time it looks. A stream's connection is left to
        ``timeouts.streamIdle``; one whose upstream takes nothing of what it is sent, to
        ``timeouts.upstreamWrite``. The interval is this connection's (:attr:`ping_jitter`)."""
        interval *= self.ping_jitter
        transport = self.transport
        if transport is None or not self.established or self.closed or self.stream is not None:
            self.ping_due = now + interval  # not yet, or never again
            return
        if self.heard:
            self.heard = False
            self.ping_sent = 0.0  # answered
            quiet = _quiet_for(transport)
            self.heard_at = now if quiet is None else now - min(quiet, now - self.heard_at)
        elif self.ping_sent:
            if now - self.ping_sent >= timeout:
                self.give_up(
                    "heartbeat_timeout",
                    ErrorType.UpstreamReset,
                    f"upstream {self.host.key} answered no heartbeat within {timeout:g}s",
                )
            else:
                self.ping_due = self.ping_sent + timeout
            return
        if now - self.heard_at < interval:
            self.ping_due = self.heard_at + interval
            return
        if self.write_paused:  # it takes nothing: timeouts.upstreamWrite is for that
            self.ping_due = now + interval
            return
        try:
            wire_id = self._free_id()
        except CodecError:  # every id in flight: their replies or timeouts decide
            self.ping_due = now + interval
            return
        codec = self.codec
        try:
            ping = codec.heartbeat_request(wire_id)
            if not ping:
                raise ValueError("heartbeat_request() returned nothing")
        except Exception as exc:  # a bug in the codec (every id has a ping): no more pings
            self.engine.codec_bugs.report(
                codec, "heartbeat_request", exc, "no heartbeats sent", strict=True
            )
            self.ping_due = math.inf
            return
        if self.shared:
            self.next_id = wire_id
        self._queue(ping, len(ping))
        self.cluster.count_ping()
        self.ping_sent = now
        self.ping_due = now + timeout

    def writes_caught_up(self) -> None:
        """Nothing is unsent (engine sweep): the write watch starts afresh, and a connection
        a reclaim passed over for its unsent bytes is listed as idle again."""
        self.stalled_since = 0.0
        self.expired = False
        if self.unlisted:
            self.unlisted = False
            self._listed_idle()

    def _listed_idle(self) -> None:
        """A client's own connection with nothing in flight: last in the engine's idle list
        (the longest idle are reclaimed first when the budget is spent)."""
        if (
            not (self.closed or self.retiring or self.shared)
            and len(self.order) == self.stale
            and self.stream is None
        ):
            idle = self.engine.idle_upstreams
            idle[self] = None
            idle.move_to_end(self)

    @property
    def in_flight(self) -> bool:
        """Whether requests wait for their replies on it (those timed out aside)."""
        return len(self.pending) + len(self.order) != self.stale

    def _close_if_idle(self) -> None:
        # A stream's connection closes when its stream ends (retired, it takes no other); one
        # that carried a drain notice is held open for the upstream to close (see
        # _drain_notice).
        if (
            self.retiring
            and len(self.pending) + len(self.order) == self.stale
            and self.stream is None
            and self.notice_hold is None
        ):
            self.close()

    def send_oneway(self, request: Metadata, mutation: Mutation | None) -> None:
        """Encode and send a request that gets no response.

        On a shared connection it gets a fresh id of the connection's too, one no request
        waits for: an upstream that answers it anyway then answers nobody, not whichever
        request has the client's id on this connection."""
        if self.shared:
            wire_id = self._free_id()
            encoded = self.codec.encode(request, mutation, request_id=wire_id)
            if self.id_probes and wire_id != request.request_id:
                self._check_id(encoded, wire_id)
            self.next_id = wire_id
        else:
            encoded = self.codec.encode(request, mutation)
            self._listed_idle()  # used now: the last to be reclaimed (when nothing waits)
        self._queue(encoded, len(request.frame))
        if self.tcp is not None:
            self.tcp.sent.value += len(request.frame)

    def send_frame(self, encoded: Encoded, size: int | None = None) -> None:
        """Send a frame of this connection's stream as it is (``size``: its length, when
        ``encoded`` is several buffers)."""
        if size is None:
            size = len(cast(bytes, encoded))
        self._queue(encoded, size)
        if self.tcp is not None:
            self.tcp.sent.value += size

    def close_after_writes(self) -> None:
        """Close once what is queued is written (now, or once connected)."""
        self.retiring = True
        if self.transport is not None and not self.closed:
            self._flush()
            self.close()

    def writable(self) -> None:
        """The clients waiting for this connection may send again (it connected and its
        writing is not paused)."""
        self._release_blocked()

    def pause_reading(self) -> None:
        """Read nothing more from the upstream until :meth:`resume_reading`."""
        transport = self.transport
        if transport is not None and not self.closed:
            transport.pause_reading()

    def resume_reading(self) -> None:
        """Read from the upstream again (once the rest of a long read is decoded)."""
        transport = self.transport
        if transport is not None and not self.closed and not self.turn:
            transport.resume_reading()

    def _queue(self, encoded: Encoded, size: int) -> None:
        # Writes are corked until the loop has delivered everything it read: one syscall for
        # all the requests that arrived together from many downstream connections.
        if not self.queued and self.transport is not None and not self.closed:
            self.engine.loop.call_soon(self._flush)
        append_encoded(self.queued, encoded, size)
        self.unsent += size  # until _flush measures what the transport kept
        self.engine.buffered += size

    def _flush(self) -> None:
        queued = self.queued
        transport = self.transport
        if queued and transport is not None and not self.closed:
            self.queued = []
            transport.writelines(queued)
            unsent = transport.get_write_buffer_size()  # account_unsent, inline: hot path
            self.engine.buffered += unsent - self.unsent
            self.unsent = unsent

    def account_unsent(self) -> int:
        """Recount the bytes waiting for the upstream (queued, or in the transport)."""
        transport = self.transport
        unsent = sum(len(b) for b in self.queued) if self.queued else 0
        if transport is not None:
            unsent += transport.get_write_buffer_size()
        self.engine.buffered += unsent - self.unsent
        self.unsent = unsent
        return unsent

    def forget(self, p: Pending) -> None:
        """Stop waiting for ``p`` (timed out, already answered locally): a late response is
        dropped.

        Dedicated mode keeps its place, so that a late reply paired by arrival order is not
        given to a later request, but drops its frame (as does a shared connection whose
        codec has few ids, ``Cluster.few_ids``: its id is not given to another request until
        the late reply comes); past ``STALE_LIMIT`` such places (with a cap of requests per
        connection, once they are all of its places) the connection takes no new requests
        (the next one opens a fresh connection) and closes once the requests still live on
        it are answered.
        """
        p.done = True
        self.expired = True  # for the write watch (see write_sweep)
        if self.shared:
            if not self.cluster.few_ids:
                if self.pending.pop(p.wire_id, None) is not None and self.connecting:
                    self.cluster.opening_requests -= 1
            elif self.pending.get(p.wire_id) is p:
                # Its id stays taken until its late reply (dropped) or the connection's
                # end: given to another request, the reply would answer that one.
                self.stale += 1
                if self.stale >= self.cap:
                    self.retire()  # every place held by late ones: a fresh connection
            if self.cap:
                self._room_made()
            self._close_if_idle()  # a retiring connection's last request may time out
            return
        if p.seq in self.order:
            p.request = RELEASED
            self.stale += 1
            if self.stale > STALE_LIMIT or (self.cap and self.stale >= self.cap):
                # (Every place of a capped connection held by timed-out requests: the
                # requests waiting for room, and those that come later, go to a fresh
                # connection, as Envoy's HTTP/1 pool closes one on a timeout.)
                self.retire()
            elif len(self.order) == self.stale:
                self._listed_idle()
        self._close_if_idle()

    # -- receiving -----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.tcp is not None:
            self.tcp.received.value += len(data)
        if self.need > LARGE_FRAME:
            self._assemble(data)
            return
        buffer = self.buffer
        buffer += data
        if len(buffer) < self.need:
            self._partial(False)
            return
        if self.stream is not None:
            self._stream_read(self.stream)
            return
        start = len(buffer)
        codec = self.codec
        shared = self.shared
        pending = self.pending
        peek = self.peek
        batch: list[Downstream] = []
        failed: CodecError | None = None
        left = DECODE_TURN
        while buffer:
            if not left and self.transport is not None:  # the rest at the next turn
                self.need = 0
                self._next_turn()
                break
            left -= 1
            if peek is not None:
                try:
                    head = peek(buffer)
                except Exception as exc:  # a bug in the codec: as a reply it refuses
                    failed = self._codec_failed("peek_reply", exc)
                    break
                if head is not None and self._forward(head, batch):
                    continue
            else:
                head = None
            try:
                message = codec.decode(buffer)
            except CodecError as exc:
                if self._refused(exc, head, batch):
                    continue
                failed = exc
                break
            except Exception as exc:  # a bug in the codec: as a reply it refuses
                failed = self._codec_failed("decode", exc)
                break
            if not isinstance(message, Metadata):
                self.need = message.needed
                break
            kind = message.message_type
            if kind is _RESPONSE or kind is _ERROR:
                if shared:
                    p = pending.pop(message.request_id, None)
                    if p is not None and p.done:  # a late reply (few ids: see forget)
                        self.stale -= 1
                        p = None
                else:
                    p = self._match(message.request_id)
                if p is not None:
                    p.downstream.finish(p, message, batch)
                else:
                    self._unmatched(message.request_id)
            elif kind is _HEARTBEAT:
                self._heartbeat(message)
            else:  # a request, one-way or stream frame: an upstream sends none of them
                self.cluster.unmatched_reply()
        else:
            self.need = 0
        if len(buffer) != start:
            self.heard = True  # a message came (for pings: see heartbeat_sweep)
        for downstream in batch:  # first: the replies read leave before any error
            downstream.flush()
        if self.cap:  # replies made room (see room.py)
            self._room_made()
        if self.retiring or failed is not None:
            self._after_read(failed)
        if self.turn:
            self._account_held()  # the rest is held: counted in the buffer budget
        elif (buffer or self.held) and not self.closed:
            self._partial(len(buffer) != start)

    def _next_turn(self) -> None:
        """``DECODE_TURN`` frames of a long read are decoded: the rest waits for the next turn
        of the event loop, reading paused meanwhile (so no further read comes first)."""
        if not self.turn:
            self.turn = True
            self.pause_reading()
            self.engine.loop.call_soon(self._take_turn)

    def _take_turn(self) -> None:
        """Decode what :meth:`_next_turn` left, then read again (a stream's connection: only
        while its client reads, see ``pause_streams``)."""
        self.turn = False
        if self.closed:
            return
        self.data_received(b"")
        stream = self.stream
        if not (self.turn or (stream is not None and stream.downstream.write_paused)):
            self.resume_reading()

    def _stream_read(self, stream: Stream) -> None:
        """The frames read on a stream's connection: each goes to the stream, as it came."""
        buffer = self.buffer
        start = len(buffer)
        codec = self.codec
        left = DECODE_TURN
        while buffer:
            if not left and self.transport is not None:  # the rest at the next turn
                self.need = 0
                self._next_turn()
                break
            left -= 1
            try:
                message = codec.decode(buffer)
            except CodecError as exc:
                self._stream_refused(exc)
                return
            except Exception as exc:  # a bug in the codec: as a frame it refuses
                self._stream_refused(self._codec_failed("decode", exc))
                return
            if not isinstance(message, Metadata):
                self.need = message.needed
                break
            self._stream_frame(stream, message)
            if self.closed:  # the stream ended: what it sent the client still goes
                break
        else:
            self.need = 0
        stream.downstream.flush()
        if self.turn:
            self._account_held()  # the rest is held: counted in the buffer budget
        elif (buffer or self.held) and not self.closed:
            self._partial(len(buffer) != start)

    def _stream_frame(self, stream: Stream, message: Metadata) -> None:
        if message.message_type is _HEARTBEAT:
            self._heartbeat(message)
        else:
            stream.from_upstream(message)

    def _stream_refused(self, exc: CodecError) -> None:
        """The codec refused what the stream's upstream sent: the stream is reset."""
        self.cluster.decode_errors.value += 1
        self.abort(ErrorType.BadResponse, f"bad frame from upstream: {exc}")

    def _drain_notice(self) -> None:
        """The upstream said it is closing the connection (its codec's drain notice, as a
        server sends when it shuts down): the connection takes no new
        requests (they go to a fresh connection) and those in flight are answered on it. It
        stays open, and its endpoint avoided by the balancer of every cluster with it
        (picked only when every other is avoided too), until the upstream closes it: a
        server that announced its drain may refuse the next connections until then. At most
        ``timeouts.upstreamDrain``: then it closes once nothing is in flight, and the
        endpoint is picked again.

        One connection per endpoint is held, engine-wide: a notice on another connection to
        an endpoint already draining (of any cluster) retires it as usual (it closes once
        nothing is in flight), so that an upstream that sends one on every connection it is
        offered holds one connection, not one per request for the whole hold, and each
        later notice costs no walk over the clusters holding the endpoint."""
        if self.noticed or self.closed:
            return
        self.noticed = True
        self.cluster.drain_noticed()
        engine = self.engine
        began = engine.drains.begin(self, self._endpoints())
        if began:
            self.drain_keys = began
            self.notice_hold = engine.loop.call_later(
                engine.upstream_drain_timeout, self._hold_over
            )
            engine.rebalances += 1  # /config_dump shows the endpoints draining
        self.retire()

    def _endpoints(self) -> tuple[str, ...]:
        """The identities of the server that sent the notice: its host's, and, without a
        tunnel, the address the connection reached, where that differs (a host name's)."""
        key = self.host.endpoint
        transport = self.transport
        if self.cluster.tunnel is not None or transport is None:
            return (key,)
        peer = transport.get_extra_info("peername")
        if not isinstance(peer, tuple) or len(peer) < 2:
            return (key,)
        try:
            reached = endpoint_identity(str(peer[0]), int(peer[1]))
        except ValueError:  # not an IP address (another kind of socket)
            return (key,)
        return (key,) if reached == key else (key, reached)

    def _drain_over(self) -> None:
        """The hold ended: the endpoints it kept avoided are picked again."""
        keys = self.drain_keys
        if keys:
            self.drain_keys = ()
            self.engine.drains.end(self, keys)
            self.engine.rebalances += 1

    def _hold_over(self) -> None:
        """``timeouts.upstreamDrain`` passed since the drain notice and the upstream did not
        close the connection: the engine does, once nothing is in flight."""
        self.notice_hold = None
        self._drain_over()
        self.cluster.closed_by("drain_timeout")
        self._close_if_idle()

    def _codec_failed(self, method: str, exc: Exception) -> CodecError:
        """The codec raised ``exc`` from ``method``, not a ``CodecError``: a bug in it (see
        ``codec_bugs``). Counted and logged; what to do with the connection is the
        caller's, as for a reply the codec refuses without ``frame_size`` (the error
        returned, whose text names only the exception's type: it may quote wire bytes)."""
        outcome = f"upstream connection to {self.host.key} reset"
        return CodecError(self.engine.codec_bugs.report(self.codec, method, exc, outcome))

    def _after_read(self, failed: CodecError | None) -> None:
        """After the replies a read completed were written: retire, or give up on a bad
        reply."""
        if self.retiring:
            self._close_if_idle()
        if failed is not None:
            # Reset, out of the pool first (as by give_up): a retry of its requests goes to a
            # fresh connection, and nothing more is written to an upstream nobody can read.
            self.cluster.decode_errors.value += 1
            self.abort(ErrorType.BadResponse, f"bad response from upstream: {failed}")

    def _heartbeat(self, message: Metadata) -> None:
        """Answer the upstream's heartbeat, unless it does not read what it was sent (its
        write buffer is full): one reply per ping would then pile up without end. A drain
        notice is no heartbeat: see :meth:`_drain_notice`."""
        codec = self.codec
        if codec.active_capabilities.drain_notice:
            try:
                notice = codec.is_drain_notice(message)
            except Exception as exc:  # a bug in the codec: taken as the heartbeat it is
                self.engine.codec_bugs.report(
                    codec, "is_drain_notice", exc, "taken as no notice", strict=True
                )
                notice = False
            if notice:
                self._drain_notice()
                return
        self.cluster.heartbeats.value += 1
        if self.write_paused:
            return
        try:
            reply = self.codec.heartbeat_reply(message)
        except Exception as exc:  # a bug in the codec: no reply, the connection goes on
            self.engine.codec_bugs.report(self.codec, "heartbeat_reply", exc, "not answered")
            return
        if reply and self.transport is not None:
            self.transport.write(reply)
            self.account_unsent()

    def _assemble(self, data: bytes) -> None:
        """A read of the large reply at the front: kept until the reply is whole, then
        decoded (the reads joined once); what follows it goes on as usual."""
        reads = self.reads
        if not reads.size and len(self.buffer) >= self.need:
            # The codec asked for no more than it had (it fails the kit's needed check):
            # decode as usual.
            self.buffer += data
            self.need = 0
            self.data_received(b"")
            return
        if len(self.buffer) + reads.add(data) < self.need:
            self._partial(False)
            return
        frame, self.buffer = reads.join(self.buffer, self.need, self.whole)
        self.need = 0
        self.partial_since = 0.0  # what follows the reply starts anew
        if frame is not None:
            self._decode_frame(frame)
        if not self.closed:
            self.data_received(b"")  # decodes the buffer: the reply itself, or what followed

    def _decode_frame(self, frame: bytes) -> None:
        """An assembled reply, for a codec that parses it whole."""
        self._account_held()
        stream = self.stream
        if stream is not None:
            try:
                message = self.codec.decode_frame(frame)
            except CodecError as exc:
                self._stream_refused(exc)
                return
            except Exception as exc:  # a bug in the codec: as a frame it refuses
                self._stream_refused(self._codec_failed("decode_frame", exc))
                return
            self._stream_frame(stream, message)
            stream.downstream.flush()
            return
        self.heard = True  # for pings (see heartbeat_sweep)
        batch: list[Downstream] = []
        try:
            message = self.codec.decode_frame(frame)
        except CodecError as exc:  # only that reply is lost when the codec says whose it is
            refused = exc.frame_size == len(frame) and self._answer_refused(exc)
            self._after_read(None if refused else exc)
            return
        except Exception as exc:  # a bug in the codec: as a reply it refuses
            self._after_read(self._codec_failed("decode_frame", exc))
            return
        kind = message.message_type
        if kind is _RESPONSE or kind is _ERROR:
            p = self._match(message.request_id)
            if p is not None:
                p.downstream.finish(p, message, batch)
            else:
                self._unmatched(message.request_id)
        elif kind is _HEARTBEAT:
            self._heartbeat(message)
        else:
            self.cluster.unmatched_reply()
        for downstream in batch:
            downstream.flush()
        if self.cap:
            self._room_made()
        self._after_read(None)

    def _account_held(self) -> None:
        held = len(self.buffer) + self.reads.size
        self.engine.buffered += held - self.held
        self.held = held

    def _partial(self, consumed: bool) -> None:
        """After a read that leaves (or left) a partial reply in the buffer: account for it,
        note when it started (``timeouts.frame``), and on a dedicated connection cut it off
        when it grows past ``connectionBufferBytes`` while the process is over its buffer
        budget, as a client's partial request is. A shared connection is not cut: it carries
        every client's replies (a client that reads nothing would fail them all), and there
        are only ``connectionsPerEndpoint`` per endpoint."""
        self._account_held()
        if not self.held:
            self.partial_since = 0.0
            return
        engine = self.engine
        if consumed or not self.partial_since:
            self.partial_since = engine.loop.time()  # a new reply started in this read
        if (
            self.owner is not None
            and self.held > engine.connection_buffer
            and engine.buffered > engine.max_buffered
        ):
            self.give_up(
                "overload",
                ErrorType.OverLimit,
                f"proxy overloaded: a partial reply of {self.held} bytes from upstream "
                f"{self.host.key} cut off ({engine.buffered} bytes buffered, limit "
                f"{engine.max_buffered})",
            )

    def check_partial(self, now: float) -> bool:
        """Close the connection when the partial reply at the front is older than
        ``timeouts.frame`` (engine sweep): the replies behind it could never arrive.
        ``True``: closed. While the engine does not read it (a stream whose client does not
        read), the rest cannot arrive: the clock starts afresh at each sweep."""
        timeout = self.engine.frame_timeout
        transport = self.transport
        if transport is not None and not transport.is_reading():
            self.partial_since = now
            return False
        if self.partial_since and not self.closed and now - self.partial_since > timeout:
            self.give_up(
                "frame_timeout",
                ErrorType.UpstreamReset,
                f"upstream {self.host.key} sent part of a reply and not the rest within "
                f"{timeout:g}s",
            )
            return True
        return False

    def give_up(self, reason: str, error: ErrorType, message: str) -> None:
        """Close the connection for ``reason`` (a limit the engine enforces, counted by
        cluster) and answer what is in flight on it with ``error``. It is out of the pool
        first, so that a retry goes to a fresh connection. It is aborted, not closed: its
        requests are answered, and a graceful close would wait for the upstream to take what
        is still queued for it, for good if it reads nothing. Everything it held is released
        at once (the engine's sweep recounts right after); ``connection_lost`` finds nothing
        left."""
        self.cluster.closed_by(reason)
        self.abort(error, message)

    def abort(self, error: ErrorType, message: str) -> None:
        """Reset the connection now, dropping what it could not send, and answer what is in
        flight on it with ``error`` (a drain's deadline; a limit, through :meth:`give_up`)."""
        self.closed = True
        self.stalled_since = 0.0
        if self.transport is not None:
            self.transport.abort()
        elif self.task is not None:  # still connecting
            self.task.cancel()
            self.task = None
        self._finish_close(error, message)

    def _refused(self, exc: CodecError, head: ReplyHead | None, batch: list[Downstream]) -> bool:
        """The codec refused the reply at the front of the buffer. When it said where the reply
        ends (``frame_size``) and whose it is (``metadata``), only that reply is lost: it is
        dropped and its request answered ``BadResponse``, and the connection goes on (as for a
        client's bad frame). When ``peek_reply`` had passed the same reply (``head``: it was
        decoded only for a response mutation or a response filter), it goes out unchanged
        instead, as a reply that cannot carry a mutation does. ``False``: the stream cannot go
        on."""
        size = exc.frame_size
        buffer = self.buffer
        if size is None or not 0 < size <= len(buffer) or exc.metadata is None:
            return False
        if head is not None and head[1] == size:
            self.cluster.decode_errors.value += 1
            wire_id, _, status = head
            p = self._match(wire_id)
            frame = take_frame(buffer, size)
            if p is None:
                self.cluster.unmatched_reply()
                return True
            route = p.route
            engine = self.engine
            if route.response_mutation is not None and p.downstream is not engine.mirror_sink:
                # The mutation is what could not be done: counted as one a reply cannot carry.
                cast("Downstream", p.downstream).listener.count_skipped_mutation(route.name)
            p.downstream.forward(p, frame, status, batch)
            return True
        del buffer[:size]
        for downstream in batch:  # the replies before it leave first (the error goes at once)
            downstream.flush()
        batch.clear()
        return self._answer_refused(exc)

    def _answer_refused(self, exc: CodecError) -> bool:
        """Answer the request whose reply the codec refused (``exc.metadata``; the reply is
        already dropped) with ``BadResponse``; ``False`` without its metadata."""
        metadata = exc.metadata
        if metadata is None:
            return False
        self.cluster.decode_errors.value += 1
        kind = metadata.message_type
        if kind is _RESPONSE or kind is _ERROR:
            p = self._match(metadata.request_id)
            if p is not None:
                p.downstream.fail(p, ErrorType.BadResponse, f"bad response from upstream: {exc}")
        return True

    def _forward(self, head: ReplyHead, batch: list[Downstream]) -> bool:
        """Pass on the reply at the front of the buffer without decoding it, when no response
        mutation applies (the codec peeked at it: ``head``). ``False``: decode it instead."""
        wire_id, size, status = head
        if self.shared:
            p = self.pending.pop(wire_id, None)
            if p is not None:
                if p.done:  # a late reply (few ids: see forget)
                    self.stale -= 1
                    p = None
                elif p.route.decode_replies:
                    self.pending[wire_id] = p  # put back for the decode path to find
                    return False
        else:
            p = self._candidate(wire_id)
            if p is not None and not p.done and p.route.decode_replies:
                return False
            p = self._match(wire_id)
        buffer = self.buffer
        if size == len(buffer):  # take_frame's usual case, without the call
            frame = bytes(buffer)
            buffer.clear()
        else:
            frame = take_frame(buffer, size)
        if p is not None:
            p.downstream.forward(p, frame, status, batch)
        else:  # a reply nobody waits for (any more): dropped
            self._unmatched(wire_id)
        return True

    def _unmatched(self, reply_id: int) -> None:
        """Count a reply nobody waits for (it is dropped). On a shared connection, the first
        few are also checked against the requests in flight: a reply carrying the id a
        client gave its request, rather than the one the engine gave it on this connection,
        means the codec's ``encode`` did not write the ``request_id`` it was given (the kit's
        ``mutation_with_request_id`` check) on a request past the first
        :data:`ENCODE_CHECKS` (those are checked as they are sent). That request then waits
        for its timeout: the codec is named in the log and in
        ``metaprotocol_codec_errors_total{method="encode"}``, and its class is served
        dedicated from then on (:func:`unshare`; at most :data:`ID_CHECKS` scans of the
        requests in flight per connection).

        Only an id the engine never gave a request on this connection says so: ids are given
        in order from 1 (:meth:`_free_id`), so one up to ``next_id`` may be the late reply to
        a request that timed out, whose id a client may have given another request too."""
        self.cluster.unmatched_reply()
        if not self.shared or self.id_checks >= ID_CHECKS or reply_id <= self.next_id:
            return
        self.id_checks += 1
        for p in self.pending.values():
            request = p.request
            if request is not RELEASED and request.request_id == reply_id != p.wire_id:
                if self._id_written(p):  # the upstream's own id: any upstream may send one
                    return
                self.id_checks = ID_CHECKS  # once per connection is enough to say it
                unshare(
                    self.engine,
                    self.codec,
                    self.cluster,
                    f"a reply on cluster {self.cluster.name} carried id {reply_id}, the id "
                    f"the client gave its request, not the id {p.wire_id} encode was asked to "
                    "write: requests wait for their timeout, their replies are dropped",
                )
                return

    def _id_written(self, p: Pending) -> bool:
        """Whether the codec writes ``p``'s id on this connection when it encodes ``p``'s
        request again as it was sent (a fresh codec of the connection's class, the same
        mutation), decoded by another: then a reply carrying the client's id is the
        upstream's doing (a hostile upstream may answer with any id), not the codec's bug,
        and must not change how the engine pools every connection of the codec. A request
        the fresh codecs cannot encode or read again is no verdict: ``False``, the reply
        taken as the evidence it was."""
        try:
            encoded = self.cluster.new_codec().encode(p.request, p.mutation, request_id=p.wire_id)
            frame = encoded if type(encoded) is bytes else join_encoded(encoded)
            message = self.cluster.new_codec().decode(bytearray(frame))
        except Exception:  # CodecUnavailable (counted as such), or the codec's: no verdict
            return False
        return isinstance(message, Metadata) and message.request_id == p.wire_id

    def _candidate(self, wire_id: int) -> Pending | None:
        """Dedicated mode: the request a reply with ``wire_id`` pairs with (the first with
        this id, else the oldest, for upstreams that do not echo ids), left in place. Once
        replies from its endpoint were paired by two different ids (on any connection of
        any client) the upstream echoes them: a reply whose id
        no request has answers nobody (an extra or duplicated reply, or one with an id never
        sent), as on a shared connection. Paired with the oldest, it took that request's
        place and every later reply the next one's: the client got one reply twice (the
        real one and a ``Timeout``) and none for another that the stats counted ``Ok``."""
        same = self.by_id.get(wire_id)
        host = self.host
        if same:
            if not host.echoes:
                if host.echoed is None:
                    host.echoed = wire_id
                elif wire_id != host.echoed:
                    host.echoes = True
            return same[0]
        if host.echoes:
            return None
        order = self.order
        return next(iter(order.values())) if order else None

    def _match(self, wire_id: int) -> Pending | None:
        """Take the request a reply with ``wire_id`` answers; ``None`` when nobody waits for
        it any more (timed out) or at all."""
        if self.shared:
            p = self.pending.pop(wire_id, None)
            if p is not None and p.done:  # a late reply (few ids: see forget)
                self.stale -= 1
                return None
            return p
        p = self._candidate(wire_id)
        if p is None:
            return None
        del self.order[p.seq]
        same = self.by_id[p.wire_id]
        if same[0] is p:
            same.popleft()
        else:
            same.remove(p)  # only requests that reused one id: rare and short
        if not same:
            del self.by_id[p.wire_id]
        if p.done:
            self.stale -= 1
        if len(self.order) == self.stale:  # nothing in flight: _listed_idle, inline
            idle = self.engine.idle_upstreams
            idle[self] = None
            idle.move_to_end(self)
        return None if p.done else p

    def _room_made(self) -> None:
        """Replies or a timeout may have made room on a connection with a cap (see room.py):
        a shared one is among its endpoint's connections with room again, and the requests
        waiting for room go."""
        if self.shared:
            host = self.host
            if len(self.pending) < self.cap and not (self.retiring or self.closed):
                host.room(self)
            if host.waiting:
                self.cluster.admit(host)
        elif self.waiting:
            self._admit_own()

    def _admit_own(self) -> None:
        """Send the requests waiting for room on this client's own connection, in order,
        while it has room."""
        waiting = self.waiting
        while waiting and len(self.order) < self.cap and not (self.closed or self.retiring):
            q = waiting.popitem(last=False)[0]
            q.downstream.send_queued(q, self)

    def _take_waiting(self) -> Queue | None:
        """Connecting failed: the requests waiting for room on this connection's endpoint
        (shared) or on it (a client's own), which fail the same way (or are retried), as
        Envoy purges a pool's pending requests on a connect failure (an upstream that
        refuses connections would otherwise fail them one connection's worth at a time)."""
        if self.shared:
            waiting, self.host.waiting = self.host.waiting, None
        else:
            waiting, self.waiting = self.waiting, None
        return waiting

    def _move_waiting(self) -> None:
        """The requests waiting for room on this client's own connection, which closed or
        retired: each tries the client's connection of now (in order)."""
        waiting = self.waiting
        self.waiting = None
        while waiting:
            q = waiting.popitem(last=False)[0]
            q.downstream.requeue(q)

    # -- closing -------------------------------------------------------------------------------

    # -- flow control --------------------------------------------------------------------------

    def pause_writing(self) -> None:
        """The transport's write buffer is full (asyncio flow control)."""
        self.write_paused = True

    def resume_writing(self) -> None:
        """The transport's write buffer drained (asyncio flow control)."""
        self.write_paused = False
        self.drained = True  # progress, for the write watch (see write_sweep)
        self.account_unsent()
        self._release_blocked()

    def add_blocked(self, downstream: Downstream) -> bool:
        """Remember a downstream connection that waits for this one; ``False`` if known."""
        if downstream in self._blocked:
            return False
        self._blocked.add(downstream)
        return True

    def remove_blocked(self, downstream: Downstream) -> None:
        """Forget a downstream connection that waited for this one and went away."""
        self._blocked.discard(downstream)

    def _release_blocked(self) -> None:
        blocked = self._blocked
        if not blocked:  # the usual case (a stream's connection asks at connect and close)
            return
        self._blocked = set()
        for downstream in blocked:
            downstream.unblock(self)

    def eof_received(self) -> bool | None:
        """The upstream ended its stream (a FIN; over TLS, its close_notify): it answers
        nothing more. The transport (or the TLS layer) closes the connection, but only once
        what is unsent is written: to an upstream that reads nothing, the requests in flight
        would wait for that past their route timeout. With requests in flight or bytes
        unsent it is reset instead, and they get ``UpstreamReset`` at once. A stream's
        upstream that closed its side of the stream first (``Stream_Close_One_Way``) only
        half-closed: the connection stays open for the client's frames until the stream ends
        (over plain TCP; the TLS layer closes the connection at a ``close_notify``)."""
        stream = self.stream
        if stream is not None and stream.server_closed and not stream.ended:
            return True
        transport = self.transport
        if transport is not None and (self.pending or self.order or self.account_unsent()):
            transport.abort()  # connection_lost answers them
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:  # told already (see _connect)
            return
        self._active.value -= 1
        if self.tcp is not None:
            self.tcp.closed.value += 1
        self.transport = None
        if self.turn and not self.closed:  # replies read before the loss go first, all now
            self.turn = False
            self.data_received(b"")
        if not self.closed and (self.pending or self.order or self.stream is not None):
            self.cluster.resets.value += 1  # not closed by us, with something in flight
        reason = f": {exc}" if exc else ""
        self._finish_close(ErrorType.UpstreamReset, f"upstream {self.host.key} closed{reason}")

    def close(self) -> None:
        """Close the connection; requests still waiting get ``UpstreamReset``. The transport
        is closed once: asyncio's TLS transport, closed a second time, lets go of its TLS
        layer, and every call on it after raises (an idle connection is retired, which
        closes it, then closed)."""
        if self.closed and self.transport is None:
            return
        self.closed = True
        transport = self.transport
        if transport is not None:
            if not transport.is_closing():
                transport.close()  # connection_lost finishes the job
        elif self.task is not None:
            self.task.cancel()
            self.task = None
            self._finish_close(ErrorType.UpstreamReset, "upstream connection closed")

    def _finish_close(self, error: ErrorType, message: str) -> None:
        if self in self.engine.upstreams:
            self.cluster.connections -= 1
        if self.notice_hold is not None:
            self.notice_hold.cancel()
            self.notice_hold = None
            self._drain_over()
        self._opened()
        self.closed = True
        self.connecting = False
        self.queued = []
        self.buffer = bytearray()
        self.reads.clear()
        self.engine.buffered -= self.held + self.unsent
        self.held = self.unsent = 0
        self.engine.idle_upstreams.pop(self, None)
        host = self.host
        if self in host.conns:
            host.conns.remove(self)
            if host.roomy is not None:
                host.roomy.pop(self, None)
        if host.leaving:
            host.leaving.discard(self)
        if self.owner is not None:
            self.owner.upstream_closed(self)
        self.engine.upstreams.discard(self)
        self.write_paused = False
        self._release_blocked()
        # Taken before the requests in flight fail: their retries may wait here anew.
        purged = self._take_waiting() if error is ErrorType.UpstreamConnectFailure else None
        self._fail_all(error, message)
        if purged:
            while purged:
                q = purged.popitem(last=False)[0]
                q.downstream.room_failed(q, error, message)
        elif self.waiting:
            self._move_waiting()
        elif host.waiting and self.shared:
            self.cluster.admit(host)
        # The stream (ended now) keeps its connection for its counts; the connection lets go
        # of it, so that neither waits for the cycle collector (a stream's connection and its
        # stream each held the other: some 13 objects per stream left to the collector).
        self.stream = None
        self.engine.upstream_gone()

    def _fail_all(self, error: ErrorType, message: str) -> None:
        if self.stream is not None:
            self.stream.upstream_failed(error, message)
        if not (self.pending or self.order):  # nothing in flight (a stream's connection)
            return
        waiting = [
            *(p for p in self.pending.values() if not p.done),
            *(p for p in self.order.values() if not p.done),
        ]
        self.pending = {}
        self.order = OrderedDict()
        self.by_id = {}
        self.stale = 0
        for p in waiting:
            p.done = True
            p.downstream.fail(p, error, message)


#: Offset of ``tcpi_bytes_acked`` in Linux's ``struct tcp_info`` (since Linux 4.1).
_BYTES_ACKED = 120
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None) if sys.platform == "linux" else None


#: At most this share of ``spec.upstream.heartbeat.interval`` is added to each connection's
#: (Envoy's HTTP/2 keepalive adds up to 15 % by default): the pings of connections that went
#: quiet at once, and the sweep's work for them, are spread over that much time.
PING_JITTER = 0.15

#: Offset of ``tcpi_last_data_recv`` (milliseconds since data was last received) in Linux's
#: ``struct tcp_info``.
_LAST_DATA_RECV = 52


def _tcp_info(transport: asyncio.Transport, offset: int, size: int) -> int | None:
    """The unsigned field of ``size`` bytes at ``offset`` of the connection's ``struct
    tcp_info`` (Linux), or ``None`` where the platform or the kernel does not tell."""
    if _TCP_INFO is None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        info: bytes = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 256)
    except OSError:
        return None
    if len(info) < offset + size:
        return None
    return int.from_bytes(info[offset : offset + size], sys.byteorder)


def _quiet_for(transport: asyncio.Transport) -> float | None:
    """Seconds since the peer last sent data on this connection (the kernel's count), or
    ``None`` where the platform does not tell."""
    ms = _tcp_info(transport, _LAST_DATA_RECV, 4)
    return None if ms is None else ms / 1000


def _acked_bytes(transport: asyncio.Transport) -> int | None:
    """The bytes of this connection the peer acknowledged so far (the kernel's count), or
    ``None`` where the platform does not tell."""
    return _tcp_info(transport, _BYTES_ACKED, 8)


def _keepalive(
    transport: asyncio.Transport, probes: int | None, idle: float | None, interval: float | None
) -> None:
    """TCP keepalive on an upstream socket (``connectionPool.tcp.tcpKeepalive``)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    options = (
        (getattr(socket, "TCP_KEEPCNT", None), probes),
        (getattr(socket, "TCP_KEEPIDLE", None), idle),
        (getattr(socket, "TCP_KEEPINTVL", None), interval),
    )
    for option, value in options:
        if option is not None and value is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, max(1, int(value)))
