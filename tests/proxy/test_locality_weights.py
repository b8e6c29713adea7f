"""Locality weighted load balancing (``localityLbSetting.distribute``): the locality weights
istiod computes for a sidecar, Envoy's effective weights (weight times availability) and
locality pick, the checks istiod makes of ``distribute``, and traffic through the engine
over real sockets split between localities, moving as outlier detection ejects endpoints."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import pytest
from proxy_kit import Client, Upstream, address, engine_for, error_type, refusing_port, run
from test_locality import answered_by, located_mesh

from metaprotocol_sdk import ConfigError
from metaprotocol_sdk.enums import MessageType
from metaprotocol_sdk.metadata import Metadata
from metaprotocol_sdk.proxy import loads_config
from metaprotocol_sdk.proxy.balancer import LocalityBalancer, RoundRobin
from metaprotocol_sdk.proxy.config.models import (
    LoadBalancer,
    LocalityDistribute,
    locality_weight_label,
)
from metaprotocol_sdk.proxy.config.models import LocalityLbSetting as Setting
from metaprotocol_sdk.proxy.locality import (
    distribute_weights,
    failover_priorities,
    ordered_overlap,
    pattern_problem,
    unordered_overlap,
)
from metaprotocol_sdk.proxy.priority import (
    effective_weights,
    locality_balancer,
    priority_balancer,
    schedulable,
)


def rules(*pairs: tuple[str, dict[str, int]]) -> Setting:
    return Setting(distribute=tuple(LocalityDistribute(o, tuple(to.items())) for o, to in pairs))


EAST = rules(("r1/*", {"r1/z1": 80, "r2/*": 20}), ("*", {"r3": 100}))


@pytest.mark.parametrize(
    ("own", "localities", "weights", "setting", "expected"),
    [
        # The first rule whose from matches: r1/z1 takes 80 (its endpoints' weights 2, so
        # 80 for the locality), r2's 20 splits by endpoint weights 1 : 3 (5, 15); r3 is out.
        (
            "r1/z9",
            ["r1/z1", "r1/z1", "r2/z1", "r2/z2", "r3"],
            [1, 1, 1, 3, 1],
            EAST,
            [80, 80, 5, 15, 0],
        ),
        # Rounded up, as istiod (math.Ceil): 20 * 1/3 is 7, 20 * 2/3 is 14.
        (
            "r9",
            ["r3/a", "r3/b", "r3/b"],
            [1, 1, 1],
            rules(("*", {"r3": 20, "r4": 80})),
            [7, 14, 14],
        ),
        # '*' matches an engine without a locality (istiod's LocalityMatch); r1 does not.
        ("", ["r1", "", "r3"], [1, 1, 1], EAST, [0, 0, 100]),
        # An endpoint without a locality matches only '*' (which splits its 100 here).
        ("r1", ["", "r1"], [1, 1], rules(("r1", {"*": 100})), [50, 50]),
        ("r1", ["", "r1"], [1, 1], rules(("r1", {"r1": 100})), [0, 100]),
    ],
)
def test_distribute_weights_as_istiod_computes_them(
    own: str, localities: list[str], weights: list[int], setting: Setting, expected: list[int]
) -> None:
    assert distribute_weights(own, localities, weights, setting) == expected


def test_no_weights_without_a_matching_rule_or_when_disabled() -> None:
    only_r1 = rules(("r1", {"r1": 100}))
    assert distribute_weights("r2/z1", ["r1", "r2"], [1, 1], only_r1) is None
    assert distribute_weights("r1", ["r1", "r2"], [1, 1], None) is None
    assert distribute_weights("r1", ["r1", "r2"], [1, 1], Setting()) is None
    off = Setting(enabled=False, distribute=only_r1.distribute)
    assert distribute_weights("r1", ["r1", "r2"], [1, 1], off) is None
    # distribute and failover are exclusive in istiod: no failover priorities with it.
    ranked = Setting(failover_priority=(("tier", None),), distribute=only_r1.distribute)
    assert failover_priorities("r1", ["r1", "r2"], only_r1) is None
    assert failover_priorities("r1", ["r1", "r2"], ranked, {"tier": "a"}, [{}, {}]) is None


def test_locality_patterns_as_istiod_validates_them() -> None:
    for good in ("*", "r1", "r1/*", "r1/z1", "r1/z1/*", "r1/z1/s1"):
        assert pattern_problem(good) is None, good
    assert "must not contain empty" in str(pattern_problem("r1//s1"))
    assert "wildcard '*' number can not exceed 1" in str(pattern_problem("*/z1"))
    assert "wildcard '*' number can not exceed 1" in str(pattern_problem("r1/*/*"))
    assert "more than three parts" in str(pattern_problem("r1/z1/s1/x"))
    assert "stands for a whole" in str(pattern_problem("r1/z*"))
    # from: in order; a later one shadowed, or a bare one after a more specific one.
    assert ordered_overlap(["r1/z1", "r1/*", "*"]) is None  # fallbacks after specifics
    assert ordered_overlap(["r1", "r2/z1/s1", "r2/z2"]) is None
    assert ordered_overlap(["*", "r1"]) == 1
    assert ordered_overlap(["r1/*", "r1/z1"]) == 1
    assert ordered_overlap(["r1/z1", "r1"]) == 1
    assert ordered_overlap(["r1/z1/s1", "r1/z1"]) == 1
    assert ordered_overlap(["r1", "r1/*"]) == 1
    # to: any two a locality would match both of, in any order.
    assert unordered_overlap(["r1/z1", "r1/z2", "r2"]) is None
    assert unordered_overlap(["r1/z1", "*"]) == ("*", "r1/z1")
    assert unordered_overlap(["r1/z1/s1", "r1/*"]) == ("r1/*", "r1/z1/s1")
    assert unordered_overlap(["r1", "r1/*"]) == ("r1", "r1/*")


REQUEST = Metadata(MessageType.Request)


@dataclass(eq=False)
class Fake:
    """A host as the balancers see it."""

    key: str
    locality: str
    locality_weight: int
    ejected: bool = False
    weight: int = 1
    priority: int = 0
    active: int = 0


def picks(balancer: object, n: int) -> Counter[str]:
    pick = balancer.pick  # type: ignore[attr-defined]
    return Counter(pick(REQUEST).locality for _ in range(n))


def test_effective_weights_are_weight_times_availability() -> None:
    # Everyone fully available: the weights themselves (a short schedule).
    assert effective_weights([(80, 4, 4), (20, 3, 4)]) == [80, 20]  # 3 of 4 is 105%: 100
    # 2 of 4 healthy is 70%: 80 * 70 against 20 * 100; none healthy takes nothing.
    assert effective_weights([(80, 2, 4), (20, 1, 1)]) == [5600, 2000]
    assert effective_weights([(80, 0, 4), (20, 1, 1)]) == [0, 2000]


def test_any_weights_fit_a_schedule_of_at_most_1000_picks() -> None:
    assert schedulable([5600, 2000]) == [5600, 2000]  # 14 : 5 once divided
    assert schedulable([2772, 2772, 3400]) == [308, 308, 379]  # a cycle of 2236: scaled
    huge = schedulable([2**32 - 1, 1, 0, 7 * 10**8])
    assert huge == [856, 1, 0, 139] and sum(huge) <= 1000
    assert schedulable([3] * 1000) == [3] * 1000  # a cycle of 1000
    assert schedulable([3] * 1001) == [1] * 1001  # more localities than the limit: heap


def moved(weights: list[int], scaled: list[int]) -> float:
    """The part of the picks a schedule by ``scaled`` sends elsewhere than ``weights`` say."""
    total, parts = sum(weights), sum(scaled)
    return sum(abs(s / parts - w / total) for w, s in zip(weights, scaled, strict=True)) / 2


@pytest.mark.parametrize(
    "weights",
    [
        [1000] + [1] * 599,  # scaled to 400 parts, the 599 rounded up: 29% for 62.5%
        [2, 1] * 501,  # more localities than the limit: all weights 1, 50% for 67%
        [100] * 10 + [1] * 900,  # 900 small ones rounded up to 1 each
    ],
)
def test_many_localities_keep_their_shares(weights: list[int]) -> None:
    """Scaling weights down to a schedule of 1000 picks rounds each up to 1 at least: with
    hundreds of localities (an xDS push can name thousands) the rounding moved a third of
    the traffic and more. Now the weights are scaled only when at most 1% of the picks
    move; otherwise they are kept and picked from the heap (``O(log n)`` a pick)."""
    assert moved(weights, schedulable(weights)) <= 0.01
    hosts = [Fake(f"h{i}", f"r/z{i}", w) for i, w in enumerate(weights)]
    balancer = locality_balancer(LoadBalancer(), hosts, hosts)
    assert isinstance(balancer, LocalityBalancer)
    request = Metadata(MessageType.Request)
    counts = Counter(balancer.pick(request) for _ in range(sum(weights)))
    assert moved(weights, [counts[h] for h in hosts]) <= 0.01


def test_the_locality_is_picked_by_effective_weight_then_a_host_of_it() -> None:
    a = [Fake(f"a{i}", "r1/z1", 80) for i in range(4)]
    b = [Fake(f"b{i}", "r2/z1", 20) for i in range(2)]
    hosts = a + b
    balancer = locality_balancer(LoadBalancer(), hosts, hosts)
    assert isinstance(balancer, LocalityBalancer)
    assert picks(balancer, 100) == {"r1/z1": 80, "r2/z1": 20}  # a smooth round robin: exact
    # Two of a's four ejected: a 70% available, 5600 : 2000.
    a[0].ejected = a[1].ejected = True
    healthy = [h for h in hosts if not h.ejected]
    balancer = locality_balancer(LoadBalancer(), hosts, healthy)
    assert picks(balancer, 76 * 5) == {"r1/z1": 56 * 5, "r2/z1": 20 * 5}
    chosen = Counter(balancer.pick(REQUEST).key for _ in range(76))  # type: ignore[union-attr]
    assert set(chosen) == {"a2", "a3", "b0", "b1"}
    # Every host of a ejected: all to b.
    healthy = b
    assert picks(locality_balancer(LoadBalancer(), hosts, healthy), 10) == {"r2/z1": 10}


def test_weights_in_proportion_to_the_endpoints_cost_nothing_per_request() -> None:
    """Locality weights as istiod writes them without ``distribute`` (each the sum of its
    endpoints' weights), all available: the plain balancer of the healthy hosts."""
    hosts = [Fake("a0", "r1", 2), Fake("a1", "r1", 2), Fake("b0", "r2", 1)]
    assert type(locality_balancer(LoadBalancer(), hosts, hosts)) is RoundRobin
    # Weight 0 for every locality (EDS without weights): Envoy balances over the level.
    zero = [Fake("a0", "r1", 0), Fake("b0", "r2", 0)]
    assert type(locality_balancer(LoadBalancer(), zero, zero)) is RoundRobin
    # One locality with weight 0 among weighted ones takes nothing.
    some = [Fake("a0", "r1", 0), Fake("b0", "r2", 5), Fake("c0", "r3", 5)]
    assert set(picks(locality_balancer(LoadBalancer(), some, some), 10)) == {"r2", "r3"}


def test_a_level_in_panic_balances_over_all_its_hosts_localities_aside() -> None:
    a = [Fake("a0", "r1", 99, ejected=True), Fake("a1", "r1", 99, ejected=True)]
    b = [Fake("b0", "r2", 1), Fake("b1", "r2", 1, ejected=True), Fake("b2", "r2", 1)]
    balancer, loads = priority_balancer(LoadBalancer(), a + b, 50, by_locality=True)
    assert loads == {0: 100}
    assert type(balancer) is RoundRobin and len(balancer.hosts) == 5  # 2 of 5 healthy: panic
    balancer, _ = priority_balancer(LoadBalancer(), a + b, 0, by_locality=True)
    assert picks(balancer, 10) == {"r2": 10}  # no panic threshold: b's healthy hosts


# -- configuration -------------------------------------------------------------------------


def distribute(rules_yaml: str) -> str:
    return f"loadBalancer: {{localityLbSetting: {{distribute: {rules_yaml}}}}}"


@pytest.mark.parametrize(
    ("policy", "field", "words"),
    [
        (distribute("[{from: r1, to: {r1: 60, r2: 30}}]"), "distribute[0].to", "!= 100"),
        (distribute("[{from: r1, to: {r1: 0, r2: 100}}]"), "to.r1", "in range [1, 100]"),
        (distribute("[{from: r1, to: {r1: 101}}]"), "to.r1", "in range [1, 100]"),
        (distribute("[{from: r1, to: {r1: '100'}}]"), "to.r1", "in range [1, 100]"),
        (distribute("[{from: r1, to: {}}]"), "distribute[0].to", "total locality weight 0"),
        (distribute("[{from: '*/z1', to: {r1: 100}}]"), "[0].from", "must be in the end"),
        (distribute("[{from: r1, to: {'r1//s': 100}}]"), "[0].to", "empty region/zone"),
        (distribute("[{from: r1, to: {r1/z1/s1/x: 100}}]"), "[0].to", "more than three"),
        (
            distribute("[{from: r1, to: {'r1/z1': 50, 'r1/*': 50}}]"),
            "[0].to",
            "locality r1/z1 overlap with previous specified ones (r1/*)",
        ),
        (
            distribute("[{from: '*', to: {r1: 100}}, {from: r1, to: {r2: 100}}]"),
            "distribute[1].from",
            "locality r1 overlap with previous specified ones",
        ),
        (distribute("[{from: r1, to: {r1: 100}, extra: 1}]"), "distribute[0]", "extra"),
        (distribute("[r1]"), "distribute[0]", "must be a mapping"),
        (
            "loadBalancer: {localityLbSetting: {failover: [{from: r1, to: r2}], "
            "distribute: [{from: r1, to: {r1: 100}}]}}",
            "localityLbSetting.distribute",
            "can not simultaneously specify 'distribute' and 'failover'",
        ),
        (
            "loadBalancer: {consistentHash: {httpHeaderName: k}, localityLbSetting: "
            "{distribute: [{from: r1, to: {r1: 100}}]}}",
            "localityLbSetting.distribute",
            "not supported by this engine with consistentHash",
        ),
    ],
)
def test_a_bad_distribute_is_refused(policy: str, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        loads_config(located_mesh([(1, "r1")], policy), "t.yaml")
    assert caught.value.field is not None and field in caught.value.field, caught.value.field
    assert words in str(caught.value)


def test_a_fallback_rule_after_specific_ones_loads() -> None:
    policy = distribute(
        "[{from: r1/z1, to: {r1/z1: 90, r2: 10}}, {from: r1/*, to: {r1: 100}}, "
        "{from: '*', to: {'*': 100}}]"
    )
    config = loads_config(located_mesh([(1, "r1")], policy), "t.yaml")
    lb = config.destination_rules["svc.test"].policy.load_balancer
    assert lb is not None and lb.locality is not None
    assert [r.origin for r in lb.locality.distribute] == ["r1/z1", "r1/*", "*"]


# -- over sockets ------------------------------------------------------------------------------


def test_traffic_splits_between_localities_by_distribute_and_moves_with_ejections() -> None:
    """The engine in r1/z1 with ``distribute: from r1/*: r1/z1 70, r2/* 30``: r1/z1 (two
    endpoints) and r2/z1 (one) split the traffic 70 : 30 however many endpoints each has,
    r3 (not named) takes none. With one of r1/z1's two dead, and ejected, r1/z1 is 1 of 2
    healthy (70% available): 4900 : 3000, about 62 : 38. Without ``distribute`` every
    endpoint takes its turn."""

    async def main() -> None:
        names = ("near", "near2", "other", "far")
        near, near2, other, far = [await Upstream(n).start() for n in names]
        policy = distribute("[{from: 'r1/*', to: {r1/z1: 70, 'r2/*': 30}}]")
        endpoints = [
            (near.port, "r1/z1"),
            (near2.port, "r1/z1"),
            (other.port, "r2/z1"),
            (far.port, "r3/z1"),
        ]
        async with engine_for(located_mesh(endpoints, policy, own="r1/z1/s1")) as engine:
            (cluster,) = engine.clusters.values()
            assert [h.port for h in cluster.hosts] == [near.port, near2.port, other.port]
            assert [h.locality_weight for h in cluster.hosts] == [70, 70, 30]
            assert not cluster.prioritised and cluster.locality_weighted
            client = await Client.connect(address(engine))
            assert await answered_by(client, 100) == {"near": 35, "near2": 35, "other": 30}
            client.close()
        endpoints[1] = (refusing_port(), "r1/z1")
        async with engine_for(located_mesh(endpoints, policy, own="r1/z1/s1")) as engine:
            (cluster,) = engine.clusters.values()
            client = await Client.connect(address(engine))
            for _ in range(10):  # the dead one's first turn fails, and ejects it
                if error_type(await client.call()) == "UpstreamConnectFailure":
                    break
            assert [h.ejected for h in cluster.hosts] == [False, True, False]
            seen = await answered_by(client, 316)
            assert set(seen) == {"near", "other"}
            assert 0.58 <= seen["near"] / 316 <= 0.66, seen  # 4900 / 7900 = 0.62
            client.close()
        # The same endpoints without distribute: each in turn, far included.
        async with engine_for(located_mesh(endpoints, "", own="r1/z1/s1")) as engine:
            (cluster,) = engine.clusters.values()
            assert not cluster.locality_weighted and type(cluster.balancer) is RoundRobin
            assert len(cluster.hosts) == 4
        for up in (near, near2, other, far):
            await up.close()

    run(main())


def test_the_endpoints_of_a_locality_share_its_weight_by_theirs() -> None:
    """The engine without a locality and a ``'*'`` rule: 90 to r1, 10 to r2 (two endpoints
    there, sharing it by their weights 1 : 4), the hosts of r1 in turn."""

    async def main() -> None:
        ups = [await Upstream(n).start() for n in ("r1a", "r1b", "r2a", "r2b")]
        endpoints = [(ups[0].port, "r1"), (ups[1].port, "r1"), (ups[2].port, "r2")]
        endpoints.append((ups[3].port, "r2"))
        policy = distribute("[{from: '*', to: {r1: 90, r2: 10}}]")
        text = located_mesh(endpoints, policy, own="''", outlier=False)
        text = text.replace(f": {ups[3].port}}}, labels", f": {ups[3].port}}}, weight: 4, labels")
        async with engine_for(text) as engine:
            (cluster,) = engine.clusters.values()
            assert [h.locality_weight for h in cluster.hosts] == [90, 90, 10, 10]
            client = await Client.connect(address(engine))
            seen = await answered_by(client, 200)
            assert seen["r1a"] == seen["r1b"] == 90, seen
            assert seen["r2a"] + seen["r2b"] == 20 and seen["r2b"] > seen["r2a"], seen
            client.close()
        for up in ups:
            await up.close()

    run(main())


def test_many_rules_and_localities_take_linear_time() -> None:
    """20000 rules, 20000 ``to`` patterns and 20000 endpoint localities: checked and weighed
    in well under two seconds (a pairwise check would take minutes)."""
    n = 20_000
    froms = [f"r{i}/z{i}" for i in range(n)] + ["*"]
    started = time.perf_counter()
    assert ordered_overlap(froms) is None
    assert unordered_overlap([f"r{i}" for i in range(n)]) is None
    setting = rules(*[(f"r{i}/z{i}", {f"r{i}": 100}) for i in range(n)], ("*", {"*": 100}))
    localities = [f"r{i % 100}/z{i}" for i in range(n)]
    weights = distribute_weights("r9/z9", localities, [1] * n, setting)
    # r9's 200 zones share its 100, each rounded up to 1; the other regions are left out.
    assert weights is not None and weights.count(1) == n // 100 == n - weights.count(0)
    assert time.perf_counter() - started < 2.0


def test_locality_weights_compose_with_failover_priorities() -> None:
    """Each priority level picks its own localities by weight; the level first, by its
    priority load, as without locality weights."""
    level0 = [Fake("a", "r1", 3), Fake("b", "r2", 1)]
    level1 = [Fake("c", "r3", 1, priority=1), Fake("d", "r4", 1, priority=1)]
    balancer, loads = priority_balancer(LoadBalancer(), level0 + level1, 0, by_locality=True)
    assert loads == {0: 100, 1: 0} and isinstance(balancer, LocalityBalancer)
    assert picks(balancer, 100) == {"r1": 75, "r2": 25}
    level0[0].ejected = True  # level 0 is 1 of 2 healthy: 70%, 30% to level 1
    balancer, loads = priority_balancer(LoadBalancer(), level0 + level1, 0, by_locality=True)
    assert loads == {0: 70, 1: 30}
    assert picks(balancer, 100) == {"r2": 70, "r3": 15, "r4": 15}


def test_a_reload_that_moves_an_endpoint_reweighs_its_cluster() -> None:
    """The weights depend on the endpoints' localities: a reload that changes only one's
    rebuilds the cluster with the new weights (one that changes nothing keeps it)."""

    async def main() -> None:
        a, b = await Upstream("a").start(), await Upstream("b").start()
        endpoints = [(a.port, "r1"), (b.port, "r2")]
        policy = distribute("[{from: r1, to: {r1: 90, r2: 10}}]")
        async with engine_for(located_mesh(endpoints, policy, own="r1", outlier=False)) as engine:
            (cluster,) = engine.clusters.values()
            assert [h.locality_weight for h in cluster.hosts] == [90, 10]
            same = located_mesh(endpoints, policy, own="r1", outlier=False)
            await engine.apply(loads_config(same, "t2.yaml"))
            assert engine.clusters[cluster.name] is cluster
            moved = located_mesh([(a.port, "r2"), (b.port, "r1")], policy, own="r1", outlier=False)
            await engine.apply(loads_config(moved, "t3.yaml"))
            (rebuilt,) = engine.clusters.values()
            assert [h.locality_weight for h in rebuilt.hosts] == [10, 90]
            client = await Client.connect(address(engine))
            assert await answered_by(client, 20) == {"a": 2, "b": 18}
            client.close()
        await a.close()
        await b.close()

    run(main())


def test_xds_locality_weights_keep_every_endpoint() -> None:
    """Locality weights as the xDS translation carries them (an internal label per cluster):
    a locality without a weight keeps its endpoints, which take requests only when no
    locality has a weight (Envoy's way); they were dropped, and a cluster of such
    localities alone had no endpoint at all."""
    label = locality_weight_label(9000, None)

    async def main() -> None:
        a, b = await Upstream("a").start(), await Upstream("b").start()
        for weights, expected in ((("5", "0"), {"a": 10}), (("0", "0"), {"a": 5, "b": 5})):
            text = located_mesh([(a.port, "r1"), (b.port, "r2")], "", outlier=False)
            for port, weight, locality in zip((a.port, b.port), weights, ("r1", "r2"), strict=True):
                text = text.replace(
                    f": {port}}}, labels: {{version: v1",
                    f": {port}}}, labels: {{'{label}': '{weight} {locality}//', version: v1",
                )
            async with engine_for(text) as engine:
                (cluster,) = engine.clusters.values()
                assert len(cluster.hosts) == 2
                client = await Client.connect(address(engine))
                assert await answered_by(client, 10) == expected
                client.close()
        await a.close()
        await b.close()

    run(main())
