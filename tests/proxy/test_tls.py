"""TLS in both directions with the KV codec, over real sockets on 127.0.0.1: origination from
a DestinationRule's ``trafficPolicy.tls``, termination on a listener's ``tls``, hostile
handshakes, rotation by reload, and the configuration's checks. Certificates come from
trustme (test CAs), revocation lists from cryptography."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import datetime
import gc
import json
import logging
import os
import socket
import ssl
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st
from proxy_kit import (
    PING,
    RESPONSE,
    WAIT,
    Client,
    Upstream,
    address,
    engine_for,
    error_type,
    http_get,
    mesh,
    run,
    stall_the_loop,
)

from metaprotocol_sdk import ConfigError, Metadata
from metaprotocol_sdk.examples.kv import REQUEST, KVCodec, build_frame
from metaprotocol_sdk.proxy import loads_config
from metaprotocol_sdk.proxy.assembly import DECODE_TURN
from metaprotocol_sdk.proxy.downstream import Downstream
from metaprotocol_sdk.proxy.tls import TlsDownstream, TlsUpstreamConnection
from metaprotocol_sdk.proxy.upstream import UpstreamConnection

LOOPS = ("uvloop", "asyncio")


class Pki:
    """A CA and the files the tests configure, written under ``root``."""

    def __init__(self, root: Path, name: str = "ca") -> None:
        self.root = root
        self.ca = trustme.CA(organization_name=name)
        self.ca_file = self.write(f"{name}.pem", self.ca.cert_pem.bytes())

    def write(self, name: str, data: bytes) -> str:
        path = self.root / name
        path.write_bytes(data)
        return str(path)

    def leaf(self, name: str, *identities: str, **kwargs: Any) -> tuple[str, str]:
        """A certificate for ``identities`` and its key: ``(cert path, key path)``."""
        cert = self.ca.issue_cert(*identities, **kwargs)
        chain = b"".join(p.bytes() for p in cert.cert_chain_pems)
        return (
            self.write(f"{name}.crt", chain),
            self.write(f"{name}.key", cert.private_key_pem.bytes()),
        )

    def server_context(self, cert: tuple[str, str], client_ca: str | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(*cert)
        if client_ca is not None:
            ctx.load_verify_locations(client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self, cert: tuple[str, str] | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if cert is not None:
            ctx.load_cert_chain(*cert)
        return ctx


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def tls_policy(**fields: Any) -> str:
    """A ``trafficPolicy`` with ``tls``, as a YAML flow mapping."""
    return "{tls: " + json.dumps(fields) + "}"


class SniRecorder:
    """Records the SNI of each TLS connection a server context accepts."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.names: list[str | None] = []
        ctx.sni_callback = self._seen

    def _seen(self, sock: Any, name: str | None, ctx: ssl.SSLContext) -> None:
        self.names.append(name)


async def until(condition: Callable[[], bool]) -> None:
    """Wait (bounded) until ``condition`` holds: the engine's state, looked at each 10 ms."""
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.01)


async def small_window_tls_client(engine: Any, pki: Pki) -> Client:
    """A TLS client of ``engine`` whose socket takes little from it (``SO_RCVBUF`` 4 KiB):
    what the client does not read stays with the engine, not in the kernel."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(address(engine))
    _, client = await asyncio.get_running_loop().create_connection(
        Client, sock=raw, ssl=pki.client_context(), server_hostname="svc.test"
    )
    return client


def record_loop_errors() -> list[dict[str, Any]]:
    """Calls to the running loop's exception handler (a traceback in the log, otherwise)."""
    seen: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: seen.append(ctx))
    return seen


# -- origination -------------------------------------------------------------------------------


def test_upstream_simple_tls_verifies_the_server_and_sends_the_host_as_sni(pki: Pki) -> None:
    server_ctx = pki.server_context(pki.leaf("up", "svc.test"))
    sni = SniRecorder(server_ctx)

    async def main() -> None:
        up = await Upstream("v1").start(ssl=server_ctx)
        text = mesh(
            [(up.port, "v1")], traffic_policy=tls_policy(mode="SIMPLE", caCertificates=pki.ca_file)
        )
        async with engine_for(text) as engine:
            client = await Client.connect(address(engine))
            reply = await client.call("get", rid=41)
            assert reply.request_id == 41 and error_type(reply) is None
            assert reply.attributes.get("server") == "v1"
            cluster = engine.clusters["outbound|9000||svc.test"]
            assert isinstance(next(iter(engine.upstreams)), TlsUpstreamConnection)
            assert engine.stats.get("metaprotocol_tls_handshakes_total", cluster=cluster.name) == 1
            expiry = engine.stats_snapshot()
            assert any(k.startswith("metaprotocol_tls_certificate_expiry_seconds") for k in expiry)
            assert engine.admin_address is not None
            status, body = await http_get(engine.admin_address, "/config_dump")
            assert status == 200
            dumped = next(c for c in json.loads(body)["clusters"] if c["name"] == cluster.name)
            assert dumped["tls"]["mode"] == "SIMPLE"
            assert dumped["tls"]["caCertificates"] == pki.ca_file
            assert "BEGIN" not in body  # paths only, never what the files hold
            client.close()
        await up.close()
        assert sni.names == ["svc.test"]

    run(main())


def test_upstream_mutual_tls_presents_the_client_certificate(pki: Pki) -> None:
    client_cert = pki.leaf("client", "client.test")
    server_ctx = pki.server_context(pki.leaf("up", "svc.test"), client_ca=pki.ca_file)
    peers: list[Any] = []

    async def main() -> None:
        up = await Upstream("v1").start(ssl=server_ctx)
        mutual = tls_policy(
            mode="MUTUAL",
            caCertificates=pki.ca_file,
            clientCertificate=client_cert[0],
            privateKey=client_cert[1],
        )
        async with engine_for(mesh([(up.port, "v1")], traffic_policy=mutual)) as engine:
            client = await Client.connect(address(engine))
            reply = await client.call("get", rid=5)
            assert error_type(reply) is None
            conn = next(iter(up.connections))
            assert conn.transport is not None
            peers.append(conn.transport.get_extra_info("peercert"))
            client.close()
        # The same server refuses the engine without a client certificate: with TLS 1.3
        # it says so after the engine's side of the handshake, so the request is reset.
        simple = tls_policy(mode="SIMPLE", caCertificates=pki.ca_file)
        async with engine_for(mesh([(up.port, "v1")], traffic_policy=simple)) as engine:
            client = await Client.connect(address(engine))
            reply = await client.call("get", rid=6)
            assert reply.request_id == 6 and error_type(reply) == "UpstreamReset"
            assert up.received[1:] == []  # the server read nothing of it
            client.close()
        await up.close()

    run(main())
    assert ("DNS", "client.test") in peers[0]["subjectAltName"]


@pytest.mark.parametrize(
    "case",
    ["wrong_ca", "wrong_san", "wrong_host", "expired", "plaintext", "revoked"],
)
def test_upstream_certificate_refused_is_a_connect_failure(pki: Pki, case: str) -> None:
    """Each answers the request with the protocol's error reply, its id, the reason, and is
    counted as a connect failure."""
    other = Pki(pki.root, "other")
    names = {"wrong_host": ("elsewhere.test",)}.get(case, ("svc.test",))
    kwargs: dict[str, Any] = {}
    if case == "expired":
        now = datetime.datetime.now(datetime.UTC)
        kwargs = {
            "not_before": now - datetime.timedelta(days=10),
            "not_after": now - datetime.timedelta(days=1),
        }
    issuer = other if case == "wrong_ca" else pki
    server_ctx = issuer.server_context(issuer.leaf("up", *names, **kwargs))
    policy: dict[str, Any] = {"mode": "SIMPLE", "caCertificates": pki.ca_file}
    if case == "wrong_san":
        policy["subjectAltNames"] = ["spiffe://cluster.local/ns/x/sa/y", "other.test"]
    if case == "revoked":
        policy["caCrl"] = pki.write("crl.pem", revocation_list(pki, server_ctx))
    expected = {
        "wrong_ca": "certificate verify failed: unable to get local issuer certificate",
        "wrong_san": "match none of subjectAltNames (spiffe://cluster.local/ns/x/sa/y, other.test)",
        "wrong_host": "certificate verify failed: Hostname mismatch",
        "expired": "certificate verify failed: certificate has expired",
        "plaintext": "TLS handshake failed",
        "revoked": "certificate verify failed: certificate revoked",
    }[case]

    async def main() -> None:
        up = await Upstream("v1").start(ssl=None if case == "plaintext" else server_ctx)
        async with engine_for(
            mesh([(up.port, "v1")], traffic_policy=tls_policy(**policy))
        ) as engine:
            client = await Client.connect(address(engine))
            reply = await client.call("get", rid=77)
            assert reply.request_id == 77
            assert error_type(reply) == "UpstreamConnectFailure"
            assert expected in (reply.attributes.get("error-message") or ""), reply.attributes
            name = "outbound|9000||svc.test"
            assert engine.stats.get("metaprotocol_upstream_connect_errors_total", cluster=name) == 1
            assert engine.stats.total("metaprotocol_tls_handshake_errors_total") == 1
            assert up.received == []  # nothing was sent to a server not trusted
            client.close()
        await up.close()

    run(main())


def revocation_list(pki: Pki, server_ctx: ssl.SSLContext) -> bytes:
    """A CRL of ``pki``'s CA revoking the certificate ``server_ctx`` serves."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    served = Path(pki.root / "up.crt").read_bytes()
    leaf = x509.load_pem_x509_certificate(served)
    ca_cert = x509.load_pem_x509_certificate(pki.ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(pki.ca.private_key_pem.bytes(), None)
    now = datetime.datetime.now(datetime.UTC)
    revoked = (
        x509.RevokedCertificateBuilder()
        .serial_number(leaf.serial_number)
        .revocation_date(now - datetime.timedelta(minutes=1))
        .build()
    )
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - datetime.timedelta(minutes=1))
        .next_update(now + datetime.timedelta(days=1))
        .add_revoked_certificate(revoked)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return crl.public_bytes(serialization.Encoding.PEM)


def test_upstream_sni_and_subject_alt_names(pki: Pki) -> None:
    """``sni`` is sent as given and ``subjectAltNames`` checks the server's names instead
    of it; a DNS wildcard SAN covers one label."""
    server_ctx = pki.server_context(pki.leaf("up", "backend.internal", "*.svc.test"))
    sni = SniRecorder(server_ctx)
    policy = tls_policy(
        mode="SIMPLE",
        caCertificates=pki.ca_file,
        sni="front.example",
        subjectAltNames=["spiffe://mesh/ns/a/sa/b", "api.svc.test"],
    )

    async def main() -> None:
        up = await Upstream("v1").start(ssl=server_ctx)
        async with engine_for(mesh([(up.port, "v1")], traffic_policy=policy)) as engine:
            client = await Client.connect(address(engine))
            assert error_type(await client.call("get")) is None
            client.close()
        await up.close()

    run(main())
    assert sni.names == ["front.example"]


@pytest.mark.parametrize("loop", LOOPS)
def test_a_host_that_cannot_be_a_server_name_is_a_connect_failure(pki: Pki, loop: str) -> None:
    """A service host is sent as the SNI; one that is no server name (a label of 64
    characters: host names may have 253) made the TLS layer raise, which escaped the
    connect's task to the loop (a traceback) and left the request unanswered until the
    route's timeout. It is a connect failure like a refused connect, saying why."""
    host = "a" * 64 + ".test"

    async def main() -> None:
        errors = record_loop_errors()
        up = await Upstream("v1").start(ssl=pki.server_context(pki.leaf("up", "svc.test")))
        policy = tls_policy(mode="SIMPLE", insecureSkipVerify=True)
        text = mesh([(up.port, "v1")], traffic_policy=policy).replace("svc.test", host)
        async with engine_for(text) as engine:
            client = await Client.connect(engine.listener_addresses[(host, 9000)])
            reply = await asyncio.wait_for(client.call("get"), WAIT)
            assert error_type(reply) == "UpstreamConnectFailure", reply
            assert "server name" in reply.attributes.get("error-message", ""), reply
            client.close()
        await up.close()
        assert errors == []

    run(main(), loop=loop)


def test_retries_and_outlier_detection_treat_a_handshake_failure_as_a_refused_connect(
    pki: Pki,
) -> None:
    other = Pki(pki.root, "other")
    good = pki.server_context(pki.leaf("good", "svc.test"))
    bad = other.server_context(other.leaf("bad", "svc.test"))
    policy = (
        "{tls: "
        + json.dumps({"mode": "SIMPLE", "caCertificates": pki.ca_file})
        + ", outlierDetection: {consecutiveGatewayErrors: 1, baseEjectionTime: 30s,"
        " maxEjectionPercent: 50}}"
    )
    router = """\
        - name: all
          route: [{destination: {host: svc.test}}]
          retries: {attempts: 2, retryOn: connect-failure}
        """

    async def main() -> None:
        up_good = await Upstream("good").start(ssl=good)
        up_bad = await Upstream("bad").start(ssl=bad)
        text = mesh(
            [(up_bad.port, "v1"), (up_good.port, "v2")], router=router, traffic_policy=policy
        )
        async with engine_for(text) as engine:
            client = await Client.connect(address(engine))
            for rid in range(1, 5):
                reply = await client.call("get", rid=rid)
                assert error_type(reply) is None and reply.attributes.get("server") == "good"
            cluster = engine.clusters["outbound|9000||svc.test"]
            assert [h.key for h in cluster.hosts if h.ejected] == [f"127.0.0.1:{up_bad.port}"]
            assert engine.stats.total("metaprotocol_retries_total") >= 1
            client.close()
        await up_good.close()
        await up_bad.close()

    run(main())


def test_subsets_with_different_tls_never_share_a_connection(pki: Pki) -> None:
    """Two subsets of one endpoint, two SNIs: each request reaches the server on a
    connection of its own subset's settings."""
    server_ctx = pki.server_context(pki.leaf("up", "a.test", "b.test"))
    sni = SniRecorder(server_ctx)

    def subset(name: str, host: str) -> str:
        tls = json.dumps({"mode": "SIMPLE", "caCertificates": pki.ca_file, "sni": host})
        return f"- {{name: {name}, labels: {{version: v1}}, trafficPolicy: {{tls: {tls}}}}}"

    router = """\
        - name: a
          match: {attributes: {method: {exact: a}}}
          route: [{destination: {host: svc.test, subset: sa}}]
        - name: b
          route: [{destination: {host: svc.test, subset: sb}}]
        """

    async def main() -> None:
        up = await Upstream("v1").start(ssl=server_ctx)
        text = mesh([(up.port, "v1")], router=router).replace(
            "    - {name: empty, labels: {version: none}}",
            "    - {name: empty, labels: {version: none}}\n    "
            + subset("sa", "a.test")
            + "\n    "
            + subset("sb", "b.test"),
        )
        async with engine_for(text) as engine:
            client = await Client.connect(address(engine))
            for _ in range(3):
                assert error_type(await client.call("a")) is None
                assert error_type(await client.call("b")) is None
            assert len(engine.upstreams) == 2
            client.close()
        await up.close()

    run(main())
    assert sorted(sni.names) == ["a.test", "b.test"]


# -- termination -------------------------------------------------------------------------------


def listener_tls(pki: Pki, mode: str = "SIMPLE", **extra: Any) -> str:
    cert, key = pki.leaf("listener", "svc.test", "127.0.0.1")
    fields = {"mode": mode, "serverCertificate": cert, "privateKey": key, **extra}
    if mode != "SIMPLE":
        fields["caCertificates"] = pki.ca_file
    return json.dumps(fields)


@pytest.mark.parametrize("loop", LOOPS)
def test_listener_terminates_tls_to_a_plain_upstream(pki: Pki, loop: str) -> None:
    async def main() -> None:
        errors = record_loop_errors()
        up = await Upstream("v1").start()
        async with engine_for(mesh([(up.port, "v1")], listener_tls=listener_tls(pki))) as engine:
            client = await Client.connect(
                address(engine), ssl=pki.client_context(), server_hostname="svc.test"
            )
            replies = await asyncio.gather(*(client.call("get", rid=i) for i in range(1, 20)))
            assert [r.request_id for r in replies] == list(range(1, 20))
            assert all(r.attributes.get("server") == "v1" for r in replies)
            assert type(next(iter(engine.downstreams))) is TlsDownstream
            listener = "svc.test:9000"
            assert engine.stats.get("metaprotocol_tls_handshakes_total", listener=listener) == 1
            assert engine.admin_address is not None
            _, body = await http_get(engine.admin_address, "/config_dump")
            assert json.loads(body)["listeners"][0]["tls"]["mode"] == "SIMPLE"
            client.close()
            await asyncio.wait_for(client.closed, WAIT)
        await up.close()
        assert errors == []

    run(main(), loop=loop)


def test_a_uvloop_whose_tls_protocol_changed_falls_back_to_asyncios(
    pki: Pki, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """uvloop's SSLProtocol is not public: if a release changed its constructor, TLS
    listeners run asyncio's TLS protocol over uvloop's transports, and say so."""
    from metaprotocol_sdk.proxy import handshake

    monkeypatch.setattr(handshake, "_HANDSHAKES", {})
    monkeypatch.setattr(handshake, "_constructs", lambda base, loop: False)

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(mesh([(up.port, "v1")], listener_tls=listener_tls(pki))) as engine:
            client = await Client.connect(
                address(engine), ssl=pki.client_context(), server_hostname="svc.test"
            )
            assert error_type(await client.call("get")) is None
            client.close()
            await asyncio.wait_for(client.closed, WAIT)
        await up.close()

    with caplog.at_level(logging.WARNING, "metaprotocol.proxy"):
        run(main(), loop="uvloop")
    (made,) = handshake._HANDSHAKES.values()
    assert made.__mro__[1] is asyncio.sslproto.SSLProtocol
    assert "use asyncio's (slower) instead" in caplog.text


def test_mutual_listener_requires_a_client_certificate(pki: Pki) -> None:
    client_cert = pki.leaf("client", "client.test")

    async def main() -> None:
        up = await Upstream("v1").start()
        text = mesh([(up.port, "v1")], listener_tls=listener_tls(pki, "MUTUAL"))
        async with engine_for(text) as engine:
            client = await Client.connect(
                address(engine), ssl=pki.client_context(client_cert), server_hostname="svc.test"
            )
            assert error_type(await client.call("get")) is None
            client.close()
            # Without a certificate: TLS 1.3 fails after the client's handshake, at its read.
            anonymous = await Client.connect(
                address(engine), ssl=pki.client_context(), server_hostname="svc.test"
            )
            with pytest.raises((ConnectionError, ssl.SSLError)):
                await anonymous.call("get")
            listener = "svc.test:9000"
            errors = engine.stats.get(
                "metaprotocol_tls_handshake_errors_total",
                listener=listener,
                reason="no_client_certificate",
            )
            assert errors == 1
            assert engine.stats.get("metaprotocol_tls_handshakes_total", listener=listener) == 1
        await up.close()

    run(main())


# -- client certificates: names, pins, revocation ----------------------------------------------


def issue(pki: Pki, name: str, san: str, revoke: bool = False) -> tuple[str, str]:
    """A client certificate of ``pki``'s CA naming ``san`` (a URI, such as a SPIFFE id, or a
    DNS name), and its key: ``(cert path, key path)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_cert = x509.load_pem_x509_certificate(pki.ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(pki.ca.private_key_pem.bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    general = x509.UniformResourceIdentifier(san) if "://" in san else x509.DNSName(san)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([general]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pki.write(f"{name}.crt", pem), pki.write(f"{name}.key", key_pem)


def fingerprints(cert_path: str) -> tuple[str, str]:
    """A certificate's pins as ``openssl`` prints them: the base64 SHA-256 of its public key
    (``verifyCertificateSpki``), the colon-separated upper-case hex SHA-256 of the
    certificate (``verifyCertificateHash``). Computed with ``cryptography``, not the engine."""
    import base64
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return (
        base64.b64encode(hashlib.sha256(spki).digest()).decode(),
        ":".join(digest[i : i + 2] for i in range(0, 64, 2)),
    )


async def served(engine: Any, client_cert: tuple[str, str] | None, pki: Pki) -> bool:
    """Whether a client presenting ``client_cert`` (or none) is served a reply."""
    client = await Client.connect(
        address(engine), ssl=pki.client_context(client_cert), server_hostname="svc.test"
    )
    try:
        return error_type(await asyncio.wait_for(client.call("get"), WAIT)) is None
    except (ConnectionError, ssl.SSLError):
        return False
    finally:
        client.close()


def tls_counts(engine: Any, reason: str = "bad_certificate") -> tuple[int, int]:
    listener = "svc.test:9000"
    done = engine.stats.get("metaprotocol_tls_handshakes_total", listener=listener)
    refused = engine.stats.get(
        "metaprotocol_tls_handshake_errors_total", listener=listener, reason=reason
    )
    return done, refused or 0


GREETER = "spiffe://cluster.local/ns/shop/sa/greeter"


@pytest.mark.parametrize("loop", LOOPS)
def test_a_listener_admits_only_the_client_names_it_lists(pki: Pki, loop: str) -> None:
    """``subjectAltNames`` on a MUTUAL listener: a certificate of the trusted CA that names
    another workload is reset right after the handshake, counted ``bad_certificate``, and
    none of its requests reaches an upstream (a CA that signs every workload of a mesh
    authenticates nothing by its chain alone)."""
    greeter = issue(pki, "greeter", GREETER)
    other = issue(pki, "other", "spiffe://cluster.local/ns/shop/sa/other")
    dns = issue(pki, "dns", "greeter.shop.svc")

    async def main() -> None:
        errors = record_loop_errors()
        up = await Upstream("v1").start()
        tls = listener_tls(pki, "MUTUAL", subjectAltNames=[GREETER])
        async with engine_for(mesh([(up.port, "v1")], listener_tls=tls)) as engine:
            assert await served(engine, greeter, pki)
            assert not await served(engine, other, pki)
            assert not await served(engine, dns, pki)
            assert tls_counts(engine) == (1, 2)
            assert len(up.received) == 1
            await until(lambda: not engine.downstreams and not engine.handshaking)
            _, body = await http_get(engine.admin_address, "/config_dump")  # type: ignore[arg-type]
            assert json.loads(body)["listeners"][0]["tls"]["subjectAltNames"] == [GREETER]
        await up.close()
        assert errors == []

    run(main(), loop=loop)


def test_a_listener_admits_only_pinned_client_certificates(pki: Pki) -> None:
    """``verifyCertificateHash`` and ``verifyCertificateSpki`` (as ``openssl`` prints them,
    colons and upper case allowed): a match of either admits; a certificate of the same CA
    that matches neither is refused."""
    by_hash, by_key, neither = (issue(pki, n, f"{n}.test") for n in ("a", "b", "c"))

    async def main() -> None:
        up = await Upstream("v1").start()
        tls = listener_tls(
            pki,
            "MUTUAL",
            verifyCertificateHash=[fingerprints(by_hash[0])[1]],
            verifyCertificateSpki=[fingerprints(by_key[0])[0]],
        )
        async with engine_for(mesh([(up.port, "v1")], listener_tls=tls)) as engine:
            assert await served(engine, by_hash, pki)
            assert await served(engine, by_key, pki)
            assert not await served(engine, neither, pki)
            assert tls_counts(engine) == (2, 1)
        await up.close()

    run(main())


def test_optional_mutual_checks_a_certificate_only_when_one_is_presented(pki: Pki) -> None:
    async def main() -> None:
        up = await Upstream("v1").start()
        tls = listener_tls(pki, "OPTIONAL_MUTUAL", subjectAltNames=[GREETER])
        async with engine_for(mesh([(up.port, "v1")], listener_tls=tls)) as engine:
            assert await served(engine, None, pki)
            assert await served(engine, issue(pki, "greeter", GREETER), pki)
            assert not await served(engine, issue(pki, "other", "other.test"), pki)
            assert tls_counts(engine) == (2, 1)
        await up.close()

    run(main())


def client_crl(pki: Pki, cert_path: str) -> str:
    """A CRL file of ``pki``'s CA revoking the certificate at ``cert_path``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    leaf = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    ca_cert = x509.load_pem_x509_certificate(pki.ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(pki.ca.private_key_pem.bytes(), None)
    now = datetime.datetime.now(datetime.UTC)
    revoked = (
        x509.RevokedCertificateBuilder()
        .serial_number(leaf.serial_number)
        .revocation_date(now - datetime.timedelta(minutes=1))
        .build()
    )
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - datetime.timedelta(minutes=1))
        .next_update(now + datetime.timedelta(days=1))
        .add_revoked_certificate(revoked)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return pki.write("clients.crl", crl.public_bytes(serialization.Encoding.PEM))


def test_a_revoked_client_certificate_is_refused_in_the_handshake(pki: Pki) -> None:
    good, revoked = issue(pki, "good", "good.test"), issue(pki, "revoked", "revoked.test")

    async def main() -> None:
        up = await Upstream("v1").start()
        tls = listener_tls(pki, "MUTUAL", caCrl=client_crl(pki, revoked[0]))
        async with engine_for(mesh([(up.port, "v1")], listener_tls=tls)) as engine:
            assert await served(engine, good, pki)
            assert not await served(engine, revoked, pki)
            assert tls_counts(engine) == (1, 1)
        await up.close()

    run(main())


def test_a_reload_changes_the_client_names_admitted(pki: Pki) -> None:
    """New connections are checked against the names in force; one already open stays."""
    greeter = issue(pki, "greeter", GREETER)
    other_id = "spiffe://cluster.local/ns/shop/sa/other"
    other = issue(pki, "other", other_id)

    async def main() -> None:
        up = await Upstream("v1").start()
        first = mesh([(up.port, "v1")], listener_tls=listener_tls(pki, "MUTUAL"))
        text = first.replace('"MUTUAL"', '"MUTUAL", "subjectAltNames": ["' + GREETER + '"]')
        assert text != first
        async with engine_for(text) as engine:
            kept = await Client.connect(
                address(engine), ssl=pki.client_context(greeter), server_hostname="svc.test"
            )
            assert error_type(await kept.call("get")) is None
            assert not await served(engine, other, pki)
            await engine.apply(loads_config(text.replace(GREETER, other_id), "test.yaml"))
            assert await served(engine, other, pki)
            assert not await served(engine, greeter, pki)
            assert error_type(await kept.call("get")) is None
            kept.close()
        await up.close()

    run(main())


def test_public_key_info_is_what_cryptography_reads(pki: Pki) -> None:
    """The engine's DER reader finds the same public key as ``cryptography`` in EC and RSA
    certificates (trustme's are RSA here), and refuses what is not a certificate."""
    import base64
    import hashlib

    from metaprotocol_sdk.proxy.tls import public_key_info

    for cert_path in (issue(pki, "ec", "ec.test")[0], pki.leaf("rsa", "rsa.test")[0]):
        der = ssl.PEM_cert_to_DER_cert(
            Path(cert_path).read_text().split("-----END")[0] + ("-----END CERTIFICATE-----\n")
        )
        digest = base64.b64encode(hashlib.sha256(public_key_info(der)).digest()).decode()
        assert digest == fingerprints(cert_path)[0]
        for cut in (0, 1, 5, len(der) // 2):
            with pytest.raises(ValueError):
                public_key_info(der[:cut])
    with pytest.raises(ValueError):
        public_key_info(b"\x30\x84\xff\xff\xff\xff")


def test_listener_versions_and_ciphers(pki: Pki) -> None:
    """``minProtocolVersion: TLSV1_3`` refuses a TLS 1.2 client (counted)."""

    async def main() -> None:
        up = await Upstream("v1").start()
        tls = listener_tls(pki, minProtocolVersion="TLSV1_3")
        async with engine_for(mesh([(up.port, "v1")], listener_tls=tls)) as engine:
            old = pki.client_context()
            old.maximum_version = ssl.TLSVersion.TLSv1_2
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await Client.connect(address(engine), ssl=old, server_hostname="svc.test")
            client = await Client.connect(
                address(engine), ssl=pki.client_context(), server_hostname="svc.test"
            )
            assert error_type(await client.call("get")) is None
            assert client.transport is not None
            assert client.transport.get_extra_info("ssl_object").version() == "TLSv1.3"
            client.close()
            assert (
                engine.stats.get(
                    "metaprotocol_tls_handshake_errors_total",
                    listener="svc.test:9000",
                    reason="protocol_version",
                )
                == 1
            )
        await up.close()

    run(main())


# -- hostile clients ---------------------------------------------------------------------------


async def raw_connect(addr: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(*addr), WAIT)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """Read until the engine closes the connection; how long that took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        while await asyncio.wait_for(reader.read(65536), seconds):
            pass
    except ConnectionResetError:
        pass
    return loop.time() - start


#: A TLS 1.2 ClientHello's first 20 bytes: a record header promising more than follows.
HALF_HELLO = bytes.fromhex("16030100c8010000c40303") + bytes(9)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(
    "attack,reason",
    [
        ("garbage", "not_tls"),
        ("plaintext", "not_tls"),
        ("half_hello", "timeout"),
        ("silent", "timeout"),
    ],
)
def test_hostile_handshakes_are_closed_within_the_timeout_and_counted(
    pki: Pki, caplog: pytest.LogCaptureFixture, loop: str, attack: str, reason: str
) -> None:
    payload = {
        "garbage": bytes(range(256)) * 4,
        "plaintext": b"\x00\x00\x00\x20" + b"a KV request sent without TLS....",
        "half_hello": HALF_HELLO,
        "silent": b"",
    }[attack]

    async def main() -> None:
        errors = record_loop_errors()
        up = await Upstream("v1").start()
        text = mesh(
            [(up.port, "v1")], listener_tls=listener_tls(pki), proxy="timeouts: {handshake: 300ms}"
        )
        async with engine_for(text) as engine:
            reader, writer = await raw_connect(address(engine))
            if payload:
                writer.write(payload)
            took = await closed_within(reader, 2.0)
            assert took < 1.5
            if reason == "timeout":
                assert took >= 0.25
            assert (
                engine.stats.get(
                    "metaprotocol_tls_handshake_errors_total",
                    listener="svc.test:9000",
                    reason=reason,
                )
                == 1
            ), engine.stats_snapshot()
            assert not engine.handshaking and not engine.downstreams
            writer.close()
            # The listener serves the next client as usual.
            client = await Client.connect(
                address(engine), ssl=pki.client_context(), server_hostname="svc.test"
            )
            assert error_type(await client.call("get")) is None
            client.close()
        await up.close()
        assert errors == []

    with caplog.at_level(logging.DEBUG):
        run(main(), loop=loop)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]


def test_handshaking_connections_count_against_max_connections(pki: Pki) -> None:
    async def main() -> None:
        up = await Upstream("v1").start()
        text = mesh(
            [(up.port, "v1")],
            listener_tls=listener_tls(pki),
            proxy="limits: {maxConnections: 2}\ntimeouts: {handshake: 5s}",
        )
        async with engine_for(text) as engine:
            silent = [await raw_connect(address(engine)) for _ in range(2)]
            await until(lambda: len(engine.handshaking) == 2)
            reader, writer = await raw_connect(address(engine))
            assert await reader.read() == b""  # closed at once
            rejected = engine.stats.get(
                "metaprotocol_downstream_connections_rejected_total",
                listener="svc.test:9000",
                reason="max_connections",
            )
            assert rejected == 1
            writer.close()
            for _, w in silent:
                w.close()
        await up.close()

    run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_connection_refused_at_accept_is_never_served_without_tls(pki: Pki, loop: str) -> None:
    """The verdict at the accept is final. Both loops call the protocol's
    ``connection_made`` one loop iteration after the factory, and the engine's state can
    change meanwhile (another connection closes, the buffer budget drains): a connection of
    a TLS listener refused by the factory must not be judged again there and accepted as
    plain TCP (a plain client of a MUTUAL listener would be served without a certificate)."""

    async def main() -> None:
        up = await Upstream("v1").start()
        text = mesh([(up.port, "v1")], listener_tls=listener_tls(pki, "MUTUAL"))
        async with engine_for(text) as engine:
            judge = engine.refuse_connection
            verdicts = iter(["overload"])  # over the budget at the accept, not just after
            engine.refuse_connection = lambda: next(verdicts, None) or judge()  # type: ignore[method-assign]
            reader, writer = await raw_connect(address(engine))
            writer.write(build_frame(REQUEST, 7, {"method": "get"}))  # plain text, no TLS
            assert await asyncio.wait_for(reader.read(), WAIT) == b""  # closed, unanswered
            writer.close()
            assert up.received == []
            rejected = engine.stats.get(
                "metaprotocol_downstream_connections_rejected_total",
                listener="svc.test:9000",
                reason="overload",
            )
            assert rejected == 1 and not engine.downstreams
        await up.close()

    run(main(), loop=loop)


def client_hello() -> bytes:
    """A TLS 1.3 ClientHello, recorded once: replaying it makes a server do its half of a
    handshake (key exchange, signature) while the sender does no crypto at all."""
    out = ssl.MemoryBIO()
    hello = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out, server_hostname="x")
    with contextlib.suppress(ssl.SSLWantReadError):
        hello.do_handshake()
    return out.read()


async def flood_once(addr: tuple[str, int], payload: bytes) -> bool:
    """Connect, send ``payload``, read: whether anything came back (``False``: the engine
    closed the connection without a byte)."""
    reader, writer = await raw_connect(addr)
    writer.write(payload)
    try:
        answered = bool(await asyncio.wait_for(reader.read(1), WAIT))
    except ConnectionResetError:
        answered = False
    writer.transport.abort()
    return answered


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_a_connection_flood_beyond_the_rate_limit_is_refused_and_counted(
    pki: Pki, loop: str, tls: bool
) -> None:
    """``connectionRateLimit``: connections beyond the bucket are closed at the accept, before
    any handshake, and counted; a client already connected is served throughout, and a new
    one is served again once the bucket refills."""
    fill = 0.05

    async def main() -> None:
        errors = record_loop_errors()
        up = await Upstream("v1").start()
        bucket = f"{{maxTokens: 4, tokensPerFill: 1, fillInterval: {int(fill * 1000)}ms}}"
        text = mesh(
            [(up.port, "v1")],
            listener_tls=listener_tls(pki) if tls else "",
            listener=f"connectionRateLimit: {{tokenBucket: {bucket}}}",
        )
        ssl_args: dict[str, Any] = (
            {"ssl": pki.client_context(), "server_hostname": "svc.test"} if tls else {}
        )
        payload = client_hello() if tls else build_frame(REQUEST, 1, {"method": "get"})
        async with engine_for(text) as engine:
            loop_ = asyncio.get_running_loop()
            steady = await Client.connect(address(engine), **ssl_args)
            start = loop_.time()
            outcomes = []
            for _ in range(40):  # one at a time: the engine answers or refuses each
                outcomes.append(await flood_once(address(engine), payload))
                assert error_type(await steady.call("get")) is None  # served throughout
            took = loop_.time() - start
            answered = sum(outcomes)
            # 3 tokens left after the steady client, one more per fill interval that passed.
            assert 3 <= answered <= 3 + took / fill + 1, (answered, took)
            listener = "svc.test:9000"
            refused = engine.stats.get(
                "metaprotocol_downstream_connections_rejected_total",
                listener=listener,
                reason="rate_limited",
            )
            assert refused == 40 - answered  # the stats agree with what the clients saw
            if tls:  # no handshake was begun for a refused one
                failed = engine.stats.total(
                    "metaprotocol_tls_handshake_errors_total", listener=listener
                )
                assert failed <= answered
            # A new client is served again once a token is back (it retries, as clients do).
            async with asyncio.timeout(WAIT):
                while True:
                    try:
                        fresh = await Client.connect(address(engine), **ssl_args)
                        assert error_type(await fresh.call("get")) is None
                        break
                    except (ConnectionError, ssl.SSLError, AssertionError, RuntimeError):
                        await asyncio.sleep(fill)
            fresh.close()
            steady.close()
            assert engine.admin_address is not None
            _, body = await http_get(engine.admin_address, "/config_dump")
            dumped = json.loads(body)["listeners"][0]["connectionRateLimit"]
            assert dumped == {"max_tokens": 4, "tokens_per_fill": 1, "fill_interval": fill}
            # A reload that keeps the limit keeps its bucket (a reload does not refill it).
            runtime = engine.listeners[("svc.test", 9000)]
            kept = runtime.accept_limit
            await engine.apply(loads_config(text, "test.yaml"))
            assert runtime.accept_limit is kept is not None
            await engine.apply(loads_config(text.replace("maxTokens: 4", "maxTokens: 5"), "t"))
            assert runtime.accept_limit is not kept and runtime.accept_limit is not None
        await up.close()
        assert errors == []

    run(main(), loop=loop)


# -- reload ------------------------------------------------------------------------------------


def test_reload_rotates_the_listener_and_upstream_certificates(pki: Pki) -> None:
    """A reload reads the files again: new connections get the new certificates; a
    connection already open keeps serving."""
    cert, key = pki.leaf("listener", "svc.test")
    client_cert = pki.leaf("client", "client-1.test")
    up_ctx = pki.server_context(pki.leaf("up", "svc.test"), client_ca=pki.ca_file)
    rotated = Pki(pki.root, "rotated")

    async def main() -> None:
        up = await Upstream("v1").start(ssl=up_ctx)
        policy = tls_policy(
            mode="MUTUAL",
            caCertificates=pki.ca_file,
            clientCertificate=client_cert[0],
            privateKey=client_cert[1],
        )
        tls = json.dumps({"mode": "SIMPLE", "serverCertificate": cert, "privateKey": key})
        text = mesh([(up.port, "v1")], traffic_policy=policy, listener_tls=tls)
        async with engine_for(text) as engine:
            before = await Client.connect(
                address(engine), ssl=pki.client_context(), server_hostname="svc.test"
            )
            assert error_type(await before.call("get")) is None
            # Rotate in place: a new listener certificate from another CA, a new client one.
            fresh = rotated.ca.issue_cert("svc.test")
            Path(cert).write_bytes(fresh.cert_chain_pems[0].bytes())
            Path(key).write_bytes(fresh.private_key_pem.bytes())
            renewed = pki.ca.issue_cert("client-2.test")
            Path(client_cert[0]).write_bytes(renewed.cert_chain_pems[0].bytes())
            Path(client_cert[1]).write_bytes(renewed.private_key_pem.bytes())
            await engine.apply(loads_config(text, "test.yaml"))
            after = await Client.connect(
                address(engine), ssl=rotated.client_context(), server_hostname="svc.test"
            )
            assert error_type(await after.call("get")) is None
            with pytest.raises(ssl.SSLCertVerificationError):
                await Client.connect(
                    address(engine), ssl=pki.client_context(), server_hostname="svc.test"
                )
            assert error_type(await before.call("get")) is None  # still open, still served
            names = set()
            for conn in up.connections:
                assert conn.transport is not None
                names |= {v for _, v in conn.transport.get_extra_info("peercert")["subjectAltName"]}
            assert "client-2.test" in names  # the new cluster's connection
            before.close()
            after.close()
        await up.close()

    run(main())


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("change", ["routes", "plain", "rebound", "aborted"])
def test_a_reload_while_a_client_shakes_hands(pki: Pki, loop: str, change: str) -> None:
    """A connection still shaking hands when a reload commits is not yet one of the engine's
    connections: the reload must reach it too. New routes apply to it (``routes``); a
    listener that became plain finishes the TLS handshake it began and serves over it
    (``plain``); a listener rebound elsewhere (or an engine that aborts the handshake)
    leaves nothing behind: the connection is closed, not served by what the reload removed,
    and the handshaking set is emptied (``rebound``, ``aborted``)."""

    async def main() -> None:
        errors = record_loop_errors()
        v1, v2 = await Upstream("v1").start(), await Upstream("v2").start()
        endpoints = [(v1.port, "v1"), (v2.port, "v2")]
        to = "- {{name: r, route: [{{destination: {{host: svc.test, subset: {}}}}}]}}"
        text = mesh(endpoints, router=to.format("v1"), listener_tls=listener_tls(pki))
        async with engine_for(text) as engine:
            raw = socket.create_connection(address(engine))  # no ClientHello yet
            await until(lambda: len(engine.handshaking) == 1)
            if change == "aborted":
                next(iter(engine.handshaking)).abort()
            else:
                changed = {
                    "routes": mesh(endpoints, to.format("v2"), listener_tls=listener_tls(pki)),
                    "plain": mesh(endpoints, to.format("v1")),
                    "rebound": text.replace("bind: '127.0.0.1:0',", "bind: '127.0.0.2:0',"),
                }[change]
                await engine.apply(loads_config(changed, "test.yaml"))
            connecting = asyncio.get_running_loop().create_connection(
                Client, sock=raw, ssl=pki.client_context(), server_hostname="svc.test"
            )
            if change in ("rebound", "aborted"):
                with pytest.raises((ConnectionError, ssl.SSLError)):
                    _, client = await asyncio.wait_for(connecting, WAIT)
                    await client.call("get")
                await until(lambda: not engine.handshaking)
                assert not engine.downstreams
                assert v1.received == []
            else:
                _, client = await asyncio.wait_for(connecting, WAIT)
                reply = await client.call("get")
                want = "v2" if change == "routes" else "v1"
                assert reply.attributes.get("server") == want, reply
                client.close()
            listener = "svc.test:9000"
            failed = engine.stats.total("metaprotocol_tls_handshake_errors_total")
            assert failed == 0, engine.stats_snapshot()  # the engine's doing, not the client's
            assert engine.stats.get("metaprotocol_tls_handshakes_total", listener=listener) == (
                change in ("routes", "plain")
            )
        await v1.close()
        await v2.close()
        assert errors == []

    run(main(), loop=loop)


def test_certificate_expiry_shows_the_files_in_force_only(pki: Pki) -> None:
    """``metaprotocol_tls_certificate_expiry_seconds`` is one series per certificate in use:
    a reload that moves a listener's certificate to another path, or makes a cluster plain,
    drops the old series (an alert on it would fire for a file no longer used), and a
    reload refused shows nothing of what it read."""
    old, new = pki.leaf("old", "svc.test"), pki.leaf("new", "svc.test")
    name = "metaprotocol_tls_certificate_expiry_seconds"

    def text(cert: tuple[str, str], upstream_tls: bool) -> str:
        tls = json.dumps({"mode": "SIMPLE", "serverCertificate": cert[0], "privateKey": cert[1]})
        policy = tls_policy(mode="SIMPLE", caCertificates=pki.ca_file) if upstream_tls else "{}"
        return mesh([(1, "v1")], traffic_policy=policy, listener_tls=tls)

    def shown(engine: Any) -> set[str]:
        return {dict(c.labels)["certificate"] for c in engine.stats.counters(name)}

    async def main() -> None:
        async with engine_for(text(old, True)) as engine:
            assert shown(engine) == {old[0], pki.ca_file}
            with socket.socket() as taken:  # a reload that cannot bind: refused whole
                taken.bind(("127.0.0.1", 0))
                taken.listen()
                port = taken.getsockname()[1]
                refused = text(new, True).replace(
                    "bind: '127.0.0.1:0',", f"bind: '127.0.0.1:{port}',"
                )
                with pytest.raises(ConfigError, match="cannot bind"):
                    await engine.apply(loads_config(refused, "t"))
            assert shown(engine) == {old[0], pki.ca_file}
            await engine.apply(loads_config(text(new, False), "t"))
            assert shown(engine) == {new[0]}

    run(main())


# -- zero cost and configuration ---------------------------------------------------------------


def test_without_tls_connections_are_the_plain_classes() -> None:
    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(mesh([(up.port, "v1")])) as engine:
            client = await Client.connect(address(engine))
            assert error_type(await client.call("get")) is None
            assert type(next(iter(engine.downstreams))) is Downstream
            assert type(next(iter(engine.upstreams))) is UpstreamConnection
            assert engine.clusters["outbound|9000||svc.test"].tls is None
            assert engine.listeners[("svc.test", 9000)].accept_limit is None
            assert not [k for k in engine.stats_snapshot() if "rate_limited" in k]
            client.close()
        await up.close()

    run(main())


def load(text: str) -> Exception:
    with pytest.raises(ConfigError) as caught:
        loads_config(text, "test.yaml")
    return caught.value


@pytest.mark.parametrize(
    "make,field,reason",
    [
        (
            lambda p: tls_policy(mode="SIMPLE", caCertificates=str(p.root / "missing.pem")),
            "spec.trafficPolicy.tls.caCertificates",
            "no such file",
        ),
        (
            lambda p: tls_policy(mode="SIMPLE", caCertificates=p.write("junk.pem", b"junk")),
            "spec.trafficPolicy.tls.caCertificates",
            "holds no PEM certificate",
        ),
        (
            lambda p: tls_policy(mode="MUTUAL", caCertificates=p.ca_file),
            "spec.trafficPolicy.tls.clientCertificate",
            "required with mode MUTUAL",
        ),
        (
            lambda p: tls_policy(
                mode="MUTUAL",
                clientCertificate=p.leaf("a", "a.test")[0],
                privateKey=p.leaf("b", "b.test")[1],
            ),
            "spec.trafficPolicy.tls.privateKey",
            "is not the key of",
        ),
        (
            lambda p: tls_policy(mode="SIMPLE", sni="a" * 64 + ".test"),
            "spec.trafficPolicy.tls.sni",
            "cannot be sent as a server name",
        ),
        (
            lambda p: tls_policy(mode="SIMPLE", caCrl=p.ca_file),
            "spec.trafficPolicy.tls.caCrl",
            "holds no PEM CRL",
        ),
        (
            lambda p: tls_policy(mode="ISTIO_MUTUAL"),
            "spec.trafficPolicy.tls.mode",
            "set spec.meshIdentity",
        ),
        (
            lambda p: tls_policy(mode="SIMPLE", credentialName="secret"),
            "spec.trafficPolicy.tls.credentialName",
            "reads no secrets",
        ),
    ],
)
def test_bad_upstream_tls_is_a_config_error_naming_the_field(
    pki: Pki, make: Callable[[Pki], str], field: str, reason: str
) -> None:
    exc = load(mesh([(1, "v1")], traffic_policy=make(pki)))
    assert getattr(exc, "field", None) == field and reason in str(exc), exc


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_tls_file_that_is_not_a_regular_file_is_refused_without_waiting(
    pki: Pki, tmp_path: Path, kind: str
) -> None:
    """A FIFO nobody writes to would block the load (a reload) for good, a device such as
    /dev/zero never ends: both are refused at once, naming the field."""
    if kind == "fifo":
        path = tmp_path / "pipe.pem"
        os.mkfifo(path)
    else:
        path = Path("/dev/zero")
    result: list[BaseException | None] = []
    text = mesh([(1, "v1")], traffic_policy=tls_policy(mode="SIMPLE", caCertificates=str(path)))
    worker = threading.Thread(target=lambda: result.append(load(text)), daemon=True)
    worker.start()
    worker.join(WAIT)
    assert result, "the load is still waiting on the file"
    exc = result[0]
    assert getattr(exc, "field", None) == "spec.trafficPolicy.tls.caCertificates", exc
    assert "not a regular file" in str(exc), exc


@pytest.mark.parametrize(
    "patch,field,reason",
    [
        ({"serverCertificate": "/nonexistent/cert.pem"}, "serverCertificate", "no such file"),
        ({"mode": "MUTUAL"}, "caCertificates", "required with mode MUTUAL"),
        ({"minProtocolVersion": "TLSV1_0"}, "minProtocolVersion", "RFC 8996"),
        (
            {"maxProtocolVersion": "TLSV1_2", "minProtocolVersion": "TLSV1_3"},
            "maxProtocolVersion",
            "below",
        ),
        ({"cipherSuites": ["NOT-A-CIPHER"]}, "cipherSuites", "no cipher suite"),
        ({"mode": "PASSTHROUGH"}, "mode", "unterminated"),
        ({"credentialName": "x"}, "credentialName", "reads no secrets"),
        ({"subjectAltNames": ["a.test"]}, "subjectAltNames", "(mode is SIMPLE)"),
        ({"mode": "MUTUAL", "subjectAltNames": [""]}, "subjectAltNames[0]", "non-empty"),
        (
            {"mode": "MUTUAL", "verifyCertificateSpki": ["abc"]},
            "verifyCertificateSpki[0]",
            "base64",
        ),
        (
            {"mode": "MUTUAL", "verifyCertificateHash": ["AB:CD"]},
            "verifyCertificateHash[0]",
            "64 hex digits",
        ),
        (
            {"mode": "MUTUAL", "caCertificates": "<ca>", "caCrl": "/nonexistent.crl"},
            "caCrl",
            "no such file",
        ),
        (
            {"mode": "MUTUAL", "caCertificates": "<ca>", "caCrl": "<ca>"},
            "caCrl",
            "holds no PEM CRL",
        ),
    ],
)
def test_bad_listener_tls_is_a_config_error_naming_the_field(
    pki: Pki, patch: dict[str, Any], field: str, reason: str
) -> None:
    tls = json.loads(listener_tls(pki))
    tls.update({k: pki.ca_file if v == "<ca>" else v for k, v in patch.items()})
    exc = load(mesh([(1, "v1")], listener_tls=json.dumps(tls)))
    assert getattr(exc, "field", None) == f"spec.listeners[0].tls.{field}", exc
    assert reason in str(exc), exc


def test_encrypted_key_is_refused_without_a_prompt(pki: Pki) -> None:
    from cryptography.hazmat.primitives import serialization

    cert, key = pki.leaf("enc", "svc.test")
    loaded = serialization.load_pem_private_key(Path(key).read_bytes(), None)
    Path(key).write_bytes(
        loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    tls = json.dumps({"mode": "SIMPLE", "serverCertificate": cert, "privateKey": key})
    exc = load(mesh([(1, "v1")], listener_tls=tls))
    assert "encrypted private key" in str(exc)


def test_check_loads_a_tls_configuration(pki: Pki, tmp_path: Path) -> None:
    """``metaprotocol proxy --check`` reads and validates the files."""
    import subprocess
    import sys

    policy = tls_policy(mode="SIMPLE", caCertificates=pki.ca_file)
    good = tmp_path / "good.yaml"
    good.write_text(mesh([(1, "v1")], traffic_policy=policy, listener_tls=listener_tls(pki)))
    ok = subprocess.run(
        [sys.executable, "-m", "metaprotocol_sdk", "proxy", "--check", "-c", str(good)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    Path(pki.ca_file).unlink()
    bad = subprocess.run(
        [sys.executable, "-m", "metaprotocol_sdk", "proxy", "--check", "-c", str(good)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "spec.trafficPolicy.tls.caCertificates: no such file" in bad.stderr


@pytest.mark.parametrize("loop", LOOPS)
def test_a_tls_client_that_does_not_read_is_bounded_by_the_connection_buffer_limits(
    pki: Pki, loop: str
) -> None:
    """The TLS layer's unsent bytes count as the connection's: past
    ``connectionBufferMaxBytes`` the client is reset, as a plain one is."""

    async def main() -> None:
        up = await Upstream("v1").start()
        text = mesh(
            [(up.port, "v1")],
            listener_tls=listener_tls(pki),
            proxy="limits: {connectionBufferBytes: 65536, connectionBufferMaxBytes: 262144}",
        )
        async with engine_for(text) as engine:
            client = await Client.connect(
                address(engine), ssl=pki.client_context(), server_hostname="svc.test"
            )
            assert client.transport is not None
            client.transport.pause_reading()
            replies = [client.start("big", {"size": str(256 * 1024)}) for _ in range(64)]
            await until(lambda: not engine.downstreams)  # 16 MiB asked for: reset
            closed = engine.stats.total(
                "metaprotocol_downstream_connections_closed_total", reason="write_overflow"
            )
            assert closed == 1
            client.transport.abort()
            await asyncio.gather(*replies, return_exceptions=True)
        await up.close()

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_large_reply_to_a_tls_client_that_does_not_read_counts_and_times_out(
    pki: Pki, loop: str
) -> None:
    """The TLS layer hands what it encrypts to the TCP transport under it at once, however
    much: one large reply to a client that reads nothing sits there, not in the TLS layer's
    own count. It must count as the connection's unsent bytes all the same (the buffer
    budget, ``connectionBufferMaxBytes``) and be bounded by ``timeouts.write``; it was
    counted as nothing and held until ``timeouts.idle`` (an hour)."""
    size = 8 << 20  # more than the kernel's buffers take from the engine and to the client

    async def main() -> None:
        up = await Upstream("v1").start()
        text = mesh(
            [(up.port, "v1")],
            listener_tls=listener_tls(pki),
            proxy="codecOptions: {kv: {max_frame_size: 16777216}}\n"
            "limits: {connectionBufferBytes: 65536}\ntimeouts: {write: 300ms}",
        )
        async with engine_for(text) as engine:
            client = await small_window_tls_client(engine, pki)
            assert client.transport is not None
            client.transport.pause_reading()
            reply = client.start("big", {"size": str(size)})
            await until(lambda: engine.buffered > size // 4)  # counted while it is held
            await until(lambda: not engine.downstreams)  # then reset by timeouts.write
            closed = engine.stats.get(
                "metaprotocol_downstream_connections_closed_total",
                listener="svc.test:9000",
                reason="write_timeout",
            )
            assert closed == 1
            assert engine.buffered < size // 4
            client.transport.abort()
            await asyncio.gather(reply, return_exceptions=True)
        await up.close()

    run(main(), loop=loop)


@given(st.binary(max_size=300))
def test_public_key_info_refuses_any_bytes_with_a_value_error(data: bytes) -> None:
    """Whatever the bytes (OpenSSL has verified the certificate first, but the reader does
    not rely on it), the answer is a slice of them or ``ValueError``."""
    from metaprotocol_sdk.proxy.tls import public_key_info

    try:
        found = public_key_info(data)
    except ValueError:
        return
    assert found in data and found[:1] == b"\x30"


class _StalledTlsServer(asyncio.Protocol):
    """A TLS upstream that shakes hands and then reads nothing."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast_transport: Any = transport
        cast_transport.pause_reading()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_large_request_to_a_tls_upstream_that_does_not_read_counts_and_times_out(
    pki: Pki, loop: str
) -> None:
    """The TLS layer hands what it encrypts to the TCP transport under it at once: one large
    request to an upstream that reads nothing sat there uncounted, its connection never
    paused for the clients sending to it, and ``timeouts.upstreamWrite`` never saw it. It
    counts as the connection's unsent bytes, pauses it, and the upstream is aborted by
    ``upstreamWrite`` with the request answered ``UpstreamReset``."""
    size = 8 << 20  # more than the kernel's buffers take from the engine

    async def main() -> None:
        server_ctx = pki.server_context(pki.leaf("up", "svc.test"))
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by accepts
        sock.bind(("127.0.0.1", 0))
        server = await asyncio.get_running_loop().create_server(
            _StalledTlsServer, sock=sock, ssl=server_ctx
        )
        text = mesh(
            [(sock.getsockname()[1], "v1")],
            traffic_policy=tls_policy(mode="SIMPLE", caCertificates=pki.ca_file),
            proxy="codecOptions: {kv: {max_frame_size: 16777216}}\n"
            "timeouts: {upstreamWrite: 300ms}",
        )
        async with engine_for(text) as engine:
            client = await Client.connect(address(engine))
            reply = client.start("put", body=b"b" * size)
            await until(lambda: len(engine.upstreams) == 1)
            conn = next(iter(engine.upstreams))
            await until(lambda: conn.write_paused)  # the clients sending to it wait
            assert conn.unsent > size // 4 and engine.buffered > size // 4
            answer = await asyncio.wait_for(reply, WAIT)
            assert error_type(answer) == "UpstreamReset"
            closed = engine.stats.total(
                "metaprotocol_upstream_connections_closed_total", reason="write_timeout"
            )
            assert closed == 1
            await until(lambda: engine.buffered < size // 4)
            client.close()
        server.close()

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_tls_upstream_paused_on_a_large_request_resumes_as_soon_as_it_reads(
    pki: Pki, loop: str
) -> None:
    """Once paused on what the TCP transport under the TLS layer holds, the connection
    resumes when that transport drains (the TLS layer tells it), not at the engine's next
    sweep: here there is none, and the client that sent the large request, blocked while
    the upstream read nothing, is read again and answered as soon as the upstream reads."""
    size = 7 << 20  # under the test upstream's frame limit

    async def main() -> None:
        up = Upstream("v1")
        up.reading_paused = True
        await up.start(ssl=pki.server_context(pki.leaf("up", "svc.test")), rcvbuf=4096)
        text = mesh(
            [(up.port, "v1")],
            traffic_policy=tls_policy(mode="SIMPLE", caCertificates=pki.ca_file),
            proxy="codecOptions: {kv: {max_frame_size: 16777216}}\n"
            "timeouts: {upstreamWrite: 1m, write: 1m, idle: 1m, frame: 1m}",
        )
        async with engine_for(text) as engine:
            engine._sweeper.cancel()  # no sweep: only the TLS layer's word can resume it
            client = await Client.connect(address(engine))
            big = client.start("put", body=b"b" * size)
            await until(lambda: len(engine.upstreams) == 1)
            conn = next(iter(engine.upstreams))
            await until(lambda: conn.write_paused)
            up.resume_reading()
            assert error_type(await asyncio.wait_for(big, WAIT)) is None
            await until(lambda: not conn.write_paused)
            reply = await asyncio.wait_for(client.call("get"), WAIT)
            assert error_type(reply) is None and reply.attributes.get("server") == "v1"
            assert conn.unsent == 0 and engine.buffered == 0
            client.close()
        await up.close()

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_tls_client_paused_on_a_large_reply_resumes_as_soon_as_it_reads(
    pki: Pki, loop: str
) -> None:
    """The client side of the same: a large reply the TLS layer handed to the TCP transport
    at once pauses the connection (its next request waits) and the connection resumes as
    soon as the client reads it, each told by the TLS layer, with no sweep to recount."""
    size = 7 << 20  # under the test client's frame limit

    async def main() -> None:
        up = await Upstream("v1").start()
        text = mesh(
            [(up.port, "v1")],
            listener_tls=listener_tls(pki),
            proxy="codecOptions: {kv: {max_frame_size: 16777216}}\n"
            "limits: {connectionBufferBytes: 65536}\n"
            "timeouts: {write: 1m, idle: 1m, frame: 1m}",
        )
        async with engine_for(text) as engine:
            engine._sweeper.cancel()  # no sweep: only the TLS layer's word counts
            client = await small_window_tls_client(engine, pki)
            assert client.transport is not None
            client.transport.pause_reading()
            reply = client.start("big", {"size": str(size)})
            await until(lambda: len(engine.downstreams) == 1)
            downstream = next(iter(engine.downstreams))
            await until(lambda: downstream.write_paused)
            assert engine.buffered > size // 4
            client.transport.resume_reading()
            assert error_type(await asyncio.wait_for(reply, WAIT)) is None
            await until(lambda: not downstream.write_paused)
            assert error_type(await asyncio.wait_for(client.call("get"), WAIT)) is None
            client.close()
        await up.close()

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_tls_upstream_that_drained_under_its_low_water_mark_after_a_resume_is_not_left_paused(
    pki: Pki, loop: str
) -> None:
    """A request that reaches the TLS layer while the TCP transport under it is full waits
    in the TLS layer, and the layer hands it on when that transport drained under its
    low-water mark. When the kernel takes little (a small send buffer), that leaves the
    transport between its two water marks: it does not pause again, so it never says when
    it drained. The connection, judged at that moment on more than the low-water mark,
    stayed paused for good (no sweep judges it again), and the client blocked on it was
    never read again: its next request hung though the upstream had taken everything."""
    size = 1 << 20

    async def main() -> None:
        up = await Upstream("v1").start(
            ssl=pki.server_context(pki.leaf("up", "svc.test")), rcvbuf=4096
        )
        text = mesh(
            [(up.port, "v1")],
            traffic_policy=tls_policy(mode="SIMPLE", caCertificates=pki.ca_file),
            proxy="codecOptions: {kv: {max_frame_size: 16777216}}\n"
            "timeouts: {upstreamWrite: 1m, write: 1m, idle: 1m, frame: 1m}",
        )
        async with engine_for(text) as engine:
            client = await Client.connect(address(engine))
            assert error_type(await client.call("get")) is None
            conn = next(iter(engine.upstreams))
            assert isinstance(conn, TlsUpstreamConnection)
            assert conn.raw is not None and conn.transport is not None
            tls_layer = conn.transport
            # A kernel that takes little from the engine (memory pressure, a small
            # tcp_wmem): each time the socket is writable it takes a few KiB.
            conn.raw.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            for server in up.connections:
                assert server.transport is not None
                server.transport.pause_reading()
            big = client.start("put", body=b"b" * size)
            await until(lambda: conn.write_paused)
            # A request read meanwhile waits in the TLS layer (the transport under it is
            # full); its client stops being read.
            second = client.start("put", body=b"s" * 40_000)
            await until(lambda: tls_layer.get_write_buffer_size() > 40_000)
            up.resume_reading()
            assert error_type(await asyncio.wait_for(big, WAIT)) is None
            assert error_type(await asyncio.wait_for(second, WAIT)) is None
            await until(lambda: conn.unsent == 0)  # the upstream took everything
            reply = await asyncio.wait_for(client.call("get"), WAIT)
            assert error_type(reply) is None and reply.attributes.get("server") == "v1"
            assert not conn.write_paused
            client.close()
        await up.close()

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_tls_connection_closed_for_its_client_is_not_counted_as_retired_for_its_age(
    pki: Pki, loop: str
) -> None:
    """A client's own upstream connection (a codec without id rewriting) is closed when the
    client leaves; a TLS connection then waits for the upstream's ``close_notify`` and stays
    among the engine's connections meanwhile. The sweep's ``maxConnectionDuration`` check
    took it for a live connection and counted it as retired for its age
    (``reason="max_connection_duration"``), though the engine had closed it for another
    reason, uncounted (the idle check skips closed connections)."""

    async def main() -> None:
        up = await Upstream("v1").start(ssl=pki.server_context(pki.leaf("up", "svc.test")))
        policy = (
            "{tls: "
            + json.dumps({"mode": "SIMPLE", "caCertificates": pki.ca_file})
            + ", connectionPool: {tcp: {maxConnectionDuration: 300ms}}}"
        )
        text = mesh(
            [(up.port, "v1")],
            traffic_policy=policy,
            protocol="kvnr",
            codec="proxy_test_codecs:NoRewriteKVCodec",
        )
        async with engine_for(text) as engine:
            client = await Client.connect(address(engine))
            assert error_type(await client.call("get")) is None
            (conn,) = engine.upstreams
            for server in up.connections:  # it never reads the engine's close_notify
                assert server.transport is not None
                server.transport.pause_reading()
            client.close()
            await until(lambda: conn.closed)
            await asyncio.sleep(0.6)  # past maxConnectionDuration: sweeps ran
            assert conn in engine.upstreams  # still shutting TLS down
            closed = engine.stats.total(
                "metaprotocol_upstream_connections_closed_total",
                reason="max_connection_duration",
            )
            assert closed == 0
        await up.close()

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_tls_client_that_drained_between_the_water_marks_after_a_resume_is_read_again(
    pki: Pki, loop: str
) -> None:
    """The client side of the TLS upstream case above: a reply that reaches the TLS layer
    while the TCP transport under it is full is handed on when that transport drains; left
    between its water marks (a kernel that takes little), the transport never reports its
    drain, and the connection, judged then on more than a quarter of
    ``connectionBufferBytes``, stayed paused (its requests unread, its unsent bytes counted)
    until the next sweep, though the TLS layer is to tell it at once. Here there is no
    sweep: the next request hung."""

    async def main() -> None:
        up = await Upstream("v1").start()
        text = mesh(
            [(up.port, "v1")],
            listener_tls=listener_tls(pki),
            proxy="codecOptions: {kv: {max_frame_size: 16777216}}\n"
            "limits: {connectionBufferBytes: 65536}\n"
            "timeouts: {write: 1m, idle: 1m, frame: 1m}",
        )
        async with engine_for(text) as engine:
            assert engine._sweeper is not None
            engine._sweeper.cancel()  # no sweep: only the TLS layer's word counts
            client = await small_window_tls_client(engine, pki)
            assert client.transport is not None
            assert error_type(await client.call("get")) is None
            (down,) = engine.downstreams
            assert isinstance(down, TlsDownstream) and down.raw is not None
            tls_layer = down.transport
            assert tls_layer is not None
            down.raw.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            client.transport.pause_reading()
            big = client.start("big", {"size": str(1 << 20)})
            slow = client.start("slow", body=b"s" * 40_000)
            await until(lambda: down.write_paused)
            await up.wait_received(3)
            up.release.set()  # the slow reply waits in the TLS layer
            await until(lambda: tls_layer.get_write_buffer_size() > 40_000)
            client.transport.resume_reading()
            assert error_type(await asyncio.wait_for(big, WAIT)) is None
            assert error_type(await asyncio.wait_for(slow, WAIT)) is None
            assert error_type(await asyncio.wait_for(client.call("get"), WAIT)) is None
            assert not down.write_paused
            assert down.unsent == 0 and engine.buffered == 0
            client.close()
        await up.close()

    run(main(), loop=loop)


# -- the ends of a TLS connection --------------------------------------------------------------


class BioTlsClient(asyncio.Protocol):
    """A TLS client driven by hand over memory BIOs, as a client of an SSL library is: it
    can send its ``close_notify`` (a TLS half-close) and read on, which Python's TLS
    transports cannot. What it reads is decoded as KV replies; ``peer_closed`` is set by the
    engine's own ``close_notify``."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="svc.test")
        loop = asyncio.get_running_loop()
        self.shaken: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[Exception | None] = loop.create_future()
        self.replies: list[Any] = []
        self.peer_closed = False
        self.plain = bytearray()
        self.codec = KVCodec()
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._step()

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        self._step()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)

    def _step(self) -> None:
        if not self.shaken.done():
            with contextlib.suppress(ssl.SSLWantReadError):
                self.tls.do_handshake()
                self.shaken.set_result(None)
        else:
            while not self.peer_closed:
                try:
                    data = self.tls.read(1 << 16)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    data = b""
                if not data:
                    self.peer_closed = True
                self.plain += data
            while isinstance(msg := self.codec.decode(self.plain), Metadata):
                self.replies.append(msg)
        self._flush()

    def _flush(self) -> None:
        out = self.outgoing.read()
        if out:
            self.transport.write(out)

    def send(self, frame: bytes) -> None:
        self.tls.write(frame)
        self._flush()

    def close_notify(self) -> None:
        """Send ``close_notify`` and go on reading (the first half of ``unwrap``)."""
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.unwrap()
        self._flush()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(
    ("version", "then_fin"),
    [
        pytest.param(ssl.TLSVersion.TLSv1_3, False, id="tls1.3"),
        pytest.param(ssl.TLSVersion.TLSv1_3, True, id="tls1.3-then-fin"),
        pytest.param(ssl.TLSVersion.TLSv1_2, True, id="tls1.2-then-fin"),
    ],
)
def test_a_tls_client_that_sends_close_notify_still_gets_its_replies(
    pki: Pki, loop: str, version: ssl.TLSVersion, then_fin: bool
) -> None:
    """A client's ``close_notify`` is the TLS form of a half-close: it sent all it will and
    waits for its replies. The loop's TLS layer ended the connection's writing at once (on
    both loops, TLS 1.2 and 1.3): the three replies in flight were dropped. Now they are
    sent, then the engine's own ``close_notify``, then the connection closes, as a plain
    client's half-close is answered; a TCP FIN after the ``close_notify`` changes nothing."""

    async def main() -> None:
        errors = record_loop_errors()
        up = await Upstream("v1").start()
        async with engine_for(mesh([(up.port, "v1")], listener_tls=listener_tls(pki))) as engine:
            ctx = pki.client_context()
            ctx.maximum_version = version
            _, client = await asyncio.get_running_loop().create_connection(
                lambda: BioTlsClient(ctx), *address(engine)
            )
            await asyncio.wait_for(client.shaken, WAIT)
            assert client.tls.version() == {ssl.TLSVersion.TLSv1_3: "TLSv1.3"}.get(
                version, "TLSv1.2"
            )
            for rid in (1, 2, 3):
                client.send(build_frame(REQUEST, rid, {"method": "slow"}))
            await up.wait_received(3)
            (down,) = engine.downstreams
            client.close_notify()
            if then_fin:
                client.transport.write_eof()
            await until(lambda: down.draining)  # the engine took the close_notify
            assert down.inflight == 3 and not down.closed
            up.release.set()
            assert await asyncio.wait_for(client.lost, WAIT) is None
            assert [r.request_id for r in client.replies] == [1, 2, 3]
            assert all(error_type(r) is None for r in client.replies)
            assert client.peer_closed  # the engine's close_notify came after them
            await until(lambda: not engine.downstreams)
            abandoned = engine.stats.total(
                "metaprotocol_downstream_connections_closed_total", reason="write_abandoned"
            )
            assert abandoned == 0
        await up.close()
        assert errors == []

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_that_sends_close_notify_and_reads_nothing_is_cut_by_the_write_timeout(
    pki: Pki, loop: str
) -> None:
    """The engine closed the connection once its replies were written, and the TLS layer,
    closing (the client's close_notify in), told the connection of its end, which closed
    the transport again. asyncio's TLS transport, closed twice, lets go of its layer: the
    engine's next sweep raised (AttributeError) and never ran again, and with it every
    timeout of the engine; this client stayed connected for good."""

    async def main() -> None:
        errors = record_loop_errors()
        up = await Upstream("v1").start()
        text = mesh(
            [(up.port, "v1")], listener_tls=listener_tls(pki), proxy="timeouts: {write: 1s}\n"
        )
        async with engine_for(text) as engine:
            # A small receive buffer (no autotuning): the kernel holds little of the replies,
            # and 8 MB is more than the engine's side can hold too (loopback's send buffer
            # grows to 4 MB), less than connectionBufferMaxBytes (a reset of its own).
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, address(engine))
            _, client = await asyncio.get_running_loop().create_connection(
                lambda: BioTlsClient(pki.client_context()), sock=sock
            )
            await asyncio.wait_for(client.shaken, WAIT)
            client.transport.pause_reading()
            for rid in range(1, 9):  # more than the sockets hold
                client.send(build_frame(REQUEST, rid, {"method": "big", "size": "1000000"}))
            client.close_notify()
            await until(lambda: not engine.downstreams)
            assert errors == []
            closed = engine.stats.total("metaprotocol_downstream_connections_closed_total")
            assert closed == 1
        await up.close()

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_an_idle_tls_upstream_that_does_not_answer_close_notify_keeps_the_sweep_alive(
    pki: Pki, loop: str
) -> None:
    """``tcp.idleTimeout`` retired the connection (which closed it) and closed it again:
    asyncio's TLS transport, closed twice, let go of its layer, and while the upstream had
    not answered the engine's close_notify the next sweep raised on it (AttributeError) and
    never ran again: no timeout of the engine was enforced after."""

    async def main() -> None:
        errors = record_loop_errors()
        up = await Upstream("v1").start(ssl=pki.server_context(pki.leaf("up", "svc.test")))
        policy = tls_policy(mode="SIMPLE", caCertificates=pki.ca_file)
        policy = policy[:-1] + ", connectionPool: {tcp: {idleTimeout: 100ms}}}"
        async with engine_for(mesh([(up.port, "v1")], traffic_policy=policy)) as engine:
            client = await Client.connect(address(engine))
            assert error_type(await client.call("get")) is None
            (server,) = up.connections
            assert server.transport is not None
            server.transport.pause_reading()  # the engine's close_notify is not read
            (conn,) = engine.upstreams
            await until(lambda: conn.closed)  # idle
            handles = [engine._sweeper]

            def swept() -> bool:  # three sweeps more
                if engine._sweeper is not handles[-1]:
                    handles.append(engine._sweeper)
                return len(handles) > 3

            await until(swept)
            assert errors == []
            client.close()
        await up.close()

    run(main(), loop=loop)


class EndingUpstream(asyncio.Protocol):
    """An upstream that reads nothing after the first request, and ends its stream when
    told (:meth:`end`): with ``tls``, a TLS server driven by hand that sends its
    ``close_notify`` (and no FIN); without, a plain one that sends a FIN."""

    def __init__(self, tls: ssl.SSLContext | None, made: list[EndingUpstream]) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = None if tls is None else tls.wrap_bio(self.incoming, self.outgoing, True)
        self.plain = bytearray()
        self.transport: Any = None
        self.got_one = asyncio.Event()
        made.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.tls is None:
            self.plain += data
        else:
            self.incoming.write(data)
            with contextlib.suppress(ssl.SSLWantReadError):
                self.tls.do_handshake()
                while chunk := self.tls.read(1 << 16):
                    self.plain += chunk
            self.transport.write(self.outgoing.read())
        if isinstance(KVCodec().decode(bytearray(self.plain)), Metadata):
            self.transport.pause_reading()
            self.got_one.set()

    def end(self) -> None:
        if self.tls is None:
            self.transport.write_eof()
        else:
            with contextlib.suppress(ssl.SSLWantReadError):
                self.tls.unwrap()
            self.transport.write(self.outgoing.read())


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("tls", [True, False], ids=["close_notify", "fin"])
def test_requests_to_an_upstream_that_ends_its_stream_get_a_prompt_reset(
    pki: Pki, loop: str, tls: bool
) -> None:
    """An upstream that sends its ``close_notify`` (or a FIN) answers nothing more. The
    engine closed the connection cleanly, which writes what is unsent first: with a large
    request left unsent to an upstream that reads nothing, the requests in flight waited
    (uvloop) until their route timeout (30 s), and the TLS layer dropped what was sent on
    the connection meanwhile. They get ``UpstreamReset`` at once."""

    async def main() -> None:
        errors = record_loop_errors()
        server_ctx = pki.server_context(pki.leaf("up", "svc.test")) if tls else None
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by accepts
        sock.bind(("127.0.0.1", 0))
        made: list[EndingUpstream] = []
        server = await asyncio.get_running_loop().create_server(
            lambda: EndingUpstream(server_ctx, made), sock=sock
        )
        policy = tls_policy(mode="SIMPLE", caCertificates=pki.ca_file) if tls else "{}"
        text = mesh(
            [(sock.getsockname()[1], "v1")],
            traffic_policy=policy,
            proxy="codecOptions: {kv: {max_frame_size: 16777216}}",
        )
        async with engine_for(text) as engine:
            client = await Client.connect(address(engine))
            first = client.start("hang")
            await until(lambda: bool(made))
            await asyncio.wait_for(made[0].got_one.wait(), WAIT)
            big = client.start("put", body=b"b" * (6 << 20))
            (conn,) = engine.upstreams
            await until(lambda: len(conn.pending) == 2 and conn.unsent > 0)
            made[0].end()
            for reply in (first, big):
                answer = await asyncio.wait_for(reply, WAIT)
                assert error_type(answer) == "UpstreamReset"
            resets = engine.stats.total("metaprotocol_upstream_resets_total")
            assert resets == 1
            await until(lambda: not engine.upstreams and engine.buffered == 0)
            client.close()
        server.close()
        assert errors == []

    run(main(), loop=loop)


class HeldHandshake(asyncio.Protocol):
    """A TLS KV upstream driven by hand that holds its answer to the ClientHello until
    :meth:`release`, then shakes hands and answers each request."""

    def __init__(self, ctx: ssl.SSLContext, made: list[HeldHandshake]) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.accepted_at = asyncio.get_running_loop().time()
        self.held = b""
        self.releasing = False
        self.shaken = False
        self.plain = bytearray()
        self.codec = KVCodec()
        self.received = 0
        self.transport: Any = None
        made.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        if not self.shaken:
            with contextlib.suppress(ssl.SSLWantReadError):
                self.tls.do_handshake()
                self.shaken = True
        if self.shaken:
            with contextlib.suppress(ssl.SSLWantReadError):
                while chunk := self.tls.read(1 << 16):
                    self.plain += chunk
            while isinstance(msg := self.codec.decode(self.plain), Metadata):
                self.received += 1
                self.tls.write(build_frame(RESPONSE, msg.request_id, {"server": "held"}))
        self._flush()

    def _flush(self) -> None:
        out = self.outgoing.read()
        if self.releasing:
            self.transport.write(out)
        else:
            self.held += out

    def release(self) -> None:
        self.releasing = True
        self.transport.write(self.held)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_tls_handshake_done_as_the_connect_timeout_fires_is_one_outcome(
    pki: Pki, loop: str
) -> None:
    """The server's last handshake flight and the connect timeout reach the engine in the
    same turn of the event loop (the loop is held past the timeout while the flight waits in
    the socket): asyncio runs the read first (the handshake completes, the request is sent),
    uvloop the timer first (then the read completes the handshake all the same). Either way
    the request went out on a working connection, which the engine then reset and reported
    as a connect failure (``UpstreamConnectFailure``: retryable as if the server had never
    seen it; a connect and a connect error counted for one attempt). The connection is kept
    and the reply delivered: one outcome."""
    timeout = 1.0

    async def main() -> None:
        errors = record_loop_errors()
        loop_ = asyncio.get_running_loop()
        made: list[HeldHandshake] = []
        server_ctx = pki.server_context(pki.leaf("up", "svc.test"))
        server = await loop_.create_server(lambda: HeldHandshake(server_ctx, made), "127.0.0.1", 0)
        text = mesh(
            [(server.sockets[0].getsockname()[1], "v1")],
            traffic_policy=tls_policy(mode="SIMPLE", caCertificates=pki.ca_file),
            proxy=f"timeouts: {{connect: {int(timeout * 1000)}ms}}",
        )
        async with engine_for(text) as engine:
            client = await Client.connect(address(engine))
            reply = client.start("get")
            await until(lambda: bool(made and made[0].held))  # its answer to the ClientHello
            (up,) = made
            deadline = up.accepted_at + timeout
            assert loop_.time() < deadline - 0.2, "the ClientHello came too late to test"
            up.release()  # the flight is in the engine's socket: hold the loop past the timeout
            stall_the_loop(deadline + 0.1 - loop_.time())
            answer = await asyncio.wait_for(reply, WAIT)
            assert error_type(answer) is None and answer.attributes.get("server") == "held"
            cluster = "outbound|9000||svc.test"
            assert engine.stats.get("metaprotocol_upstream_connections_total", cluster=cluster) == 1
            errors_seen = engine.stats.get(
                "metaprotocol_upstream_connect_errors_total", cluster=cluster
            )
            assert not errors_seen
            (conn,) = engine.upstreams
            assert error_type(await client.call("get")) is None  # the same connection
            assert engine.upstreams == {conn} and up.received == 2
            client.close()
        server.close()
        assert errors == []

    run(main(), loop=loop)


def test_a_plain_connect_done_as_its_timeout_fires_is_one_outcome() -> None:
    """The same window without TLS (asyncio, whose ``create_connection`` can be held): the
    TCP connect completes, the loop is held past ``timeouts.connect``, and then the
    connection is made and the request sent in the turn where the timeout cancels the
    connect. It was counted as a connection and as a connect error. Now it is one outcome: a
    connection (which the cancelled connect closes: the request sent on it gets
    ``UpstreamReset``, counted as a reset, not as a connect error)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        up = await Upstream("v1").start()
        real = loop.sock_connect
        tasks: list[asyncio.Task[None]] = []

        def held_connect(sock: socket.socket, addr: Any) -> asyncio.Future[None]:
            done = loop.create_future()

            async def connect() -> None:
                await real(sock, addr)
                stall_the_loop(0.6)  # past the connect timeout
                done.set_result(None)

            tasks.append(loop.create_task(connect()))
            return done

        async with engine_for(
            mesh([(up.port, "v1")], proxy="timeouts: {connect: 500ms}")
        ) as engine:
            loop.sock_connect = held_connect  # type: ignore[method-assign]
            client = await Client.connect(address(engine))
            answer = await client.call("get")
            await until(lambda: not engine.upstreams)
            cluster = "outbound|9000||svc.test"
            outcome = (
                error_type(answer),
                engine.stats.get("metaprotocol_upstream_connections_total", cluster=cluster),
                engine.stats.get("metaprotocol_upstream_connect_errors_total", cluster=cluster),
                engine.stats.get("metaprotocol_upstream_resets_total", cluster=cluster),
            )
            assert outcome == ("UpstreamReset", 1, 0, 1)
            loop.sock_connect = real  # type: ignore[method-assign]
            assert error_type(await client.call("get")) is None
            client.close()
        await up.close()

    run(main(), loop="asyncio")


def test_a_plain_connect_made_as_its_timeout_fires_on_uvloop_leaves_no_dead_connection() -> None:
    """The same window on uvloop (the CLI's loop): the connect completes, then the loop is
    held past ``timeouts.connect`` (a codec's decode, at the next turn of a long read) before
    it resumes the connect. The connection is made (the request written), then the timeout
    cancels the connect, whose uvloop transport closes the socket without telling
    ``connection_lost``: the dead connection stayed in the pool, every request to the
    endpoint (these two, and each later one) waited for the route's timeout, and each write
    to it was a traceback (``unable to perform operation ... the handler is closed``). Now it
    is the one outcome asyncio gives: the requests get ``UpstreamReset`` and the next one a
    fresh connection."""
    stalling = {"protocol": "kvs", "codec": "proxy_kit:StallingKVCodec"}

    async def main() -> None:
        errors = record_loop_errors()
        up = await Upstream("v1").start()
        proxy = "timeouts: {connect: 50ms, route: 5s}"
        async with engine_for(mesh([(up.port, "v1")], proxy=proxy, **stalling)) as engine:
            client = await Client.connect(address(engine))
            first, second = client.expect(1), client.expect(2)
            # One read: the request that opens the connection, pings answered at once, and
            # at the next turn of the read (after the connect began) a request whose decode
            # holds the loop past the connect timeout.
            frames = [build_frame(REQUEST, 1, {"method": "get"})]
            frames += [build_frame(PING, 100 + i) for i in range(DECODE_TURN - 1)]
            stall = {"method": "stall", "stall-ms": "300", "how": "sleep"}
            frames.append(build_frame(REQUEST, 2, stall))
            client.send(b"".join(frames))
            answers = [await asyncio.wait_for(f, WAIT) for f in (first, second)]
            assert [error_type(a) for a in answers] == ["UpstreamReset", "UpstreamReset"]
            await until(lambda: not engine.upstreams)
            cluster = "outbound|9000||svc.test"
            assert (
                engine.stats.get("metaprotocol_upstream_connections_total", cluster=cluster),
                engine.stats.get("metaprotocol_upstream_connect_errors_total", cluster=cluster),
                engine.stats.get("metaprotocol_upstream_connections_active", cluster=cluster),
            ) == (1, 0, 0)
            assert error_type(await client.call("get")) is None  # a fresh connection
            client.close()
        await up.close()
        assert errors == []

    run(main())


def what_a_client_reads(addr: tuple[str, int], ctx: ssl.SSLContext, version: ssl.TLSVersion) -> str:
    """What a blocking Python ``ssl`` client of ``addr`` reads after sending a request: the
    reason of the ``ssl.SSLError`` it gets (in its handshake or at its read), ``reply``,
    ``eof`` or ``reset``."""
    ctx.maximum_version = version
    with socket.create_connection(addr, timeout=WAIT) as sock:
        try:
            with ctx.wrap_socket(sock, server_hostname="svc.test") as tls:
                tls.sendall(build_frame(REQUEST, 1, {"method": "get"}))
                return "reply" if tls.recv(1 << 16) else "eof"
        except ssl.SSLError as exc:
            return str(exc.reason)
        except ConnectionResetError:
            return "reset"


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_refused_in_the_handshake_reads_the_alert_saying_why(pki: Pki, loop: str) -> None:
    """OpenSSL writes the alert of a failed handshake (``certificate required``, ``unknown
    ca``) last, and the loop's TLS layer reset the connection without sending it: the client
    read an unexpected end of stream, not why. It is sent."""
    stranger = Pki(pki.root, "stranger").leaf("stranger", "client.test")

    async def main() -> None:
        up = await Upstream("v1").start()
        text = mesh([(up.port, "v1")], listener_tls=listener_tls(pki, "MUTUAL"))
        async with engine_for(text) as engine:
            addr = address(engine)
            seen = [
                await asyncio.to_thread(what_a_client_reads, addr, ctx, version)
                for ctx, version in (
                    (pki.client_context(), ssl.TLSVersion.TLSv1_3),
                    (pki.client_context(), ssl.TLSVersion.TLSv1_2),
                    (pki.client_context(stranger), ssl.TLSVersion.TLSv1_3),
                )
            ]
            assert seen == [
                "TLSV13_ALERT_CERTIFICATE_REQUIRED",
                "SSLV3_ALERT_HANDSHAKE_FAILURE",
                "TLSV1_ALERT_UNKNOWN_CA",
            ]
            assert tls_counts(engine, "no_client_certificate") == (0, 2)
            assert up.received == []
        await up.close()

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_refused_by_its_names_reads_access_denied_with_tls_1_2(
    pki: Pki, loop: str
) -> None:
    """Names and pins are checked once OpenSSL completed the handshake, which it cannot be
    told to fail. With TLS 1.2 the engine had not yet sent its ``Finished`` (nor turned on
    its encryption): the client's handshake failed with an unexpected end of stream. It now
    reads an ``access_denied`` alert, sent in the clear in place of the ``Finished``. A TLS
    1.3 client finished its side before the engine saw its certificate, and no alert can be
    sent without the keys OpenSSL keeps: it is reset at its first read, as before."""
    other = issue(pki, "other", "spiffe://cluster.local/ns/shop/sa/other")
    greeter = issue(pki, "greeter", GREETER)

    async def main() -> None:
        errors = record_loop_errors()
        up = await Upstream("v1").start()
        tls = listener_tls(pki, "MUTUAL", subjectAltNames=[GREETER])
        async with engine_for(mesh([(up.port, "v1")], listener_tls=tls)) as engine:
            addr = address(engine)
            refused_12 = await asyncio.to_thread(
                what_a_client_reads, addr, pki.client_context(other), ssl.TLSVersion.TLSv1_2
            )
            assert refused_12 == "TLSV1_ALERT_ACCESS_DENIED"
            refused_13 = await asyncio.to_thread(
                what_a_client_reads, addr, pki.client_context(other), ssl.TLSVersion.TLSv1_3
            )
            assert refused_13 in ("eof", "reset", "UNEXPECTED_EOF_WHILE_READING")
            admitted = await asyncio.to_thread(
                what_a_client_reads, addr, pki.client_context(greeter), ssl.TLSVersion.TLSv1_2
            )
            assert admitted == "reply"
            assert tls_counts(engine) == (1, 2)
            assert len(up.received) == 1
            await until(lambda: not engine.downstreams and not engine.handshaking)
        await up.close()
        assert errors == []

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_closed_tls_client_connection_is_freed_without_the_cycle_collector(
    pki: Pki, loop: str
) -> None:
    """A listener's TLS object knows its TLS layer (to send an alert before the layer resets
    the connection), and the layer holds the object: with a strong reference, every TLS
    connection outlived its close until the cycle collector ran (which the CLI runs rarely,
    ``gc.freeze`` and a high threshold), with its OpenSSL state. The reference is weak."""

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(mesh([(up.port, "v1")], listener_tls=listener_tls(pki))) as engine:
            client = await Client.connect(
                address(engine), ssl=pki.client_context(), server_hostname="svc.test"
            )
            assert error_type(await client.call("get")) is None
            (down,) = engine.downstreams
            assert down.transport is not None
            tls_object = weakref.ref(down.transport.get_extra_info("ssl_object"))
            del down
            gc.collect()
            gc.disable()
            try:
                client.close()
                await asyncio.wait_for(client.closed, WAIT)
                await until(lambda: not engine.downstreams)
                await until(lambda: tls_object() is None)
            finally:
                gc.enable()
        await up.close()

    run(main(), loop=loop)
