"""istiod's automatic mutual TLS with a file configuration: with ``spec.meshIdentity``, a
cluster whose DestinationRule sets no ``tls`` sends ``ISTIO_MUTUAL`` to the endpoints of a
``MESH_INTERNAL`` ServiceEntry labelled ``security.istio.io/tlsMode: istio`` and plain TCP
to the others, chosen per endpoint when a connection opens. KV codec, real sockets on
127.0.0.1, a mesh CA made as istiod's (``tests/mesh_pki.py``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from mesh_pki import ALPN_SIDECAR, SIDECAR_METADATA, MeshCa, exchange_header, spiffe
from proxy_kit import Client, Upstream, address, engine_for, error_type, http_get, mesh, run
from test_mesh_identity import Sni, identity, peer_uris

from metaprotocol_sdk.proxy import loads_config
from metaprotocol_sdk.proxy.engine import Engine
from metaprotocol_sdk.proxy.tls import TlsUpstreamConnection


@pytest.fixture
def ca() -> MeshCa:
    return MeshCa()


LABEL = "security.istio.io/tlsMode: istio"
SERVICE = "outbound|9000||svc.test"


def in_mesh(text: str, sans: tuple[str, ...] = (spiffe("greeter"),), labelled: str = "v1") -> str:
    """``text`` (of :func:`mesh`) with a ``MESH_INTERNAL`` ServiceEntry naming ``sans``, and
    the endpoint of version ``labelled`` carrying a sidecar's ``tlsMode`` label."""
    text = text.replace(
        "  resolution: STATIC",
        f"  location: MESH_INTERNAL\n  subjectAltNames: {json.dumps(list(sans))}\n"
        "  resolution: STATIC",
    )
    return text.replace(
        f"labels: {{version: {labelled}}}", f"labels: {{version: {labelled}, {LABEL}}}"
    )


def mutual(engine: Engine, name: str = SERVICE) -> dict[str, bool]:
    """Each endpoint of cluster ``name``: whether its connections are ISTIO_MUTUAL."""
    cluster = engine.clusters[name]
    return {h.labels["version"]: h.connection_class is TlsUpstreamConnection for h in cluster.hosts}


def test_labelled_endpoints_get_istio_mutual_and_the_others_plain_text(
    ca: MeshCa, tmp_path: Path
) -> None:
    """Two endpoints of one cluster, round robin: the sidecar's (its server requires a mesh
    client certificate, as STRICT PeerAuthentication does) is reached over ISTIO_MUTUAL with
    istiod's SNI, the engine's workload certificate and Istio's metadata exchange, the
    other in plain text; both
    answer every request, and /config_dump lists the endpoint that gets mutual TLS."""
    ca.write(tmp_path / "certs", "engine")
    server = ca.server_context(tmp_path, "greeter", alpn=ALPN_SIDECAR)
    sni = Sni(server)

    async def main() -> None:
        strict = Upstream("v1")
        strict.exchange = exchange_header(SIDECAR_METADATA)  # a sidecar's metadata exchange
        await strict.start(ssl=server)
        plain = await Upstream("v2").start()
        text = in_mesh(
            mesh([(strict.port, "v1"), (plain.port, "v2")], proxy=identity(tmp_path / "certs"))
        )
        async with engine_for(text) as engine:
            assert mutual(engine) == {"v1": True, "v2": False}
            client = await Client.connect(address(engine))
            for rid in range(1, 7):
                reply = await client.call("get", rid=rid)
                assert reply.request_id == rid and error_type(reply) is None, reply
            assert len(strict.received) == len(plain.received) == 3
            (tls_conn,) = strict.connections
            assert tls_conn.transport is not None
            assert peer_uris(tls_conn.transport) == [spiffe("engine")]
            ssl_object = tls_conn.transport.get_extra_info("ssl_object")
            assert ssl_object.selected_alpn_protocol() == "istio-peer-exchange"
            assert len(strict.peers) == 1  # the engine's workload, read by the sidecar
            (plain_conn,) = plain.connections
            assert plain_conn.transport is not None
            assert plain_conn.transport.get_extra_info("ssl_object") is None
            handshakes = engine.stats.get("metaprotocol_tls_handshakes_total", cluster=SERVICE)
            assert handshakes == 1
            assert engine.admin_address is not None
            _, body = await http_get(engine.admin_address, "/config_dump")
            tls = next(c for c in json.loads(body)["clusters"] if c["name"] == SERVICE)["tls"]
            assert tls["mode"] == "ISTIO_MUTUAL" and tls["sni"] == "outbound_.9000_._.svc.test"
            assert tls["autoMtls"] == {"endpoints": [f"127.0.0.1:{strict.port}"], "off": None}
            assert tls["subjectAltNames"] == [spiffe("greeter")]
            client.close()
        await strict.close()
        await plain.close()
        assert sni.names == ["outbound_.9000_._.svc.test"]

    run(main())


def test_a_server_of_another_identity_is_refused(ca: MeshCa, tmp_path: Path) -> None:
    """The names are checked as for ISTIO_MUTUAL: the ServiceEntry's subjectAltNames."""
    ca.write(tmp_path / "certs", "engine")
    server = ca.server_context(tmp_path, "impostor")

    async def main() -> None:
        up = await Upstream("v1").start(ssl=server)
        text = in_mesh(mesh([(up.port, "v1")], proxy=identity(tmp_path / "certs")))
        async with engine_for(text) as engine:
            client = await Client.connect(address(engine))
            reply = await client.call("get", rid=4)
            assert reply.request_id == 4 and error_type(reply) == "UpstreamConnectFailure"
            client.close()
        await up.close()
        assert up.received == []

    run(main())


ROUTER = """\
- name: to-v1
  match: {attributes: {method: {exact: v1}}}
  route: [{destination: {host: svc.test, subset: v1}}]
- name: to-v2
  match: {attributes: {method: {exact: v2}}}
  route: [{destination: {host: svc.test, subset: v2}}]
- name: rest
  route: [{destination: {host: svc.test}}]
"""


def rule(top: str = "{}", v1: str = "", port: str = "") -> str:
    """A DestinationRule for svc.test: its ``trafficPolicy`` (with a ``portLevelSettings``
    entry for port 9000 setting ``port``), and subset v1's ``trafficPolicy`` ``v1``."""
    policy = json.loads(top)
    if port:
        policy["portLevelSettings"] = [{"port": {"number": 9000}, **json.loads(port)}]
    v1_policy = f", trafficPolicy: {v1}" if v1 else ""
    return (
        f"trafficPolicy: {json.dumps(policy)}\n"
        f"  subsets:\n"
        f"    - {{name: v1, labels: {{version: v1}}{v1_policy}}}\n"
        f"    - {{name: v2, labels: {{version: v2}}}}\n"
    )


AUTO = {"v1": True, "v2": False}
PLAIN = {"v1": False, "v2": False}
ALL = {"v1": True, "v2": True}


@pytest.mark.parametrize(
    ("top", "v1", "port", "service", "subset_v1", "subset_v2"),
    [
        # No tls anywhere: every cluster is automatic.
        ("{}", "", "", AUTO, {"v1": True}, {"v2": False}),
        # The rule's tls, whatever its mode, turns it off for every cluster that inherits it.
        ('{"tls": {"mode": "DISABLE"}}', "", "", PLAIN, {"v1": False}, {"v2": False}),
        ('{"tls": {"mode": "ISTIO_MUTUAL"}}', "", "", ALL, {"v1": True}, {"v2": True}),
        # A subset's tls wins over none: its cluster is plain, the others automatic.
        ("{}", "{tls: {mode: DISABLE}}", "", AUTO, {"v1": False}, {"v2": False}),
        # A subset with no tls of its own inherits the rule's.
        (
            '{"tls": {"mode": "DISABLE"}}',
            "{outlierDetection: {}}",
            "",
            PLAIN,
            {"v1": False},
            {"v2": False},
        ),
        # A port's settings win over the rule's, and replace it whole (no tls: automatic).
        ("{}", "", '{"tls": {"mode": "DISABLE"}}', PLAIN, {"v1": False}, {"v2": False}),
        (
            '{"tls": {"mode": "DISABLE"}}',
            "",
            '{"connectionPool": {}}',
            AUTO,
            {"v1": True},
            {"v2": False},
        ),
    ],
    ids=[
        "none",
        "rule-disable",
        "rule-istio-mutual",
        "subset-disable",
        "subset-inherits",
        "port-disable",
        "port-without-tls",
    ],
)
def test_the_destination_rules_tls_takes_precedence_as_in_istio(
    ca: MeshCa,
    tmp_path: Path,
    top: str,
    v1: str,
    port: str,
    service: dict[str, bool],
    subset_v1: dict[str, bool],
    subset_v2: dict[str, bool],
) -> None:
    """Istio's precedence (portLevelSettings, then the subset's, then the rule's): automatic
    mutual TLS only where none of them sets ``tls``; an explicit DISABLE is plain text."""
    ca.write(tmp_path / "certs", "engine")
    text = in_mesh(mesh([(1, "v1"), (2, "v2")], router=ROUTER, proxy=identity(tmp_path / "certs")))
    head, _, tail = text.partition("trafficPolicy: {}\n")
    tail = tail.split("---", 1)[1]
    text = head + rule(top, v1, port) + "---" + tail

    async def main() -> None:
        async with engine_for(text) as engine:
            assert mutual(engine) == service
            assert mutual(engine, "outbound|9000|v1|svc.test") == subset_v1
            assert mutual(engine, "outbound|9000|v2|svc.test") == subset_v2

    run(main())


@pytest.mark.parametrize("case", ["no-identity", "switched-off", "mesh-external"])
def test_without_an_identity_switched_off_or_out_of_the_mesh_all_is_plain(
    ca: MeshCa, tmp_path: Path, case: str
) -> None:
    """No identity (as before), ``autoMtls: false`` (Istio's ``enableAutoMtls``), or a
    ServiceEntry without ``location: MESH_INTERNAL`` (istiod never sends automatic mutual TLS
    to a mesh-external service): the labelled endpoint is sent plain text."""
    ca.write(tmp_path / "certs", "engine")
    proxy = {
        "no-identity": "",
        "switched-off": f"meshIdentity: {{directory: '{tmp_path / 'certs'}', autoMtls: false}}\n",
        "mesh-external": identity(tmp_path / "certs"),
    }[case]

    async def main() -> None:
        up = await Upstream("v1").start()
        text = in_mesh(mesh([(up.port, "v1")], proxy=proxy))
        if case == "mesh-external":
            text = text.replace("  location: MESH_INTERNAL\n", "")
        async with engine_for(text) as engine:
            assert mutual(engine) == {"v1": False}
            assert engine.clusters[SERVICE].tls is None
            client = await Client.connect(address(engine))
            reply = await client.call("get", rid=2)
            assert reply.request_id == 2 and error_type(reply) is None
            client.close()
        await up.close()

    run(main())


def test_auto_mtls_must_be_a_boolean(ca: MeshCa, tmp_path: Path) -> None:
    ca.write(tmp_path / "certs", "engine")
    proxy = f"meshIdentity: {{directory: '{tmp_path / 'certs'}', autoMtls: 'yes'}}\n"
    with pytest.raises(Exception, match=r"spec\.meshIdentity\.autoMtls.*must be true or false"):
        loads_config(mesh([(1, "v1")], proxy=proxy), "test.yaml")


def test_the_translations_key_is_refused_in_a_file(ca: MeshCa, tmp_path: Path) -> None:
    """The key the xDS translation marks automatic mutual TLS with is not a file's."""
    ca.write(tmp_path / "certs", "engine")
    policy = '{tls: {mode: ISTIO_MUTUAL, "xds.metaprotocol.io/autoMtls": true}}'
    text = mesh([(1, "v1")], traffic_policy=policy, proxy=identity(tmp_path / "certs"))
    with pytest.raises(Exception, match=r"xds\.metaprotocol\.io/autoMtls: unknown field"):
        loads_config(text, "test.yaml")


def test_a_service_with_no_server_names_is_cautioned(
    ca: MeshCa, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca.write(tmp_path / "certs", "engine")
    text = in_mesh(mesh([(1, "v1")], proxy=identity(tmp_path / "certs")), sans=())
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        loads_config(text, "test.yaml")
    assert "any workload certificate of the mesh is accepted" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        loads_config(in_mesh(mesh([(1, "v1")], proxy=identity(tmp_path / "certs"))), "test.yaml")
    assert "any workload certificate" not in caplog.text
