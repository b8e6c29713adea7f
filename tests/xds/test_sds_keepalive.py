"""The SDS identity's stream to a server at ``host:port`` that goes silent without closing
the connection (its node vanished, a NAT entry expired): HTTP/2 keepalive notices it and the
stream is reopened, so rotations pushed afterwards are served (without it the engine
believed itself connected and missed every rotation until its certificate expired)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import pytest
from control_plane import BlackHole
from mesh_pki import MeshCa
from sds_agent import SdsAgent, certificate_secret, root_secret
from test_sds_envoy import engine_config

from metaprotocol_sdk import ConfigError
from metaprotocol_sdk.proxy import Engine, loads_config


def text(address: str, extra: str = "") -> str:
    return engine_config(address, 1).replace(f"'{address}'", f"'{address}'{extra}")


async def until(check: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def rotations(engine: Engine) -> int:
    return int(engine.stats.get("metaprotocol_tls_identity_rotations_total", result="ok") or 0)


def test_an_sds_server_gone_silent_is_noticed_by_keepalive_and_the_stream_reopened() -> None:
    ca = MeshCa()
    chain, key, _ = ca.workload("engine")
    agent = SdsAgent("127.0.0.1:0")
    agent.set(certificate_secret("default", chain, key), root_secret("ROOTCA", ca.pem))
    agent.start()
    hole = BlackHole(int(agent.address.rsplit(":", 1)[1]))

    async def main() -> None:
        config = loads_config(
            text(f"127.0.0.1:{hole.port}", ", keepalive: {time: 1s, timeout: 1s}"), "t.yaml"
        )
        engine = Engine(config)
        await engine.start()
        try:
            watch = engine.sds
            assert watch is not None
            await until(lambda: watch.connected, "the stream")
            hole.swallow()
            chain, key, _ = ca.workload("engine", hours=48)
            agent.push(certificate_secret("default", chain, key))  # into the silent one
            await until(lambda: rotations(engine) == 1, "the rotation", timeout=30)
            assert watch.reconnects == 1
        finally:
            await engine.stop(drain=0)

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        hole.close()
        agent.close()


def test_the_sds_keepalive_settings_are_checked() -> None:
    for bad, why in [
        ("{time: 500ms}", "spec.meshIdentity.sds.keepalive.time: must be between 1s and 24h"),
        ("{timeout: 2h}", "spec.meshIdentity.sds.keepalive.timeout: must be between 1s and 1h"),
        ("{every: 1s}", "every"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(why)):
            loads_config(text("127.0.0.1:1", f", keepalive: {bad}"), "t.yaml")
