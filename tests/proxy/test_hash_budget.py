"""The hash rings and Maglev tables of all clusters together: bounded by
``limits.maxHashSlots``, and a ring's points held compactly.

Each cluster (a subset, a port) has a ring or table of its own, built on the engine's only
thread. Before the bound, 100 subsets with ``ringHash.minimumRingSize: 131072`` (a 25 KB
configuration) held the loop 9.7 s at start and took 808 MB."""

from __future__ import annotations

import asyncio
import tracemalloc
from dataclasses import dataclass

import pytest
from proxy_kit import Client, Upstream, count_calls, engine_for, error_type, rebuilt, run

from metaprotocol_sdk import Attributes, ConfigError, MessageType, Metadata
from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.balancer import MAX_RING_SIZE, ConsistentHash, hash_slots
from metaprotocol_sdk.proxy.config.models import LoadBalancer

RING = "{consistentHash: {httpHeaderName: user, ringHash: {minimumRingSize: 131072}}}"
MAGLEV = "{consistentHash: {httpHeaderName: user, maglev: {tableSize: 65537}}}"


@dataclass(eq=False)
class FakeHost:
    key: str
    weight: int = 1
    active: int = 0


def subsets_mesh(
    ports: list[int], balancer: str, limits: str = "", subsets: int | None = None, more: str = ""
) -> str:
    """One service whose endpoints are each a subset of their own (or spread over
    ``subsets``), each subset routed to; ``more``: the traffic policy's other fields."""
    count = len(ports) if subsets is None else subsets
    eps = "\n".join(
        f"    - {{address: 127.0.0.1, ports: {{tcp-metaprotocol-kv-svc: {p}}}, "
        f"labels: {{version: v{i % count}}}}}"
        for i, p in enumerate(ports)
    )
    names = "\n".join(f"    - {{name: s{i}, labels: {{version: v{i}}}}}" for i in range(count))
    routes = "\n".join(
        f"    - {{name: r{i}, match: {{attributes: {{to: {{exact: s{i}}}}}}}, "
        f"route: [{{destination: {{host: svc.test, subset: s{i}}}}}]}}"
        for i in range(count)
    )
    return f"""\
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: ApplicationProtocol
metadata: {{name: kv}}
spec: {{protocol: kv, codec: "metaprotocol_sdk.examples.kv:KVCodec"}}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: svc}}
spec:
  hosts: [svc.test]
  ports: [{{number: 9000, name: tcp-metaprotocol-kv-svc, protocol: TCP}}]
  resolution: STATIC
  endpoints:
{eps}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: svc}}
spec:
  host: svc.test
  trafficPolicy: {{{more}loadBalancer: {balancer}}}
  subsets:
{names}
---
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata: {{name: svc}}
spec:
  hosts: [svc.test]
  routes:
{routes}
---
apiVersion: proxy.metaprotocol.io/v1alpha1
kind: ProxyConfig
metadata: {{name: engine}}
spec:
  listeners: [{{host: svc.test, port: 9000, bind: '127.0.0.1:0'}}]
  admin: {{bind: '127.0.0.1:0'}}
{limits}"""


def test_hash_slots_counts_a_ring_or_table_per_priority_level() -> None:
    ring = LoadBalancer("CONSISTENT_HASH", "user", ring_size=4096)
    assert hash_slots(ring, [[1, 1, 1, 1]]) == 4096
    assert hash_slots(ring, [[1] * 100]) == 100 * 100  # 100 points an endpoint at least
    assert hash_slots(ring, [[1, 1], [1]]) == 2 * 4096
    maglev = LoadBalancer("CONSISTENT_HASH", "user", maglev_table_size=65537)
    assert hash_slots(maglev, [[1, 2], [3]]) == 2 * 65537
    assert hash_slots(LoadBalancer(), [[1] * 1000]) == 0


def test_rings_past_max_hash_slots_are_refused_naming_the_cluster() -> None:
    """Three subsets of 131 072 points each need 393 216: refused under 300 000, with the
    cluster, the total and the limit named; served at 400 000."""

    async def main() -> None:
        ports = [9101, 9102, 9103]
        text = subsets_mesh(ports, RING, "  limits: {maxHashSlots: 300000}\n")
        with pytest.raises(ConfigError) as refused:
            async with engine_for(text):
                pass
        message = str(refused.value)
        assert "outbound|9000|s2|svc.test" in message, message
        assert "limits.maxHashSlots (300000)" in message and "393216" in message, message
        assert "ringHash.minimumRingSize" in message, message
        async with engine_for(subsets_mesh(ports, RING, "  limits: {maxHashSlots: 400000}\n")):
            pass

    run(main())


def test_max_hash_slots_default_refuses_what_would_hold_the_loop_for_seconds() -> None:
    """The default, 4 194 304 slots, holds 32 Maglev tables of the largest size, 131 071
    slots (64 of Istio's usual 65 537), and refuses a 33rd: each costs the loop about 0.06 s
    and 1 MB to build."""
    largest = MAGLEV.replace("65537", "131071")
    config = loads_config(subsets_mesh(list(range(9101, 9134)), largest), "t.yaml")
    assert config.proxy.limits.max_hash_slots == 2**22

    async def main() -> None:
        with pytest.raises(ConfigError, match=r"limits\.maxHashSlots \(4194304\)"):
            await Engine(config).start()

    run(main())


def test_a_reload_past_max_hash_slots_is_refused_and_the_engine_serves_on() -> None:
    async def main() -> None:
        ups = [await Upstream(name).start() for name in "ab"]
        ports = [u.port for u in ups]
        limits = "  limits: {maxHashSlots: 300000}\n"
        async with engine_for(subsets_mesh(ports, RING, limits)) as engine:
            bigger = subsets_mesh([*ports, 9103], RING, limits)
            with pytest.raises(ConfigError, match=r"limits\.maxHashSlots \(300000\)"):
                await engine.apply(loads_config(bigger, "t.yaml"))
            c = await Client.connect(engine.listener_addresses[("svc.test", 9000)])
            reply = await c.call(headers={"to": "s1", "user": "u"})
            assert error_type(reply) is None and reply.attributes["server"] == "b"
            c.close()
        for up in ups:
            await up.close()

    run(main())


def test_a_ring_holds_at_most_24_bytes_a_point() -> None:
    """Points in a typed array (8 bytes each), their owners' references and indices: 53
    bytes a point as a list of Python integers (a 64-bit point is a 36-byte object)."""
    hosts = [FakeHost(f"10.0.0.{i}:9000") for i in range(3)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        ring = ConsistentHash(hosts, "user", None, MAX_RING_SIZE)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(ring._points) >= MAX_RING_SIZE
    assert held < 24 * MAX_RING_SIZE, held / MAX_RING_SIZE


def test_a_ring_without_some_hosts_is_the_whole_ring_s_points_of_the_others() -> None:
    """The ring of a cluster's healthy hosts, taken from the ring of all of them, is the
    ring built for the healthy ones (sized from all): the same points, the same owners."""
    hosts = [FakeHost(f"10.0.0.{i}:9000", weight=1 + i % 3) for i in range(12)]
    whole = ConsistentHash(hosts, "user", hosts, 4096)
    healthy = [h for i, h in enumerate(hosts) if i % 4 != 1]
    derived = ConsistentHash(healthy, "user", hosts, 4096, whole=whole)
    fresh = ConsistentHash(healthy, "user", hosts, 4096)
    assert list(derived._points) == list(fresh._points)
    assert derived._owners == fresh._owners
    assert derived.hosts == healthy


def test_an_ejection_from_a_large_ring_hashes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ejection or readmission hashed and sorted the whole ring again on the loop:
    0.09 s for 131 072 points, 2.5 s for the 2 million of 20 000 endpoints (100 each), at
    every ejection an erroring endpoint earns. Now the ring of the healthy endpoints is the
    cluster's whole ring with the ejected endpoints' points left out (15 times cheaper, as
    ``tests/proxy/redteam_balancing.py ejection`` measures): no point is hashed again."""
    hashed = count_calls(monkeypatch, "_host_points")

    async def main() -> None:
        ports = list(range(20001, 20401))
        policy = "{consistentHash: {httpHeaderName: user, ringHash: {minimumRingSize: 131072}}}"
        outlier = "outlierDetection: {consecutive5xxErrors: 1, maxEjectionPercent: 50}, "
        text = subsets_mesh(ports, policy, subsets=1, more=outlier)
        async with engine_for(text) as engine:
            cluster = engine.clusters["outbound|9000|s0|svc.test"]
            assert cluster.outlier is not None
            whole = len(cluster.balancer._points)  # type: ignore[attr-defined]
            hashed.clear()
            for host in cluster.hosts[:10]:
                cluster.outlier.eject(host)
                await rebuilt(engine)
            assert len(cluster.balancer._points) < whole  # type: ignore[attr-defined]
            for host in cluster.hosts[:10]:
                cluster.outlier.readmit(host)
                await rebuilt(engine)
            assert hashed == []  # 20 rebuilds, not one point hashed
            assert len(cluster.balancer._points) == whole  # type: ignore[attr-defined]

    run(main())


@pytest.mark.parametrize("policy", [MAGLEV, RING])
def test_a_flapping_endpoint_rebuilds_its_cluster_s_table_once(
    policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One endpoint ejected and readmitted over and over (an upstream that fails now and
    then, ``consecutive5xxErrors: 1``): each ejection built the Maglev table of the healthy
    endpoints again and each readmission the table of all of them, 0.05 s each for 400
    endpoints and Istio's usual 65 537 slots. Now each level keeps the balancer of all of
    its endpoints and the last one of some of them: a flap between the same two sets of
    endpoints builds nothing."""

    built = count_calls(monkeypatch, "maglev_table" if policy is MAGLEV else "_host_points")

    async def main() -> None:
        outlier = "outlierDetection: {consecutive5xxErrors: 1, maxEjectionPercent: 50}, "
        text = subsets_mesh(list(range(20001, 20401)), policy, subsets=1, more=outlier)
        async with engine_for(text) as engine:
            cluster = engine.clusters["outbound|9000|s0|svc.test"]
            assert cluster.outlier is not None
            host = cluster.hosts[7]
            cluster.outlier.eject(host)  # the first ejection makes the healthy ones' balancer
            await rebuilt(engine)
            out = cluster.balancer
            cluster.outlier.readmit(host)
            await rebuilt(engine)
            built.clear()
            for _ in range(10):
                cluster.outlier.eject(host)
                await rebuilt(engine)
                assert host not in cluster.balancer.hosts
                cluster.outlier.readmit(host)
                await rebuilt(engine)
            assert built == []  # 20 rebuilds, nothing built
            cluster.outlier.eject(host)
            await rebuilt(engine)
            assert cluster.balancer is out

    run(main())


def test_a_burst_of_ejections_rebuilds_a_maglev_table_a_few_times_not_each_time() -> None:
    """Fifty endpoints of a 400-endpoint Maglev cluster ejected one after the other (a zone
    going bad): each ejection built the table again, 0.03-0.07 s each at 65 537 slots, some
    seconds of loop in all. Rebuilds now take at most a fifth of the loop's time: the burst
    costs two builds (the first ejection's, then one with all the others), and meanwhile a
    pick of an ejected endpoint picks again, so none of them gets a request (nor a retry).
    (Builds are counted by the engine, ``rebalances``: a compiled build's calls cannot be
    spied on.)"""

    async def main() -> None:
        outlier = "outlierDetection: {consecutive5xxErrors: 1, maxEjectionPercent: 50}, "
        text = subsets_mesh(list(range(20001, 20401)), MAGLEV, subsets=1, more=outlier)
        async with engine_for(text) as engine:
            cluster = engine.clusters["outbound|9000|s0|svc.test"]
            assert cluster.outlier is not None
            start = engine.rebalances
            bad = cluster.hosts[:50]
            for host in bad:
                cluster.outlier.eject(host)
                await asyncio.sleep(0)  # each in a loop iteration of its own, as errors come
            assert engine.rebalances - start == 1  # the first; the others wait for one more
            keys = [
                Metadata(MessageType.Request, attributes=Attributes({"user": f"u{i}"}))
                for i in range(2000)
            ]
            picked = {cluster.balancer.pick(m) for m in keys}
            assert not picked & set(bad)
            # A retry's picks (another endpoint than the one that failed) avoid them too.
            failed = cluster.hosts[-1]
            picked = {cluster.pick_other(m, failed) for m in keys}
            assert not picked & {*bad, failed}
            await rebuilt(engine)
            assert engine.rebalances - start == 2
            assert not set(bad) & set(cluster.balancer.hosts)
            assert engine.rebuilds.deferred == 1

    run(main())
