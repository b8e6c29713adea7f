"""Istio's PeerAuthentication on the engine's listeners (``meshIdentity`` set, no ``tls``):
PERMISSIVE (the default) serves Istio mutual TLS and plain text on one port, by the first
bytes of each connection; STRICT mutual TLS only; DISABLE plain text only. Real sockets on
127.0.0.1, the KV codec, on both event loops; and the configuration's checks."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mesh_pki import MeshCa, spiffe
from proxy_kit import (
    REQUEST,
    RESPONSE,
    WAIT,
    Client,
    Upstream,
    address,
    build_frame,
    engine_for,
    error_type,
    mesh,
    run,
)

from metaprotocol_sdk import ConfigError
from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.detection import Detecting, client_hello
from metaprotocol_sdk.proxy.downstream import Downstream

LOOPS = ("uvloop", "asyncio")
LISTENER = "svc.test:9000"


@pytest.fixture
def ca() -> MeshCa:
    return MeshCa()


def peer_authentication(mode: str | None, name: str = "default", more: str = "") -> str:
    body = (f"\n  mtls: {{mode: {mode}}}" if mode else "") + more
    return (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        f"metadata: {{name: {name}, namespace: istio-system}}\nspec:{body or ' {}'}\n"
    )


def config(
    ca: MeshCa,
    tmp_path: Path,
    port: int,
    mode: str | None = None,
    proxy: str = "",
) -> str:
    """The one-service mesh with the engine's identity, and a PeerAuthentication of
    ``mode`` (``None``: none, Istio's default PERMISSIVE)."""
    certs = tmp_path / "certs"
    if not certs.exists():
        ca.write(certs, "engine")
    return mesh(
        [(port, "v1")],
        proxy=f"meshIdentity: {{directory: '{certs}'}}\n" + proxy,
        extra=peer_authentication(mode) if mode else "",
    )


def detected(engine: Engine, result: str) -> int:
    return int(
        engine.stats.get(
            "metaprotocol_downstream_connections_detected_total", listener=LISTENER, result=result
        )
    )


def handshake_errors(engine: Engine, reason: str) -> int:
    return int(
        engine.stats.get(
            "metaprotocol_tls_handshake_errors_total", listener=LISTENER, reason=reason
        )
    )


async def until(condition: Callable[[], Any]) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.005)


def peer_uris(transport: Any) -> list[str]:
    cert = transport.get_extra_info("peercert") or {}
    return [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]


async def refused(engine: Engine, ctx: ssl.SSLContext) -> bool:
    """Whether a TLS client with ``ctx`` is refused (in or right after its handshake)."""
    try:
        conn = await Client.connect(address(engine), ssl=ctx)
        reply = await asyncio.wait_for(conn.call("get"), WAIT)
        conn.close()
        return error_type(reply) is not None
    except (OSError, asyncio.IncompleteReadError, EOFError, ConnectionError):
        return True


class TlsClient:
    """A TLS client over memory buffers: its ClientHello can be sent as the test likes."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=False)
        with pytest.raises(ssl.SSLWantReadError):
            self.obj.do_handshake()
        self.hello = self.outgoing.read()

    async def finish(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The rest of the handshake (``EOFError``: the server closed the connection)."""
        while True:
            data = await read_some(reader)
            if not data:
                raise EOFError("closed by the server during the handshake")
            self.incoming.write(data)
            try:
                self.obj.do_handshake()
                return
            except ssl.SSLWantReadError:
                pass
            finally:
                writer.write(self.outgoing.read())

    async def call(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, frame: bytes
    ) -> bytes:
        self.obj.write(frame)
        writer.write(self.outgoing.read())
        while True:
            try:
                data = self.obj.read(65536)
            except ssl.SSLWantReadError:
                self.incoming.write(await read_some(reader))
                continue
            writer.write(self.outgoing.read())  # (TLS 1.3 tickets need no answer)
            return data


async def read_some(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(65536), WAIT)


def detecting(engine: Engine) -> list[Detecting]:
    return [c for c in engine.handshaking if isinstance(c, Detecting)]


# -- PERMISSIVE ---------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("declared", [False, True])
def test_permissive_serves_mutual_tls_and_plain_text_on_one_port(
    ca: MeshCa, tmp_path: Path, loop: str, declared: bool
) -> None:
    """Istio's default with an identity (no PeerAuthentication), or one saying PERMISSIVE: a
    sidecar's mutual TLS (the identity's certificate, ALPN istio) and a plain client on the
    same port, each counted by how it was served."""

    async def main() -> None:
        up = await Upstream("v1").start()
        text = config(ca, tmp_path, up.port, "PERMISSIVE" if declared else None)
        async with engine_for(text) as engine:
            plain = await Client.connect(address(engine))
            assert error_type(await plain.call("get", rid=5)) is None
            mtls = await Client.connect(
                address(engine), ssl=ca.client_context(tmp_path, "frontend")
            )
            assert mtls.transport is not None
            alpn = mtls.transport.get_extra_info("ssl_object").selected_alpn_protocol()
            assert alpn == "istio-peer-exchange" and mtls.peer_metadata is not None
            assert peer_uris(mtls.transport) == [spiffe("engine")]
            reply = await mtls.call("get", rid=6)
            assert reply.request_id == 6 and error_type(reply) is None
            assert error_type(await plain.call("get")) is None  # both open, both served
            kinds = sorted(type(d).__name__ for d in engine.downstreams)
            assert kinds == ["Downstream", "TlsDownstream"]
            assert detected(engine, "plain") == 1 and detected(engine, "mtls") == 1
            assert engine.stats.get("metaprotocol_tls_handshakes_total", listener=LISTENER) == 1
            assert engine.stats.get("metaprotocol_downstream_connections_total", listener=LISTENER)
            plain.close()
            mtls.close()
        await up.close()
        assert len(up.received) == 3

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_permissive_refuses_a_client_hello_without_a_certificate(
    ca: MeshCa, tmp_path: Path, loop: str
) -> None:
    """A TLS client is a mutual TLS client here: without a certificate of the mesh it is
    refused in the handshake, as on an ISTIO_MUTUAL listener, and nothing is forwarded."""

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port)) as engine:
            assert await refused(engine, ca.client_context(tmp_path, None))
            await until(lambda: handshake_errors(engine, "no_client_certificate") == 1)
            other = MeshCa("other-root").client_context(tmp_path / "other", "frontend")
            other.load_verify_locations(cadata=ca.pem.decode())
            assert await refused(engine, other)
            await until(lambda: handshake_errors(engine, "bad_certificate") == 1)
            assert detected(engine, "mtls") == 2 and detected(engine, "plain") == 0
        await up.close()
        assert up.received == []

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_plain_client_sending_one_byte_at_a_time(ca: MeshCa, tmp_path: Path, loop: str) -> None:
    """The first byte that is not a ClientHello's decides: the connection is a plain one
    from then on, with the byte; the rest of the frame, a byte per read, is assembled by
    it as by any plain connection."""

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port)) as engine:
            reader, writer = await asyncio.open_connection(*address(engine))
            frame = build_frame(REQUEST, 9, {"method": "get"})
            writer.write(frame[:1])
            await until(lambda: detected(engine, "plain") == 1)
            (conn,) = engine.downstreams
            assert type(conn) is Downstream and bytes(conn.buffer) == frame[:1]
            for i in range(1, len(frame)):
                writer.write(frame[i : i + 1])
                await writer.drain()
                await until(lambda i=i: len(conn.buffer) == i + 1 or not conn.buffer)  # type: ignore[misc]
            reply = await read_some(reader)
            assert reply[:2] == b"KV" and reply[2] == RESPONSE
            writer.close()
        await up.close()
        assert len(up.received) == 1

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_hello_one_byte_at_a_time_is_mutual_tls(
    ca: MeshCa, tmp_path: Path, loop: str
) -> None:
    """The bytes held while they could still begin a ClientHello (at most six) are handed
    to the TLS layer with the rest: the handshake completes and the client is served."""

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port)) as engine:
            client = TlsClient(ca.client_context(tmp_path, "frontend", ["istio"]))
            reader, writer = await asyncio.open_connection(*address(engine))
            await until(lambda: len(detecting(engine)) == 1)
            (det,) = detecting(engine)
            for i in range(5):
                writer.write(client.hello[i : i + 1])
                await until(lambda i=i: len(det.held) == i + 1)  # type: ignore[misc]
            assert detected(engine, "mtls") == 0
            writer.write(client.hello[5:])
            await client.finish(reader, writer)
            assert detected(engine, "mtls") == 1
            data = await client.call(reader, writer, build_frame(REQUEST, 4, {"method": "get"}))
            assert data[:2] == b"KV" and data[2] == RESPONSE
            writer.close()
        await up.close()
        assert len(up.received) == 1

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_that_sends_nothing_is_served_as_plain_text_after_the_handshake_timeout(
    ca: MeshCa, tmp_path: Path, loop: str
) -> None:
    """As Envoy's listener filters with Istio's continue-on-timeout: a client that connects
    and waits (a pre-connected pool) is a plain connection once ``timeouts.handshake`` has
    passed, not closed; until then it counts against ``limits.maxConnections``."""

    async def main() -> None:
        up = await Upstream("v1").start()
        proxy = "timeouts: {handshake: 300ms}\nlimits: {maxConnections: 1}\n"
        async with engine_for(config(ca, tmp_path, up.port, proxy=proxy)) as engine:
            loop_ = asyncio.get_running_loop()
            start = loop_.time()
            silent = await Client.connect(address(engine))
            await until(lambda: len(detecting(engine)) == 1)
            # The silent client holds the one connection allowed: another is refused.
            late = await Client.connect(address(engine))
            await asyncio.wait_for(late.closed, WAIT)
            rejected = engine.stats.get(
                "metaprotocol_downstream_connections_rejected_total",
                listener=LISTENER,
                reason="max_connections",
            )
            assert rejected == 1
            await until(lambda: detected(engine, "timeout") == 1)
            assert loop_.time() - start >= 0.3 * 0.9
            (conn,) = engine.downstreams
            assert type(conn) is Downstream and not engine.handshaking
            assert error_type(await silent.call("get")) is None
            silent.close()
        await up.close()

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_client_that_leaves_before_its_first_bytes_is_counted_once(
    ca: MeshCa, tmp_path: Path, loop: str, how: str
) -> None:
    """A TCP probe (connect, close) or a reset: ``closed``, once, and nothing left held."""

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port)) as engine:
            client = await Client.connect(address(engine))
            await until(lambda: len(detecting(engine)) == 1)
            client.close() if how == "close" else client.reset()
            await until(lambda: not engine.handshaking)
            await asyncio.wait_for(client.closed, WAIT)
            plain = await Client.connect(address(engine))  # a turn of the loop at least
            assert error_type(await plain.call("get")) is None
            plain.close()
        assert detected(engine, "closed") == 1 and detected(engine, "plain") == 1
        assert not engine.downstreams and not engine.handshaking
        await up.close()

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_burst_of_connections_detecting_counts_against_max_connections_at_once(
    ca: MeshCa, tmp_path: Path, loop: str
) -> None:
    """A burst of 30 silent connections (all in the accept queue before the loop looks: it
    accepts them in one turn) against a ``maxConnections`` of 3: three are detecting, the
    rest refused at once, closed cleanly, and the three are served after the timeout."""

    async def main() -> None:
        up = await Upstream("v1").start()
        proxy = "timeouts: {handshake: 300ms}\nlimits: {maxConnections: 3}\n"
        async with engine_for(config(ca, tmp_path, up.port, proxy=proxy)) as engine:
            # Blocking connects without a turn of the loop: the kernel completes them all.
            socks = [socket.create_connection(address(engine)) for _ in range(30)]

            def rejected() -> int:
                return int(
                    engine.stats.get(
                        "metaprotocol_downstream_connections_rejected_total",
                        listener=LISTENER,
                        reason="max_connections",
                    )
                )

            await until(lambda: rejected() + len(engine.handshaking) == 30)
            assert len(detecting(engine)) == 3 and rejected() == 27
            await until(lambda: detected(engine, "timeout") == 3)
            assert len(engine.downstreams) == 3 and not engine.handshaking
            for s in socks:
                s.close()
        await up.close()

    run(main(), loop=loop)


def test_a_stop_aborts_the_connections_detecting_without_counting_them(
    ca: MeshCa, tmp_path: Path
) -> None:
    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port)) as engine:
            client = await Client.connect(address(engine))
            await until(lambda: len(detecting(engine)) == 1)
        await asyncio.wait_for(client.closed, WAIT)
        assert not engine.handshaking
        results = ("closed", "plain", "mtls", "timeout")
        assert [detected(engine, r) for r in results] == [0, 0, 0, 0]
        await up.close()

    run(main())


# -- STRICT and DISABLE -------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_strict_refuses_plain_text(ca: MeshCa, tmp_path: Path, loop: str) -> None:
    """STRICT is an ISTIO_MUTUAL listener: a plain client is refused in the handshake
    (``not_tls``), a mesh client served."""

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port, "STRICT")) as engine:
            plain = await Client.connect(address(engine))
            plain.start("get")
            await asyncio.wait_for(plain.closed, WAIT)
            await until(lambda: handshake_errors(engine, "not_tls") == 1)
            mtls = await Client.connect(
                address(engine), ssl=ca.client_context(tmp_path, "frontend")
            )
            assert error_type(await mtls.call("get")) is None
            mtls.close()
            assert not engine.stats.counters("metaprotocol_downstream_connections_detected_total")
        await up.close()
        assert len(up.received) == 1

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_disable_closes_a_tls_client_cleanly_and_serves_plain_text(
    ca: MeshCa, tmp_path: Path, loop: str
) -> None:
    """DISABLE: plain text only. A ClientHello is not read as a frame (the codec's error
    reply would be garbage to a TLS client): the connection is closed with a FIN and
    nothing written, and counted."""

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port, "DISABLE")) as engine:
            hello = TlsClient(ca.client_context(tmp_path, "frontend")).hello
            reader, writer = await asyncio.open_connection(*address(engine))
            writer.write(hello)
            assert await asyncio.wait_for(reader.read(), WAIT) == b""  # EOF, not a reset
            writer.close()
            assert detected(engine, "tls_refused") == 1
            plain = await Client.connect(address(engine))
            assert error_type(await plain.call("get")) is None
            plain.close()
            assert detected(engine, "plain") == 1
            assert not engine.stats.counters("metaprotocol_tls_handshakes_total")
        await up.close()
        assert len(up.received) == 1

    run(main(), loop=loop)


def test_a_reload_changes_the_mode_for_new_connections(ca: MeshCa, tmp_path: Path) -> None:
    """PERMISSIVE to STRICT: the plain connection open is drained (closed, with nothing in
    flight: a STRICT port serves no plain text, as Envoy drains the connections of a filter
    chain an update removed), a new plain one is refused; then DISABLE: a new TLS client is
    closed, plain ones served."""

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port)) as engine:
            before = await Client.connect(address(engine))
            assert error_type(await before.call("get")) is None
            await engine.apply(loads_config(config(ca, tmp_path, up.port, "STRICT"), "t.yaml"))
            await asyncio.wait_for(before.closed, WAIT)
            after = await Client.connect(address(engine))
            after.start("get")
            await asyncio.wait_for(after.closed, WAIT)
            await until(lambda: handshake_errors(engine, "not_tls") == 1)
            await engine.apply(loads_config(config(ca, tmp_path, up.port, "DISABLE"), "t.yaml"))
            assert await refused(engine, ca.client_context(tmp_path, "frontend"))
            assert detected(engine, "tls_refused") == 1
            plain = await Client.connect(address(engine))
            assert error_type(await plain.call("get")) is None
            before.close()
            plain.close()
        await up.close()

    run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_reload_to_strict_aborts_a_connection_still_detecting(
    ca: MeshCa, tmp_path: Path, loop: str
) -> None:
    """A connection accepted while PERMISSIVE that has sent nothing yet when a reload makes
    the port STRICT is reset: its plain text, sent afterwards, is not served (it was: the
    detection of then handed it to a plain connection of the STRICT listener)."""

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port)) as engine:
            reader, writer = await asyncio.open_connection(*address(engine))
            await until(lambda: len(detecting(engine)) == 1)
            await engine.apply(loads_config(config(ca, tmp_path, up.port, "STRICT"), "t.yaml"))
            writer.write(build_frame(REQUEST, 9, {"method": "get"}))
            try:
                reply = await read_some(reader)
            except ConnectionError:
                reply = b""
            assert reply == b""
            assert not engine.downstreams
            writer.close()
        await up.close()
        assert not up.received

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_connection_still_detecting_is_judged_by_the_mode_of_now(
    ca: MeshCa, tmp_path: Path, loop: str
) -> None:
    """A connection accepted while DISABLE that has sent nothing yet when a reload makes the
    port PERMISSIVE is judged by PERMISSIVE: its ClientHello is served over mutual TLS (the
    detection of before the reload refused it)."""

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port, "DISABLE")) as engine:
            reader, writer = await asyncio.open_connection(*address(engine))
            await until(lambda: len(detecting(engine)) == 1)
            await engine.apply(loads_config(config(ca, tmp_path, up.port, "PERMISSIVE"), "t.yaml"))
            client = TlsClient(ca.client_context(tmp_path, "frontend", ["istio"]))
            writer.write(client.hello)
            await client.finish(reader, writer)
            reply = await client.call(reader, writer, build_frame(REQUEST, 4, {"method": "get"}))
            assert reply[:2] == b"KV"
            writer.close()
        await up.close()
        assert len(up.received) == 1

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_reload_to_disable_lets_a_tls_connection_still_shaking_hands_finish(
    ca: MeshCa, tmp_path: Path, loop: str
) -> None:
    """A STRICT port's connection whose handshake has not ended when a reload makes the port
    DISABLE finishes it and is served over TLS: a listener made plain keeps the TLS sessions
    begun on it (no weaker), while a plain one on a port made STRICT is not served (above)."""

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port, "STRICT")) as engine:
            reader, writer = await asyncio.open_connection(*address(engine))
            await until(lambda: len(engine.handshaking) == 1)
            await engine.apply(loads_config(config(ca, tmp_path, up.port, "DISABLE"), "t.yaml"))
            client = TlsClient(ca.client_context(tmp_path, "frontend", ["istio"]))
            writer.write(client.hello)
            await client.finish(reader, writer)
            reply = await client.call(reader, writer, build_frame(REQUEST, 4, {"method": "get"}))
            assert reply[:2] == b"KV"
            writer.close()
        await up.close()
        assert len(up.received) == 1

    run(main(), loop=loop)


# -- detection ----------------------------------------------------------------------------------


def test_client_hello_is_told_by_its_record_header_and_message_type(
    ca: MeshCa, tmp_path: Path
) -> None:
    hello = TlsClient(ca.client_context(tmp_path, "frontend")).hello
    for n in range(6):
        assert client_hello(hello[:n]) is None
    assert client_hello(hello[:6]) is True and client_hello(hello) is True
    assert client_hello(b"KV") is False
    assert client_hello(b"\x16\x02") is False  # not version 3.x
    assert client_hello(b"\x16\x03\x09") is False
    assert client_hello(b"\x16\x03\x01\x00\x00") is False  # an empty record
    assert client_hello(b"\x16\x03\x01\x40\x01") is False  # longer than a record can be
    assert client_hello(b"\x16\x03\x01\x00\x05\x02") is False  # a ServerHello
    assert client_hello(b"\x15\x03\x01\x00\x02") is False  # an alert


# -- configuration ------------------------------------------------------------------------------


def load_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        loads_config(text, "test.yaml")
    return caught.value


@pytest.mark.parametrize("mode", ["STRICT", "PERMISSIVE"])
def test_mutual_tls_modes_without_an_identity_say_what_to_configure(mode: str) -> None:
    exc = load_error(mesh([(1, "v1")], extra=peer_authentication(mode)))
    assert exc.field == "spec.mtls.mode" and "set spec.meshIdentity" in str(exc)
    assert "PeerAuthentication/default" in str(exc.source)
    more = "\n  selector: {matchLabels: {app: x}}\n  portLevelMtls: {9000: {mode: " + mode + "}}"
    exc = load_error(mesh([(1, "v1")], extra=peer_authentication("DISABLE", more=more)))
    assert exc.field == "spec.portLevelMtls.9000.mode"


def test_without_an_identity_disable_changes_nothing() -> None:
    cfg = loads_config(mesh([(1, "v1")], extra=peer_authentication("DISABLE")), "t.yaml")
    (listener,) = cfg.proxy.listeners
    assert listener.tls is None and listener.peer_mode is None


def modes(ca: MeshCa, tmp_path: Path, *docs: str, bind: int = 0, tls: str = "") -> Any:
    ca.write(tmp_path / "certs", "engine")
    text = mesh(
        [(1, "v1")],
        proxy=f"meshIdentity: {{directory: '{tmp_path / 'certs'}'}}\n",
        extra="\n---\n".join(docs),
        listener_tls=tls,
    ).replace("bind: '127.0.0.1:0'", f"bind: '127.0.0.1:{bind}'")
    (listener,) = loads_config(text, "t.yaml").proxy.listeners
    return listener


def workload(mode: str | None, ports: str = "") -> str:
    more = "\n  selector: {matchLabels: {app: svc}}"
    if ports:
        more += f"\n  portLevelMtls: {ports}"
    return peer_authentication(mode, "svc", more)


@pytest.mark.parametrize(
    "docs,bind,expected",
    [
        ((), 0, "PERMISSIVE"),  # Istio's default
        ((peer_authentication("STRICT"),), 0, "STRICT"),
        ((peer_authentication("UNSET"),), 0, "PERMISSIVE"),
        ((peer_authentication(None),), 0, "PERMISSIVE"),
        # The workload's over the namespace's (or mesh's); UNSET inherits.
        ((peer_authentication("STRICT"), workload("PERMISSIVE")), 0, "PERMISSIVE"),
        ((peer_authentication("STRICT"), workload("UNSET")), 0, "STRICT"),
        ((peer_authentication("DISABLE"), workload(None)), 0, "DISABLE"),
        # portLevelMtls by the port the listener binds (Istio's container port).
        (
            (peer_authentication("STRICT"), workload(None, "{20880: {mode: DISABLE}}")),
            20880,
            "DISABLE",
        ),
        (
            (peer_authentication("STRICT"), workload(None, "{'20880': {mode: UNSET}}")),
            20880,
            "STRICT",
        ),
        ((workload("DISABLE", "{20880: {mode: PERMISSIVE}}"),), 20881, "DISABLE"),
    ],
)
def test_peer_authentications_compose_as_istiod_does(
    ca: MeshCa, tmp_path: Path, docs: tuple[str, ...], bind: int, expected: str
) -> None:
    listener = modes(ca, tmp_path, *docs, bind=bind)
    assert listener.peer_mode == expected
    if expected == "DISABLE":
        assert listener.tls is None
    else:
        assert listener.tls is not None and listener.tls.mode == "ISTIO_MUTUAL"


def test_a_listener_with_its_own_tls_keeps_it(ca: MeshCa, tmp_path: Path) -> None:
    listener = modes(ca, tmp_path, peer_authentication("DISABLE"), tls="{mode: ISTIO_MUTUAL}")
    assert listener.peer_mode is None and listener.tls.mode == "ISTIO_MUTUAL"


@pytest.mark.parametrize(
    "docs,field,words",
    [
        (
            (peer_authentication("STRICT", more="\n  portLevelMtls: {9000: {mode: DISABLE}}"),),
            "spec.portLevelMtls",
            "portLevelMtls requires selector",
        ),
        (
            (peer_authentication("STRICT"), peer_authentication("DISABLE", "other")),
            "kind",
            "a second PeerAuthentication without a selector (PeerAuthentication/default",
        ),
        ((workload("STRICT"), workload("DISABLE")), "kind", "with a selector"),
        ((peer_authentication("MUTUAL"),), "spec.mtls.mode", "unknown mode 'MUTUAL'"),
        ((peer_authentication("OFF"),), "spec.mtls.mode", "unknown mode False"),
        ((workload(None, "{0: {mode: STRICT}}"),), "spec.portLevelMtls.0", "port number"),
        (  # an explicit key: YAML's implicit ones have at most 1024 characters
            (workload(None, "\n    ? '" + "9" * 5000 + "'\n    : {mode: STRICT}"),),
            "spec.portLevelMtls." + "9" * 5000,
            "port number",
        ),
        ((workload(None, "{'٣': {}}"),), "spec.portLevelMtls.٣", "port number"),
        ((workload(None, "{9000: STRICT}"),), "spec.portLevelMtls.9000", "must be a mapping"),
        ((workload(None, "{9000: {mode: STRICT, x: 1}}"),), "spec.portLevelMtls.9000.x", "unknown"),
        ((peer_authentication("STRICT", more="\n  action: ALLOW"),), "spec.action", "unknown"),
    ],
)
def test_peer_authentication_refusals(
    ca: MeshCa, tmp_path: Path, docs: tuple[str, ...], field: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        modes(ca, tmp_path, *docs)
    assert caught.value.field == field and words in str(caught.value)


def test_the_selector_and_a_service_port_key_are_cautioned(
    ca: MeshCa, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        listener = modes(ca, tmp_path, workload("STRICT", "{9000: {mode: DISABLE}}"), bind=20880)
    assert listener.peer_mode == "STRICT"
    assert "taken as selecting this engine" in caplog.text
    assert "port 9000 matches no listener's bind port" in caplog.text
    assert "svc.test:9000 is a service port" in caplog.text
    assert "metadata.namespace" in caplog.text and "no namespaces" in caplog.text


def test_the_mode_is_shown_in_the_config_dump(ca: MeshCa, tmp_path: Path) -> None:
    import json

    from proxy_kit import http_get

    async def main() -> None:
        async with engine_for(config(ca, tmp_path, 1, "STRICT")) as engine:
            assert engine.admin_address is not None
            _, body = await http_get(engine.admin_address, "/config_dump")
            dump = json.loads(body)
            (listener,) = dump["listeners"]
            assert listener["peerAuthentication"] == "STRICT"
            assert listener["tls"]["mode"] == "ISTIO_MUTUAL"
            assert dump["peerAuthentication"]["mode"] == "STRICT"

    run(main())
