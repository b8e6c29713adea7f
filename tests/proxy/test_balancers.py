"""Load balancers and weighted destination picking, without sockets."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import groupby

import pytest

from metaprotocol_sdk import Attributes, MessageType, Metadata
from metaprotocol_sdk.proxy.balancer import (
    ConsistentHash,
    LeastRequest,
    Random,
    RoundRobin,
    make_balancer,
)
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


def test_consistent_hash_fallback_and_stability() -> None:
    lb = ConsistentHash(HOSTS, "User")
    owners = {u: lb.pick(request(user=u)) for u in (f"u{i}" for i in range(200))}
    again = ConsistentHash(list(HOSTS), "user")  # same hosts, new ring: same owners
    assert all(again.pick(request(user=u)) is h for u, h in owners.items())
    assert len(set(owners.values())) == 4
    # Removing a host moves only the keys it owned.
    smaller = ConsistentHash(HOSTS[:3], "user")
    moved = [u for u, h in owners.items() if smaller.pick(request(user=u)) is not h]
    assert all(owners[u] is HOSTS[3] for u in moved)
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
