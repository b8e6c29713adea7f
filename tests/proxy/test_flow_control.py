"""Backpressure: a full upstream stops the engine reading from the clients that feed it."""

from __future__ import annotations

import asyncio

import uvloop
from proxy_kit import Client, Upstream, address, engine_for, gather, mesh, run, wire_fakes

from metaprotocol_sdk.examples.kv import REQUEST, build_frame
from metaprotocol_sdk.proxy import Engine, loads_config

BODY = b"x" * (256 * 1024)


def test_slow_upstream_pauses_the_client() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        up.reading_paused = True  # the upstream accepts but does not read
        async with engine_for(mesh([(up.port, "v1")])) as engine:
            c = await Client.connect(address(engine))
            futures = []
            # Without flow control the engine would read (and buffer) all 100 MiB.
            while not c.write_paused.is_set() and len(futures) < 400:
                futures.append(c.start("get", body=BODY))
                await asyncio.sleep(0)  # let the transports move bytes
            assert c.write_paused.is_set(), "client never saw backpressure"
            assert any(d.reading_paused for d in engine.downstreams)
            up.resume_reading()
            replies = await gather(*futures)
            assert [r.request_id for r in replies] == list(range(1, len(futures) + 1))
            assert all(bytes(r.body) == BODY for r in replies[:3])
            assert not any(d.reading_paused for d in engine.downstreams)
            c.close()
        await up.close()

    run(main(), timeout=30)


def test_client_not_reading_stops_its_requests() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")])) as engine:
            c = await Client.connect(address(engine))
            assert c.transport is not None
            c.transport.pause_reading()  # responses pile up in the engine's write buffer
            futures = []
            while not c.write_paused.is_set() and len(futures) < 400:
                futures.append(c.start("get", body=BODY))
                await asyncio.sleep(0)
            assert c.write_paused.is_set(), "client never saw backpressure"
            (down,) = engine.downstreams
            assert down.write_paused and down.reading_paused
            received = len(up.received)
            assert received < len(futures)  # the engine stopped taking requests
            c.transport.resume_reading()
            replies = await gather(*futures)
            assert len(replies) == len(futures) == len(up.received)
            c.close()
        await up.close()

    run(main(), timeout=30)


def test_the_frame_timeout_does_not_count_while_the_engine_waits_for_a_full_upstream() -> None:
    """A client's partial frame waits while the engine stopped reading it because an upstream
    connection is full: that wait is the engine's, not the client's, and does not close it with
    ``frame_timeout`` (it used to). Driven on fake wires with the sweep's clock given."""

    async def main() -> None:
        engine = Engine(loads_config(mesh([(1, "v1")], proxy="timeouts: {frame: 1s}\n")))
        await engine.start()
        try:
            down, _, up, _ = wire_fakes(engine)
            up.pause_writing()  # the upstream connection is full
            second = build_frame(REQUEST, 2, {"method": "m"}, b"y" * 100)
            down.data_received(build_frame(REQUEST, 1, {"method": "m"}) + second[:30])
            assert down.blocked and down.partial_since  # waits, with half a frame held
            now = engine.loop.time()
            down.sweep(now + 10.0)  # ten frame timeouts, all spent waiting for the upstream
            assert not down.closed
            up.resume_writing()
            assert not down.blocked
            down.sweep(engine.loop.time() + 0.5)  # the client's own clock: within the timeout
            assert not down.closed
            down.sweep(engine.loop.time() + 2.0)  # and past it: still enforced
            assert down.closed
            name = "metaprotocol_downstream_connections_closed_total"
            assert engine.stats.total(name, reason="frame_timeout") == 1
        finally:
            await engine.stop(drain=0.1)

    uvloop.run(main())
