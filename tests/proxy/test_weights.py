"""Endpoint weights end to end: ServiceEntry ``endpoints[].weight`` through the engine's
balancers, with subsets, outlier ejection, reloads and ``/config_dump`` (real sockets)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import pytest
from proxy_kit import (
    Client,
    Upstream,
    address,
    engine_for,
    error_type,
    http_get,
    mesh,
    refusing_port,
    run,
)

from metaprotocol_sdk import Attributes, MessageType, Metadata
from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.balancer import ConsistentHash


@dataclass(eq=False)
class FakeHost:
    key: str
    weight: int = 1
    active: int = 0


def request(**attrs: str) -> Metadata:
    return Metadata(MessageType.Request, attributes=Attributes(attrs))


TO_V1 = """\
- name: all
  route: [{destination: {host: svc.test, subset: v1}}]
"""


def weighted_mesh(
    endpoints: list[tuple[int, str, int]], traffic_policy: str = "{}", router: str = TO_V1
) -> str:
    """:func:`mesh` with a weight on each ``(port, version, weight)`` endpoint."""
    text = mesh([(port, version) for port, version, _ in endpoints], router, traffic_policy)
    for port, _, weight in endpoints:
        text = text.replace(f": {port}}}, labels:", f": {port}}}, weight: {weight}, labels:")
    return text


async def servers(c: Client, n: int, **headers: str) -> Counter[str]:
    """Which upstream answered each of ``n`` calls, one after another."""
    seen: Counter[str] = Counter()
    for i in range(n):
        reply = await c.call(headers={k: v.format(i=i) for k, v in headers.items()})
        assert error_type(reply) is None, reply.attributes.to_dict()
        seen[reply.attributes["server"]] += 1
    return seen


async def cluster_dump(
    engine: Engine, name: str = "outbound|9000|v1|svc.test"
) -> dict[str, object]:
    assert engine.admin_address is not None
    status, body = await http_get(engine.admin_address, "/config_dump")
    assert status == 200
    (cluster,) = [c for c in json.loads(body)["clusters"] if c["name"] == name]
    return dict(cluster)


@pytest.mark.parametrize(
    ("policy", "balancer"),
    [
        ("{simple: ROUND_ROBIN}", "WeightedRoundRobin"),
        ("{simple: LEAST_REQUEST}", "WeightedLeastRequest"),
        ("{simple: RANDOM}", "WeightedRandom"),
        ("{consistentHash: {httpHeaderName: user}}", "ConsistentHash"),
    ],
)
def test_every_policy_follows_the_weights_of_the_subset(policy: str, balancer: str) -> None:
    async def main() -> None:
        a, b, c2 = [await Upstream(n).start() for n in "abc"]
        eps = [(a.port, "v1", 1), (b.port, "v1", 3), (c2.port, "v2", 50)]
        text = weighted_mesh(eps, traffic_policy=f"{{loadBalancer: {policy}}}")
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            cluster = await cluster_dump(engine)
            assert cluster["loadBalancer"] == balancer
            assert cluster["weights"] == [1, 3]  # the v1 subset: c's weight is not in it
            if balancer in ("WeightedRoundRobin", "WeightedLeastRequest"):
                # Deterministic; calls one at a time leave every host idle at each pick.
                seen = await servers(c, 40)
                assert seen == {"a": 10, "b": 30}
            elif balancer == "WeightedRandom":
                seen = await servers(c, 400)
                assert 240 <= seen["b"] <= 360  # 300 expected; sd 8.7
            else:
                seen = await servers(c, 400, user="user-{i}")  # 400 keys on the ring
                assert 240 <= seen["b"] <= 360
                again = await servers(c, 400, user="user-{i}")
                assert again == seen  # the same key, the same host
            assert "c" not in seen
            c.close()
        for up in (a, b, c2):
            await up.close()

    run(main())


def test_an_ejected_endpoint_share_goes_to_the_others_by_weight() -> None:
    async def main() -> None:
        a, b = await Upstream("a").start(), await Upstream("b").start()
        eps = [(refusing_port(), "v1", 4), (a.port, "v1", 1), (b.port, "v1", 3)]
        outlier = "{consecutiveGatewayErrors: 1, baseEjectionTime: 1h, maxEjectionPercent: 50}"
        async with engine_for(weighted_mesh(eps, f"{{outlierDetection: {outlier}}}")) as engine:
            c = await Client.connect(address(engine))
            failed = [error_type(await c.call()) for _ in range(8)]
            assert failed.count("UpstreamConnectFailure") == 1  # then it is ejected
            cluster = await cluster_dump(engine)
            assert cluster["weights"] == [4, 1, 3] and len(cluster["ejected"]) == 1  # type: ignore[arg-type]
            # The rebuilt balancer starts a cycle at the ejection: the rest go 1 to 3.
            assert await servers(c, 40) == {"a": 10, "b": 30}
            c.close()
        await a.close()
        await b.close()

    run(main())


def test_a_reload_changes_the_weights() -> None:
    async def main() -> None:
        a, b = await Upstream("a").start(), await Upstream("b").start()
        async with engine_for(weighted_mesh([(a.port, "v1", 1), (b.port, "v1", 1)])) as engine:
            c = await Client.connect(address(engine))
            assert await servers(c, 40) == {"a": 20, "b": 20}
            cluster = await cluster_dump(engine)
            assert (cluster["weights"], cluster["loadBalancer"]) == ([1, 1], "RoundRobin")
            new = weighted_mesh([(a.port, "v1", 1), (b.port, "v1", 4)])
            await engine.apply(loads_config(new, "weights.yaml"))
            cluster = await cluster_dump(engine)
            assert (cluster["weights"], cluster["loadBalancer"]) == ([1, 4], "WeightedRoundRobin")
            assert await servers(c, 40) == {"a": 8, "b": 32}
            c.close()
        await a.close()
        await b.close()

    run(main())


def test_an_ejection_moves_only_the_ejected_endpoint_keys_on_a_weighted_ring() -> None:
    """Consistent hashing's promise under outlier detection: ejecting an endpoint moves its
    keys only. The ring's points are sized from all of the cluster's endpoints, so the
    lightest one leaving does not rescale the others' points (as Envoy's ring of constant
    size does not: the others keep their points and gain the ejected one's keys)."""

    async def main() -> None:
        a, b = await Upstream("a").start(), await Upstream("b").start()
        down = refusing_port()
        eps = [(down, "v1", 1), (a.port, "v1", 2), (b.port, "v1", 3)]
        outlier = "{consecutiveGatewayErrors: 1, baseEjectionTime: 1h, maxEjectionPercent: 50}"
        ring_hash = "{consistentHash: {httpHeaderName: user}}"
        policy = f"{{loadBalancer: {ring_hash}, outlierDetection: {outlier}}}"
        # Which keys the healthy endpoints own on the whole ring, as the engine builds it.
        ring = ConsistentHash(
            [FakeHost(f"127.0.0.1:{port}", weight=w) for port, _, w in eps], "user"
        )
        owner = {f"user-{i}": ring.pick(request(user=f"user-{i}")) for i in range(400)}
        on_down = [k for k, h in owner.items() if h is not None and h.key.endswith(f":{down}")]
        healthy = [k for k in owner if k not in on_down]
        async with engine_for(weighted_mesh(eps, policy)) as engine:
            c = await Client.connect(address(engine))

            async def where(keys: list[str]) -> dict[str, str]:
                out = {}
                for k in keys:
                    reply = await c.call(headers={"user": k})
                    assert error_type(reply) is None, reply.attributes.to_dict()
                    out[k] = reply.attributes["server"]
                return out

            before = await where(healthy)
            assert len(before) > 300 and set(before.values()) == {"a", "b"}
            reply = await c.call(headers={"user": on_down[0]})
            assert error_type(reply) == "UpstreamConnectFailure"
            assert len((await cluster_dump(engine))["ejected"]) == 1  # type: ignore[arg-type]
            after = await where(healthy)
            moved = [k for k in healthy if after[k] != before[k]]
            assert moved == []  # about a fifth of a's and b's keys changed hands
            c.close()
        await a.close()
        await b.close()

    run(main())


def test_a_retry_prefers_another_endpoint_with_weights() -> None:
    # docs/filters.md: "a retry ... prefers another endpoint than the one that failed". With
    # equal weights round robin's next pick is the other endpoint; with weights 3 and 1 the
    # schedule repeats the heavy endpoint: one re-pick gave it back and half the calls
    # failed. A retry now picks up to five times (Istio's default retry policy).
    router = """\
- name: all
  route: [{destination: {host: svc.test, subset: v1}}]
  retries: {attempts: 1, retryOn: connect-failure}
"""

    async def main() -> None:
        good = await Upstream("good").start()
        eps = [(refusing_port(), "v1", 3), (good.port, "v1", 1)]
        async with engine_for(weighted_mesh(eps, router=router)) as engine:
            c = await Client.connect(address(engine))
            failed = [error_type(await c.call()) for _ in range(8)]
            assert failed == [None] * 8  # half are UpstreamConnectFailure
            c.close()
        await good.close()

    run(main())
