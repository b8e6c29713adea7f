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
import struct
import sys
from array import array
from collections.abc import Sequence
from itertools import accumulate, compress
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


class Client(TypingProtocol):
    """What a balancer may read of the connection a request came on."""

    def source_ip(self) -> str | None:
        """The client's IP address (``None``: not known)."""
        ...


class Balancer(Generic[H]):
    """Base class: ``pick`` returns a host, or ``None`` when the cluster has none."""

    def __init__(self, hosts: Sequence[H]) -> None:
        self.hosts = list(hosts)

    def pick(self, metadata: Metadata, client: Client | None = None) -> H | None:
        """The host for this request."""
        raise NotImplementedError

    def pick_again(self, metadata: Metadata, client: Client | None, attempt: int) -> H | None:
        """The host for a retry's ``attempt``-th pick (from 1) after its first one gave the
        host that failed: another pick, which the hashing balancers move along, as Envoy's
        do for its ``previous_hosts`` retry predicate (their picks repeat otherwise)."""
        return self.pick(metadata, client)


class RoundRobin(Balancer[H]):
    """Each host in turn."""

    def __init__(self, hosts: Sequence[H]) -> None:
        super().__init__(hosts)
        self._next = 0

    def pick(self, metadata: Metadata, client: Client | None = None) -> H | None:
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

    def pick(self, metadata: Metadata, client: Client | None = None) -> H | None:
        return self._choice(self.hosts) if self.hosts else None


class LeastRequest(Balancer[H]):
    """Power of two choices on in-flight requests (Envoy's default for LEAST_REQUEST)."""

    def __init__(self, hosts: Sequence[H], seed: int | None = None) -> None:
        super().__init__(hosts)
        self._random = random.Random(seed).random
        #: Which of two hosts wins their next tie (they take turns, as a random pair would
        #: share them; the first won every tie, so idle traffic all went to it).
        self._tie = 0

    def pick(self, metadata: Metadata, client: Client | None = None) -> H | None:
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
        # Two distinct hosts, uniformly (``Random.sample`` took 1.2 us a pick, this 0.3).
        draw = self._random
        i = int(draw() * n)
        j = int(draw() * (n - 1))
        a, b = hosts[i], hosts[j + 1 if j >= i else j]
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

    def pick(self, metadata: Metadata, client: Client | None = None) -> H | None:
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

    def pick(self, metadata: Metadata, client: Client | None = None) -> H | None:
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

    def pick(self, metadata: Metadata, client: Client | None = None) -> H | None:
        heap = self._heap
        if not heap:
            return None
        due, _, i = heap[0]
        host = self.hosts[i]
        self._sequence += 1
        heapq.heapreplace(heap, (due + (host.active + 1) / host.weight, self._sequence, i))
        return host


#: Ring points of the lightest host at least, however many hosts share the ring.
HOST_POINTS = 100

#: Ring points in all at least, unless ``ringHash.minimumRingSize`` says otherwise: Istio's
#: default for every ``consistentHash`` (it writes Envoy's ``minimum_ring_size`` 1024).
RING_SIZE = 1024

#: Istio's and Envoy's default Maglev table size (a prime).
MAGLEV_TABLE_SIZE = 65537

#: The largest ring (``minimumRingSize``) and Maglev table (``tableSize``, a prime: 2^17 - 1)
#: a configuration may ask for. Either is built again at each reload or ejection that changes
#: the cluster's endpoints, on the engine's only thread: 0.1 to 0.2 s of CPU at this size.
MAX_RING_SIZE = 131072
MAX_MAGLEV_TABLE_SIZE = 131071

#: Most points a weighted hash ring has beyond its minimum and :data:`HOST_POINTS` per host
#: (plus one per host at most), however uneven the weights.
RING_LIMIT = 16384


#: The largest 64-bit hash (a Maglev retry flips a key's hash by ``2^64 - attempt``).
_MASK64 = 2**64 - 1


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _host_points(key: str, count: int) -> bytes:
    """A host's first ``count`` ring points, as big-endian 64-bit words: those of BLAKE2b
    digests of ``key#0``, ``key#1``, ... (eight a digest). A host's points never depend on
    the other hosts or on ``count`` beyond how many are taken."""
    digests = b"".join(
        hashlib.blake2b(f"{key}#{j}".encode(), digest_size=64).digest()
        for j in range((count + 7) // 8)
    )
    return digests[: 8 * count]


class Hashing(Balancer[H]):
    """Base of the hashing balancers: the request's hash key is a metadata attribute's value
    (``consistentHash.httpHeaderName``, case-insensitive) or, with ``attribute`` ``None``,
    the client's IP address (``useSourceIp``). Requests without one go round robin."""

    def __init__(self, hosts: Sequence[H], attribute: str | None) -> None:
        super().__init__(hosts)
        self._key = hash_key(attribute)
        self._fallback = _round_robin(self.hosts)

    def hash_of(self, metadata: Metadata, client: Client | None) -> int | None:
        """The request's 64-bit hash (``None``: it has no key)."""
        return request_hash(self._key, metadata, client)


def hash_key(attribute: str | None) -> str | None:
    """The key :func:`request_hash` reads for ``consistentHash``'s attribute (case-folded, as
    ``Attributes.get_folded`` wants it); ``None``: the client's IP address."""
    return None if attribute is None else attribute.lower()


def request_hash(key: str | None, metadata: Metadata, client: Client | None) -> int | None:
    """The 64-bit hash of a request's key: the attribute ``key`` (lower case) or, with
    ``key`` ``None``, the client's IP address; ``None`` when the request has none."""
    if key is None:
        value = None if client is None else client.source_ip()
    else:
        value = metadata.attributes.get_folded(key)
    if value is None:
        return None
    # surrogatepass: a lone surrogate is a valid Java string (Hessian decodes one); strict
    # UTF-8 raised out of the read that carried the request.
    return _hash(value.encode("utf-8", "surrogatepass"))


class ConsistentHash(Hashing[H]):
    """A hash ring (Istio's ``ringHash``, its default).

    64-bit BLAKE2b points (stable across processes, unlike ``hash``; CRC32 is too linear to
    spread similar keys), at least ``minimum`` of them in all and :data:`HOST_POINTS` for the
    lightest host, so adding or removing a host moves only about ``1/n`` of the keys. With
    unequal weights a host has points in proportion to its weight (see :func:`ring_points`);
    a host's points are its first ones of the unweighted ring and more, so raising the weight
    of a host other than the lightest moves keys only to it while the ring is within its
    bound (the lightest host's weight, and a ring at its bound, set every host's points).
    """

    def __init__(
        self,
        hosts: Sequence[H],
        attribute: str | None,
        sizing: Sequence[H] | None = None,
        minimum: int = RING_SIZE,
        maximum: int | None = None,
        whole: ConsistentHash[H] | None = None,
    ) -> None:
        super().__init__(hosts, attribute)
        if whole is not None:  # the ring of all of them: its points of ``hosts``
            self._take(whole)
            return
        # ``sizing``: the cluster's every host, ejected ones included. Sized from them, a
        # host's points do not change when another is ejected: only the ejected one's keys
        # move (sized from the healthy ones, the lightest leaving rescaled all the others).
        counts = ring_points(
            [h.weight for h in self.hosts],
            None if sizing is None else [h.weight for h in sizing],
            minimum,
            maximum,
        )
        # The points in a typed array, 8 bytes each (a 64-bit Python integer takes 36 more).
        pairs = zip(self.hosts, counts, strict=True)
        points = array("Q", b"".join([_host_points(h.key, n) for h, n in pairs]))
        if sys.byteorder == "little":
            points.byteswap()
        index = array("I")
        for i, count in enumerate(counts):
            index.extend(array("I", [i]) * count)
        # Sorted by index (twice as fast as sorting (point, owner) pairs).
        order = sorted(range(len(points)), key=points.__getitem__)
        self._points = array("Q", [points[i] for i in order])
        #: Each point's host, and its index in ``hosts`` (for :meth:`_take`).
        self._index = array("I", [index[i] for i in order])
        hosts_of = self.hosts
        self._owners = [hosts_of[i] for i in self._index]

    def _take(self, whole: ConsistentHash[H]) -> None:
        """The points of ``whole`` (a ring sized from all of a cluster's hosts, ``hosts``
        some of them) that are of ``hosts``: the ring built for ``hosts`` with that sizing,
        in two passes over the points rather than hashing and sorting them again."""
        kept = {id(h) for h in self.hosts}
        ok = [id(h) in kept for h in whole.hosts]
        mask = [ok[i] for i in whole._index]
        self._points = array("Q", compress(whole._points, mask))
        self._index = array("I", compress(whole._index, mask))
        self._owners = list(compress(whole._owners, mask))

    def pick(self, metadata: Metadata, client: Client | None = None) -> H | None:
        point = self.hash_of(metadata, client)
        if point is None or not self._points:
            return self._fallback.pick(metadata)
        i = bisect.bisect(self._points, point)
        return self._owners[i if i < len(self._owners) else 0]

    def pick_again(self, metadata: Metadata, client: Client | None, attempt: int) -> H | None:
        """The owner of the ``attempt``-th point after the key's (Envoy's ring hash)."""
        point = self.hash_of(metadata, client)
        if point is None or not self._points:
            return self._fallback.pick(metadata)
        owners = self._owners
        return owners[(bisect.bisect(self._points, point) + attempt) % len(owners)]


class Maglev(Hashing[H]):
    """Maglev hashing (Istio's ``maglev``): a lookup table of a prime ``table_size`` slots
    the hosts fill in turn, each along its own permutation of the slots (an offset and a
    step from the host's key), so a request costs one hash and one index, and removing a
    host moves mostly its own keys. With unequal weights a host takes turns in proportion to
    its weight, as Envoy's weighted Maglev does. Built in ``O(table_size log n)``."""

    def __init__(
        self, hosts: Sequence[H], attribute: str | None, table_size: int = MAGLEV_TABLE_SIZE
    ) -> None:
        super().__init__(hosts, attribute)
        self._table = [self.hosts[i] for i in maglev_table(self.hosts, table_size)]

    def pick(self, metadata: Metadata, client: Client | None = None) -> H | None:
        point = self.hash_of(metadata, client)
        table = self._table
        if point is None or not table:
            return self._fallback.pick(metadata)
        return table[point % len(table)]

    def pick_again(self, metadata: Metadata, client: Client | None, attempt: int) -> H | None:
        """The slot of the key's hash with its high bits flipped by ``attempt`` (Envoy's
        Maglev: ``hash ^ (2^64 - attempt)``)."""
        point = self.hash_of(metadata, client)
        table = self._table
        if point is None or not table:
            return self._fallback.pick(metadata)
        return table[(point ^ (_MASK64 + 1 - attempt)) % len(table)]


def maglev_table(hosts: Sequence[Host], size: int) -> list[int]:
    """The Maglev table: for each of ``size`` (a prime) slots, the index of its host; empty
    without hosts. Host ``i`` walks the slots from ``offset_i`` by ``step_i`` (from a hash of
    its key), taking the first free one at each of its turns; the turns go round the hosts,
    a host of weight ``w`` taking one in ``max(weights) / w`` rounds (all of them when the
    weights are equal), hosts of the same round in order."""
    if not hosts:
        return []
    walks = []
    for host in hosts:
        offset, step = struct.unpack(
            ">QQ", hashlib.blake2b(host.key.encode(), digest_size=16).digest()
        )
        walks.append([offset % size, step % (size - 1) + 1 if size > 1 else 1])
    table = [-1] * size
    left = size

    def take(i: int) -> None:
        walk = walks[i]
        slot, step = walk
        while table[slot] != -1:
            slot += step
            if slot >= size:
                slot -= size
        table[slot] = i
        slot += step
        walk[0] = slot - size if slot >= size else slot

    if _equal(hosts):
        while left:
            for i in range(min(left, len(hosts))):
                take(i)
            left -= min(left, len(hosts))
        return table
    # Round r, host i (weight w of the heaviest's m) takes its k-th turn (k from 0) in the
    # first round after its last turn's with r * w >= k * m (Envoy's loop visits a host once
    # a round): round max(k + 1, ceil(k * m / w)); the rounds in order, hosts by index
    # within one.
    heaviest = max(h.weight for h in hosts)
    turns = [(1, i, 0) for i in range(len(hosts))]
    while left:
        _, i, k = turns[0]
        take(i)
        left -= 1
        k += 1
        weight = hosts[i].weight
        heapq.heapreplace(turns, (max(k + 1, -(-k * heaviest // weight)), i, k))
    return table


def hash_slots(policy: LoadBalancer, levels: Sequence[Sequence[int]]) -> int:
    """The ring points or Maglev table slots a cluster's balancer holds at most (what
    ``limits.maxHashSlots`` bounds): a ring or table for each failover priority level, of
    ``levels`` (the weights of each level's endpoints); 0 for a policy that does not hash."""
    if policy.policy != "CONSISTENT_HASH":
        return 0
    if policy.maglev_table_size is not None:
        return policy.maglev_table_size * sum(1 for weights in levels if weights)
    minimum = RING_SIZE if policy.ring_size is None else policy.ring_size
    return sum(sum(ring_points(w, None, minimum, policy.ring_maximum)) for w in levels)


def is_prime(number: int) -> bool:
    """Whether ``number`` is prime (a Maglev table's size must be; by trial division, so
    check the bound first)."""
    if number < 2:
        return False
    if number % 2 == 0:
        return number == 2
    return all(number % factor for factor in range(3, math.isqrt(number) + 1, 2))


def ring_points(
    weights: Sequence[int],
    sizing: Sequence[int] | None = None,
    minimum: int = RING_SIZE,
    maximum: int | None = None,
) -> list[int]:
    """How many ring points each host gets, as Envoy sizes a ring: at least ``minimum`` in
    all (the lightest host's share of it, or :data:`HOST_POINTS` if more, sets its points;
    equal weights give each host the same), the others in proportion to their weights; when
    that would exceed ``max(RING_LIMIT, minimum, the lightest's points * len(weights))``
    points, or ``maximum`` (Envoy's ``maximum_ring_size``), scaled down to that total, with
    at least one point per host. So the ring never has more than that bound plus
    ``len(weights)`` points, whatever the weights (a weight of 4e9 next to a weight of 1 does
    not make 4e11).

    ``sizing``: the weights that set the scale (the lightest, the total, the bound), when
    ``weights`` are some of them (the healthy hosts of a cluster, ``sizing`` all of its
    hosts): each host then has the points it has on the ring of all of them."""
    if not weights:
        return []
    basis = weights if sizing is None else sizing
    least, total, count = min(basis), sum(basis), len(basis)
    lightest = max(HOST_POINTS, -(-minimum * least // total))
    limit = max(RING_LIMIT, minimum, lightest * count)
    if maximum is not None:
        limit = min(limit, maximum)
    if least == max(basis):
        return [max(1, min(lightest, limit // count))] * len(weights)
    if total * lightest <= limit * least:
        return [(w * lightest + least // 2) // least for w in weights]
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
        self._hashing = policy.policy == "CONSISTENT_HASH"
        self._key = hash_key(policy.hash_attribute)

    def pick(self, metadata: Metadata, client: Client | None = None) -> H | None:
        level = self._level(metadata, client)
        return None if level is None else level.balancer.pick(metadata, client)

    def pick_again(self, metadata: Metadata, client: Client | None, attempt: int) -> H | None:
        level = self._level(metadata, client)
        return None if level is None else level.balancer.pick_again(metadata, client, attempt)

    def _level(self, metadata: Metadata, client: Client | None) -> Level[H] | None:
        if self._hashing:
            point = request_hash(self._key, metadata, client)
            if point is not None:
                i = bisect.bisect_right(self._bounds, point % 100)
                return self.levels[i if i < len(self.levels) else -1]
        return self._chooser.pick(metadata)


class Locality(Generic[H]):
    """One locality of a level as :class:`LocalityBalancer` chooses between them: its
    effective weight, and the balancer of its healthy hosts."""

    def __init__(self, name: str, weight: int, balancer: Balancer[H]) -> None:
        self.key = name
        #: Its effective weight: its locality weight, times its availability when some
        #: locality of the level is short of it.
        self.weight = weight
        self.active = 0
        self.balancer = balancer


class LocalityBalancer(Balancer[H]):
    """Envoy's locality weighted load balancing within one priority level: a locality by a
    smooth weighted round robin over the effective weights (a walk of a precomputed
    schedule, as :class:`WeightedRoundRobin`), then a host
    of it by its own balancer. Built only by
    :func:`~metaprotocol_sdk.proxy.priority.locality_balancer`."""

    def __init__(self, localities: Sequence[Locality[H]]) -> None:
        super().__init__([h for locality in localities for h in locality.balancer.hosts])
        self.localities = list(localities)
        self._chooser = WeightedRoundRobin(self.localities)

    def pick(self, metadata: Metadata, client: Client | None = None) -> H | None:
        chosen = self._chooser.pick(metadata)
        return None if chosen is None else chosen.balancer.pick(metadata, client)


def _equal(hosts: Sequence[Host]) -> bool:
    weight = hosts[0].weight if hosts else 1
    return all(h.weight == weight for h in hosts)


def _round_robin(hosts: Sequence[H]) -> Balancer[H]:
    return RoundRobin(hosts) if _equal(hosts) else WeightedRoundRobin(hosts)


def make_balancer(
    policy: LoadBalancer,
    hosts: Sequence[H],
    cluster: Sequence[H] | None = None,
    whole: ConsistentHash[H] | None = None,
) -> Balancer[H]:
    """The balancer for a policy; the weighted form when the hosts' weights differ
    (:class:`WeightedRoundRobin`, :class:`WeightedRandom`, :class:`WeightedLeastRequest`, and
    a :class:`ConsistentHash` ring or :class:`Maglev` table with weighted shares), else the
    plain one. ``cluster``: all of the cluster's hosts when ``hosts`` are its healthy ones
    (they size the ring); ``whole``: the ring of all of them, built with the weights they
    have now, whose points a ring of ``hosts`` takes."""
    if policy.policy == "CONSISTENT_HASH":
        if policy.maglev_table_size is not None:
            return Maglev(hosts, policy.hash_attribute, policy.maglev_table_size)
        if whole is not None and len(hosts) == len(whole.hosts):
            return whole
        return ConsistentHash(
            hosts,
            policy.hash_attribute,
            cluster,
            RING_SIZE if policy.ring_size is None else policy.ring_size,
            policy.ring_maximum,
            whole,
        )
    equal = _equal(hosts)
    if policy.policy == "RANDOM":
        return Random(hosts) if equal else WeightedRandom(hosts)
    if policy.policy == "LEAST_REQUEST":
        return LeastRequest(hosts) if equal else WeightedLeastRequest(hosts)
    return RoundRobin(hosts) if equal else WeightedRoundRobin(hosts)
