"""The engine: builds runtime structures from a :class:`Config`, binds, serves, drains."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from typing import Any

from metaprotocol_sdk.errors import ConfigError

from .accesslog import AccessLog
from .balancer import make_balancer
from .config.models import Config, Destination, Listener, LoadBalancer
from .deadlines import Deadlines
from .downstream import Downstream, ListenerRuntime
from .matcher import compile_match
from .router import CompiledRoute, RouteTable, Target
from .stats import Stats
from .upstream import Cluster, UpstreamConnection, UpstreamHost


def cluster_name(host: str, port: int, subset: str | None) -> str:
    """Envoy-style cluster name: ``outbound|9000|v2|greeter.example``."""
    return f"outbound|{port}|{subset or ''}|{host}"


class Engine:
    """A running proxy for one :class:`Config`.

    ``await start()`` binds every listener (and the admin endpoint); ``listener_addresses``
    then maps ``(host, port)`` to the bound ``(ip, port)``. ``await stop()`` drains.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        settings = config.proxy
        self.stats = Stats()
        self.max_connections = settings.limits.max_connections
        self.max_pending = settings.limits.max_pending_requests
        self.connect_timeout = settings.timeouts.connect
        self.connections_per_endpoint = settings.connections_per_endpoint
        self.pending = 0
        self.draining = False
        self.downstreams: set[Downstream] = set()
        self.upstreams: set[UpstreamConnection] = set()
        self.access_log: AccessLog | None = None
        self.listener_addresses: dict[tuple[str, int], tuple[str, int]] = {}
        self.admin_address: tuple[str, int] | None = None
        self.clusters: dict[str, Cluster] = {}
        self.listeners: dict[tuple[str, int], ListenerRuntime] = {}
        self._servers: list[asyncio.Server] = []
        self._admin: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drained: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None
        self._pending_gauge = self.stats.gauge("metaprotocol_requests_pending")
        #: The event loop the engine runs on (set by :meth:`start`).
        self.loop: asyncio.AbstractEventLoop
        #: Request timeouts (created by :meth:`start`, on the running loop).
        self.deadlines: Deadlines

    @property
    def ready(self) -> bool:
        """True between a successful :meth:`start` and the beginning of :meth:`stop`."""
        return bool(self._servers) and not self.draining

    # -- building ------------------------------------------------------------------------------

    def _cluster(self, host: str, port: int, subset: str | None) -> Cluster:
        name = cluster_name(host, port, subset)
        cluster = self.clusters.get(name)
        if cluster is not None:
            return cluster
        config = self.config
        service = config.services[host]
        sport = service.ports[port]
        rule = config.destination_rules.get(host)
        policy = rule.load_balancer if rule else LoadBalancer()
        labels: dict[str, str] = {}
        if subset is not None and rule is not None:
            sub = rule.subsets[subset]
            labels = sub.labels
            policy = sub.load_balancer or policy
        hosts = [
            UpstreamHost(ep.address, ep.port_for(sport))
            for ep in service.endpoints
            if labels.items() <= ep.labels.items()
        ]
        protocol = config.protocol_of(host, port)
        cluster = Cluster(self, name, protocol, hosts, make_balancer(policy, hosts))
        self.clusters[name] = cluster
        return cluster

    def _target(
        self, dest: Destination, listener: Listener, route: str, weight: int | None = None
    ) -> Target:
        port = dest.port if dest.port is not None else listener.port
        cluster = None
        if dest.host in self.config.services:
            cluster = self._cluster(dest.host, port, dest.subset)
        name = cluster_name(dest.host, port, dest.subset)
        weight = dest.weight if weight is None else weight
        return Target(name, cluster, weight, self.stats, listener.name, route)

    def _build_listener(self, listener: Listener) -> ListenerRuntime:
        config = self.config
        timeout = config.proxy.timeouts.route
        router = config.routers.get(listener.host)
        routes: list[CompiledRoute] = []
        if router is None:
            # No MetaRouter: everything goes to the service itself, as in Aeraki.
            dest = Destination(listener.host, None, listener.port, 100)
            routes.append(
                CompiledRoute(
                    "default",
                    compile_match(()),
                    [self._target(dest, listener, "default")],
                    None,
                    None,
                    timeout,
                )
            )
        else:
            for route in router.routes:
                single = 100 if len(route.destinations) == 1 else None
                targets = [
                    self._target(d, listener, route.name, single) for d in route.destinations
                ]
                routes.append(
                    CompiledRoute(
                        route.name,
                        compile_match(route.match),
                        targets,
                        route.request_mutation,
                        route.response_mutation,
                        route.timeout or timeout,
                    )
                )
        protocol = config.protocol_of(listener.host, listener.port)
        return ListenerRuntime(
            self, listener.name, protocol.codec_class, RouteTable(routes), dict(protocol.options)
        )

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every listener and the admin endpoint; on any failure nothing stays open."""
        from .admin import start_admin

        if self._loop is not None:
            raise RuntimeError("an Engine starts once; create a new one")
        self._loop = self.loop = asyncio.get_running_loop()
        self.deadlines = Deadlines(self._loop, lambda p: p.downstream.timeout(p))
        self._drained = asyncio.Event()
        self._stopped = asyncio.Event()
        settings = self.config.proxy
        for listener in settings.listeners:
            self.listeners[(listener.host, listener.port)] = self._build_listener(listener)
        try:
            for listener in settings.listeners:
                runtime = self.listeners[(listener.host, listener.port)]
                server = await self._loop.create_server(
                    lambda rt=runtime: Downstream(rt),  # type: ignore[misc]
                    listener.bind_host,
                    listener.bind_port,
                    reuse_address=True,
                    backlog=1024,
                )
                self._servers.append(server)
                sockname = server.sockets[0].getsockname()
                self.listener_addresses[(listener.host, listener.port)] = (sockname[0], sockname[1])
            self._refuse_own_listeners()
            if settings.admin_bind is not None:
                self._admin = await start_admin(self, *settings.admin_bind)
                sockname = self._admin.sockets[0].getsockname()
                self.admin_address = (sockname[0], sockname[1])
            if settings.access_log:
                self.access_log = AccessLog(settings.access_log)
        except BaseException:
            await self._close_servers()
            raise

    def _refuse_own_listeners(self) -> None:
        """Refuse an endpoint that is one of this engine's own listeners (once bound).

        Requests sent there would come back in and be routed out again until a limit stops
        them; Envoy has no such check, and the loop is easy to build with ephemeral ports.
        """
        bound: dict[int, tuple[str, str]] = {}
        for (host, port), (ip, bound_port) in self.listener_addresses.items():
            bound[bound_port] = (f"{host}:{port}", ip)
        for cluster in self.clusters.values():
            for upstream in cluster.hosts:
                own = bound.get(upstream.port)
                if own is None:
                    continue
                listener, ip = own
                if upstream.address == ip or (_is_wildcard(ip) and _is_loopback(upstream.address)):
                    raise ConfigError(
                        f"endpoint {upstream.key} is this engine's own listener for {listener} "
                        f"(bound on {ip}:{upstream.port}): requests would loop back into it",
                        source=f"cluster {cluster.name}",
                    )

    async def _close_servers(self) -> None:
        servers = [*self._servers, *([self._admin] if self._admin else [])]
        self._servers = []
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

    async def stop(self, drain: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (up to ``drain`` seconds), close all.

        New requests on open connections get a ``ShuttingDown`` local reply meanwhile;
        each connection closes as soon as it has nothing in flight.
        """
        if self._loop is None or self.draining:
            return
        if drain is None:
            drain = self.config.proxy.timeouts.drain
        self.draining = True
        assert self._drained is not None
        for server in self._servers:
            server.close()
        for conn in list(self.downstreams):
            conn.start_drain()
        if self.downstreams:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), drain)
        # Deadline passed (or all drained): close whatever is left.
        for conn in list(self.downstreams):
            if conn.transport is not None:
                conn.transport.abort()
        for upstream in list(self.upstreams):
            upstream.close()
        await self._close_servers()
        # Let connection_lost callbacks run so no transport outlives stop().
        for _ in range(100):
            if not self.downstreams and not self.upstreams:
                break
            await asyncio.sleep(0)
        self.deadlines.close()
        if self.access_log is not None:
            self.access_log.close()
            self.access_log = None
        assert self._stopped is not None
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Wait until :meth:`stop` has finished."""
        assert self._stopped is not None, "engine not started"
        await self._stopped.wait()

    # -- introspection -------------------------------------------------------------------------

    def stats_snapshot(self) -> dict[str, int]:
        """Every stats series as ``{'name{labels}': value}`` (gauges refreshed)."""
        self._pending_gauge.value = self.pending
        return self.stats.snapshot()

    def prometheus(self) -> str:
        """Stats in Prometheus text format (gauges refreshed)."""
        self._pending_gauge.value = self.pending
        return self.stats.prometheus()

    def config_dump(self) -> dict[str, Any]:
        """A JSON-ready view of the configuration and the runtime built from it."""
        settings = self.config.proxy
        return {
            "sources": list(self.config.sources),
            "listeners": [
                {
                    "name": listener.name,
                    "bind": f"{listener.bind_host}:{listener.bind_port}",
                    "address": ":".join(
                        map(str, self.listener_addresses.get((listener.host, listener.port), ()))
                    ),
                    "protocol": self.config.protocol_of(listener.host, listener.port).name,
                    "routes": [
                        {
                            "name": route.name,
                            "timeout": route.timeout,
                            "destinations": [
                                {"name": t.name, "weight": t.weight, "known": t.cluster is not None}
                                for t in route.targets
                            ],
                            "requestMutation": route.request_mutation or {},
                            "responseMutation": route.response_mutation or {},
                        }
                        for route in self.listeners[(listener.host, listener.port)].table.routes
                    ]
                    if (listener.host, listener.port) in self.listeners
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
                    "loadBalancer": type(c.balancer).__name__,
                    "endpoints": [h.key for h in c.hosts],
                }
                for c in self.clusters.values()
            ],
            "protocols": {
                p.name: {"codec": p.codec_name, "options": p.options}
                for p in self.config.protocols.values()
            },
            "settings": {
                "limits": vars(settings.limits),
                "timeouts": vars(settings.timeouts),
                "accessLog": settings.access_log,
                "connectionsPerEndpoint": settings.connections_per_endpoint,
            },
            "documents": list(self.config.documents),
        }


def _is_wildcard(ip: str) -> bool:
    return ip in ("0.0.0.0", "::")


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
