"""The engine under a control plane sending istiod's inbound listener
(``spec.xds.inboundListener``): mutual TLS modes and AuthorizationPolicies take effect on
real connections (thriftpy2 clients, plain and in Istio's mutual TLS, and a thriftpy2
server), follow updates, are NACKed when they cannot be honoured, and deny everything until
the listener first arrives."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from control_plane import ControlPlane
from inbound_snapshots import (
    INBOUND,
    exact_principal,
    filter_,
    inbound,
    namespace_principal,
    port_chains,
    principal_policy,
    rbac,
    virtual_inbound,
)
from mesh_pki import MeshCa
from snapshots import LISTENER_TYPE, hello_snapshots
from test_engine_xds import HOST, NODE, PORT, Harness

from metaprotocol_sdk.demo.idl import hello, untyped
from metaprotocol_sdk.demo.thrift_server import HelloServer
from metaprotocol_sdk.proxy.authorization import INBOUND_PENDING as PENDING
from metaprotocol_sdk.proxy.xds.client import LISTENER_TYPE as CLIENT_LISTENER_TYPE

CLIENT = "spiffe://cluster.local/ns/bar/sa/client"
LISTENER = f"{HOST}:{PORT}"


def free_port() -> int:
    """A port to bind the engine's listener to: istiod's chains match the bind port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def engine_yaml(xds_port: int, bind: int, certs: Path) -> str:
    return f"""
kind: ServiceEntry
metadata: {{name: hello}}
spec:
  hosts: [{HOST}]
  ports: [{{number: {PORT}, name: tcp-metaprotocol-thrift-hello}}]
---
kind: ProxyConfig
metadata: {{name: proxy}}
spec:
  listeners: [{{host: {HOST}, port: {PORT}, bind: "127.0.0.1:{bind}"}}]
  meshIdentity: {{directory: "{certs}"}}
  timeouts: {{handshake: 2s, drain: 1s}}
  xds:
    address: "127.0.0.1:{xds_port}"
    node: {{id: "{NODE}"}}
    backoff: {{initial: 20ms, max: 200ms}}
    inboundListener: {INBOUND}
"""


class Clients:
    """Thrift clients of the engine: plain text, or mutual TLS as ``sa`` of ``ns``."""

    def __init__(self, ca: MeshCa, tmp: Path, port: int) -> None:
        self.ca, self.tmp, self.port = ca, tmp, port

    def context(self, sa: str, ns: str, trust_domain: str = "cluster.local") -> ssl.SSLContext:
        ctx = self.ca.client_context(self.tmp, None, ["istio"])  # (no metadata exchange)
        ctx.load_cert_chain(
            *self.ca.files(self.tmp / ns / trust_domain, sa, ns, trust_domain=trust_domain)
        )
        return ctx

    def connect(self, ctx: ssl.SSLContext | None = None) -> Any:
        tt = untyped("thriftpy2.transport")
        return untyped("thriftpy2.rpc").make_client(
            hello().Hello,
            "127.0.0.1",
            self.port,
            trans_factory=tt.TFramedTransportFactory(),
            timeout=5000,
            ssl_context=ctx,
        )


def outcome(client: Any) -> str:
    """``served``, or the Thrift exception's message (the engine's denial)."""
    try:
        client.sayHello("x")
    except untyped("thriftpy2.thrift").TApplicationException as exc:
        return str(exc.message)
    return "served"


DENIED = "PermissionDenied: RBAC: access denied"


@pytest.fixture
def setup(
    control_plane: ControlPlane, tmp_path: Path
) -> Iterator[tuple[ControlPlane, Harness, Clients, dict[str, list[Any]]]]:
    ca = MeshCa()
    ca.write(tmp_path / "engine", "hello", ns="foo")
    server = HelloServer("v1").start()
    base = hello_snapshots([("127.0.0.1", server.port)], [("127.0.0.1", server.port)])[0][1]
    control_plane.set_snapshot("1", base)
    bind = free_port()
    harness = Harness(engine_yaml(control_plane.port, bind, tmp_path / "engine"))
    try:
        yield control_plane, harness, Clients(ca, tmp_path / "clients", bind), base
    finally:
        harness.close()
        server.close()


def push(
    cp: ControlPlane, harness: Harness, base: dict[str, list[Any]], version: str, *listeners: Any
) -> None:
    """Serve ``listeners`` with the routes and clusters as ``version``; wait until the engine
    applied every type of it, or refused its listener."""
    cp.set_snapshot(version, {**base, LISTENER_TYPE: list(listeners)})

    def done(client: Any) -> bool:
        lds = client.types[CLIENT_LISTENER_TYPE]
        others = [s for url, s in client.types.items() if url != CLIENT_LISTENER_TYPE]
        return all(s.version == version for s in others) and (
            lds.version == version or bool(lds.last_error)
        )

    harness.wait(done)


def test_policies_and_modes_from_the_inbound_listener_follow_each_update(setup: Any) -> None:
    cp, harness, clients, base = setup
    bind = clients.port
    # Until the inbound listener arrives, every request is denied (plain text is refused).
    harness.wait(lambda c: c.types[CLIENT_LISTENER_TYPE].names == [INBOUND])
    early = clients.connect(clients.context("client", "bar"))
    assert outcome(early) == DENIED
    listener = harness.dump()["listeners"][0]
    assert listener["authorizationPolicies"]["ALLOW"] == [PENDING]
    assert listener["peerAuthentication"] == "STRICT"
    assert not harness.client.initialized
    # An LDS response without the inbound listener leaves it so (everything denied).
    push(cp, harness, base, "1b", virtual_inbound(port_chains(9080, "STRICT"), name="0.0.0.0_9080"))
    assert not harness.client.initialized
    # PERMISSIVE, DENY namespace evil: plain text and good identities are served.
    deny = rbac(
        {"ns[foo]-policy[no-evil]-rule[0]": principal_policy([namespace_principal("evil")])}, "DENY"
    )
    other = virtual_inbound(port_chains(9080, "STRICT"), name="0.0.0.0_9080")
    push(cp, harness, base, "2", inbound(bind, "PERMISSIVE", [deny]), other)
    assert harness.client.initialized
    assert set(harness.client.types[CLIENT_LISTENER_TYPE].resources) == {INBOUND}
    assert outcome(early) == "served"  # the open connection is judged again
    plain = clients.connect()
    assert outcome(plain) == "served"
    good = clients.connect(clients.context("client", "bar"))
    evil = clients.connect(clients.context("x", "evil"))
    assert outcome(good) == "served"
    assert outcome(evil) == DENIED
    dump = harness.dump()["listeners"][0]
    assert dump["peerAuthentication"] == "PERMISSIVE"
    assert dump["authorizationPolicies"]["DENY"] == ["foo/no-evil"]
    assert dump["tls"]["subjectAltNamePrefixes"] == ["spiffe://cluster.local/"]
    # STRICT, ALLOW one principal: plain text is refused at the handshake; others denied.
    allow = rbac(
        {"ns[foo]-policy[only-client]-rule[0]": principal_policy([exact_principal(CLIENT)])}
    )
    push(cp, harness, base, "3", inbound(bind, "STRICT", [deny, allow]))
    with pytest.raises(Exception):  # noqa: B017 (drained: no plain text on a STRICT port)
        outcome(plain)
    assert outcome(good) == "served"
    assert outcome(evil) == DENIED
    assert outcome(clients.connect(clients.context("y", "bar"))) == DENIED
    with pytest.raises(Exception):  # noqa: B017 (thriftpy2's transport errors vary)
        outcome(clients.connect())
    # A client of another trust domain (same root) is refused at the handshake.
    with pytest.raises(Exception):  # noqa: B017
        outcome(clients.connect(clients.context("client", "bar", "other.example")))
    # Something the engine cannot honour is NACKed; the last good version stays.
    broken = inbound(bind, "STRICT", [deny, allow])
    broken.filter_chains[-1].filters.insert(
        1,
        filter_(
            "envoy.filters.network.ext_authz", broken.filter_chains[-1].filters[0].typed_config
        ),
    )
    push(cp, harness, base, "4", broken)
    (nack,) = [r for r in cp.nacks(LISTENER_TYPE) if r.version == "3"]
    assert nack.error is not None and "ext-authz" in nack.error
    assert outcome(good) == "served" and outcome(evil) == DENIED
    stats = harness.engine.stats
    assert (
        stats.get(
            "metaprotocol_rbac_total",
            listener=LISTENER,
            policy="foo/no-evil",
            action="DENY",
            result="denied",
        )
        >= 2
    )
    for client in (early, plain, good, evil):
        client.close()


def test_a_plain_connection_made_before_the_inbound_listener_is_not_served_under_strict(
    setup: Any,
) -> None:
    """Before the inbound listener arrives the engine cannot know the mode: a plain text
    connection accepted then was served once a STRICT listener arrived (open connections
    keep their mode), although a sidecar, which has no inbound listener yet, accepts none."""
    cp, harness, clients, base = setup
    harness.wait(lambda c: c.types[CLIENT_LISTENER_TYPE].names == [INBOUND])
    try:
        early: Any = clients.connect()
    except Exception:  # refused at the handshake: what a sidecar does
        early = None
    push(cp, harness, base, "2", inbound(clients.port, "STRICT"))
    assert harness.dump()["listeners"][0]["peerAuthentication"] == "STRICT"
    if early is not None:
        with pytest.raises(Exception):  # noqa: B017 (closed at the handshake)
            outcome(early)
        early.close()
    assert outcome(clients.connect(clients.context("client", "bar"))) == "served"


def test_a_connection_of_another_trust_domain_made_before_the_inbound_listener_is_not_served(
    setup: Any,
) -> None:
    """Before the inbound listener arrives, a mutual TLS client is checked against the mesh
    root: one of another trust domain (the same root), accepted then, was served once a
    listener naming only cluster.local arrived (open connections keep their handshake)."""
    cp, harness, clients, base = setup
    harness.wait(lambda c: c.types[CLIENT_LISTENER_TYPE].names == [INBOUND])
    try:
        early: Any = clients.connect(clients.context("client", "bar", "other.example"))
        assert outcome(early) == DENIED
    except Exception:  # refused at the handshake: what a sidecar does
        early = None
    push(cp, harness, base, "2", inbound(clients.port, "STRICT"))
    if early is not None:
        try:
            result = outcome(early)
        except Exception:  # closed
            result = "closed"
        assert result != "served"
        early.close()
    assert outcome(clients.connect(clients.context("client", "bar"))) == "served"
