"""TLS end to end with real Thrift peers: thriftpy2 clients over TLS (its ``TSSLSocket``)
through the engine to thriftpy2 TLS servers (its ``TSSLServerSocket``), in every
combination of plain and TLS, with mutual TLS, and a server the engine must not trust."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trustme

from metaprotocol_sdk.demo.idl import hello, untyped
from metaprotocol_sdk.demo.thrift_server import HelloHandler, HelloServer

TLS_TLS, PLAIN_TLS, TLS_PLAIN, UNTRUSTED = (
    ("tls-tls.thrift.e2e", 9190),
    ("plain-tls.thrift.e2e", 9191),
    ("tls-plain.thrift.e2e", 9192),
    ("untrusted.thrift.e2e", 9193),
)


class TlsHelloServer:
    """A thriftpy2 threaded server for ``Hello`` over TLS on 127.0.0.1 (framed, binary),
    asking for client certificates when ``client_ca`` is given."""

    def __init__(self, version: str, cert: tuple[str, str], client_ca: str | None = None):
        tt, tp = untyped("thriftpy2.transport"), untyped("thriftpy2.protocol")
        from thriftpy2.server import TThreadedServer
        from thriftpy2.thrift import TProcessor
        from thriftpy2.transport.sslsocket import TSSLServerSocket

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(*cert)
        if client_ca is not None:
            ctx.load_verify_locations(client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        self.handler = HelloHandler(version)
        sock = TSSLServerSocket(host="127.0.0.1", port=0, ssl_context=ctx)
        sock.listen()
        self.port: int = sock.sock.getsockname()[1]
        sock.listen = lambda: None  # serve() listens again otherwise (on another port)
        self.server = TThreadedServer(
            TProcessor(hello().Hello, self.handler),
            sock,
            itrans_factory=tt.TFramedTransportFactory(),
            iprot_factory=tp.TBinaryProtocolFactory(),
            daemon=True,
        )
        threading.Thread(target=self.server.serve, daemon=True).start()


class Pki:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = trustme.CA()
        self.ca_file = self.write("ca.pem", self.ca.cert_pem.bytes())

    def write(self, name: str, data: bytes) -> str:
        (self.root / name).write_bytes(data)
        return str(self.root / name)

    def leaf(self, name: str, *identities: str) -> tuple[str, str]:
        cert = self.ca.issue_cert(*identities)
        return (
            self.write(f"{name}.crt", b"".join(p.bytes() for p in cert.cert_chain_pems)),
            self.write(f"{name}.key", cert.private_key_pem.bytes()),
        )


class Peers:
    def __init__(self, harness: ModuleType, start_engine: Any, root: Path) -> None:
        self.pki = pki = Pki(root)
        other = Pki(root / "other")
        self.engine_client = pki.leaf("engine-client", "engine.e2e")
        self.client_cert = pki.leaf("client", "client.e2e")
        self.plain = HelloServer("plain").start()
        self.mutual = TlsHelloServer(
            "mutual", pki.leaf("mutual", TLS_TLS[0]), client_ca=pki.ca_file
        )
        self.simple = TlsHelloServer("simple", pki.leaf("simple", PLAIN_TLS[0]))
        self.untrusted = TlsHelloServer("untrusted", other.leaf("untrusted", UNTRUSTED[0]))
        mutual = {
            "mode": "MUTUAL",
            "caCertificates": pki.ca_file,
            "clientCertificate": self.engine_client[0],
            "privateKey": self.engine_client[1],
        }
        simple = {"mode": "SIMPLE", "caCertificates": pki.ca_file}
        svc = harness.service_yaml
        cert, key = pki.leaf("listener", "127.0.0.1")
        listener = {"mode": "MUTUAL", "serverCertificate": cert, "privateKey": key}
        listener["caCertificates"] = pki.ca_file
        listeners = [
            (TLS_TLS, listener),
            (PLAIN_TLS, None),
            (TLS_PLAIN, {**listener, "mode": "SIMPLE", "caCertificates": None}),
            (UNTRUSTED, None),
        ]
        items = "".join(
            f'\n    - {{host: {h}, port: {p}, bind: "127.0.0.1:0"'
            + (f", tls: {json.dumps({k: v for k, v in tls.items() if v})}" if tls else "")
            + "}"
            for (h, p), tls in listeners
        )
        self.engine = start_engine(
            harness.application_protocol_yaml("thrift")
            + svc("tt", "thrift", *TLS_TLS, {"v1": self.mutual.port}, traffic_policy=tls(mutual))
            + svc("pt", "thrift", *PLAIN_TLS, {"v1": self.simple.port}, traffic_policy=tls(simple))
            + svc("tp", "thrift", *TLS_PLAIN, {"v1": self.plain.port})
            + svc(
                "un", "thrift", *UNTRUSTED, {"v1": self.untrusted.port}, traffic_policy=tls(simple)
            )
            + f"""
apiVersion: proxy.metaprotocol.io/v1alpha1
kind: ProxyConfig
metadata: {{name: e2e}}
spec:
  listeners:{items}
  admin: {{bind: "127.0.0.1:0"}}
  timeouts: {{connect: 2s, route: 5s, drain: 1s, handshake: 2s}}
"""
        )

    def client(self, svc: tuple[str, int], tls: bool, cert: bool = True) -> Any:
        """A thriftpy2 client (framed, binary) to the engine's listener for ``svc``; over
        TLS (its ``TSSLSocket``, checking the engine's certificate for 127.0.0.1)."""
        extra: dict[str, Any] = {}
        if tls:
            extra = {"cafile": self.pki.ca_file}
            if cert:
                extra.update(certfile=self.client_cert[0], keyfile=self.client_cert[1])
        return untyped("thriftpy2.rpc").make_client(
            hello().Hello,
            "127.0.0.1",
            self.engine.port(*svc),
            trans_factory=untyped("thriftpy2.transport").TFramedTransportFactory(),
            timeout=5000,
            **extra,
        )


def tls(fields: dict[str, Any]) -> str:
    return "{tls: " + json.dumps(fields) + "}"


@pytest.fixture(scope="module")
def peers(
    harness: ModuleType, start_engine: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Peers]:
    root = tmp_path_factory.mktemp("pki")
    (root / "other").mkdir()
    yield Peers(harness, start_engine, root)


def test_mutual_tls_on_both_sides(peers: Peers) -> None:
    client = peers.client(TLS_TLS, tls=True)
    try:
        assert client.sayHello("tls") == "mutual: hello tls"
        assert client.sayHello("again") == "mutual: hello again"
    finally:
        client.close()
    assert peers.mutual.handler.requests == 2
    assert peers.engine.stat("metaprotocol_tls_handshakes_total{listener=") >= 1
    assert peers.engine.stat("metaprotocol_tls_handshakes_total{cluster=") >= 1


def test_plain_client_to_a_tls_server(peers: Peers) -> None:
    client = peers.client(PLAIN_TLS, tls=False)
    try:
        assert client.sayHello("plain") == "simple: hello plain"
    finally:
        client.close()


def test_tls_client_to_a_plain_server(peers: Peers) -> None:
    client = peers.client(TLS_PLAIN, tls=True, cert=False)
    try:
        assert client.ping() == "plain: pong"
    finally:
        client.close()


def test_a_client_without_a_certificate_is_refused_by_a_mutual_listener(peers: Peers) -> None:
    before = peers.mutual.handler.requests
    with pytest.raises(
        (ssl.SSLError, ConnectionError, untyped("thriftpy2.transport").TTransportException)
    ):
        client = peers.client(TLS_TLS, tls=True, cert=False)
        try:
            client.sayHello("anonymous")
        finally:
            client.close()
    assert peers.mutual.handler.requests == before
    peers.engine.wait_for(
        lambda: (
            peers.engine.stat(
                'metaprotocol_tls_handshake_errors_total{listener="tls-tls.thrift.e2e:9190",'
                'reason="no_client_certificate"'
            )
            >= 1
        )
    )


def test_an_untrusted_server_gets_the_clients_request_an_application_exception(
    peers: Peers,
) -> None:
    exc_type = untyped("thriftpy2.thrift").TApplicationException
    client = peers.client(UNTRUSTED, tls=False)
    try:
        with pytest.raises(exc_type) as info:
            client.sayHello("secret")
        message = str(info.value.message)
        assert "UpstreamConnectFailure" in message
        assert "certificate verify failed: unable to get local issuer certificate" in message
        with pytest.raises(exc_type):  # the client's connection stays; each call is refused
            client.ping()
    finally:
        client.close()
    assert peers.untrusted.handler.requests == 0
