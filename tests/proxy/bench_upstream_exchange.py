"""What Istio's metadata exchange costs on the engine's upstream ISTIO_MUTUAL connections.

Run: ``.venv/bin/python tests/proxy/bench_upstream_exchange.py [N]``. Real sockets on
127.0.0.1: a KV server behind a sidecar's TLS that speaks the exchange (ALPN
``istio-peer-exchange``), against the same server announcing ALPN ``istio`` only (no
exchange), interleaved, best of 3, with Istio's metrics on (``reporter: source``):

* ``new connection``: ``maxRequestsPerConnection: 1``, so each request opens a TLS
  connection (handshake, the two headers, the server's read and its series);
* ``one connection``: N requests, one at a time, on one connection (after the exchange the
  connection is its codec's: this should not differ);

and the CPU of reading a sidecar's header (``read_exchange``), by itself.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import per_call_us
from mesh_pki import ALPN_SIDECAR, SIDECAR_METADATA, MeshCa, exchange_header
from proxy_kit import Client, Upstream, address, engine_for, mesh
from test_mesh_identity import identity

from metaprotocol_sdk.proxy.peer_exchange import read_exchange

ROUTER = "- name: all\n  route: [{destination: {host: svc.test, subset: v1}}]\n"
TELEMETRY = "telemetry: {istioMetrics: true, reporter: source}\n"


async def per_request_us(ca: MeshCa, tmp: Path, exchange: bool, n: int, pool: str) -> float:
    up = Upstream("v1")
    alpn = ALPN_SIDECAR if exchange else ["istio"]
    if exchange:
        up.exchange = exchange_header(SIDECAR_METADATA)
    await up.start(ssl=ca.server_context(tmp / "server", "greeter", alpn=alpn))
    policy = f"{{tls: {{mode: ISTIO_MUTUAL}}{pool}}}"
    text = mesh(
        [(up.port, "v1")],
        router=ROUTER,
        traffic_policy=policy,
        proxy=identity(tmp / "certs", "1h") + TELEMETRY,
    )
    try:
        async with engine_for(text) as engine:
            client = await Client.connect(address(engine))
            await client.call("get")  # warm: the first connection, the series
            start = time.perf_counter()
            for rid in range(n):
                await client.call("get", rid=rid + 10)
            elapsed = time.perf_counter() - start
            client.close()
    finally:
        await up.close()
    assert bool(up.peers) == exchange
    return elapsed / n * 1e6


async def main(n: int) -> None:
    logging.disable(logging.WARNING)  # the configuration's caution (no subjectAltNames)
    ca = MeshCa()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        ca.write(tmp / "certs", "orders", ns="shop")
        for label, pool, count in (
            ("new connection", ", connectionPool: {http: {maxRequestsPerConnection: 1}}", n // 10),
            ("one connection", "", n),
        ):
            best = {True: float("inf"), False: float("inf")}
            for _ in range(3):
                for exchange in (False, True):
                    us = await per_request_us(ca, tmp, exchange, count, pool)
                    best[exchange] = min(best[exchange], us)
            print(
                f"{label}: {best[False]:.0f} us per request without the exchange (ALPN istio), "
                f"{best[True]:.0f} us with it ({count} requests, best of 3)"
            )
    header = exchange_header(SIDECAR_METADATA)[8:]
    us = per_call_us(lambda: read_exchange(header))
    print(f"read_exchange of a sidecar's header ({len(header)} bytes): {us:.1f} us")


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
