"""What a plain client pays on a PERMISSIVE listener (PeerAuthentication, mutual TLS or plain
text by the first bytes) against a plain listener (no identity): CPU per request on one open
connection, and per connection (connect, one request, close).

Run: ``.venv/bin/python tests/proxy/bench_permissive.py [REQUESTS] [CONNECTIONS] [ROUNDS]``.
The engine, the KV server and the clients share one process and one uvloop loop: the clients'
and server's work is the same in both configurations, so the difference is the engine's. The
two configurations alternate, ``ROUNDS`` times; the medians are printed.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh_pki import MeshCa
from proxy_kit import Client, Upstream, address, engine_for, mesh

BATCH = 50  # requests in flight on the open connection


async def per_request(text: str, requests: int) -> float:
    up = await Upstream("v1").start()
    async with engine_for(text.replace("PORT", str(up.port))) as engine:
        client = await Client.connect(address(engine))
        await client.call("get")  # the connection is detected and warm
        start = time.process_time()
        for _ in range(requests // BATCH):
            await asyncio.gather(*(client.start("get") for _ in range(BATCH)))
        spent = time.process_time() - start
        client.close()
    await up.close()
    return spent / requests


async def per_connection(text: str, connections: int) -> float:
    up = await Upstream("v1").start()
    async with engine_for(text.replace("PORT", str(up.port))) as engine:
        start = time.process_time()
        for _ in range(connections):
            client = await Client.connect(address(engine))
            await client.call("get")
            client.close()
            await client.closed
        spent = time.process_time() - start
    await up.close()
    return spent / connections


def main() -> None:
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    connections = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    certs = Path(tempfile.mkdtemp()) / "certs"
    MeshCa().write(certs, "engine")
    texts = {
        "plain listener": mesh([(0, "v1")]),
        "PERMISSIVE": mesh([(0, "v1")], proxy=f"meshIdentity: {{directory: '{certs}'}}\n"),
    }
    texts = {
        k: v.replace(
            "ports: {tcp-metaprotocol-kv-svc: 0}", "ports: {tcp-metaprotocol-kv-svc: PORT}"
        )
        for k, v in texts.items()
    }
    results: dict[str, dict[str, list[float]]] = {k: {"req": [], "conn": []} for k in texts}
    for _ in range(rounds):
        for name, text in texts.items():
            results[name]["req"].append(uvloop.run(per_request(text, requests)))
            results[name]["conn"].append(uvloop.run(per_connection(text, connections)))
    for name, r in results.items():
        print(
            f"{name:15s} per request {statistics.median(r['req']) * 1e6:6.1f} us CPU "
            f"(min {min(r['req']) * 1e6:.1f}); per connection "
            f"{statistics.median(r['conn']) * 1e6:6.1f} us CPU (min {min(r['conn']) * 1e6:.1f})"
        )


if __name__ == "__main__":
    main()
