"""Slow start: Istio's ``loadBalancer.warmup`` (and ``warmupDurationSecs``), Envoy's
``slow_start_config`` of ``ROUND_ROBIN`` and ``LEAST_REQUEST`` clusters.

An endpoint new to a cluster takes a growing part of its share for the warm-up window, as
Envoy computes it: ``weight * max(minimumPercent / 100, time_factor ** (1 / aggression))``
with ``time_factor = max(elapsed, 1ms) / window``, ``elapsed`` the time since the endpoint
joined. Which endpoints warm, as in Envoy (without active health checks, which the engine
does not make):

- every endpoint of a cluster new to the engine (its first configuration, or a cluster
  first named by a reload or by CDS) starts warming when the cluster is made, all together:
  their factors are equal, so none is favoured and the cluster balances by its weights;
- an endpoint a reload or an EDS update adds to a cluster starts warming then; the
  endpoints that stay keep their start (a change to the cluster's other settings restarts
  nobody's warm-up, where Envoy makes a new cluster of a CDS change);
- an endpoint outlier detection ejected does not warm again when readmitted (Envoy warms
  again only after an active health check passes).

Picks read no time: while endpoints of a cluster have different factors, the cluster's
balancer is rebuilt with effective weights (in hundredths of the endpoint weights, at least
1) every :func:`step_interval` (``window / STEPS``, within ``MIN_STEP`` and ``MAX_STEP``),
and once more with the endpoint weights when the last warming endpoint's window ends. A
rebuild whose weights are unchanged is skipped, so an endpoint added makes at most about
``STEPS + 2`` rebuilds for a window of at most ``STEPS * MAX_STEP``, and one a ``MAX_STEP``
for a longer one. The rebuilds of all warming clusters together give weights to at most
:data:`HOSTS_PER_SECOND` endpoints a second: while more warm, each cluster's steps are
further apart. A cluster without ``warmup`` has no :class:`SlowStart` and pays nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from .config.models import Warmup

if TYPE_CHECKING:
    from .upstream import Cluster

#: Balancer rebuilds across one warm-up window.
STEPS = 20
#: Least time between two rebuilds (a window of 1ms rebuilds once, when it ends).
MIN_STEP = 0.1
#: Most time between two rebuilds (a window of a day rebuilds once a minute).
MAX_STEP = 60.0
#: Effective weights are in hundredths of an endpoint's weight.
SCALE = 100
#: Endpoints the warm-up rebuilds of all clusters together may give weights a second (a
#: fifth of the loop or so, at about a microsecond an endpoint): a warming cluster's next
#: rebuild waits at least the endpoints of the engine's warming clusters over this.
HOSTS_PER_SECOND = 200_000
#: Envoy's least ``time_factor``: one millisecond of the window.
_LEAST_ELAPSED = 0.001


def weight_factor(elapsed: float, warmup: Warmup) -> float:
    """The part of its weight (0 to 1) an endpoint has ``elapsed`` seconds after it
    started warming (Envoy's ``applySlowStartFactor``); 1.0 once the window is over."""
    window = warmup.duration
    if elapsed >= window:
        return 1.0
    time_factor = max(elapsed, _LEAST_ELAPSED) / window
    if warmup.aggression != 1.0:
        time_factor **= 1.0 / warmup.aggression
    return max(time_factor, warmup.minimum_percent / 100)


def step_interval(warmup: Warmup) -> float:
    """Time between two rebuilds of a warming cluster's balancer."""
    return min(MAX_STEP, max(MIN_STEP, warmup.duration / STEPS))


def warm_starts(
    keys: Iterable[str], previous: Mapping[str, float] | None, now: float
) -> dict[str, float]:
    """When each endpoint (by ``host:port``) started warming: as in the cluster it replaces
    (``previous``) for one that stays, ``now`` for one new to it, and ``now`` for all of a
    cluster new to the engine (``previous`` ``None``)."""
    if previous is None:
        return dict.fromkeys(keys, now)
    return {key: previous.get(key, now) for key in keys}


def warming_weights(
    weights: Sequence[int], starts: Sequence[float], now: float, warmup: Warmup
) -> list[int] | None:
    """The weights to balance by at ``now``, in hundredths of the endpoint ``weights``
    (at least 1), or ``None`` when the endpoint weights give the same shares: no endpoint
    is warming, or all started together (their factors are equal)."""
    if len(set(starts)) < 2 or all(now - start >= warmup.duration for start in starts):
        return None
    return [
        max(1, round(weight * SCALE * weight_factor(now - start, warmup)))
        for weight, start in zip(weights, starts, strict=True)
    ]


class SlowStart:
    """The warm-up of one cluster's endpoints: their starts, and the rebuilds of its
    balancer while they differ. Made by :func:`attach_slow_start`."""

    def __init__(self, cluster: Cluster, warmup: Warmup, starts: dict[str, float]) -> None:
        self.cluster = cluster
        self.warmup = warmup
        #: When each endpoint started warming, by ``host:port`` (loop time).
        self.starts = starts
        #: The endpoints' own weights (a warming cluster's hosts have effective ones).
        self.endpoint_weights = [h.weight for h in cluster.hosts]
        self.interval = step_interval(warmup)
        #: Balancer rebuilds made for the warm-up.
        self.rebuilds = 0
        self._timer: asyncio.TimerHandle | None = None
        self._done = False
        #: Its endpoints, while counted in the engine's ``warming_hosts``.
        self._counted = 0

    @property
    def running(self) -> bool:
        """Whether an update is scheduled."""
        return self._timer is not None

    @property
    def warming(self) -> dict[str, float]:
        """Each endpoint balanced by less than its weight now (as of the last rebuild), with
        the part of its weight it has, in percent."""
        if self._done:
            return {}  # the endpoint weights again (or a cluster no longer serving)
        pairs = list(zip(self.cluster.hosts, self.endpoint_weights, strict=True))
        if all(host.weight == weight for host, weight in pairs):
            return {}  # balanced by the endpoint weights
        return {
            host.key: 100 * host.weight / (SCALE * weight)
            for host, weight in pairs
            if host.weight < SCALE * weight
        }

    def update(self) -> bool:
        """Give the hosts their weights for now and rebuild the balancer if they changed;
        whether endpoints are still warming (another update is due)."""
        hosts = self.cluster.hosts
        now = self.cluster.engine.loop.time()
        starts = [self.starts[h.key] for h in hosts]
        weights = warming_weights(self.endpoint_weights, starts, now, self.warmup)
        target = self.endpoint_weights if weights is None else weights
        if any(h.weight != w for h, w in zip(hosts, target, strict=True)):
            for host, weight in zip(hosts, target, strict=True):
                host.weight = weight
            self.cluster.rebalance()
            self.rebuilds += 1
        return weights is not None

    def start(self) -> None:
        """Run the updates from now on (the cluster is serving); again: nothing."""
        if self._timer is None and not self._done:
            self._step()

    def stop(self) -> None:
        """No more updates (the cluster no longer serves): its balancer stays as it is,
        for the requests it still has."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._finish()

    def _finish(self) -> None:
        """No update due any more: the engine no longer counts its endpoints warming."""
        self._done = True
        self.cluster.engine.warming_hosts -= self._counted
        self._counted = 0

    def _step(self) -> None:
        self._timer = None
        cluster = self.cluster
        if cluster.retired or cluster.engine.draining:
            self.stop()
            return
        if not self.update():
            self._finish()
            return
        engine = cluster.engine
        if not self._counted:
            self._counted = len(cluster.hosts)
            engine.warming_hosts += self._counted
        loop = engine.loop
        now = loop.time()
        # The rebuilds of all warming clusters together update at most HOSTS_PER_SECOND
        # endpoints a second, however many clusters warm (a push that adds an endpoint to
        # each cluster of a mesh starts them all at once).
        spacing = max(self.interval, engine.warming_hosts / HOSTS_PER_SECOND)
        # Not past the last window's end, so the endpoint weights come back on time (just
        # after it: the loop may run a timer up to its clock's resolution early).
        last_end = max(self.starts.values()) + self.warmup.duration + _LEAST_ELAPSED
        due = min(now + spacing, last_end)
        self._timer = loop.call_at(due, self._step)


def attach_slow_start(cluster: Cluster, serving: Cluster | None) -> None:
    """Give ``cluster`` its :class:`SlowStart` when its policy has a ``warmup``, with the
    starts of ``serving`` (the cluster it replaces, if any) for the endpoints that stay,
    and its weights for now. Its rebuilds begin when it serves (:func:`start_slow_starts`):
    a cluster of a reload that is refused never schedules any."""
    warmup = cluster.policy.warmup
    if warmup is None:
        return
    previous = None
    if serving is not None and serving.slow_start is not None:
        previous = serving.slow_start.starts
    engine = cluster.engine
    starts = warm_starts((h.key for h in cluster.hosts), previous, engine.loop.time())
    cluster.slow_start = SlowStart(cluster, warmup, starts)
    cluster.slow_start.update()
    # Shown by /config_dump, which is built once per configuration but compares its
    # sections at each request: warm-ups change by themselves.
    engine.dump_sections.setdefault(DUMP_SECTION, lambda: warming_now(engine.clusters.values()))


#: The ``/config_dump`` section of the endpoints warming, made by the first warm-up.
DUMP_SECTION = "slowStart"


def warming_now(clusters: Iterable[Cluster]) -> dict[str, dict[str, float]]:
    """The endpoints warming now, by cluster name: the part of its weight each has, in
    percent."""
    out = {}
    for cluster in clusters:
        if cluster.slow_start is not None:
            warming = cluster.slow_start.warming
            if warming:
                out[cluster.name] = warming
    return out


def start_slow_starts(serving: Iterable[Cluster], retired: Iterable[Cluster] = ()) -> None:
    """At start and at each reload's swap: start the updates of the serving clusters that
    warm endpoints, and end those of the clusters a reload ``retired`` (replaced or
    removed), rather than at their next step."""
    for cluster in retired:
        if cluster.slow_start is not None:
            cluster.slow_start.stop()
    for cluster in serving:
        if cluster.slow_start is not None:
            cluster.slow_start.start()
