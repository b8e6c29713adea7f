"""``DestinationRule.trafficPolicy.proxyProtocol`` (Envoy's ``upstream_proxy_protocol``
transport socket), over real sockets: each upstream connection starts with a PROXY protocol
header naming the client it carries, read here by an independent parser (``proxy-protocol``
on PyPI) before anything else on the connection, TLS included. Envoy's own reading of it is
in ``test_proxy_protocol_envoy.py``."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
from typing import Any

import pytest
from proxy_kit import (
    ONEWAY,
    RESPONSE,
    Client,
    address,
    build_frame,
    engine_for,
    error_type,
    http_get,
    mesh,
    run,
    until,
)
from proxyprotocol import ProxyProtocol as Parser
from proxyprotocol.detect import ProxyProtocolDetect
from proxyprotocol.reader import ProxyProtocolReader
from proxyprotocol.result import (
    ProxyResult,
    ProxyResultIPv4,
    ProxyResultIPv6,
    ProxyResultLocal,
    ProxyResultUnknown,
)
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2
from test_tls import Pki

from metaprotocol_sdk import ConfigError, MessageType, Metadata
from metaprotocol_sdk.examples.kv import STREAM_HALF_CLOSE, STREAM_OPEN, KVCodec
from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.config.models import ProxyProtocol
from metaprotocol_sdk.proxy.proxy_protocol import header

#: Each version's parser, and one that reads either (``any``).
PARSERS: dict[str, Parser] = {
    "V1": ProxyProtocolV1(),
    "V2": ProxyProtocolV2(),
    "any": ProxyProtocolDetect(ProxyProtocolV1(), ProxyProtocolV2()),
}
CLUSTER = "outbound|9000||svc.test"


class ProxiedUpstream:
    """A KV server that reads a PROXY protocol header of one version first on each connection
    (then TLS, when given a context), and answers each request, and each stream's
    ``Stream_Init``, with the client the header names (``pp-source``, ``pp-dest``) and the
    connection's number (``conn``). A connection whose header does not parse is closed."""

    def __init__(self, name: str, version: str, tls: ssl.SSLContext | None = None) -> None:
        self.name = name
        self.reader = ProxyProtocolReader(PARSERS[version])
        self.tls = tls
        self.headers: list[ProxyResult] = []
        self.refused: list[Exception] = []
        #: Every message each connection got, by connection number.
        self.messages: dict[int, list[Metadata]] = {}
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> ProxiedUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        await asyncio.wait_for(self.server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            result = await asyncio.wait_for(self.reader.read(reader), 5)
        except Exception as exc:  # what the parser refuses
            self.refused.append(exc)
            writer.close()
            return
        self.headers.append(result)
        number = len(self.headers) - 1
        got = self.messages[number] = []
        stream = _Stream(reader, writer, self.tls)
        await stream.handshake()
        source, dest = _shown(result.source), _shown(result.dest)
        codec, buffer = KVCodec(), bytearray()
        while data := await stream.read():
            buffer += data
            while isinstance(msg := codec.decode(buffer), Metadata):
                got.append(msg)
                kind = msg.message_type
                info = {"server": self.name, "pp-source": source, "pp-dest": dest}
                info["conn"] = str(number)
                if kind is MessageType.Request and msg.operation_name != "hang":
                    stream.write(build_frame(RESPONSE, msg.request_id, info))
                elif kind is MessageType.Stream_Init:
                    stream.write(build_frame(STREAM_OPEN, msg.request_id, info))
                elif kind is MessageType.Stream_Close_One_Way:
                    stream.write(build_frame(STREAM_HALF_CLOSE, msg.request_id))


class _Stream:
    """What follows the header on a connection: plain, or TLS over memory buffers (what the
    reader read past the header, the ClientHello with it, is still the reader's: a TLS
    layer started on the transport would miss it)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: ssl.SSLContext | None
    ) -> None:
        self.reader, self.writer = reader, writer
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = None if tls is None else tls.wrap_bio(self.incoming, self.outgoing, True)

    def _flush(self) -> None:
        if pending := self.outgoing.read():
            self.writer.write(pending)

    async def _more(self) -> bool:
        self._flush()
        data = await self.reader.read(65536)
        if not data:
            return False
        self.incoming.write(data)
        return True

    async def handshake(self) -> None:
        while self.tls is not None:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                if not await self._more():
                    raise ConnectionResetError("closed in the handshake") from None
                continue
            self._flush()
            return

    async def read(self) -> bytes:
        if self.tls is None:
            return await self.reader.read(65536)
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                if not await self._more():
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    def write(self, data: bytes) -> None:
        if self.tls is None:
            self.writer.write(data)
            return
        self.tls.write(data)
        self._flush()


def _shown(address: Any) -> str:
    """A header's ``(ip, port)`` as ``ip:port`` (``-``: none)."""
    if address is None:
        return "-"
    ip, port = address
    return f"{ip}:{port}"


def _me(client: Client) -> str:
    """The client's own address and port, as a header should name them."""
    assert client.transport is not None
    host, port = client.transport.get_extra_info("sockname")[:2]
    return f"{host}:{port}"


def _engine(engine: Engine) -> str:
    host, port = address(engine)[:2]
    return f"{host}:{port}"


def _policy(version: str, tls: str = "") -> str:
    return "{proxyProtocol: {version: " + version + "}" + (f", tls: {tls}" if tls else "") + "}"


async def _dump(engine: Engine) -> dict[str, Any]:
    assert engine.admin_address is not None
    status, body = await http_get(engine.admin_address, "/config_dump")
    assert status == 200
    return next(c for c in json.loads(body)["clusters"] if c["name"] == CLUSTER)  # type: ignore[no-any-return]


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_each_client_gets_connections_of_its_own_each_starting_with_a_header_naming_it(
    version: str,
) -> None:
    """The KV codec rewrites ids (its clusters share connections); with ``proxyProtocol``
    two clients get two upstream connections, each starting with a header of the version
    set naming its client (the client's address and port, the engine's listener address),
    and their requests go upstream with the clients' own ids (no rewriting on a client's
    own connection). ``/config_dump`` shows the header and the pooling."""

    async def main() -> None:
        up = await ProxiedUpstream("v1", version).start()
        async with engine_for(mesh([(up.port, "v1")], traffic_policy=_policy(version))) as engine:
            a, b = await Client.connect(address(engine)), await Client.connect(address(engine))
            for client in (a, b):
                replies = await asyncio.gather(*(client.call(rid=41 + i) for i in range(3)))
                for reply in replies:
                    assert error_type(reply) is None
                    assert reply.attributes["pp-source"] == _me(client)
                    assert reply.attributes["pp-dest"] == _engine(engine)
                assert len({r.attributes["conn"] for r in replies}) == 1
            kinds = {ProxyResultIPv4}
            assert {type(h) for h in up.headers} == kinds and len(up.headers) == 2
            assert up.refused == []
            for got in up.messages.values():  # the clients' own ids, unchanged
                assert [m.request_id for m in got] == [41, 42, 43]
            dumped = await _dump(engine)
            assert dumped["proxyProtocol"] == {"version": version}
            assert dumped["pooling"] == "dedicated"
            a.close()
            b.close()
        await up.close()

    run(main())


@pytest.mark.parametrize("version", ["V1", "V2"])
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_over_tls_the_header_comes_before_the_handshake(
    tmp_path: Any, version: str, loop: str
) -> None:
    """``tls: SIMPLE`` too: the header is the first bytes on the TCP connection, in the
    clear, and the TLS handshake follows it (the upstream reads the header, then starts
    TLS); requests are served over TLS, each connection naming its client."""
    pki = Pki(tmp_path)
    server_ctx = pki.server_context(pki.leaf("up", "svc.test"))

    async def main() -> None:
        up = await ProxiedUpstream("v1", version, server_ctx).start()
        tls = json.dumps({"mode": "SIMPLE", "caCertificates": pki.ca_file})
        text = mesh([(up.port, "v1")], traffic_policy=_policy(version, tls))
        async with engine_for(text) as engine:
            a, b = await Client.connect(address(engine)), await Client.connect(address(engine))
            for client in (a, b, a):
                reply = await client.call()
                assert error_type(reply) is None
                assert reply.attributes["pp-source"] == _me(client)
            assert len(up.headers) == 2 and up.refused == []
            stats = engine.stats
            assert stats.get("metaprotocol_tls_handshakes_total", cluster=CLUSTER) == 2
            a.close()
            b.close()
        await up.close()

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_client_of_a_tls_listener_is_named_too(tmp_path: Any, loop: str) -> None:
    """The engine terminates the client's TLS (a listener ``tls``): the header still names
    the client's TCP address and the listener's, read under the client's TLS layer."""
    pki = Pki(tmp_path)
    cert, key = pki.leaf("listener", "svc.test")
    tls = json.dumps({"mode": "SIMPLE", "serverCertificate": cert, "privateKey": key})

    async def main() -> None:
        up = await ProxiedUpstream("v1", "V2").start()
        text = mesh([(up.port, "v1")], traffic_policy=_policy("V2"), listener_tls=tls)
        async with engine_for(text) as engine:
            ctx = pki.client_context()
            client = await Client.connect(address(engine), ssl=ctx, server_hostname="svc.test")
            reply = await client.call()
            assert error_type(reply) is None
            assert reply.attributes["pp-source"] == _me(client)
            assert reply.attributes["pp-dest"] == _engine(engine)
            client.close()
        await up.close()

    run(main(), loop=loop)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no ::1")
@pytest.mark.parametrize("version", ["V1", "V2"])
def test_a_client_over_ipv6_is_named_in_an_ipv6_header(version: str) -> None:
    """A listener on ``[::1]``: the header is ``TCP6`` (v1) or of family ``AF_INET6`` (v2)
    with the client's IPv6 address, though the upstream connection itself is IPv4."""

    async def main() -> None:
        up = await ProxiedUpstream("v1", version).start()
        text = mesh([(up.port, "v1")], traffic_policy=_policy(version))
        text = text.replace("bind: '127.0.0.1:0'", "bind: '[::1]:0'")
        async with engine_for(text) as engine:
            client = await Client.connect(address(engine)[:2])
            reply = await client.call()
            assert error_type(reply) is None
            assert reply.attributes["pp-source"] == _me(client)
            assert reply.attributes["pp-source"].startswith("::1:")
            assert reply.attributes["pp-dest"] == f"::1:{address(engine)[1]}"
            assert [type(h) for h in up.headers] == [ProxyResultIPv6]
            client.close()
        await up.close()

    run(main())


MIRRORED = """\
- name: mirrored
  route: [{destination: {host: svc.test, subset: v1}}]
  mirror: {host: svc.test, subset: v2}
  mirrorPercentage: {value: 100}
"""


def test_mirror_copies_oneway_messages_and_streams_name_their_client() -> None:
    """What else goes upstream: a mirrored copy (on the client's own connection to the
    mirror's endpoint), a one-way message (on the client's connection), and a stream (on a
    connection of its own). Each connection starts with a header naming
    the client, and carries what it carries unchanged after it."""

    async def main() -> None:
        v1 = await ProxiedUpstream("v1", "V2").start()
        v2 = await ProxiedUpstream("v2", "V2").start()
        text = mesh([(v1.port, "v1"), (v2.port, "v2")], MIRRORED, _policy("V2"))
        async with engine_for(text) as engine:
            client = await Client.connect(address(engine))
            me = _me(client)
            reply = await client.call(rid=7)
            assert error_type(reply) is None and reply.attributes["server"] == "v1"
            client.send(build_frame(ONEWAY, 8, {"method": "note"}))
            await until(lambda: len(v1.messages.get(0, ())) == 2, "the request and the one-way")
            await until(lambda: len(v2.messages.get(0, ())) == 1, "the copy")
            assert [m.request_id for m in v1.messages[0]] == [7, 8]
            assert v1.messages[0][1].message_type is MessageType.Oneway
            assert [m.request_id for m in v2.messages[0]] == [7]
            client.send(build_frame(STREAM_OPEN, 9, {"method": "chat"}))
            await until(lambda: len(v1.headers) == 2, "the stream's own connection")
            client.send(build_frame(STREAM_HALF_CLOSE, 9))
            await until(lambda: len(v1.messages.get(1, ())) == 2, "the stream's frames")
            assert [m.message_type for m in v1.messages[1]] == [
                MessageType.Stream_Init,
                MessageType.Stream_Close_One_Way,
            ]
            for up in (v1, v2):
                assert {_shown(h.source) for h in up.headers} == {me}
                assert up.refused == []
            assert engine.stats.total("metaprotocol_mirror_total", status="Ok") == 1
            client.close()
        await v1.close()
        await v2.close()

    run(main())


def test_a_connection_reclaimed_for_another_client_names_that_client() -> None:
    """A budget of 2 upstream connections, three clients: the third takes the place of the
    idle connection of the first (the longest idle), and the connection it opens names it;
    every request is served, each by a connection naming its own client."""

    async def main() -> None:
        up = await ProxiedUpstream("v1", "V1").start()
        text = mesh(
            [(up.port, "v1")],
            traffic_policy=_policy("V1"),
            proxy="limits: {maxUpstreamConnections: 2}\n",
        )
        async with engine_for(text) as engine:
            clients = [await Client.connect(address(engine)) for _ in range(3)]
            for client in (*clients, clients[0]):
                reply = await client.call()
                assert error_type(reply) is None
                assert reply.attributes["pp-source"] == _me(client)
            closed = "metaprotocol_upstream_connections_closed_total"
            assert engine.stats.total(closed, reason="reclaimed") == 2
            assert len(up.headers) == 4 and len(engine.upstreams) == 2
            for client in clients:
                client.close()
        await up.close()

    run(main())


def test_a_reload_changing_the_header_rebuilds_the_cluster() -> None:
    """The header is part of what a cluster is built from: a reload keeping it keeps the
    cluster (and the client's connection); one changing only the version replaces the
    cluster, and the client's next request goes on a new connection with a header of the
    new version; one removing it makes the cluster's connections shared again."""

    async def main() -> None:
        up = await ProxiedUpstream("v1", "any").start()

        def text(policy: str) -> str:
            return mesh([(up.port, "v1")], traffic_policy=policy)

        async with engine_for(text(_policy("V1"))) as engine:
            client = await Client.connect(address(engine))
            assert error_type(await client.call()) is None
            (first,) = engine.clusters.values()
            await engine.apply(loads_config(text(_policy("V1"))))
            assert list(engine.clusters.values()) == [first]
            assert error_type(await client.call()) is None
            assert len(up.headers) == 1
            await engine.apply(loads_config(text(_policy("V2"))))
            (second,) = engine.clusters.values()
            assert second is not first and second.proxy_protocol == ProxyProtocol(2)
            reply = await client.call()
            assert error_type(reply) is None and reply.attributes["pp-source"] == _me(client)
            assert len(up.headers) == 2 and up.refused == []
            await engine.apply(loads_config(text("{}")))
            (third,) = engine.clusters.values()
            assert third.proxy_protocol is None and third.shared
            client.close()
        await up.close()

    run(main())


def _taken(reply: asyncio.Future[Metadata]) -> None:
    """Take the outcome of a request left in flight (reset when the client closes)."""
    if not reply.cancelled():
        reply.exception()


def test_a_codec_with_few_ids_is_not_capped_by_them_on_a_clients_own_connection() -> None:
    """A codec that rewrites ids but has only three: on shared connections it carries two
    requests at once (ids the engine picks); with ``proxyProtocol`` the connection is the
    client's and carries the client's ids, so all three of its requests (never answered) go
    upstream at once, none waiting for room."""

    async def main() -> None:
        up = await ProxiedUpstream("v1", "V1").start()
        text = mesh(
            [(up.port, "v1")],
            traffic_policy=_policy("V1"),
            protocol="kvf",
            codec="proxy_test_codecs:FewIdsKVCodec",
        )
        async with engine_for(text) as engine:
            client = await Client.connect(address(engine))
            for rid in (1, 2, 3):  # never answered: each holds its id
                client.start("hang", rid=rid).add_done_callback(_taken)
            await until(lambda: len(up.messages.get(0, ())) == 3, "three requests upstream")
            assert [m.request_id for m in up.messages[0]] == [1, 2, 3]
            client.close()
        await up.close()

    run(main())


# -- the header itself, read by the independent parser -----------------------------------------


@pytest.mark.parametrize(
    ("source", "dest", "v1", "kind"),
    [
        (("192.0.2.7", 51000), ("10.0.0.1", 9000), "TCP4 192.0.2.7 10.0.0.1 51000 9000", "IPv4"),
        (("2001:db8::7", 1), ("::1", 65535), "TCP6 2001:db8::7 ::1 1 65535", "IPv6"),
        (("fe80::1%lo", 2), ("fe80::2%lo", 3), "TCP6 fe80::1 fe80::2 2 3", "IPv6"),
    ],
)
def test_headers_of_both_versions_read_back_as_written(
    source: tuple[str, int], dest: tuple[str, int], v1: str, kind: str
) -> None:
    """Each family in each version reads back, with the parser, as the addresses given (an
    IPv6 zone left out: neither header has room for it)."""
    import ipaddress

    src = (ipaddress.ip_address(source[0].partition("%")[0]), source[1])
    dst = (ipaddress.ip_address(dest[0].partition("%")[0]), dest[1])
    one, two = header(1, src, dst), header(2, src, dst)
    assert one == f"PROXY {v1}\r\n".encode()
    for data, parser in ((one, ProxyProtocolV1()), (two, ProxyProtocolV2())):
        result = parser.unpack(data)
        assert type(result).__name__ == f"ProxyResult{kind}"
        assert result.source == src and result.dest == dst


def test_a_client_without_addresses_is_an_unknown_origin() -> None:
    """No addresses (a client not over TCP/IP), or addresses of two families: v1 ``PROXY
    UNKNOWN``, v2 the ``LOCAL`` command (the spec's words for a connection not proxied for
    a known client)."""
    import ipaddress

    v4 = (ipaddress.ip_address("127.0.0.1"), 1)
    v6 = (ipaddress.ip_address("::1"), 2)
    for source, dest in ((None, None), (v4, None), (v4, v6)):
        one, two = header(1, source, dest), header(2, source, dest)
        assert one == b"PROXY UNKNOWN\r\n"
        assert isinstance(ProxyProtocolV1().unpack(one), ProxyResultUnknown)
        assert isinstance(ProxyProtocolV2().unpack(two), ProxyResultLocal)


# -- the DestinationRule: where a header applies, as istiod merges it --------------------------

PORT_ENTRY = "{port: {number: 9000}, loadBalancer: {simple: RANDOM}}"


def _rule(policy: str, subset_policy: str = "") -> Any:
    text = mesh([(1, "v1")], traffic_policy=policy)
    if subset_policy:
        text = text.replace(
            "- {name: v1, labels: {version: v1}}",
            "- {name: v1, labels: {version: v1}, trafficPolicy: " + subset_policy + "}",
        )
    return loads_config(text, "test.yaml").destination_rules["svc.test"]


def test_port_settings_have_no_header_of_their_own_as_in_istio(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Istio's port settings have no ``proxyProtocol``: the rule's port settings replace its
    header with none (the port has none, logged), a subset's port settings have the rule's
    for the port (not the subset's own, logged), and a subset without port settings has its
    own over the rule's. ``proxyProtocol`` in port settings is an unknown field."""
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        rule = _rule("{proxyProtocol: {version: V2}, portLevelSettings: [" + PORT_ENTRY + "]}")
    assert rule.policy_for(9000).proxy_protocol is None
    assert "traffic to port 9000 has no proxyProtocol" in caplog.text
    caplog.clear()
    subset = "{proxyProtocol: {version: V2}, portLevelSettings: [" + PORT_ENTRY + "]}"
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        rule = _rule("{proxyProtocol: {}}", subset)
    assert rule.policy_for(9000, "v1").proxy_protocol == ProxyProtocol(1)
    assert "traffic to port 9000 has the rule's proxyProtocol" in caplog.text
    rule = _rule("{proxyProtocol: {}}", "{proxyProtocol: {version: V2}}")
    assert rule.policy_for(9000, "v1").proxy_protocol == ProxyProtocol(2)
    assert rule.policy_for(9000, "v2").proxy_protocol == ProxyProtocol(1)
    with pytest.raises(ConfigError) as caught:
        _rule("{portLevelSettings: [{port: {number: 9000}, proxyProtocol: {version: V1}}]}")
    assert caught.value.field == "spec.trafficPolicy.portLevelSettings[0].proxyProtocol"
    assert caught.value.reason.startswith("unknown field; expected one of ")
