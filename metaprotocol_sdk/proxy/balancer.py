"""Load balancers: pick one upstream host of a cluster for a request.

Endpoints may carry weights (``ServiceEntry`` ``endpoints[].weight``, EDS
``load_balancing_weight``). When every host of a balancer has the same weight,
:func:`make_balancer` returns the unweighted balancers, so a cluster without weights pays
nothing for them; otherwise each policy has a weighted form (see :func:`make_balancer`).
Endpoints at several failover priorities get a :class:`PriorityBalancer` over a balancer per
level (see :mod:`~metaprotocol_sdk.proxy.priority`); a cluster with one priority, as every
file configuration, gets the balancer of its policy and nothing more.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import math
import random
from collections.abc import Sequence
from itertools import accumulate
from typing import Generic, TypeVar
from typing import Protocol as TypingProtocol

from metaprotocol_sdk.metadata import Metadata

from .config.models import LoadBalancer


class Host(TypingProtocol):
    """What a balancer needs from a host: its in-flight request count, weight and key."""

    active: int
    #: The endpoint's load balancing weight, 1 to 2^32 - 1.
    weight: int

    @property
    def key(self) -> str: ...


H = TypeVar("H", bound=Host)


class Balancer(Generic[H]):
    """Base class: ``pick`` returns a host, or ``None`` when the cluster has none."""

    def __init__(self, hosts: Sequence[H]) -> None:
        self.hosts = list(hosts)

    def pick(self, metadata: Metadata) -> H | None:
        """The host for this request."""
        raise NotImplementedError


class RoundRobin(Balancer[H]):
    """Each host in turn."""

    def __init__(self, hosts: Sequence[H]) -> None:
        super().__init__(hosts)
        self._next = 0

    def pick(self, metadata: Metadata) -> H | None:
        hosts = self.hosts
        if not hosts:
            return None
        i = self._next
        if i >= len(hosts):
            i = 0
        self._next = i + 1
        return hosts[i]


class Random(Balancer[H]):
    """A uniformly random host (seedable for tests)."""

    def __init__(self, hosts: Sequence[H], seed: int | None = None) -> None:
        super().__init__(hosts)
        self._choice = random.Random(seed).choice

    def pick(self, metadata: Metadata) -> H | None:
        return self._choice(self.hosts) if self.hosts else None


class LeastRequest(Balancer[H]):
    """Power of two choices on in-flight requests (Envoy's default for LEAST_REQUEST)."""

    def __init__(self, hosts: Sequence[H], seed: int | None = None) -> None:
        super().__init__(hosts)
        self._rand = random.Random(seed)
        #: Which of two hosts wins their next tie (they take turns, as a random pair would
        #: share them; the first won every tie, so idle traffic all went to it).
        self._tie = 0

    def pick(self, metadata: Metadata) -> H | None:
        hosts = self.hosts
        n = len(hosts)
        if n <= 2:
            if not n:
                return None
            if n == 1:
                return hosts[0]
            first, second = hosts[0].active, hosts[1].active
            if first != second:
                return hosts[0] if first < second else hosts[1]
            tie = self._tie
            self._tie = 1 - tie
            return hosts[tie]
        a, b = self._rand.sample(hosts, 2)
        return a if a.active <= b.active else b


#: Longest weighted round-robin cycle precomputed as a list of picks (as a route's split does).
SCHEDULE_LIMIT = 1000


class WeightedRoundRobin(Balancer[H]):
    """Smooth weighted round robin: each cycle of ``sum(weights) / gcd(weights)`` picks gives
    every host exactly its weight's share, spread through the cycle rather than in a burst.

    An earliest-deadline-first schedule: host ``i`` (weight ``w``, of ``n`` hosts) is due at
    ``(k + phase_i) / w`` for its ``k``-th pick of a cycle, ``phase_i = (i + 1/2) / n``. Each
    host's picks are evenly spaced, and the staggered phases keep hosts of equal weight from
    falling due together, so after any number of picks each host is within about one pick
    of its share. A cycle of at most :data:`SCHEDULE_LIMIT` picks is computed once and walked
    (the cost of :class:`RoundRobin`); longer ones pop a heap, ``O(log n)`` a pick.
    """

    def __init__(self, hosts: Sequence[H]) -> None:
        super().__init__(hosts)
        n = len(self.hosts)
        divisor = math.gcd(*[h.weight for h in self.hosts]) or 1
        self._weights = [h.weight // divisor for h in self.hosts]
        self._phases = [(i + 0.5) / n for i in range(n)]
        #: (cycle, due, host index, picks of the host in this cycle); a tuple compares
        #: cycles exactly, so rounding in ``due`` never moves a pick to another cycle.
        self._heap = [(0, self._phases[i] / w, i, 0) for i, w in enumerate(self._weights)]
        heapq.heapify(self._heap)
        self._schedule: tuple[H, ...] = ()
        self._next = 0
        cycle = sum(self._weights)
        if cycle <= SCHEDULE_LIMIT:
            self._schedule = tuple(self._due() for _ in range(cycle))

    def pick(self, metadata: Metadata) -> H | None:
        schedule = self._schedule
        if schedule:
            i = self._next
            self._next = i + 1 if i + 1 < len(schedule) else 0
            return schedule[i]
        return self._due() if self._heap else None

    def _due(self) -> H:
        heap = self._heap
        cycle, _, i, k = heap[0]
        weight = self._weights[i]
        k += 1
        if k == weight:
            cycle, k = cycle + 1, 0
        heapq.heapreplace(heap, (cycle, (k + self._phases[i]) / weight, i, k))
        return self.hosts[i]


class WeightedRandom(Balancer[H]):
    """A random host, each with probability ``weight / sum(weights)`` (seedable for tests)."""

    def __init__(self, hosts: Sequence[H], seed: int | None = None) -> None:
        super().__init__(hosts)
        self._bounds = list(accumulate([h.weight for h in self.hosts]))
        self._total = self._bounds[-1] if self._bounds else 0
        self._random = random.Random(seed).random

    def pick(self, metadata: Metadata) -> H | None:
        hosts = self.hosts
        if not hosts:
            return None
        i = bisect.bisect_right(self._bounds, self._random() * self._total)
        return hosts[i] if i < len(hosts) else hosts[-1]  # a float product may round up


class WeightedLeastRequest(Balancer[H]):
    """Least request with weights, as Envoy documents it for unequal weights: an
    earliest-deadline-first schedule whose host weights are ``weight / (active + 1)``
    (``active_request_bias`` 1.0) at the time the host is picked and rescheduled, so a busy
    host is due later and a heavy one sooner."""

    def __init__(self, hosts: Sequence[H]) -> None:
        super().__init__(hosts)
        #: (due, sequence, host index): the sequence breaks ties first in, first out.
        self._heap = [(1.0 / h.weight, i, i) for i, h in enumerate(self.hosts)]
        heapq.heapify(self._heap)
        self._sequence = len(self._heap)

    def pick(self, metadata: Metadata) -> H | None:
        heap = self._heap
        if not heap:
            return None
        due, _, i = heap[0]
        host = self.hosts[i]
        self._sequence += 1
        heapq.heapreplace(heap, (due + (host.active + 1) / host.weight, self._sequence, i))
        return host


#: Ring points per host when the weights are equal (the lightest host's when they differ).
HOST_POINTS = 100


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class ConsistentHash(Balancer[H]):
    """A hash ring over one attribute's value; requests without it go round robin.

    The ring uses 64-bit BLAKE2b (stable across processes, unlike ``hash``; CRC32 is too linear
    to spread similar keys) with 100 points per host, so adding or removing a host moves only
    about ``1/n`` of the keys. With unequal weights a host has points in proportion to its
    weight (the lightest 100) within :data:`RING_LIMIT` (see :func:`ring_points`); a host's
    points are its first ones of the unweighted ring and more, so raising the weight of a
    host other than the lightest moves keys only to it while the ring is within its bound
    (the lightest host's weight, and a ring at its bound, set every host's points).
    """

    def __init__(
        self, hosts: Sequence[H], attribute: str, sizing: Sequence[H] | None = None
    ) -> None:
        super().__init__(hosts)
        self._key = attribute.lower()
        # ``sizing``: the cluster's every host, ejected ones included. Sized from them, a
        # host's points do not change when another is ejected: only the ejected one's keys
        # move (sized from the healthy ones, the lightest leaving rescaled all the others).
        counts = ring_points(
            [h.weight for h in self.hosts],
            HOST_POINTS,
            None if sizing is None else [h.weight for h in sizing],
        )
        ring = sorted(
            (_hash(f"{host.key}#{i}".encode()), n)
            for n, host in enumerate(self.hosts)
            for i in range(counts[n])
        )
        self._points = [p for p, _ in ring]
        self._owners = [self.hosts[n] for _, n in ring]
        self._fallback = _round_robin(self.hosts)

    def pick(self, metadata: Metadata) -> H | None:
        value = metadata.attributes.get_folded(self._key)
        if value is None or not self._points:
            return self._fallback.pick(metadata)
        # surrogatepass: a lone surrogate is a valid Java string (Hessian decodes one); strict
        # UTF-8 raised out of the read that carried the request.
        i = bisect.bisect(self._points, _hash(value.encode("utf-8", "surrogatepass")))
        return self._owners[i if i < len(self._owners) else 0]


#: Most points a weighted hash ring has beyond 100 per host (plus one per host at most):
#: 16384 points take about 20 ms to build, on each reload or ejection that changes the ring.
RING_LIMIT = 16384


def ring_points(
    weights: Sequence[int], points: int = HOST_POINTS, sizing: Sequence[int] | None = None
) -> list[int]:
    """How many ring points each host gets: ``points`` each when the weights are equal, else
    in proportion to the weights, the lightest host ``points``; when that would exceed
    ``max(RING_LIMIT, points * len(weights))`` points, scaled down to that total, with at least
    one point per host. So the ring never has more than that bound plus ``len(weights)``
    points, whatever the weights (a weight of 4e9 next to a weight of 1 does not make 4e11).

    ``sizing``: the weights that set the scale (the lightest, the total, the bound), when
    ``weights`` are some of them (the healthy hosts of a cluster, ``sizing`` all of its
    hosts): each host then has the points it has on the ring of all of them."""
    if not weights:
        return []
    basis = weights if sizing is None else sizing
    least = min(basis)
    if least == max(basis):
        return [points] * len(weights)
    limit = max(RING_LIMIT, points * len(basis))
    total = sum(basis)
    if total * points <= limit * least:
        return [(w * points + least // 2) // least for w in weights]
    return [max(1, w * limit // total) for w in weights]


class Level(Generic[H]):
    """One failover priority level as :class:`PriorityBalancer` chooses between them: its
    priority load (a percentage) is its weight, and its balancer picks its host."""

    def __init__(self, priority: int, load: int, balancer: Balancer[H]) -> None:
        self.key = f"priority {priority}"
        self.priority = priority
        #: The percentage of requests the level takes (its priority load).
        self.weight = load
        self.active = 0
        self.balancer = balancer


class PriorityBalancer(Balancer[H]):
    """Failover priorities (EDS ``LocalityLbEndpoints.priority``): a priority level first, by
    the levels' priority loads, then a host of that level by its own balancer.

    The level is a smooth weighted round robin over the loads (each cycle of at most 100
    picks gives every level exactly its share), a random draw by load for ``RANDOM`` (as
    Envoy draws), and for ``CONSISTENT_HASH`` the request's hash modulo 100 against the
    loads (as Envoy does), so one key stays on one level while the loads stand. Built only
    by :func:`~metaprotocol_sdk.proxy.priority.priority_balancer`, when more than one level
    takes load; the loads change only when it is rebuilt (on a health change).
    """

    def __init__(self, levels: Sequence[Level[H]], policy: LoadBalancer) -> None:
        super().__init__([h for level in levels for h in level.balancer.hosts])
        self.levels = list(levels)
        self._bounds = list(accumulate([level.weight for level in self.levels]))
        self._chooser: Balancer[Level[H]] = (
            WeightedRandom(self.levels)
            if policy.policy == "RANDOM"
            else WeightedRoundRobin(self.levels)
        )
        self._key: str | None = None
        if policy.policy == "CONSISTENT_HASH" and policy.hash_attribute is not None:
            self._key = policy.hash_attribute.lower()

    def pick(self, metadata: Metadata) -> H | None:
        key = self._key
        if key is not None:
            value = metadata.attributes.get_folded(key)
            if value is not None:
                point = _hash(value.encode("utf-8", "surrogatepass")) % 100
                i = bisect.bisect_right(self._bounds, point)
                level = self.levels[i if i < len(self.levels) else -1]
                return level.balancer.pick(metadata)
        chosen = self._chooser.pick(metadata)
        return None if chosen is None else chosen.balancer.pick(metadata)


def _equal(hosts: Sequence[Host]) -> bool:
    weight = hosts[0].weight if hosts else 1
    return all(h.weight == weight for h in hosts)


def _round_robin(hosts: Sequence[H]) -> Balancer[H]:
    return RoundRobin(hosts) if _equal(hosts) else WeightedRoundRobin(hosts)


def make_balancer(
    policy: LoadBalancer, hosts: Sequence[H], cluster: Sequence[H] | None = None
) -> Balancer[H]:
    """The balancer for a policy; the weighted form when the hosts' weights differ
    (:class:`WeightedRoundRobin`, :class:`WeightedRandom`, :class:`WeightedLeastRequest`, and
    a :class:`ConsistentHash` ring with weighted points), else the plain one. ``cluster``:
    all of the cluster's hosts when ``hosts`` are its healthy ones (they size the ring)."""
    if policy.policy == "CONSISTENT_HASH":
        assert policy.hash_attribute is not None
        return ConsistentHash(hosts, policy.hash_attribute, cluster)
    equal = _equal(hosts)
    if policy.policy == "RANDOM":
        return Random(hosts) if equal else WeightedRandom(hosts)
    if policy.policy == "LEAST_REQUEST":
        return LeastRequest(hosts) if equal else WeightedLeastRequest(hosts)
    return RoundRobin(hosts) if equal else WeightedRoundRobin(hosts)
