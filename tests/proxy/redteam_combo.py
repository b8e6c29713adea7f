"""A combination storm of the upstream side: do retries, mirrors, outlier detection, upstream
pings and drain notices keep every request answered exactly once, and the stats in step,
when the upstreams misbehave in every way at once?

Run: ``.venv/bin/python tests/proxy/redteam_combo.py [SEED] [--dedicated] [--reload]``. An
engine in this process serves 15 clients (8 that read everything, 4 that half-close once they
sent their requests, 3 that reset halfway) pipelining 100 requests each to a route with
retries (``reset,timeout,error,connect-failure``, a per-try timeout), a 100 % mirror, outlier
detection, ``maxConcurrentStreams`` and ``maxRequestsPerConnection``, upstream pings every
100 ms and a 500 ms ``upstreamDrain``. The three upstreams answer each request as its method
says: at once, late, never, twice, with stray ids first, a byte at a time, with an error, with
300 KB, half a reply then a FIN, with a drain notice or a ping in the middle, garbage, or drop
the connection; they answer 80 % of the engine's pings. ``--dedicated``: a codec without id
rewriting (each client its own upstream connections); ``--reload``: the route, its subsets and
the mirror flip every 20 ms.

Printed: the longest event loop stall, every client that missed a reply or got one twice or
for an id it never sent (``BAD``), what the engine still holds once all is settled (requests,
retries, the mirror's copies, buffered bytes), the totals of ``metaprotocol_requests_total``
against the requests sent, and every error logged or passed to the loop's handler. Before
this storm's fixes, ``--dedicated`` had 4 to 5 clients ``BAD`` per run (an upstream's extra
reply shifted the pairing of a client's own connection).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_kit import address, mesh, run, until
from redteam_storm import Seen, outcome

from metaprotocol_sdk import Metadata
from metaprotocol_sdk.examples.kv import (
    ERROR,
    PING,
    PONG,
    REQUEST,
    RESPONSE,
    KVCodec,
    build_frame,
)
from metaprotocol_sdk.proxy import Engine, loads_config

SEED = int(next((a for a in sys.argv[1:] if a.isdigit()), "1"))
DEDICATED = "--dedicated" in sys.argv
RELOAD = "--reload" in sys.argv
rng = random.Random(SEED)
HOSTILE = ["hang", "close", "drip", "dup", "ghost", "fail", "big", "notice", "ping", "garbage"]
METHODS = ["get"] * 30 + ["delay"] * 10 + HOSTILE + ["halfclose"]
PER_CLIENT = 100


class DedicatedKV(KVCodec):
    """The KV codec without id rewriting."""

    protocol = "kvx"
    capabilities = dataclasses.replace(KVCodec.capabilities, rewrite_request_id=False)


sys.modules["proxy_test_codecs"].DedicatedKV = DedicatedKV  # type: ignore[attr-defined]  # proxy_kit's module


class Server(asyncio.Protocol):
    """An upstream whose behaviour each request's method picks."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.codec = KVCodec()
        self.buffer = bytearray()
        self.ended = False  # it sent its FIN
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def write(self, data: bytes) -> None:
        if not (self.transport.is_closing() or self.ended):
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while isinstance(message := self.codec.decode(self.buffer), Metadata):
            self.on_message(message)

    def reply(self, rid: int, kind: int = RESPONSE, size: int = 0) -> bytes:
        return build_frame(kind, rid, {"server": self.name}, bytes(size))

    def on_message(self, message: Metadata) -> None:
        if message.codec_state == PING:
            if rng.random() < 0.8:
                self.write(build_frame(PONG, message.request_id))
            return
        if message.message_type.name != "Request" or self.ended:
            return
        method, rid = message.operation_name, message.request_id
        loop = asyncio.get_running_loop()
        if method == "hang":
            return
        if method == "close":
            self.transport.close()
        elif method == "halfclose":
            self.write(self.reply(rid)[:7])
            self.transport.write_eof()
            self.ended = True
        elif method == "delay":
            frame = self.reply(rid)
            loop.call_later(rng.random() * 0.15, self.write, frame)
        elif method == "drip":
            task = loop.create_task(self.drip(self.reply(rid)))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif method == "dup":
            self.write(self.reply(rid) * 2)
        elif method == "ghost":
            self.write(self.reply(rid + 50000) + self.reply(rid - 1) + self.reply(rid))
        elif method == "fail":
            self.write(self.reply(rid, ERROR))
        elif method == "big":
            self.write(self.reply(rid, size=300_000))
        elif method == "notice":
            frame = self.reply(rid)
            self.write(frame[:10])
            self.write(frame[10:] + KVCodec().drain_notice())
        elif method == "ping":
            self.write(build_frame(PING, 77) + self.reply(rid))
        elif method == "garbage":
            self.write(b"XX" + bytes(30))
        else:
            self.write(self.reply(rid))

    async def drip(self, data: bytes) -> None:
        for i in range(len(data)):
            if self.transport.is_closing() or self.ended:
                return
            self.transport.write(data[i : i + 1])
            await asyncio.sleep(0)


def config(ports: list[int], flip: bool) -> str:
    primary, mirror = ("v2", "v1") if flip else ("v1", "v2")
    router = (
        f"- name: {'flipped' if flip else 'route'}\n"
        f"  route: [{{destination: {{host: svc.test, subset: {primary}}}}}]\n"
        f"  mirror: {{host: svc.test, subset: {mirror}}}\n"
        "  mirrorPercentage: {value: 100}\n"
        "  timeout: 400ms\n"
        "  retries: {attempts: 2, perTryTimeout: 120ms,"
        " retryOn: 'reset,timeout,error,connect-failure'}\n"
    )
    policy = (
        "{connectionPool: {http: {maxConcurrentStreams: 4, http2MaxRequests: 200,"
        " maxRequestsPerConnection: 50}}, outlierDetection: {consecutive5xxErrors: 3,"
        " interval: 100ms, baseEjectionTime: 300ms, maxEjectionPercent: 50}}"
    )
    proxy = (
        "limits: {maxPendingRequestsPerConnection: 60}\n"
        "upstream: {heartbeat: {interval: 100ms, timeout: 300ms}}\n"
        "timeouts: {upstreamDrain: 500ms}\n"
    )
    endpoints = [(ports[0], "v1"), (ports[1], "v1"), (ports[2], "v2")]
    kw = {"protocol": "kvx", "codec": "proxy_test_codecs:DedicatedKV"} if DEDICATED else {}
    return mesh(endpoints, router=router, traffic_policy=policy, proxy=proxy, **kw)


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
                if message.message_type.name != "Heartbeat":  # drain notices aside
                    seen.ids[message.request_id] += 1
                    seen.statuses[outcome(message)] += 1

    reading = loop.create_task(read())
    for rid in range(1, PER_CLIENT + 1):
        seen.sent = rid
        await loop.sock_sendall(sock, build_frame(REQUEST, rid, {"method": rng.choice(METHODS)}))
        if rng.random() < 0.1:
            await asyncio.sleep(rng.random() * 0.02)
        if kind == "reset" and rid == PER_CLIENT // 2:
            await asyncio.sleep(0.2)  # the engine reads them all first
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            reading.cancel()
            return
    if kind == "halfclose":
        sock.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(reading, 30)
    else:
        await until(lambda: sum(seen.ids.values()) >= PER_CLIENT, f"{kind}'s replies", 30)
        await asyncio.sleep(0.5)  # any reply too many
        reading.cancel()
    sock.close()


async def main() -> None:
    loop = asyncio.get_running_loop()
    errors: list[Any] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))

    class Errors(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR or record.exc_info:
                errors.append(record.getMessage()[:300])

    logging.getLogger().addHandler(Errors())
    servers = [
        await loop.create_server(lambda name=name: Server(name), "127.0.0.1", 0)  # type: ignore[misc]
        for name in ("a", "b", "m")
    ]
    ports = [server.sockets[0].getsockname()[1] for server in servers]
    engine = Engine(loads_config(config(ports, False), "combo.yaml"))
    await engine.start()
    stop = False
    stalls = [0.0]
    reloads = 0

    async def probe() -> None:
        while not stop:
            started = loop.time()
            await asyncio.sleep(0.005)
            stalls.append(loop.time() - started - 0.005)

    async def reload() -> None:
        nonlocal reloads
        flip = True
        while RELOAD and not stop:
            await engine.apply(loads_config(config(ports, flip), "combo.yaml"))
            reloads += 1
            flip = not flip
            await asyncio.sleep(0.02)

    tasks = [loop.create_task(probe()), loop.create_task(reload())]
    kinds = ["normal"] * 8 + ["halfclose"] * 4 + ["reset"] * 3
    seen = [Seen(kind) for kind in kinds]
    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client(engine, s.kind, s) for s in seen)), 90)
    stop = True
    await asyncio.gather(*tasks)
    await until(lambda: engine.pending == 0 and not engine.downstreams, "settled", 10)
    await until(lambda: not engine.mirror_sink.inflight, "the mirror's copies settled", 5)
    print(
        f"seed {SEED}: {len(kinds)} clients in {time.perf_counter() - started:.1f} s, "
        f"{reloads} reloads, longest stall {max(stalls) * 1000:.0f} ms, "
        f"buffered {engine.buffered} bytes once settled"
    )
    for cluster in engine.clusters.values():
        held = [h.active for h in cluster.hosts] + [cluster.retrying, cluster.queued]
        if any(held):
            print(f"  HELD {cluster.name}: endpoints' active, retrying, queued {held}")
    for s in seen:
        if s.kind == "reset":
            continue
        missing = [rid for rid in range(1, s.sent + 1) if not s.ids[rid]]
        extra = {rid: n for rid, n in s.ids.items() if n > 1 or not 0 < rid <= s.sent}
        if missing or extra:
            print(f"  BAD {s.kind}: missing {missing[:10]}, extra {dict(list(extra.items())[:10])}")
    stats: collections.Counter[str] = collections.Counter()
    for series in engine.stats.counters("metaprotocol_requests_total"):
        stats[dict(series.labels)["status"]] += series.value
    sent = sum(s.sent for s in seen)
    print(f"  stats say {dict(stats)}: {sum(stats.values())} of {sent} sent")
    print("  totals agree" if sum(stats.values()) == sent else "  totals DIFFER")
    if errors:
        print(f"  ERRORS {len(errors)}: {[str(e)[:300] for e in errors[:4]]}")
    await engine.stop(drain=0.5)
    for server in servers:
        server.close()


if __name__ == "__main__":
    run(main(), timeout=150)
