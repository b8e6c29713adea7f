"""The ends of client connections under hostile peers, over real sockets on 127.0.0.1: a close
is bounded in time even when the client reads nothing, what a connection held is given back
once it is gone, and every request is counted once.

A client that reads nothing is a socket with a small ``SO_RCVBUF`` that is never read: the
kernel buffers on both sides fill (the engine's up to ``net.ipv4.tcp_wmem``, 4 MiB), and the
rest of the replies stays in the engine's transport.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from proxy_kit import (
    REQUEST,
    WAIT,
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

from metaprotocol_sdk.proxy import Engine, loads_config

MiB = 1024 * 1024
#: What the engine may still hold once everything is settled and gone.
SETTLED = 4096


def _closed(engine: Engine, reason: str) -> int:
    return engine.stats.total("metaprotocol_downstream_connections_closed_total", reason=reason)


async def _deaf_client(engine: Engine) -> socket.socket:
    """A connected client socket that will never be read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, address(engine))
    return sock


@pytest.mark.parametrize("end", ["half_close", "idle"])
def test_a_close_waiting_for_a_client_that_reads_nothing_is_bounded(end: str) -> None:
    """The engine closes a connection cleanly (the client half-closed and everything it sent
    is answered; or idle) while replies the client does not read are still unsent: a clean
    close waits until they are sent, which was forever. The connection stayed open with its
    bytes counted in the buffer budget, and no timeout looked at it again. Now it is reset
    ``timeouts.write`` after the close, counted as ``write_abandoned``."""
    proxy = (
        "timeouts: {write: 500ms, idle: 300ms}\n"
        # Never paused for writing: only the close is left to bound it.
        "limits: {connectionBufferBytes: 33554432, connectionBufferMaxBytes: 67108864}\n"
    )

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")], proxy=proxy)) as engine:
            loop = asyncio.get_running_loop()
            client = await _deaf_client(engine)
            frames = [
                build_frame(REQUEST, i, {"method": "big", "size": str(MiB)}) for i in range(1, 9)
            ]
            await loop.sock_sendall(client, b"".join(frames))
            if end == "half_close":
                client.shutdown(socket.SHUT_WR)
            await until(lambda: engine.pending == 0 and engine.downstreams, "8 replies queued")
            (down,) = engine.downstreams
            await until(lambda: down.closed, "the engine's close")
            assert down.unsent > MiB  # the kernel took what it could; the rest waits
            await until(lambda: not engine.downstreams, "the closing connection reset", 5)
            assert _closed(engine, "write_abandoned") == 1
            assert _closed(engine, "idle") == (1 if end == "idle" else 0)
            assert engine.stats.total("metaprotocol_requests_total", status="Ok") == 8
            await until(lambda: engine.buffered <= SETTLED, "its bytes given back")
            client.close()
        await up.close()

    run(main())


def test_stop_with_an_upstream_that_reads_nothing_settles_every_request() -> None:
    """At the drain deadline the upstream connections were closed cleanly, and a clean close
    waits until the upstream takes what is unsent: ``stop()`` returned with the connection
    still open and its request pending, never counted. Now they are reset, and the request,
    whose client was reset at the deadline too, is counted ``DownstreamClosed``."""

    async def main() -> None:
        backend = socket.socket()  # listens, never accepts: the kernel's backlog holds it
        backend.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        backend.bind(("127.0.0.1", 0))
        backend.listen()
        engine = Engine(loads_config(mesh([(backend.getsockname()[1], "v1")])))
        await engine.start()
        try:
            client = await Client.connect(address(engine))
            reply = client.start("put", body=b"b" * 6_000_000)  # more than the kernels take
            await until(lambda: any(u.unsent for u in engine.upstreams), "bytes left unsent")
            await asyncio.wait_for(engine.stop(drain=0.3), WAIT)
            assert not engine.upstreams and not engine.downstreams
            assert engine.pending == 0 and engine.buffered == 0
            name = "metaprotocol_requests_total"
            assert engine.stats.total(name) == engine.stats.total(name, status="DownstreamClosed")
            assert engine.stats.total(name) == 1
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reply, WAIT)
        finally:
            await engine.stop()
            backend.close()

    run(main())


def test_requests_in_flight_of_a_client_that_left_leave_the_buffer_budget() -> None:
    """A client sends a large request and resets its connection before the reply. The
    request was kept in flight (until its reply or its timeout) with its frame, counted in
    the buffer budget (the housekeeping sweep once forgot it, and the count went negative
    once it settled). Now it is given up when the client goes, and its frame leaves the
    budget at once; the sweeps that follow agree."""
    proxy = "timeouts: {frame: 400ms, route: 20s}\n"  # a sweep every 100 ms

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")], proxy=proxy)) as engine:
            other = await Client.connect(address(engine))
            leaving = await Client.connect(address(engine))
            leaving.start("hang", body=bytes(600_000))
            await up.wait_received(1)
            assert engine.pending == 1 and engine.buffered >= 600_000
            leaving.reset()
            await until(lambda: len(engine.downstreams) == 1, "the client gone")
            assert engine.pending == 0 and engine.buffered < 600_000
            for _ in range(2):  # two sweeps ran since: the recount happened
                sweep = engine._sweeper
                await until(lambda: engine._sweeper is not sweep, "a sweep")  # noqa: B023
            assert 0 <= engine.buffered <= SETTLED and not engine.departed
            engine.max_buffered = 500_000  # below what the request held
            assert error_type(await other.call()) is None
            name = "metaprotocol_requests_total"
            assert engine.stats.total(name, status="DownstreamClosed") == 1
            other.close()
        await up.close()

    run(main())


@pytest.mark.parametrize("pooling", ["shared", "dedicated"])
def test_connections_that_come_and_go_midway_leave_nothing_behind(pooling: str) -> None:
    """Bursts of clients that leave midway, half of them with a reset (``SO_LINGER`` 0), half
    with a FIN: during a request's frame, with requests in flight (answered later, large
    replies, never answered), after bytes the codec cannot read. Once their requests are
    settled the engine's tables and counts are back where they started, and every request is
    counted once."""
    codec = {"protocol": "kvnr", "codec": "proxy_test_codecs:NoRewriteKVCodec"}
    text = mesh(
        [(0, "v1")],  # the port is set below
        proxy="timeouts: {route: 500ms, frame: 400ms}\n",
        **(codec if pooling == "dedicated" else {}),
    )

    def frames(kind: int) -> bytes:
        def many(method: str, n: int, **headers: str) -> bytes:
            return b"".join(
                build_frame(REQUEST, i, {"method": method, **headers}) for i in range(1, n + 1)
            )

        return [
            many("slow", 3),
            build_frame(REQUEST, 1, {"method": "get"}, bytes(100_000))[:50_000],
            many("big", 3, size=str(MiB)),
            many("hang", 3),
            many("get", 1) + b"not a frame" * 4,
        ][kind % 5]

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(text.replace("svc: 0}", f"svc: {up.port}}}")) as engine:
            loop = asyncio.get_running_loop()
            gauge = engine.listeners[("svc.test", 9000)].active
            for _ in range(2):
                clients = [await _deaf_client(engine) for _ in range(30)]
                for i, client in enumerate(clients):
                    await loop.sock_sendall(client, frames(i))
                await up.wait_received(len(up.received) + 6 * 3)  # the slow ones, at least
                for i, client in enumerate(clients):
                    if i % 2:
                        client.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                    client.close()
                up.release.set()  # the slow ones are answered, to clients that left
                await until(lambda: not engine.downstreams, "every client gone")
                up.release.clear()
            await until(lambda: engine.pending == 0, "every request settled")
            await until(lambda: not engine.departed, "the sweep forgets the clients")
            assert 0 <= engine.buffered <= SETTLED and gauge.value == 0
            assert not engine.deadlines.waiting()
            assert all(not u.pending and not u.order for u in engine.upstreams)
            # Each request once: answered (a client that sent a FIN may have half-closed,
            # so it is still answered, timeouts included), or its client was gone.
            counted = {
                labels["status"]: series.value
                for series in engine.stats.counters("metaprotocol_requests_total")
                for labels in [dict(series.labels)]
            }
            assert set(counted) <= {"Ok", "DownstreamClosed", "Timeout"}, counted
            assert sum(counted.values()) == len(up.received)
        await up.close()

    run(main())


def test_stop_settles_requests_a_filter_holds_and_forgets_their_clients() -> None:
    """At the drain deadline a client whose request a filter holds (here a fault delay) is
    aborted, and its ``connection_lost`` (a loop turn later) puts it in ``departed``, the
    hold being still in flight. ``stop()`` cleared ``departed`` before those connections
    were gone: the connection and what it references stayed there for good, no sweep left to
    drop it. Now the clear comes once they are gone; the request is counted once."""
    router = """\
    - name: slow
      route: [{destination: {host: svc.test}}]
      fault: {delay: {fixedDelay: 30s}}
    """

    async def main() -> None:
        up = await Upstream("a").start()
        engine = Engine(loads_config(mesh([(up.port, "v1")], router=router)))
        await engine.start()
        try:
            client = await Client.connect(address(engine))
            reply = client.start("get")
            await until(lambda: engine.pending == 1, "the request held")
            await asyncio.wait_for(engine.stop(drain=0.1), WAIT)
            assert not engine.downstreams and not engine.departed
            assert engine.pending == 0 and engine.buffered == 0
            name = "metaprotocol_requests_total"
            assert engine.stats.total(name, status="DownstreamClosed") == 1
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reply, WAIT)
        finally:
            await engine.stop()
        await up.close()

    run(main())


@pytest.mark.parametrize("pooling", ["shared", "dedicated"])
def test_a_client_that_leaves_frees_its_pending_slots_at_once(pooling: str) -> None:
    """Clients that connect, send as many requests as the process takes and reset, one after
    another. Their requests stayed in flight until answered or timed out (the route's
    timeout, 30 s by default): a few such clients held every ``maxPendingRequests`` slot, and
    every well-behaved client got ``OverLimit`` meanwhile. Envoy resets a connection's
    streams when it closes; here too: the slots are freed when the client is gone, each
    request counted ``DownstreamClosed`` once, and a late reply is dropped and counted as
    unmatched."""
    codec = {"protocol": "kvnr", "codec": "proxy_test_codecs:NoRewriteKVCodec"}
    proxy = "limits: {maxPendingRequests: 20}\ntimeouts: {route: 60s}\n"
    text = mesh([(0, "v1")], proxy=proxy, **(codec if pooling == "dedicated" else {}))

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(text.replace("svc: 0}", f"svc: {up.port}}}")) as engine:
            good = await Client.connect(address(engine))
            for attack in range(3):
                leaving = await Client.connect(address(engine))
                calls = [leaving.start("slow") for _ in range(20)]
                await up.wait_received(20 * (attack + 1))
                assert engine.pending == 20
                assert error_type(await good.call()) == "OverLimit"  # every slot taken
                leaving.reset()
                await asyncio.gather(*calls, return_exceptions=True)
                await until(lambda: engine.pending == 0, "the slots freed", 5.0)
                assert error_type(await good.call()) is None
            name = "metaprotocol_requests_total"
            assert engine.stats.total(name, status="DownstreamClosed") == 60
            up.release.set()
            if pooling == "shared":  # the late replies: nobody waits for them any more
                unmatched = "metaprotocol_upstream_unmatched_replies_total"
                await until(lambda: engine.stats.total(unmatched) == 60, "the late replies")
            assert engine.stats.total(name, status="DownstreamClosed") == 60
            assert engine.stats.total(name, status="Ok") == 3
            assert not engine.deadlines.waiting() and 0 <= engine.buffered <= SETTLED
            good.close()
        await up.close()

    run(main())
