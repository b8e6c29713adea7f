"""Every way a mesh client can stop halfway: does the engine hold nothing afterwards?

Run: ``.venv/bin/python tests/proxy/redteam_cuts.py [STEP] [fin|rst]``. An engine in this
process with a workload identity (``meshIdentity``: a PERMISSIVE listener, mutual TLS or plain
text by the first bytes) serves a sidecar client (ALPN ``istio-peer-exchange``): its
ClientHello, the rest of its handshake, Istio's metadata exchange header and a request, the
whole conversation as the client sends it (about 1 900 bytes). The client is cut after every
STEP-th byte of it (1: each one), closing (``fin``) or resetting (``rst``), and the engine
must then hold no connection, no handshake, no request and no buffered byte, within 5 s each.

Printed: the cuts after which it still held something (``bad``), every error logged or passed
to the loop's handler, and how the cut connections were counted (detection, handshake errors,
closes). Held in this hunt for every byte, both ways (103 s each way).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh_pki import ALPN_SIDECAR, SIDECAR_METADATA, MeshCa, exchange_header
from proxy_kit import REQUEST, Upstream, address, build_frame, mesh, run, until

from metaprotocol_sdk.proxy import Engine, loads_config

STEP = int(sys.argv[1]) if len(sys.argv) > 1 else 1
MODE = sys.argv[2] if len(sys.argv) > 2 else "fin"


async def converse(engine: Engine, ctx: ssl.SSLContext, app: bytes, budget: int) -> int:
    """A sidecar client that sends at most ``budget`` bytes of its conversation, then closes
    or resets (``MODE``); the bytes it sent."""
    loop = asyncio.get_running_loop()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_side=False, server_hostname="svc.test")
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, address(engine))
    sent = 0

    async def send(data: bytes) -> bool:
        nonlocal sent
        part = data[: budget - sent]
        if part:
            await loop.sock_sendall(sock, part)
            sent += len(part)
        return len(part) == len(data)

    try:
        shaken = False
        while not shaken:
            try:
                tls.do_handshake()
                shaken = True
            except ssl.SSLWantReadError:
                pass
            if not await send(outgoing.read()) or shaken:
                break
            data = await asyncio.wait_for(loop.sock_recv(sock, 65536), 3)
            if not data:
                break
            incoming.write(data)
        if shaken:
            tls.write(app)
            if await send(outgoing.read()):
                while True:
                    data = await asyncio.wait_for(loop.sock_recv(sock, 65536), 3)
                    if not data:
                        break
                    incoming.write(data)
                    try:
                        if tls.read(65536):
                            break
                    except ssl.SSLWantReadError:
                        continue
    except (OSError, ssl.SSLError, TimeoutError):
        pass
    if MODE == "rst":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    return sent


async def main() -> None:
    loop = asyncio.get_running_loop()
    errors: list[Any] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))

    class Errors(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR or record.exc_info:
                errors.append(record.getMessage()[:300])

    logging.getLogger().addHandler(Errors())
    tmp = Path(tempfile.mkdtemp())
    ca = MeshCa()
    ca.write(tmp / "certs", "engine", ns="meta")
    up = await Upstream("a").start()
    proxy = (
        f"meshIdentity: {{directory: '{tmp / 'certs'}'}}\ntimeouts: {{handshake: 2s, frame: 2s}}\n"
    )
    engine = Engine(loads_config(mesh([(up.port, "v1")], proxy=proxy), "cuts.yaml"))
    await engine.start()
    ctx = ca.client_context(tmp / "clients", None, ALPN_SIDECAR)
    ctx.load_cert_chain(*ca.files(tmp / "clients", "frontend", "web"))
    app = exchange_header(SIDECAR_METADATA) + build_frame(REQUEST, 1, {"method": "get"})
    total = await converse(engine, ctx, app, 1 << 30)
    started = time.perf_counter()
    bad = []

    def clean() -> bool:
        return not (engine.downstreams or engine.handshaking or engine.buffered or engine.pending)

    for budget in range(0, total + 1, STEP):
        await converse(engine, ctx, app, budget)
        try:
            await until(clean, "nothing held", 5)
        except AssertionError:
            bad.append((budget, len(engine.downstreams), len(engine.handshaking), engine.buffered))
    print(f"{MODE}, a cut every {STEP} of {total} bytes: {time.perf_counter() - started:.1f} s")
    print(f"  bad {bad[:10]}")
    print(f"  errors {len(errors)}: {[str(e)[:300] for e in errors[:3]]}")
    for name in (
        "metaprotocol_downstream_connections_detected_total",
        "metaprotocol_tls_handshake_errors_total",
        "metaprotocol_downstream_connections_closed_total",
    ):
        counted = {
            ",".join(v for k, v in s.labels if k != "listener"): s.value
            for s in engine.stats.counters(name)
            if s.value
        }
        print(f"  {name} {counted}")
    await engine.stop(drain=0.5)
    await up.close()


if __name__ == "__main__":
    run(main(), timeout=900)
