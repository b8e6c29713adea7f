"""Backpressure: a full upstream stops the engine reading from the clients that feed it."""

from __future__ import annotations

import asyncio

from proxy_kit import Client, Upstream, address, engine_for, gather, mesh, run

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
