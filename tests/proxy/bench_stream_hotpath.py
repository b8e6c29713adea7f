"""CPU per short stream of the engine's Python work, without sockets (codec included).

Run: ``.venv/bin/python tests/proxy/bench_stream_hotpath.py [N] [--frames F]``. Each stream is
``bench/bench_streams.py``'s short one: a ``Stream_Init`` routed on a weighted split with a
request mutation, its answer, ``F`` data frames each way (default 4), a half-close each way; the
upstream connection closes. Fake transports stand in for the sockets and the connect returns at
once, but the connect's task and the loop's callbacks are the real ones. For instructions per
stream: ``PYTHONHASHSEED=0 valgrind --tool=callgrind`` at two ``N``, as for ``bench_hotpath.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_kit import FakeTransport, mesh

from metaprotocol_sdk.examples.kv import STREAM_DATA, STREAM_HALF_CLOSE, STREAM_OPEN, build_frame
from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.downstream import Downstream

#: The streams benchmark's route: a weighted split with a request mutation.
ROUTER = """\
- name: split
  match: {attributes: {method: {exact: echo}}}
  requestMutation: [{key: x-bench, value: metaprotocol}]
  route:
    - {destination: {host: svc.test, subset: v1}, weight: 20}
    - {destination: {host: svc.test, subset: v2}, weight: 80}
"""
WARMUP = 2000


async def main(n: int, frames: int) -> None:
    engine = Engine(loads_config(mesh([(1, "v1"), (1, "v2")], router=ROUTER)))
    await engine.start()
    made: list[Any] = []

    async def connect(factory: Any, host: str, port: int, **kwargs: Any) -> tuple[Any, Any]:
        protocol = factory()
        transport = FakeTransport()
        protocol.connection_made(transport)
        made.append(protocol)
        return transport, protocol

    engine.loop.create_connection = connect  # type: ignore[method-assign]
    down = Downstream(next(iter(engine.listeners.values())))
    down_t = FakeTransport()
    down.connection_made(down_t)  # type: ignore[arg-type]
    ids = range(1, 1001)
    wire = {
        sid: (
            build_frame(STREAM_OPEN, sid, {"method": "echo"}),
            build_frame(STREAM_DATA, sid, body=b"x" * 64),
            build_frame(STREAM_HALF_CLOSE, sid),
        )
        for sid in ids
    }

    async def one(sid: int) -> None:
        init, data, half_close = wire[sid]
        down.data_received(init)
        while not made:  # the connect task runs
            await asyncio.sleep(0)
        up = made.pop()
        up.data_received(init)  # the upstream's answer
        for _ in range(frames):
            down.data_received(data)
            up.data_received(data)
        down.data_received(half_close)
        up.data_received(half_close)  # the stream ends: its connection closes
        up.connection_lost(None)
        await asyncio.sleep(0)  # the queued writes
        down_t.calls.clear()

    for i in range(WARMUP):
        await one(ids[i % len(ids)])
    assert not down.streams and not engine.upstreams
    start = time.process_time()
    for i in range(n):
        await one(ids[i % len(ids)])
    took = time.process_time() - start
    print(f"{n} streams of {frames} data frames each way: {took / n * 1e6:.2f} us CPU per stream")
    await engine.stop(drain=0.1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int, nargs="?", default=20_000, help="streams measured")
    parser.add_argument("--frames", type=int, default=4, help="data frames each way")
    args = parser.parse_args()
    uvloop.run(main(args.n, args.frames))
