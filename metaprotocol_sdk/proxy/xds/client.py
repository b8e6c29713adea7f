"""An xDS client (state of the world, gRPC): routes, clusters and endpoints from a control plane.

One ADS stream (istiod) carries clusters, endpoints and routes; with ``spec.xds.rdsAddress``
routes come over a RouteDiscoveryService stream of their own (Aeraki's server).

It introduces itself like an Istio sidecar (node id ``sidecar~IP~POD.NS~NS.svc.cluster.local``,
metadata with ``CLUSTER_ID``, ``NAMESPACE``, ``ISTIO_VERSION``), subscribes to every cluster
(CDS), to the endpoints of the EDS clusters among them, and to the route configuration of
each listener (RDS, Aeraki's ``<host>_<port>``). Each response is translated with the file
configuration into a whole new :class:`~metaprotocol_sdk.proxy.config.models.Config` and
handed to the engine's ``apply``: what it accepts is ACKed (the response's version and nonce),
what it refuses is NACKed (the last accepted version, the same nonce and an ``error_detail``),
and the engine keeps serving the last good configuration. A broken stream is reopened after a
capped exponential backoff with jitter, asking for the versions already held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.route.v3 import rds_pb2_grpc
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2

from metaprotocol_sdk.errors import ConfigError

from .. import control_stream
from ..config.models import Config, Xds
from ..locality import locality_parts
from .translate import (
    PackedClusters,
    Resources,
    XdsRefused,
    eds_name,
    eds_names,
    parse_cluster_name,
    route_config_names,
    routed_clusters,
    translate,
    used_hosts,
)

log = logging.getLogger("metaprotocol.xds")

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
#: Short names in ``/config_dump`` and logs.
SHORT = {CLUSTER_TYPE: "cds", ENDPOINT_TYPE: "eds", ROUTE_TYPE: "rds", LISTENER_TYPE: "lds"}
_MESSAGES: dict[str, type[Message]] = {
    CLUSTER_TYPE: cluster_pb2.Cluster,
    ENDPOINT_TYPE: endpoint_pb2.ClusterLoadAssignment,
    ROUTE_TYPE: route_pb2.RouteConfiguration,
    LISTENER_TYPE: listener_pb2.Listener,
}
#: ``google.rpc.Code.INVALID_ARGUMENT``: the code of every NACK's ``error_detail``.
INVALID_ARGUMENT = 3
#: Longest ``error_detail`` message sent (and kept for ``/config_dump``).
MAX_ERROR_DETAIL = 4096
#: Clusters left out (unused and not honoured) that ``/config_dump`` lists, with why, and
#: clusters of hosts not in use it names; the rest are counted (a mesh may hold thousands).
LEFT_OUT_SHOWN = 100
#: The shortest wait between two updates (see :meth:`XdsClient._handle`): what each response
#: costs outside the update's own time (gRPC receiving and decoding it, the ACK sent) is not
#: measured, and for tiny ones it is most of it (refused routes pushed without pause: 415 a
#: second, the client's replies down to 28 %; with this wait 83 a second, 44 %).
MIN_UPDATE_PAUSE = 0.01
#: The most of a string from the control plane (a version, a type URL) that a log line shows:
#: the server makes them as long as it likes (up to ``maxMessageBytes``).
LOGGED_CHARS = 100


class Applier(Protocol):
    """What the client needs of the engine: ``Engine.apply``."""

    def apply(
        self, config: Config, *, source: str = ..., version: str | None = ...
    ) -> Awaitable[Any]:
        """Validate and swap in ``config``; raise ConfigError and change nothing on refusal."""
        ...

    def refused(self, source: str, error: str, version: str = ...) -> None:
        """Record an update refused before it reached ``apply`` (counted, shown)."""
        ...


@dataclass
class HeldRoutes:
    """A route update waiting for the endpoints of clusters it sends to (warming)."""

    call: Any
    response: discovery_pb2.DiscoveryResponse
    #: The response's route configurations, decoded once (looked at on every EDS update).
    routes: dict[str, Message]
    #: The clusters whose endpoints have not arrived yet.
    clusters: list[str]
    #: When the first update of this wait was held (``loop.time()``): a newer update takes
    #: its place, not a new deadline.
    since: float


@dataclass
class TypeState:
    """One resource type's subscription: what was asked, accepted and last refused."""

    type_url: str
    names: list[str]
    #: The last accepted response's version (``""``: none yet).
    version: str = ""
    #: The last response's nonce (echoed in the next request of this type).
    nonce: str = ""
    #: By name: decoded messages; for CDS the clusters as encoded (``bytes``), decoded when
    #: read (:class:`~.translate.PackedClusters`): only those of hosts in use are.
    resources: dict[str, Any] = field(default_factory=dict)
    acks: int = 0
    nacks: int = 0
    last_error: str | None = None
    #: Wall-clock time of the last accepted update.
    updated: float | None = None

    def dump(self) -> dict[str, Any]:
        """This subscription as JSON-ready data (``/config_dump``)."""
        return {
            "version": self.version,
            "nonce": self.nonce,
            "subscribed": list(self.names) or "*",
            "resources": sorted(self.resources),
            "acks": self.acks,
            "nacks": self.nacks,
            "lastError": self.last_error,
            "lastUpdate": self.updated,
        }


def backoff_delay(failures: int, settings: Xds, fraction: float) -> float:
    """Seconds to wait after ``failures`` failed streams in a row (``spec.xds.backoff``)."""
    return control_stream.backoff_delay(
        failures, settings.backoff_initial, settings.backoff_max, fraction
    )


def channel_options(settings: Xds) -> list[tuple[str, int]]:
    """gRPC channel arguments for a control-plane connection: message size bounds, and the
    keepalive of ``spec.xds.keepalive``."""
    most = settings.max_message_bytes
    return [
        ("grpc.max_receive_message_length", most),
        ("grpc.max_send_message_length", most),
        *control_stream.keepalive_options(settings.keepalive_time, settings.keepalive_timeout),
    ]


def node_message(settings: Xds) -> base_pb2.Node:
    """The ``Node`` sent in the first request of every stream."""
    metadata = struct_pb2.Struct()
    metadata.update(dict(settings.node.metadata))
    node = base_pb2.Node(
        id=settings.node.id,
        cluster=settings.node.cluster,
        metadata=metadata,
        user_agent_name="metaprotocol-sdk",
    )
    if settings.node.locality:  # istiod's failover priorities are computed from it
        region, zone, subzone = locality_parts(settings.node.locality)
        node.locality.CopyFrom(base_pb2.Locality(region=region, zone=zone, sub_zone=subzone))
    return node


@dataclass
class Stream:
    """One gRPC stream to a control plane and the resource types it carries."""

    #: ``ads`` (istiod's aggregated stream) or ``rds`` (Aeraki's RouteDiscoveryService).
    kind: str
    address: str
    types: tuple[str, ...]
    #: The stream is open and the server has answered on it.
    connected: bool = False
    #: Streams opened after the first (reconnections).
    reconnects: int = 0
    last_error: str | None = None
    call: Any = None
    #: Responses of a type this stream does not carry (dropped; logged once per stream).
    ignored: int = 0

    def dump(self) -> dict[str, Any]:
        """This stream as JSON-ready data (``/config_dump``)."""
        return {
            "address": self.address,
            "types": [SHORT[t] for t in self.types],
            "connected": self.connected,
            "reconnects": self.reconnects,
            "lastError": self.last_error,
            "ignored": self.ignored,
        }


class XdsClient:
    """The xDS client of one engine. ``start()`` runs it in a task; ``stop()`` ends it.

    One ADS stream carries CDS, EDS and RDS; with ``spec.xds.rdsAddress`` (Aeraki serves its
    MetaRDS on a RouteDiscoveryService of its own, istiod the clusters over ADS) RDS has a
    stream of its own to that address.
    """

    def __init__(
        self,
        engine: Applier,
        base: Config,
        *,
        random_fraction: Callable[[], float] = random.random,
    ) -> None:
        settings = base.proxy.xds
        if settings is None:
            raise ValueError("the configuration has no spec.xds")
        self.engine = engine
        #: The file configuration: listeners, codecs and the engine's own settings.
        self.base = base
        self.settings = settings
        self._random = random_fraction
        self.types = {
            CLUSTER_TYPE: TypeState(CLUSTER_TYPE, []),
            ENDPOINT_TYPE: TypeState(ENDPOINT_TYPE, []),
            ROUTE_TYPE: TypeState(ROUTE_TYPE, route_config_names(base)),
        }
        #: LDS: the inbound listener only (named: istiod sends every listener of a sidecar
        #: whatever is named, and the others are dropped as they are read).
        inbound = () if settings.inbound_listener is None else (LISTENER_TYPE,)
        if settings.inbound_listener is not None:
            self.types[LISTENER_TYPE] = TypeState(LISTENER_TYPE, [settings.inbound_listener])
        if settings.rds_address is None:
            self.streams = [
                Stream("ads", settings.address, (CLUSTER_TYPE, *inbound, ROUTE_TYPE, ENDPOINT_TYPE))
            ]
        else:
            self.streams = [
                Stream("ads", settings.address, (CLUSTER_TYPE, *inbound, ENDPOINT_TYPE)),
                Stream("rds", settings.rds_address, (ROUTE_TYPE,)),
            ]
        self._carrier = {t: st for st in self.streams for t in st.types}
        #: The clusters served: CDS's, and those it dropped that the routes in force still
        #: send to (kept, with their endpoints, until a route update stops: make before break).
        self.clusters: dict[str, bytes] = {}
        #: The clusters of the configuration in force left out, with why: no listener or
        #: route here uses them, and this engine cannot honour them (a headless service...).
        self.left_out: dict[str, str] = {}
        #: The outbound clusters held and not translated, sorted: no listener, file or route
        #: here uses their host (CDS names every service of the mesh).
        self.unused: list[str] = []
        #: The encoded size of each resource held, per type (clusters: those served, kept
        #: ones included), as its response carried it: ``spec.xds.maxResourceBytes`` bounds
        #: their sum.
        self._sizes: dict[str, dict[str, int]] = {url: {} for url in self.types}
        #: EDS names an EDS response has carried since they were subscribed to.
        self._fetched: set[str] = set()
        self.held: HeldRoutes | None = None
        self._held_timer: asyncio.TimerHandle | None = None
        self._held_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._updating = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        #: The loop time before which the next response is not handled: after each update,
        #: as long as it took (see :meth:`_handle`).
        self._next_update = 0.0

    @property
    def connected(self) -> bool:
        """Every stream is open and answered."""
        return all(st.connected for st in self.streams)

    @property
    def reconnects(self) -> int:
        """Streams reopened, over all of them."""
        return sum(st.reconnects for st in self.streams)

    @property
    def last_error(self) -> str | None:
        """The last error of a stream that is not connected now (``None``: all are)."""
        return next((st.last_error for st in self.streams if st.last_error), None)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Run the streams in tasks on the running loop (their state in ``/config_dump``)."""
        sections = getattr(self.engine, "dump_sections", None)
        if isinstance(sections, dict):
            sections["xds"] = self.status
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.run(st), name=f"xds-{st.kind}") for st in self.streams]

    async def stop(self) -> None:
        """End the streams and their tasks."""
        self._stopping.set()
        self._release()
        if self._held_task is not None:
            self._held_task.cancel()
        for st in self.streams:
            if st.call is not None:
                st.call.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self, stream: Stream) -> None:
        """Keep ``stream`` open until stopped; back off between attempts."""
        failures = 0
        while not self._stopping.is_set():
            answered = False
            try:
                answered = await self._session(stream)
                error = "the control plane closed the stream"
            except grpc.aio.AioRpcError as exc:
                error = f"{exc.code().name}: {exc.details()}"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the client die: log, back off, reconnect
                log.exception("xDS stream to %s failed", stream.address)
                error = f"{type(exc).__name__}: {exc}"
            stream.call = None
            stream.connected, stream.last_error = False, error
            await self._notify()
            if self._stopping.is_set():
                return
            failures = 1 if answered else failures + 1
            delay = backoff_delay(failures, self.settings, self._random())
            log.warning(
                "xDS stream to %s ended (%s); retrying in %.2f s", stream.address, error, delay
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            stream.reconnects += 1

    async def _session(self, stream: Stream) -> bool:
        """One stream: subscribe, then handle responses until it ends. True if any came."""
        options = channel_options(self.settings)
        answered = False
        async with grpc.aio.insecure_channel(stream.address, options=options) as channel:
            if stream.kind == "ads":
                call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(
                    channel
                ).StreamAggregatedResources()
            else:
                call = rds_pb2_grpc.RouteDiscoveryServiceStub(channel).StreamRoutes()
            stream.call = call
            first = True
            for type_url in stream.types:
                state = self.types[type_url]
                if type_url == ENDPOINT_TYPE and not state.names:
                    continue  # asked for once CDS names EDS clusters
                state.nonce = ""  # nonces belong to a stream
                await call.write(self._request(state, node=first))
                first = False
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    return answered
                if not answered:
                    answered = True
                    stream.connected, stream.last_error = True, None
                    await self._notify()
                if response.type_url not in stream.types:
                    # Counted, logged once per stream: a server sending nothing else, without
                    # pause and with a long type URL, wrote 117 MB of log lines a second.
                    stream.ignored += 1
                    if stream.ignored == 1:
                        log.warning(
                            "xDS: ignored a response of type %s on the %s stream (the next "
                            "are counted in /config_dump, not logged)",
                            _shown(response.type_url),
                            stream.kind,
                        )
                    continue
                await self._handle(call, response)

    # -- requests and responses ------------------------------------------------------------------

    def _request(
        self, state: TypeState, *, node: bool = False, error: str | None = None
    ) -> discovery_pb2.DiscoveryRequest:
        req = discovery_pb2.DiscoveryRequest(
            version_info=state.version,
            resource_names=state.names,
            type_url=state.type_url,
            response_nonce=state.nonce,
        )
        if node:
            req.node.CopyFrom(node_message(self.settings))
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=INVALID_ARGUMENT, message=error))
        return req

    async def rebase(self, base: Config, *, source: str = "file") -> None:
        """Serve a reloaded file configuration with the xDS resources held.

        The files' listeners, codecs and settings change; routes, clusters and endpoints stay
        those of the control plane (re-translated against the new files, so a listener added
        gets its route table subscribed). Raises :class:`ConfigError` and changes nothing if
        the result is refused or ``spec.xds`` itself changed (that needs a restart).
        """
        async with self._updating:
            held = Resources(
                routes=self.types[ROUTE_TYPE].resources,
                clusters=PackedClusters(self.clusters),
                endpoints=self.types[ENDPOINT_TYPE].resources,
                listeners=self._listeners(),
            )
            try:
                if base.proxy.xds != self.settings:
                    raise ConfigError(
                        "spec.xds changed: the control plane connection is set at start only "
                        "(restart needed); nothing was changed",
                        source="ProxyConfig",
                        field="spec.xds",
                    )
                left_out: dict[str, str] = {}
                unused: list[str] = []
                try:
                    config = await asyncio.to_thread(translate, base, held, left_out, unused)
                    wanted = await asyncio.to_thread(self._eds_wanted, held, base=base)
                except XdsRefused as exc:
                    raise ConfigError(str(exc), source="xDS resources held") from exc
            except ConfigError as exc:  # apply() records its own refusals
                self.engine.refused(source, str(exc))
                raise
            versions = " ".join(f"{SHORT[u]}:{t.version or '-'}" for u, t in self.types.items())
            await self.engine.apply(config, source=source, version=versions)
            self.base = base
            self.left_out, self.unused = left_out, unused
            rds = self.types[ROUTE_TYPE]
            names = route_config_names(base)
            if names != rds.names:
                rds.names = names
                rds.resources = {k: v for k, v in rds.resources.items() if k in names}
                sizes = self._sizes[ROUTE_TYPE]
                self._sizes[ROUTE_TYPE] = {k: sizes[k] for k in rds.resources if k in sizes}
                call = self._carrier[ROUTE_TYPE].call
                if call is not None:
                    try:
                        await call.write(self._request(rds))
                    except Exception:  # the stream ended meanwhile
                        # The reload is applied; the next stream subscribes to these names.
                        log.debug("xDS: RDS subscription not sent (stream gone)", exc_info=True)
            await self._subscribe_endpoints(wanted)

    async def _handle(self, call: Any, response: discovery_pb2.DiscoveryResponse) -> None:
        loop = asyncio.get_running_loop()
        # Updates take at most half of the engine's time: a control plane sending them without
        # pause (or resetting the stream to be sent the state again) had the engine decode and
        # translate all the time, and its requests waited for the GIL (a 20 000-cluster CDS
        # response pushed in a loop: 5 % of the replies served without it, stalls of 0.8 s).
        # At least MIN_UPDATE_PAUSE apart.
        pause = self._next_update - loop.time()
        if pause > 0:
            await asyncio.sleep(pause)
        async with self._updating:  # one update at a time (responses, file reloads)
            start = loop.time()
            try:
                await self._update(call, response)
            finally:
                now = loop.time()
                self._next_update = now + max(now - start, MIN_UPDATE_PAUSE)

    async def _update(
        self, call: Any, response: discovery_pb2.DiscoveryResponse, *, force: bool = False
    ) -> None:
        state = self.types.get(response.type_url)
        if state is None:
            log.warning(
                "xDS: ignored a response of unsubscribed type %s", _shown(response.type_url)
            )
            return
        state.nonce = response.nonce
        version = self._version(state, response)
        try:
            try:
                # Off the loop, as file reloads are parsed, and so is translating below: a
                # large update (tens of thousands of clusters or endpoints) must not stall the
                # requests being served meanwhile (decoding and merging 20 000 clusters held
                # it 0.16 to 0.4 s per update).
                resources, candidate, held = await asyncio.to_thread(self._prepare, state, response)
                if state.type_url == ROUTE_TYPE:
                    warming = [] if force else self._warming(candidate)
                    if warming:
                        self._hold(call, response, resources, warming)
                        # Their endpoints are asked for now (only those of hosts in use
                        # are), those of the routes in force kept (the next update applied
                        # subscribes to what it and this one use).
                        wanted = await asyncio.to_thread(self._eds_wanted, candidate)
                        eds = self.types[ENDPOINT_TYPE]
                        await self._subscribe_endpoints(sorted({*eds.names, *wanted}))
                        await self._notify()
                        return
                    self._release()  # this update replaces the one that waited, if any
                left_out: dict[str, str] = {}
                unused: list[str] = []
                config, wanted = await asyncio.to_thread(
                    self._translate, candidate, left_out, unused
                )
            except (XdsRefused, ConfigError) as exc:  # apply() records its own refusals
                self.engine.refused("xds", str(exc)[:MAX_ERROR_DETAIL], version)
                raise
            await self.engine.apply(config, source="xds", version=version)
            self.left_out, self.unused = left_out, unused
        except Exception as exc:
            if isinstance(exc, grpc.RpcError):  # the stream broke: reopened by run()
                raise
            if isinstance(exc, XdsRefused | ConfigError):
                detail = str(exc)[:MAX_ERROR_DETAIL]
            else:
                # A fault of the engine's own (a response shape its translation did not
                # foresee): NACKed as any refusal, the configuration in force kept. Raised
                # on, it ended the stream, and the control plane's next push of the same
                # state ended the new one too, reconnecting for good.
                log.exception("xDS: internal error on %s", SHORT[state.type_url])
                detail = f"internal error: {type(exc).__name__}: {exc}"[:MAX_ERROR_DETAIL]
                self.engine.refused("xds", detail, version)
            state.nacks += 1
            state.last_error = detail
            log.error(
                "xDS: refused %s version %s: %s",
                SHORT[state.type_url],
                _shown(response.version_info),
                detail,
            )
            await call.write(self._request(state, error=detail))
            await self._notify()
            return
        eds = self.types[ENDPOINT_TYPE]
        if state.type_url == CLUSTER_TYPE:
            state.resources = resources  # what the server holds (kept clusters aside)
        else:
            state.resources = dict(_pick(candidate, state.type_url))
        if state.type_url == ENDPOINT_TYPE:
            self._fetched.update(name for name in resources if name in state.resources)
        self.clusters = dict(_encoded(candidate))
        eds.resources = dict(candidate.endpoints)
        self._sizes = held
        state.version = response.version_info
        state.acks += 1
        state.last_error = None
        state.updated = time.time()
        await call.write(self._request(state))
        await self._subscribe_endpoints(wanted)
        if self.held is not None and state.type_url != ROUTE_TYPE:
            await self._apply_held(force=False)
        await self._notify()

    # -- EDS subscriptions: the endpoints of the clusters of the hosts in use -------------------

    def _eds_wanted(self, resources: Resources, base: Config | None = None) -> list[str]:
        """The EDS names to subscribe to: those of ``resources``' clusters whose hosts are in
        use (:func:`used_hosts`: :func:`translate` translates those only) by its routes or
        the held route update's. The endpoints of the rest of the mesh are not asked
        for: a route update that starts sending to one of its clusters waits for them (see
        :meth:`_warming`). ``base``: the file configuration (default: the one in force).
        Runs in a thread: it reads every cluster's name."""
        base = base or self.base
        hosts = used_hosts(base, resources.routes)
        if self.held is not None:
            hosts |= used_hosts(base, self.held.routes)
        clusters = resources.clusters
        return eds_names(
            clusters[name]  # decoded here, for the hosts in use only
            for name in clusters
            if (parsed := parse_cluster_name(name)) is not None and parsed.host in hosts
        )

    def _translate(
        self, candidate: Resources, left_out: dict[str, str], unused: list[str]
    ) -> tuple[Config, list[str]]:
        """:func:`translate`, and the EDS names to subscribe to once it is applied (both in a
        thread)."""
        return translate(self.base, candidate, left_out, unused), self._eds_wanted(candidate)

    async def _subscribe_endpoints(self, wanted: list[str]) -> None:
        """Subscribe EDS to ``wanted`` (if it changed); the endpoints of names no longer
        subscribed to are dropped (fetched again, and waited for, if they are wanted again)."""
        eds = self.types[ENDPOINT_TYPE]
        if wanted == eds.names:
            return
        eds.names = wanted
        names = set(wanted)
        self._fetched.intersection_update(names)
        eds.resources = {k: v for k, v in eds.resources.items() if k in names}
        sizes = self._sizes[ENDPOINT_TYPE]
        self._sizes[ENDPOINT_TYPE] = {k: sizes[k] for k in eds.resources if k in sizes}
        eds_call = self._carrier[ENDPOINT_TYPE].call
        if eds_call is not None:
            try:
                await eds_call.write(self._request(eds))
            except Exception:  # that stream ended: the next one subscribes to these
                log.debug("xDS: EDS subscription not sent (stream gone)", exc_info=True)

    # -- warming: route updates wait for the endpoints of the clusters they send to ------------

    def _warming(self, candidate: Resources) -> list[str]:
        """The clusters the candidate's routes send to whose endpoints have not arrived."""
        waiting = []
        for name in sorted(routed_clusters(candidate.routes.values())):
            cluster = candidate.clusters.get(name)
            service = None if cluster is None else eds_name(cluster)
            if service is not None and service not in self._fetched:
                waiting.append(name)
        return waiting

    def _still_warming(self, state: TypeState, routes: dict[str, Message]) -> bool:
        """Whether a held route update still waits for endpoints."""
        return bool(self._warming(self._candidate(state, routes)))

    def _hold(
        self,
        call: Any,
        response: discovery_pb2.DiscoveryResponse,
        routes: dict[str, Message],
        clusters: list[str],
    ) -> None:
        """Keep a route update until its clusters' endpoints arrive, or for
        ``initial_fetch_timeout`` at most (from the first update held)."""
        loop = asyncio.get_running_loop()
        since = loop.time() if self.held is None else self.held.since
        self.held = HeldRoutes(call, response, routes, clusters, since)
        if self._held_timer is None:
            delay = max(0.0, since + self.settings.initial_fetch_timeout - loop.time())
            self._held_timer = loop.call_later(delay, self._held_timeout)
        more = f" and {len(clusters) - 5} more" if len(clusters) > 5 else ""
        log.info(
            "xDS: RDS version %s waits for the endpoints of %s%s",
            _shown(response.version_info),
            ", ".join(clusters[:5]),
            more,
        )

    def _release(self) -> None:
        """Forget the held route update (applied, replaced, or its stream gone)."""
        self.held = None
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None

    def _held_timeout(self) -> None:
        self._held_timer = None
        self._held_task = asyncio.get_running_loop().create_task(self._apply_held_locked())

    async def _apply_held_locked(self) -> None:
        async with self._updating:
            try:
                await self._apply_held(force=True)
            except Exception:  # the stream ended meanwhile: the next one gets the routes again
                log.warning("xDS: a held route update was not applied", exc_info=True)

    async def _apply_held(self, *, force: bool) -> None:
        """Apply the held route update if its clusters' endpoints arrived (or ``force``)."""
        held = self.held
        if held is None:
            return
        state = self.types[ROUTE_TYPE]
        if held.call is not self._carrier[ROUTE_TYPE].call:
            self._release()  # its stream ended: a new one is sent the routes again
            return
        # In a thread: the candidate reads every cluster's name (40 000: 40 ms).
        if not force and await asyncio.to_thread(self._still_warming, state, held.routes):
            return
        if self.held is not held:  # released meanwhile (stopped)
            return
        self._release()
        if force:
            log.warning(
                "xDS: RDS version %s applied without the endpoints of %s (initialFetchTimeout)",
                _shown(held.response.version_info),
                ", ".join(held.clusters[:5]),
            )
        await self._update(held.call, held.response, force=True)

    def _prepare(
        self, state: TypeState, response: discovery_pb2.DiscoveryResponse
    ) -> tuple[dict[str, Any], Resources, dict[str, dict[str, int]]]:
        """``response``'s resources (:func:`_decode`), what would be held if it were accepted, and
        their sizes (:meth:`_held_sizes`). Reads the client's state only: it runs in a
        thread, under the update lock, while the loop serves requests."""
        resources, sizes = _decode(
            response, state.names if state.type_url == LISTENER_TYPE else None
        )
        candidate = self._candidate(state, resources)
        return resources, candidate, self._held_sizes(state.type_url, candidate, resources, sizes)

    def _held_sizes(
        self,
        type_url: str,
        candidate: Resources,
        received: dict[str, Any],
        sizes: dict[str, int],
    ) -> dict[str, dict[str, int]]:
        """The encoded size of each resource ``candidate`` holds, per type; raises
        :class:`XdsRefused` when their sum is above ``spec.xds.maxResourceBytes``.

        Without this bound each RDS or EDS response, however small, adds what it names to
        what is held: a control plane listing many EDS clusters and sending each one's
        endpoints in a response of its own (each under ``maxMessageBytes``) grew the engine
        without end (three responses of 3.4 MB: 775 MiB).
        """
        out: dict[str, dict[str, int]] = {}
        for url, held in (
            (CLUSTER_TYPE, candidate.clusters),
            (ENDPOINT_TYPE, candidate.endpoints),
            (ROUTE_TYPE, candidate.routes),
            (LISTENER_TYPE, candidate.listeners),
        ):
            if url not in self.types:
                continue
            known = self._sizes[url]
            fresh = url == type_url
            # The names only: a cluster is decoded when read. A name of the fresh type that
            # the response carried is the response's (merged over, or all of CDS's).
            out[url] = {
                name: sizes[name] if fresh and name in received else known[name] for name in held
            }
        total = sum(sum(by_name.values()) for by_name in out.values())
        limit = self.settings.max_resource_bytes
        if total > limit:
            parts = ", ".join(f"{SHORT[url]} {sum(out[url].values())}" for url in out)
            raise XdsRefused(
                f"{SHORT[type_url].upper()} response",
                "",
                f"the resources held would take {total} bytes ({parts}), above "
                f"spec.xds.maxResourceBytes ({limit}); nothing of this update was applied",
            )
        return out

    def _version(self, state: TypeState, response: discovery_pb2.DiscoveryResponse) -> str:
        """The engine's configuration version: the xDS versions it is built from."""
        versions = {url: s.version for url, s in self.types.items()}
        versions[state.type_url] = response.version_info
        return " ".join(f"{SHORT[url]}:{v or '-'}" for url, v in versions.items())

    def _candidate(self, state: TypeState, received: dict[str, Any]) -> Resources:
        """The resources as they would be if this response were accepted.

        CDS responses carry the whole state of the world; RDS and EDS responses update the
        resources they name, and only subscribed names are kept (none while nothing is
        subscribed): a server sending others cannot grow what is held. A cluster CDS no longer
        lists stays while the routes send to it (see :meth:`_served`). Endpoints are kept for
        the clusters of the hosts in use only (:meth:`_eds_wanted`).
        """
        current = {url: dict(s.resources) for url, s in self.types.items()}
        if state.type_url == CLUSTER_TYPE:
            current[CLUSTER_TYPE] = received
        elif state.type_url == LISTENER_TYPE:  # the state of the world: the one named, if sent
            current[LISTENER_TYPE] = {k: v for k, v in received.items() if k in state.names}
        else:
            wanted = set(state.names)
            merged = current[state.type_url]
            merged.update((k, v) for k, v in received.items() if k in wanted)
            current[state.type_url] = {k: v for k, v in merged.items() if k in wanted}
        clusters = PackedClusters(self._served(current[CLUSTER_TYPE], current[ROUTE_TYPE]))
        served = set(self._eds_wanted(Resources(routes=current[ROUTE_TYPE], clusters=clusters)))
        return Resources(
            routes=current[ROUTE_TYPE],
            clusters=clusters,
            endpoints={k: v for k, v in current[ENDPOINT_TYPE].items() if k in served},
            listeners=current.get(LISTENER_TYPE, {}),
        )

    def _listeners(self) -> dict[str, Message]:
        """The inbound listener held (none: not subscribed to, or not received yet)."""
        state = self.types.get(LISTENER_TYPE)
        return {} if state is None else dict(state.resources)

    def _served(self, cds: dict[str, bytes], routes: dict[str, Message]) -> dict[str, bytes]:
        """CDS's clusters, and those served now that it dropped while ``routes`` still send
        to them: a control plane that renames a cluster in one update (the new cluster, the
        routes to it, the old one gone) would otherwise fail the requests routed between its
        CDS and RDS responses. Bounded by what the routes name."""
        served = dict(cds)
        for name in routed_clusters(routes.values()):
            if name not in served and name in self.clusters:
                served[name] = self.clusters[name]
        return served

    # -- observation ---------------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    @property
    def initialized(self) -> bool:
        """Whether clusters and routes have both been applied once (a route update waiting
        for its clusters' endpoints is not): Envoy's end of initialization."""
        types = self.types
        inbound = types.get(LISTENER_TYPE)
        return (
            bool(types[CLUSTER_TYPE].version and types[ROUTE_TYPE].version)
            # The inbound listener itself, not an LDS response without it (then every
            # request is still denied).
            and (inbound is None or bool(inbound.resources))
            and self.held is None
        )

    async def wait_for(self, predicate: Callable[[XdsClient], bool], timeout: float) -> None:
        """Wait until ``predicate(self)`` holds (checked after every change)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self)), timeout)

    def status(self) -> dict[str, Any]:
        """The client's state as JSON-ready data (``/config_dump``'s ``xds``)."""
        return {
            "address": self.settings.address,
            "node": {"id": self.settings.node.id, "cluster": self.settings.node.cluster},
            "connected": self.connected,
            "reconnects": self.reconnects,
            "lastError": self.last_error,
            "streams": {st.kind: st.dump() for st in self.streams},
            "keptClusters": sorted(set(self.clusters) - set(self.types[CLUSTER_TYPE].resources)),
            "leftOutClusters": {
                name: why[:MAX_ERROR_DETAIL]
                for name, why in sorted(self.left_out.items())[:LEFT_OUT_SHOWN]
            },
            "leftOutCount": len(self.left_out),
            "unusedClusters": self.unused[:LEFT_OUT_SHOWN],
            "unusedCount": len(self.unused),
            "heldBytes": sum(sum(by_name.values()) for by_name in self._sizes.values()),
            "maxResourceBytes": self.settings.max_resource_bytes,
            "heldRoutes": None
            if self.held is None
            else {"version": self.held.response.version_info, "waitsFor": self.held.clusters},
            **{SHORT[url]: state.dump() for url, state in self.types.items()},
        }


def _shown(text: str) -> str:
    """``text`` cut to :data:`LOGGED_CHARS` for a log line."""
    if len(text) <= LOGGED_CHARS:
        return text
    return f"{text[:LOGGED_CHARS]}... ({len(text)} characters)"


def _encoded(resources: Resources) -> Mapping[str, bytes]:
    """The clusters of a candidate (:meth:`XdsClient._candidate`), as encoded."""
    clusters = resources.clusters
    assert isinstance(clusters, PackedClusters)
    return clusters.encoded


def _pick(resources: Resources, type_url: str) -> dict[str, Message]:
    if type_url == CLUSTER_TYPE:
        return dict(resources.clusters)
    if type_url == ENDPOINT_TYPE:
        return dict(resources.endpoints)
    if type_url == LISTENER_TYPE:
        return dict(resources.listeners)
    return dict(resources.routes)


def _decode(
    response: discovery_pb2.DiscoveryResponse, only: list[str] | None = None
) -> tuple[dict[str, Any], dict[str, int]]:
    """The response's resources by name (decoded; CDS's clusters as encoded, see
    :class:`~.translate.PackedClusters`), and their encoded sizes; a resource of another
    type or undecodable is refused. ``only``: the names kept (LDS: the others are dropped
    as soon as they are read)."""
    cls = _MESSAGES[response.type_url]
    out: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    for i, packed in enumerate(response.resources):
        where = f"{SHORT[response.type_url].upper()} response resources[{i}]"
        if packed.type_url != response.type_url:
            raise XdsRefused(
                where, "", f"type {packed.type_url!r} in a {response.type_url} response"
            )
        message = cls()
        try:
            message.ParseFromString(packed.value)
        except DecodeError as exc:
            raise XdsRefused(where, "", f"cannot be decoded: {exc}") from None
        name = message.cluster_name if response.type_url == ENDPOINT_TYPE else message.name
        if not name:
            raise XdsRefused(where, "", "has no name")
        if only is not None and name not in only:
            continue
        if name in out:
            raise XdsRefused(where, "", f"{name!r} is listed twice")
        # A cluster is held as it came: decoded, it took 10 to 50 times that.
        out[name] = packed.value if response.type_url == CLUSTER_TYPE else message
        sizes[name] = len(packed.value)
    return out, sizes
