"""DestinationRule ``connectionPool.tcp.maxConnectionDuration`` and ``tcp.idleTimeout`` (with
``http.idleTimeout``), over real sockets: upstream connections retired for their age, closed
when idle, counted, shown in /config_dump and changed by a reload."""

from __future__ import annotations

import asyncio
import json

import pytest
from proxy_kit import (
    Client,
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

CLOSED = "metaprotocol_upstream_connections_closed_total"
NO_REWRITE = {"protocol": "kvnr", "codec": "proxy_test_codecs:NoRewriteKVCodec"}


def pooled(pool: str) -> str:
    return "{connectionPool: " + pool + "}"


def closed(engine: Engine, reason: str) -> int:
    return engine.stats.total(CLOSED, reason=reason)


def sweeps_within(engine: Engine, seconds: float) -> bool:
    """The engine's next housekeeping sweep is due within ``seconds`` (it is sized from the
    shortest timeout, so a short pool timeout is enforced on time)."""
    sweeper = engine._sweeper
    assert sweeper is not None
    return sweeper.when() - engine.loop.time() <= seconds


@pytest.mark.parametrize("codec", [{}, NO_REWRITE], ids=["shared", "dedicated"])
def test_max_connection_duration_retires_a_connection(codec: dict[str, str]) -> None:
    """Past ``maxConnectionDuration`` a connection takes no new request: the request in flight
    on it is answered there, the next request opens a new connection, and the old one closes
    once it has nothing in flight; counted."""

    async def main() -> None:
        up = await Upstream("a").start()
        pool = pooled("{tcp: {maxConnectionDuration: 100ms}}")
        async with engine_for(mesh([(up.port, "v1")], traffic_policy=pool, **codec)) as engine:
            assert sweeps_within(engine, 0.1)
            c = await Client.connect(address(engine))
            slow = c.start("slow")  # in flight on the first connection until released
            await up.wait_received(1)
            (first,) = engine.upstreams
            await until(lambda: first.retiring, "the first connection retired for its age")
            assert not first.closed and first in engine.upstreams  # its request is in flight
            assert closed(engine, "max_connection_duration") == 1
            assert error_type(await c.call()) is None  # on a new connection
            assert up.accepted == 2
            assert not slow.done()
            up.release.set()
            assert error_type(await asyncio.wait_for(slow, 5)) is None
            await until(lambda: first not in engine.upstreams, "the retired connection closed")
            assert first.closed
            assert closed(engine, "idle") == 0
            c.close()
        await up.close()

    run(main())


def test_a_connection_younger_than_the_limit_is_kept_and_years_fit() -> None:
    """A duration of years (or 0s, off) neither overflows nor retires anything."""

    async def main() -> None:
        up = await Upstream("a").start()
        pool = pooled("{tcp: {maxConnectionDuration: 87600h, idleTimeout: 87600h}}")
        async with engine_for(mesh([(up.port, "v1")], traffic_policy=pool)) as engine:
            c = await Client.connect(address(engine))
            for _ in range(3):
                assert error_type(await c.call()) is None
            (conn,) = engine.upstreams
            assert conn.established and not conn.retiring
            assert up.accepted == 1
            c.close()
        pool = pooled("{tcp: {maxConnectionDuration: 0s, idleTimeout: 0s}}")
        async with engine_for(mesh([(up.port, "v1")], traffic_policy=pool)) as engine:
            cluster = next(iter(engine.clusters.values()))
            assert cluster.max_duration is None and cluster.idle_timeout is None
        await up.close()

    run(main())


@pytest.mark.parametrize(
    "pool",
    [
        "{tcp: {idleTimeout: 100ms}}",
        "{tcp: {idleTimeout: 1h}, http: {idleTimeout: 100ms}}",  # http.idleTimeout wins
    ],
    ids=["tcp", "http-over-tcp"],
)
def test_idle_timeout_closes_an_idle_connection(pool: str) -> None:
    """``tcp.idleTimeout`` closes an upstream connection with nothing in flight (and
    ``http.idleTimeout`` does, in its place, when both are set). A request waiting for its
    reply longer than that does not make the connection idle."""

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")], traffic_policy=pooled(pool))) as engine:
            assert sweeps_within(engine, 0.1)
            cluster = next(iter(engine.clusters.values()))
            assert cluster.idle_timeout == 0.1
            c = await Client.connect(address(engine))
            slow = c.start("slow")
            await up.wait_received(1)
            (conn,) = engine.upstreams
            loop = asyncio.get_running_loop()
            waited = loop.time() + 0.4  # four idle timeouts with a request in flight
            await until(lambda: loop.time() > waited, "four idle timeouts")
            assert not conn.closed and not slow.done()
            up.release.set()
            assert error_type(await asyncio.wait_for(slow, 5)) is None
            await until(lambda: not engine.upstreams, "the idle connection closed")
            assert closed(engine, "idle") == 1
            assert closed(engine, "max_connection_duration") == 0
            assert error_type(await c.call()) is None  # a new connection opens on demand
            assert up.accepted == 2
            c.close()
        await up.close()

    run(main())


def test_http_idle_timeout_wins_over_a_shorter_tcp_one() -> None:
    """With both set, ``http.idleTimeout`` applies even when ``tcp.idleTimeout`` is shorter:
    istiod gives the Envoy cluster the HTTP one and the TCP one only in its absence."""

    async def main() -> None:
        up = await Upstream("a").start()
        pool = pooled("{tcp: {idleTimeout: 50ms}, http: {idleTimeout: 1h}}")
        async with engine_for(mesh([(up.port, "v1")], traffic_policy=pool)) as engine:
            cluster = next(iter(engine.clusters.values()))
            assert cluster.idle_timeout == 3600.0
            c = await Client.connect(address(engine))
            assert error_type(await c.call()) is None
            (conn,) = engine.upstreams
            loop = asyncio.get_running_loop()
            waited = loop.time() + 0.4  # eight of the TCP timeouts, idle
            await until(lambda: loop.time() > waited, "eight TCP idle timeouts")
            assert not conn.closed and closed(engine, "idle") == 0
            assert error_type(await c.call()) is None and up.accepted == 1
            c.close()
        await up.close()

    run(main())


def test_reload_changes_the_lifetime_and_config_dump_shows_it() -> None:
    """A reload that sets the limits replaces the cluster: its connections retire (they take
    no new requests and close once answered), and new connections follow the new limits; a
    reload that removes them leaves new connections alone. /config_dump shows them."""

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")])) as engine:
            c = await Client.connect(address(engine))
            assert error_type(await c.call()) is None
            (before,) = engine.upstreams
            limits = pooled("{tcp: {maxConnectionDuration: 100ms, idleTimeout: 30s}}")
            await engine.apply(loads_config(mesh([(up.port, "v1")], traffic_policy=limits)))
            await until(lambda: not engine.upstreams, "the old cluster's idle connection closed")
            assert before.retiring and closed(engine, "max_connection_duration") == 0
            slow = c.start("slow")  # holds the new connection open past its age
            await up.wait_received(2)
            (after,) = engine.upstreams
            assert after is not before and up.accepted == 2
            await until(lambda: after.retiring, "the new connection retired for its age")
            assert closed(engine, "max_connection_duration") == 1
            up.release.set()
            assert error_type(await asyncio.wait_for(slow, 5)) is None
            await until(lambda: not engine.upstreams, "the retired connection closed")
            assert engine.admin_address is not None
            status, body = await http_get(engine.admin_address, "/config_dump")
            assert status == 200
            (dumped,) = json.loads(body)["clusters"]
            assert dumped["connectionPool"]["max_connection_duration"] == 0.1
            assert dumped["connectionPool"]["tcp_idle_timeout"] == 30.0

            await engine.apply(loads_config(mesh([(up.port, "v1")])))
            assert error_type(await c.call()) is None
            (last,) = engine.upstreams
            assert up.accepted == 3 and last.cluster.max_duration is None
            assert not last.retiring  # no lifetime to enforce
            c.close()
        await up.close()

    run(main())
