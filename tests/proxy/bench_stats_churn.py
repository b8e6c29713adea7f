"""Stats series and heap under reloads that rename everything (a churning control plane).

Run: ``.venv/bin/python tests/proxy/bench_stats_churn.py [RELOADS] [ROUTES]``. Each reload
renames the routes, the destination service and its cluster, and one request goes through;
the series held, the size of the Prometheus text and the traced heap are printed as it goes,
then again once the drains of the old clusters are over.
"""

from __future__ import annotations

import asyncio
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from proxy_kit import Client, Upstream, error_type, run
from test_stats_reload import front, renamed

from metaprotocol_sdk.proxy import Engine, Stats, loads_config

PROXY = "timeouts: {drain: 1s}\n"


def series(stats: Stats) -> int:
    count = getattr(stats, "series_count", None)  # absent before series were dropped
    if count is None:
        return len(stats._series) + len(stats._histograms)
    return int(count)


async def main(reloads: int, routes: int) -> None:
    up = await Upstream("a").start()
    engine = Engine(loads_config(renamed(0, up.port, PROXY, routes=routes), "t0.yaml"))
    await engine.start()
    c = await Client.connect(front(engine))
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]

    def show(what: str) -> None:
        grown = (tracemalloc.get_traced_memory()[0] - base) / 2**20
        text = engine.prometheus()
        print(
            f"{what:>16}: series {series(engine.stats):6d}  "
            f"prometheus {len(text) / 1024:9.1f} KiB  traced heap +{grown:7.2f} MiB",
            flush=True,
        )

    start = time.perf_counter()
    for i in range(1, reloads + 1):
        await engine.apply(loads_config(renamed(i, up.port, PROXY, routes=routes), f"t{i}.yaml"))
        assert error_type(await c.call()) is None
        if i in (1, 10, reloads // 10, reloads // 2, reloads):
            show(f"reload {i}")
    elapsed = time.perf_counter() - start
    await asyncio.sleep(2.5)  # past the drain deadline of the last clusters, and a sweep
    show("drains over")
    print(f"{reloads} reloads in {elapsed:.1f} s")
    c.close()
    await engine.stop(drain=1.0)
    await up.close()


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    run(main(*(args + [500, 1][len(args) :])), timeout=3600)
