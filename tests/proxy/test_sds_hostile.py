"""The SDS identity (``spec.meshIdentity.sds``) against a hostile or buggy server and a
hostile environment, over real Unix sockets: a reload naming another server and back, the
same secret twice in one response, the private directory replaced or removed under the
engine, a socket path that is no socket. The agent is the tests' (``tests/sds_agent.py``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from google.protobuf import any_pb2
from mesh_pki import MeshCa
from peer_check import missing
from proxy_kit import Upstream, engine_for, mesh, run, until

try:
    from sds_agent import SdsAgent, certificate_secret
except ImportError:
    missing("the xds extra (grpcio, xds-protos)", "pip install -e '.[xds]'")

import test_sds
from test_sds import identity_secrets, rotations, sds, serving

from metaprotocol_sdk.proxy import loads_config
from metaprotocol_sdk.proxy.sds import existing_store

ca, socket_dir, agent = test_sds.ca, test_sds.socket_dir, test_sds.agent  # the fixtures


def started(ca: MeshCa, path: Path) -> SdsAgent:
    server = SdsAgent(str(path))
    default, root, _ = identity_secrets(ca)
    server.set(default, root)
    return server.start()


def test_a_reload_back_to_a_server_fetches_its_secrets_again(ca: MeshCa, socket_dir: Path) -> None:
    """A reload naming another server, then the first again: the secrets of the first, not
    followed meanwhile, are fetched again (those held from before may be hours old, or
    expired), not read from what this process held."""
    first, second = started(ca, socket_dir / "a"), started(ca, socket_dir / "b")

    async def main() -> None:
        up = await Upstream("v1").start()
        texts = [
            mesh([(up.port, "v1")], listener_tls="{mode: ISTIO_MUTUAL}", proxy=sds(server))
            for server in (first, second)
        ]
        try:
            async with engine_for(texts[0]) as engine:
                await until(lambda: engine.sds is not None and engine.sds.connected, "stream")
                await engine.apply(await asyncio.to_thread(loads_config, texts[1], "t.yaml"))
                chain, key, _ = ca.workload("engine", hours=48)
                first.set(certificate_secret("default", chain, key))  # rotated, unseen
                back = await asyncio.to_thread(loads_config, texts[0], "t.yaml")
                settings = back.proxy.mesh_identity
                assert settings is not None and settings.sds is not None
                store = existing_store(settings.sds)
                assert store is not None and store.pems["certificateChain"] == chain
                with open(settings.certificate_chain, "rb") as held:
                    assert held.read() == chain
                await engine.apply(back)
                await until(lambda: engine.sds is not None and engine.sds.connected, "again")
                assert engine.sds.store is store
        finally:
            await up.close()

    try:
        run(main())
    finally:
        first.close()
        second.close()


def test_the_same_secret_twice_in_one_response_is_nacked(
    ca: MeshCa, agent: tuple[SdsAgent, int]
) -> None:
    """Two ``default`` secrets in one response, each usable: which one the server means is
    not the engine's to guess (Envoy takes one secret per response). NACKed, naming it; the
    identity in force is kept."""
    server, _ = agent

    async def main() -> None:
        async with serving(server) as (engine, _):
            raw = []
            for _ in range(2):
                chain, key, _ = ca.workload("engine")
                packed = any_pb2.Any()
                packed.Pack(certificate_secret("default", chain, key))
                raw.append(packed)
            server.push(raw=raw)
            await until(lambda: any(r.error for r in server.requests), "the NACK")
            nack = next(r for r in server.requests if r.error)
            assert "Secret 'default': twice in one response" in (nack.error or "")
            assert rotations(engine, "ok") == 0 and rotations(engine, "failed") == 1

    run(main())
