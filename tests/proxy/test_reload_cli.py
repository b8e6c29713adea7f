"""``metaprotocol proxy`` reloading its files on SIGHUP and with ``--watch``: a real process,
real thriftpy2 servers and clients on 127.0.0.1."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from proxy_kit import ProxyProcess, sighup_at_the_gate, start_gate

from metaprotocol_sdk.cli.proxy import WATCH_QUIET_MS
from metaprotocol_sdk.demo.idl import hello, untyped
from metaprotocol_sdk.demo.thrift_server import HelloServer

WAIT = 15.0  # bound on every single wait


def mesh(v1: int, v2: int, subset: str, *, drain: str = "10s") -> str:
    """Thrift service ``hello.test:9090`` with two versions; every request goes to ``subset``."""
    return f"""\
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: ApplicationProtocol
metadata: {{name: thrift}}
spec: {{protocol: thrift, codec: aeraki.meta_protocol.codec.thrift}}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: hello}}
spec:
  hosts: [hello.test]
  ports: [{{number: 9090, name: tcp-metaprotocol-thrift-hello, protocol: TCP}}]
  resolution: STATIC
  endpoints:
    - {{address: 127.0.0.1, ports: {{tcp-metaprotocol-thrift-hello: {v1}}},
       labels: {{version: v1}}}}
    - {{address: 127.0.0.1, ports: {{tcp-metaprotocol-thrift-hello: {v2}}},
       labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: hello}}
spec:
  host: hello.test
  subsets:
    - {{name: v1, labels: {{version: v1}}}}
    - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata: {{name: hello}}
spec:
  hosts: [hello.test]
  routes:
    - name: all
      route: [{{destination: {{host: hello.test, subset: {subset}}}}}]
---
apiVersion: proxy.metaprotocol.io/v1alpha1
kind: ProxyConfig
metadata: {{name: engine}}
spec:
  listeners: [{{host: hello.test, port: 9090, bind: "127.0.0.1:0"}}]
  admin: {{bind: "127.0.0.1:0"}}
  timeouts: {{drain: {drain}}}
"""


class Proxy(ProxyProcess):
    """A ``metaprotocol proxy`` process; its stderr lines are collected by a thread."""

    def next_reload(self) -> str:
        """The next ``LEVEL: reload ...`` line on stderr (waits for it)."""
        while True:
            line = self.lines.get(timeout=WAIT)
            if line.partition(": ")[2].startswith("reload "):
                return line

    def client(self) -> Any:
        return untyped("thriftpy2.rpc").make_client(
            hello().Hello,
            "127.0.0.1",
            self.port,
            trans_factory=untyped("thriftpy2.transport").TFramedTransportFactory(),
            timeout=int(WAIT * 1000),
        )


@pytest.fixture
def servers() -> Iterator[tuple[HelloServer, HelloServer]]:
    v1, v2 = HelloServer("v1").start(), HelloServer("v2").start()
    yield v1, v2
    v1.close()
    v2.close()


def test_sighup_swaps_routes_for_open_connections_and_refuses_a_bad_file(
    tmp_path: Path, servers: tuple[HelloServer, HelloServer]
) -> None:
    v1, v2 = servers
    config = tmp_path / "mesh.yaml"
    config.write_text(mesh(v1.port, v2.port, "v1"))
    proxy = Proxy(config)
    pool = ThreadPoolExecutor(1)
    try:
        first, second = proxy.client(), proxy.client()
        assert first.sayHello("a") == "v1: hello a"
        serving = proxy.get("/config_dump")["version"]
        # A request in flight on the old route while the routes change (v1 answers it after
        # 2 s; the reload completes well within that, which the test checks).
        slow: Future[str] = pool.submit(second.sleep, 2000)
        assert v1.handler.sleeping.wait(WAIT)
        config.write_text(mesh(v1.port, v2.port, "v2"))
        proxy.proc.send_signal(signal.SIGHUP)
        line = proxy.next_reload()
        assert re.fullmatch(r"info: reload ok \(sighup\): version [0-9a-f]{12}", line), line
        assert not slow.done(), "the reload did not finish while the request was in flight"
        assert first.sayHello("b") == "v2: hello b"  # the same connection, the new route
        assert slow.result(WAIT) == "v1: slept 2000"  # finished on the route it was given
        dump = proxy.get("/config_dump")
        assert dump["version"] != serving and dump["lastReload"]["result"] == "ok"
        serving = dump["version"]

        # A bad file: refused, one line, the process and the routes stay as they were.
        config.write_text(mesh(v1.port, v2.port, "v9"))  # no such subset
        proxy.proc.send_signal(signal.SIGHUP)
        line = proxy.next_reload()
        assert line.startswith("warning: reload refused (sighup): ") and "v9" in line, line
        assert proxy.proc.poll() is None
        assert first.sayHello("c") == "v2: hello c"
        dump = proxy.get("/config_dump")
        assert dump["version"] == serving
        last = dump["lastReload"]
        assert last["result"] == "refused" and "v9" in last["error"]
        stats = proxy.get("/stats?format=json")
        assert stats['metaprotocol_reloads_total{source="sighup",result="ok"}'] == 1
        assert stats['metaprotocol_reloads_total{source="sighup",result="refused"}'] == 1
        first.close()
        second.close()
    finally:
        pool.shutdown(wait=False)
        proxy.stop()
    assert proxy.proc.returncode == 0


def test_a_sighup_during_the_drain_is_refused_and_the_request_in_flight_finishes(
    tmp_path: Path, servers: tuple[HelloServer, HelloServer]
) -> None:
    """The handler stays after SIGTERM: SIGHUP's default action would end the process and
    cut the drain short (it did: the request in flight lost its connection, status -1)."""
    v1, v2 = servers
    config = tmp_path / "mesh.yaml"
    config.write_text(mesh(v1.port, v2.port, "v1"))
    proxy = Proxy(config)
    pool = ThreadPoolExecutor(1)
    try:
        client = proxy.client()
        slow: Future[str] = pool.submit(client.sleep, 3000)
        assert v1.handler.sleeping.wait(WAIT)
        proxy.proc.send_signal(signal.SIGTERM)
        while proxy.lines.get(timeout=WAIT) != "info: draining":
            pass
        proxy.proc.send_signal(signal.SIGHUP)
        line = proxy.next_reload()
        assert line.startswith("warning: reload refused (sighup): the engine is draining"), line
        assert not slow.done(), "the request finished before the SIGHUP: nothing was tested"
        assert slow.result(WAIT) == "v1: slept 3000"
        assert proxy.proc.wait(WAIT) == 0
        client.close()
    finally:
        pool.shutdown(wait=False)
        proxy.stop()


def test_a_sighup_while_the_process_starts_reloads_once_it_serves(
    tmp_path: Path, servers: tuple[HelloServer, HelloServer]
) -> None:
    """A SIGHUP that comes while the process reads its files (held at the codec's import)
    ends nothing: the process serves, then reloads the files. Before, it ended the process
    (status -1, SIGHUP's default action: the handler was set only once the engine served)."""
    v1, v2 = servers
    config = tmp_path / "mesh.yaml"
    env = start_gate(tmp_path, "metaprotocol_thrift.codec:ThriftCodec", "main")
    text = mesh(v1.port, v2.port, "v1")
    config.write_text(text.replace("aeraki.meta_protocol.codec.thrift", "start_gate:Codec"))
    proxy = Proxy(config, env=env, starting=lambda pid: sighup_at_the_gate(pid, tmp_path))
    try:
        line = proxy.next_reload()
        assert re.fullmatch(r"info: reload ok \(sighup\): version [0-9a-f]{12}", line), line
        client = proxy.client()
        assert client.sayHello("a") == "v1: hello a"
        client.close()
    finally:
        proxy.stop()
    assert proxy.proc.returncode == 0


def test_watch_applies_a_changed_file_and_skips_a_half_written_one(
    tmp_path: Path, servers: tuple[HelloServer, HelloServer]
) -> None:
    v1, v2 = servers
    config = tmp_path / "mesh.yaml"
    config.write_text(mesh(v1.port, v2.port, "v1"))
    proxy = Proxy(config, "--watch")
    try:
        client = proxy.client()
        assert client.sayHello("a") == "v1: hello a"
        whole = mesh(v1.port, v2.port, "v2")
        # Half of the new file, as a writer caught mid-write leaves it: refused, not applied.
        config.write_text(whole[: whole.index("kind: MetaRouter") + 30])
        line = proxy.next_reload()
        assert line.startswith("warning: reload refused (watch): "), line
        assert client.sayHello("b") == "v1: hello b"
        # The write completes: the next change applies.
        config.write_text(whole)
        line = proxy.next_reload()
        assert line.startswith("info: reload ok (watch): version "), line
        assert client.sayHello("c") == "v2: hello c"  # the same connection
        # An editor's save: a new file renamed over the old one.
        fresh = tmp_path / ".mesh.yaml.swp"
        fresh.write_text(mesh(v1.port, v2.port, "v1"))
        fresh.replace(config)
        line = proxy.next_reload()
        assert line.startswith("info: reload ok (watch): "), line
        assert client.sayHello("d") == "v1: hello d"
        client.close()
    finally:
        proxy.stop()
    assert proxy.proc.returncode == 0


def test_watch_waits_for_a_writer_that_pauses_mid_file(
    tmp_path: Path, servers: tuple[HelloServer, HelloServer]
) -> None:
    """A file written in two parts with a pause between them is applied once, whole. (Its
    first part, a valid configuration without the MetaRouter, was applied on its own: for
    the pause, every request went to every version.)"""
    from metaprotocol_sdk.proxy import load_config
    from metaprotocol_sdk.proxy.reload import config_version

    v1, v2 = servers

    def listeners_first(text: str) -> str:
        docs = text.split("---\n")
        return "---\n".join([docs[-1], *docs[:-1]])

    config = tmp_path / "mesh.yaml"
    config.write_text(listeners_first(mesh(v1.port, v2.port, "v2")))
    proxy = Proxy(config, "--watch")
    try:
        client = proxy.client()
        assert client.sayHello("a") == "v2: hello a"
        whole = listeners_first(mesh(v1.port, v2.port, "v1"))
        cut = whole.index("kind: MetaRouter")
        cut = whole.rindex("---\n", 0, cut) + 4
        with config.open("w") as file:
            file.write(whole[:cut])  # valid on its own: every document but the MetaRouter
            file.flush()
            # The writer pauses: a sixth of the quiet time the watch waits for (the attack's
            # input, not a synchronisation; the rest is margin for a loaded machine).
            time.sleep(WATCH_QUIET_MS / 6000)
            file.write(whole[cut:])
        expected = config_version(load_config([config]))
        assert proxy.next_reload() == f"info: reload ok (watch): version {expected}"
        assert client.sayHello("b") == "v1: hello b"
        client.close()
    finally:
        proxy.stop()
    assert proxy.proc.returncode == 0


def test_watch_follows_a_configmap_symlink_swap(
    tmp_path: Path, servers: tuple[HelloServer, HelloServer]
) -> None:
    """Kubernetes updates a ConfigMap volume by writing a new timestamped directory and
    renaming a ``..data`` symlink over the old one; the file is a symlink through it."""
    v1, v2 = servers
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "..2026_01").mkdir()
    (volume / "..2026_01" / "mesh.yaml").write_text(mesh(v1.port, v2.port, "v1"))
    (volume / "..data").symlink_to("..2026_01")
    (volume / "mesh.yaml").symlink_to("..data/mesh.yaml")
    proxy = Proxy(volume / "mesh.yaml", "--watch")
    try:
        client = proxy.client()
        assert client.sayHello("a") == "v1: hello a"
        (volume / "..2026_02").mkdir()
        (volume / "..2026_02" / "mesh.yaml").write_text(mesh(v1.port, v2.port, "v2"))
        (volume / "..data_tmp").symlink_to("..2026_02")
        os.replace(volume / "..data_tmp", volume / "..data")
        shutil.rmtree(volume / "..2026_01")
        line = proxy.next_reload()
        assert line.startswith("info: reload ok (watch): "), line
        assert client.sayHello("b") == "v2: hello b"
        client.close()
    finally:
        proxy.stop()
    assert proxy.proc.returncode == 0


def test_the_watch_digest_reads_a_huge_file_in_bounded_memory(tmp_path: Path) -> None:
    """``--watch`` hashes the files on every event: a huge one must not be read whole."""
    import tracemalloc

    from metaprotocol_sdk.cli.proxy import Reloader
    from metaprotocol_sdk.proxy.config.documents import MAX_CONFIG_BYTES

    huge = tmp_path / "huge.yaml"
    with huge.open("wb") as file:
        file.truncate(64 * 1024 * 1024)  # sparse: costs no disk
    reloader = Reloader.__new__(Reloader)
    reloader.files = (str(huge),)
    tracemalloc.start()
    try:
        assert reloader.digest() is not None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MAX_CONFIG_BYTES, peak  # chunks of 64 KiB, not the 64 MiB file


def tls_listener(tmp_path: Path, text: str, certs: Path) -> Path:
    """``text``'s listener with TLS from ``certs``' ``tls.crt`` and ``tls.key``, looked at
    every 100 ms, written as ``mesh.yaml``."""
    tls = f"{{mode: SIMPLE, serverCertificate: '{certs}/tls.crt', privateKey: '{certs}/tls.key'}}"
    config = tmp_path / "mesh.yaml"
    config.write_text(
        text.replace(
            'bind: "127.0.0.1:0"}]',
            f'bind: "127.0.0.1:0", tls: {tls}}}]\n  tlsFiles: {{checkInterval: 100ms}}',
        )
    )
    return config


def _handshake_serial(port: int, ca: Any) -> int:
    """The serial of the certificate the TLS listener on ``port`` presents now."""
    import socket
    import ssl

    from cryptography import x509

    ctx = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    ctx.check_hostname = False
    with (
        socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return int(x509.load_der_x509_certificate(der).serial_number)


def test_a_renewed_tls_certificate_is_served_without_a_sighup(
    tmp_path: Path, servers: tuple[HelloServer, HelloServer]
) -> None:
    """cert-manager renewing a mounted Secret: the files change in place and the next
    connections get the new certificate (a reload of source tls_files); a pair caught
    half-written is refused, the one in force kept, and taken once whole."""
    import trustme
    from cryptography import x509

    v1, v2 = servers
    ca = trustme.CA()
    certs = tmp_path / "certs"
    certs.mkdir()

    def issue() -> tuple[bytes, bytes, int]:
        cert = ca.issue_cert("hello.test")
        chain = cert.cert_chain_pems[0].bytes()
        return (
            chain,
            cert.private_key_pem.bytes(),
            x509.load_pem_x509_certificate(chain).serial_number,
        )

    def install(name: str, data: bytes) -> None:  # as a Secret's update: a new file renamed over
        (certs / f".{name}").write_bytes(data)
        os.replace(certs / f".{name}", certs / name)

    chain, key, first = issue()
    install("tls.crt", chain)
    install("tls.key", key)
    proxy = Proxy(tls_listener(tmp_path, mesh(v1.port, v2.port, "v1"), certs))
    try:
        assert _handshake_serial(proxy.port, ca) == first
        chain, key, second = issue()
        install("tls.key", key)
        install("tls.crt", chain)
        line = proxy.next_reload()
        while "(tls_files)" not in line or "refused" in line:  # maybe between the two writes
            line = proxy.next_reload()
        assert "reload ok (tls_files)" in line
        assert _handshake_serial(proxy.port, ca) == second
        chain, key, third = issue()
        install("tls.crt", chain)  # the key not yet
        assert "reload refused (tls_files)" in proxy.next_reload()
        assert _handshake_serial(proxy.port, ca) == second
        install("tls.key", key)
        assert "reload ok (tls_files)" in proxy.next_reload()
        assert _handshake_serial(proxy.port, ca) == third
        stats = proxy.get("/stats?format=json")
        assert stats['metaprotocol_reloads_total{source="tls_files",result="refused"}'] == 1
    finally:
        proxy.stop()


def test_a_tls_file_changed_after_the_configuration_was_read_is_caught_at_the_first_look(
    tmp_path: Path, servers: tuple[HelloServer, HelloServer]
) -> None:
    """A renewal between the engine's read of its files and its first look at them is not
    left for the next renewal: a file changed after the read (here: its time set ahead)
    makes a reload."""
    import trustme

    v1, v2 = servers
    cert = trustme.CA().issue_cert("hello.test")
    certs = tmp_path / "certs"
    certs.mkdir()
    cert.cert_chain_pems[0].write_to_path(str(certs / "tls.crt"))
    cert.private_key_pem.write_to_path(str(certs / "tls.key"))
    ahead = time.time() + 3600
    os.utime(certs / "tls.crt", (ahead, ahead))
    proxy = Proxy(tls_listener(tmp_path, mesh(v1.port, v2.port, "v1"), certs))
    try:
        assert "reload ok (tls_files)" in proxy.next_reload()
        stats = proxy.get("/stats?format=json")
        assert stats['metaprotocol_reloads_total{source="tls_files",result="ok"}'] >= 1
    finally:
        proxy.stop()
