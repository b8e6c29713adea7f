"""docs/mesh.md ("Running in an Istio mesh") cannot drift: its example configuration, taken
from the page with only its addresses, ports and the identity's directory changed, runs in an
engine with a mesh identity made as istiod's CA makes them (``tests/mesh_pki.py``), and
real thriftpy2 peers see what the page says:

- a plain client and a sidecar-like mutual TLS client share the PERMISSIVE listener;
- the engine reaches the endpoint labelled ``security.istio.io/tlsMode: istio`` (a server
  that requires a client certificate of the mesh, as a STRICT sidecar does) over Istio
  mutual TLS, and the other endpoint in plain text;
- every series and ``/config_dump`` field the page tells the reader to check is there, with
  the values it says, and a rotation of the identity's files is counted.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from mesh_pki import MeshCa, spiffe

from metaprotocol_sdk.demo.idl import hello, untyped
from metaprotocol_sdk.demo.thrift_server import HelloHandler, HelloServer

PAGE = Path(__file__).resolve().parents[2] / "docs" / "mesh.md"
EXAMPLE = re.compile(r'^```yaml title="mesh.yaml"\n(.*?)^```', re.S | re.M)
NS = "meta-thrift"
GATEWAY = f"thrift-gateway.{NS}.svc.cluster.local"
SERVER = f"thrift-sample-server.{NS}.svc.cluster.local"
LISTENER = f"{GATEWAY}:9090"
V1, V2 = (f"outbound|9090|{v}|{SERVER}" for v in ("v1", "v2"))
#: What the page's example says istio-agent writes to, and the addresses it names.
AGENT_DIRECTORY = "/var/lib/istio/data"


def example() -> str:
    blocks = EXAMPLE.findall(PAGE.read_text(encoding="utf-8"))
    assert len(blocks) == 1, 'docs/mesh.md has one ```yaml title="mesh.yaml" block'
    return str(blocks[0])


def for_this_machine(text: str, certs: Path, ports: dict[str, int]) -> str:
    """The page's example with loopback binds, the endpoints of version ``v`` on
    127.0.0.1:``ports[v]``, and the identity read from ``certs``; nothing else changed."""
    docs = [d for d in yaml.safe_load_all(text) if d]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc["spec"])
    (proxy,) = by_kind["ProxyConfig"]
    assert proxy["meshIdentity"]["directory"] == AGENT_DIRECTORY
    proxy["meshIdentity"]["directory"] = str(certs)
    (listener,) = proxy["listeners"]
    assert (listener["host"], listener["port"]) == (GATEWAY, 9090)
    listener["bind"] = "127.0.0.1:0"
    proxy["admin"]["bind"] = "127.0.0.1:0"
    (server,) = [s for s in by_kind["ServiceEntry"] if s["hosts"] == [SERVER]]
    (port_name,) = [p["name"] for p in server["ports"]]
    assert sorted(e["labels"]["version"] for e in server["endpoints"]) == sorted(ports)
    for endpoint in server["endpoints"]:
        endpoint["address"] = "127.0.0.1"
        endpoint["ports"] = {port_name: ports[endpoint["labels"]["version"]]}
    return yaml.safe_dump_all(docs, sort_keys=False)


class SidecarServer:
    """A thriftpy2 server (framed, binary) behind what a STRICT sidecar requires: mutual
    TLS with a certificate of the mesh (``sa`` in the page's namespace), ALPN ``istio``; it
    records the SNI of each handshake."""

    def __init__(self, ca: MeshCa, tmp: Path, version: str, sa: str) -> None:
        tt, tp = untyped("thriftpy2.transport"), untyped("thriftpy2.protocol")
        from thriftpy2.server import TThreadedServer
        from thriftpy2.thrift import TProcessor
        from thriftpy2.transport.sslsocket import TSSLServerSocket

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*ca.files(tmp, sa, ns=NS))
        ctx.load_verify_locations(cadata=ca.pem.decode())
        ctx.verify_mode = ssl.CERT_REQUIRED
        # A sidecar selects istio-peer-exchange, then reads the client's metadata exchange
        # header; thriftpy2 speaks none: istio alone (on which a sidecar's chains match too).
        ctx.set_alpn_protocols(["istio"])
        self.sni: list[str | None] = []
        ctx.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)
        self.handler = HelloHandler(version)
        sock = TSSLServerSocket(host="127.0.0.1", port=0, ssl_context=ctx)
        sock.listen()
        self.port: int = sock.sock.getsockname()[1]
        sock.listen = lambda: None  # serve() would listen again, on another port
        server = TThreadedServer(
            TProcessor(hello().Hello, self.handler),
            sock,
            itrans_factory=tt.TFramedTransportFactory(),
            iprot_factory=tp.TBinaryProtocolFactory(),
            daemon=True,
        )
        threading.Thread(target=server.serve, daemon=True).start()


def client(port: int, ctx: ssl.SSLContext | None = None) -> Any:
    """A thriftpy2 client (framed, binary) to the engine's listener; with ``ctx``, over TLS."""
    return untyped("thriftpy2.rpc").make_client(
        hello().Hello,
        "127.0.0.1",
        port,
        trans_factory=untyped("thriftpy2.transport").TFramedTransportFactory(),
        timeout=5000,
        ssl_context=ctx,
    )


def get(admin: tuple[str, int], path: str) -> str:
    with urllib.request.urlopen(f"http://{admin[0]}:{admin[1]}{path}", timeout=5) as reply:
        return str(reply.read().decode())


SERIES = re.compile(r"^(\w+)\{(.*)\} (\S+)$")


def stats(admin: tuple[str, int]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``/stats`` (Prometheus text) as ``{(name, labels): value}``."""
    out = {}
    for line in get(admin, "/stats").splitlines():
        m = SERIES.match(line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m[2]))
            out[m[1], labels] = float(m[3])
    return out


def value(
    series: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """The one series ``name`` whose labels include ``labels``."""
    (found,) = [v for (n, ls), v in series.items() if n == name and set(labels.items()) <= ls]
    return found


class Mesh:
    def __init__(self, start_engine: Any, root: Path) -> None:
        self.ca = ca = MeshCa()
        self.root = root
        self.certs = root / "istio-data"
        ca.write(self.certs, "thrift-gateway", ns=NS)
        self.sidecar = SidecarServer(ca, root / "peers", "v1", "thrift-sample-server")
        self.plain = HelloServer("v2").start()
        text = for_this_machine(
            example(), self.certs, {"v1": self.sidecar.port, "v2": self.plain.port}
        )
        self.engine = start_engine(text)
        self.port = self.engine.port(GATEWAY, 9090)
        admin = self.engine.engine.admin_address
        assert admin is not None
        self.admin: tuple[str, int] = admin

    def mesh_client_context(self) -> ssl.SSLContext:
        """What a sidecar client presents: a workload certificate, ALPN istio (thriftpy2
        speaks no metadata exchange: a sidecar offering istio-peer-exchange does)."""
        return self.ca.client_context(self.root / "peers", "frontend", ["istio"])


@pytest.fixture(scope="module")
def mesh(start_engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    yield Mesh(start_engine, tmp_path_factory.mktemp("mesh"))


def test_the_page_has_its_example() -> None:
    kinds = [d["kind"] for d in yaml.safe_load_all(example()) if d]
    for kind in (
        "ApplicationProtocol",
        "ServiceEntry",
        "DestinationRule",
        "MetaRouter",
        "PeerAuthentication",
        "ProxyConfig",
    ):
        assert kind in kinds


def test_plain_and_mutual_tls_clients_reach_both_endpoints(mesh: Mesh) -> None:
    """The page's "Try it": a client without a sidecar (plain text) and one with a sidecar
    (Istio mutual TLS) on the one PERMISSIVE port; sayHello goes to v1 (its sidecar requires
    the engine's mesh certificate), ping to v2 (plain text)."""
    for name, ctx in (("plain", None), ("mtls", mesh.mesh_client_context())):
        c = client(mesh.port, ctx)
        try:
            assert c.sayHello(name) == f"v1: hello {name}"
            assert c.ping() == "v2: pong"
        finally:
            c.close()
    assert mesh.sidecar.handler.requests == 2 and mesh.plain.handler.requests == 2
    # The engine's connection to v1 carried istiod's SNI for the subset.
    assert mesh.sidecar.sni == [f"outbound_.9090_.v1_.{SERVER}"]

    series = stats(mesh.admin)
    detected = "metaprotocol_downstream_connections_detected_total"
    assert value(series, detected, listener=LISTENER, result="plain") == 1
    assert value(series, detected, listener=LISTENER, result="mtls") == 1
    handshakes = "metaprotocol_tls_handshakes_total"
    assert value(series, handshakes, listener=LISTENER) == 1
    assert value(series, handshakes, cluster=V1) == 1
    assert not [k for k in series if k[0] == handshakes and ("cluster", V2) in k[1]]
    expiry = "metaprotocol_tls_certificate_expiry_seconds"
    chain = str(mesh.certs / "cert-chain.pem")
    assert value(series, expiry, identity="mesh", certificate=chain) > 0
    rotations = "metaprotocol_tls_identity_rotations_total"
    assert value(series, rotations, result="ok") == value(series, rotations, result="failed") == 0
    requests = "metaprotocol_requests_total"
    assert value(series, requests, route="rest-to-v1", destination=V1, status="Ok") == 2
    assert value(series, requests, route="ping-to-v2", destination=V2, status="Ok") == 2

    # Step 7: Istio's metrics name the gateway as the source workload (the example's
    # telemetry.workload) and each pod as the destination, v1's by its principal.
    istio = "istio_requests_total"
    for version, principal in (("v1", spiffe("thrift-sample-server", NS)), ("v2", "unknown")):
        assert (
            value(
                series,
                istio,
                reporter="source",
                source_workload="thrift-gateway",
                source_app="thrift-gateway",
                source_principal=spiffe("thrift-gateway", NS) if version == "v1" else "unknown",
                destination_service=SERVER,
                destination_version=version,
                destination_principal=principal,
                response_code="200",
            )
            == 2
        )

    dump = json.loads(get(mesh.admin, "/config_dump"))
    (listener,) = dump["listeners"]
    assert listener["peerAuthentication"] == "PERMISSIVE"
    assert listener["tls"]["mode"] == "ISTIO_MUTUAL"
    clusters = {c["name"]: c for c in dump["clusters"]}
    tls = clusters[V1]["tls"]
    assert tls["mode"] == "ISTIO_MUTUAL"
    assert tls["autoMtls"] == {"endpoints": [f"127.0.0.1:{mesh.sidecar.port}"], "off": None}
    assert tls["subjectAltNames"] == [spiffe("thrift-sample-server", NS)]
    # v2 has no labelled endpoint: the same mode, and none of its endpoints gets it.
    assert clusters[V2]["tls"]["autoMtls"] == {"endpoints": [], "off": None}
    assert dump["meshIdentity"]["certificateChain"] == chain
    assert dump["meshIdentity"]["lastRotationError"] is None


def test_check_prints_what_the_page_shows(mesh: Mesh, tmp_path: Path) -> None:
    """Step 5's ``--check`` lines, in the pod (``POD_NAMESPACE`` from the Downward API)."""
    page = PAGE.read_text(encoding="utf-8")
    console = page[page.index("$ metaprotocol proxy --check -c mesh.yaml\n") :]
    shown = console.split("\n$ ", 1)[0].splitlines()[1:]
    config = tmp_path / "mesh.yaml"
    config.write_text(for_this_machine(example(), mesh.certs, {"v1": 1, "v2": 2}))
    env = {k: v for k, v in os.environ.items() if k != "ISTIO_METAJSON_LABELS"}
    proc = subprocess.run(
        [sys.executable, "-m", "metaprotocol_sdk", "proxy", "--check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "POD_NAMESPACE": NS},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == shown


def test_a_tls_client_without_a_mesh_certificate_is_refused(mesh: Mesh) -> None:
    """The page: such a client is counted as a handshake error, and reaches no route."""
    before = mesh.sidecar.handler.requests
    ctx = mesh.ca.client_context(mesh.root / "peers", None)
    with pytest.raises((ssl.SSLError, OSError, EOFError)):
        c = client(mesh.port, ctx)
        try:
            c.sayHello("anonymous")
        finally:
            c.close()
    errors = "metaprotocol_tls_handshake_errors_total"

    def refused() -> float:
        counted = stats(mesh.admin)
        return sum(
            v
            for (name, labels), v in counted.items()
            if name == errors
            and ("listener", LISTENER) in labels
            and dict(labels)["reason"] in ("no_client_certificate", "bad_certificate")
        )

    mesh.engine.wait_for(lambda: refused() == 1)
    assert mesh.sidecar.handler.requests == before


def test_every_metric_the_page_names_is_served(mesh: Mesh) -> None:
    # (Its Authorization section's example and series are run by
    # tests/proxy/test_authorization.py: this example has no policy.)
    text = PAGE.read_text(encoding="utf-8")
    start = text.index("## 6. Authorization")
    text = text[:start] + text[text.index("\n## ", start + 1) :]
    named = set(re.findall(r"(?:metaprotocol|istio)_[a-z_]*[a-z](?![a-z_*])", text))
    assert len(named) >= 9 and "istio_requests_total" in named
    served = {re.sub(r"_(bucket|sum|count)$", "", name) for name, _ in stats(mesh.admin)}
    served |= {name for name, _ in stats(mesh.admin)}
    assert named <= served, named - served


def test_a_rotated_identity_is_counted_and_served(mesh: Mesh) -> None:
    """istio-agent renews the files: the engine serves the new certificate to the next
    connection without a reload, and counts the rotation (the page's check)."""
    serial = mesh.ca.write(mesh.certs, "thrift-gateway", ns=NS)
    identity = mesh.engine.engine.identity
    assert identity is not None
    mesh.engine.loop_call(lambda: identity.check(mesh.engine.loop.time()))
    assert value(stats(mesh.admin), "metaprotocol_tls_identity_rotations_total", result="ok") == 1
    ctx = mesh.mesh_client_context()
    with (
        socket.create_connection(("127.0.0.1", mesh.port), timeout=5) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    assert x509.load_der_x509_certificate(der).serial_number == serial
