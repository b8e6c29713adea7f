"""Drain notices (the codec's ``drain_notice`` capability), over real sockets.

From an upstream: the connection that carried it takes no new requests, is held open until
the upstream closes it (at most ``timeouts.upstreamDrain``), and its endpoint is avoided
meanwhile, as a Dubbo consumer avoids a provider that sent its read-only event. To clients:
the engine sends its codec's notice on the connections that stay open while it drains (a
shutdown with requests in flight, a listener removed by a reload, a hot restart's serving
half)."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
from proxy_kit import (
    PONG,
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

from metaprotocol_sdk import CodecError, ConfigError, Metadata
from metaprotocol_sdk.examples.kv import REQUEST, build_frame
from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.upstream import AvoidUnfit

NOTICE = NoticeKVCodec().drain_notice()
SHARED = {"protocol": "kvd", "codec": "proxy_test_codecs:NoticeKVCodec"}
DEDICATED = {"protocol": "kvdd", "codec": "proxy_test_codecs:NoticeDedicatedKVCodec"}
ROUND_ROBIN = "{loadBalancer: {simple: ROUND_ROBIN}}"
NOTICES = "metaprotocol_drain_notices_total"


def notices(engine: Engine, side: str) -> int:
    return engine.stats.total(NOTICES, side=side)


def is_notice(message: Metadata) -> bool:
    return NoticeKVCodec().is_drain_notice(message)


async def served_by(client: Client, n: int) -> list[str]:
    """The servers that answered ``n`` calls, each answered without error."""
    servers = []
    for _ in range(n):
        reply = await client.call()
        assert error_type(reply) is None, reply.attributes
        servers.append(reply.attributes["server"])
    return servers


@pytest.mark.parametrize("codec", [SHARED, DEDICATED], ids=["shared", "dedicated"])
def test_an_upstream_notice_moves_new_requests_to_the_other_endpoints(
    codec: dict[str, str],
) -> None:
    """An endpoint that sent its drain notice, then refuses new connections (as a Dubbo
    provider shutting down does), gets no new request: its request in flight is answered on
    the noticed connection, every new one goes to the other endpoint, none fails. Once the
    upstream closes the connection the endpoint is picked again."""

    async def main() -> None:
        a, b = await Upstream("a").start(), await Upstream("b").start()
        config = mesh([(a.port, "v1"), (b.port, "v1")], traffic_policy=ROUND_ROBIN, **codec)
        async with engine_for(config) as engine:
            c = await Client.connect(address(engine))
            assert sorted(await served_by(c, 2)) == ["a", "b"]
            slow = c.start("slow")  # in flight to one of them
            await until(
                lambda: any(m.operation_name == "slow" for m in a.received + b.received),
                "slow sent",
            )
            draining, other = (a, b) if a.received[-1].operation_name == "slow" else (b, a)
            draining.refusing = True
            draining.send_all(NOTICE)
            cluster = next(iter(engine.clusters.values()))
            await until(lambda: cluster.draining == 1, "the endpoint draining")
            assert notices(engine, "upstream") == 1
            assert engine.stats.total("metaprotocol_heartbeats_total", side="upstream") == 0
            assert set(await served_by(c, 6)) == {other.name}
            assert draining.accepted == 1  # no new connection tried
            assert engine.admin_address is not None
            status, body = await http_get(engine.admin_address, "/config_dump")
            assert status == 200
            dumped = json.loads(body)["clusters"]
            assert [f"127.0.0.1:{draining.port}"] in [d["draining"] for d in dumped]
            draining.release.set()
            assert error_type(await asyncio.wait_for(slow, 5)) is None
            (noticed,) = [u for u in engine.upstreams if u.host.port == draining.port]
            assert not noticed.closed  # held open for the upstream to close
            draining.refusing = False
            draining.close_connections()  # its drain is over
            await until(lambda: cluster.draining == 0, "the endpoint picked again")
            assert not isinstance(cluster.balancer, AvoidUnfit)
            assert sorted(await served_by(c, 2)) == ["a", "b"]
            c.close()
        await a.close()
        await b.close()

    run(main())


def test_the_hold_on_a_noticed_connection_is_bounded() -> None:
    """An upstream that sent a notice but never closes: after ``timeouts.upstreamDrain`` the
    engine closes the connection (nothing in flight), counted, and the endpoint is picked
    again, on a new connection."""

    async def main() -> None:
        a, b = await Upstream("a").start(), await Upstream("b").start()
        config = mesh(
            [(a.port, "v1"), (b.port, "v1")],
            traffic_policy=ROUND_ROBIN,
            proxy="timeouts: {upstreamDrain: 200ms}\n",
            **SHARED,
        )
        async with engine_for(config) as engine:
            c = await Client.connect(address(engine))
            await served_by(c, 2)
            a.send_all(NOTICE)
            cluster = next(iter(engine.clusters.values()))
            await until(lambda: cluster.draining == 1, "the endpoint draining")
            assert set(await served_by(c, 4)) == {"b"}
            await until(lambda: cluster.draining == 0, "the hold over")
            closed = "metaprotocol_upstream_connections_closed_total"
            assert engine.stats.total(closed, reason="drain_timeout") == 1
            await until(lambda: not a.connections, "the noticed connection closed")
            assert sorted(await served_by(c, 2)) == ["a", "b"]
            assert a.accepted == 2
            c.close()
        await a.close()
        await b.close()

    run(main())


def test_with_every_endpoint_draining_requests_still_go_to_one() -> None:
    """The only endpoint sent its notice: requests are not refused for it, they go to it on
    a new connection (a notice is advice, not an ejection)."""

    async def main() -> None:
        a = await Upstream("a").start()
        async with engine_for(mesh([(a.port, "v1")], **SHARED)) as engine:
            c = await Client.connect(address(engine))
            await served_by(c, 1)
            a.send_all(NOTICE)
            cluster = next(iter(engine.clusters.values()))
            await until(lambda: cluster.draining == 1, "the endpoint draining")
            assert await served_by(c, 3) == ["a"] * 3
            assert a.accepted == 2
            c.close()
        await a.close()

    run(main())


def test_an_upstream_that_notices_every_connection_holds_one() -> None:
    """An upstream that sends its notice on every connection it accepts (the only endpoint,
    so it is still picked): every request is answered, each on a new connection, and only
    one connection is held open for the drain; the others close once their request is
    answered, rather than one per request held for ``timeouts.upstreamDrain``."""

    async def main() -> None:
        a = await Upstream("a").start()
        a.greeting = NOTICE
        async with engine_for(mesh([(a.port, "v1")], **SHARED)) as engine:
            c = await Client.connect(address(engine))
            assert await served_by(c, 20) == ["a"] * 20
            assert a.accepted == 20
            await until(lambda: len(engine.upstreams) == 1, "one connection held")
            assert notices(engine, "upstream") == 20
            (held,) = engine.upstreams
            assert held.notice_hold is not None
            c.close()
        await a.close()

    run(main())


def test_a_heartbeat_is_no_notice_and_a_codec_without_notices_ignores_them() -> None:
    """A PING is answered as before; the notice's bytes sent to a codec that declares no
    drain notice are a heartbeat needing no reply, nothing more."""

    async def main() -> None:
        a = await Upstream("a").start()
        async with engine_for(mesh([(a.port, "v1")])) as engine:  # the KV codec: no notice
            c = await Client.connect(address(engine))
            await served_by(c, 1)
            a.send_all(NOTICE)
            a.ping_all()
            await until(lambda: a.pongs, "the ping answered")
            assert engine.stats.total("metaprotocol_heartbeats_total", side="upstream") == 2
            assert notices(engine, "upstream") == 0
            (conn,) = engine.upstreams
            assert not conn.retiring
            c.close()
        await a.close()

    run(main())


class Watcher(Client):
    """A client that keeps the drain notices it is sent."""

    def __init__(self, metadata: dict[str, Any] | None = None) -> None:
        super().__init__(metadata)
        self.notices: list[Metadata] = []

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        for message in [m for m in self.unmatched if is_notice(m)]:
            self.unmatched.remove(message)
            self.notices.append(message)


async def watcher(engine: Engine) -> Watcher:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(Watcher, *address(engine))
    return client


def test_a_shutdown_sends_the_notice_on_connections_with_requests_in_flight() -> None:
    """On ``stop``: a client with a request in flight gets the notice (before its reply, its
    connection closing after it); an idle client's connection closes at once, with none."""

    async def main() -> None:
        a = await Upstream("a").start()
        engine = Engine(loads_config(mesh([(a.port, "v1")], **SHARED), "t.yaml"))
        await engine.start()
        busy, idle = await watcher(engine), await watcher(engine)
        await served_by(busy, 1)
        await served_by(idle, 1)
        slow = busy.start("slow")
        await a.wait_received(3)
        stopping = asyncio.ensure_future(engine.stop(drain=5.0))
        await until(lambda: busy.notices, "the notice sent")
        await asyncio.wait_for(idle.closed, 5)
        assert idle.notices == []
        a.release.set()
        assert error_type(await asyncio.wait_for(slow, 5)) is None
        await asyncio.wait_for(busy.closed, 5)
        await stopping
        assert len(busy.notices) == 1 and busy.unmatched == []
        assert notices(engine, "downstream") == 1
        await a.close()

    run(main())


def test_a_hot_restarts_serving_half_notices_every_connection_and_serves_on() -> None:
    """``stop(serve_first=True)`` (a hot restart's predecessor): every open connection gets
    the notice at once, and is still served meanwhile (no ``ShuttingDown``)."""

    async def main() -> None:
        a = await Upstream("a").start()
        engine = Engine(loads_config(mesh([(a.port, "v1")], **SHARED), "t.yaml"))
        await engine.start()
        first, second = await watcher(engine), await watcher(engine)
        await served_by(first, 1)
        stopping = asyncio.ensure_future(engine.stop(drain=4.0, serve_first=True))
        await until(lambda: first.notices and second.notices, "the notices sent")
        assert await served_by(second, 2) == ["a", "a"]  # served, not ShuttingDown
        assert notices(engine, "downstream") == 2
        await asyncio.wait_for(first.closed, 5)  # closed once quiet
        await asyncio.wait_for(second.closed, 5)
        await stopping
        await a.close()

    run(main(), timeout=30)


def test_a_reload_that_removes_the_listener_notices_its_busy_clients() -> None:
    """A listener removed by a reload drains its connections as a shutdown does: the one
    with a request in flight gets the notice, then its reply."""

    async def main() -> None:
        a = await Upstream("a").start()
        text = mesh([(a.port, "v1")], **SHARED)
        engine = Engine(loads_config(text, "t.yaml"))
        await engine.start()
        try:
            busy = await watcher(engine)
            slow = busy.start("slow")
            await a.wait_received(1)
            await engine.apply(loads_config(_rebound(text), "t.yaml"))
            await until(lambda: busy.notices, "the notice sent")
            a.release.set()
            assert error_type(await asyncio.wait_for(slow, 5)) is None
            await asyncio.wait_for(busy.closed, 5)
        finally:
            await engine.stop(drain=1.0)
        await a.close()

    run(main())


def _rebound(text: str) -> str:
    """``text`` with its listener on another address (the old one is removed)."""
    return text.replace("bind: '127.0.0.1:0'}", "bind: '127.0.0.2:0'}", 1)


class BrokenNoticeKVCodec(NoticeKVCodec):
    def drain_notice(self) -> bytes:
        raise RuntimeError("no notice today")

    def is_drain_notice(self, metadata: Metadata) -> bool:
        raise RuntimeError("cannot tell")


class RefusingNoticeKVCodec(NoticeKVCodec):
    """Its notice methods raise the contract's ``CodecError``, which they may not either: a
    notice depends on nothing the peer sent, and every heartbeat is a notice or not."""

    def drain_notice(self) -> bytes:
        raise CodecError("no notice today")

    def is_drain_notice(self, metadata: Metadata) -> bool:
        raise CodecError("cannot tell")


@pytest.mark.parametrize("broken", [BrokenNoticeKVCodec, RefusingNoticeKVCodec])
def test_a_codec_whose_notice_methods_raise_is_reported_and_the_drain_goes_on(
    monkeypatch: Any, broken: type[NoticeKVCodec]
) -> None:
    """``drain_notice`` raising (a ``CodecError`` too): logged as the codec's bug, the drain
    goes on without a notice; ``is_drain_notice`` raising: the heartbeat is taken as one."""
    import proxy_kit

    monkeypatch.setattr(proxy_kit._mod, "BrokenNoticeKVCodec", broken, raising=False)

    async def main() -> None:
        a = await Upstream("a").start()
        codec = {"protocol": "kvd", "codec": "proxy_test_codecs:BrokenNoticeKVCodec"}
        engine = Engine(loads_config(mesh([(a.port, "v1")], **codec), "t.yaml"))
        await engine.start()
        busy = await watcher(engine)
        await served_by(busy, 1)
        a.send_all(build_frame(PONG, 0, {"drain": "1"}))
        bugs = "metaprotocol_codec_errors_total"
        await until(
            lambda: engine.stats.total(bugs, method="is_drain_notice") == 1, "is_drain_notice"
        )
        (conn,) = engine.upstreams
        assert not conn.retiring
        slow = busy.start("slow")
        await a.wait_received(2)
        stopping = asyncio.ensure_future(engine.stop(drain=5.0))
        await until(lambda: engine.stats.total(bugs, method="drain_notice") == 1, "drain_notice")
        a.release.set()
        assert error_type(await asyncio.wait_for(slow, 5)) is None
        await stopping
        assert busy.notices == [] and notices(engine, "downstream") == 0
        await a.close()

    run(main())


def aged(text: str, duration: str) -> str:
    """``text`` with its listener's ``maxConnectionDuration``."""
    return text.replace(
        "bind: '127.0.0.1:0'}", f"bind: '127.0.0.1:0', maxConnectionDuration: {duration}}}", 1
    )


def test_an_old_connection_is_noticed_then_closed_once_quiet() -> None:
    """Past its listener's ``maxConnectionDuration`` a client is sent the drain notice, is
    served on (a request after the notice is answered), and its connection closes once
    quiet; counted. Its next connection is served as usual."""

    async def main() -> None:
        a = await Upstream("a").start()
        async with engine_for(aged(mesh([(a.port, "v1")], **SHARED), "300ms")) as engine:
            c = await watcher(engine)
            await served_by(c, 1)
            await until(lambda: c.notices, "the notice sent")
            assert await served_by(c, 1) == ["a"]  # still served
            await asyncio.wait_for(c.closed, 5)
            closed = engine.stats.total(
                "metaprotocol_downstream_connections_closed_total",
                reason="max_connection_duration",
            )
            assert closed == 1 and notices(engine, "downstream") == 1
            assert error_type(await (await Client.connect(address(engine))).call()) is None
        await a.close()

    run(main())


def test_an_old_connection_that_never_pauses_drains_after_timeouts_drain() -> None:
    """A client that sends without pause and ignores the notice: ``timeouts.drain`` after
    the notice, its connection drains as on a shutdown and closes (the client sees
    ``ShuttingDown``, or the close when it had a request on its way); every request the
    engine read is answered and counted. A codec without a notice (KV) is closed the same
    way, with none."""

    async def main() -> None:
        a = await Upstream("a").start()
        for codec, noticed in ((SHARED, True), ({}, False)):
            text = aged(
                mesh([(a.port, "v1")], proxy="timeouts: {drain: 500ms}\n", **codec), "200ms"
            )
            async with engine_for(text) as engine:
                c = await watcher(engine)
                errors: list[str | None] = []
                while not errors or errors[-1] is None:  # calls without pause
                    try:
                        errors.append(error_type(await c.call()))
                    except ConnectionResetError:  # its next request was on its way
                        break
                await asyncio.wait_for(c.closed, 5)
                assert errors[-1] in (None, "ShuttingDown"), errors
                assert set(errors[:-1]) == {None}
                assert bool(c.notices) is noticed
                answered = engine.stats.total("metaprotocol_requests_total")
                shut = engine.stats.total("metaprotocol_local_replies_total", type="ShuttingDown")
                assert answered + shut == len(errors)  # the stats agree with the client
        await a.close()

    run(main())


def test_max_connection_duration_is_read_and_a_reload_ages_open_connections() -> None:
    """``maxConnectionDuration``: ``0s`` is off; a bad value names the field; a reload that
    sets it applies to a connection already open (aged from its accept)."""
    a_port = 9  # never connected to: only the configuration is read
    text = mesh([(a_port, "v1")], **SHARED)
    (listener,) = loads_config(aged(text, "0s"), "t.yaml").proxy.listeners
    assert listener.max_connection_duration is None
    (listener,) = loads_config(aged(text, "90s"), "t.yaml").proxy.listeners
    assert listener.max_connection_duration == 90.0
    with pytest.raises(ConfigError, match=r"listeners\[0\]\.maxConnectionDuration"):
        loads_config(aged(text, "soon"), "t.yaml")

    async def main() -> None:
        a = await Upstream("a").start()
        text = mesh([(a.port, "v1")], **SHARED)
        async with engine_for(text) as engine:
            c = await watcher(engine)
            await served_by(c, 1)
            await engine.apply(loads_config(aged(text, "200ms"), "t.yaml"))
            assert engine.admin_address is not None
            _, body = await http_get(engine.admin_address, "/config_dump")
            assert json.loads(body)["listeners"][0]["maxConnectionDuration"] == 0.2
            await until(lambda: c.notices, "the open connection noticed")
            await asyncio.wait_for(c.closed, 5)
        await a.close()

    run(main())


def located(endpoints: list[tuple[int, str]]) -> str:
    """A mesh of the notice codec whose ``(port, locality)`` endpoints get locality failover
    priorities (outlier detection ejecting at the first gateway error; the engine in
    ``r1/z1/s1``)."""
    detection = "{outlierDetection: {consecutiveGatewayErrors: 1, baseEjectionTime: 1h}}"
    text = mesh(
        [(port, "v1") for port, _ in endpoints],
        traffic_policy=detection,
        proxy="telemetry: {workload: {locality: r1/z1/s1}}\n",
        **SHARED,
    )
    for port, locality in endpoints:
        text = text.replace(
            f": {port}}}, labels: {{version: v1}}}}",
            f": {port}}}, labels: {{version: v1}}, locality: {locality}}}",
        )
    return text


def test_a_draining_nearest_locality_fails_over_to_the_next() -> None:
    """Locality failover: the nearest endpoint alone takes the traffic. Once it sent its
    notice (and refuses new connections) its level counts it as unhealthy, as an ejected one:
    every new request goes to the next locality, none fails (before, the level kept all the
    load and the next request opened a connection to it and failed). Once its upstream
    closes the connection, the traffic comes back."""

    async def main() -> None:
        near, far = await Upstream("near").start(), await Upstream("far").start()
        async with engine_for(located([(near.port, "r1/z1/s1"), (far.port, "r1/z2/s1")])) as e:
            (cluster,) = e.clusters.values()
            assert cluster.priority_load == {0: 100, 1: 0}
            c = await Client.connect(address(e))
            assert await served_by(c, 2) == ["near", "near"]
            near.refusing = True
            near.send_all(NOTICE)
            await until(lambda: cluster.draining == 1, "the endpoint draining")
            assert await served_by(c, 4) == ["far"] * 4
            assert cluster.priority_load == {0: 0, 1: 100}
            assert near.accepted == 1
            near.refusing = False
            near.close_connections()
            await until(lambda: cluster.draining == 0, "the drain over")
            assert cluster.priority_load == {0: 100, 1: 0}
            assert not isinstance(cluster.balancer, AvoidUnfit)
            assert await served_by(c, 2) == ["near", "near"]
            c.close()
        await near.close()
        await far.close()

    run(main())


def test_a_reload_that_replaces_the_cluster_keeps_its_endpoint_draining() -> None:
    """A reload that rebuilds the cluster (a new connection pool setting) while one endpoint
    drains: the new cluster avoids it too (before, the drain ended at the reload and the
    next request went to the endpoint, which refused it); once the upstream closes the held
    connection (the old cluster's), both clusters count no endpoint draining and the new one
    picks it again."""

    async def main() -> None:
        a, b = await Upstream("a").start(), await Upstream("b").start()
        endpoints = [(a.port, "v1"), (b.port, "v1")]
        text = mesh(endpoints, traffic_policy=ROUND_ROBIN, **SHARED)
        pooled = (
            "{loadBalancer: {simple: ROUND_ROBIN}, connectionPool: {tcp: {maxConnections: 50}}}"
        )
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            assert sorted(await served_by(c, 2)) == ["a", "b"]
            a.refusing = True
            a.send_all(NOTICE)
            (old,) = engine.clusters.values()
            await until(lambda: old.draining == 1, "the endpoint draining")
            await engine.apply(loads_config(mesh(endpoints, traffic_policy=pooled, **SHARED), "t"))
            (new,) = engine.clusters.values()
            assert new is not old and new.draining == 1 and old.draining == 0
            assert set(await served_by(c, 4)) == {"b"}
            assert a.accepted == 1
            a.refusing = False
            a.close_connections()
            await until(lambda: new.draining == 0, "the drain over")
            assert old.draining == 0 and not isinstance(new.balancer, AvoidUnfit)
            assert sorted(await served_by(c, 2)) == ["a", "b"]
            c.close()
        await a.close()
        await b.close()

    run(main())


def test_a_notice_a_client_too_far_behind_cannot_take_closes_it_once_counted() -> None:
    """An old connection whose client reads nothing, far behind while the process is over
    its buffer budget: the notice, as a reply would, closes it instead (``overload``). It is
    counted once, for that, and no notice is counted (before, the notice was counted though
    never sent, and the close twice: ``overload`` and ``max_connection_duration``)."""
    proxy = (
        "limits: {connectionBufferBytes: 1024, connectionBufferMaxBytes: 67108864}\n"
        "overload: {maxBufferedBytes: 1048576}\ntimeouts: {write: 60s}\n"
    )

    async def main() -> None:
        a = await Upstream("a").start()
        text = aged(mesh([(a.port, "v1")], proxy=proxy, **SHARED), "1500ms")
        async with engine_for(text) as engine:
            deaf = socket.socket()
            deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            deaf.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(deaf, address(engine))
            big = build_frame(REQUEST, 1, {"method": "big", "size": str(6 << 20)})
            await loop.sock_sendall(deaf, big)
            await until(lambda: not engine.downstreams, "the client closed")
            closed = "metaprotocol_downstream_connections_closed_total"
            assert engine.stats.total(closed, reason="overload") == 1
            assert engine.stats.total(closed) == 1
            assert notices(engine, "downstream") == 0
            deaf.close()
        await a.close()

    run(main())
