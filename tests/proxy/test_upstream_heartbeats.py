"""Pings on upstream connections (``spec.upstream.heartbeat``, codecs declaring
``heartbeat_request``), over real sockets: a quiet connection is pinged and kept, a busy one is
not pinged, a peer that answers nothing is found and its requests answered at once."""

from __future__ import annotations

import asyncio

import pytest
from proxy_kit import (
    RESPONSE,
    Client,
    Upstream,
    address,
    build_frame,
    engine_for,
    error_type,
    mesh,
    run,
    until,
)

from metaprotocol_sdk import ConfigError
from metaprotocol_sdk.proxy import loads_config

PING = {"protocol": "kvp", "codec": "proxy_test_codecs:PingKVCodec"}
NO_PINGS = {"protocol": "kvnr", "codec": "proxy_test_codecs:NoRewriteKVCodec"}
PER_CLIENT_PINGS = "proxy_test_codecs:PingDedicatedKVCodec"
PINGS = "metaprotocol_upstream_pings_total"
CLOSED = "metaprotocol_upstream_connections_closed_total"


def heartbeat(interval: str, timeout: str = "1s") -> str:
    return f"upstream: {{heartbeat: {{interval: {interval}, timeout: {timeout}}}}}\n"


def test_a_quiet_connection_is_pinged_and_kept() -> None:
    """A connection that received nothing for ``interval`` is sent a ping; the upstream's
    answers keep it (no timeout, no new connection); the pings are counted."""

    async def main() -> None:
        a = await Upstream("a").start()
        config = mesh([(a.port, "v1")], proxy=heartbeat("200ms"), **PING)
        async with engine_for(config) as engine:
            c = await Client.connect(address(engine))
            assert error_type(await c.call()) is None
            await until(lambda: a.pings >= 3, "three pings", timeout=10)
            assert engine.stats.total(PINGS) >= 3
            assert error_type(await c.call()) is None
            assert a.accepted == 1
            assert engine.stats.total(CLOSED, reason="heartbeat_timeout") == 0
            c.close()
        await a.close()

    run(main())


def test_a_busy_connection_is_not_pinged() -> None:
    """Replies arriving more often than ``interval``: no ping is sent (each reply is a
    message; the sweep reads when the last came from the kernel)."""

    async def main() -> None:
        a = await Upstream("a").start()
        config = mesh([(a.port, "v1")], proxy=heartbeat("300ms"), **PING)
        async with engine_for(config) as engine:
            c = await Client.connect(address(engine))
            loop = asyncio.get_running_loop()
            started = loop.time()
            while loop.time() - started < 1.2:  # four intervals, calls without pause
                assert error_type(await c.call()) is None
            assert a.pings == 0 and engine.stats.total(PINGS) == 0
            c.close()
        await a.close()

    run(main())


@pytest.mark.parametrize("codec", [PING, NO_PINGS], ids=["pings", "no-pings"])
def test_a_peer_that_answers_nothing_is_found(codec: dict[str, str]) -> None:
    """A peer that takes requests and pings and answers nothing (gone behind a NAT, say): its
    connection is aborted ``interval + timeout`` after the last reply, and the request
    waiting there gets ``UpstreamReset`` at once, not at its 30 s route timeout. Without
    pings (a codec that builds none) it waits for its timeout."""

    async def main() -> None:
        a = await Upstream("a").start()
        config = mesh([(a.port, "v1")], proxy=heartbeat("200ms", "300ms"), **codec)
        async with engine_for(config) as engine:
            c = await Client.connect(address(engine))
            assert error_type(await c.call()) is None
            a.mute = True
            hung = c.start("hang")
            if codec is PING:
                reply = await asyncio.wait_for(hung, 5)
                assert error_type(reply) == "UpstreamReset", reply.attributes
                assert "answered no heartbeat within 0.3s" in reply.attributes["error-message"]
                assert engine.stats.total(CLOSED, reason="heartbeat_timeout") == 1
            else:
                done, _ = await asyncio.wait([hung], timeout=1.5)
                assert not done and a.pings == 0
                assert engine.stats.total(CLOSED, reason="heartbeat_timeout") == 0
            c.close()
        await a.close()

    run(main())


def test_heartbeat_settings_are_read_and_checked() -> None:
    """``interval: 0s`` is off; the defaults are Apache Dubbo's 60 s; too short a value, or
    an unknown field, names the field."""
    text = mesh([(9, "v1")], **PING)
    assert loads_config(text).proxy.upstream_heartbeat.interval == 60.0
    off = loads_config(mesh([(9, "v1")], proxy=heartbeat("0s"), **PING))
    assert off.proxy.upstream_heartbeat.interval is None
    for proxy, field in (
        (heartbeat("50ms"), "interval"),
        (heartbeat("1s", "10ms"), "timeout"),
        ("upstream: {heartbeat: {every: 1s}}\n", "every"),
    ):
        with pytest.raises(ConfigError, match=rf"spec\.upstream\.heartbeat\.{field}"):
            loads_config(mesh([(9, "v1")], proxy=proxy, **PING))


def test_a_reload_changes_the_interval_of_open_connections() -> None:
    """Pings off at first; a reload turns them on for the connection already open."""

    async def main() -> None:
        a = await Upstream("a").start()
        async with engine_for(mesh([(a.port, "v1")], proxy=heartbeat("0s"), **PING)) as engine:
            c = await Client.connect(address(engine))
            assert error_type(await c.call()) is None
            on = mesh([(a.port, "v1")], proxy=heartbeat("200ms"), **PING)
            await engine.apply(loads_config(on))
            await until(lambda: a.pings >= 1, "a ping after the reload")
            assert a.accepted == 1
            c.close()
        await a.close()

    run(main())


def test_bytes_that_make_no_message_answer_no_ping() -> None:
    """A peer that trickles a reply a byte at a time, never finishing it (``timeouts.frame``
    set long, so that only the pings are left to find it): it is never quiet, yet no message
    arrives, so it is pinged and, answering nothing, aborted, as any HTTP/2 frame but no
    lone byte answers Envoy's keepalive. Its request gets ``UpstreamReset``."""

    async def main() -> None:
        a = await Upstream("a").start()
        proxy = heartbeat("200ms", "300ms") + "timeouts: {frame: 1h}\n"
        config = mesh([(a.port, "v1")], proxy=proxy, **PING)
        async with engine_for(config) as engine:
            c = await Client.connect(address(engine))
            assert error_type(await c.call()) is None
            a.mute = True
            hung = c.start("hang")
            frame = build_frame(RESPONSE, 999, {"k": "v"}, bytes(200))

            async def trickle() -> None:
                for byte in frame[:-1]:
                    a.send_all(bytes((byte,)))
                    await asyncio.sleep(0.02)

            trickling = asyncio.get_running_loop().create_task(trickle())
            reply = await asyncio.wait_for(hung, 4)
            assert error_type(reply) == "UpstreamReset", reply.attributes
            assert not trickling.done()  # found while it still trickled
            assert engine.stats.total(CLOSED, reason="heartbeat_timeout") == 1
            trickling.cancel()
            c.close()
        await a.close()

    run(main())


def test_a_peer_answering_pings_but_no_requests_is_kept() -> None:
    """Its answers to the pings are messages: the connection stays, and a request it never
    answers waits for its own (route) timeout."""

    async def main() -> None:
        a = await Upstream("a").start()
        config = mesh([(a.port, "v1")], proxy=heartbeat("200ms", "300ms"), **PING)
        async with engine_for(config) as engine:
            c = await Client.connect(address(engine))
            hung = c.start("hang")
            await until(lambda: a.pings >= 4, "four pings answered", timeout=10)
            assert not hung.done()
            assert engine.stats.total(CLOSED, reason="heartbeat_timeout") == 0
            assert a.accepted == 1
            c.close()
        await a.close()

    run(main())


def test_a_reload_shortening_the_interval_applies_to_open_connections() -> None:
    """Pings every 60 s at first; a reload to 200 ms pings the connection already open within
    a few sweeps, not a minute after its last message."""

    async def main() -> None:
        a = await Upstream("a").start()
        async with engine_for(mesh([(a.port, "v1")], proxy=heartbeat("60s"), **PING)) as engine:
            c = await Client.connect(address(engine))
            assert error_type(await c.call()) is None
            loop = asyncio.get_running_loop()
            (conn,) = engine.upstreams
            await until(lambda: conn.ping_due > loop.time() + 30, "its next look a minute on")
            on = mesh([(a.port, "v1")], proxy=heartbeat("200ms"), **PING)
            await engine.apply(loads_config(on))
            dumped = engine.config_dump()["settings"]["upstreamHeartbeat"]
            assert dumped == {"interval": 0.2, "timeout": 1.0}
            await until(lambda: a.pings >= 1, "a ping after the reload", timeout=5)
            c.close()
        await a.close()

    run(main())


@pytest.mark.parametrize("name", ["BrokenPingKVCodec", "EmptyPingKVCodec"])
def test_a_codec_that_builds_no_ping_is_reported_and_serves_on(name: str) -> None:
    """``heartbeat_request`` raising (a ``CodecError`` too: every id has a ping by the
    contract) or returning nothing: counted once as a codec bug for the connection, which
    sends no pings and serves on."""

    async def main() -> None:
        a = await Upstream("a").start()
        protocol = "kvbp" if name == "BrokenPingKVCodec" else "kvep"
        config = mesh(
            [(a.port, "v1")],
            proxy=heartbeat("100ms"),
            protocol=protocol,
            codec=f"proxy_test_codecs:{name}",
        )
        async with engine_for(config) as engine:
            c = await Client.connect(address(engine))
            assert error_type(await c.call()) is None
            bugs = "metaprotocol_codec_errors_total"
            await until(lambda: engine.stats.total(bugs, method="heartbeat_request"), "a report")
            assert error_type(await c.call()) is None
            assert a.pings == 0 and a.accepted == 1
            assert engine.stats.total(bugs, method="heartbeat_request") == 1
            c.close()
        await a.close()

    run(main())


def test_connections_quiet_together_are_due_apart() -> None:
    """Each connection's interval has up to 15 % added, drawn once for it (Envoy's keepalive
    ``interval_jitter``): twenty connections that heard their last message together are
    due over that span, not all in one sweep."""
    from metaprotocol_sdk.proxy.upstream import PING_JITTER

    async def main() -> None:
        a = await Upstream("a").start()
        config = mesh(
            [(a.port, "v1")], proxy=heartbeat("30s"), protocol="kvpd", codec=PER_CLIENT_PINGS
        )
        async with engine_for(config) as engine:
            clients = [await Client.connect(address(engine)) for _ in range(20)]
            for c in clients:
                assert error_type(await c.call()) is None
            conns = list(engine.upstreams)
            assert len(conns) == 20
            heard = engine.loop.time()
            for conn in conns:
                conn.heard, conn.heard_at, conn.ping_due = False, heard, 0.0
                conn.heartbeat_sweep(heard, 30.0, 1.0)  # not yet due: when it will be
            dues = sorted(conn.ping_due - heard for conn in conns)
            assert dues[0] >= 30.0 and dues[-1] <= 30.0 * (1 + PING_JITTER)
            assert dues[-1] - dues[0] > 0.2 * 30.0 * PING_JITTER  # spread, not one instant
            assert a.pings == 0
            for c in clients:
                c.close()
        await a.close()

    run(main())
