"""``metaprotocol proxy`` with ``spec.xds``: the process subscribes as its node and serves the
routes it receives; an engine without ``spec.xds`` never imports gRPC."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from control_plane import ControlPlane
from snapshots import CLUSTER_TYPE, ENDPOINT_TYPE, HOST, PORT, ROUTE_TYPE, hello_snapshots
from test_engine_xds import NODE, OTHER_SERVICE, config_yaml

from metaprotocol_sdk.demo.idl import hello, untyped
from metaprotocol_sdk.demo.thrift_server import HelloServer


def test_the_cli_serves_routes_from_the_control_plane(tmp_path: Path) -> None:
    v1, v2 = HelloServer("v1").start(), HelloServer("v2").start()
    cp = ControlPlane().start()
    try:
        version, resources = hello_snapshots([("127.0.0.1", v1.port)], [("127.0.0.1", v2.port)])[1]
        cp.set_snapshot(version, resources)  # sayHello goes to v2
        config = tmp_path / "sidecar.yaml"
        config.write_text(config_yaml(cp.port))
        with subprocess.Popen(
            [sys.executable, "-m", "metaprotocol_sdk", "proxy", "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=dict(os.environ),
        ) as proc:
            try:
                assert proc.stdout is not None
                assert proc.stdout.readline().strip() == f"xds from 127.0.0.1:{cp.port} as {NODE}"
                listening = proc.stdout.readline()
                port = int(listening.rsplit(":", 1)[1])
                for type_url in (CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE):
                    cp.wait(lambda _r, t=type_url: cp.acked(t, version, NODE))
                client = untyped("thriftpy2.rpc").make_client(
                    hello().Hello,
                    "127.0.0.1",
                    port,
                    trans_factory=untyped("thriftpy2.transport").TFramedTransportFactory(),
                    timeout=10_000,
                )
                try:
                    assert client.sayHello("cli") == "v2: hello cli"
                    # SIGHUP with a listener added: the files change, the xDS routes stay.
                    listeners = f'[{{host: {HOST}, port: {PORT}, bind: "127.0.0.1:0"}}]'
                    both = listeners[:-1] + ', {host: other.svc, port: 9091, bind: "127.0.0.1:0"}]'
                    config.write_text(OTHER_SERVICE + config_yaml(cp.port).replace(listeners, both))
                    proc.send_signal(signal.SIGHUP)
                    cp.wait(
                        lambda reqs: any(
                            r.type_url == ROUTE_TYPE and "other.svc_9091" in r.names for r in reqs
                        )
                    )
                    assert client.sayHello("again") == "v2: hello again"
                finally:
                    client.close()
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=10) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=5)
    finally:
        cp.close()
        v1.close()
        v2.close()


def test_an_engine_without_xds_does_not_import_grpc() -> None:
    code = (
        "import sys\n"
        "from metaprotocol_sdk.cli import proxy\n"
        "from metaprotocol_sdk.proxy import Engine, loads_config\n"
        "loads_config('kind: ProxyConfig\\nmetadata: {name: p}\\nspec: {}\\n')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'envoy')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
