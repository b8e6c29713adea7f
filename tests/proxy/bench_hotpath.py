"""CPU per request of the engine's Python work, without sockets (codec included).

Run: ``.venv/bin/python tests/proxy/bench_hotpath.py [N] [--dubbo | --dedicated]``. Fake
transports stand in for the sockets, so this measures decode, routing, id rewriting, encode and
bookkeeping only; add the event loop and syscalls for an end-to-end figure. By default the KV
example codec with one route; ``--dubbo``: the Dubbo codec with the routes of
``bench/bench_proxy.py`` (a weighted split whose route writes an attachment), its 16-byte
request and reply; ``--dedicated``: the KV codec without id rewriting, so that the client's
requests go over an upstream connection of its own (per-client pooling). ``--istio`` (or
``--istio-destination``) adds Istio's standard metrics (``telemetry.istioMetrics``, reporter
``source``, or ``destination``) to any of these.
"""

from __future__ import annotations

import struct
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_kit import FakeTransport, mesh, wire_fakes

from metaprotocol_sdk.examples.kv import REQUEST, RESPONSE, build_frame
from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.config.models import Telemetry

HERE = Path(__file__).resolve().parent

ROUTER = """\
- name: hello
  match: {attributes: {method: {exact: sayHello}}}
  route: [{destination: {host: svc.test, subset: v1}}]
"""

#: The routes of the proxy benchmark's engine (``bench/proxy/configs.py``), on one subset.
DUBBO_ROUTER = """\
- name: sayhello-to-v2
  match: {attributes: {method: {exact: sayHello}}}
  route: [{destination: {host: svc.test, subset: v1}}]
- name: split
  requestMutation: [{key: x-bench, value: metaprotocol}]
  route:
    - {destination: {host: svc.test, subset: v1}, weight: 20}
    - {destination: {host: svc.test, subset: v1}, weight: 80}
"""


def kv_wire() -> tuple[str, bytes, Callable[[bytes], int], Callable[[int], bytes]]:
    """The KV mesh, its request, how to read a sent request's id, and the reply to an id."""
    request = build_frame(REQUEST, 7, {"method": "sayHello", "interface": "greeter"}, b"x" * 64)
    return (
        mesh([(1, "v1")], router=ROUTER),
        request,
        lambda frame: struct.unpack_from(">I", frame, 4)[0],
        lambda wire_id: build_frame(RESPONSE, wire_id, {"s": "1"}, b"ok"),
    )


def dedicated_wire() -> tuple[str, bytes, Callable[[bytes], int], Callable[[int], bytes]]:
    """The KV mesh without id rewriting: the upstream sees (and answers) the client's id."""
    _, request, wire_id_of, reply_to = kv_wire()
    text = mesh([(1, "v1")], router=ROUTER, protocol="kvnr", codec="proxy_kit:NoRewriteKVCodec")
    return text, request, wire_id_of, reply_to


def dubbo_wire() -> tuple[str, bytes, Callable[[bytes], int], Callable[[int], bytes]]:
    """The same for Dubbo, with the benchmark's frames."""
    sys.path.insert(0, str(HERE.parents[1] / "bench" / "proxy"))
    from wire import dubbo_reply, dubbo_request

    text = mesh(
        [(1, "v1")],
        router=DUBBO_ROUTER,
        protocol="dubbo",
        codec="aeraki.meta_protocol.codec.dubbo",
    )
    return (
        text,
        dubbo_request(16, 7),
        lambda frame: struct.unpack_from(">Q", frame, 4)[0],
        lambda wire_id: dubbo_reply(16, wire_id),
    )


async def main(n: int, mode: str, reporter: str | None = None) -> None:
    wire = {"dubbo": dubbo_wire, "dedicated": dedicated_wire}.get(mode, kv_wire)
    text, request, wire_id_of, reply_to = wire()
    config = loads_config(text)
    if reporter is not None:
        telemetry = Telemetry(istio_metrics=True, reporter=reporter)
        config = replace(config, proxy=replace(config.proxy, telemetry=telemetry))
    engine = Engine(config)
    await engine.start()
    down, down_t, up, up_t = wire_fakes(engine)
    if mode == "dedicated":  # the client's own connection instead of the shared one
        up.cluster.hosts[0].conns.clear()
        up = type(up)(up.cluster, up.host, down)
        up_t = FakeTransport()
        up.connection_made(up_t)  # type: ignore[arg-type]
        engine.upstreams.add(up)
        up.cluster.connections += 1
        down.dedicated[(up.cluster.name, up.host.key)] = up
        engine.clients_with_upstream += 1
    replies = [reply_to(wire_id) for wire_id in range(n + 2001)]  # ids go 1, 2, 3...

    def one() -> None:
        down.data_received(request)
        up._flush()  # normally run by the loop once it has delivered all it read
        wire_id = wire_id_of(up_t.calls[0][0])
        up_t.calls.clear()
        up.data_received(replies[wire_id])
        down_t.calls.clear()

    for _ in range(2000):
        one()
    start = time.process_time()
    for _ in range(n):
        one()
    took = time.process_time() - start
    codec = {"dubbo": "Dubbo", "dedicated": "KV (per-client connection)"}.get(mode, "KV")
    istio = "" if reporter is None else f", Istio metrics ({reporter})"
    print(
        f"{n} requests: {took / n * 1e6:.2f} us CPU per request "
        f"(engine + {codec} codec{istio}, no I/O)"
    )
    await engine.stop(drain=0.1)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    flags = [a[2:] for a in sys.argv[1:] if a.startswith("--")]
    reporters = {"istio": "source", "istio-destination": "destination"}
    modes = [f for f in flags if f not in reporters]
    reporter = next((reporters[f] for f in flags if f in reporters), None)
    uvloop.run(main(int(args[0]) if args else 100_000, modes[0] if modes else "kv", reporter))
