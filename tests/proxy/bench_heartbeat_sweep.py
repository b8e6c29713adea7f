"""What upstream pings cost the engine's housekeeping sweep: N idle upstream connections of
a client's own (a KV codec with pings and no id rewriting), and the time of one sweep
(``Engine._sweep_now``, median of 20) when none is due, when all are due with no message
since the sweep last looked (decided without a system call), when all are due after a
message (one ``getsockopt(TCP_INFO)`` each), and when all are pinged at once.

Run: ``.venv/bin/python tests/proxy/bench_heartbeat_sweep.py [CONNECTIONS]`` (default 2000).
Engine, clients and the KV upstream share this process (4 descriptors per connection).
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from proxy_kit import Client, Upstream, _mod, address, engine_for, error_type, mesh, run

from metaprotocol_sdk.examples.kv import PING, KVCodec, build_frame
from metaprotocol_sdk.proxy import Engine


class PingDedicatedKVCodec(KVCodec):
    """KV with pings and no id rewriting: each client has its own upstream connection."""

    protocol = "kvpd"
    capabilities = dataclasses.replace(
        KVCodec.capabilities, heartbeat_request=True, rewrite_request_id=False
    )

    def heartbeat_request(self, request_id: int) -> bytes:
        return build_frame(PING, request_id)


_mod.PingDedicatedKVCodec = PingDedicatedKVCodec  # type: ignore[attr-defined]


def sweep_ms(engine: Engine, setup: Callable[[], None], rounds: int = 20) -> float:
    times = []
    for _ in range(rounds):
        setup()
        start = time.perf_counter()
        engine._sweep_now()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


async def main(n: int) -> None:
    up = await Upstream("a").start()
    proxy = "upstream: {heartbeat: {interval: 60s, timeout: 60s}}\n"
    codec = {"protocol": "kvpd", "codec": "proxy_test_codecs:PingDedicatedKVCodec"}
    async with engine_for(mesh([(up.port, "v1")], proxy=proxy, **codec)) as engine:
        clients: list[Client] = []
        while len(clients) < n:
            batch = [
                await Client.connect(address(engine)) for _ in range(min(200, n - len(clients)))
            ]
            replies = await asyncio.gather(*(c.call() for c in batch))
            assert all(error_type(r) is None for r in replies)
            clients += batch
        conns = list(engine.upstreams)
        now = engine.loop.time

        def none_due() -> None:
            for c in conns:
                c.ping_due = now() + 1000

        def due(heard: bool, quiet: float) -> Callable[[], None]:
            def setup() -> None:
                for c in conns:
                    c.ping_due, c.ping_sent, c.heard, c.heard_at = 0.0, 0.0, heard, now() - quiet

            return setup

        print(f"{len(conns)} idle upstream connections; one sweep:")
        print(f"  none due                       {sweep_ms(engine, none_due):6.2f} ms")
        print(f"  all due, no message since      {sweep_ms(engine, due(False, 1)):6.2f} ms")
        print(f"  all due, a message since       {sweep_ms(engine, due(True, 1)):6.2f} ms")
        print(f"  all pinged                     {sweep_ms(engine, due(False, 100), 3):6.2f} ms")
        for c in clients:
            c.close()
    await up.close()


if __name__ == "__main__":
    run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000), timeout=600)
