"""Drains of upstream endpoints, known engine-wide (see docs/proxy.md, "Drain notices").

A drain notice comes from the server process at an address and port, whichever cluster's
connection carried it: every cluster with that endpoint (a service's cluster and each of its
subsets', or another service's) avoids it until the connection held for the drain closes.
:class:`EndpointDrains` keeps, for each endpoint, the clusters holding it (maintained as
clusters are built, replaced and removed), so that a drain's start and end cost one step per
cluster holding the endpoint, never a walk over every cluster's endpoints: an upstream may
send a notice on every connection it is offered.

An endpoint's identity (:func:`endpoint_identity`) is what its connections reach: its
address (an IP literal in canonical form, or a host name as written, in lower case) and
port. TLS and a PROXY protocol header change how a connection talks to that server, not
which server it is; a tunnel's connections reach the tunnel's target through the endpoint,
so their identity names both. A name is not resolved to match it: the connection that carried
the notice adds the address it reached (its peer), so that clusters with that IP address
avoid it too.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config.models import Tunnel
    from .upstream import Cluster, UpstreamConnection, UpstreamHost


def endpoint_identity(address: str, port: int, tunnel: Tunnel | None = None) -> str:
    """The identity of the server ``address:port`` reaches (through ``tunnel``, if set):
    ``10.0.0.1:20880``, ``[fd00::1]:20880``, ``provider.example:20880``, or
    ``10.0.0.1:8080 CONNECT provider.example:20880`` through a tunnel."""
    if ":" in address:  # an IPv6 literal (a name has none): ::1 and 0::1 are one address
        key = f"[{ipaddress.ip_address(address.strip('[]'))}]:{port}"
    else:  # names ignore case and a final dot; an IPv4 literal has one spelling
        key = f"{address.lower().rstrip('.')}:{port}"
    return key if tunnel is None else f"{key} {tunnel.protocol} {tunnel.authority}"


class EndpointDrains:
    """Which serving clusters hold each endpoint, and which endpoints drain now (by identity).

    ``holders[identity]`` is the first host of a serving cluster with that identity, the
    others linked from it (``UpstreamHost.next_holder`` and ``prev_holder``; a cluster may
    list one address twice): a chain, not a container per endpoint, so that a configuration
    of 100 000 endpoints makes no 100 000 more objects, and a host leaves it in one step.
    ``held[identity]`` is the upstream connection held open for the endpoint's drain. A host
    of a serving cluster is ``draining`` exactly while its identity is in ``held``.
    """

    __slots__ = ("held", "holders")

    def __init__(self) -> None:
        self.holders: dict[str, UpstreamHost] = {}
        self.held: dict[str, UpstreamConnection] = {}

    def add(self, cluster: Cluster) -> None:
        """``cluster`` serves from now on: its endpoints draining now are avoided by it."""
        holders, held = self.holders, self.held
        for host in cluster.hosts:
            key = host.endpoint
            first = holders.get(key)
            if first is not None:
                first.prev_holder = host
            host.next_holder = first
            host.prev_holder = None
            holders[key] = host
            if key in held and not host.draining:
                cluster.drain_began(host)

    def remove(self, cluster: Cluster) -> None:
        """``cluster`` no longer serves (a reload removed or replaced it): it leaves the
        index, and picks its draining endpoints again (its last requests, retries of old
        routes, are no longer told when a drain ends). One step per endpoint."""
        holders = self.holders
        for host in cluster.hosts:
            before, after = host.prev_holder, host.next_holder
            if after is not None:
                after.prev_holder = before
            if before is not None:
                before.next_holder = after
            elif holders.get(host.endpoint) is host:
                if after is None:
                    del holders[host.endpoint]
                else:
                    holders[host.endpoint] = after
            host.prev_holder = host.next_holder = None
            if host.draining:
                cluster.drain_ended(host)

    def clusters(self, key: str) -> list[Cluster]:
        """The serving clusters holding the endpoint ``key``, once per host."""
        found = []
        host = self.holders.get(key)
        while host is not None:
            if host.cluster is not None:
                found.append(host.cluster)
            host = host.next_holder
        return found

    def draining(self, key: str) -> bool:
        """Whether the endpoint ``key`` drains now."""
        return key in self.held

    def begin(self, conn: UpstreamConnection, keys: tuple[str, ...]) -> tuple[str, ...]:
        """``conn`` carried its upstream's drain notice: the endpoints ``keys`` (its host's
        identity, and the address it reached) that do not drain yet drain from now on, held
        by ``conn``, and every cluster holding one avoids it. Returns those endpoints (empty:
        each drains already, held by another connection)."""
        held, holders = self.held, self.holders
        began = tuple(key for key in keys if key not in held)
        for key in began:
            held[key] = conn
            host = holders.get(key)
            while host is not None:
                if host.cluster is not None:
                    host.cluster.drain_began(host)
                host = host.next_holder
        return began

    def end(self, conn: UpstreamConnection, keys: tuple[str, ...]) -> None:
        """The connection held for the drains of ``keys`` closed (or was held as long as
        ``timeouts.upstreamDrain`` allows): every cluster holding them picks them again."""
        held, holders = self.held, self.holders
        for key in keys:
            if held.get(key) is not conn:
                continue
            del held[key]
            host = holders.get(key)
            while host is not None:
                if host.draining and host.cluster is not None:
                    host.cluster.drain_ended(host)
                host = host.next_holder
