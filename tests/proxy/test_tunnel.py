"""``DestinationRule.trafficPolicy.tunnel`` over real sockets, against a small CONNECT proxy
of the tests' own (Envoy's reading is in ``test_tunnel_envoy.py``): the request the engine
writes, requests queued while the tunnel opens, and proxies that refuse, answer garbage, an
endless head, close, or never answer; outlier detection, ``/config_dump``, reload and the
loader's checks."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from proxy_kit import (
    Client,
    Upstream,
    address,
    build_frame,
    engine_for,
    error_type,
    http_get,
    mesh,
    run,
    until,
)

from metaprotocol_sdk import ConfigError, MessageType
from metaprotocol_sdk.examples.kv import STREAM_HALF_CLOSE, STREAM_OPEN
from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.config.models import Tunnel
from metaprotocol_sdk.proxy.tunnel import (
    HEAD_LIMIT,
    ResponseHead,
    TunnelRefused,
    hand_over,
    open_tunnel,
    request_head,
)

CLUSTER = "outbound|9000||svc.test"


class ConnectProxy:
    """A CONNECT proxy: reads each connection's request head, records it, then answers as
    ``answer`` says: ``ok`` (``200``, then relays to ``target``; held until :meth:`open`
    while ``held``), ``403``, ``garbage``, ``endless`` (a head that never ends), ``close``
    or ``silent``."""

    def __init__(self, answer: str, target: int = 0) -> None:
        self.answer = answer
        self.target = target
        self.heads: list[bytes] = []
        self.held = False
        self.waiting: list[_ProxySide] = []
        self.sides: set[_ProxySide] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> ConnectProxy:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _ProxySide(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def open(self) -> None:
        """Open the tunnels held so far."""
        self.held = False
        for side in self.waiting:
            await side.relay()
        self.waiting = []

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for side in list(self.sides):
            side.abort()
        await self.server.wait_closed()


class _Relay(asyncio.Protocol):
    """The proxy's connection to the target: what comes back goes to the client side."""

    def __init__(self, side: _ProxySide) -> None:
        self.side = side

    def data_received(self, data: bytes) -> None:
        assert self.side.transport is not None
        self.side.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.side.transport is not None:
            self.side.transport.close()


class _ProxySide(asyncio.Protocol):
    """One client connection of :class:`ConnectProxy`."""

    def __init__(self, proxy: ConnectProxy) -> None:
        self.proxy = proxy
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.head_read = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.proxy.sides.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.sides.discard(self)
        if self.upstream is not None:
            self.upstream.close()

    def abort(self) -> None:
        for transport in (self.transport, self.upstream):
            if transport is not None:
                transport.abort()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.upstream is not None:
            self.upstream.write(data)
            return
        self.buffer += data
        if self.head_read or b"\r\n\r\n" not in self.buffer:
            return
        self.head_read = True
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        self.proxy.heads.append(head + b"\r\n\r\n")
        answer = self.proxy.answer
        if answer == "403":
            self.transport.write(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
        elif answer == "garbage":
            self.transport.write(b"\x16\x03\x01 not http at all\r\n\r\n")
        elif answer == "endless":
            self.transport.write(b"HTTP/1.1 200 OK\r\nx-filler: " + b"y" * (2 * HEAD_LIMIT))
        elif answer == "close":
            self.transport.close()
        elif answer == "ok":
            if self.proxy.held:
                self.proxy.waiting.append(self)
            else:
                asyncio.get_running_loop().create_task(self.relay())
        # silent: nothing

    async def relay(self) -> None:
        """Connect to the target, answer 200 and relay both ways."""
        loop = asyncio.get_running_loop()
        self.upstream, _ = await loop.create_connection(  # type: ignore[assignment]
            lambda: _Relay(self), "127.0.0.1", self.proxy.target
        )
        assert self.transport is not None and self.upstream is not None
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if self.buffer:
            self.upstream.write(self.buffer)
            self.buffer = b""


def _policy(target: int, more: str = "", host: str = "127.0.0.1") -> str:
    return "{tunnel: {targetHost: '" + host + "', targetPort: " + str(target) + "}" + more + "}"


async def _dump(engine: Engine) -> dict[str, Any]:
    assert engine.admin_address is not None
    status, body = await http_get(engine.admin_address, "/config_dump")
    assert status == 200
    return next(c for c in json.loads(body)["clusters"] if c["name"] == CLUSTER)  # type: ignore[no-any-return]


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_requests_sent_while_the_tunnel_opens_wait_and_go_through_it(loop: str) -> None:
    """The engine writes ``CONNECT host:port`` with the ``Host`` header and nothing more until
    the proxy's 2xx; the requests sent meanwhile are queued, then answered through the
    tunnel, on one connection. ``/config_dump`` shows the tunnel."""

    async def main() -> None:
        up = await Upstream("kv").start()
        proxy = await ConnectProxy("ok", up.port).start()
        proxy.held = True
        async with engine_for(mesh([(proxy.port, "v1")], traffic_policy=_policy(up.port))) as e:
            client = await Client.connect(address(e))
            calls = [asyncio.ensure_future(client.call()) for _ in range(3)]
            await until(lambda: proxy.heads, "the CONNECT request")
            authority = f"127.0.0.1:{up.port}".encode()
            assert proxy.heads == [
                b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority)
            ]
            assert not any(c.done() for c in calls) and up.accepted == 0
            await proxy.open()
            replies = await asyncio.gather(*calls)
            assert [error_type(r) for r in replies] == [None] * 3
            assert len(up.received) == 3 and up.accepted == 1 and len(proxy.heads) == 1
            dumped = await _dump(e)
            assert dumped["tunnel"] == {
                "protocol": "CONNECT",
                "targetHost": "127.0.0.1",
                "targetPort": up.port,
            }
            client.close()
        await proxy.close()
        await up.close()

    run(main(), loop=loop)


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        ("403", "tunnel: the proxy refused the tunnel: status 403 ('HTTP/1.1 403 Forbidden')"),
        ("garbage", "tunnel: the proxy's response is not HTTP/1.1"),
        ("endless", f"tunnel: the proxy's response head exceeds {HEAD_LIMIT} bytes"),
        ("close", "tunnel: the proxy closed the connection before opening the tunnel"),
        ("silent", "timed out"),
    ],
)
def test_a_proxy_that_does_not_open_the_tunnel_is_a_connect_failure(
    answer: str, words: str
) -> None:
    """Each is an ``UpstreamConnectFailure`` whose message says why (a silent proxy: within
    the cluster's connect timeout), counted as a connect error; nothing reaches the target."""

    async def main() -> None:
        up = await Upstream("kv").start()
        proxy = await ConnectProxy(answer).start()
        policy = _policy(up.port, ", connectionPool: {tcp: {connectTimeout: 300ms}}")
        async with engine_for(mesh([(proxy.port, "v1")], traffic_policy=policy)) as engine:
            client = await Client.connect(address(engine))
            reply = await client.call()
            assert error_type(reply) == "UpstreamConnectFailure", reply
            message = reply.attributes["error-message"]
            assert words in message and f"127.0.0.1:{proxy.port}" in message, message
            assert engine.stats.total("metaprotocol_upstream_connect_errors_total") == 1
            assert up.accepted == 0
            client.close()
        await proxy.close()
        await up.close()

    run(main())


def test_a_refusing_proxy_is_ejected_by_outlier_detection() -> None:
    """A refused tunnel is a connect failure for outlier detection too: the refusing
    endpoint is ejected, and requests go through the other one's tunnel."""

    async def main() -> None:
        up = await Upstream("kv").start()
        good = await ConnectProxy("ok", up.port).start()
        bad = await ConnectProxy("403").start()
        outlier = (
            ", outlierDetection: {consecutiveGatewayErrors: 1, baseEjectionTime: 30s,"
            " interval: 100ms, maxEjectionPercent: 50}, loadBalancer: {simple: ROUND_ROBIN}"
        )
        text = mesh([(bad.port, "v1"), (good.port, "v1")], traffic_policy=_policy(up.port, outlier))
        async with engine_for(text) as engine:
            client = await Client.connect(address(engine))
            results = [error_type(await client.call()) for _ in range(6)]
            assert results.count("UpstreamConnectFailure") == 1, results
            assert (await _dump(engine))["ejected"] == [f"127.0.0.1:{bad.port}"]
            assert len(bad.heads) == 1
            client.close()
        await good.close()
        await bad.close()
        await up.close()

    run(main())


def test_a_stream_opens_a_tunnel_for_its_own_connection() -> None:
    """A stream goes on a connection of its own: that connection opens its tunnel too, and
    the stream's frames reach the target through it."""

    async def main() -> None:
        up = await Upstream("kv").start()
        proxy = await ConnectProxy("ok", up.port).start()
        async with engine_for(mesh([(proxy.port, "v1")], traffic_policy=_policy(up.port))) as e:
            client = await Client.connect(address(e))
            assert error_type(await client.call()) is None
            client.send(build_frame(STREAM_OPEN, 9, {"method": "chat"}))
            client.send(build_frame(STREAM_HALF_CLOSE, 9))
            await until(lambda: len(up.received) == 3, "the stream's frames")
            assert [m.message_type for m in up.received[1:]] == [
                MessageType.Stream_Init,
                MessageType.Stream_Close_One_Way,
            ]
            assert len(proxy.heads) == 2 and up.accepted == 2
            assert len(set(proxy.heads)) == 1  # the same CONNECT
            client.close()
        await proxy.close()
        await up.close()

    run(main())


def test_a_reload_changing_the_tunnel_rebuilds_the_cluster() -> None:
    """The tunnel is part of what a cluster is built from: the same tunnel keeps the cluster;
    another target replaces it, and the next request opens a tunnel to the new target."""

    async def main() -> None:
        one = await Upstream("one").start()
        two = await Upstream("two").start()
        proxy = await ConnectProxy("ok", one.port).start()

        def text(target: int) -> str:
            return mesh([(proxy.port, "v1")], traffic_policy=_policy(target))

        async with engine_for(text(one.port)) as engine:
            client = await Client.connect(address(engine))
            assert (await client.call()).attributes["server"] == "one"
            (first,) = engine.clusters.values()
            await engine.apply(loads_config(text(one.port)))
            assert list(engine.clusters.values()) == [first]
            proxy.target = two.port
            await engine.apply(loads_config(text(two.port)))
            (second,) = engine.clusters.values()
            assert second is not first and second.tunnel == Tunnel("127.0.0.1", two.port)
            assert (await client.call()).attributes["server"] == "two"
            assert proxy.heads[-1].startswith(b"CONNECT 127.0.0.1:%d " % two.port)
            client.close()
        await proxy.close()
        await one.close()
        await two.close()

    run(main())


# -- the response head, sans-IO --------------------------------------------------------------


def test_the_head_may_come_in_pieces_and_the_bytes_after_it_are_the_tunnels() -> None:
    head = ResponseHead()
    data = b"HTTP/1.1 200 OK\r\nVia: x\r\n\r\nfirst bytes"
    for i in range(len(b"HTTP/1.1 200 OK\r\nVia: x\r\n\r")):
        assert head.feed(data[i : i + 1]) is None
    assert head.feed(data[len(b"HTTP/1.1 200 OK\r\nVia: x\r\n\r") :]) == b"first bytes"
    assert ResponseHead().feed(b"HTTP/1.0 204 No Content\r\n\r\n") == b""


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", "status 407"),
        (b"HTTP/1.1 101 Switching\r\n\r\n", "status 101"),
        (b"HTTP/2 200\r\n\r\n", "not HTTP/1.1"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "not HTTP/1.1"),
        (b"HTTP/1.1\r\n\r\n", "not HTTP/1.1"),
        (b"HTTP/1.1 200 OK\r\n" + b"a" * 100 + b"\r\n\r\n", "exceeds 64 bytes"),
    ],
)
def test_a_refused_or_malformed_head_says_why(data: bytes, words: str) -> None:
    with pytest.raises(TunnelRefused) as caught:
        ResponseHead(limit=64).feed(data)
    assert words in str(caught.value)


def test_an_ipv6_target_is_bracketed() -> None:
    assert (
        request_head(Tunnel("::1", 9000))
        == b"CONNECT [::1]:9000 HTTP/1.1\r\nHost: [::1]:9000\r\n\r\n"
    )


# -- the loader ------------------------------------------------------------------------------

PORT_ENTRY = "{port: {number: 9000}, loadBalancer: {simple: RANDOM}}"
TUNNEL = "tunnel: {targetHost: kv.example, targetPort: 9000}"


def _rule(policy: str, subset_policy: str = "") -> Any:
    text = mesh([(1, "v1")], traffic_policy=policy)
    if subset_policy:
        text = text.replace(
            "- {name: v1, labels: {version: v1}}",
            "- {name: v1, labels: {version: v1}, trafficPolicy: " + subset_policy + "}",
        )
    return loads_config(text, "test.yaml").destination_rules["svc.test"]


def test_port_settings_have_no_tunnel_of_their_own_as_in_istio(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Istio's port settings have no ``tunnel`` (its ``shadowCopyPortTrafficPolicy``): the
    rule's port settings have none (logged), a subset's have the rule's (logged), a subset
    without port settings its own over the rule's. ``tunnel`` in port settings is unknown."""
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        rule = _rule("{" + TUNNEL + ", portLevelSettings: [" + PORT_ENTRY + "]}")
    assert rule.policy_for(9000).tunnel is None
    assert "traffic to port 9000 has no tunnel" in caplog.text
    caplog.clear()
    other = "tunnel: {targetHost: other.example, targetPort: 1}"
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        rule = _rule("{" + TUNNEL + "}", "{" + other + ", portLevelSettings: [" + PORT_ENTRY + "]}")
    assert rule.policy_for(9000, "v1").tunnel == Tunnel("kv.example", 9000)
    assert "traffic to port 9000 has the rule's tunnel" in caplog.text
    rule = _rule("{" + TUNNEL + "}", "{" + other + "}")
    assert rule.policy_for(9000, "v1").tunnel == Tunnel("other.example", 1)
    assert rule.policy_for(9000, "v2").tunnel == Tunnel("kv.example", 9000)
    with pytest.raises(ConfigError) as caught:
        _rule("{portLevelSettings: [{port: {number: 9000}, " + TUNNEL + "}]}")
    assert caught.value.field == "spec.trafficPolicy.portLevelSettings[0].tunnel"
    assert caught.value.reason.startswith("unknown field; expected one of ")


@pytest.mark.parametrize(
    ("policy", "subset", "field"),
    [
        ("{" + TUNNEL + ", proxyProtocol: {}}", "", "spec.trafficPolicy.tunnel"),
        ("{proxyProtocol: {}}", "{" + TUNNEL + "}", "spec.subsets[0].trafficPolicy.tunnel"),
        ("{" + TUNNEL + "}", "{proxyProtocol: {}}", "spec.subsets[0].trafficPolicy.tunnel"),
    ],
)
def test_a_tunnel_with_a_proxy_protocol_header_is_refused(
    policy: str, subset: str, field: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _rule(policy, subset)
    assert caught.value.field == field
    assert "tunnel and proxyProtocol cannot be combined" in caught.value.reason


# -- the hand-over, over real sockets ------------------------------------------------------


class _Collecting(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""

    def data_received(self, data: bytes) -> None:
        self.data += data


class _CollectingBuffered(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.data = b""
        self.buffer = bytearray(3)  # smaller than what comes: taken in pieces

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data += bytes(self.buffer[:nbytes])


@pytest.mark.parametrize("kind", [_Collecting, _CollectingBuffered])
def test_bytes_after_the_head_and_after_the_hand_over_reach_the_protocol(kind: type) -> None:
    """A proxy that sends the target's first bytes with its 200: the connection's protocol
    gets them first, then what follows, whatever kind of protocol it is."""

    async def main() -> None:
        sent: list[asyncio.StreamWriter] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\n\r\nfirst bytes")
            sent.append(writer)

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        raw, rest = await open_tunnel(loop, "127.0.0.1", port, Tunnel("t.example", 1))
        protocol = kind()
        hand_over(raw, protocol, rest)
        await until(lambda: sent, "the proxy's answer")
        sent[0].write(b", then more")
        await until(lambda: protocol.data == b"first bytes, then more", "the bytes")
        raw.close()
        sent[0].close()
        server.close()
        await server.wait_closed()

    run(main())
