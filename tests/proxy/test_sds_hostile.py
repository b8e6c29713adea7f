"""The SDS identity (``spec.meshIdentity.sds``) against a hostile or buggy server and a
hostile environment, over real Unix sockets: a reload naming another server and back, the
same secret twice in one response, the private directory replaced or removed under the
engine, a socket path that is no socket. The agent is the tests' (``tests/sds_agent.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import any_pb2
from mesh_pki import MeshCa
from peer_check import missing
from proxy_kit import Client, Upstream, address, engine_for, mesh, run, until

try:
    from sds_agent import SdsAgent, _Stream, certificate_secret, root_secret
except ImportError:
    missing("the xds extra (grpcio, xds-protos)", "pip install -e '.[xds]'")

import test_sds
from test_sds import identity_secrets, peer_serial, rotations, sds, serving
from test_workers import Supervisor

from metaprotocol_sdk import ConfigError
from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy import sds as sds_module
from metaprotocol_sdk.proxy.config.models import MeshIdentity
from metaprotocol_sdk.proxy.identity import load_identity
from metaprotocol_sdk.proxy.sds import (
    BACKOFF_INITIAL,
    LOCK_NAME,
    MAX_PEM_BYTES,
    STABLE_STREAM,
    STOP_WAIT,
    SecretRefused,
    existing_store,
)

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


def test_a_private_directory_removed_under_the_engine_is_made_again_private(
    ca: MeshCa, tmp_path: Path, agent: tuple[SdsAgent, int]
) -> None:
    """A cleaner of ``/tmp`` (where the directory is when ``/dev/shm`` is not) removes it:
    the next rotation makes it again, ``0700`` (not with the umask's mode), and serves."""
    server, _ = agent

    async def main() -> None:
        async with serving(server) as (engine, _):
            assert engine.sds is not None
            directory = engine.sds.store.directory
            shutil.rmtree(directory)
            chain, key, serial = ca.workload("engine", hours=48)
            server.push(certificate_secret("default", chain, key))
            await until(lambda: rotations(engine, "ok") == 1, "the rotation")
            assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
            conn = await Client.connect(address(engine), ssl=ca.client_context(tmp_path, "x"))
            assert conn.transport is not None and peer_serial(conn.transport) == serial
            conn.close()

    previous = os.umask(0o022)
    try:
        run(main())
    finally:
        os.umask(previous)


def test_secrets_that_cannot_be_written_are_nacked_and_the_stream_kept(
    ca: MeshCa, tmp_path: Path, agent: tuple[SdsAgent, int]
) -> None:
    """The private directory replaced by a file (or its filesystem full): the pushed secrets
    are NACKed, saying why, on the stream held (not a traceback and a reconnect each time
    the server sends them again), and the identity in force is kept."""
    server, first = agent

    async def main() -> None:
        async with serving(server) as (engine, _):
            watch = engine.sds
            assert watch is not None
            directory = watch.store.directory
            shutil.rmtree(directory)
            Path(directory).write_bytes(b"")
            chain, key, _ = ca.workload("engine", hours=48)
            server.push(certificate_secret("default", chain, key))
            await until(lambda: any(r.error for r in server.requests), "the NACK")
            nack = next(r for r in server.requests if r.error)
            assert "could not be written" in (nack.error or ""), nack.error
            assert watch.reconnects == 0 and watch.connected
            assert rotations(engine, "failed") == 1 and rotations(engine, "ok") == 0
            conn = await Client.connect(address(engine), ssl=ca.client_context(tmp_path, "x"))
            assert conn.transport is not None and peer_serial(conn.transport) == first
            conn.close()
            os.unlink(directory)  # not left in /dev/shm

    run(main())


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_a_socket_path_that_is_no_socket_is_named_in_the_error(socket_dir: Path, kind: str) -> None:
    """A mount gone wrong (a file or a directory where istio-agent's socket should be): the
    load's error says so, not only that nothing came."""
    path = socket_dir / "socket"
    if kind == "file":
        path.write_bytes(b"")
    else:
        path.mkdir()
    identity = f"{{sds: {{address: 'unix:{path}', initialFetchTimeout: 100ms}}}}"
    with pytest.raises(ConfigError) as caught:
        loads_config(mesh([(1, "v1")], proxy=f"meshIdentity: {identity}\n"), "test.yaml")
    assert caught.value.field == "spec.meshIdentity.sds"
    assert f"{path} is a {kind}, not a socket" in str(caught.value), caught.value


CHILD = """
import os, sys
from metaprotocol_sdk.proxy.config.models import SdsSource
from metaprotocol_sdk.proxy.sds import store_for
store = store_for(SdsSource(address=sys.argv[1], node_id="sidecar~x~child.default~d"))
print(store.directory, flush=True)
if sys.argv[2] == "crash":
    os._exit(70)  # as the watchdog ends a stuck worker: no atexit, no finally
sys.stdin.read()  # alive until the test closes its input
"""


def child(server: SdsAgent, how: str) -> tuple[subprocess.Popen[str], str]:
    """A process holding ``server``'s secrets in its private directory; and the directory."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, server.address, how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def test_the_private_directory_of_a_process_that_crashed_is_removed_by_the_next(
    ca: MeshCa, agent: tuple[SdsAgent, int]
) -> None:
    """A worker ended by its watchdog (``os._exit``), by ``SIGKILL`` or by the OOM killer
    runs no exit handler: its directory (the key) would stay in ``/dev/shm``, one more at
    each restart. The next process to make one removes those of processes gone, and leaves
    those of processes alive."""
    server, _ = agent
    crashed, left = child(server, "crash")
    assert crashed.wait(10) == 70
    assert os.path.isdir(left)  # what the crash left
    alive, kept = child(server, "wait")
    try:
        assert not os.path.exists(left)
        config = loads_config(mesh([(1, "v1")], proxy=sds(server)), "t.yaml")
        assert config.proxy.mesh_identity is not None
        assert os.path.isdir(kept)  # another process's, alive: kept
    finally:
        alive.communicate("", timeout=10)
    assert not os.path.exists(kept)  # it exited: removed its own


def private_directories(pid: int) -> set[str]:
    """The private directories process ``pid`` holds (the lock file it keeps open in each)."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if os.path.basename(target) == LOCK_NAME:
                held.add(os.path.dirname(target))
    return held


def test_with_workers_each_worker_holds_the_secrets_and_the_supervisor_none(
    tmp_path: Path, ca: MeshCa, agent: tuple[SdsAgent, int]
) -> None:
    """``--workers 2``: the supervisor serves no traffic; it checks the configuration (the
    fetch included, so an agent that never answers is one error, not a crash loop of
    workers) and then keeps no copy of the key. Each worker holds its own, removed at exit."""
    server, _ = agent

    async def main() -> None:
        up = await Upstream("v1").start()
        text = mesh([(up.port, "v1")], listener_tls="{mode: ISTIO_MUTUAL}", proxy=sds(server))
        sup = Supervisor(tmp_path, text)
        held: set[str] = set()
        try:
            workers = await sup.workers()
            assert private_directories(sup.proc.pid) == set()
            for worker in workers:
                (mine,) = private_directories(worker["pid"])
                held.add(mine)
            assert len(held) == 2
        finally:
            code, _ = sup.stop()
            await up.close()
        assert code == 0
        assert not any(os.path.exists(d) for d in held)

    run(main(), timeout=60)


def test_sigterm_during_a_reload_waiting_for_an_agent_exits_at_once(
    tmp_path: Path, ca: MeshCa, agent: tuple[SdsAgent, int], socket_dir: Path
) -> None:
    """A ``SIGHUP`` reload naming an agent that holds no secrets yet waits for them (up to
    ``initialFetchTimeout``, here a minute) in a thread: a ``SIGTERM`` meanwhile drains and
    exits without waiting for that thread (Kubernetes kills a pod that takes longer than its
    grace period, exit handlers and all)."""
    server, _ = agent
    empty = SdsAgent(str(socket_dir / "empty")).start()  # answers, with no secrets
    config = tmp_path / "mesh.yaml"

    def text(address: str, extra: str = "") -> str:
        identity = f"meshIdentity: {{sds: {{address: '{address}'{extra}}}}}\n"
        return mesh([(1, "v1")], listener_tls="{mode: ISTIO_MUTUAL}", proxy=identity)

    config.write_text(text(server.address))
    proc = subprocess.Popen(
        [sys.executable, "-m", "metaprotocol_sdk", "proxy", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("listening"), proc.stderr
        config.write_text(text(empty.address, ", initialFetchTimeout: 60s"))
        proc.send_signal(signal.SIGHUP)
        empty.wait(lambda requests: requests)  # the reload's fetch is waiting
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        empty.close()
    assert proc.returncode == 0, err
    assert took < 60 / 4, (took, err)
    assert "Traceback" not in err, err


def test_nothing_a_halted_stream_took_reaches_the_engine(
    ca: MeshCa, agent: tuple[SdsAgent, int]
) -> None:
    """A refusal the stream's thread handed to the loop just before a reload named another
    server (which halts the stream, on the loop) is not counted against the new identity:
    the loop is held while the thread refuses a secret, then the stream is halted as a
    reload does, then the loop runs what was handed to it."""
    server, _ = agent

    async def main() -> None:
        async with serving(server) as (engine, _):
            watch = engine.sds
            assert watch is not None
            server.push(secret_pb2.Secret(name="ROOTCA"))  # refused: no validation_context
            server.wait(lambda requests: any(r.error for r in requests))  # the loop held
            watch.halt()
            for _ in range(10):
                await asyncio.sleep(0)
            assert watch.nacks == 1
            assert rotations(engine, "failed") == 0
            assert engine.identity is not None and engine.identity.last_error is None

    run(main())


class Closing(SdsAgent):
    """Answers each stream once, then closes it."""

    def StreamSecrets(self, request_iterator: Any, context: Any) -> Any:
        request = next(request_iterator)
        stream = _Stream(next(self._ids))
        self._received(stream, request)
        yield stream.out.get()


def logged_waits(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The waits before reconnecting, as the warnings say them."""
    return [
        float(r.getMessage().rsplit("retrying in ", 1)[1].split()[0])
        for r in caplog.records
        if "retrying in" in r.getMessage()
    ]


def test_a_server_closing_each_stream_once_it_answered_gets_a_growing_backoff(
    ca: MeshCa, socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream that answered and ended at once is no healthy one: the waits before the
    next grow as for a server that does not answer (not the first wait each time: up to four
    reconnects and four warnings a second, for good)."""
    server = Closing(str(socket_dir / "socket"))
    default, root, _ = identity_secrets(ca)
    server.set(default, root)
    server.start()

    async def main() -> None:
        text = mesh([(1, "v1")], listener_tls="{mode: ISTIO_MUTUAL}", proxy=sds(server))
        async with engine_for(text) as engine:
            watch = engine.sds
            assert watch is not None
            with caplog.at_level(logging.WARNING, logger="metaprotocol.proxy"):
                await until(lambda: watch.reconnects >= 3, "three reconnects", timeout=20)
            waits = logged_waits(caplog)
            assert len(waits) >= 3 and waits[2] >= 2 * BACKOFF_INITIAL, waits

    try:
        run(main(), timeout=30)
    finally:
        server.close()


def test_a_healthy_stream_reset_by_the_agent_is_reopened_after_the_first_wait_each_time(
    ca: MeshCa, agent: tuple[SdsAgent, int], caplog: pytest.LogCaptureFixture
) -> None:
    """istio-agent restarting now and then: each stream was healthy (it answered, and lasted
    :data:`STABLE_STREAM`), so each reset is followed by the first wait, not by one that grew
    with every restart since the engine started (up to 30 s without rotations)."""
    server, _ = agent

    async def main() -> None:
        async with serving(server) as (engine, _):
            watch = engine.sds
            assert watch is not None
            with caplog.at_level(logging.WARNING, logger="metaprotocol.proxy"):
                for restarts in range(1, 4):
                    await until(lambda: watch.connected, "the stream answered")
                    await asyncio.sleep(STABLE_STREAM)  # the stream's age, not a sync
                    server.drop_streams(error=True)
                    await until(lambda r=restarts: watch.reconnects == r, "a new stream")
            waits = logged_waits(caplog)
            assert len(waits) == 3 and max(waits) <= BACKOFF_INITIAL, waits

    run(main(), timeout=30)


def test_a_private_directory_replaced_by_a_link_gets_no_secret(
    ca: MeshCa, tmp_path: Path, agent: tuple[SdsAgent, int]
) -> None:
    """The directory removed and a link put in its place (another user racing for the name
    in ``/dev/shm`` or ``/tmp``): nothing is written through it; the pushed secrets are
    NACKed and the identity in force kept."""
    server, _ = agent
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    async def main() -> None:
        async with serving(server) as (engine, _):
            watch = engine.sds
            assert watch is not None
            directory = watch.store.directory
            shutil.rmtree(directory)
            os.symlink(elsewhere, directory)
            try:
                chain, key, _ = ca.workload("engine", hours=48)
                server.push(certificate_secret("default", chain, key))
                await until(lambda: any(r.error for r in server.requests), "the NACK")
                nack = next(r for r in server.requests if r.error)
                assert "not a private directory" in (nack.error or ""), nack.error
                assert list(elsewhere.iterdir()) == []
                assert rotations(engine, "ok") == 0 and rotations(engine, "failed") == 1
            finally:
                os.unlink(directory)

    run(main())


def test_a_rotation_of_a_large_identity_is_built_off_the_event_loop(
    ca: MeshCa, agent: tuple[SdsAgent, int], tmp_path: Path
) -> None:
    """A root of 1 MiB (the bound; the same CA a thousand times over, as a buggy server may
    send it) takes a second to load: the stream's thread builds the new identity's contexts
    once, and the loop only swaps them in (it built them all again: a one-second stall of
    every request at each rotation, one a second)."""
    server, _ = agent
    chain, key, serial = ca.workload("engine", hours=48)
    root = ca.pem * (MAX_PEM_BYTES // len(ca.pem))

    def cost() -> float:  # of building this identity's contexts, measured here
        for name, data in (("c.pem", chain), ("k.pem", key), ("r.pem", root)):
            (tmp_path / name).write_bytes(data)
        started = time.perf_counter()
        load_identity(
            MeshIdentity(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"), str(tmp_path / "r.pem"))
        )
        return time.perf_counter() - started

    async def main() -> None:
        build = await asyncio.to_thread(cost)
        async with serving(server) as (engine, _):
            lags: list[float] = []
            rotated = asyncio.Event()

            async def probe() -> None:
                while not rotated.is_set():
                    before = time.perf_counter()
                    await asyncio.sleep(0)
                    lags.append(time.perf_counter() - before)

            task = asyncio.create_task(probe())
            both = [any_pb2.Any(), any_pb2.Any()]  # one response, one rotation
            both[0].Pack(certificate_secret("default", chain, key))
            both[1].Pack(root_secret("ROOTCA", root))
            server.push(raw=both)
            await until(lambda: rotations(engine, "ok") == 1, "the rotation", timeout=30)
            rotated.set()
            await task
            conn = await Client.connect(address(engine), ssl=ca.client_context(tmp_path, "x"))
            assert conn.transport is not None and peer_serial(conn.transport) == serial
            conn.close()
            assert max(lags) < build / 4, (max(lags), build)
            # Shown by the files in force (not the staging copy it was built from).
            identity, watch = engine.identity, engine.sds
            assert identity is not None and watch is not None
            paths = [path for path, _ in identity.material.expiry]
            assert len(paths) == 2, paths
            assert {os.path.dirname(path) for path in paths} == {watch.store.directory}

    run(main(), timeout=60)


def test_a_store_closed_is_never_written_again(ca: MeshCa, agent: tuple[SdsAgent, int]) -> None:
    """At exit the private directory is removed while the stream's thread (a daemon) may
    still be checking or writing a pushed secret: what it writes after must not make the
    directory again, with the key in it, after the process is gone."""
    server, _ = agent
    config = loads_config(mesh([(1, "v1")], proxy=sds(server)), "t.yaml")
    settings = config.proxy.mesh_identity
    assert settings is not None and settings.sds is not None
    store = existing_store(settings.sds)
    assert store is not None
    chain, key, _ = ca.workload("engine", hours=48)
    pems = {**store.pems, "certificateChain": chain, "privateKey": key}
    store.close()
    with pytest.raises(SecretRefused):
        store.check(pems)
    assert not store.commit(pems, "late")
    assert not os.path.exists(store.directory)


def test_a_socket_path_too_long_for_a_unix_socket_is_refused_at_once() -> None:
    """A Unix socket's path is at most 107 bytes: a longer one can never be reached, so the
    load says so at once rather than waiting ``initialFetchTimeout`` for nothing."""
    path = "/var/run/" + "x" * 120 + "/socket"
    identity = f"{{sds: {{address: 'unix:{path}', initialFetchTimeout: 10m}}}}"
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        loads_config(mesh([(1, "v1")], proxy=f"meshIdentity: {identity}\n"), "test.yaml")
    assert time.monotonic() - started < 60
    assert caught.value.field == "spec.meshIdentity.sds.address", caught.value
    assert "107 bytes" in str(caught.value)


class LongVersions(SdsAgent):
    """Gives its responses a version of :attr:`length` characters once set."""

    length = 0

    def _response(self, stream: Any, secrets: list[Any], raw: Any = None) -> Any:
        response = super()._response(stream, secrets, raw)
        if self.length:
            response.version_info = "v" * self.length
        return response


def test_a_response_with_an_endless_version_is_nacked_and_not_kept(
    ca: MeshCa, socket_dir: Path
) -> None:
    """The version is echoed in every ACK and shown in ``/config_dump``: one of megabytes
    (the message's bound) is refused, not kept and sent back at each response."""
    server = LongVersions(str(socket_dir / "socket"))
    default, root, _ = identity_secrets(ca)
    server.set(default, root)
    server.start()

    async def main() -> None:
        async with serving(server) as (engine, _):
            watch = engine.sds
            assert watch is not None
            held = watch.version
            server.length = 3 << 20
            chain, key, _ = ca.workload("engine", hours=48)
            server.push(certificate_secret("default", chain, key))
            await until(lambda: any(r.error for r in server.requests), "the NACK")
            nack = next(r for r in server.requests if r.error)
            assert "version_info" in (nack.error or "") and len(nack.version) < 100
            assert watch.version == held and rotations(engine, "ok") == 0

    try:
        run(main())
    finally:
        server.close()


def test_a_new_root_then_a_certificate_of_it_pushed_one_at_a_time_are_taken(
    ca: MeshCa, tmp_path: Path, agent: tuple[SdsAgent, int]
) -> None:
    """A mesh moved to another root at once, istio-agent pushing one secret per response:
    the new root alone does not chain the certificate in force (refused), the new
    certificate alone does not chain to the root in force, but the two together are
    consistent: taken when the second comes (each checked only with the one in force, the
    identity stayed refused until the stream was reopened)."""
    server, _ = agent
    other = MeshCa("other")

    async def main() -> None:
        async with serving(server) as (engine, _):
            server.push(root_secret("ROOTCA", other.pem))
            await until(lambda: rotations(engine, "failed") == 1, "the root refused")
            chain, key, serial = other.workload("engine", hours=48)
            server.push(certificate_secret("default", chain, key))
            await until(lambda: rotations(engine, "ok") == 1, "the pair taken", timeout=15)
            conn = await Client.connect(address(engine), ssl=other.client_context(tmp_path, "x"))
            assert conn.transport is not None and peer_serial(conn.transport) == serial
            conn.close()
            await until(lambda: acks_of_last_push(server), "the ACK")

    run(main())


def acks_of_last_push(server: SdsAgent) -> bool:
    version = server.sent[-1][1]
    return any(r.version == version and r.nonce and r.error is None for r in server.requests)


def test_a_refused_secret_the_server_took_back_is_not_paired_later(
    ca: MeshCa, agent: tuple[SdsAgent, int]
) -> None:
    """A root refused, then the root in force pushed again (the server's latest word on it):
    a certificate of the refused root pushed next is refused, not paired with it."""
    server, _ = agent
    other = MeshCa("other")

    async def main() -> None:
        async with serving(server) as (engine, _):
            server.push(root_secret("ROOTCA", other.pem))
            await until(lambda: rotations(engine, "failed") == 1, "the root refused")
            server.push(root_secret("ROOTCA", ca.pem))
            mark = len(server.sent)
            await until(lambda: acks_of_last_push(server), "the root in force ACKed")
            chain, key, _ = other.workload("engine", hours=48)
            server.push(certificate_secret("default", chain, key))
            await until(lambda: rotations(engine, "failed") == 2, "the certificate refused")
            assert rotations(engine, "ok") == 0 and len(server.sent) == mark + 1

    run(main())


def test_two_engines_of_one_process_on_one_server_both_rotate_at_the_push(
    ca: MeshCa, agent: tuple[SdsAgent, int]
) -> None:
    """Two engines in one process (an embedding, or tests) with the same SDS settings share
    the private directory: the push rotates both at once, not the first at once and the
    other at its next look at the files (the first had written them: "nothing changed")."""
    server, _ = agent

    async def main() -> None:
        text = mesh([(1, "v1")], listener_tls="{mode: ISTIO_MUTUAL}", proxy=sds(server))
        async with engine_for(text) as first, engine_for(text) as second:
            for engine in (first, second):
                await until(lambda e=engine: e.sds is not None and e.sds.connected, "stream")
            identity = second.identity
            assert identity is not None
            # Just after a look at the files: the next is seconds away.
            await until(lambda: identity.next_check - second.loop.time() > 3, "a look")
            before = identity.next_check
            chain, key, _ = ca.workload("engine", hours=48)
            server.push(certificate_secret("default", chain, key))
            await until(lambda: rotations(first, "ok") == 1, "the first rotated")
            await until(lambda: rotations(second, "ok") == 1, "the second rotated")
            assert second.loop.time() < before  # by the push, not by a look at the files

    run(main())


def test_without_dev_shm_the_private_directory_is_made_in_the_temporary_one(
    agent: tuple[SdsAgent, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ``/dev/shm`` (or not writable): the system's temporary directory, still private."""
    server, _ = agent
    monkeypatch.setattr(sds_module, "SHARED_MEMORY", "/nonexistent/shm")
    config = loads_config(mesh([(1, "v1")], proxy=sds(server)), "t.yaml")
    settings = config.proxy.mesh_identity
    assert settings is not None and settings.sds is not None
    store = existing_store(settings.sds)
    assert store is not None
    assert os.path.dirname(store.directory) == tempfile.gettempdir()
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
    store.close()  # as at exit: a load after it (an embedding's) makes a new one
    again = loads_config(mesh([(1, "v1")], proxy=sds(server)), "t.yaml")
    assert again.proxy.mesh_identity is not None
    fresh = existing_store(settings.sds)
    assert fresh is not None and fresh is not store and os.path.isdir(fresh.directory)


class Mute(SdsAgent):
    """Answers the first stream (the load's fetch); every later one is accepted and never
    answered."""

    def StreamSecrets(self, request_iterator: Any, context: Any) -> Any:
        with self._lock:
            first = not self.requests
        if first:
            yield from super().StreamSecrets(request_iterator, context)
            return
        self._received(_Stream(next(self._ids)), next(request_iterator))
        ended = threading.Event()
        context.add_callback(ended.set)
        ended.wait()


def test_stop_with_a_stream_never_answered_ends_it_and_its_thread(
    ca: MeshCa, socket_dir: Path
) -> None:
    server = Mute(str(socket_dir / "socket"))
    default, root, _ = identity_secrets(ca)
    server.set(default, root)
    server.start()

    async def main() -> None:
        text = mesh([(1, "v1")], listener_tls="{mode: ISTIO_MUTUAL}", proxy=sds(server))
        engine = Engine(loads_config(text, "t.yaml"))
        await engine.start()
        watch = engine.sds
        assert watch is not None
        await asyncio.to_thread(server.wait, lambda requests: len(requests) >= 2)
        assert not watch.connected
        started = time.monotonic()
        await engine.stop(drain=0)
        assert time.monotonic() - started < 10 * STOP_WAIT
        assert not any(t.name == "metaprotocol sds" for t in threading.enumerate())

    try:
        run(main())
    finally:
        server.close()
