"""Streams with routes and clusters from a control plane: an update of the route, of the
endpoints (EDS) and the control plane going away, while streams are open. The KV stream
server and client of ``tests/proxy/test_streams.py``, the engine and its xDS client on the
test's event loop, the test control plane in its thread."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "proxy"))

from control_plane import ControlPlane
from proxy_kit import address, run, until
from snapshots import hello_snapshots
from test_streams import StreamClient, StreamServer, kinds

from metaprotocol_sdk.examples.kv import STREAM_DATA, STREAM_HALF_CLOSE, STREAM_OPEN
from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.xds.client import XdsClient

HOST, PORT = "svc.test", 9000
NODE = "sidecar~127.0.0.1~engine.default~default.svc.cluster.local"


def config_yaml(xds_port: int) -> str:
    return f"""
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: ApplicationProtocol
metadata: {{name: kv}}
spec: {{protocol: kv, codec: "metaprotocol_sdk.examples.kv:KVCodec"}}
---
kind: ServiceEntry
metadata: {{name: svc}}
spec:
  hosts: [{HOST}]
  ports: [{{number: {PORT}, name: tcp-metaprotocol-kv-svc}}]
---
kind: ProxyConfig
metadata: {{name: proxy}}
spec:
  listeners: [{{host: {HOST}, port: {PORT}, bind: "127.0.0.1:0"}}]
  timeouts: {{drain: 300ms}}
  xds:
    address: "127.0.0.1:{xds_port}"
    node: {{id: "{NODE}"}}
    backoff: {{initial: 20ms, max: 200ms}}
"""


def acked(version: str):  # type: ignore[no-untyped-def]
    return lambda c: all(state.version == version for state in c.types.values())


def test_streams_across_route_and_endpoint_updates_and_the_control_plane_going_away() -> None:
    """Version 1 routes ``chat`` to subset v1 (endpoints a, b): two streams, one on each.
    Version 2 sends ``chat`` to v2: the open streams go on where they are, a new one goes
    to c. Version 4 removes endpoint a (EDS only): its stream is reset with
    ``UpstreamReset`` at the drain deadline, the others go on. The control plane goes
    away: every stream left still goes both ways, and closes."""
    cp = ControlPlane().start()

    async def main() -> None:
        a, b, c = [await StreamServer(n).start() for n in "abc"]
        versions = hello_snapshots(
            [("127.0.0.1", a.port), ("127.0.0.1", b.port)],
            [("127.0.0.1", c.port)],
            host=HOST,
            port=PORT,
            match={"method": "chat"},
        )
        cp.set_snapshot(*versions[0])
        config = loads_config(config_yaml(cp.port))
        engine = Engine(config)
        await engine.start()
        xds = XdsClient(engine, config)
        xds.start()
        try:
            await xds.wait_for(acked("1"), 20)
            client = await StreamClient.connect(address(engine))
            for sid in (1, 2):
                client.frame(STREAM_OPEN, sid, {"method": "chat"})
            opened = [await client.until(sid, 1) for sid in (1, 2)]
            servers = {f[0].attributes.get("server") for f in opened}
            assert servers == {"a", "b"}, servers
            on_a = 1 if opened[0][0].attributes.get("server") == "a" else 2
            on_b = 3 - on_a
            cp.set_snapshot(*versions[1])
            await xds.wait_for(acked("2"), 20)
            client.frame(STREAM_OPEN, 3, {"method": "chat"})
            assert (await client.until(3, 1))[0].attributes.get("server") == "c"
            for sid in (1, 2, 3):
                client.frame(STREAM_DATA, sid, {}, b"v2")
            for sid in (1, 2, 3):
                assert bytes((await client.until(sid, 2))[1].body) == b"V2"
            cp.set_snapshot(*versions[2])
            await xds.wait_for(acked("3"), 20)
            cp.set_snapshot(*versions[3])
            await xds.wait_for(acked("4"), 20)
            reset = (await client.until(on_a, 3))[2]
            assert reset.attributes.get("error-type") == "UpstreamReset", reset.attributes
            cp.stop()
            await xds.wait_for(lambda x: not x.status()["connected"], 20)
            for sid in (on_b, 3):
                client.frame(STREAM_DATA, sid, {}, b"alone")
                client.frame(STREAM_HALF_CLOSE, sid)
            for sid in (on_b, 3):
                frames = await client.until(sid, 4)
                assert kinds(frames)[2:] == ["Stream_Data", "Stream_Close_One_Way"]
                assert bytes(frames[2].body) == b"ALONE"
            total = engine.stats.total
            await until(lambda: total("metaprotocol_streams_total", outcome="closed") == 2, "2")
            assert total("metaprotocol_streams_total", outcome="UpstreamReset") == 1
            assert total("metaprotocol_streams_active") == 0
            client.close()
        finally:
            await xds.stop()
            await engine.stop(drain=0.5)
            for server in (a, b, c):
                await server.close()

    try:
        run(main(), timeout=60)
    finally:
        cp.close()
