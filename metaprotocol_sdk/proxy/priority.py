"""Failover priorities: Envoy's priority levels, priority load and panic, for a cluster whose
endpoints have more than one priority (EDS ``LocalityLbEndpoints.priority``, which istiod
writes for locality failover).

A level's health is its healthy endpoints (those outlier detection has not ejected, and not
draining after their upstream's drain notice) over its endpoints, times the overprovisioning
factor 1.4, capped at 100%, in whole percents. Level 0 takes its health's share of requests,
level 1 as much of the rest as its health, and so on; when the healths add up to less than
100% they are scaled up to 100%. Panic (fewer healthy
endpoints than the outlier detection's ``minHealthPercent``) is judged per level, and only
when the levels together are short (their healths add up to less than 100%): a level in
panic balances over all of its endpoints. When every level is in panic, or none has health,
the levels take requests in proportion to their endpoints. All of this is computed when the
cluster's health changes (:meth:`~metaprotocol_sdk.proxy.upstream.Cluster.rebalance`), never
per request.

Locality weighted load balancing (``distribute``, or EDS locality weights with
``locality_weighted_lb_config``) then picks a locality of the level, as Envoy does: by a
smooth weighted round robin over its localities' *effective* weights, each its weight times
its availability (its healthy endpoints over its endpoints, times 1.4, at most 100%, in
whole percents), and a host of that locality by the cluster's policy. A level in panic
balances over all of its endpoints, localities aside; a level whose effective weights are in
proportion to its healthy endpoints' weights (every locality fully available, as istiod
writes weights without ``distribute``) is balanced as one, at the plain balancer's cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol as TypingProtocol
from typing import TypeVar

from .balancer import (
    SCHEDULE_LIMIT,
    Balancer,
    Host,
    Level,
    Locality,
    LocalityBalancer,
    PriorityBalancer,
    make_balancer,
)
from .config.models import LoadBalancer

#: Envoy's default overprovisioning factor, 1.4, in percent.
OVERPROVISIONING = 140


class PrioritisedHost(Host, TypingProtocol):
    """A host with a failover priority and a health."""

    #: Its failover priority: 0 is the first level.
    priority: int
    #: Whether outlier detection has ejected it.
    ejected: bool
    #: Its locality (for locality weighted balancing; ``""``: none).
    locality: str
    #: Its locality's weight (locality weighted balancing; 0: its locality takes none).
    locality_weight: int


P = TypeVar("P", bound=PrioritisedHost)
H = TypeVar("H", bound=Host)


def level_health(healthy: int, total: int) -> int:
    """A level's health in percent: ``healthy / total`` times the overprovisioning factor,
    at most 100 (0 for an empty level)."""
    return min(100, OVERPROVISIONING * healthy // total) if total else 0


@dataclass(frozen=True)
class PriorityLoad:
    """The share of requests (percent, adding up to 100) and the panic of each level."""

    loads: tuple[int, ...]
    panic: tuple[bool, ...]


def priority_load(levels: Sequence[tuple[int, int]], panic_percent: int) -> PriorityLoad:
    """Envoy's priority load for levels given as (healthy, total) endpoints, in priority
    order; ``panic_percent``: the cluster's panic threshold (``minHealthPercent``)."""
    if not levels:
        return PriorityLoad((), ())
    health = [level_health(healthy, total) for healthy, total in levels]
    available = min(100, sum(health))
    panic = tuple(
        available < 100 and healthy * 100 < panic_percent * total for healthy, total in levels
    )
    if available == 0 or all(panic):
        # Every level in panic: each takes its part of all the endpoints.
        totals = [total for _, total in levels]
        return PriorityLoad(_shares(totals, sum(totals)), (True,) * len(levels))
    return PriorityLoad(_shares(health, available), panic)


def _shares(amounts: Sequence[int], total: int) -> tuple[int, ...]:
    """Whole percents, in order: each ``amount / total`` of 100 as far as what is left allows,
    the rounding left over to the first level with any."""
    loads = []
    left = 100
    for amount in amounts:
        load = min(left, amount * 100 // total)
        loads.append(load)
        left -= load
    first = next((i for i, amount in enumerate(amounts) if amount), 0)
    loads[first] += left
    return tuple(loads)


def priority_balancer(
    policy: LoadBalancer,
    hosts: Sequence[P],
    panic_percent: int,
    by_locality: bool = False,
    hashed: Callable[[int, Sequence[P], Sequence[P]], Balancer[P] | None] | None = None,
    avoided: Collection[P] = (),
) -> tuple[Balancer[P], dict[int, int]]:
    """The balancer for hosts at several priorities, for their health now, and each
    priority's load (percent): a :class:`~metaprotocol_sdk.proxy.balancer.PriorityBalancer`
    over the levels that take load, or that one level's own balancer when only one does (all
    of level 0 healthy enough, as most of the time: a request then costs what it costs
    without priorities). ``by_locality``: each level picks a locality by its weight first
    (:func:`locality_balancer`); ``hashed``: the hash balancer the caller keeps for a
    level's priority, hosts to balance over and hosts (``None``: build it); ``avoided``:
    hosts counted as unhealthy although not ejected (draining: their upstream sent its drain
    notice), so that a level of them fails over as one of ejected hosts does."""
    by_priority: dict[int, list[P]] = {}
    for host in hosts:
        by_priority.setdefault(host.priority, []).append(host)
    order = sorted(by_priority)
    groups = [by_priority[p] for p in order]
    healthy = [[h for h in group if not (h.ejected or h in avoided)] for group in groups]
    load = priority_load(
        [(len(ok), len(group)) for ok, group in zip(healthy, groups, strict=True)], panic_percent
    )
    levels = [
        Level(
            priority,
            share,
            _level_balancer(
                policy,
                group,
                ok,
                panic,
                by_locality,
                None if hashed is None else partial(hashed, priority),
            ),
        )
        for priority, group, ok, share, panic in zip(
            order, groups, healthy, load.loads, load.panic, strict=True
        )
        if share
    ]
    loads = dict(zip(order, load.loads, strict=True))
    if len(levels) == 1:
        return levels[0].balancer, loads
    return PriorityBalancer(levels, policy), loads


def _level_balancer(
    policy: LoadBalancer,
    group: Sequence[P],
    healthy: Sequence[P],
    panic: bool,
    by_locality: bool,
    hashed: Callable[[Sequence[P], Sequence[P]], Balancer[P] | None] | None,
) -> Balancer[P]:
    """A level's balancer: over all of its hosts in panic (localities aside, as Envoy),
    else over its healthy ones, by locality first when ``by_locality``."""
    if by_locality and not panic and policy.policy != "CONSISTENT_HASH":
        return locality_balancer(policy, group, healthy)
    hosts = group if panic else healthy
    kept = None if hashed is None else hashed(hosts, group)
    return kept if kept is not None else make_balancer(policy, hosts, group)


def effective_weights(localities: Sequence[tuple[int, int, int]]) -> list[int]:
    """Envoy's effective locality weights for localities given as (weight, healthy, total)
    endpoints: each weight times its availability (:func:`level_health`, percent), or the
    weights themselves when every locality that has a weight is fully available."""
    health = [level_health(healthy, total) for _, healthy, total in localities]
    if all(h == 100 for h, (w, _, _) in zip(health, localities, strict=True) if w):
        return [w for w, _, _ in localities]
    return [w * h for h, (w, _, _) in zip(health, localities, strict=True)]


def locality_balancer(
    policy: LoadBalancer, hosts: Sequence[P], healthy: Sequence[P]
) -> Balancer[P]:
    """The balancer of a level's ``hosts`` (``healthy``: those not ejected) by their
    localities' weights: a :class:`LocalityBalancer` over the localities with an effective
    weight, or the policy's balancer over the healthy hosts when the effective weights are in
    proportion to the localities' healthy endpoint weights (the same traffic, a request's
    plain cost) or when no locality has one (Envoy then balances over the level's healthy
    hosts). Linear in the hosts."""
    groups: dict[str, list[P]] = {}
    ok: dict[str, list[P]] = {}
    for host in hosts:
        groups.setdefault(host.locality, []).append(host)
        ok.setdefault(host.locality, [])
    for host in healthy:
        ok[host.locality].append(host)
    names = list(groups)
    weights = effective_weights(
        [(groups[n][0].locality_weight, len(ok[n]), len(groups[n])) for n in names]
    )
    sums = [sum(h.weight for h in ok[n]) for n in names]
    pairs = [(w, s) for w, s in zip(weights, sums, strict=True) if s]
    if not any(weights) or all(w and w * pairs[0][1] == pairs[0][0] * s for w, s in pairs):
        return make_balancer(policy, healthy, hosts)
    return LocalityBalancer(
        [
            Locality(n, w, make_balancer(policy, ok[n], groups[n]))
            for n, w in zip(names, schedulable(weights), strict=True)
            if w
        ]
    )


#: Most of the picks that scaling locality weights down to a schedule may move.
SCALING_ERROR = 0.01


def schedulable(weights: Sequence[int]) -> list[int]:
    """``weights`` as they are when their cycle (their sum over their greatest common
    divisor) fits a precomputed schedule of :data:`~.balancer.SCHEDULE_LIMIT` picks, else
    scaled down to fit it (at least 1 for a weight that is not 0) when that moves at most
    :data:`SCALING_ERROR` of the picks: a locality pick is a walk of the schedule. Else (many
    localities, where rounding each up moved a third of the traffic and more) the weights
    as they are, picked from the heap of :class:`~.balancer.WeightedRoundRobin`,
    ``O(log n)`` a pick. Linear in the weights."""
    total = sum(weights)
    if total // (math.gcd(*weights) or 1) <= SCHEDULE_LIMIT:
        return list(weights)
    parts = max(0, SCHEDULE_LIMIT - len(weights))  # room for each rounded-up 0
    scaled = [max(1, w * parts // total) if w else 0 for w in weights]
    cycle = sum(scaled)
    moved = sum(abs(s / cycle - w / total) for w, s in zip(weights, scaled, strict=True)) / 2
    return scaled if moved <= SCALING_ERROR else list(weights)
