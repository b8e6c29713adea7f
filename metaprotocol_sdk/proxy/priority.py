"""Failover priorities: Envoy's priority levels, priority load and panic, for a cluster whose
endpoints have more than one priority (EDS ``LocalityLbEndpoints.priority``, which istiod
writes for locality failover).

A level's health is its healthy endpoints (those outlier detection has not ejected) over its
endpoints, times the overprovisioning factor 1.4, capped at 100%, in whole percents. Level 0
takes its health's share of requests, level 1 as much of the rest as its health, and so on;
when the healths add up to less than 100% they are scaled up to 100%. Panic (fewer healthy
endpoints than the outlier detection's ``minHealthPercent``) is judged per level, and only
when the levels together are short (their healths add up to less than 100%): a level in
panic balances over all of its endpoints. When every level is in panic, or none has health,
the levels take requests in proportion to their endpoints. All of this is computed when the
cluster's health changes (:meth:`~metaprotocol_sdk.proxy.upstream.Cluster.rebalance`), never
per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol as TypingProtocol
from typing import TypeVar

from .balancer import Balancer, Host, Level, PriorityBalancer, make_balancer
from .config.models import LoadBalancer

#: Envoy's default overprovisioning factor, 1.4, in percent.
OVERPROVISIONING = 140


class PrioritisedHost(Host, TypingProtocol):
    """A host with a failover priority and a health."""

    #: Its failover priority: 0 is the first level.
    priority: int
    #: Whether outlier detection has ejected it.
    ejected: bool


P = TypeVar("P", bound=PrioritisedHost)


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
    policy: LoadBalancer, hosts: Sequence[P], panic_percent: int
) -> tuple[Balancer[P], dict[int, int]]:
    """The balancer for hosts at several priorities, for their health now, and each
    priority's load (percent): a :class:`~metaprotocol_sdk.proxy.balancer.PriorityBalancer`
    over the levels that take load, or that one level's own balancer when only one does (all
    of level 0 healthy enough, as most of the time: a request then costs what it costs
    without priorities)."""
    by_priority: dict[int, list[P]] = {}
    for host in hosts:
        by_priority.setdefault(host.priority, []).append(host)
    order = sorted(by_priority)
    groups = [by_priority[p] for p in order]
    healthy = [[h for h in group if not h.ejected] for group in groups]
    load = priority_load(
        [(len(ok), len(group)) for ok, group in zip(healthy, groups, strict=True)], panic_percent
    )
    levels = [
        Level(priority, share, make_balancer(policy, group if panic else ok, group))
        for priority, group, ok, share, panic in zip(
            order, groups, healthy, load.loads, load.panic, strict=True
        )
        if share
    ]
    loads = dict(zip(order, load.loads, strict=True))
    if len(levels) == 1:
        return levels[0].balancer, loads
    return PriorityBalancer(levels, policy), loads
