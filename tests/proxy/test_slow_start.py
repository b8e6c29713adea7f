"""Slow start (Istio's ``loadBalancer.warmup``, Envoy's ``slow_start_config``): the weight
curve, which endpoints warm, and end to end through reloads and outlier ejection (real
sockets on 127.0.0.1)."""

from __future__ import annotations

import json

import pytest
from proxy_kit import (
    Client,
    Upstream,
    address,
    engine_for,
    error_type,
    http_get,
    refusing_port,
    run,
    until,
)
from test_weights import cluster_dump, servers, weighted_mesh

from metaprotocol_sdk.proxy import Engine, loads_config, slow_start
from metaprotocol_sdk.proxy.config.models import Warmup
from metaprotocol_sdk.proxy.slow_start import (
    MAX_STEP,
    MIN_STEP,
    STEPS,
    step_interval,
    warm_starts,
    warming_weights,
    weight_factor,
)

NAME = "outbound|9000|v1|svc.test"


async def warming_dump(engine: Engine) -> dict[str, dict[str, float]]:
    """``/config_dump``'s endpoints warming, by cluster."""
    assert engine.admin_address is not None
    status, body = await http_get(engine.admin_address, "/config_dump")
    assert status == 200
    return dict(json.loads(body)["slowStart"])


# -- the curve ---------------------------------------------------------------------------------


def test_the_weight_factor_is_envoy_s_curve() -> None:
    linear = Warmup(60.0)
    assert weight_factor(0.0, linear) == 0.1  # minimumPercent's 10%, not 1ms / 60s
    assert weight_factor(6.0, linear) == pytest.approx(0.1)
    assert weight_factor(30.0, linear) == pytest.approx(0.5)
    assert weight_factor(59.9, linear) == pytest.approx(59.9 / 60)
    assert weight_factor(60.0, linear) == 1.0
    assert weight_factor(1e9, linear) == 1.0
    # Aggression: time_factor ** (1 / aggression); 2 is faster at first.
    faster = Warmup(60.0, 10.0, 2.0)
    assert weight_factor(15.0, faster) == pytest.approx(0.5)  # sqrt(1/4)
    assert weight_factor(15.0, Warmup(60.0, 0.0, 0.5)) == pytest.approx(1 / 16)
    # No minimum: Envoy's least time factor, 1ms of the window.
    assert weight_factor(0.0, Warmup(10.0, 0.0)) == pytest.approx(0.001 / 10)
    assert weight_factor(0.0, Warmup(10.0, 100.0)) == 1.0
    # Extreme aggressions stay finite: the minimum, or the whole weight.
    assert weight_factor(1.0, Warmup(10.0, 10.0, 1e-300)) == 0.1
    assert weight_factor(1.0, Warmup(10.0, 10.0, 1e300)) == pytest.approx(1.0)


def test_effective_weights_are_hundredths_of_the_endpoint_weights() -> None:
    warmup = Warmup(10.0)
    # Old endpoints (started long ago) at their whole weight, a new one at its part.
    assert warming_weights([1, 3, 2], [0.0, 0.0, 100.0], 105.0, warmup) == [100, 300, 100]
    assert warming_weights([1, 1], [0.0, 100.0], 100.0, warmup) == [100, 10]
    # At least 1, whatever the minimum.
    assert warming_weights([1, 1], [-1e7, 100.0], 100.0, Warmup(1e6, 0.0)) == [100, 1]
    # Every endpoint started together: equal factors, the endpoint weights give the shares.
    assert warming_weights([1, 5], [100.0, 100.0], 101.0, warmup) is None
    # Every window over.
    assert warming_weights([1, 1], [0.0, 100.0], 110.0, warmup) is None


def test_which_endpoints_warm() -> None:
    """Every endpoint of a cluster new to the engine starts together (Envoy starts each
    host's window when the load balancer first sees it); a reload or an EDS update starts
    the endpoints it adds, and the others keep theirs."""
    assert warm_starts(["a:1", "b:1"], None, 5.0) == {"a:1": 5.0, "b:1": 5.0}
    previous = {"a:1": 5.0, "b:1": 5.0, "c:1": 7.0}
    assert warm_starts(["a:1", "c:1", "d:1"], previous, 9.0) == {
        "a:1": 5.0,
        "c:1": 7.0,
        "d:1": 9.0,
    }


def test_the_rebuild_interval_is_bounded() -> None:
    assert step_interval(Warmup(10.0)) == 10.0 / STEPS
    assert step_interval(Warmup(0.001)) == MIN_STEP  # a 1ms window does not rebuild per ms
    assert step_interval(Warmup(315_576_000_000.0)) == MAX_STEP


# -- end to end --------------------------------------------------------------------------------


def test_an_endpoint_a_reload_adds_warms_then_takes_its_full_share() -> None:
    """An endpoint added with warmup takes 10% of its share at first (minimumPercent) and
    all of it once the window is over; the endpoints present when the engine started are
    not warming relative to each other, and the cluster balances without weights (at no
    cost per request) before and after."""

    async def main() -> None:
        a, b, c = [await Upstream(n).start() for n in "abc"]
        warm = "{loadBalancer: {simple: ROUND_ROBIN, warmup: {duration: 3s}}}"
        async with engine_for(weighted_mesh([(a.port, "v1", 1), (b.port, "v1", 1)], warm)) as e:
            client = await Client.connect(address(e))
            cluster = e.clusters[NAME]
            assert cluster.slow_start is not None
            assert len(set(cluster.slow_start.starts.values())) == 1
            assert await warming_dump(e) == {}
            assert type(cluster.balancer).__name__ == "RoundRobin"
            assert await servers(client, 40) == {"a": 20, "b": 20}
            # As if the engine had started an hour ago: a and b warmed long since (the window
            # of the endpoints present at start runs from then, all together, as in Envoy).
            for key in cluster.slow_start.starts:
                cluster.slow_start.starts[key] -= 3600

            eps = [(a.port, "v1", 1), (b.port, "v1", 1), (c.port, "v1", 1)]
            await e.apply(loads_config(weighted_mesh(eps, warm), "warm.yaml"))
            cluster = e.clusters[NAME]
            slow = cluster.slow_start
            assert slow is not None
            # 10% until 0.3s into the 3s window; bounds for a slow machine.
            dump = await cluster_dump(e)
            assert dump["weights"] == [1, 1, 1]
            assert dump["warmup"] == {"duration": 3.0, "minimum_percent": 10.0, "aggression": 1.0}
            (warming,) = (await warming_dump(e))[NAME].items()
            assert warming[0] == f"127.0.0.1:{c.port}" and 10.0 <= warming[1] <= 40.0
            early = await servers(client, 42)
            assert early["c"] <= 6 and early["a"] + early["b"] >= 36  # its full share is 14

            await until(lambda: not slow.warming, "the end of the warm-up", timeout=15.0)
            assert type(cluster.balancer).__name__ == "RoundRobin"
            assert await warming_dump(e) == {}
            assert await servers(client, 30) == {"a": 10, "b": 10, "c": 10}
            assert slow.rebuilds <= STEPS + 3
            client.close()
        for up in (a, b, c):
            await up.close()

    run(main())


def test_reloads_keep_the_warm_up_of_the_endpoints_that_stay() -> None:
    async def main() -> None:
        ports = [refusing_port() for _ in range(4)]
        keys = [f"127.0.0.1:{p}" for p in ports]
        warm = "{loadBalancer: {simple: LEAST_REQUEST, warmup: {duration: 60s}}}"

        def mesh_of(n: int, policy: str = warm) -> str:
            return weighted_mesh([(p, "v1", 1) for p in ports[:n]], policy)

        async with engine_for(mesh_of(2)) as engine:
            first = engine.clusters[NAME].slow_start
            assert first is not None
            for key in first.starts:
                first.starts[key] -= 3600  # as if the engine had started an hour ago
            await engine.apply(loads_config(mesh_of(3), "warm.yaml"))
            second = engine.clusters[NAME].slow_start
            assert second is not None
            assert [second.starts[k] for k in keys[:2]] == [first.starts[k] for k in keys[:2]]
            assert second.starts[keys[2]] > first.starts[keys[0]]
            assert list(second.warming) == [keys[2]]
            assert type(engine.clusters[NAME].balancer).__name__ == "WeightedLeastRequest"
            # A reload that adds one more and changes another setting of the cluster: the
            # one warming keeps its start, and so do the others.
            pooled = warm.replace("}}}", "}}, connectionPool: {tcp: {maxConnections: 7}}}")
            await engine.apply(loads_config(mesh_of(4, pooled), "warm.yaml"))
            third = engine.clusters[NAME].slow_start
            assert third is not None and third.cluster is not second.cluster
            assert [third.starts[k] for k in keys[:3]] == [second.starts[k] for k in keys[:3]]
            assert sorted(third.warming) == sorted(keys[2:])
            # The replaced cluster's updates end with the swap (not at its next step).
            assert third.running and not second.running
            # An unchanged reload keeps the cluster itself.
            await engine.apply(loads_config(mesh_of(4, pooled), "warm.yaml"))
            assert engine.clusters[NAME].slow_start is third
            # Without warmup: no slow start, the endpoint weights (nothing per request).
            await engine.apply(loads_config(mesh_of(4, "{}"), "warm.yaml"))
            cluster = engine.clusters[NAME]
            assert cluster.slow_start is None and not third.running
            assert type(cluster.balancer).__name__ == "RoundRobin"
            # Back on: every endpoint starts again, together (none is favoured).
            await engine.apply(loads_config(mesh_of(4), "warm.yaml"))
            again = engine.clusters[NAME].slow_start
            assert again is not None and again.warming == {}
            assert len(set(again.starts.values())) == 1

    run(main())


def test_an_ejection_rebuilds_with_the_warming_weights() -> None:
    """Outlier detection rebuilds the balancer over the healthy endpoints with the weights
    of the moment: the endpoint warming keeps its small share among them."""

    async def main() -> None:
        a, b = await Upstream("a").start(), await Upstream("b").start()
        dead = refusing_port()
        policy = (
            "{loadBalancer: {simple: ROUND_ROBIN, warmup: {duration: 60s}}, outlierDetection:"
            " {consecutiveGatewayErrors: 1, baseEjectionTime: 1h, maxEjectionPercent: 50}}"
        )
        text = weighted_mesh([(dead, "v1", 1), (a.port, "v1", 1)], policy)
        async with engine_for(text) as engine:
            starts = engine.clusters[NAME].slow_start.starts  # type: ignore[union-attr]
            for key in starts:
                starts[key] -= 3600  # as if the engine had started an hour ago
            eps = [(dead, "v1", 1), (a.port, "v1", 1), (b.port, "v1", 1)]
            await engine.apply(loads_config(weighted_mesh(eps, policy), "warm.yaml"))
            client = await Client.connect(address(engine))
            failed = [error_type(await client.call()) for _ in range(8)]
            assert failed.count("UpstreamConnectFailure") == 1  # then it is ejected
            assert engine.clusters[NAME].slow_start.warming == {f"127.0.0.1:{b.port}": 10.0}  # type: ignore[union-attr]
            assert await servers(client, 22) == {"a": 20, "b": 2}
            client.close()
        await a.close()
        await b.close()

    run(main())


def test_a_window_of_one_millisecond_rebuilds_at_most_twice() -> None:
    """The least window Istio accepts: the endpoint added is at its whole weight by the
    first update after the swap, or the one after (a timer at the window's end), and the
    cluster is back to the endpoint weights; nothing runs after."""

    async def main() -> None:
        ports = [refusing_port() for _ in range(3)]
        warm = "{loadBalancer: {simple: ROUND_ROBIN, warmup: {duration: 1ms}}}"
        text = weighted_mesh([(p, "v1", 1) for p in ports[:2]], warm)
        async with engine_for(text) as engine:
            await engine.apply(loads_config(weighted_mesh([(p, "v1", 1) for p in ports], warm)))
            slow = engine.clusters[NAME].slow_start
            assert slow is not None
            await until(lambda: not slow.running, "the end of a 1ms warm-up", timeout=5.0)
            assert slow.warming == {} and slow.rebuilds <= 2
            assert type(engine.clusters[NAME].balancer).__name__ == "RoundRobin"

    run(main())


def test_the_rebuilds_of_all_warming_clusters_are_bounded_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each warming cluster rebuilt every ``window / STEPS`` (at least 0.1 s) whatever its
    size and however many warmed: an endpoint added to each of 1000 clusters of 150 (a
    rolling update under a mesh-wide warmup) made the loop update 1.5 million endpoints a
    second, more than it can. Now the rebuilds of all of them together update at most
    ``HOSTS_PER_SECOND`` endpoints a second (here 800: two clusters of 201 endpoints, each
    rebuilt about every 0.5 s rather than every 0.1 s), and still end on time."""
    monkeypatch.setattr(slow_start, "HOSTS_PER_SECOND", 800)

    async def main() -> None:
        warm = "{loadBalancer: {simple: ROUND_ROBIN, warmup: {duration: 2s}}}"
        both = "- name: all\n  route: [{destination: {host: svc.test, subset: v1}, weight: 50}, "
        both += "{destination: {host: svc.test, subset: v2}, weight: 50}]\n"

        def text(n: int) -> str:
            eps = [(20000 + i, "v1", 1) for i in range(n)]
            eps += [(30000 + i, "v2", 1) for i in range(n)]
            return weighted_mesh(eps, warm, both)

        async with engine_for(text(200)) as engine:
            await engine.apply(loads_config(text(201)))
            slows = [engine.clusters[n].slow_start for n in (NAME, NAME.replace("v1", "v2"))]
            assert all(s is not None and s.running for s in slows)
            assert engine.warming_hosts == 402
            started = engine.loop.time()
            await until(lambda: not any(s.running for s in slows if s), "the end", 10.0)
            assert engine.loop.time() - started < 2.5
            assert engine.warming_hosts == 0
            rebuilds = sum(s.rebuilds for s in slows if s)
            # 402 endpoints at 800 a second: one rebuild of each cluster a 0.5 s, about 4 of
            # each in the window, and each one more at its end (were 20 and more of each).
            assert rebuilds <= 2 * (2.0 / (402 / 800) + 3), rebuilds
            assert all(s.warming == {} for s in slows if s)

    run(main())
