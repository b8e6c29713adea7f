"""Load balancers and weighted destination picking, without sockets."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from itertools import groupby

import pytest

from metaprotocol_sdk import Attributes, MessageType, Metadata
from metaprotocol_sdk.proxy.balancer import (
    MAX_MAGLEV_TABLE_SIZE,
    RING_LIMIT,
    Balancer,
    ConsistentHash,
    LeastRequest,
    Level,
    Maglev,
    PriorityBalancer,
    Random,
    RoundRobin,
    WeightedLeastRequest,
    WeightedRandom,
    WeightedRoundRobin,
    is_prime,
    maglev_table,
    make_balancer,
    ring_points,
)
from metaprotocol_sdk.proxy.balancer import SCHEDULE_LIMIT as HOST_SCHEDULE_LIMIT
from metaprotocol_sdk.proxy.config import LoadBalancer
from metaprotocol_sdk.proxy.matcher import compile_match
from metaprotocol_sdk.proxy.router import SCHEDULE_LIMIT, CompiledRoute, Target
from metaprotocol_sdk.proxy.stats import Stats


@dataclass(eq=False)
class FakeHost:
    key: str
    active: int = 0
    weight: int = 1


def request(**attrs: str) -> Metadata:
    return Metadata(MessageType.Request, attributes=Attributes(attrs))


HOSTS = [FakeHost(f"10.0.0.{i}:9000") for i in range(4)]


def test_round_robin_cycles() -> None:
    lb = RoundRobin(HOSTS)
    picked = [lb.pick(request()) for _ in range(8)]
    assert picked == HOSTS + HOSTS


def test_random_is_seedable_and_covers_hosts() -> None:
    lb1, lb2, other = Random(HOSTS, seed=7), Random(HOSTS, seed=7), Random(HOSTS, seed=8)
    seq1 = [lb1.pick(request()) for _ in range(200)]
    assert seq1 == [lb2.pick(request()) for _ in range(200)]
    assert seq1 != [other.pick(request()) for _ in range(200)]  # the seed is used
    assert set(seq1) == set(HOSTS)


def test_least_request_prefers_idle_hosts() -> None:
    hosts = [FakeHost(f"h{i}", active=10) for i in range(5)]
    hosts[3].active = 0
    lb = LeastRequest(hosts, seed=1)
    picks = Counter(lb.pick(request()).key for _ in range(1000))  # type: ignore[union-attr]
    # Power of two choices: the idle host wins every pair it is drawn into (2/5 of them).
    assert 350 <= picks["h3"] <= 450
    two = [FakeHost("a", 3), FakeHost("b", 1)]
    assert LeastRequest(two).pick(request()) is two[1]


def test_least_request_shares_ties_between_two_hosts() -> None:
    # Two idle hosts (requests one at a time): both get requests, as with more hosts (where
    # the two random choices pick who wins a tie) and in Envoy (a random pair). The first
    # host won every tie: the second got nothing until the first had a request in flight.
    two = weighted(1, 1)
    lb = LeastRequest(two, seed=1)
    assert Counter(keys(lb, 100)) == {"0": 50, "1": 50}
    two[0].active = 1  # a busier host still loses
    assert Counter(keys(lb, 10)) == {"1": 10}


def test_consistent_hash_fallback_and_stability() -> None:
    lb = ConsistentHash(HOSTS, "User")
    owners = {u: lb.pick(request(user=u)) for u in (f"u{i}" for i in range(200))}
    again = ConsistentHash(list(HOSTS), "user")  # same hosts, new ring: same owners
    assert all(again.pick(request(user=u)) is h for u, h in owners.items())
    assert len(set(owners.values())) == 4
    # Ejecting a host (the ring sized from all of them) moves only the keys it owned.
    ejected = ConsistentHash(HOSTS[:3], "user", sizing=HOSTS)
    moved = [u for u, h in owners.items() if ejected.pick(request(user=u)) is not h]
    assert moved and all(owners[u] is HOSTS[3] for u in moved)
    # No attribute: round robin.
    assert [lb.pick(request()) for _ in range(4)] == HOSTS
    assert ConsistentHash([], "user").pick(request(user="x")) is None
    # A lone surrogate (a Java string may hold one; Hessian decodes it) is hashed too.
    assert lb.pick(request(user="\ud800")) in HOSTS


def test_make_balancer_and_empty_clusters() -> None:
    assert isinstance(make_balancer(LoadBalancer("RANDOM"), HOSTS), Random)
    assert isinstance(make_balancer(LoadBalancer(), HOSTS), RoundRobin)
    for policy in ("ROUND_ROBIN", "RANDOM", "LEAST_REQUEST"):
        assert make_balancer(LoadBalancer(policy), []).pick(request()) is None  # type: ignore[arg-type]


def test_smooth_weighted_round_robin() -> None:
    stats = Stats()
    targets = [Target(n, None, w, stats, "l", "r") for n, w in (("a", 50), ("b", 30), ("c", 20))]
    route = CompiledRoute("r", compile_match(()), targets, None, None, 1.0)
    picks = [route.pick().name for _ in range(1000)]
    for start in range(0, 1000, 100):  # every window of sum(weights) is exact
        assert Counter(picks[start : start + 100]) == {"a": 50, "b": 30, "c": 20}
    longest = max(len(list(run)) for _, run in groupby(picks))
    assert longest <= 2  # smooth: no bursts to one destination


@pytest.mark.parametrize("weights", [(20, 80), (50, 30, 20), (999, 1000), (1, 0, 3), (7,)])
def test_precomputed_schedule_picks_as_the_algorithm_does(weights: tuple[int, ...]) -> None:
    # Short cycles are precomputed; long ones (999 + 1000 = 1999 picks) use the algorithm.
    stats = Stats()

    def route() -> CompiledRoute:
        targets = [Target(f"t{i}", None, w, stats, "l", "r") for i, w in enumerate(weights)]
        return CompiledRoute("r", compile_match(()), targets, None, None, 1.0)

    scheduled, computed = route(), route()
    n = sum(weights) * 3
    expected = [computed._smooth_pick().name for _ in range(n)] if len(weights) > 1 else None
    picks = [scheduled.pick().name for _ in range(n)]
    assert picks == (expected or ["t0"] * n)
    assert bool(scheduled._schedule) == (len(weights) > 1 and sum(weights) <= SCHEDULE_LIMIT)


# -- endpoint weights --------------------------------------------------------------------------


def weighted(*weights: int) -> list[FakeHost]:
    return [FakeHost(f"10.0.1.{i}:9000", weight=w) for i, w in enumerate(weights)]


def keys(lb: Balancer[FakeHost], n: int, md: Metadata | None = None) -> list[str]:
    picks = [lb.pick(md or request()) for _ in range(n)]
    return [h.key[-6] for h in picks if h is not None]  # the host's index


def longest_run(seq: list[str]) -> int:
    return max(len(list(run)) for _, run in groupby(seq + seq))  # cyclic: across cycles too


@pytest.mark.parametrize(
    ("weights", "runs"),
    [((5, 1, 1), 3), ((3, 2, 1), 2), ((50, 30, 20), 2), ((1, 1, 1, 5), 2), ((2, 4), 2)],
)
def test_weighted_round_robin_is_exact_per_cycle_and_smooth(
    weights: tuple[int, ...], runs: int
) -> None:
    lb = make_balancer(LoadBalancer(), weighted(*weights))
    assert isinstance(lb, WeightedRoundRobin)
    cycle = sum(weights) // math.gcd(*weights)
    picks = keys(lb, cycle * 5)
    share = {str(i): w // math.gcd(*weights) for i, w in enumerate(weights)}
    for start in range(0, len(picks), cycle):  # every cycle gives each host its share exactly
        assert Counter(picks[start : start + cycle]) == share
    assert longest_run(picks[:cycle]) <= runs  # no bursts (5/7 of picks cannot avoid 3 in a row)
    for i, w in share.items():  # at every point, each host is within a pick of its share
        seen = 0
        for t, k in enumerate(picks, 1):
            seen += k == i
            assert abs(seen - t * w / cycle) < 1.5


@pytest.mark.parametrize("weights", [(999, 1000, 1), (2**32 - 1, 1, 2**32 - 2), (7, 3)])
def test_long_weighted_cycles_use_the_schedule_as_short_ones_do(weights: tuple[int, ...]) -> None:
    walked, computed = (
        WeightedRoundRobin(weighted(*weights)),
        WeightedRoundRobin(weighted(*weights)),
    )
    n = 3000
    expected = [computed._due().key[-6] for _ in range(n)]
    assert keys(walked, n) == expected
    assert bool(walked._schedule) == (sum(weights) <= HOST_SCHEDULE_LIMIT)
    if weights[1] == 1:  # huge weights: nothing precomputed, and still the exact pace
        counts = Counter(expected)
        if weights[0] == 999:
            assert counts == {"0": 1499, "1": 1500, "2": 1}
        else:  # weight 1 of 2^33: not due in the first 3000 picks
            assert counts == {"0": 1500, "2": 1500}


def test_weighted_random_is_proportional_and_seedable() -> None:
    hosts = weighted(1, 3, 6)
    lb = WeightedRandom(hosts, seed=3)
    picks = Counter(keys(lb, 20_000))
    # Binomial standard deviations are under 70 picks: 5 of them either way.
    assert abs(picks["0"] - 2_000) < 350 and abs(picks["1"] - 6_000) < 350
    assert abs(picks["2"] - 12_000) < 350
    assert keys(WeightedRandom(hosts, seed=3), 50) == keys(WeightedRandom(hosts, seed=3), 50)
    assert isinstance(make_balancer(LoadBalancer("RANDOM"), hosts), WeightedRandom)
    heavy = WeightedRandom(weighted(1, 2**32 - 1), seed=1)
    assert Counter(keys(heavy, 1000)) == {"1": 1000}  # 1 in 4e9: never in a thousand picks


def test_weighted_least_request_scales_weights_by_requests_in_flight() -> None:
    hosts = weighted(1, 3)
    lb = make_balancer(LoadBalancer("LEAST_REQUEST"), hosts)
    assert isinstance(lb, WeightedLeastRequest)
    # Idle hosts: in proportion to the weights.
    assert Counter(keys(lb, 4000)) == {"0": 1000, "1": 3000}
    # Busy hosts: weight / (active + 1), as Envoy's active_request_bias 1.0: 1/1 against 3/6.
    hosts[1].active = 5
    assert Counter(keys(lb, 3000)) == {"0": 2000, "1": 1000}
    hosts[0].active = 2  # 1/3 against 3/6: 2 to 3
    picks = Counter(keys(lb, 5000))
    assert abs(picks["0"] - 2000) <= 2 and abs(picks["1"] - 3000) <= 2
    assert WeightedLeastRequest([]).pick(request()) is None


def test_ring_points_follow_weights_within_a_bound() -> None:
    assert ring_points([]) == []
    # Istio's default ring: at least 1024 points, at least 100 for the lightest host.
    assert ring_points([7, 7, 7]) == [342, 342, 342]
    assert ring_points([7] * 20) == [100] * 20
    assert ring_points([1, 2, 3]) == [171, 342, 513]
    assert ring_points([1, 2, 3], minimum=0) == [100, 200, 300]
    assert ring_points([2, 3], minimum=0) == [100, 150]
    assert ring_points([7, 7], minimum=4096) == [2048, 2048]
    # Envoy's maximum_ring_size caps it, a point per host at least.
    assert ring_points([7, 7], minimum=4096, maximum=1000) == [500, 500]
    assert ring_points([1, 3], maximum=100) == [25, 75]
    assert ring_points([1] * 300, maximum=100) == [1] * 300
    # A careless weight: scaled to the bound, every host keeps a point.
    huge = ring_points([2**32 - 1, 1, 5])
    assert sum(huge) <= RING_LIMIT + 3 and min(huge) == 1 and huge[0] > RING_LIMIT - 10
    many = ring_points([1, 2] * 200)  # 400 hosts: 100 per host is the bound, not RING_LIMIT
    assert sum(many) <= 100 * 400 + 400 and many[:2] == [66, 133]
    lb = ConsistentHash(weighted(2**32 - 1, 1, 5), "user")
    assert len(lb._points) == sum(huge)


def test_a_small_clusters_ring_is_resized_when_an_endpoint_goes_as_in_envoy() -> None:
    # Below minimumRingSize / 100 endpoints, the ring's minimum sets every host's points, so
    # removing an endpoint gives the others more and moves some keys between them too (as
    # Envoy's ring does); at or above it, only the removed endpoint's keys move.
    def moved_between_survivors(hosts: list[FakeHost], minimum: int) -> int:
        before = ConsistentHash(hosts, "user", minimum=minimum)
        after = ConsistentHash(hosts[:-1], "user", minimum=minimum)
        count = 0
        for u in (f"user-{i}" for i in range(2000)):
            a, b = before.pick(request(user=u)), after.pick(request(user=u))
            count += a is not hosts[-1] and a is not b
        return count

    assert moved_between_survivors(HOSTS, 1024) > 50
    assert moved_between_survivors(HOSTS, 300) == 0  # 100 points each, with 4 or 3
    twelve = [FakeHost(f"10.0.2.{i}:9000") for i in range(12)]
    assert moved_between_survivors(twelve, 1024) == 0


def test_consistent_hash_shares_follow_weights() -> None:
    hosts = weighted(1, 3)
    lb = make_balancer(LoadBalancer("CONSISTENT_HASH", "user"), hosts)
    owners = {u: lb.pick(request(user=u)) for u in (f"user-{i}" for i in range(20_000))}
    share = sum(h is hosts[1] for h in owners.values()) / len(owners)
    assert 0.68 < share < 0.82  # 3/4, within a ring of 400 points' unevenness
    # Raising a host's weight adds points: keys move only to it.
    heavier = weighted(1, 6)
    ring = ConsistentHash(heavier, "user")
    for u, h in owners.items():
        if h is hosts[1]:
            assert ring.pick(request(user=u)) is heavier[1]
    # Requests without the attribute: weighted round robin.
    assert Counter(keys(lb, 8)) == {"0": 2, "1": 6}


def test_raising_the_lightest_weight_rescales_the_ring() -> None:
    # The lightest host sets the scale (100 points): raising it shrinks the others' points,
    # so keys move between them too, as the documentation says (it said "only to it").
    before, after = weighted(1, 2, 3), weighted(2, 2, 3)
    assert ring_points([1, 2, 3], minimum=0) == [100, 200, 300]
    assert ring_points([2, 2, 3], minimum=0) == [100, 100, 150]
    old = ConsistentHash(before, "user", minimum=0)
    new = ConsistentHash(after, "user", minimum=0)
    moved: Counter[str] = Counter()
    for u in (f"user-{i}" for i in range(2000)):
        a, b = old.pick(request(user=u)), new.pick(request(user=u))
        assert a is not None and b is not None
        if a.key != b.key:
            moved[b.key] += 1
    assert moved["10.0.1.1:9000"] + moved["10.0.1.2:9000"] > 100  # not to host 0 only


def test_equal_weights_keep_the_unweighted_balancers() -> None:
    for weight in (1, 7, 2**32 - 1):
        same = [FakeHost(f"h{i}", weight=weight) for i in range(3)]
        assert type(make_balancer(LoadBalancer(), same)) is RoundRobin
        assert type(make_balancer(LoadBalancer("RANDOM"), same)) is Random
        assert type(make_balancer(LoadBalancer("LEAST_REQUEST"), same)) is LeastRequest
        ring = ConsistentHash(same, "user")
        assert len(ring._points) == 1026 and type(ring._fallback) is RoundRobin
    assert type(make_balancer(LoadBalancer(), weighted(1, 2))) is WeightedRoundRobin


@dataclass
class FakeClient:
    ip: str | None

    def source_ip(self) -> str | None:
        return self.ip


def test_a_source_ip_hash_keeps_each_client_on_one_host() -> None:
    lb = make_balancer(LoadBalancer("CONSISTENT_HASH", None), HOSTS)
    assert type(lb) is ConsistentHash
    clients = [FakeClient(f"10.1.{i // 250}.{i % 250}") for i in range(400)]
    owners = {c.ip: lb.pick(request(user="ignored"), c) for c in clients}
    assert set(owners.values()) == set(HOSTS)
    # The same address, another request or connection: the same host; the attribute is not read.
    assert all(lb.pick(request(user="x"), FakeClient(ip)) is h for ip, h in owners.items())
    # No client, or an address not known: round robin.
    assert [lb.pick(request()) for _ in range(4)] == HOSTS
    assert [lb.pick(request(), FakeClient(None)) for _ in range(4)] == HOSTS


def test_maglev_fills_its_table_by_the_weights() -> None:
    assert maglev_table([], 7) == []
    for n in (1, 3, 4, 10):
        table = maglev_table([FakeHost(f"h{i}") for i in range(n)], 1021)
        counts = Counter(table)
        assert len(table) == 1021 and -1 not in counts
        assert max(counts.values()) - min(counts.values()) <= 1  # equal weights: equal shares
    counts = Counter(maglev_table(weighted(1, 3), 1021))
    assert abs(counts[1] - 3 * counts[0]) <= 4  # 255 and 766
    counts = Counter(maglev_table(weighted(1, 2**32 - 1), 1021))
    assert counts[0] == 1  # the lightest takes its first turn, then waits its share
    # Built in one pass over the table: the heaviest weights cost no more than equal ones.
    assert len(maglev_table(weighted(*range(1, 500)), MAX_MAGLEV_TABLE_SIZE)) == 131071


def test_maglev_keeps_keys_where_they_were_when_a_host_goes() -> None:
    hosts = [FakeHost(f"10.0.3.{i}:9000") for i in range(5)]
    lb = make_balancer(LoadBalancer("CONSISTENT_HASH", "user", maglev_table_size=65537), hosts)
    assert type(lb) is Maglev
    keys = [f"user-{i}" for i in range(4000)]
    owners = {k: lb.pick(request(user=k)) for k in keys}
    shares = Counter(owners.values())
    assert all(700 <= shares[h] <= 900 for h in hosts)  # 800 each
    assert Maglev(list(hosts), "user").pick(request(user="user-1")) is owners["user-1"]
    smaller = Maglev(hosts[:4], "user")
    moved = [
        k
        for k in keys
        if owners[k] is not hosts[4] and smaller.pick(request(user=k)) is not owners[k]
    ]
    assert len(moved) < 0.02 * len(keys)  # Maglev's minimal disruption (not none: a few)
    assert all(smaller.pick(request(user=k)) is not hosts[4] for k in keys)
    # Without the attribute: round robin; no hosts: none.
    assert [lb.pick(request()) for _ in range(5)] == hosts
    assert Maglev([], "user").pick(request(user="x")) is None


def test_prime_numbers_for_maglev_tables() -> None:
    primes = [n for n in range(40) if is_prime(n)]
    assert primes == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]
    assert is_prime(65537) and is_prime(131071) and not is_prime(65536) and not is_prime(1)


def test_a_priority_balancer_hashes_the_source_ip_to_a_level() -> None:
    low, high = [FakeHost("a"), FakeHost("b")], [FakeHost("c")]
    policy = LoadBalancer("CONSISTENT_HASH", None)
    levels = [Level(0, 50, make_balancer(policy, low)), Level(1, 50, make_balancer(policy, high))]
    lb = PriorityBalancer(levels, policy)
    clients = [FakeClient(f"10.2.0.{i}") for i in range(200)]
    first = {c.ip: lb.pick(request(), c) for c in clients}
    assert {h.key for h in first.values() if h is not None} == {"a", "b", "c"}
    assert all(lb.pick(request(), FakeClient(ip)) is h for ip, h in first.items())


def test_least_request_draws_two_distinct_hosts_uniformly() -> None:
    hosts = [FakeHost(f"h{i}") for i in range(5)]
    hosts[0].active = 100  # the busiest host wins only a pair of itself: never
    lb = LeastRequest(hosts, seed=3)
    picks = Counter(getattr(lb.pick(request()), "key", None) for _ in range(4000))
    assert "h0" not in picks
    assert all(850 <= picks[f"h{i}"] <= 1150 for i in range(1, 5)), picks  # 1000 each


def _envoy_maglev(hosts: list[FakeHost], size: int) -> list[int]:
    """Envoy's weighted Maglev build, as its loop is written: rounds over the hosts in order,
    a host taking a slot in a round when ``round * weight >= target`` (then ``target +=
    max weight``), each along the same permutation as the engine's."""
    import hashlib
    import struct

    walks = []
    for host in hosts:
        offset, step = struct.unpack(
            ">QQ", hashlib.blake2b(host.key.encode(), digest_size=16).digest()
        )
        walks.append([offset % size, step % (size - 1) + 1, 0])
    heaviest = max(h.weight for h in hosts)
    table = [-1] * size
    left, rnd = size, 0
    while left:
        rnd += 1
        for i, host in enumerate(hosts):
            if not left:
                break
            walk = walks[i]
            if rnd * host.weight < walk[2]:
                continue
            walk[2] += heaviest
            while table[walk[0]] != -1:
                walk[0] = (walk[0] + walk[1]) % size
            table[walk[0]] = i
            walk[0] = (walk[0] + walk[1]) % size
            left -= 1
    return table


@pytest.mark.parametrize("weights", [(1, 2), (2, 2, 1), (3, 1, 1, 7), (5, 5)])
def test_weighted_maglev_fills_its_table_as_envoys_loop_does(weights: tuple[int, ...]) -> None:
    # The heaviest hosts took two turns in the first round (one slot each off Envoy's table).
    hosts = [FakeHost(f"10.0.4.{i}:9000", weight=w) for i, w in enumerate(weights)]
    for size in (5, 7, 1021):
        assert maglev_table(hosts, size) == _envoy_maglev(hosts, size)
