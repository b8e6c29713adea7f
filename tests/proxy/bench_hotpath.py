"""CPU per request of the engine's Python work, without sockets (KV codec included).

Run: ``.venv/bin/python tests/proxy/bench_hotpath.py [N]``. Fake transports stand in for the
sockets, so this measures decode, routing, id rewriting, encode and bookkeeping only; add
the event loop and syscalls for an end-to-end figure.
"""

from __future__ import annotations

import struct
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).parent))

from proxy_kit import mesh, wire_fakes

from metaprotocol_sdk.examples.kv import REQUEST, RESPONSE, build_frame
from metaprotocol_sdk.proxy import Engine, loads_config

ROUTER = """\
- name: hello
  match: {attributes: {method: {exact: sayHello}}}
  route: [{destination: {host: svc.test, subset: v1}}]
"""


async def main(n: int) -> None:
    engine = Engine(loads_config(mesh([(1, "v1")], router=ROUTER)))
    await engine.start()
    down, down_t, up, up_t = wire_fakes(engine)
    request = build_frame(REQUEST, 7, {"method": "sayHello", "interface": "greeter"}, b"x" * 64)
    responses = [build_frame(RESPONSE, i, {"s": "1"}, b"ok") for i in range(n + 2001)]

    def one() -> None:
        down.data_received(request)
        up._flush()  # normally run by the loop once it has delivered all it read
        wire_id = struct.unpack_from(">I", up_t.calls[0][0], 4)[0]
        up_t.calls.clear()
        up.data_received(responses[wire_id])
        down_t.calls.clear()

    for _ in range(2000):
        one()
    start = time.process_time()
    for _ in range(n):
        one()
    took = time.process_time() - start
    print(f"{n} requests: {took / n * 1e6:.1f} us CPU per request (engine + KV codec, no I/O)")
    await engine.stop(drain=0.1)


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000))
