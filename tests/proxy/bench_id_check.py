"""Cost of the check of the request id ``encode`` wrote (``UpstreamConnection._check_id``).

Run: ``.venv/bin/python tests/proxy/bench_id_check.py [N]``. For the KV, Dubbo and Thrift
codecs, the time of one check (a fresh codec of the connection's class decoding the encoded
request again), which each shared upstream connection pays for its first
``ENCODE_CHECKS`` requests only, and so per connection: ``ENCODE_CHECKS`` times that. The
requests after them pay one attribute test (``bench_hotpath.py`` measures the whole path).
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "proxy"))

from proxy_kit import mesh, wire_fakes
from wire import dubbo_request, thrift_request

from metaprotocol_sdk import Metadata, join_encoded
from metaprotocol_sdk.examples.kv import REQUEST, build_frame
from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.upstream import ENCODE_CHECKS

ROUTER = "- name: all\n  route: [{destination: {host: svc.test}}]\n"
CODECS = {
    "KV": (
        "kv",
        "metaprotocol_sdk.examples.kv:KVCodec",
        build_frame(REQUEST, 7, {"method": "sayHello", "interface": "greeter"}, b"x" * 64),
    ),
    "Dubbo": ("dubbo", "aeraki.meta_protocol.codec.dubbo", dubbo_request(16, 7)),
    "Thrift": ("thrift", "aeraki.meta_protocol.codec.thrift", thrift_request(16, 7)),
}


async def one(name: str, n: int) -> None:
    protocol, codec, request = CODECS[name]
    text = mesh([(1, "v1")], router=ROUTER, protocol=protocol, codec=codec)
    engine = Engine(loads_config(text))
    await engine.start()
    _, _, up, _ = wire_fakes(engine)
    message = up.codec.decode(bytearray(request))
    encoded = up.codec.encode(message, None, request_id=7)
    again = up.cluster.new_codec().decode(bytearray(join_encoded(encoded)))  # a verdict
    assert isinstance(again, Metadata) and again.request_id == 7, again

    def check() -> None:
        up.id_probes = 1
        up._check_id(encoded, 7)

    took = min(timeit.repeat(check, number=n, repeat=5)) / n
    print(
        f"{name}: {took * 1e6:.2f} us per check, {took * ENCODE_CHECKS * 1e6:.2f} us per "
        f"shared connection ({ENCODE_CHECKS} checks)"
    )
    await engine.stop(drain=0.1)


async def main(n: int) -> None:
    for name in CODECS:
        await one(name, n)


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000))
