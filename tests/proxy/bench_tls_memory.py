"""What a client connection costs ``metaprotocol proxy`` in memory, plain and over TLS: the
proxy process's resident set size (/proc/PID/statm) before and after N client connections,
each of which has sent one request and got its reply (so its TLS buffers have been used),
then the same after N clients that connect and never finish a handshake.

Run: ``.venv/bin/python tests/proxy/bench_tls_memory.py [CONNECTIONS]`` (default 1000).
The proxy runs as ``metaprotocol proxy`` (uvloop) in its own process, with its listener's
TLS certificate from trustme; clients and the KV upstream share this process. Linux only.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

import trustme
import uvloop

sys.path.insert(0, str(Path(__file__).parent))

from proxy_kit import mesh

from metaprotocol_sdk.examples.kv import REQUEST, RESPONSE, build_frame


class Server(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        rid = int.from_bytes(data[4:8], "big")
        self.transport.write(build_frame(RESPONSE, rid, {"s": "1"}, b"ok"))


class Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.answered = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.write(build_frame(REQUEST, 1, {"method": "get"}, b"x" * 64))

    def data_received(self, data: bytes) -> None:
        if not self.answered.done():
            self.answered.set_result(None)


def rss(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def settle(pid: int) -> int:
    await asyncio.sleep(0.5)
    return rss(pid)


async def measure(n: int, tls: bool, root: Path, ca: trustme.CA) -> tuple[int, int]:
    """RSS growth of a proxy with ``n`` open client connections, then with ``n`` more that
    hold a half-finished handshake (TLS only)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Server, "127.0.0.1", 0)
    up_port = server.sockets[0].getsockname()[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listener = ""
    client_ctx = None
    if tls:
        leaf = ca.issue_cert("svc.test")
        (root / "c.pem").write_bytes(leaf.cert_chain_pems[0].bytes())
        (root / "k.pem").write_bytes(leaf.private_key_pem.bytes())
        listener = json.dumps(
            {"serverCertificate": str(root / "c.pem"), "privateKey": str(root / "k.pem")}
        )
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
    text = mesh(
        [(up_port, "v1")],
        listener_tls=listener,
        proxy="limits: {maxConnections: 5000}\ntimeouts: {handshake: 60s}",
    ).replace("bind: '127.0.0.1:0'", f"bind: '127.0.0.1:{port}'", 1)
    config = root / "mesh.yaml"
    config.write_text(text)
    cli = [sys.executable, "-m", "metaprotocol_sdk", "proxy", "-c", str(config)]
    with subprocess.Popen(cli, stdout=subprocess.PIPE, text=True) as proxy:
        assert proxy.stdout is not None
        await loop.run_in_executor(None, proxy.stdout.readline)
        # Warm up (imports, first TLS context use), then measure.
        _, first = await loop.create_connection(
            Client, "127.0.0.1", port, ssl=client_ctx, server_hostname="svc.test" if tls else None
        )
        await first.answered
        before = await settle(proxy.pid)
        clients = []
        for _ in range(n):
            transport, client = await loop.create_connection(
                Client,
                "127.0.0.1",
                port,
                ssl=client_ctx,
                server_hostname="svc.test" if tls else None,
            )
            clients.append((transport, client))
        await asyncio.gather(*(c.answered for _, c in clients))
        open_ = await settle(proxy.pid)
        half = []
        if tls:
            for _ in range(n):
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(bytes.fromhex("16030100c8010000c40303"))  # a ClientHello's start
                half.append(sock)
        handshaking = await settle(proxy.pid)
        for sock in half:
            sock.close()
        for transport, _ in clients:
            transport.close()
        proxy.terminate()
        await loop.run_in_executor(None, proxy.wait, 15)
    server.close()
    return (open_ - before) // n, (handshaking - open_) // n


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ca = trustme.CA()
        plain, _ = await measure(n, False, Path(tmp), ca)
        tls, handshaking = await measure(n, True, Path(tmp), ca)
    print(f"{n} connections, proxy RSS per connection (one request each):")
    print(f"  plain TCP            {plain / 1024:.1f} KiB")
    print(f"  TLS (TLS 1.3)        {tls / 1024:.1f} KiB")
    print(f"  TLS, mid-handshake   {handshaking / 1024:.1f} KiB")


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
