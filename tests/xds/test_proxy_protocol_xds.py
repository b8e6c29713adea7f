"""A cluster's ``upstream_proxy_protocol`` transport socket (istiod's
``trafficPolicy.proxyProtocol``) over xDS: unwrapped, its version made the rule's
``proxyProtocol``, the socket it wraps read as before (raw, TLS, automatic mutual TLS), each
cluster keeping its own; what the engine cannot honour refused. Envoy ACKs the shape."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from control_plane import ControlPlane
from envoy.config.core.v3 import base_pb2, proxy_protocol_pb2
from envoy.extensions.transport_sockets.proxy_protocol.v3 import upstream_proxy_protocol_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy_proxy_protocol import envoy as proxied_envoy
from envoy_proxy_protocol import seen
from snapshots import (
    ALL,
    CLUSTER_TYPE,
    HOST,
    V1,
    V2,
    hello_snapshots,
    istio_mutual_socket,
    tls_socket,
)
from test_engine_xds import Caller, Harness, acked, config_yaml
from test_envoy_acks import _ack_every_version, _dump, envoy  # noqa: F401 (a fixture)
from test_translate import (
    ISTIO_SNI,
    SA,
    Files,
    Policy,
    auto_mtls,
    base,
    front,
    policy_cluster,
    ports_resources,
    refusal,
    resources,
    rule_doc,
    snapshot,
    with_identity,
    with_tls,
)

from metaprotocol_sdk.demo.thrift_server import HelloServer
from metaprotocol_sdk.proxy.config.models import PORT_PROXY_PROTOCOL, ProxyProtocol
from metaprotocol_sdk.proxy.xds.translate import translate

NAME = "envoy.transport_sockets.upstream_proxy_protocol"
CONFIG = proxy_protocol_pb2.ProxyProtocolConfig
VERSIONS = {"V1": CONFIG.V1, "V2": CONFIG.V2}


def wrapped(inner: base_pb2.TransportSocket, version: str) -> base_pb2.TransportSocket:
    """``inner`` in istiod's ``upstream_proxy_protocol`` wrapper of ``version``."""
    socket = base_pb2.TransportSocket(name=NAME)
    socket.typed_config.Pack(
        upstream_proxy_protocol_pb2.ProxyProtocolUpstreamTransport(
            config=CONFIG(version=VERSIONS[version]),
            transport_socket=inner,
        )
    )
    return socket


def with_header(c: Any, version: str) -> Any:
    """Cluster ``c`` as istiod's ``applyUpstreamProxyProtocol`` leaves it: its socket and
    each of its matches' wrapped (a raw_buffer one when it has neither)."""
    if not c.HasField("transport_socket") and not c.transport_socket_matches:
        raw = base_pb2.TransportSocket(name="envoy.transport_sockets.raw_buffer")
        raw.typed_config.Pack(raw_buffer_pb2.RawBuffer())  # istiod's RawBufferTransport
        c.transport_socket.CopyFrom(wrapped(raw, version))
        return c
    if c.HasField("transport_socket"):
        c.transport_socket.CopyFrom(wrapped(c.transport_socket, version))
    for match in c.transport_socket_matches:
        match.transport_socket.CopyFrom(wrapped(match.transport_socket, version))
    return c


def _headers(snap: dict[str, list[Any]], **versions: str) -> dict[str, list[Any]]:
    """``snap`` with the clusters named (``all``, ``v1``, ``v2``) given a header."""
    names = {"all": ALL, "v1": V1, "v2": V2}
    wanted = {names[k]: v for k, v in versions.items()}
    snap[CLUSTER_TYPE] = [
        with_header(c, wanted[c.name]) if c.name in wanted else c for c in snap[CLUSTER_TYPE]
    ]
    return snap


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_the_wrapper_is_the_rules_proxy_protocol(version: str) -> None:
    """istiod wraps the cluster's transport socket match (raw_buffer here): it was refused as
    an unsupported transport socket, NACKing the cluster. Now its version is the cluster's
    ``proxyProtocol``; the clusters not wrapped have none; the engine builds with it."""
    config = translate(base(), resources(_headers(snapshot(), all=version)))
    assert rule_doc(config)["spec"]["trafficPolicy"]["proxyProtocol"] == {"version": version}
    rule = config.destination_rules[HOST]
    assert rule.policy_for(9090).applied().proxy_protocol == ProxyProtocol(int(version[1]))
    assert rule.policy_for(9090).tls is None
    assert rule.policy_for(9090, "v1").proxy_protocol is None
    assert rule.policy_for(9090, "v2").proxy_protocol is None


def test_a_cluster_without_any_socket_gets_a_wrapped_raw_buffer() -> None:
    """No socket at all: istiod wraps a raw_buffer as the cluster's transport socket."""
    snap = snapshot()
    for c in snap[CLUSTER_TYPE]:
        del c.transport_socket_matches[:]
    config = translate(base(), resources(_headers(snap, v2="V2")))
    rule = config.destination_rules[HOST]
    assert rule.policy_for(9090, "v2").proxy_protocol == ProxyProtocol(2)
    assert rule.policy_for(9090).proxy_protocol is None


def test_the_tls_socket_it_wraps_is_read_as_before(tmp_path: Path) -> None:
    """A DestinationRule's tls with files inside the wrapper: the same tls block, and the
    header (written before the handshake, see the engine's tests)."""
    files = Files(tmp_path)
    socket = tls_socket(files.ca, (files.cert, files.key), sni="tls.hello.svc")
    res = with_tls(socket)
    res.clusters[V1] = with_header(res.clusters[V1], "V1")  # type: ignore[index]
    rule = translate(base(), res).destination_rules[HOST]
    v1 = rule.policy_for(9090, "v1")
    assert v1.proxy_protocol == ProxyProtocol(1)
    assert v1.tls is not None and (v1.tls.mode, v1.tls.sni) == ("MUTUAL", "tls.hello.svc")


def test_automatic_mutual_tls_with_every_match_wrapped(tmp_path: Path) -> None:
    """istiod's automatic mutual TLS: both matches wrapped alike, read as before, with the
    header."""
    files = Files(tmp_path)
    res = auto_mtls(istio_mutual_socket(ISTIO_SNI, [SA]), (ALL,))
    res.clusters[ALL] = with_header(res.clusters[ALL], "V2")  # type: ignore[index]
    rule = translate(with_identity(files), res).destination_rules[HOST]
    policy = rule.policy_for(9090)
    assert policy.tls is not None and policy.tls.auto and policy.tls.mode == "ISTIO_MUTUAL"
    assert policy.proxy_protocol == ProxyProtocol(2)


def _refusal_with(change: Any) -> str:
    snap = _headers(snapshot(), all="V2")
    c = next(c for c in snap[CLUSTER_TYPE] if c.name == ALL)
    change(c)
    return refusal(resources(snap))


def _wrapper(c: Any) -> upstream_proxy_protocol_pb2.ProxyProtocolUpstreamTransport:
    message = upstream_proxy_protocol_pb2.ProxyProtocolUpstreamTransport()
    c.transport_socket_matches[0].transport_socket.typed_config.Unpack(message)
    return message


def _rewrap(c: Any, message: Any) -> None:
    c.transport_socket_matches[0].transport_socket.typed_config.Pack(message)


def test_what_the_engine_cannot_honour_is_refused() -> None:
    """TLVs to add, unspecified addresses allowed, a field newer than the engine's protos, a
    wrapper in a wrapper, one without the socket it wraps, and sockets that disagree (a
    header for some endpoints only): each refused, naming the field. TLVs to pass through
    are no change here (the engine reads no header from its clients: none to pass)."""
    path = "transport_socket_matches[0].transport_socket.typed_config"

    def added_tlvs(c: Any) -> None:
        m = _wrapper(c)
        m.config.added_tlvs.add(type=0xE0, value=b"x")
        _rewrap(c, m)

    assert f"{path}.config.added_tlvs" in _refusal_with(added_tlvs)

    def unspecified(c: Any) -> None:
        m = _wrapper(c)
        m.allow_unspecified_address = True
        _rewrap(c, m)

    assert f"{path}.allow_unspecified_address" in _refusal_with(unspecified)

    def unknown(c: Any) -> None:
        m = _wrapper(c)
        m.MergeFromString(bytes([9 << 3 | 0, 1]))  # field 9, a varint
        _rewrap(c, m)

    assert "has field 9, unknown to this engine" in _refusal_with(unknown)

    def nested(c: Any) -> None:
        socket = c.transport_socket_matches[0].transport_socket
        socket.CopyFrom(wrapped(socket, "V1"))

    assert "a PROXY protocol header is written once" in _refusal_with(nested)

    def empty(c: Any) -> None:
        m = _wrapper(c)
        m.ClearField("transport_socket")
        _rewrap(c, m)

    assert f"{path}.transport_socket: required" in _refusal_with(empty)

    res = auto_mtls(istio_mutual_socket(ISTIO_SNI, [SA]), (ALL,))
    plain = res.clusters[ALL].transport_socket_matches[1]  # type: ignore[index]
    plain.transport_socket.CopyFrom(wrapped(plain.transport_socket, "V1"))
    assert "not every transport socket has the same upstream_proxy_protocol" in refusal(res)

    def passing(c: Any) -> None:
        m = _wrapper(c)
        m.config.pass_through_tlvs.SetInParent()
        _rewrap(c, m)

    snap = _headers(snapshot(), all="V2")
    passing(next(c for c in snap[CLUSTER_TYPE] if c.name == ALL))
    rule = translate(base(), resources(snap)).destination_rules[HOST]
    assert rule.policy_for(9090).proxy_protocol == ProxyProtocol(2)


def test_clusters_of_different_headers_each_keep_their_own() -> None:
    """Clusters of one host with different headers, per port and subset (and other
    differences): each keeps exactly its own, although Istio's port settings have none (the
    entries carry it under the engine's key)."""
    wanted: dict[tuple[int, str | None], str | None] = {
        (9090, None): "V2",
        (9091, None): None,
        (9092, None): "V2",
        (9090, "v1"): None,
        (9091, "v1"): "V1",
        (9092, "v1"): "V2",
        (9091, "v2"): "V1",
    }
    res = ports_resources({key: Policy() for key in wanted})
    for (port, subset), version in wanted.items():
        name = f"outbound|{port}|{subset or ''}|{HOST}"
        c = policy_cluster(name, Policy())
        res.clusters[name] = c if version is None else with_header(c, version)  # type: ignore[index]
    config = translate(front(), res)
    rule = config.destination_rules[HOST]
    for (port, subset), version in wanted.items():
        want = None if version is None else ProxyProtocol(int(version[1]))
        assert rule.policy_for(port, subset).proxy_protocol == want, (port, subset)
    doc = rule_doc(config)["spec"]
    entries = [
        e
        for policy in [doc["trafficPolicy"], *(s["trafficPolicy"] for s in doc["subsets"])]
        for e in policy.get("portLevelSettings", [])
    ]
    assert any(PORT_PROXY_PROTOCOL in e for e in entries)


def test_envoy_acks_clusters_with_the_wrapper(control_plane: ControlPlane, envoy: str) -> None:  # noqa: F811
    """The shape the translation reads is istiod's, and valid xDS: Envoy ACKs the clusters
    wrapped (a raw_buffer match, a cluster socket of its own) and shows the wrapper."""
    _, snap = hello_snapshots([("127.0.0.1", 20001)], [("127.0.0.1", 20003)])[0]
    for c in snap[CLUSTER_TYPE]:
        if c.name == V2:
            del c.transport_socket_matches[:]
    _ack_every_version(control_plane, [("pp", _headers(snap, all="V1", v2="V2"))])
    clusters = {
        c["cluster"]["name"]: c["cluster"]
        for c in _dump(envoy, "dynamic_active_clusters")["configs"]
    }
    match = clusters[ALL]["transport_socket_matches"][0]["transport_socket"]
    assert match["name"] == NAME
    assert clusters[V2]["transport_socket"]["typed_config"]["config"]["version"] == "V2"


def test_the_engine_over_xds_writes_the_header_envoy_reads(
    control_plane: ControlPlane, servers: dict[str, HelloServer], tmp_path: Path
) -> None:
    """End to end: istiod's wrapper on subset v1's cluster, whose endpoint is Envoy with the
    ``proxy_protocol`` listener filter in front of a real Thrift server (thriftpy2). A
    thriftpy2 client's calls through the engine reach it, and Envoy takes that client, on
    one connection, to have connected to the engine's listener: what the header says."""
    with proxied_envoy(tmp_path, servers["v1a"].port) as (port, log):
        v1 = [("127.0.0.1", port)]
        version, snap = hello_snapshots(v1, [("127.0.0.1", servers["v2"].port)])[0]
        control_plane.set_snapshot(version, _headers(snap, v1="V2"))
        harness = Harness(config_yaml(control_plane.port))
        try:
            harness.wait(acked(version))
            dumped = {c["name"]: c for c in harness.dump()["clusters"]}
            assert dumped[V1]["proxyProtocol"] == {"version": "V2"}
            caller = Caller(harness.port)
            try:
                assert caller.next(5) == {"v1a": 5}
                # The socket under thriftpy2's framed transport.
                host, own = caller.client._iprot.trans.sock.getsockname()[:2]
            finally:
                caller.close()
            engine = f"127.0.0.1:{harness.port}"
            deadline = time.monotonic() + 15
            while not seen(log) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert seen(log) == {f"{host}:{own} {engine}"}
        finally:
            harness.close()
