"""An upstream's drain notice is known engine-wide (endpoint_drains.py), over real sockets.

The notice comes from the server at an address and port: every cluster with that endpoint (a
service's cluster and its subsets', a cluster a reload adds) avoids it until the connection
held for the drain closes, whichever cluster's connection carried it. The index of which
clusters hold each endpoint follows reloads without growing, and a drain's start and end cost
one step per cluster holding the endpoint, not a walk over every endpoint."""

from __future__ import annotations

import json
import time

from proxy_kit import (
    Client,
    NoticeKVCodec,
    Upstream,
    address,
    engine_for,
    error_type,
    http_get,
    mesh,
    run,
    until,
)

from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.upstream import AvoidUnfit, Cluster

NOTICE = NoticeKVCodec().drain_notice()
SHARED = {"protocol": "kvd", "codec": "proxy_test_codecs:NoticeKVCodec"}
ROUND_ROBIN = "{loadBalancer: {simple: ROUND_ROBIN}}"
SERVICE = "outbound|9000||svc.test"
V1 = "outbound|9000|v1|svc.test"
V2 = "outbound|9000|v2|svc.test"

#: ``sub`` goes to subset v1, the rest to the service's own cluster (every endpoint).
SPLIT = """\
- name: sub
  match: {attributes: {method: {exact: sub}}}
  route: [{destination: {host: svc.test, subset: v1}}]
- name: all
  route: [{destination: {host: svc.test}}]
"""
#: ``sub`` goes to subset v1, the rest to subset v2 (no cluster of every endpoint).
SUBSETS = SPLIT.replace(
    "route: [{destination: {host: svc.test}}]",
    "route: [{destination: {host: svc.test, subset: v2}}]",
)


async def served_by(client: Client, n: int, method: str = "get") -> list[str]:
    """The servers that answered ``n`` calls of ``method``, each answered without error."""
    servers = []
    for _ in range(n):
        reply = await client.call(method)
        assert error_type(reply) is None, reply.attributes
        servers.append(reply.attributes["server"])
    return servers


async def dumped_draining(engine: Engine) -> dict[str, list[str]]:
    """Each cluster's endpoints draining, as ``/config_dump`` shows them."""
    assert engine.admin_address is not None
    status, body = await http_get(engine.admin_address, "/config_dump")
    assert status == 200
    return {c["name"]: c["draining"] for c in json.loads(body)["clusters"]}


def holdings(engine: Engine) -> set[tuple[int, int]]:
    """The (host, cluster) pairs of the engine's index of endpoints, by identity."""
    pairs = set()
    for first in engine.drains.holders.values():
        host = first
        while host is not None:
            pairs.add((id(host), id(host.cluster)))
            host = host.next_holder
    return pairs


def serving(engine: Engine) -> set[tuple[int, int]]:
    """The (host, cluster) pairs of the serving clusters."""
    return {(id(host), id(c)) for c in engine.clusters.values() for host in c.hosts}


def test_a_notice_on_a_subsets_connection_drains_the_endpoint_for_the_service_cluster() -> None:
    """Subset v1 (endpoint a) and the service's cluster (a and b) share a. A notice on the
    subset's connection to a (the service's cluster has none open to it) makes the service's
    cluster avoid a too: its requests go to b, none fails although a refuses new connections
    (before, the service's cluster knew nothing of the drain, sent half of them to a, and
    they failed). Both clusters show it in ``/config_dump`` (a dump built before the notice
    is not served stale). The drain's end releases a in both."""

    async def main() -> None:
        a, b = await Upstream("a").start(), await Upstream("b").start()
        config = mesh(
            [(a.port, "v1"), (b.port, "v2")], router=SPLIT, traffic_policy=ROUND_ROBIN, **SHARED
        )
        async with engine_for(config) as engine:
            subset, service = engine.clusters[V1], engine.clusters[SERVICE]
            c = await Client.connect(address(engine))
            assert await served_by(c, 1, "sub") == ["a"]
            assert a.accepted == 1  # the subset's connection only
            assert await dumped_draining(engine) == {V1: [], SERVICE: []}
            a.refusing = True
            a.send_all(NOTICE)
            await until(lambda: subset.draining == 1, "the subset's endpoint draining")
            assert set(await served_by(c, 6)) == {"b"}
            assert service.draining == 1 and a.accepted == 1
            a_key = f"127.0.0.1:{a.port}"
            assert await dumped_draining(engine) == {V1: [a_key], SERVICE: [a_key]}
            a.refusing = False
            a.close_connections()  # its drain is over
            await until(lambda: not subset.draining and not service.draining, "the drain over")
            assert not isinstance(service.balancer, AvoidUnfit)
            assert not isinstance(subset.balancer, AvoidUnfit)
            assert sorted(await served_by(c, 2)) == ["a", "b"]
            assert await served_by(c, 1, "sub") == ["a"]
            assert await dumped_draining(engine) == {V1: [], SERVICE: []}
            c.close()
        await a.close()
        await b.close()

    run(main())


def test_a_cluster_a_reload_adds_during_a_drain_avoids_the_endpoint() -> None:
    """A drain of a (noticed on subset v1's connection) while only subsets serve; a reload
    routes the rest to the service's own cluster, new, with a and b: it avoids a at once
    (before, it sent half of its requests to a, refused), and picks it once the drain ends."""

    async def main() -> None:
        a, b = await Upstream("a").start(), await Upstream("b").start()
        endpoints = [(a.port, "v1"), (b.port, "v2")]
        text = mesh(endpoints, router=SUBSETS, traffic_policy=ROUND_ROBIN, **SHARED)
        async with engine_for(text) as engine:
            assert set(engine.clusters) == {V1, V2}
            c = await Client.connect(address(engine))
            assert await served_by(c, 1, "sub") == ["a"]
            a.refusing = True
            a.send_all(NOTICE)
            subset = engine.clusters[V1]
            await until(lambda: subset.draining == 1, "the endpoint draining")
            split = mesh(endpoints, router=SPLIT, traffic_policy=ROUND_ROBIN, **SHARED)
            await engine.apply(loads_config(split, "t.yaml"))
            service = engine.clusters[SERVICE]
            assert service.draining == 1
            assert set(await served_by(c, 6)) == {"b"}
            assert a.accepted == 1
            a.refusing = False
            a.close_connections()
            await until(lambda: not service.draining and not subset.draining, "the drain over")
            assert sorted(await served_by(c, 2)) == ["a", "b"]
            c.close()
        await a.close()
        await b.close()

    run(main())


def test_the_drain_outlives_the_reload_that_replaced_its_connections_cluster() -> None:
    """A reload replaces the cluster whose connection is held for a's drain, and its drain
    deadline (``timeouts.drain``) passes: the held connection, with nothing in flight, is
    left to its hold, and the new clusters still avoid a (before, the deadline closed it and
    ended the drain while a still refused connections)."""
    pooled = "{loadBalancer: {simple: ROUND_ROBIN}, connectionPool: {tcp: {maxConnections: 50}}}"

    async def main() -> None:
        a, b = await Upstream("a").start(), await Upstream("b").start()
        endpoints = [(a.port, "v1"), (b.port, "v2")]
        proxy = "timeouts: {drain: 100ms}\n"
        text = mesh(endpoints, router=SPLIT, traffic_policy=ROUND_ROBIN, proxy=proxy, **SHARED)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            assert await served_by(c, 1, "sub") == ["a"]
            a.refusing = True
            a.send_all(NOTICE)
            await until(lambda: engine.clusters[V1].draining == 1, "the endpoint draining")
            (held,) = [u for u in engine.upstreams if u.notice_hold is not None]
            changed = text.replace(f"trafficPolicy: {ROUND_ROBIN}", f"trafficPolicy: {pooled}")
            await engine.apply(loads_config(changed, "t.yaml"))
            assert held.cluster.retired
            await until(lambda: not engine._drain_timers, "the reload's drain deadline")
            assert not held.closed
            service = engine.clusters[SERVICE]
            assert service.draining == 1 and engine.clusters[V1].draining == 1
            assert set(await served_by(c, 4)) == {"b"}
            assert a.accepted == 1
            a.refusing = False
            a.close_connections()
            await until(lambda: not service.draining, "the drain over")
            assert sorted(await served_by(c, 2)) == ["a", "b"]
            c.close()
        await a.close()
        await b.close()

    run(main())


def test_removed_clusters_leave_the_index_over_many_reloads() -> None:
    """Reloads that add, replace and remove clusters, during a drain and after it: the index
    holds exactly the serving clusters' endpoints each time (no retired cluster stays in it,
    so it does not grow), every serving host of the draining endpoint is draining while the
    drain lasts and none after, and retired clusters are released."""
    pooled = "{loadBalancer: {simple: ROUND_ROBIN}, connectionPool: {tcp: {maxConnections: 50}}}"

    async def main() -> None:
        a, b = await Upstream("a").start(), await Upstream("b").start()
        endpoints = [(a.port, "v1"), (b.port, "v2")]
        texts = [
            mesh(endpoints, router=router, traffic_policy=policy, **SHARED)
            for router in (SPLIT, SUBSETS)
            for policy in (ROUND_ROBIN, pooled)
        ]
        async with engine_for(texts[0]) as engine:
            c = await Client.connect(address(engine))
            assert await served_by(c, 1, "sub") == ["a"]
            a.send_all(NOTICE)
            await until(lambda: engine.clusters[V1].draining == 1, "the endpoint draining")
            key = engine.clusters[V1].hosts[0].endpoint
            retired: list[Cluster] = []
            for n in range(40):
                before = dict(engine.clusters)
                await engine.apply(loads_config(texts[(n + 1) % len(texts)], "t.yaml"))
                retired += [c for name, c in before.items() if engine.clusters.get(name) is not c]
                assert holdings(engine) == serving(engine)
                assert len(engine.drains.holders) == 2
                for cluster in engine.clusters.values():
                    assert [h.draining for h in cluster.hosts] == [
                        h.endpoint == key for h in cluster.hosts
                    ]
            assert len(retired) >= 40
            assert all(not cluster.draining for cluster in retired)
            a.close_connections()
            await until(lambda: not engine.drains.held, "the drain over")
            for n in range(4):
                await engine.apply(loads_config(texts[n], "t.yaml"))
                assert holdings(engine) == serving(engine)
                assert all(not c.draining for c in engine.clusters.values())
            c.close()
        await a.close()
        await b.close()

    run(main())


def test_a_flood_of_notices_holds_one_connection_and_begins_one_drain() -> None:
    """An upstream that sends the notice on every connection it accepts, the only endpoint of
    subset v1: every request is answered; one connection is held, and the drain began once
    (the service's cluster avoids a; later notices find the endpoint draining in one look)."""

    async def main() -> None:
        a, b = await Upstream("a").start(), await Upstream("b").start()
        a.greeting = NOTICE
        config = mesh(
            [(a.port, "v1"), (b.port, "v2")], router=SPLIT, traffic_policy=ROUND_ROBIN, **SHARED
        )
        async with engine_for(config) as engine:
            c = await Client.connect(address(engine))
            rebalances = engine.rebalances
            assert await served_by(c, 20, "sub") == ["a"] * 20
            assert a.accepted == 20
            held = [u for u in engine.upstreams if u.notice_hold is not None]
            assert len(held) == 1
            assert engine.rebalances == rebalances + 1  # one drain began, for /config_dump
            assert engine.clusters[SERVICE].draining == 1
            assert set(await served_by(c, 4)) == {"b"}
            c.close()
        await a.close()
        await b.close()

    run(main())


def _cost_of_drains(engine: Engine, pairs: int) -> float:
    """Seconds per start and end of a drain of a's endpoint, held by a connection of it."""
    (conn,) = [u for u in engine.upstreams if u.cluster.name == V1]
    keys = (conn.host.endpoint,)
    drains = engine.drains
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(pairs):
            drains.begin(conn, keys)
            drains.end(conn, keys)
        best = min(best, time.perf_counter() - started)
    return best / pairs


def test_a_drains_start_and_end_cost_one_step_per_cluster_holding_the_endpoint() -> None:
    """The start and end of a drain cost the same with 10 000 other endpoints in the engine's
    clusters as with 1 (a walk over every cluster's endpoints would cost some thousand
    times more), and touch each of the two clusters holding the endpoint."""

    async def main() -> None:
        a = await Upstream("a").start()
        costs = []
        for others in (1, 10000):
            endpoints = [(a.port, "v1")] + [(20000 + n, "v2") for n in range(others)]
            text = mesh(endpoints, router=SPLIT, traffic_policy=ROUND_ROBIN, **SHARED)
            async with engine_for(text) as engine:
                c = await Client.connect(address(engine))
                assert await served_by(c, 1, "sub") == ["a"]
                holders = engine.drains.clusters(engine.clusters[V1].hosts[0].endpoint)
                assert sorted(h.name for h in holders) == sorted([SERVICE, V1])
                costs.append(_cost_of_drains(engine, 2000))
                assert not engine.drains.held
                assert all(not c.draining for c in engine.clusters.values())
                c.close()
        assert costs[1] < 3 * costs[0], costs
        await a.close()

    run(main(), timeout=60)


def test_an_endpoints_identity_is_the_server_it_reaches() -> None:
    """IPv6 literals in one spelling, names without case or a final dot; TLS and PROXY
    protocol do not change it (they are not part of it); a tunnel does (its connections
    reach the tunnel's target through the endpoint)."""
    from metaprotocol_sdk.proxy.config.models import Tunnel
    from metaprotocol_sdk.proxy.endpoint_drains import endpoint_identity

    assert endpoint_identity("10.0.0.1", 20880) == "10.0.0.1:20880"
    assert endpoint_identity("0:0::1", 20880) == endpoint_identity("::1", 20880) == "[::1]:20880"
    assert endpoint_identity("Provider.Example.", 1) == endpoint_identity("provider.example", 1)
    tunnel = Tunnel("provider.example", 20880)
    assert endpoint_identity("10.0.0.1", 8080, tunnel) == (
        "10.0.0.1:8080 CONNECT provider.example:20880"
    )


def test_a_notice_through_a_host_name_drains_the_address_it_reached() -> None:
    """Subset v1 reaches a by the name ``localhost``; the service's cluster lists a by its
    address too (label v2) and b. A notice on the subset's connection drains both identities
    of a (the name, and the address the connection reached): the service's cluster sends
    everything to b (before, it picked 127.0.0.1:a, which refused)."""

    async def main() -> None:
        a, b = await Upstream("a").start(), await Upstream("b").start()
        text = mesh(
            [(a.port, "v1"), (a.port, "v2"), (b.port, "v3")],
            router=SPLIT,
            traffic_policy=ROUND_ROBIN,
            **SHARED,
        ).replace("resolution: STATIC", "resolution: DNS")
        named = (
            f"{{address: 127.0.0.1, ports: {{tcp-metaprotocol-kvd-svc: {a.port}}}, "
            "labels: {version: v1}}"
        )
        assert named in text
        text = text.replace(named, named.replace("127.0.0.1", "localhost"))
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            assert await served_by(c, 1, "sub") == ["a"]
            a.refusing = True
            a.send_all(NOTICE)
            service = engine.clusters[SERVICE]
            await until(lambda: engine.clusters[V1].draining == 1, "the name draining")
            assert set(await served_by(c, 6)) == {"b"}
            assert service.draining == 2  # localhost:a and 127.0.0.1:a
            a.refusing = False
            a.close_connections()
            await until(lambda: not service.draining, "the drain over")
            assert sorted(await served_by(c, 3)) == ["a", "a", "b"]
            c.close()
        await a.close()
        await b.close()

    run(main())
