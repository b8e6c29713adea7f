"""The workload identity from istio-agent's SDS socket (``spec.meshIdentity.sds``), over real
sockets on 127.0.0.1 and a Unix socket: the secrets fetched at load, a rotation pushed and
served to the next connections both ways, a pushed secret that cannot be used NACKed with the
identity kept, a stream broken and reopened, a start that waits for the agent, and the
configuration's checks. The agent is the tests' (``tests/sds_agent.py``: istio-agent's SDS
server played on Envoy's official protos; Envoy reads it too, ``tests/xds/test_sds_envoy.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from mesh_pki import MeshCa
from peer_check import missing
from proxy_kit import Client, Upstream, address, engine_for, error_type, http_get, mesh, run, until

try:
    from sds_agent import SECRET_TYPE, SdsAgent, certificate_secret, root_secret
except ImportError:
    missing("the xds extra (grpcio, xds-protos)", "pip install -e '.[xds]'")

from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import any_pb2

from metaprotocol_sdk import ConfigError
from metaprotocol_sdk.proxy import Config, Engine, loads_config
from metaprotocol_sdk.proxy.sds import MIN_ROTATION_GAP, existing_store


@pytest.fixture
def ca() -> MeshCa:
    return MeshCa()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for the agent's socket (a Unix socket's path is at most 107 bytes,
    and pytest's directories are long)."""
    path = Path(tempfile.mkdtemp(prefix="sds-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def identity_secrets(ca: MeshCa, sa: str = "engine", hours: float = 24) -> tuple[Any, Any, int]:
    chain, key, serial = ca.workload(sa, hours)
    return certificate_secret("default", chain, key), root_secret("ROOTCA", ca.pem), serial


@pytest.fixture
def agent(ca: MeshCa, socket_dir: Path) -> Iterator[tuple[SdsAgent, int]]:
    """istio-agent's SDS server holding the ``engine`` workload's secrets; their serial."""
    server = SdsAgent(str(socket_dir / "socket"))
    default, root, serial = identity_secrets(ca)
    server.set(default, root)
    server.start()
    yield server, serial
    server.close()


def sds(agent: SdsAgent, extra: str = "") -> str:
    return f"meshIdentity: {{sds: {{address: '{agent.address}'{extra}}}}}\n"


@contextlib.asynccontextmanager
async def serving(server: SdsAgent) -> AsyncIterator[tuple[Engine, str]]:
    """An engine whose ``ISTIO_MUTUAL`` listener serves the identity ``server`` holds, once
    its stream is answered; and its configuration's text."""
    up = await Upstream("v1").start()
    text = mesh([(up.port, "v1")], listener_tls="{mode: ISTIO_MUTUAL}", proxy=sds(server))
    try:
        async with engine_for(text) as engine:
            await until(lambda: engine.sds is not None and engine.sds.connected, "the stream")
            yield engine, text
    finally:
        await up.close()


def peer_serial(transport: Any) -> int:
    der = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return int(x509.load_der_x509_certificate(der).serial_number)


def rotations(engine: Any, result: str) -> int:
    return int(engine.stats.get("metaprotocol_tls_identity_rotations_total", result=result) or 0)


def acks(agent: SdsAgent, version: str) -> bool:
    return any(r.version == version and r.nonce and r.error is None for r in agent.requests)


def test_the_identity_comes_from_the_agent_and_a_pushed_rotation_serves_the_next_connections(
    ca: MeshCa, tmp_path: Path, agent: tuple[SdsAgent, int]
) -> None:
    """The secrets fetched at load serve both ways; a new ``default`` pushed is served to the
    next connections at once (open ones keep theirs), counted, and ACKed."""
    server, first = agent
    upstream_ctx = ca.server_context(tmp_path, "greeter")

    async def main() -> None:
        up = await Upstream("v1").start(ssl=upstream_ctx)
        text = mesh(
            [(up.port, "v1")],
            traffic_policy="{tls: {mode: ISTIO_MUTUAL}}",
            listener_tls="{mode: ISTIO_MUTUAL}",
            proxy=sds(server),
        )
        async with engine_for(text) as engine:
            before = await Client.connect(
                address(engine), ssl=ca.client_context(tmp_path, "frontend")
            )
            assert before.transport is not None and peer_serial(before.transport) == first
            assert error_type(await before.call("get")) is None
            (old_up,) = up.connections
            assert old_up.transport is not None and peer_serial(old_up.transport) == first
            await until(lambda: engine.sds is not None and engine.sds.connected, "the stream")

            chain, key, second = ca.workload("engine", hours=48)
            server.push(certificate_secret("default", chain, key))
            await until(lambda: rotations(engine, "ok") == 1, "the rotation")
            pushed = server.sent[-1][1]
            await until(lambda: acks(server, pushed), "the ACK of the push")

            after = await Client.connect(address(engine), ssl=ca.client_context(tmp_path, "x"))
            assert after.transport is not None and peer_serial(after.transport) == second
            assert error_type(await after.call("get")) is None
            assert error_type(await before.call("get")) is None  # open: still served
            assert old_up.transport is not None
            old_up.transport.close()
            await until(lambda: not engine.upstreams, "the upstream connection closed")
            assert error_type(await after.call("get")) is None
            new_up = next(c for c in up.connections if c is not old_up)
            assert new_up.transport is not None and peer_serial(new_up.transport) == second
            assert rotations(engine, "failed") == 0

            assert engine.admin_address is not None
            _, body = await http_get(engine.admin_address, "/config_dump")
            dumped = json.loads(body)["meshIdentity"]
            assert dumped["sds"]["address"] == server.address
            assert dumped["sds"]["connected"] is True
            assert dumped["sds"]["version"] == pushed
            assert dumped["sds"]["secrets"] == ["default", "ROOTCA"]
            before.close()
            after.close()
        await up.close()

    run(main())


def test_the_secrets_are_private_files(ca: MeshCa, agent: tuple[SdsAgent, int]) -> None:
    server, _ = agent
    config = loads_config(mesh([(1, "v1")], proxy=sds(server)), "test.yaml")
    settings = config.proxy.mesh_identity
    assert settings is not None and settings.sds is not None
    store = existing_store(settings.sds)
    assert store is not None
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
    for path in (settings.certificate_chain, settings.private_key, settings.root_certificates):
        assert os.path.dirname(path) == store.directory
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # No engine follows it: a second load fetches the secrets again (what is held may be
    # old), into the same files. (One an engine follows is read as it is: the reload test.)
    streams = {r.stream for r in server.requests}
    again = loads_config(mesh([(1, "v1")], proxy=sds(server)), "test.yaml")
    assert again.proxy.mesh_identity == settings
    assert len({r.stream for r in server.requests} - streams) == 1
    assert existing_store(settings.sds) is store
    assert server.requests[0].node_id.startswith("sidecar~")
    assert server.requests[0].names == ("default", "ROOTCA")


def _unsupported_field() -> Any:
    chain, key, _ = MeshCa().workload("engine")
    secret = certificate_secret("default", chain, key)
    secret.tls_certificate.password.inline_string = "x"
    return secret


def _file_source(ca: MeshCa) -> Any:
    secret = secret_pb2.Secret(name="default")
    secret.tls_certificate.certificate_chain.filename = "/etc/certs/cert-chain.pem"
    secret.tls_certificate.private_key.filename = "/etc/certs/key.pem"
    return secret


@pytest.mark.parametrize(
    "broken,words",
    [
        ("mismatched_key", "Secret 'default'"),
        ("another_root", "Secret 'default'"),
        ("expired", "expired"),
        ("garbage", "Secret 'default'"),
        ("unsupported_field", "tls_certificate.password: not supported"),
        ("file_source", "only inline_bytes and inline_string"),
        ("not_a_secret", "not a Secret"),
        ("root_without_ca", "Secret 'ROOTCA': no validation_context"),
    ],
)
def test_a_pushed_secret_that_cannot_be_used_is_nacked_and_the_identity_kept(
    ca: MeshCa, tmp_path: Path, agent: tuple[SdsAgent, int], broken: str, words: str
) -> None:
    server, first = agent

    async def main() -> None:
        async with serving(server) as (engine, _):
            chain, key, _ = ca.workload("engine")
            raw = None
            secrets: list[Any] = []
            if broken == "mismatched_key":
                secrets = [certificate_secret("default", chain, ca.workload("x")[1])]
            elif broken == "another_root":
                other_chain, other_key, _ = MeshCa("another").workload("engine")
                secrets = [certificate_secret("default", other_chain, other_key)]
            elif broken == "expired":
                old_chain, old_key, _ = ca.workload("engine", hours=-0.01)
                secrets = [certificate_secret("default", old_chain, old_key)]
            elif broken == "garbage":
                secrets = [certificate_secret("default", b"not a certificate", key)]
            elif broken == "unsupported_field":
                secrets = [_unsupported_field()]
            elif broken == "file_source":
                secrets = [_file_source(ca)]
            elif broken == "not_a_secret":
                raw = [any_pb2.Any(type_url=SECRET_TYPE, value=b"\xff\xff\xff")]
            else:
                secrets = [secret_pb2.Secret(name="ROOTCA")]
            server.push(*secrets, raw=raw)
            await until(lambda: rotations(engine, "failed") == 1, "the refusal counted")
            nack = next(r for r in server.requests if r.error is not None)
            assert words in nack.error, nack.error
            assert rotations(engine, "ok") == 0
            conn = await Client.connect(address(engine), ssl=ca.client_context(tmp_path, "x"))
            assert conn.transport is not None and peer_serial(conn.transport) == first
            assert error_type(await conn.call("get")) is None
            conn.close()
            assert engine.admin_address is not None
            _, body = await http_get(engine.admin_address, "/config_dump")
            dumped = json.loads(body)["meshIdentity"]
            assert words in dumped["lastRotationError"]
            assert dumped["sds"]["nacks"] == 1
            # A usable secret pushed next is taken.
            server.push(certificate_secret("default", chain, key))
            await until(lambda: rotations(engine, "ok") == 1, "the rotation")

    run(main())


def test_a_broken_stream_is_reopened_and_the_identity_kept(
    ca: MeshCa, tmp_path: Path, agent: tuple[SdsAgent, int]
) -> None:
    """istio-agent restarting: the identity in force serves meanwhile; the engine opens a new
    stream (asking with the version it holds), and a rotation pushed then is served."""
    server, first = agent

    async def main() -> None:
        async with serving(server) as (engine, _):
            watch = engine.sds
            assert watch is not None
            streams = {r.stream for r in server.requests}
            held = watch.version
            server.drop_streams()
            await until(lambda: watch.reconnects == 1, "a new stream")
            await until(lambda: {r.stream for r in server.requests} - streams, "its request")
            reopened = next(r for r in server.requests if r.stream not in streams)
            assert reopened.version == held
            conn = await Client.connect(address(engine), ssl=ca.client_context(tmp_path, "x"))
            assert conn.transport is not None and peer_serial(conn.transport) == first
            conn.close()
            await until(lambda: watch.connected, "the new stream answered")
            chain, key, second = ca.workload("engine")
            server.push(certificate_secret("default", chain, key))
            await until(lambda: rotations(engine, "ok") == 1, "the rotation")
            conn = await Client.connect(address(engine), ssl=ca.client_context(tmp_path, "x"))
            assert conn.transport is not None and peer_serial(conn.transport) == second
            conn.close()

    run(main())


def test_a_reload_keeps_the_stream_and_the_rotations(
    ca: MeshCa, tmp_path: Path, agent: tuple[SdsAgent, int]
) -> None:
    server, _ = agent

    async def main() -> None:
        async with serving(server) as (engine, text):
            watch = engine.sds
            assert watch is not None
            chain, key, second = ca.workload("engine")
            server.push(certificate_secret("default", chain, key))
            await until(lambda: rotations(engine, "ok") == 1, "the rotation")
            await engine.apply(loads_config(text, "test.yaml"))
            assert engine.sds is watch and watch.connected
            conn = await Client.connect(address(engine), ssl=ca.client_context(tmp_path, "x"))
            assert conn.transport is not None and peer_serial(conn.transport) == second
            conn.close()
            chain, key, third = ca.workload("engine")
            server.push(certificate_secret("default", chain, key))
            await until(lambda: rotations(engine, "ok") == 2, "the next rotation")
            conn = await Client.connect(address(engine), ssl=ca.client_context(tmp_path, "x"))
            assert conn.transport is not None and peer_serial(conn.transport) == third
            conn.close()
            streams = {r.stream for r in server.requests}
            assert len(streams) == 2  # the load's fetch, and the engine's one stream

    run(main())


def test_the_load_waits_for_the_agent_to_come_up(ca: MeshCa, socket_dir: Path) -> None:
    """The engine may start before istio-agent: the load waits (up to initialFetchTimeout)
    for its socket to appear and answer."""
    server = SdsAgent(str(socket_dir / "socket"))
    default, root, _ = identity_secrets(ca)
    server.set(default, root)
    outcome: list[Config | BaseException] = []

    def load() -> None:
        text = mesh([(1, "v1")], proxy=sds(server, ", initialFetchTimeout: 20s"))
        try:
            outcome.append(loads_config(text, "test.yaml"))
        except BaseException as exc:
            outcome.append(exc)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        server.start()  # after the load began: its first attempts found no socket
        loader.join(30)
    finally:
        server.close()
    (result,) = outcome
    assert isinstance(result, Config), result
    assert result.proxy.mesh_identity is not None


def load_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        loads_config(text, "test.yaml")
    return caught.value


def test_no_agent_is_an_error_naming_the_socket(socket_dir: Path) -> None:
    path = socket_dir / "socket"
    text = mesh(
        [(1, "v1")],
        proxy=f"meshIdentity: {{sds: {{address: 'unix:{path}', initialFetchTimeout: 200ms}}}}\n",
    )
    exc = load_error(text)
    assert exc.field == "spec.meshIdentity.sds"
    assert "no secret 'ROOTCA' or 'default'" in str(exc) and "within 0.2s" in str(exc)
    assert f"{path} does not exist" in str(exc)


def test_an_agent_without_the_root_is_an_error_naming_it(ca: MeshCa, socket_dir: Path) -> None:
    server = SdsAgent(str(socket_dir / "socket"))
    default, _, _ = identity_secrets(ca)
    server.set(default)
    server.start()
    try:
        exc = load_error(mesh([(1, "v1")], proxy=sds(server, ", initialFetchTimeout: 300ms")))
    finally:
        server.close()
    assert exc.field == "spec.meshIdentity.sds" and "no secret 'ROOTCA'" in str(exc)


def test_an_unusable_identity_at_load_is_an_error(ca: MeshCa, socket_dir: Path) -> None:
    server = SdsAgent(str(socket_dir / "socket"))
    chain, _, _ = ca.workload("engine")
    server.set(
        certificate_secret("default", chain, ca.workload("x")[1]), root_secret("ROOTCA", ca.pem)
    )
    server.start()
    try:
        exc = load_error(mesh([(1, "v1")], proxy=sds(server)))
    finally:
        server.close()
    assert exc.field == "spec.meshIdentity.sds" and "Secret 'default'" in str(exc)


@pytest.mark.parametrize(
    "identity,field",
    [
        ("{sds: {}, directory: /etc/certs}", "spec.meshIdentity.directory"),
        ("{sds: {}, checkInterval: 1s}", "spec.meshIdentity.checkInterval"),
        ("{sds: {address: 'nowhere'}}", "spec.meshIdentity.sds.address"),
        # 5 000 digits: int() of them raised a ValueError (CPython's 4 300-digit limit).
        ("{sds: {address: 'agent:" + "9" * 5000 + "'}}", "spec.meshIdentity.sds.address"),
        ("{sds: {address: 'agent:\uff19\uff10'}}", "spec.meshIdentity.sds.address"),
        ("{sds: {certificate: x, root: x}}", "spec.meshIdentity.sds.root"),
        ("{sds: {initialFetchTimeout: 1h}}", "spec.meshIdentity.sds.initialFetchTimeout"),
        ("{sds: {secret: x}}", "spec.meshIdentity.sds.secret"),
    ],
)
def test_the_sds_settings_are_checked(identity: str, field: str) -> None:
    exc = load_error(mesh([(1, "v1")], proxy=f"meshIdentity: {identity}\n"))
    assert exc.field == field, exc


def test_a_server_pushing_without_pause_rotates_the_identity_at_most_once_a_second(
    ca: MeshCa, tmp_path: Path, agent: tuple[SdsAgent, int]
) -> None:
    """Rotating in costs the event loop a few milliseconds: 40 new identities pushed in a
    burst are rotated in no faster than one a second, the last one last, while requests are
    served."""
    server, _ = agent
    burst = [ca.workload("engine") for _ in range(40)]

    async def main() -> None:
        async with serving(server) as (engine, _):
            watch = engine.sds
            assert watch is not None
            started = time.monotonic()
            for chain, key, _ in burst:
                server.push(certificate_secret("default", chain, key))
            await until(lambda: rotations(engine, "ok") >= 2, "two rotations")
            conn = await Client.connect(address(engine), ssl=ca.client_context(tmp_path, "x"))
            assert error_type(await conn.call("get")) is None
            conn.close()
            elapsed = time.monotonic() - started
            assert rotations(engine, "ok") <= elapsed / MIN_ROTATION_GAP + 1
            assert rotations(engine, "failed") == 0

    run(main())


def test_a_server_pushing_unusable_secrets_without_pause_is_refused_at_most_once_a_second(
    ca: MeshCa, agent: tuple[SdsAgent, int], caplog: pytest.LogCaptureFixture
) -> None:
    """Each refusal is a warning in the log: 40 broken secrets pushed in a burst are NACKed
    no faster than one a second (the log is not the server's to fill)."""
    server, _ = agent

    async def main() -> None:
        async with serving(server) as (engine, _):
            started = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="metaprotocol.proxy"):
                for _ in range(40):
                    server.push(secret_pb2.Secret(name="ROOTCA"))
                await until(lambda: rotations(engine, "failed") >= 2, "two refusals")
            elapsed = time.monotonic() - started
            assert rotations(engine, "failed") <= elapsed / MIN_ROTATION_GAP + 1
            refused = [r for r in caplog.records if "refused" in r.getMessage()]
            assert len(refused) <= elapsed / MIN_ROTATION_GAP + 1

    run(main())
