"""Red team: one peer's flood of tiny frames cannot keep the event loop from the others, over
real sockets on 127.0.0.1: frames are decoded a bounded number at a time, then the loop
serves everything else before the rest."""

from __future__ import annotations

import asyncio
import socket

from proxy_kit import PING, RESPONSE, Client, Upstream, address, build_frame, engine_for, mesh, run
from test_streams import StreamClient, StreamServer

from metaprotocol_sdk import Metadata
from metaprotocol_sdk.examples.kv import STREAM_OPEN, KVCodec
from metaprotocol_sdk.proxy.downstream import DECODE_TURN


def test_a_client_pipelining_tiny_frames_takes_turns_with_the_others() -> None:
    """A client that sends 100 000 heartbeats at once (1.6 MB, read by uvloop up to 32 times
    256 KiB in a row) had them all answered within one turn of the event loop: over a second
    while every other connection waited (a well-behaved client got one reply in 4 s under such
    a flood). Now at most ``DECODE_TURN`` frames of one client are decoded at a time, and the
    rest of its read waits, reading paused, for the next turn (which may finish it and read
    again: twice that per turn at most); every heartbeat is still answered."""
    total = 100_000

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")])) as engine:
            loop = asyncio.get_running_loop()
            heartbeats = next(iter(engine.listeners.values())).heartbeats
            flood = socket.socket()
            flood.setblocking(False)
            await loop.sock_connect(flood, address(engine))
            answered = 0

            async def read_pongs() -> None:
                nonlocal answered
                while answered < total * 16:  # each pong is a 16-byte frame
                    data = await loop.sock_recv(flood, 1 << 20)
                    assert data, "closed"
                    answered += len(data)

            reading = loop.create_task(read_pongs())
            most = 0  # heartbeats answered in one turn of the loop, at most
            last = heartbeats.value
            done = loop.create_future()

            def tick() -> None:
                nonlocal most, last
                now = heartbeats.value
                most, last = max(most, now - last), now
                if now >= total:
                    done.set_result(None)
                else:
                    loop.call_soon(tick)

            loop.call_soon(tick)
            await loop.sock_sendall(flood, build_frame(PING, 1) * total)
            await asyncio.wait_for(done, 30)
            await asyncio.wait_for(reading, 10)
            assert most <= 2 * DECODE_TURN, f"{most} heartbeats answered in one turn"
            flood.close()
        await up.close()

    run(main(), timeout=60)


class _PingFlood(asyncio.Protocol):
    """An upstream that answers the first request with a flood of heartbeats, then the reply."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.buffer: bytearray | None = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.buffer is None:
            return  # the engine's answers to the heartbeats
        self.buffer += data
        message = KVCodec().decode(self.buffer)
        if isinstance(message, Metadata):
            self.buffer = None
            reply = build_frame(RESPONSE, message.request_id, {"server": "flood"})
            self.transport.write(build_frame(PING, 7) * self.total + reply)  # type: ignore[attr-defined]


def test_an_upstream_flooding_tiny_frames_takes_turns_with_the_others() -> None:
    """The same from an upstream: 100 000 heartbeats written at once were all answered
    within one turn of the loop. Now ``DECODE_TURN`` at a time, and the reply that follows
    them reaches its client."""
    total = 100_000

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _PingFlood(total), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with engine_for(mesh([(port, "v1")])) as engine:
            client = await Client.connect(address(engine))
            counted = 0
            most = 0
            done = loop.create_future()

            def heartbeats() -> int:
                return engine.stats.total("metaprotocol_heartbeats_total", side="upstream")

            def tick() -> None:
                nonlocal most, counted
                now = heartbeats()
                most, counted = max(most, now - counted), now
                if now >= total:
                    done.set_result(None)
                else:
                    loop.call_soon(tick)

            loop.call_soon(tick)
            reply = await client.call()
            await asyncio.wait_for(done, 30)
            assert reply.attributes["server"] == "flood"
            assert most <= 2 * DECODE_TURN, f"{most} heartbeats answered in one turn"
            client.close()
        server.close()
        await server.wait_closed()

    run(main(), timeout=60)


def test_a_stream_upstream_flooding_tiny_frames_takes_turns_with_the_others() -> None:
    """The same on a stream's connection: 100 000 ``Stream_Data`` frames written at once
    were all passed on within one turn of the loop. Now ``DECODE_TURN`` at a time, and the
    client gets every frame, in order."""
    total = 100_000

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await StreamServer("v1").start()
        async with engine_for(mesh([(server.port, "v1")])) as engine:
            client = await StreamClient.connect(address(engine))
            counted = 0
            most = 0
            done = loop.create_future()

            def frames() -> int:
                return engine.stats.total("metaprotocol_stream_frames_total", side="upstream")

            def tick() -> None:
                nonlocal most, counted
                now = frames()
                most, counted = max(most, now - counted), now
                if now >= total + 1:
                    done.set_result(None)
                else:
                    loop.call_soon(tick)

            loop.call_soon(tick)
            client.frame(STREAM_OPEN, 3, {"method": "ticks", "count": str(total)})
            await asyncio.wait_for(done, 30)
            got = await client.until(3, total + 1)
            assert [int(f.attributes["n"]) for f in got[:total]] == list(range(total))
            assert most <= 2 * DECODE_TURN, f"{most} frames passed on in one turn"
            client.close()
        await server.close()

    run(main(), timeout=60)
