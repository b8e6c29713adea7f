"""Closed-loop KV benchmark of ``metaprotocol proxy`` over real sockets: req/s and the proxy
process's CPU microseconds per request (utime+stime from /proc).

Run: ``.venv/bin/python tests/proxy/bench_e2e.py [CONNECTIONS] [SECONDS]``. The proxy runs as
``metaprotocol proxy`` (uvloop) in its own process; the KV upstream and the load generator
share this process. Linux only (reads /proc/PID/stat).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).parent))

from proxy_kit import mesh

from metaprotocol_sdk.examples.kv import REQUEST, RESPONSE, build_frame

ROUTER = """\
- name: hello
  match: {attributes: {method: {exact: sayHello}}}
  route: [{destination: {host: svc.test, subset: v1}}]
  requestMutation: [{key: x-route, value: v1}]
"""
_LENGTHS = struct.Struct(">HxxI")


def frames(buffer: bytearray) -> list[int]:
    """Remove complete KV frames from ``buffer``; return their request ids."""
    ids = []
    while len(buffer) >= 16:
        hlen, blen = _LENGTHS.unpack_from(buffer, 8)
        size = 16 + hlen + blen
        if len(buffer) < size:
            break
        ids.append(struct.unpack_from(">I", buffer, 4)[0])
        del buffer[:size]
    return ids


class Server(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = [build_frame(RESPONSE, rid, {"s": "1"}, b"ok") for rid in frames(self.buffer)]
        if out:
            self.transport.writelines(out)


class Load(asyncio.Protocol):
    count = 0
    running = True
    request = build_frame(REQUEST, 1, {"method": "sayHello", "interface": "greeter"}, b"x" * 64)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = bytearray()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        for _ in frames(self.buffer):
            Load.count += 1
            if Load.running:
                self.transport.write(self.request)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


async def main(connections: int, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Server, "127.0.0.1", 0)
    up_port = server.sockets[0].getsockname()[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    text = mesh([(up_port, "v1")], router=ROUTER).replace("127.0.0.1:0'}]", f"127.0.0.1:{port}'}}]")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    cli = [sys.executable, "-m", "metaprotocol_sdk", "proxy", "-c", f.name]
    with subprocess.Popen(cli, stdout=subprocess.PIPE, text=True) as proxy:
        assert proxy.stdout is not None
        await loop.run_in_executor(None, proxy.stdout.readline)
        for _ in range(connections):
            await loop.create_connection(Load, "127.0.0.1", port)
        await asyncio.sleep(1.0)  # warm-up
        n0, c0, t0 = Load.count, cpu_seconds(proxy.pid), time.perf_counter()
        await asyncio.sleep(seconds)
        n1, c1, t1 = Load.count, cpu_seconds(proxy.pid), time.perf_counter()
        Load.running = False
        proxy.terminate()  # drains: this loop must keep serving while it does
        await loop.run_in_executor(None, proxy.wait, 15)
    os.unlink(f.name)
    server.close()
    done = n1 - n0
    user, system = ((b - a) / done * 1e6 for a, b in zip(c0, c1, strict=True))
    print(
        f"{connections} connections, {seconds:g}s: {done / (t1 - t0):.0f} req/s, "
        f"proxy CPU {user + system:.1f} us/request (user {user:.1f}, system {system:.1f})"
    )


if __name__ == "__main__":
    args = [float(a) for a in sys.argv[1:]]
    uvloop.run(main(int(args[0]) if args else 16, args[1] if len(args) > 1 else 5.0))
