"""DestinationRule ``portLevelSettings``: a port's policy for that port only, over real sockets.

The mesh has one service with three ports (9000, 9001, 9002) and endpoints ``a`` and ``b``
(a server per port each, named ``a9000``...); one listener routes a request by its ``to``
attribute to a port, and optionally a subset. Istio's semantics are checked: a port's settings
replace the policy they override whole (a group they leave out has its default), and a
subset's settings for the port come first, then the subset's policy over the rule's settings
for the port, then over the rule's policy.
"""

from __future__ import annotations

import json
import logging
import textwrap
from collections.abc import Iterator
from contextlib import asynccontextmanager
from itertools import pairwise
from typing import Any

import pytest
from proxy_kit import (
    Client,
    Upstream,
    address,
    engine_for,
    error_type,
    gather,
    http_get,
    refusing_port,
    run,
)

from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.config.models import LoadBalancer

PORTS = (9000, 9001, 9002)
NO_REWRITE = ("kvnr", "proxy_test_codecs:NoRewriteKVCodec")
#: Where a request goes, by its ``to`` attribute: ``p9001``, ``v1p9000``, ``anyp9002``...
TARGETS = [(subset, port) for subset in (None, "v1", "any") for port in PORTS]


def cluster(port: int, subset: str | None = None) -> str:
    return f"outbound|{port}|{subset or ''}|svc.test"


def target(subset: str | None, port: int) -> str:
    return f"{subset or ''}p{port}"


def three_ports(
    endpoints: dict[str, dict[int, int]],
    policy: str,
    v1_policy: str = "{}",
    protocol: tuple[str, str] = ("kv", "metaprotocol_sdk.examples.kv:KVCodec"),
) -> str:
    """The mesh's YAML: ``endpoints`` maps a name to its listening port for each service port;
    ``policy`` is the rule's ``trafficPolicy``, ``v1_policy`` subset ``v1``'s (subset ``any``
    has none); both subsets hold every endpoint."""
    name, codec = protocol
    ports = ", ".join(
        f"{{number: {p}, name: tcp-metaprotocol-{name}-{p}, protocol: TCP}}" for p in PORTS
    )
    eps = "\n".join(
        "    - {address: 127.0.0.1, labels: {version: v1}, ports: {"
        + ", ".join(f"tcp-metaprotocol-{name}-{p}: {listen}" for p, listen in by_port.items())
        + "}}"
        for by_port in endpoints.values()
    )
    routes = "\n".join(
        f"    - name: {target(subset, port)}\n"
        f"      match: {{attributes: {{to: {{exact: {target(subset, port)}}}}}}}\n"
        f"      route: [{{destination: {{host: svc.test, port: {{number: {port}}}"
        + (f", subset: {subset}" if subset else "")
        + "}}]"
        for subset, port in TARGETS
    )
    return (
        textwrap.dedent(
            f"""\
            kind: ApplicationProtocol
            metadata: {{name: {name}}}
            spec: {{protocol: {name}, codec: "{codec}"}}
            ---
            kind: ServiceEntry
            metadata: {{name: svc}}
            spec:
              hosts: [svc.test]
              ports: [{ports}]
              resolution: STATIC
              endpoints:
            """
        )
        + eps
        + textwrap.dedent(
            f"""
            ---
            kind: DestinationRule
            metadata: {{name: svc}}
            spec:
              host: svc.test
              trafficPolicy: {policy}
              subsets:
                - {{name: v1, labels: {{version: v1}}, trafficPolicy: {v1_policy}}}
                - {{name: any, labels: {{version: v1}}}}
            ---
            kind: MetaRouter
            metadata: {{name: svc}}
            spec:
              hosts: [svc.test]
              routes:
            """
        )
        + routes
        + textwrap.dedent(
            """
            ---
            kind: ProxyConfig
            metadata: {name: engine}
            spec:
              listeners: [{host: svc.test, port: 9000, bind: '127.0.0.1:0'}]
              admin: {bind: '127.0.0.1:0'}
            """
        )
    )


@asynccontextmanager
async def servers(*names: str) -> Any:
    """An upstream per endpoint name and service port (``a9000``...), closed on exit."""
    ups = {name: {p: await Upstream(f"{name}{p}").start() for p in PORTS} for name in names}
    try:
        yield ups
    finally:
        for by_port in ups.values():
            for up in by_port.values():
                await up.close()


def listening(ups: dict[str, dict[int, Upstream]]) -> dict[str, dict[int, int]]:
    return {name: {p: up.port for p, up in by_port.items()} for name, by_port in ups.items()}


async def picks(c: Client, to: str, n: int = 4) -> list[str]:
    """The servers of ``n`` calls to ``to``, all with the same hash key."""
    return [(await c.call("get", {"to": to, "user": "u1"})).attributes["server"] for _ in range(n)]


def sticky(servers: list[str]) -> bool:
    return len(set(servers)) == 1


def alternating(servers: list[str]) -> bool:
    return len(set(servers)) == 2 and all(x != y for x, y in pairwise(servers))


async def clusters_dump(engine: Engine) -> dict[str, dict[str, Any]]:
    assert engine.admin_address is not None
    status, body = await http_get(engine.admin_address, "/config_dump")
    assert status == 200
    return {c["name"]: c for c in json.loads(body)["clusters"]}


HASHED = "{consistentHash: {httpHeaderName: user}}"


def test_a_ports_load_balancer_applies_to_that_port_only_and_is_dumped() -> None:
    async def main() -> None:
        policy = (
            f"{{loadBalancer: {HASHED}, portLevelSettings: "
            "[{port: {number: 9001}, loadBalancer: {simple: ROUND_ROBIN}}]}"
        )
        async with servers("a", "b") as ups, engine_for(three_ports(listening(ups), policy)) as e:
            c = await Client.connect(address(e))
            assert sticky(await picks(c, "p9000"))
            got = await picks(c, "p9001")
            assert alternating(got) and {s[-4:] for s in got} == {"9001"}
            assert sticky(await picks(c, "p9002"))
            # The clusters keep their names (and so their stats labels): one per port, as ever.
            assert {cluster(9000), cluster(9001), cluster(9002)} <= set(e.clusters)
            dumped = await clusters_dump(e)
            assert dumped[cluster(9000)]["loadBalancer"] == "ConsistentHash"
            assert dumped[cluster(9001)]["loadBalancer"] == "RoundRobin"
            assert dumped[cluster(9002)]["loadBalancer"] == "ConsistentHash"
            assert [dumped[cluster(p)]["hashAttribute"] for p in PORTS] == ["user", None, "user"]
            c.close()

    run(main())


def test_a_ports_connection_pool_replaces_the_rules_and_a_group_left_out_is_the_default(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        # 9001 sets a connectionPool without http2MaxRequests: none (the group is replaced,
        # not merged); 9002 sets no connectionPool: none either (Istio: the port's settings
        # replace the whole policy); 9000 has the rule's: one request in flight.
        policy = (
            "{connectionPool: {tcp: {connectTimeout: 2s}, http: {http2MaxRequests: 1}},"
            " portLevelSettings: ["
            "{port: {number: 9001}, connectionPool: {tcp: {connectTimeout: 3s}}},"
            f" {{port: {{number: 9002}}, loadBalancer: {HASHED}}}]}}"
        )
        async with servers("a") as ups:
            with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
                async with engine_for(three_ports(listening(ups), policy)) as e:
                    c = await Client.connect(address(e))
                    held = [c.start("slow", {"to": "p9000"})]
                    await ups["a"][9000].wait_received(1)
                    assert error_type(await c.call("get", {"to": "p9000"})) == "OverLimit"
                    for port in (9001, 9002):
                        held += [c.start("slow", {"to": f"p{port}"}) for _ in range(2)]
                        await ups["a"][port].wait_received(2)  # both in flight: no limit
                    for up in ups["a"].values():
                        up.release.set()
                    assert [error_type(r) for r in await gather(*held)] == [None] * 5
                    overflow = "metaprotocol_upstream_overflow_total"
                    assert e.stats.total(overflow, cluster=cluster(9000)) == 1
                    assert e.stats.total(overflow, cluster=cluster(9001)) == 0
                    dumped = await clusters_dump(e)
                    assert dumped[cluster(9000)]["connectionPool"]["max_requests"] == 1
                    assert dumped[cluster(9001)]["connectionPool"]["max_requests"] is None
                    assert dumped[cluster(9001)]["connectionPool"]["connect_timeout"] == 3.0
                    assert dumped[cluster(9002)]["connectionPool"] is None
                    c.close()
        (warning,) = [r.getMessage() for r in caplog.records if r.name == "metaprotocol.config"]
        assert "spec.trafficPolicy.portLevelSettings[1]: sets no connectionPool" in warning

    run(main())


def ejected(engine: Engine, port: int) -> int:
    return engine.stats.get("metaprotocol_outlier_ejections_active", cluster=cluster(port))


def test_outlier_detection_per_port() -> None:
    async def main() -> None:
        # The rule ejects after one gateway error; port 9001's settings have none.
        outlier = "{consecutiveGatewayErrors: 1, baseEjectionTime: 1h, maxEjectionPercent: 50}"
        policy = (
            f"{{outlierDetection: {outlier}, portLevelSettings: "
            "[{port: {number: 9001}, loadBalancer: {simple: ROUND_ROBIN}}]}"
        )
        async with servers("a") as ups:
            endpoints = {**listening(ups), "dead": {p: refusing_port() for p in PORTS}}
            async with engine_for(three_ports(endpoints, policy)) as e:
                c = await Client.connect(address(e))
                for port in (9000, 9001):
                    replies = [await c.call("get", {"to": f"p{port}"}) for _ in range(6)]
                    failed = sum(error_type(r) == "UpstreamConnectFailure" for r in replies)
                    # 9000: the dead endpoint fails once, then is skipped; 9001: every other call.
                    assert failed == (1 if port == 9000 else 3), (port, failed)
                assert (ejected(e, 9000), ejected(e, 9001)) == (1, 0)
                c.close()

    run(main())


def test_subset_precedence_as_istio() -> None:
    async def main() -> None:
        # Sticky (hashed) or alternating (round robin) calls show which policy applies.
        policy = (
            f"{{loadBalancer: {HASHED}, portLevelSettings: "
            "[{port: {number: 9001}, loadBalancer: {simple: ROUND_ROBIN}}]}"
        )
        v1 = (
            f"{{loadBalancer: {HASHED}, portLevelSettings: "
            "[{port: {number: 9000}, loadBalancer: {simple: ROUND_ROBIN}}]}"
        )
        async with (
            servers("a", "b") as ups,
            engine_for(three_ports(listening(ups), policy, v1)) as e,
        ):
            c = await Client.connect(address(e))
            seen = {(sub, port): await picks(c, target(sub, port)) for sub, port in TARGETS}
            kind = {k: "sticky" if sticky(v) else alternating(v) and "rr" for k, v in seen.items()}
            assert kind == {
                (None, 9000): "sticky",  # the rule's policy
                (None, 9001): "rr",  # the rule's settings for the port
                (None, 9002): "sticky",
                ("v1", 9000): "rr",  # the subset's settings for the port, first
                ("v1", 9001): "sticky",  # the subset's policy over the rule's port's
                ("v1", 9002): "sticky",
                ("any", 9000): "sticky",  # a subset without a policy: the rule's
                ("any", 9001): "rr",  # ... and the rule's settings for the port
                ("any", 9002): "sticky",
            }, seen
            c.close()

    run(main())


def test_a_subsets_port_settings_replace_the_subsets_and_the_rules_policy_whole() -> None:
    async def main() -> None:
        # Dedicated connections (a codec without id rewriting): a connection per client.
        policy = "{connectionPool: {tcp: {maxConnections: 1}}}"
        v1 = (
            "{outlierDetection: {consecutive5xxErrors: 2}, portLevelSettings: "
            "[{port: {number: 9001}, loadBalancer: {simple: RANDOM}}]}"
        )
        async with servers("a") as ups:
            text = three_ports(listening(ups), policy, v1, protocol=NO_REWRITE)
            async with engine_for(text) as e:
                clients = [await Client.connect(address(e)) for _ in range(2)]
                for to in ("v1p9000", "anyp9001", "v1p9001"):
                    replies = [error_type(await c.call("get", {"to": to})) for c in clients]
                    # v1 on 9000 and "any" on 9001: the rule's pool (one connection);
                    # v1 on 9001: the subset's port settings, without a pool.
                    assert replies == ([None, None] if to == "v1p9001" else [None, "OverLimit"])
                dumped = await clusters_dump(e)
                assert dumped[cluster(9000, "v1")]["outlierDetection"]["consecutive_errors"] == 2
                assert dumped[cluster(9001, "v1")]["outlierDetection"] is None
                assert dumped[cluster(9001, "v1")]["connectionPool"] is None
                assert dumped[cluster(9001, "any")]["connectionPool"]["max_connections"] == 1
                for c in clients:
                    c.close()

    run(main())


def test_a_reload_changing_port_settings_rebuilds_that_ports_cluster_only() -> None:
    async def main() -> None:
        def text(lb: str) -> str:
            policy = (
                f"{{loadBalancer: {HASHED}, portLevelSettings: "
                f"[{{port: {{number: 9001}}, loadBalancer: {lb}}}]}}"
            )
            return three_ports(listening(ups), policy)

        async with servers("a", "b") as ups, engine_for(text("{simple: ROUND_ROBIN}")) as e:
            c = await Client.connect(address(e))
            assert sticky(await picks(c, "p9000"))
            assert alternating(await picks(c, "p9001"))
            kept = e.clusters[cluster(9000)]
            await e.apply(loads_config(text(HASHED), "t2.yaml"))
            assert sticky(await picks(c, "p9001"))  # the same connection, the new policy
            assert e.clusters[cluster(9000)] is kept  # unchanged: its connections kept
            dumped = await clusters_dump(e)
            assert dumped[cluster(9001)]["loadBalancer"] == "ConsistentHash"
            # Any other change of the port's settings too.
            await e.apply(loads_config(text("{simple: RANDOM}"), "t3.yaml"))
            assert e.clusters[cluster(9001)].policy.policy == "RANDOM"
            c.close()

    run(main())


def test_policy_for_resolves_every_group_as_istio() -> None:
    # Without sockets: which of the four levels each (subset, port) takes, group by group.
    text = three_ports(
        {"a": {p: 1 for p in PORTS}},
        "{loadBalancer: {simple: RANDOM}, outlierDetection: {consecutive5xxErrors: 7},"
        " portLevelSettings: [{port: {number: 9001}, connectionPool: {tcp: {maxConnections: 3}},"
        " loadBalancer: {simple: LEAST_REQUEST}}]}",
        "{connectionPool: {tcp: {maxConnections: 9}}, portLevelSettings: "
        "[{port: {number: 9002}, tls: {mode: DISABLE}}]}",
    )
    rule = loads_config(text, "t.yaml").destination_rules["svc.test"]

    def groups(subset: str | None, port: int) -> Iterator[object]:
        p = rule.policy_for(port, subset)
        yield p.load_balancer and p.load_balancer.policy
        yield p.connection_pool and p.connection_pool.max_connections
        yield p.outlier_detection and p.outlier_detection.consecutive_errors
        yield p.tls and p.tls.mode

    assert list(groups(None, 9000)) == ["RANDOM", None, 7, None]
    assert list(groups(None, 9001)) == ["LEAST_REQUEST", 3, None, None]  # replaced whole
    assert list(groups("v1", 9000)) == ["RANDOM", 9, 7, None]  # subset over the rule
    assert list(groups("v1", 9001)) == ["LEAST_REQUEST", 9, None, None]  # over the rule's port
    assert list(groups("v1", 9002)) == [None, None, None, "DISABLE"]  # replaced whole
    assert list(groups("any", 9001)) == list(groups(None, 9001))


def test_a_subsets_empty_connection_pool_overrides_the_rules_as_in_istio() -> None:
    # Istio's mergeTrafficPolicy replaces a group the subset's trafficPolicy sets, and
    # `connectionPool: {}` is set (a non-nil message): the subset's clusters have no limits,
    # not the rule's (for the rule's trafficPolicy, as for its settings for the port).
    text = three_ports(
        {"a": {p: 1 for p in PORTS}},
        "{connectionPool: {tcp: {maxConnections: 5}}, portLevelSettings:"
        " [{port: {number: 9001}, connectionPool: {tcp: {maxConnections: 3}}}]}",
        "{connectionPool: {}}",
    )
    rule = loads_config(text, "t.yaml").destination_rules["svc.test"]
    limits = []
    for port in (9000, 9001):
        pool = rule.policy_for(port, "v1").connection_pool
        limits.append(None if pool is None else pool.max_connections)
    assert limits == [None, None]  # not the rule's [5, 3]


def test_a_subsets_empty_load_balancer_and_tls_override_the_rules_as_in_istio() -> None:
    # The same for the other groups: a subset's `loadBalancer: {}` is the default policy, not
    # the rule's (istiod: no simple is its default algorithm); `tls: {}` is mode DISABLE
    # (the enum's zero), plain TCP where the rule has TLS; a port's entry too.
    text = three_ports(
        {"a": {p: 1 for p in PORTS}},
        "{loadBalancer: {simple: RANDOM}, tls: {mode: SIMPLE, insecureSkipVerify: true}}",
        "{loadBalancer: {}, tls: {}, portLevelSettings: [{port: {number: 9001}, tls: {}}]}",
    )
    rule = loads_config(text, "t.yaml").destination_rules["svc.test"]
    for port in (9000, 9001):
        policy = rule.policy_for(port, "v1")
        assert policy.load_balancer in (LoadBalancer(), None)
        assert policy.tls is not None and policy.tls.mode == "DISABLE"
        assert policy.applied().tls is None
    assert rule.policy_for(9000, "v1").load_balancer == LoadBalancer()  # set, so it replaces
    assert rule.policy_for(9000).load_balancer == LoadBalancer("RANDOM")
