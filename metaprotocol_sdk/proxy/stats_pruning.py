"""Stats series of names that left the configuration: found, and dropped once unused.

A reload (file, signal or xDS) that renames a listener, route, destination or cluster leaves
the old name's series behind. :class:`StatsPruner` drops them once nothing in force or in
flight names them: a series stays while its name is served (a listener, a route and its
destinations, a cluster, a destination service of the serving configuration) or used (by an
open connection, its listener or cluster; by a request in flight, its listener, route,
destination and cluster; by a request a filter holds, every destination of its route; by an
open stream, its route and destination, which count it when it ends). Those
kept only because they are used are looked at again by the engine's housekeeping sweeps, once
what used them is done. The counts of dropped series go into the registry's
``stats="removed"`` series (see :meth:`.stats.Stats.prune`), so that sums never go back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .downstream import Downstream, ListenerRuntime
from .router import CompiledRoute, Target
from .stats import Labels
from .steps import Steps, finish, paced
from .streams import Stream
from .upstream import Cluster, UpstreamConnection

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("metaprotocol.proxy")

#: Shortest interval between two passes of the sweep over the stats series, while requests
#: in flight since a reload keep old series (a pass is O(series + routes + requests)).
STATS_PRUNE_INTERVAL = 2.0


class StatsPruner:
    """When to look for series of removed names, and what kept some at the last look."""

    __slots__ = ("holders", "pruned_at", "stale")

    def __init__(self) -> None:
        #: A reload (or a refused one) left series that may name what is gone: the next
        #: housekeeping sweep looks.
        self.stale = False
        #: What kept series of names gone at the last look (connections, requests).
        self.holders: list[object] = []
        #: When the last look was (``loop.time()``).
        self.pruned_at = 0.0

    def due(self, engine: Engine, now: float) -> bool:
        """Whether the housekeeping sweep at ``now`` should look again: something may be
        gone, the last look is :data:`STATS_PRUNE_INTERVAL` old, and one of what kept series
        then is done (while all are still open or in flight a new look would find the same)."""
        return (
            self.stale and now - self.pruned_at >= STATS_PRUNE_INTERVAL and not self._held(engine)
        )

    def _held(self, engine: Engine) -> bool:
        holders = self.holders
        if not holders:
            return False
        for holder in holders:
            if isinstance(holder, Downstream):
                if holder not in engine.downstreams:
                    return False
            elif isinstance(holder, UpstreamConnection):
                if holder not in engine.upstreams:
                    return False
            elif isinstance(holder, Stream):
                if holder.ended:
                    return False
            elif holder.done:  # type: ignore[attr-defined]
                return False
        return True

    def prune(self, engine: Engine, now: float | None) -> int:
        """Drop the series of ``engine`` whose names are neither served nor used; return how
        many went. ``now``: the loop's time (``None`` before the engine started)."""
        return finish(self._prune(engine, now))

    def _prune(self, engine: Engine, now: float | None) -> Steps[int]:
        """:meth:`prune` in steps: the scopes served, a route at a time (a reload's serving
        configuration, which only a reload changes, under its lock), then the rest at once."""
        serving: set[Labels] = set()
        runtimes = set(engine.listeners.values())
        for runtime in runtimes:
            serving.add((("listener", runtime.name),))
            target_scopes(runtime._unrouted, serving)
            for route in runtime.table.routes:
                route_scopes(route, serving)
                yield
        for cluster in engine.clusters.values():
            cluster_scopes(cluster, serving)
        used: set[Labels] = set()
        holders: list[object] = []  # what keeps series of names no longer served
        # Each listener, cluster and route once, however many connections or requests.
        gone_by: dict[object, bool] = {}

        def unserved(owner: Any, scopes: Callable[[Any, set[Labels]], None]) -> bool:
            found = gone_by.get(owner)
            if found is None:
                mine: set[Labels] = set()
                scopes(owner, mine)
                mine -= serving
                used.update(mine)
                found = gone_by[owner] = bool(mine)
            return found

        for downstream in engine.downstreams:
            listener = downstream.listener
            if listener not in runtimes and unserved(listener, runtime_scopes):
                holders.append(downstream)
            if downstream.streams:
                for stream in downstream.streams.values():
                    held = unserved(stream.route, route_scopes)
                    if unserved(stream.target, target_scopes) or held:
                        holders.append(stream)
        for upstream in engine.upstreams:
            if unserved(upstream.cluster, cluster_scopes):
                holders.append(upstream)
        if now is not None:
            for item in engine.deadlines.waiting():
                held = unserved(item.route, route_scopes)
                target = getattr(item, "target", None)
                if target is not None and unserved(target, target_scopes):
                    held = True
                if held:
                    holders.append(item)
        gone = engine.stats.prune(serving | used)
        if now is not None:
            self.pruned_at = now
        self.holders = holders
        self.stale = bool(holders)
        if gone:
            # Caches of series by label, for names made on first use: forget them all (they
            # are found again in the registry; a dropped one is made anew).
            runtimes.update(o for o in gone_by if isinstance(o, ListenerRuntime))
            for runtime in runtimes:
                runtime.forget_series()
            engine.mirror_sink.forget_series()
            if engine.istio is not None:
                engine.istio.forget_series()
        return gone

    def prune_safely(self, engine: Engine, now: float | None) -> None:
        """:meth:`prune`, where its failure must not stop the caller (a reload already
        swapped in, the housekeeping sweep): logged, and tried again at the next sweep."""
        try:
            self.prune(engine, now)
        except Exception:
            self._failed()

    async def prune_paced(self, engine: Engine, now: float | None) -> None:
        """:meth:`prune_safely`, the scopes served found in slices (:func:`.steps.paced`):
        after a reload, under its lock (12 000 routes: 0.16 s in one piece)."""
        try:
            await paced(self._prune(engine, now))
        except Exception:
            self._failed()

    def _failed(self) -> None:
        self.stale = True
        self.holders = []
        log.exception("dropping the stats series of removed names failed")


def target_scopes(target: Target, out: set[Labels]) -> None:
    """The stats scopes ``target`` counts into (see :func:`.stats.scope`)."""
    out.add(tuple(target.labels.items()))  # listener, route, destination: scope order
    if target.cluster is not None:
        cluster_scopes(target.cluster, out)
    if target.telemetry is not None:
        out.add((("destination_service", target.telemetry.service),))


def route_scopes(route: CompiledRoute, out: set[Labels]) -> None:
    """The stats scopes of ``route`` (its own, its destinations', its mirror's)."""
    local = route.local
    out.add((("listener", local.labels["listener"]), ("route", route.name)))
    target_scopes(local, out)
    for target in route.targets:
        target_scopes(target, out)
    if route.mirror is not None:
        target_scopes(route.mirror.target, out)


def runtime_scopes(runtime: ListenerRuntime, out: set[Labels]) -> None:
    """The stats scopes of a listener and its routes."""
    out.add((("listener", runtime.name),))
    target_scopes(runtime._unrouted, out)
    for route in runtime.table.routes:
        route_scopes(route, out)


def cluster_scopes(cluster: Cluster, out: set[Labels]) -> None:
    """The stats scopes of a cluster (its name, its destination service)."""
    out.add((("cluster", cluster.name),))
    out.add((("destination_service", cluster.service),))
