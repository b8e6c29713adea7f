"""A flood of TLS handshakes against ``metaprotocol proxy``: how many one engine core sustains,
and what a well-behaved client sees meanwhile.

The flood is the cheap kind: one ClientHello, recorded once, sent again on each new
connection; the engine does its half of the handshake (key exchange, certificate signature)
and sends its flight; the flooder reads the first bytes of it and closes, doing no crypto
of its own. ``CONCURRENCY`` such connections are kept in flight by a separate process.
Meanwhile this process runs the probes: an established TLS client sending one request at a
time, and a new TLS client (full handshake, one request) every 50 ms.

Run: ``python tests/proxy/bench_tls_handshakes.py [SECONDS] [--rsa] [--limit N/s]``.
``--rsa`` serves an RSA 2048 certificate (default: ECDSA P-256, trustme's default);
``--limit 200`` sets the listener's ``connectionRateLimit`` to 200 connections a second
(a bucket of 200 refilled by 20 every 100 ms). Linux only (the proxy's CPU time is read
from /proc).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme
import uvloop

sys.path.insert(0, str(Path(__file__).parent))

import contextlib

from proxy_kit import mesh

from metaprotocol_sdk.examples.kv import HEADER_SIZE, REQUEST, RESPONSE, build_frame

CONCURRENCY = 64


class Server(asyncio.Protocol):
    """A KV upstream answering each request (frames may arrive together, or split)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= HEADER_SIZE:
            size = (
                HEADER_SIZE + int.from_bytes(self.buffer[8:10]) + int.from_bytes(self.buffer[12:16])
            )
            if len(self.buffer) < size:
                return
            rid = int.from_bytes(self.buffer[4:8])
            del self.buffer[:size]
            self.transport.write(build_frame(RESPONSE, rid, {"s": "1"}, b"ok"))


def client_hello() -> bytes:
    """A TLS 1.3 ClientHello, recorded from Python's own client."""
    obj = ssl.create_default_context().wrap_bio(
        ssl.MemoryBIO(), (out := ssl.MemoryBIO()), server_hostname="svc.test"
    )
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def flood(port: int, seconds: float, counts: multiprocessing.Queue[tuple[int, int, int]]) -> None:
    """Replay a ClientHello on ``CONCURRENCY`` connections at a time for ``seconds``; put
    ``(answered, refused, errors)``: a server flight came back, the connection was closed
    without one, it failed to connect."""
    hello = client_hello()
    answered = refused = errors = 0

    async def worker(deadline: float) -> None:
        nonlocal answered, refused, errors
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                errors += 1
                continue
            try:
                writer.write(hello)
                if await reader.read(4096):
                    answered += 1
                else:
                    refused += 1
            except OSError:
                refused += 1
            writer.transport.abort()

    async def main() -> None:
        deadline = asyncio.get_running_loop().time() + seconds
        await asyncio.gather(*(worker(deadline) for _ in range(CONCURRENCY)))

    uvloop.run(main())
    counts.put((answered, refused, errors))


class Probe(asyncio.Protocol):
    """A KV client that sends one request and waits for its reply."""

    def __init__(self) -> None:
        self.reply: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.reply is not None and not self.reply.done():
            self.reply.set_result(None)

    async def call(self) -> float:
        start = time.perf_counter()
        self.reply = asyncio.get_running_loop().create_future()
        self.transport.write(build_frame(REQUEST, 1, {"method": "get"}, b"x" * 64))
        await asyncio.wait_for(self.reply, 30)
        return time.perf_counter() - start


async def probe(
    open_: Probe, port: int, ctx: ssl.SSLContext, seconds: float
) -> tuple[list[float], list[float], int]:
    """Latencies of requests on the open connection ``open_``, of new connections (handshake
    and one request), and how many new connections were refused."""
    loop = asyncio.get_running_loop()
    refused = 0
    deadline = loop.time() + seconds
    requests: list[float] = []
    fresh: list[float] = []

    async def new_connections() -> None:
        nonlocal refused
        while loop.time() < deadline:
            start = time.perf_counter()
            try:
                transport, conn = await asyncio.wait_for(
                    loop.create_connection(
                        Probe, "127.0.0.1", port, ssl=ctx, server_hostname="svc.test"
                    ),
                    30,
                )
                await conn.call()
                transport.close()
                fresh.append(time.perf_counter() - start)
            except (OSError, TimeoutError):
                refused += 1
            await asyncio.sleep(0.05)

    task = asyncio.ensure_future(new_connections())
    while loop.time() < deadline:
        requests.append(await open_.call())
        await asyncio.sleep(0.005)
    await task
    return requests, fresh, refused


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(name: str, values: list[float]) -> str:
    if not values:
        return f"{name}: none"
    ms = sorted(v * 1000 for v in values)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    p50 = statistics.median(ms)
    return f"{name}: n={len(ms)} p50={p50:.1f} ms p99={p99:.1f} ms max={ms[-1]:.1f} ms"


async def main(seconds: float, rsa: bool, limit: int | None) -> None:
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        key_type = trustme.KeyType.RSA if rsa else trustme.KeyType.ECDSA
        ca = trustme.CA(key_type=key_type)
        leaf = ca.issue_cert("svc.test", key_type=key_type)
        (root / "c.pem").write_bytes(leaf.cert_chain_pems[0].bytes())
        (root / "k.pem").write_bytes(leaf.private_key_pem.bytes())
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        server = await loop.create_server(Server, "127.0.0.1", 0)
        up_port = server.sockets[0].getsockname()[1]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        tls = {"serverCertificate": str(root / "c.pem"), "privateKey": str(root / "k.pem")}
        text = mesh(
            [(up_port, "v1")], listener_tls=json.dumps(tls), proxy="limits: {maxConnections: 5000}"
        )
        bind = f"bind: '127.0.0.1:{port}'"
        if limit is not None:
            bucket = (
                f"{{maxTokens: {limit}, tokensPerFill: {max(1, limit // 10)}, fillInterval: 100ms}}"
            )
            bind += f", connectionRateLimit: {{tokenBucket: {bucket}}}"
        text = text.replace("bind: '127.0.0.1:0'", bind, 1)
        (root / "mesh.yaml").write_text(text)
        cli = [sys.executable, "-m", "metaprotocol_sdk", "proxy", "-c", str(root / "mesh.yaml")]
        proxy = subprocess.Popen(cli, stdout=subprocess.PIPE, text=True)
        try:
            assert proxy.stdout is not None
            await loop.run_in_executor(None, proxy.stdout.readline)
            _, steady = await loop.create_connection(
                Probe, "127.0.0.1", port, ssl=ctx, server_hostname="svc.test"
            )
            await probe(steady, port, ctx, 0.5)  # warm up
            quiet = await probe(steady, port, ctx, seconds)
            counts: multiprocessing.Queue[tuple[int, int, int]] = multiprocessing.Queue()
            flooder = multiprocessing.Process(target=flood, args=(port, seconds + 1, counts))
            cpu = cpu_seconds(proxy.pid)
            flooder.start()
            await asyncio.sleep(0.5)  # the flood is under way
            loud = await probe(steady, port, ctx, seconds)
            answered, refused, errors = await loop.run_in_executor(None, counts.get)
            await loop.run_in_executor(None, flooder.join)
            cpu = cpu_seconds(proxy.pid) - cpu
        finally:
            proxy.terminate()
            await loop.run_in_executor(None, proxy.wait, 15)
        server.close()
    took = seconds + 1
    key = "RSA 2048" if rsa else "ECDSA P-256"
    print(f"TLS 1.3, {key}, {CONCURRENCY} flood connections at a time, {took:g} s of flood")
    print(f"  limit: {'none' if limit is None else f'{limit} connections/s'}")
    rates = f"{answered / took:.0f}/s answered, {refused / took:.0f}/s refused"
    print(f"  flood: {rates}, {errors} connect errors")
    print(f"  proxy CPU: {cpu / took * 100:.0f}% of one core")
    print("  " + summary("requests on an open connection, quiet", quiet[0]))
    print("  " + summary("requests on an open connection, flood", loud[0]))
    print("  " + summary("new connection + request, quiet", quiet[1]) + f", refused {quiet[2]}")
    print("  " + summary("new connection + request, flood", loud[1]) + f", refused {loud[2]}")


if __name__ == "__main__":
    args = sys.argv[1:]
    rsa = "--rsa" in args
    limit = None
    if "--limit" in args:
        limit = int(args[args.index("--limit") + 1])
        del args[args.index("--limit") : args.index("--limit") + 2]
    args = [a for a in args if not a.startswith("--")]
    uvloop.run(main(float(args[0]) if args else 5.0, rsa, limit))
