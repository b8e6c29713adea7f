"""Failover priorities: Envoy's priority load and panic, the balancer that picks a level
first, the all-priority-0 fast path, and traffic through the engine (real sockets)."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

import pytest
from proxy_kit import (
    Client,
    Upstream,
    address,
    count_calls,
    engine_for,
    error_type,
    mesh,
    rebuilt,
    refusing_port,
    run,
)

from metaprotocol_sdk import Attributes, MessageType, Metadata
from metaprotocol_sdk.proxy.balancer import (
    ConsistentHash,
    LeastRequest,
    PriorityBalancer,
    Random,
    RoundRobin,
    WeightedRoundRobin,
)
from metaprotocol_sdk.proxy.config.models import LoadBalancer, priority_label
from metaprotocol_sdk.proxy.priority import PriorityLoad, priority_balancer, priority_load


@dataclass(eq=False)
class FakeHost:
    key: str
    priority: int = 0
    ejected: bool = False
    weight: int = 1
    active: int = 0


def hosts(*levels: tuple[int, int]) -> list[FakeHost]:
    """(endpoints, ejected) per priority, in order; keys ``p<priority>-<n>``."""
    out = []
    for p, (total, ejected) in enumerate(levels):
        out += [FakeHost(f"p{p}-{i}", p, i < ejected) for i in range(total)]
    return out


NONE = Metadata(MessageType.Request, attributes=Attributes({}))


@pytest.mark.parametrize(
    ("levels", "panic", "loads", "in_panic"),
    [
        ([(5, 5), (5, 5)], 0, (100, 0), (False, False)),  # healthy P0 takes all
        ([(4, 5), (5, 5)], 0, (100, 0), (False, False)),  # 4/5 * 1.4 = 112% -> 100%
        ([(3, 5), (5, 5)], 0, (84, 16), (False, False)),  # 3/5 * 1.4 = 84%
        ([(5, 10), (5, 5)], 0, (70, 30), (False, False)),  # Envoy's doc: 50% healthy
        ([(0, 5), (5, 5)], 0, (0, 100), (False, False)),
        ([(2, 5), (2, 5), (5, 5)], 0, (56, 44, 0), (False, False, False)),
        # Short of 100% in all: normalised (56 + 28 = 84 -> 66 + 33, the 1 left to P0).
        ([(2, 5), (1, 5)], 0, (67, 33), (False, False)),
        # ... and the panic threshold counts per level: P0 (20%) in panic, P1 (50%) not;
        # 28 + 70 = 98 -> 28 + 71, the 1 left to P0.
        ([(1, 5), (1, 2)], 50, (29, 71), (True, False)),
        # Every level in panic: shares by endpoints.
        ([(1, 5), (1, 5)], 50, (50, 50), (True, True)),
        ([(0, 2), (0, 3)], 0, (40, 60), (True, True)),  # none healthy
        # Enough health in all: no panic, whatever the threshold.
        ([(2, 5), (5, 5)], 90, (56, 44), (False, False)),
    ],
)
def test_priority_load_as_envoy_computes_it(
    levels: list[tuple[int, int]], panic: int, loads: tuple[int, ...], in_panic: tuple[bool, ...]
) -> None:
    assert priority_load(levels, panic) == PriorityLoad(loads, in_panic)


def test_all_of_priority_0_healthy_enough_is_its_plain_balancer() -> None:
    """No level layer while one level takes all the load: the level's own balancer."""
    for ejected in (0, 1):
        balancer, loads = priority_balancer(LoadBalancer(), hosts((5, ejected), (3, 0)), 0)
        assert type(balancer) is RoundRobin and loads == {0: 100, 1: 0}
        assert {h.key for h in balancer.hosts} == {f"p0-{i}" for i in range(ejected, 5)}


def test_round_robin_spills_by_the_priority_load_evenly() -> None:
    """2 of 5 ejected: 84% to P0 and 16% to P1, exactly in every 25 picks (a smooth cycle
    of 21 and 4), each level round robin over its healthy endpoints."""
    balancer, loads = priority_balancer(LoadBalancer(), hosts((5, 2), (2, 0)), 0)
    assert isinstance(balancer, PriorityBalancer) and loads == {0: 84, 1: 16}
    picks = [balancer.pick(NONE) for _ in range(250)]
    keys = Counter(h.key for h in picks if h is not None)
    assert keys == {"p0-2": 70, "p0-3": 70, "p0-4": 70, "p1-0": 20, "p1-1": 20}
    for start in range(0, 250, 25):
        assert sum(h is not None and h.priority == 1 for h in picks[start : start + 25]) == 4
    # Smooth: never two P1 picks in a row.
    levels = [h.priority for h in picks if h is not None]
    assert all(a + b < 2 for a, b in itertools.pairwise(levels))


def test_a_level_in_panic_balances_over_all_of_its_endpoints() -> None:
    balancer, loads = priority_balancer(LoadBalancer(), hosts((5, 4), (2, 1)), 50)
    assert loads == {0: 29, 1: 71}
    keys = Counter(h.key for h in (balancer.pick(NONE) for _ in range(1000)) if h)
    assert {k for k in keys if k.startswith("p0")} == {f"p0-{i}" for i in range(5)}  # panic
    assert {k for k in keys if k.startswith("p1")} == {"p1-1"}  # not in panic
    assert sum(v for k, v in keys.items() if k.startswith("p0")) == 290


@pytest.mark.parametrize(
    ("policy", "inner"),
    [
        (LoadBalancer("RANDOM"), Random),
        (LoadBalancer("LEAST_REQUEST"), LeastRequest),
        (LoadBalancer("CONSISTENT_HASH", "user"), ConsistentHash),
    ],
)
def test_every_policy_picks_a_level_then_balances_in_it(policy: LoadBalancer, inner: type) -> None:
    balancer, _ = priority_balancer(policy, hosts((5, 2), (2, 0)), 0)
    assert isinstance(balancer, PriorityBalancer)
    assert [type(level.balancer) for level in balancer.levels] == [inner, inner]
    if policy.policy == "CONSISTENT_HASH":
        keyed = [
            Metadata(MessageType.Request, attributes=Attributes({"user": f"u{i}"}))
            for i in range(2000)
        ]
        first = [balancer.pick(m) for m in keyed]
        assert [balancer.pick(m) for m in keyed] == first  # a key stays on its endpoint
        picks = first
    else:
        picks = [balancer.pick(NONE) for _ in range(5000)]
    share = sum(h is not None and h.priority == 1 for h in picks) / len(picks)
    assert 0.12 < share < 0.20  # 16%


def test_weights_apply_within_a_level() -> None:
    level0 = [FakeHost("a", 0, weight=3), FakeHost("b", 0, weight=1), FakeHost("x", 0, True)]
    balancer, _ = priority_balancer(LoadBalancer(), [*level0, FakeHost("c", 1)], 0)
    assert isinstance(balancer, PriorityBalancer)  # 2/3 healthy: 93% to P0
    assert type(balancer.levels[0].balancer) is WeightedRoundRobin
    keys = Counter(h.key for h in (balancer.pick(NONE) for _ in range(400)) if h)
    assert keys["c"] == 28 and keys["a"] == 3 * keys["b"]


def prioritised_mesh(ports: list[tuple[int, int]], outlier: str) -> str:
    """:func:`mesh` whose ``(port, priority)`` endpoints carry the translation's priority
    label for the service's cluster (as the xDS translation writes it)."""
    text = mesh(
        [(port, "v1") for port, _ in ports],
        "- name: all\n  route: [{destination: {host: svc.test}}]\n",
        f"{{outlierDetection: {outlier}}}",
    )
    for port, priority in ports:
        label = f'"{priority_label(9000, None)}": "{priority}"'
        text = text.replace(
            f": {port}}}, labels: {{version: v1}}", f": {port}}}, labels: {{version: v1, {label}}}"
        )
    return text


def test_traffic_stays_on_priority_0_until_ejections_then_spills() -> None:
    """Endpoints a (live) and a dead one at priority 0, c at priority 1: all traffic to
    priority 0 until the dead one is ejected (1 of 2 healthy: 70%), then 30% to c."""

    async def main() -> None:
        a, c = await Upstream("a").start(), await Upstream("c").start()
        dead = refusing_port()
        outlier = "{consecutiveGatewayErrors: 1, baseEjectionTime: 1h, maxEjectionPercent: 50}"
        text = prioritised_mesh([(a.port, 0), (dead, 0), (c.port, 1)], outlier)
        async with engine_for(text) as engine:
            client = await Client.connect(address(engine))
            first = [error_type(await client.call()) for _ in range(2)]
            assert first == [None, "UpstreamConnectFailure"]  # both of priority 0, in turn
            (cluster,) = [cl for cl in engine.clusters.values() if cl.prioritised]
            assert cluster.priority_load == {0: 70, 1: 30}
            seen: Counter[str] = Counter()
            for _ in range(100):
                reply = await client.call()
                assert error_type(reply) is None
                seen[reply.attributes["server"]] += 1
            assert seen == {"a": 70, "c": 30}
            client.close()
        await a.close()
        await c.close()

    run(main())


def test_a_cluster_of_priority_0_builds_the_balancers_it_always_did() -> None:
    """Every file configuration: not prioritised, the plain balancer, before and after an
    ejection (the per-request path is the same class as without priorities)."""

    async def main() -> None:
        a = await Upstream("a").start()
        outlier = "{consecutiveGatewayErrors: 1, baseEjectionTime: 1h, maxEjectionPercent: 50}"
        text = mesh(
            [(a.port, "v1"), (refusing_port(), "v1")],
            "- name: all\n  route: [{destination: {host: svc.test}}]\n",
            f"{{outlierDetection: {outlier}}}",
        )
        async with engine_for(text) as engine:
            (cluster,) = engine.clusters.values()
            assert not cluster.prioritised and cluster.priority_load == {}
            assert type(cluster.balancer) is RoundRobin
            client = await Client.connect(address(engine))
            for _ in range(3):
                await client.call()
            assert any(h.ejected for h in cluster.hosts)
            assert type(cluster.balancer) is RoundRobin
            client.close()
        await a.close()

    run(main())


def test_an_ejection_from_a_level_s_large_ring_hashes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """istiod writes failover priorities for every cluster with outlier detection whose
    endpoints span localities: each ejection built the ring of each level taking load
    again (0.1 s at 131 072 points). Now each level's ring of all of its endpoints is built
    once, and an ejection takes its points of the healthy ones: nothing is hashed again."""
    hashed = count_calls(monkeypatch, "_host_points")

    async def main() -> None:
        outlier = "{consecutive5xxErrors: 1, maxEjectionPercent: 50}"
        text = prioritised_mesh([(20000 + i, 0 if i < 400 else 1) for i in range(410)], outlier)
        ring = "{consistentHash: {httpHeaderName: user, ringHash: {minimumRingSize: 131072}}}"
        text = text.replace("{outlierDetection: ", f"{{loadBalancer: {ring}, outlierDetection: ")
        async with engine_for(text) as engine:
            (cluster,) = [c for c in engine.clusters.values() if c.prioritised]
            assert cluster.outlier is not None
            level0 = [h for h in cluster.hosts if h.priority == 0]
            cluster.outlier.eject(level0[0])  # the level's whole ring, built the first time
            cluster.outlier.readmit(level0[0])
            await rebuilt(engine)
            hashed.clear()
            for host in level0[:10]:
                cluster.outlier.eject(host)
            await rebuilt(engine)
            assert isinstance(cluster.balancer, ConsistentHash)  # level 0 takes it all
            assert len(cluster.balancer.hosts) == 390
            for host in level0[:10]:
                cluster.outlier.readmit(host)
            await rebuilt(engine)
            assert hashed == []

    run(main())
