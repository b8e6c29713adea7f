"""DestinationRule circuit breaking (connectionPool) and outlier detection, over real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable

import pytest
from proxy_kit import (
    ERROR,
    Client,
    KVServer,
    Upstream,
    address,
    build_frame,
    engine_for,
    error_type,
    http_get,
    mesh,
    refusing_port,
    run,
)

from metaprotocol_sdk import ConfigError, Metadata
from metaprotocol_sdk.proxy import Engine, loads_config

_BACKLOG: list[socket.socket] = []


def full_backlog_port() -> int:
    """A port whose accept queue is full: connecting to it hangs (SYNs are dropped)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    filler = socket.create_connection(s.getsockname())
    _BACKLOG.extend((s, filler))
    return int(s.getsockname()[1])


class Failing(Upstream):
    """Answers every request with an Error reply."""

    def on_message(self, conn: KVServer, msg: Metadata) -> None:
        assert conn.transport is not None
        self.received.append(msg)
        conn.transport.write(build_frame(ERROR, msg.request_id, {"server": self.name}))


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def policy(pool: str = "", outlier: str = "") -> str:
    parts = []
    if pool:
        parts.append(f"connectionPool: {pool}")
    if outlier:
        parts.append(f"outlierDetection: {outlier}")
    return "{" + ", ".join(parts) + "}"


NO_REWRITE = {"protocol": "kvnr", "codec": "proxy_test_codecs:NoRewriteKVCodec"}


def test_max_connections_and_max_requests() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh(
            [(up.port, "v1")],
            traffic_policy=policy("{tcp: {maxConnections: 2}, http: {http2MaxRequests: 5}}"),
            **NO_REWRITE,  # a connection per client: three clients want three
        )
        async with engine_for(text) as engine:
            clients = [await Client.connect(address(engine)) for _ in range(3)]
            first = [error_type(await c.call()) for c in clients]
            assert first == [None, None, "OverLimit"]
            hung = [clients[0].start("hang") for _ in range(8)]
            refused = await asyncio.wait_for(asyncio.gather(*hung[5:]), 5)
            assert {error_type(r) for r in refused} == {"OverLimit"}
            assert "http2MaxRequests" in refused[0].attributes["error-message"]
            stats = engine.stats
            name = "metaprotocol_upstream_overflow_total"
            assert stats.total(name, limit="maxConnections") == 1
            assert stats.total(name, limit="http2MaxRequests") == 3
            for c in clients:
                c.close()
        await up.close()

    run(main())


def test_max_requests_per_connection_and_idle_timeout() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        # An idle timeout well above a call's time (milliseconds, even on a loaded machine), so the
        # seven calls never leave a connection idle long enough to close it.
        pool = "{http: {maxRequestsPerConnection: 3, idleTimeout: 500ms}}"
        async with engine_for(mesh([(up.port, "v1")], traffic_policy=policy(pool))) as engine:
            c = await Client.connect(address(engine))
            for _ in range(7):
                assert error_type(await c.call()) is None
            assert up.accepted == 3  # 3 + 3 + 1 requests
            closed = "metaprotocol_upstream_connections_closed_total"
            assert engine.stats.total(closed, reason="max_requests") == 2
            # nothing in flight: the last connection closes after the idle timeout
            await until(lambda: not engine.upstreams)
            assert engine.stats.total(closed, reason="idle") == 1
            assert error_type(await c.call()) is None  # and a new one opens on demand
            assert up.accepted == 4
            c.close()
        await up.close()

    run(main())


def test_connect_timeout_pending_limit_and_keepalive() -> None:
    async def main() -> None:
        hanging = full_backlog_port()
        pool = "{tcp: {connectTimeout: 200ms}, http: {http1MaxPendingRequests: 2}}"
        async with engine_for(mesh([(hanging, "v1")], traffic_policy=policy(pool))) as engine:
            c = await Client.connect(address(engine))
            loop = asyncio.get_running_loop()
            started = loop.time()
            replies = await asyncio.wait_for(asyncio.gather(*(c.start() for _ in range(4))), 5)
            assert [error_type(r) for r in replies] == [
                "UpstreamConnectFailure",
                "UpstreamConnectFailure",
                "OverLimit",
                "OverLimit",
            ]
            assert "timed out" in replies[0].attributes["error-message"]
            assert loop.time() - started < 2  # the cluster's 200ms, not the engine's 5s
            c.close()
        up = await Upstream("a").start()

        async def keepalive(pool: str) -> tuple[int, int, int]:
            """SO_KEEPALIVE, TCP_KEEPIDLE and TCP_KEEPCNT of the upstream socket."""
            async with engine_for(mesh([(up.port, "v1")], traffic_policy=policy(pool))) as e:
                c = await Client.connect(address(e))
                await c.call()
                (conn,) = e.upstreams
                assert conn.transport is not None
                sock = conn.transport.get_extra_info("socket")
                c.close()
                return (
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                )

        timed = "{tcp: {tcpKeepalive: {time: 30s, interval: 5s, probes: 3}}}"
        assert await keepalive(timed) == (1, 30, 3)
        # An empty tcpKeepalive turns keepalive on with the system's settings (as in Envoy,
        # and as istiod writes a rule's or the mesh's without values); it was read as off.
        assert (await keepalive("{tcp: {tcpKeepalive: {}}}"))[0] == 1
        await up.close()

    run(main())


def ejected(engine: Engine) -> int:
    return engine.stats.total("metaprotocol_outlier_ejections_active")


def test_gateway_errors_eject_then_readmit() -> None:
    async def main() -> None:
        good = await Upstream("good").start()
        outlier = (
            "{consecutiveGatewayErrors: 2, baseEjectionTime: 1s, interval: 200ms,"
            " maxEjectionPercent: 50}"
        )
        text = mesh(
            [(refusing_port(), "v1"), (good.port, "v1")], traffic_policy=policy("", outlier)
        )
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            loop = asyncio.get_running_loop()
            started = loop.time()  # before the ejection: a lower bound for its readmission
            results = [error_type(await c.call()) for _ in range(4)]  # alternating at first
            assert results.count("UpstreamConnectFailure") == 2
            assert ejected(engine) == 1
            # Ten calls take milliseconds: well within the ejection time, even on a slow machine.
            after = [error_type(await c.call()) for _ in range(10)]
            assert after == [None] * 10  # the dead endpoint is skipped while ejected
            await until(lambda: ejected(engine) == 0)  # readmitted at the interval tick after
            assert loop.time() - started >= 0.99  # baseEjectionTime: a timer never fires early
            assert engine.stats.total("metaprotocol_outlier_ejections_total") == 1
            c.close()
        await good.close()

    run(main())


def test_error_replies_eject_and_too_few_healthy_is_panic() -> None:
    async def main() -> None:
        good, bad = await Upstream("good").start(), await Failing("bad").start()
        outlier = "{consecutive5xxErrors: 3, baseEjectionTime: 1h, maxEjectionPercent: 100}"
        text = mesh([(bad.port, "v1"), (good.port, "v1")], traffic_policy=policy("", outlier))
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            for _ in range(6):
                await c.call()
            assert ejected(engine) == 1
            servers = {(await c.call()).attributes["server"] for _ in range(6)}
            assert servers == {"good"}
            c.close()
        # minHealthPercent above what is left healthy: balance over every endpoint (panic)
        panic = "{consecutive5xxErrors: 3, baseEjectionTime: 1h, minHealthPercent: 60}"
        text = mesh([(bad.port, "v1"), (good.port, "v1")], traffic_policy=policy("", panic))
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            for _ in range(6):
                await c.call()
            assert ejected(engine) == 1
            servers = {(await c.call()).attributes["server"] for _ in range(6)}
            assert servers == {"good", "bad"}
            c.close()
        await good.close()
        await bad.close()

    run(main())


TO_V1 = """\
- name: all
  route: [{destination: {host: svc.test, subset: v1}}]
"""


def with_v1_policy(text: str, traffic: str) -> str:
    """``text`` (a :func:`mesh`) with subset v1's ``trafficPolicy``."""
    v1 = "- {name: v1, labels: {version: v1}}"
    assert v1 in text
    return text.replace(v1, f"- {{name: v1, labels: {{version: v1}}, trafficPolicy: {traffic}}}")


def test_empty_outlier_detection_ejects_after_five_errors_in_a_row() -> None:
    """``outlierDetection: {}`` is detection on with Istio's and Envoy's defaults (5
    consecutive errors, ejection 30s, at most 10 % but one endpoint): it was read as none."""

    async def main() -> None:
        good, bad = await Upstream("good").start(), await Failing("bad").start()
        text = mesh([(bad.port, "v1"), (good.port, "v1")], traffic_policy=policy("", "{}"))
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            servers = [(await c.call()).attributes["server"] for _ in range(8)]  # round robin
            assert servers.count("bad") == 4 and ejected(engine) == 0
            servers = [(await c.call()).attributes["server"] for _ in range(2)]
            assert servers.count("bad") == 1 and ejected(engine) == 1  # the fifth in a row
            servers = [(await c.call()).attributes["server"] for _ in range(6)]
            assert set(servers) == {"good"}
            c.close()
        await good.close()
        await bad.close()

    run(main())


def test_a_subsets_detection_off_overrides_the_rules() -> None:
    """A subset's ``outlierDetection`` replaces the rule's whole (Istio's mergeTrafficPolicy):
    ``{consecutive5xxErrors: 0}`` turns detection off for the subset's clusters and makes no
    detector; ``{}`` is the defaults (5 in a row), not the rule's 2. Both were read as unset,
    so the subset had the rule's detection."""

    async def main() -> None:
        good, bad = await Upstream("good").start(), await Failing("bad").start()
        rule = policy("", "{consecutive5xxErrors: 2, baseEjectionTime: 1h}")
        endpoints = [(bad.port, "v1"), (good.port, "v1")]
        for own, errors in (("{consecutive5xxErrors: 0}", 10), ("{}", 5)):
            text = with_v1_policy(
                mesh(endpoints, router=TO_V1, traffic_policy=rule), f"{{outlierDetection: {own}}}"
            )
            async with engine_for(text) as engine:
                cluster = engine.clusters["outbound|9000|v1|svc.test"]
                assert (cluster.outlier is None) is (errors == 10)
                c = await Client.connect(address(engine))
                servers = [(await c.call()).attributes["server"] for _ in range(20)]
                assert servers.count("bad") == errors, own  # round robin, until ejected
                assert ejected(engine) == (errors == 5)
                c.close()
        await good.close()
        await bad.close()

    run(main())


def test_a_pool_set_to_nothing_is_no_pool() -> None:
    """A subset's ``connectionPool: {}`` replaces the rule's (no limits for the subset, as in
    Istio), and the engine builds its cluster with no pool at all: no limit is checked per
    request, as without ``connectionPool``. A reload between the two spellings keeps the
    cluster (and its connections)."""

    async def main() -> None:
        a = await Upstream("a").start()
        rule = policy("{tcp: {maxConnections: 1}, http: {http2MaxRequests: 1}}")
        base = mesh([(a.port, "v1")], router=TO_V1, traffic_policy=rule)
        rule = loads_config(base).destination_rules["svc.test"]
        assert rule.policy_for(9000, "v1").connection_pool == rule.policy.connection_pool
        async with engine_for(with_v1_policy(base, "{connectionPool: {}}")) as engine:
            cluster = engine.clusters["outbound|9000|v1|svc.test"]
            assert cluster.pool is None
            c = await Client.connect(address(engine))
            assert (await c.call()).attributes["server"] == "a"
            plain = mesh([(a.port, "v1")], router=TO_V1)
            await engine.apply(loads_config(with_v1_policy(plain, "{}")))
            assert engine.clusters["outbound|9000|v1|svc.test"] is cluster
            c.close()
        # The rule's own connectionPool: {} (the loader keeps it, set): no pool either.
        text = mesh([(a.port, "v1")], traffic_policy=policy("{}"))
        rule = loads_config(text).destination_rules["svc.test"]
        assert rule.policy.connection_pool is not None
        async with engine_for(text) as engine:
            assert engine.clusters["outbound|9000||svc.test"].pool is None
        await a.close()

    run(main())


@pytest.mark.parametrize(
    ("traffic", "field"),
    [
        ("{connectionPool: {tcp: {maxConnections: 0}}}", "tcp.maxConnections"),
        ("{connectionPool: {http: {h2UpgradePolicy: UPGRADE}}}", "http.h2UpgradePolicy"),
        ("{connectionPool: {tcp: {connectTimeout: soon}}}", "tcp.connectTimeout"),
        ("{outlierDetection: {consecutiveErrors: 5}}", "outlierDetection.consecutiveErrors"),
        ("{outlierDetection: {maxEjectionPercent: 101}}", "maxEjectionPercent"),
        ("{outlierDetection: {splitExternalLocalOriginErrors: 1}}", "splitExternal"),
        ("{outlierDetection: {consecutiveLocalOriginFailures: -1}}", "LocalOriginFailures"),
    ],
)
def test_bad_traffic_policy(traffic: str, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        loads_config(mesh([(1, "v1")], traffic_policy=traffic))
    assert field in str(caught.value)


@pytest.mark.parametrize(
    ("pool", "checked"),
    [
        ("", False),
        ("{tcp: {connectTimeout: 2s}}", False),  # every cluster istiod sends has one
        ("{tcp: {maxConnections: 4, tcpKeepalive: {}}, http: {idleTimeout: 1s}}", False),
        ("{http: {http2MaxRequests: 10}}", True),
        ("{http: {http1MaxPendingRequests: 10}}", True),
    ],
)
def test_only_a_pool_that_limits_requests_is_checked_per_request(pool: str, checked: bool) -> None:
    """Each request checks the request limits of its cluster's pool: a pool without any
    (timeouts, keepalive, connections only) skipped nothing and cost about 1 % of a request
    (callgrind, the no-I/O harness with a connectTimeout: 103 830 -> 102 480 instructions);
    the limits themselves are shown by the tests above."""

    async def main() -> None:
        async with engine_for(mesh([(1, "v1")], traffic_policy=policy(pool))) as engine:
            assert {c.request_limits for c in engine.clusters.values()} == {checked}

    run(main())


def test_split_local_origin_errors_are_counted_apart() -> None:
    """``splitExternalLocalOriginErrors`` was refused. With it, connect failures count towards
    ``consecutiveLocalOriginFailures`` only (not ``consecutive5xxErrors``), as Envoy's split
    mode: a refusing endpoint with a 5xx threshold of 1 is ejected at the third failure."""

    async def main() -> None:
        good = await Upstream("good").start()
        outlier = (
            "{consecutive5xxErrors: 1, splitExternalLocalOriginErrors: true,"
            " consecutiveLocalOriginFailures: 3, baseEjectionTime: 1h, maxEjectionPercent: 50}"
        )
        text = mesh(
            [(refusing_port(), "v1"), (good.port, "v1")], traffic_policy=policy("", outlier)
        )
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            results = [error_type(await c.call()) for _ in range(4)]  # round robin
            assert results.count("UpstreamConnectFailure") == 2 and ejected(engine) == 0
            results = [error_type(await c.call()) for _ in range(2)]
            assert results.count("UpstreamConnectFailure") == 1 and ejected(engine) == 1
            assert [error_type(await c.call()) for _ in range(4)] == [None] * 4
            c.close()
        await good.close()

    run(main())


def test_split_mode_still_ejects_on_error_replies_which_reset_the_local_count() -> None:
    """In split mode an upstream ``Error`` reply is an external error (the 5xx count), and an
    answer of any kind resets the local-origin count (the connection worked)."""

    async def main() -> None:
        good, bad = await Upstream("good").start(), await Failing("bad").start()
        outlier = (
            "{consecutive5xxErrors: 2, splitExternalLocalOriginErrors: true,"
            " baseEjectionTime: 1h, maxEjectionPercent: 50}"
        )
        text = mesh([(bad.port, "v1"), (good.port, "v1")], traffic_policy=policy("", outlier))
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            servers = [(await c.call()).attributes["server"] for _ in range(4)]
            assert servers.count("bad") == 2 and ejected(engine) == 1
            assert {(await c.call()).attributes["server"] for _ in range(4)} == {"good"}
            c.close()
        await good.close()
        await bad.close()

    run(main())


def test_split_mode_detector_counts() -> None:
    """The detector alone: local-origin failures apart, reset by any answer."""
    from metaprotocol_sdk.enums import ResponseStatus
    from metaprotocol_sdk.proxy.config.models import OutlierDetection

    async def main() -> None:
        a = await Upstream("a").start()
        spec = "{splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 2}"
        async with engine_for(mesh([(a.port, "v1")], traffic_policy=policy("", spec))) as engine:
            cluster = engine.clusters["outbound|9000||svc.test"]
            detector = cluster.outlier
            assert detector is not None
            assert detector.spec == OutlierDetection(
                split_local_origin=True, consecutive_local_origin_failures=2
            )
            host = cluster.hosts[0]
            detector.gateway_error(host)
            assert (host.local_errors, host.errors, host.gateway_errors) == (1, 0, 0)
            detector.observe(host, ResponseStatus.Error)
            assert (host.local_errors, host.errors) == (0, 1)
            detector.gateway_error(host)
            detector.gateway_error(host)
            assert host.ejected
        await a.close()

    run(main())


def test_config_dump_shows_ejections_made_after_it_was_first_built() -> None:
    """``/config_dump`` is built once per configuration; an ejection or readmission after a
    first dump did not show (``ejected`` stayed ``[]`` while an endpoint was out)."""

    async def main() -> None:
        good = await Upstream("good").start()
        outlier = (
            "{consecutiveGatewayErrors: 1, baseEjectionTime: 1s, interval: 100ms,"
            " maxEjectionPercent: 50}"
        )
        text = mesh(
            [(refusing_port(), "v1"), (good.port, "v1")], traffic_policy=policy("", outlier)
        )

        async def dumped_ejections() -> list[object]:
            assert engine.admin_address is not None
            status, body = await http_get(engine.admin_address, "/config_dump")
            assert status == 200
            clusters = json.loads(body)["clusters"]
            (cluster,) = [c for c in clusters if c["name"] == "outbound|9000||svc.test"]
            return list(cluster["ejected"])

        async with engine_for(text) as engine:
            assert await dumped_ejections() == []
            c = await Client.connect(address(engine))
            results = [error_type(await c.call()) for _ in range(2)]
            assert results.count("UpstreamConnectFailure") == 1 and ejected(engine) == 1
            assert len(await dumped_ejections()) == 1
            await until(lambda: ejected(engine) == 0)
            assert await dumped_ejections() == []
            c.close()
        await good.close()

    run(main())


def test_the_cluster_s_requests_in_flight_are_kept_as_its_endpoints_count_them() -> None:
    """``http2MaxRequests`` (and a retry budget) read the requests in flight to a cluster per
    request: a sum over its endpoints (14 us at 1000 endpoints) is now a count kept where each
    endpoint's is. It must agree with the endpoints' counts through answers, timeouts,
    retries to another endpoint and mirrored copies, and end at 0."""
    router = """\
- name: all
  route: [{destination: {host: svc.test, subset: v1}}]
  mirror: {host: svc.test, subset: v2}
  mirrorPercentage: {value: 100}
  timeout: 300ms
  retries: {attempts: 2, retryOn: "error,timeout"}
"""

    async def main() -> None:
        ups = [await Failing("bad").start(), await Upstream("good").start()]
        mirror = await Upstream("mirror").start()
        text = mesh(
            [(ups[0].port, "v1"), (ups[1].port, "v1"), (mirror.port, "v2")],
            router=router,
            traffic_policy=policy("{http: {http2MaxRequests: 100}}"),
        )
        async with engine_for(text) as engine:
            clusters = [c for c in engine.clusters.values() if c.load is not None]
            assert len(clusters) == 2  # v1's and v2's

            def agree() -> bool:
                return all(
                    c.load is not None and c.load.active == sum(h.active for h in c.hosts)
                    for c in clusters
                )

            c = await Client.connect(address(engine))
            calls = [c.start("get") for _ in range(6)] + [c.start("hang") for _ in range(2)]
            await until(lambda: engine.pending > 0 and agree(), 5)
            replies = await asyncio.wait_for(asyncio.gather(*calls), 5)
            assert {error_type(r) for r in replies[:6]} == {None}  # retried to the good one
            await until(lambda: engine.pending == 0 and not engine.mirror_sink.inflight, 5)
            assert agree()
            assert [c.load.active for c in clusters if c.load is not None] == [0, 0]
            c.close()
        for up in (*ups, mirror):
            await up.close()

    run(main())
