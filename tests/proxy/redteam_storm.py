"""A combination storm: do the stats agree with what the clients saw while everything happens
at once?

Run: ``.venv/bin/python tests/proxy/redteam_storm.py [SEED] [--resets] [--retry]``. An engine
in this process serves 14 clients (18 with ``--resets``) that pipeline 120 requests each over
two upstreams that answer at once, late, never, twice, with a stray id first, a byte at a
time, with an error, with 300 KB, or drop the connection; meanwhile the configuration is
reloaded every 10 ms, flipping the route's name, timeout, subset and the cluster's
``maxConcurrentStreams`` (so requests wait for room across the reloads). Clients: 8 read
everything, 4 half-close once they sent their requests, 2 send every tenth request a byte at a
time (slowloris), and with ``--resets`` 4 reset halfway. ``--retry`` gives the route retries.

Printed: the longest event loop stall, every client that missed a reply or got one twice or
for an id it never sent (``BAD``), what the clients saw against ``metaprotocol_requests_total``
by status (with ``--resets``, only the totals: a reset client sees nothing of its last
replies).

The engine is the one of the tree this script is in (it runs from the tree's root).
"""

from __future__ import annotations

import asyncio
import collections
import random
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_kit import address, mesh, run, until

from metaprotocol_sdk import Metadata
from metaprotocol_sdk.examples.kv import ERROR, REQUEST, RESPONSE, KVCodec, build_frame
from metaprotocol_sdk.proxy import Engine, loads_config

SEED = int(next((a for a in sys.argv[1:] if a.isdigit()), "1"))
RESETS = "--resets" in sys.argv
RETRY = "--retry" in sys.argv
rng = random.Random(SEED)
METHODS = ["get"] * 6 + ["delay"] * 3 + ["hang", "close", "drip", "dup", "ghost", "fail", "big"]
PER_CLIENT = 120


class Server(asyncio.Protocol):
    """An upstream whose behaviour each request's method picks."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.codec = KVCodec()
        self.buffer = bytearray()
        self.drips: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while isinstance(message := self.codec.decode(self.buffer), Metadata):
            self.on_request(message)

    def reply(self, rid: int, kind: int = RESPONSE, size: int = 0) -> bytes:
        return build_frame(kind, rid, {"server": self.name}, bytes(size))

    def on_request(self, message: Metadata) -> None:
        if message.message_type.name != "Request":
            return
        method, rid, t = message.operation_name, message.request_id, self.transport
        loop = asyncio.get_running_loop()
        if method == "hang":
            return
        if method == "close":
            t.close()
        elif method == "delay":
            frame = self.reply(rid)
            loop.call_later(rng.random() * 0.15, lambda: t.is_closing() or t.write(frame))
        elif method == "drip":
            task = loop.create_task(self.drip(self.reply(rid)))
            self.drips.add(task)
            task.add_done_callback(self.drips.discard)
        elif method == "dup":
            t.write(self.reply(rid) * 2)
        elif method == "ghost":
            t.write(self.reply(rid + 50000) + self.reply(rid))
        elif method == "fail":
            t.write(self.reply(rid, ERROR))
        elif method == "big":
            t.write(self.reply(rid, size=300_000))
        else:
            t.write(self.reply(rid))

    async def drip(self, data: bytes) -> None:
        for i in range(len(data)):
            if self.transport.is_closing():
                return
            self.transport.write(data[i : i + 1])
            await asyncio.sleep(0)


def config(ports: list[int], flip: bool) -> str:
    retries = "  retries: {attempts: 2, perTryTimeout: 150ms, retryOn: 'reset,timeout'}\n"
    router = (
        f"- name: {'ra' if flip else 'rb'}\n"
        f"  route: [{{destination: {{host: svc.test, subset: {'v1' if flip else 'v2'}}}}}]\n"
        f"  timeout: {'300ms' if flip else '450ms'}\n" + (retries if RETRY else "")
    )
    policy = f"{{connectionPool: {{http: {{maxConcurrentStreams: {3 if flip else 5}}}}}}}"
    proxy = "limits: {maxPendingRequestsPerConnection: 60}\n"
    endpoints = [(ports[0], "v1"), (ports[1], "v2")]
    return mesh(endpoints, router=router, traffic_policy=policy, proxy=proxy)


def outcome(message: Metadata) -> str:
    """A reply's status as the engine's stats name it."""
    if message.codec_state == ERROR and message.attributes.get("error-type"):
        return str(message.attributes.get("error-type"))
    return "Ok" if message.codec_state == RESPONSE else "Error"


class Seen:
    """What one client sent and got."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.sent = 0
        self.statuses: collections.Counter[str] = collections.Counter()
        self.ids: collections.Counter[int] = collections.Counter()


async def client(engine: Engine, kind: str, seen: Seen) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, address(engine))

    async def read() -> None:
        buffer, codec = bytearray(), KVCodec()
        while True:
            try:
                data = await loop.sock_recv(sock, 1 << 16)
            except ConnectionResetError:
                return
            if not data:
                return
            buffer += data
            while isinstance(message := codec.decode(buffer), Metadata):
                seen.ids[message.request_id] += 1
                seen.statuses[outcome(message)] += 1

    reading = loop.create_task(read())
    for rid in range(1, PER_CLIENT + 1):
        frame = build_frame(REQUEST, rid, {"method": rng.choice(METHODS)})
        seen.sent = rid
        if kind == "slowloris" and rid % 10 == 0:
            for i in range(len(frame)):
                await loop.sock_sendall(sock, frame[i : i + 1])
                await asyncio.sleep(0.002)
        else:
            await loop.sock_sendall(sock, frame)
        if rng.random() < 0.1:
            await asyncio.sleep(rng.random() * 0.02)
        if kind == "reset" and rid == PER_CLIENT // 2:
            await asyncio.sleep(0.5)  # the engine reads them all first
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            reading.cancel()
            return
    if kind == "halfclose":
        sock.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(reading, 20)
    else:
        await until(lambda: sum(seen.ids.values()) >= PER_CLIENT, f"{kind}'s replies", 20)
        await asyncio.sleep(0.3)  # any reply too many
        reading.cancel()
    sock.close()


async def main() -> None:
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(lambda name=name: Server(name), "127.0.0.1", 0)  # type: ignore[misc]
        for name in ("a", "b")
    ]
    ports = [server.sockets[0].getsockname()[1] for server in servers]
    engine = Engine(loads_config(config(ports, True), "storm.yaml"))
    await engine.start()
    stop = False
    reloads = 0
    stalls = [0.0]

    async def reload() -> None:
        nonlocal reloads
        flip = False
        while not stop:
            await engine.apply(loads_config(config(ports, flip), "storm.yaml"))
            reloads += 1
            flip = not flip
            await asyncio.sleep(0.01)

    async def probe() -> None:
        while not stop:
            started = loop.time()
            await asyncio.sleep(0.005)
            stalls.append(loop.time() - started - 0.005)

    tasks = [loop.create_task(reload()), loop.create_task(probe())]
    kinds = ["normal"] * 8 + ["halfclose"] * 4 + ["slowloris"] * 2 + ["reset"] * 4 * RESETS
    seen = [Seen(kind) for kind in kinds]
    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client(engine, s.kind, s) for s in seen)), 60)
    stop = True
    await asyncio.gather(*tasks)
    await until(lambda: engine.pending == 0 and not engine.downstreams, "settled")
    print(
        f"seed {SEED}: {len(kinds)} clients in {time.perf_counter() - started:.1f} s, "
        f"{reloads} reloads, longest stall {max(stalls) * 1000:.0f} ms, "
        f"buffered {engine.buffered} bytes once settled"
    )
    saw: collections.Counter[str] = collections.Counter()
    for s in seen:
        if s.kind == "reset":
            continue
        saw.update(s.statuses)
        missing = [rid for rid in range(1, s.sent + 1) if not s.ids[rid]]
        extra = {rid: n for rid, n in s.ids.items() if n > 1 or not 0 < rid <= s.sent}
        if missing or extra:
            print(f"  BAD {s.kind}: missing {missing[:10]}, extra {dict(list(extra.items())[:10])}")
    stats: collections.Counter[str] = collections.Counter()
    for series in engine.stats.counters("metaprotocol_requests_total"):
        stats[dict(series.labels)["status"]] += series.value
    sent = sum(s.sent for s in seen)
    print(f"  clients saw {dict(saw)}")
    print(f"  stats say   {dict(stats)}: {sum(stats.values())} of {sent} sent")
    if RESETS:
        print("  totals agree" if sum(stats.values()) == sent else "  totals DIFFER")
    else:
        diff = {k: stats[k] - saw[k] for k in stats | saw if stats[k] != saw[k]}
        print(f"  DIFFER {diff}" if diff else "  agree")
    await engine.stop(drain=0.5)
    for server in servers:
        server.close()


if __name__ == "__main__":
    run(main(), timeout=120)
