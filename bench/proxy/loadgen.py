"""Load generator: N connections, K requests in flight on each, fixed request frames.

    python bench/proxy/loadgen.py PROTOCOL HOST:PORT --connections N --inflight K
        --payload BYTES --warmup S --duration S [--idle N]

Prints ``MEASURE`` when the measured window starts and a JSON result line at its end
(requests, req/s, p50/p99 latency in microseconds, errors). ``--idle N`` instead opens N
connections, sends one request on each, prints ``IDLE`` and holds them until stdin closes.

    python bench/proxy/loadgen.py PROTOCOL HOST:PORT[,HOST:PORT...] --pids PID[,PID...]
        --slices N --slice S [--connections/--inflight/--payload/--warmup as above]

Slices: connections to every target are opened at once, but only one target is loaded at a
time, in short slices (``--slice`` seconds), the targets taking turns (forward, then backward
order, ``--slices`` rounds). Each slice ends when its requests in flight are answered; the CPU
time of the target's process (every thread, nanoseconds from ``/proc/PID/task/*/schedstat``) is
read at both ends. Runs compared this way are a second apart, so the load other tenants put on
a shared machine weighs on all targets alike. Prints one JSON line ``SLICES [...]``: per target,
requests, req/s, p50/p99, errors, CPU ns and the CPU per request of each slice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tls
from wire import REQUESTS, WIRES, Wire

#: A connection's protocol (:func:`connect` returns the one its factory made).
P = TypeVar("P", bound=asyncio.BaseProtocol)


class Stats:
    """Shared counters; latencies are recorded only inside the measured window."""

    def __init__(self) -> None:
        self.measuring = False
        self.done = 0
        self.latencies: list[int] = []
        self.errors = 0


class Client(asyncio.Protocol):
    """One connection keeping ``inflight`` requests outstanding."""

    def __init__(
        self, wire: Wire, request: bytes, inflight: int, stats: Stats, autostart: bool = True
    ) -> None:
        self.wire = wire
        id_at, id_size = wire.id_offset(request)
        self.head, self.tail, self.id_size = request[:id_at], request[id_at + id_size :], id_size
        self.inflight = inflight
        self.stats = stats
        self.sent: dict[int, int] = {}
        self.next_id = 1
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.stop = not autostart
        #: Set when stopped and every request sent has been answered (slices).
        self.drained = asyncio.Event()

    def _requests(self, n: int) -> bytes:
        now = time.perf_counter_ns()
        parts = []
        for _ in range(n):
            rid = self.next_id
            self.next_id = rid + 1 if rid < 0x7FFFFFF0 else 1
            self.sent[rid] = now
            parts += (self.head, rid.to_bytes(self.id_size, "big"), self.tail)
        return b"".join(parts)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's own class
        if not self.stop:
            self.start()

    def start(self) -> None:
        """Put ``inflight`` requests on the wire and keep them there until :attr:`stop`."""
        assert self.transport is not None
        self.stop = False
        self.drained.clear()
        self.transport.write(self._requests(self.inflight))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        wire, header = self.wire, self.wire.header_size
        stats = self.stats
        now = time.perf_counter_ns()
        pos, end, got = 0, len(buf), 0
        while end - pos >= header:
            size = wire.frame_size(buf, pos)
            if end - pos < size:
                break
            id_at, id_size = wire.id_offset(buf, pos)
            sent = self.sent.pop(int.from_bytes(buf[id_at : id_at + id_size], "big"), None)
            if sent is None or wire.is_error(buf, pos):
                stats.errors += 1
            elif stats.measuring:
                stats.done += 1
                stats.latencies.append(now - sent)
            got += 1
            pos += size
        if pos:
            del buf[:pos]
        if got and not self.stop and self.transport is not None:
            self.transport.write(self._requests(got))
        elif self.stop and not self.sent:
            self.drained.set()

    def busy(self) -> bool:
        """Whether a request sent awaits its reply."""
        return bool(self.sent)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stop:
            self.stats.errors += 1
        if not self.closed.done():
            self.closed.set_result(None)


async def connect(host: str, port: int, factory: Callable[[], P]) -> P:
    """Open one connection (retrying briefly on a full accept queue)."""
    loop = asyncio.get_running_loop()
    context = tls.client_context()
    server_name = tls.SERVER_NAME if context is not None else None
    for attempt in range(50):
        try:
            _, proto = await loop.create_connection(
                factory, host, port, ssl=context, server_hostname=server_name
            )
            return proto
        except OSError:
            if attempt == 49:
                raise
            await asyncio.sleep(0.02)
    raise AssertionError("unreachable")


def percentile(values: list[int], q: float) -> float:
    """The ``q`` quantile in microseconds."""
    if not values:
        return 0.0
    values.sort()
    return values[min(len(values) - 1, int(q * len(values)))] / 1000


async def run(args: argparse.Namespace) -> None:
    """Drive the load and print the result."""
    host, _, port_text = args.target.rpartition(":")
    port = int(port_text)
    wire = WIRES[args.protocol]
    request = REQUESTS[args.protocol](args.payload)
    stats = Stats()
    if args.idle:
        clients = [
            await connect(host, port, lambda: Client(wire, request, 1, stats))
            for _ in range(args.idle)
        ]
        for client in clients:
            client.stop = True
        print("IDLE", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        return
    clients = await asyncio.gather(
        *(
            connect(host, port, lambda: Client(wire, request, args.inflight, stats))
            for _ in range(args.connections)
        )
    )
    await asyncio.sleep(args.warmup)
    stats.measuring = True
    print("MEASURE", flush=True)
    start = time.perf_counter()
    await asyncio.sleep(args.duration)
    stats.measuring = False
    elapsed = time.perf_counter() - start
    for client in clients:
        client.stop = True
    result = {
        "requests": stats.done,
        "rps": stats.done / elapsed,
        "p50_us": percentile(stats.latencies, 0.50),
        "p99_us": percentile(stats.latencies, 0.99),
        "errors": stats.errors,
    }
    print("RESULT " + json.dumps(result), flush=True)
    for client in clients:
        if client.transport is not None:
            client.transport.close()


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in nanoseconds (0 for pid 0)."""
    if not pid:
        return 0
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        path = f"/proc/{pid}/task/{task}/schedstat"
        with contextlib.suppress(OSError), open(path) as f:  # OSError: the thread just exited
            total += int(f.read().split()[0])
    return total


class Loaded(Protocol):
    """What a slice needs of a connection (:class:`Client`, and ``kvstreams.py``'s)."""

    stop: bool
    drained: asyncio.Event
    transport: asyncio.Transport | None

    def start(self) -> None:
        """Put load on the connection until ``stop`` is set."""

    def busy(self) -> bool:
        """Whether something sent awaits its answer."""


class Target:
    """One target of a slices run: its connections and what its slices measured."""

    def __init__(self, clients: Sequence[Loaded], stats: Stats, pid: int) -> None:
        self.clients = clients
        self.stats = stats
        self.pid = pid
        self.elapsed = 0.0
        self.cpu = 0
        self.per_slice: list[float] = []

    async def slice(self, seconds: float, measure: bool) -> None:
        """Load this target for ``seconds``, then wait until it answered everything sent."""
        stats = self.stats
        before = stats.done
        stats.measuring = measure
        cpu = cpu_ns(self.pid)
        start = time.perf_counter()
        for client in self.clients:
            client.start()
        await asyncio.sleep(seconds)
        for client in self.clients:
            client.stop = True
        await asyncio.wait_for(
            asyncio.gather(*(c.drained.wait() for c in self.clients if c.busy())), 30
        )
        elapsed = time.perf_counter() - start
        used = cpu_ns(self.pid) - cpu
        stats.measuring = False
        if measure:
            self.elapsed += elapsed
            self.cpu += used
            done = stats.done - before
            if done and self.pid:
                self.per_slice.append(used / 1000 / done)


async def run_slices(args: argparse.Namespace) -> None:
    """Take turns loading every target; print per-target totals and per-slice CPU."""
    wire = WIRES[args.protocol]
    request = REQUESTS[args.protocol](args.payload)
    addresses = args.target.split(",")
    pids = [int(p) for p in args.pids.split(",")]
    if len(pids) != len(addresses):
        raise SystemExit("--pids needs one pid (0 for none) per target")
    targets = []
    for address, pid in zip(addresses, pids, strict=True):
        host, _, port = address.rpartition(":")
        stats = Stats()

        def factory(stats: Stats = stats) -> Client:
            return Client(wire, request, args.inflight, stats, autostart=False)

        clients = await asyncio.gather(
            *(connect(host, int(port), factory) for _ in range(args.connections))
        )
        targets.append(Target(list(clients), stats, pid))
    await take_turns(targets, args)


async def take_turns(targets: list[Target], args: argparse.Namespace) -> None:
    """A warm-up slice each, then ``args.slices`` rounds of turns (forward, then backward);
    print per-target totals and per-slice CPU as ``SLICES [...]``; close the connections."""
    for t in targets:
        await t.slice(args.warmup, measure=False)
    print("MEASURE", flush=True)
    for n in range(args.slices):
        for t in targets if n % 2 == 0 else reversed(targets):
            await t.slice(args.slice, measure=True)
    result = [
        {
            "requests": t.stats.done,
            "rps": t.stats.done / t.elapsed if t.elapsed else 0.0,
            "p50_us": percentile(t.stats.latencies, 0.50),
            "p99_us": percentile(t.stats.latencies, 0.99),
            "errors": t.stats.errors,
            "cpu_ns": t.cpu,
            "cpu_us_per_slice": t.per_slice,
        }
        for t in targets
    ]
    print("SLICES " + json.dumps(result), flush=True)
    for t in targets:
        for client in t.clients:
            if client.transport is not None:
                client.transport.close()


def main() -> None:
    """Entry point."""
    import uvloop

    parser = argparse.ArgumentParser()
    parser.add_argument("protocol", choices=sorted(WIRES))
    parser.add_argument("target")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--inflight", type=int, default=1)
    parser.add_argument("--payload", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--idle", type=int, default=0)
    parser.add_argument("--pids", help="slices: the process id of each target (0: none)")
    parser.add_argument("--slices", type=int, default=0, help="slices: rounds of turns")
    parser.add_argument("--slice", type=float, default=0.5, help="slices: seconds per turn")
    args = parser.parse_args()
    uvloop.run(run_slices(args) if args.slices else run(args))


if __name__ == "__main__":
    main()
