"""The soak's traffic: well-behaved Dubbo clients, or one kind of attacker (loopback only).

    python bench/proxy/soakload.py clients HOST:PORT --duration S [--clients N] [--medium N]
        [--pause MS] [--timeout S]
    python bench/proxy/soakload.py attack KIND HOST:PORT --duration S [--scale X]

``clients``: ``--clients`` closed-loop connections (``--medium`` of them with a 16 KiB argument,
the rest 16 B), each waiting ``--pause`` milliseconds between a reply and its next request.
Prints ``RESULT {json}``: requests answered, p50/p99/max latency (microseconds, send to reply),
errors by kind (error replies, timeouts, connections lost, failed connects), own CPU seconds.

``attack KIND`` (see :data:`ATTACKS`): opens its connections, keeps them doing the one thing it
does, reopens a connection the engine closed, and stops by itself after ``--duration`` seconds
or when it has opened its bounded number of connections, whichever comes first. Prints
``RESULT {json}``: connections opened, closed by the engine, failed to connect, bytes sent,
replies read, own CPU seconds. Every address is 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from wire import DUBBO, dubbo_request

TCP_ESTABLISHED = 1
MiB = 1 << 20


# --- well-behaved clients ------------------------------------------------------------------


@dataclass
class ClientStats:
    """What the well-behaved clients saw."""

    ok: int = 0
    error_replies: int = 0
    timeouts: int = 0
    lost: int = 0
    connect_failed: int = 0
    #: The slowest reply: its latency (ns) and when it came (perf_counter_ns).
    slowest: tuple[int, int] = (0, 0)


class GoodClient(asyncio.Protocol):
    """One request in flight; the next one ``pause`` seconds after the reply."""

    def __init__(self, request: bytes, pause: float, stats: ClientStats, lat: list[int]) -> None:
        self.head, self.tail = request[:4], request[12:]
        self.pause, self.stats, self.lat = pause, stats, lat
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.next_id = 1
        self.sent_at = 0  # perf_counter_ns of the request in flight, 0 when none
        self.stopping = False
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send()

    def send(self) -> None:
        if self.stopping or self.transport is None or self.transport.is_closing():
            return
        self.next_id += 1
        self.sent_at = time.perf_counter_ns()
        self.transport.write(self.head + self.next_id.to_bytes(8, "big") + self.tail)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        buf = self.buf
        while len(buf) >= 16 and len(buf) >= DUBBO.frame_size(buf, 0):
            size = DUBBO.frame_size(buf, 0)
            rid = int.from_bytes(buf[4:12], "big")
            if DUBBO.is_error(buf, 0) or rid != self.next_id or not self.sent_at:
                self.stats.error_replies += 1
            else:
                self.stats.ok += 1
                now = time.perf_counter_ns()
                self.lat.append(now - self.sent_at)
                if now - self.sent_at > self.stats.slowest[0]:
                    self.stats.slowest = (now - self.sent_at, now)
            self.sent_at = 0
            del buf[:size]
            asyncio.get_running_loop().call_later(self.pause, self.send)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stopping:
            self.stats.lost += 1
        if not self.lost.done():
            self.lost.set_result(None)


async def keep_client(
    host: str,
    port: int,
    request: bytes,
    args: argparse.Namespace,
    stats: ClientStats,
    lat: list[int],
    deadline: float,
) -> None:
    """Run one client until ``deadline``, reconnecting after a loss or a timed-out request."""
    loop = asyncio.get_running_loop()
    timeout_ns = int(args.timeout * 1e9)
    while time.monotonic() < deadline:
        try:
            _, client = await loop.create_connection(
                lambda: GoodClient(request, args.pause / 1000, stats, lat), host, port
            )
        except OSError:
            stats.connect_failed += 1
            await asyncio.sleep(0.1)  # pacing reconnects, not synchronisation
            continue
        assert isinstance(client, GoodClient)
        while time.monotonic() < deadline and not client.lost.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(client.lost), 0.25)
            if client.sent_at and time.perf_counter_ns() - client.sent_at > timeout_ns:
                stats.timeouts += 1
                client.stopping = True
                break
        client.stopping = True
        if client.transport is not None:
            client.transport.close()


def percentile_us(values: list[int], q: float) -> float:
    """The ``q`` quantile of nanosecond ``values``, in microseconds (sorted in place)."""
    if not values:
        return 0.0
    values.sort()
    return values[min(len(values) - 1, int(q * len(values)))] / 1000


async def run_clients(args: argparse.Namespace) -> None:
    """Drive the well-behaved clients and print what they saw."""
    host, _, port = args.target.rpartition(":")
    stats, lat = ClientStats(), []
    small, medium = dubbo_request(16), dubbo_request(16 << 10)
    deadline = time.monotonic() + args.duration
    start = time.perf_counter_ns() / 1e9  # the clock of ClientStats.slowest
    await asyncio.gather(
        *(
            keep_client(
                host, int(port), medium if i < args.medium else small, args, stats, lat, deadline
            )
            for i in range(args.clients)
        )
    )
    elapsed = time.perf_counter_ns() / 1e9 - start
    result = {
        **{k: v for k, v in asdict(stats).items() if k != "slowest"},
        "rps": stats.ok / elapsed,
        "p50_us": percentile_us(lat, 0.50),
        "p99_us": percentile_us(lat, 0.99),
        "max_us": lat[-1] / 1000 if lat else 0.0,
        # seconds from the start of the window to the end of the slowest request
        "max_at_s": (stats.slowest[1] / 1e9 - start) if stats.slowest[1] else 0.0,
        "cpu_s": time.process_time(),
    }
    print("RESULT " + json.dumps(result), flush=True)


# --- attackers ----------------------------------------------------------------------------


@dataclass
class AttackStats:
    """What one attacker did and saw."""

    opened: int = 0
    closed_by_engine: int = 0
    #: Closed by the attacker itself (the non-reader, which cannot see the engine's close
    #: behind the replies it does not read, gives up on a connection after a while).
    recycled: int = 0
    connect_failed: int = 0
    sent_bytes: int = 0
    replies_ok: int = 0
    replies_error: int = 0
    max_open: int = 0


def alive(sock: socket.socket) -> bool:
    """Whether the engine has neither closed nor reset this connection (TCP state, no read)."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == TCP_ESTABLISHED
    except OSError:
        return False


class Attack:
    """Keeps up to ``conns`` connections doing one thing; at most ``max_opens`` in all."""

    tick = 0.5  #: seconds between two rounds over the connections
    reopen_every = 1.0  #: seconds between two rounds of reopening lost connections

    def __init__(self, host: str, port: int, conns: int, max_opens: int) -> None:
        self.addr = (host, port)
        self.conns, self.max_opens = conns, max_opens
        self.socks: dict[socket.socket, int] = {}  # socket -> per-connection progress
        self.stats = AttackStats()

    def open(self) -> socket.socket | None:
        """One new connection, blocking connect (loopback), then non-blocking."""
        self.stats.opened += 1
        try:
            sock = socket.create_connection(self.addr, timeout=2)
        except OSError:
            self.stats.connect_failed += 1
            return None
        sock.setblocking(False)
        return sock

    def started(self, sock: socket.socket) -> None:
        """What a new connection does first."""

    def fill(self, deadline: float) -> None:
        """Open connections up to ``conns``, within ``max_opens`` and the deadline."""
        while len(self.socks) < self.conns and self.stats.opened < self.max_opens:
            sock = self.open()
            if sock is not None:
                self.socks[sock] = 0
                self.started(sock)
            if time.monotonic() >= deadline:
                break

    def step(self, sock: socket.socket) -> bool | None:
        """What an open connection does on each tick; ``False`` closes it."""
        return None

    def lost(self, sock: socket.socket) -> None:
        """Forget what was kept about a connection the engine closed."""

    def send(self, sock: socket.socket, data: bytes | memoryview) -> int:
        """Send what the socket takes now; the count of bytes taken."""
        try:
            n = sock.send(data)
        except BlockingIOError:
            return 0
        except OSError:
            return -1
        self.stats.sent_bytes += n
        return n

    def run(self, duration: float) -> AttackStats:
        """Until ``duration`` has passed or every allowed connection has been opened and lost."""
        deadline = time.monotonic() + duration
        reopen_at = 0.0
        try:
            while time.monotonic() < deadline:
                for sock in [s for s in self.socks if not alive(s)]:
                    self.stats.closed_by_engine += 1
                    del self.socks[sock]
                    self.lost(sock)
                    sock.close()
                if time.monotonic() >= reopen_at:
                    reopen_at = time.monotonic() + self.reopen_every
                    self.fill(deadline)
                if not self.socks and self.stats.opened >= self.max_opens:
                    break
                self.stats.max_open = max(self.stats.max_open, len(self.socks))
                for sock in list(self.socks):
                    if self.step(sock) is False:
                        self.stats.recycled += 1
                        del self.socks[sock]
                        self.lost(sock)
                        sock.close()
                time.sleep(self.tick)  # the attack's own pace
        finally:
            for sock in self.socks:
                sock.close()
        return self.stats


class NonReader(Attack):
    """Asks for 64 replies of 1 MiB (method ``big``) and never reads them.

    The engine's close sits behind the unread replies, so this side cannot see it: each
    connection is given up ``hold`` seconds after its requests went out (longer than the
    engine's default write timeout, 30 s) and a new one opened; the engine's counters say how
    it ended.
    """

    hold = 35.0

    def __init__(self, host: str, port: int, scale: float) -> None:
        conns = max(1, int(4 * scale))
        super().__init__(host, port, conns=conns, max_opens=conns * 100)
        self.requests = b"".join(dubbo_request(16, i, "big") for i in range(1, 65))
        self.sent_at: dict[socket.socket, float] = {}

    def open(self) -> socket.socket | None:
        sock = super().open()
        if sock is not None:  # a small receive window, so the replies back up in the engine
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        return sock

    def step(self, sock: socket.socket) -> bool | None:
        done = self.socks[sock]
        if done < len(self.requests):
            n = self.send(sock, self.requests[done:])
            self.socks[sock] = done = done + max(n, 0)
            if done >= len(self.requests):
                self.sent_at[sock] = time.monotonic()
            return None
        return time.monotonic() - self.sent_at[sock] < self.hold

    def lost(self, sock: socket.socket) -> None:
        self.sent_at.pop(sock, None)


class Slowloris(Attack):
    """Sends a valid request one byte a second, then the next one, and so on."""

    tick = 1.0

    def __init__(self, host: str, port: int, scale: float) -> None:
        conns = max(1, int(200 * scale))
        super().__init__(host, port, conns=conns, max_opens=conns * 20)
        self.frame = dubbo_request(16)

    def step(self, sock: socket.socket) -> bool | None:
        done = self.socks[sock]
        if self.send(sock, self.frame[done : done + 1]) == 1:
            self.socks[sock] = (done + 1) % len(self.frame)
        return None


class LargeFrames(Attack):
    """Sends all but the last byte of a frame just under the 8 MiB maximum, then holds it."""

    def __init__(self, host: str, port: int, scale: float) -> None:
        conns = max(1, int(20 * scale))
        super().__init__(host, port, conns=conns, max_opens=conns * 30)
        body = 8 * MiB - 1024
        head = struct.pack(">HBBqI", 0xDABB, 0xC2, 0, 1, body)
        self.partial = memoryview(head + b"\x00" * (body - 1))

    def step(self, sock: socket.socket) -> bool | None:
        done = self.socks[sock]
        if done < len(self.partial):
            n = self.send(sock, self.partial[done : done + 4 * MiB])
            self.socks[sock] = done + max(n, 0)
        return None


class Pipeliner(Attack):
    """One connection with 5000 requests to a slow upstream (method ``slow``) in flight."""

    tick = 0.1
    count = 5000

    def __init__(self, host: str, port: int, scale: float) -> None:
        super().__init__(host, port, conns=1, max_opens=int(20 * scale) + 1)
        self.burst = b"".join(dubbo_request(16, i, "slow") for i in range(1, self.count + 1))
        self.pending: dict[socket.socket, bytearray] = {}
        self.answered: dict[socket.socket, int] = {}

    def started(self, sock: socket.socket) -> None:
        self.pending[sock] = bytearray()
        self.answered[sock] = 0

    def lost(self, sock: socket.socket) -> None:
        del self.pending[sock], self.answered[sock]

    def step(self, sock: socket.socket) -> bool | None:
        done = self.socks[sock]
        if done < len(self.burst):
            self.socks[sock] = done + max(self.send(sock, self.burst[done:]), 0)
        buf = self.pending[sock]
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := sock.recv(1 << 16):
                buf += chunk
        while len(buf) >= 16 and len(buf) >= DUBBO.frame_size(buf, 0):
            if DUBBO.is_error(buf, 0):
                self.stats.replies_error += 1
            else:
                self.stats.replies_ok += 1
            self.answered[sock] += 1
            del buf[: DUBBO.frame_size(buf, 0)]
        if self.answered[sock] >= self.count:  # every request answered: the next burst
            self.socks[sock], self.answered[sock] = 0, 0
        return None


class IdleFlood(Attack):
    """Opens connections that never send anything."""

    tick = 1.0

    def __init__(self, host: str, port: int, scale: float) -> None:
        conns = max(1, int(1000 * scale))
        super().__init__(host, port, conns=conns, max_opens=conns * 3)


ATTACKS: dict[str, Callable[[str, int, float], Attack]] = {
    "nonreader": NonReader,
    "slowloris": Slowloris,
    "large-frames": LargeFrames,
    "pipeliner": Pipeliner,
    "idle-flood": IdleFlood,
}


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    clients = sub.add_parser("clients")
    clients.add_argument("target")
    clients.add_argument("--duration", type=float, required=True)
    clients.add_argument("--clients", type=int, default=8)
    clients.add_argument("--medium", type=int, default=2)
    clients.add_argument("--pause", type=float, default=2.0, help="ms between reply and request")
    clients.add_argument("--timeout", type=float, default=5.0)
    attack = sub.add_parser("attack")
    attack.add_argument("kind", choices=sorted(ATTACKS))
    attack.add_argument("target")
    attack.add_argument("--duration", type=float, required=True)
    attack.add_argument("--scale", type=float, default=1.0, help="multiplies connection counts")
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    if host != "127.0.0.1":
        raise SystemExit("loopback only: the target must be 127.0.0.1:PORT")
    if args.mode == "clients":
        import uvloop

        uvloop.run(run_clients(args))
        return
    stats = ATTACKS[args.kind](host, int(port), args.scale).run(args.duration)
    print("RESULT " + json.dumps({**asdict(stats), "cpu_s": time.process_time()}), flush=True)


if __name__ == "__main__":
    main()
