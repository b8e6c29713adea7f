"""Thrift end to end: thriftpy2 and Apache Thrift (framed binary and THeader) clients and
servers, through the engine on 127.0.0.1."""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import pytest

from metaprotocol_sdk.demo.idl import hello, untyped
from metaprotocol_sdk.demo.thrift_server import HelloServer

MAIN, HDR, HASH, ERR, DEAD, KILL = (
    ("hello.thrift.e2e", 9090),
    ("header.thrift.e2e", 9091),
    ("hash.thrift.e2e", 9092),
    ("errors.thrift.e2e", 9093),
    ("dead.thrift.e2e", 9094),
    ("kill.thrift.e2e", 9095),
)


def dest(svc: tuple[str, int], subset: str | None = None, weight: int | None = None) -> str:
    sub = f", subset: {subset}" if subset else ""
    line = f"\n        - destination: {{host: {svc[0]}, port: {{number: {svc[1]}}}{sub}}}"
    return line + (f"\n          weight: {weight}" if weight is not None else "")


def route(name: str, dests: str, *, method: str | None = None, extra: str = "") -> str:
    match = ""
    if method:
        match = f"\n      match: {{attributes: {{method: {{exact: {method}}}}}}}"
    return f"\n    - name: {name}{match}{extra}\n      route:{dests}"


def router(name: str, svc: tuple[str, int], routes: str) -> str:
    return f"""
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata: {{name: {name}}}
spec:
  hosts: [{svc[0]}]
  routes:{routes}
---"""


class Peers:
    """The module's servers and the engine in front of them."""

    def __init__(self, harness: ModuleType, apache: ModuleType, start_engine: Any) -> None:
        self.v1, self.v2 = HelloServer("v1").start(), HelloServer("v2").start()
        self.victim = HelloServer("victim").start()
        self.h1 = harness.ApacheHeaderServer(apache, "v1")
        self.h2 = harness.ApacheHeaderServer(apache, "v2")
        self.apache = apache
        svc, main_eps = harness.service_yaml, {"v1": self.v1.port, "v2": self.v2.port}
        hdr_eps = {"v1": self.h1.port, "v2": self.h2.port}
        yaml = "".join(
            [
                harness.application_protocol_yaml("thrift"),
                svc("main", "thrift", *MAIN, main_eps),
                svc("hdr", "thrift", *HDR, hdr_eps),
                svc("hash", "thrift", *HASH, hdr_eps, hash_header="x-user"),
                svc("err", "thrift", *ERR, {"v1": self.v1.port}, subsets=("v1", "v9")),
                svc("dead", "thrift", *DEAD, {"v1": harness.closed_port()}),
                svc("kill", "thrift", *KILL, {"v1": self.victim.port}),
                router(
                    "main",
                    MAIN,
                    route("sayhello", dest(MAIN, "v2"), method="sayHello")
                    + route(
                        "tagged",
                        dest(MAIN, "v1"),
                        method="fail",
                        extra="\n      responseMutation: [{key: x-proxied-by, value: sdk}]",
                    )
                    + route("split", dest(MAIN, "v1", 20) + dest(MAIN, "v2", 80)),
                ),
                router(
                    "hdr",
                    HDR,
                    route(
                        "canary",
                        dest(HDR, "v1"),
                        extra="\n      match: {attributes: {x-canary: {exact: 'yes'}}}",
                    )
                    + route(
                        "mutate",
                        dest(HDR, "v2"),
                        method="headers",
                        extra="\n      requestMutation: [{key: x-mesh, value: metaprotocol}]"
                        "\n      responseMutation: [{key: x-proxied-by, value: metaprotocol-sdk}]",
                    )
                    + route("default", dest(HDR, "v2")),
                ),
                router("hash", HASH, route("all", dest(HASH))),
                router(
                    "err",
                    ERR,
                    route("ok", dest(ERR, "v1"), method="sayHello")
                    + route("empty-subset", dest(ERR, "v9"), method="ping")
                    + route("refused", dest(DEAD), method="notified")
                    + route(
                        "slow", dest(ERR, "v1"), method="sleep", extra="\n      timeout: 300ms"
                    ),
                ),
                router("kill", KILL, route("all", dest(KILL))),
                harness.proxy_yaml([MAIN, HDR, HASH, ERR, KILL]),
            ]
        )
        self.engine = start_engine(yaml)

    def client(self, svc: tuple[str, int]) -> Any:
        """A thriftpy2 client (framed, strict binary) to the engine's listener for ``svc``."""
        return untyped("thriftpy2.rpc").make_client(
            hello().Hello,
            "127.0.0.1",
            self.engine.port(*svc),
            trans_factory=untyped("thriftpy2.transport").TFramedTransportFactory(),
            timeout=5000,
        )

    def header_client(self, svc: tuple[str, int]) -> tuple[Any, Any]:
        """An Apache Thrift THeader client and its transport (for info headers)."""
        from thrift.protocol.THeaderProtocol import THeaderProtocol
        from thrift.transport.THeaderTransport import THeaderClientType
        from thrift.transport.TSocket import TSocket

        sock = TSocket("127.0.0.1", self.engine.port(*svc))
        sock.setTimeout(5000)
        proto = THeaderProtocol(sock, allowed_client_types=(THeaderClientType.HEADERS,))
        proto.trans.open()
        return self.apache.Client(proto), proto.trans

    def close(self) -> None:
        for server in (self.v1, self.v2, self.victim, self.h1, self.h2):
            server.close()


@pytest.fixture(scope="module")
def peers(harness: ModuleType, apache_hello: ModuleType, start_engine: Any) -> Iterator[Peers]:
    p = Peers(harness, apache_hello, start_engine)
    yield p
    p.close()


def versions(replies: list[str]) -> Counter[str]:
    return Counter(r.split(":", 1)[0] for r in replies)


def within(observed: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(observed / n - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 0.5 / n


def test_route_by_method(peers: Peers) -> None:
    client = peers.client(MAIN)
    try:
        assert versions([client.sayHello(f"n{i}") for i in range(30)]) == {"v2": 30}
    finally:
        client.close()


def test_weighted_split_within_bound(peers: Peers) -> None:
    client = peers.client(MAIN)
    try:
        seen = versions([client.ping() for _ in range(400)])
    finally:
        client.close()
    assert set(seen) <= {"v1", "v2"}
    assert within(seen["v1"], 400, 0.2), seen


def test_apache_binary_client(peers: Peers) -> None:
    """Apache Thrift's C-accelerated binary protocol over the framed transport."""
    from thrift.protocol.TBinaryProtocol import TBinaryProtocolAccelerated
    from thrift.transport.TSocket import TSocket
    from thrift.transport.TTransport import TFramedTransport

    trans = TFramedTransport(TSocket("127.0.0.1", peers.engine.port(*MAIN)))
    client = peers.apache.Client(TBinaryProtocolAccelerated(trans))
    trans.open()
    try:
        assert client.sayHello("apache") == "v2: hello apache"
    finally:
        trans.close()


def test_route_by_theader_header(peers: Peers) -> None:
    client, trans = peers.header_client(HDR)
    try:
        for _ in range(10):
            trans.set_header(b"x-canary", b"yes")
            assert client.ping() == "v1: pong"
        assert client.ping() == "v2: pong"  # headers are per request
    finally:
        trans.close()


def test_request_and_response_mutation(peers: Peers) -> None:
    client, trans = peers.header_client(HDR)
    try:
        trans.set_header(b"x-client", b"e2e")
        seen = json.loads(client.headers())
        response_headers = dict(trans.get_headers())
    finally:
        trans.close()
    assert seen["version"] == "v2"
    assert seen["x-mesh"] == "metaprotocol"  # written by the engine into the request
    assert seen["x-client"] == "e2e"  # and the client's own header kept
    assert response_headers[b"x-proxied-by"] == b"metaprotocol-sdk"


def test_framed_reply_survives_a_response_mutation(peers: Peers) -> None:
    """A framed binary reply has no room for the route's response mutation: the server's
    declared exception reaches the client unchanged (not a local BadResponse after the server
    ran the call) and the skip is counted; stats record what the client saw."""
    engine = peers.engine
    skipped = engine.stat("metaprotocol_mutations_skipped_total")
    bad = engine.stat('metaprotocol_local_replies_total{listener="hello.thrift.e2e:9090",type="B')
    client = peers.client(MAIN)
    try:
        with pytest.raises(hello().HelloError) as raised:
            client.fail("boom from thrift")
    finally:
        client.close()
    assert "boom from thrift" in str(raised.value)
    assert engine.stat("metaprotocol_mutations_skipped_total") == skipped + 1
    assert (
        engine.stat('metaprotocol_local_replies_total{listener="hello.thrift.e2e:9090",type="B')
        == bad
    )


def test_consistent_hash_is_sticky(peers: Peers) -> None:
    client, trans = peers.header_client(HASH)
    chosen: dict[str, set[str]] = {}
    try:
        for user in (f"user-{i}" for i in range(12)):
            for _ in range(8):
                trans.set_header(b"x-user", user.encode())
                chosen.setdefault(user, set()).add(client.ping().split(":")[0])
    finally:
        trans.close()
    assert all(len(v) == 1 for v in chosen.values()), chosen
    assert {v for vs in chosen.values() for v in vs} == {"v1", "v2"}  # users are spread


def test_oneway_is_delivered(peers: Peers) -> None:
    client = peers.client(MAIN)
    before = len(peers.v1.handler.events) + len(peers.v2.handler.events)
    try:
        for i in range(10):
            client.notify(f"event-{i}")
        client.ping()  # the connection still works after oneways
    finally:
        client.close()
    deadline = time.monotonic() + 5
    while len(peers.v1.handler.events) + len(peers.v2.handler.events) < before + 10:
        assert time.monotonic() < deadline, "oneway requests were not delivered"
        time.sleep(0.01)


@pytest.mark.parametrize(
    ("call", "error_type"),
    [
        (lambda c: c.headers(), "RouteNotFound"),
        (lambda c: c.ping(), "NoHealthyUpstream"),
        (lambda c: c.notified(), "UpstreamConnectFailure"),
        (lambda c: c.sleep(1000), "Timeout"),
    ],
    ids=["no-route", "no-healthy-upstream", "connect-failure", "timeout"],
)
def test_local_replies_are_application_exceptions(peers: Peers, call: Any, error_type: str) -> None:
    exc_type = untyped("thriftpy2.thrift").TApplicationException
    client = peers.client(ERR)
    try:
        started = time.monotonic()
        with pytest.raises(exc_type) as info:
            call(client)
        assert time.monotonic() - started < 2.5
        assert error_type in str(info.value.message)
        assert client.sayHello("after") == "v1: hello after"  # the connection survives
    finally:
        client.close()


def test_upstream_killed_mid_request(peers: Peers) -> None:
    exc_type = untyped("thriftpy2.thrift").TApplicationException
    client = peers.client(KILL)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            client.sleep(4000)
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    assert peers.victim.handler.sleeping.wait(5)
    peers.victim.close()  # drops the engine's upstream connection with the request in flight
    caller.join(timeout=3)
    client.close()
    assert not caller.is_alive(), "the client hung after its upstream died"
    assert len(outcome) == 1 and isinstance(outcome[0], exc_type), outcome
    assert "Upstream" in str(outcome[0].message) or "upstream" in str(outcome[0].message)


def test_many_concurrent_clients_no_crossed_responses(peers: Peers) -> None:
    def worker(n: int) -> list[str]:
        client = peers.client(MAIN)
        try:
            return [client.sayHello(f"c{n}-{i}") for i in range(25)]
        finally:
            client.close()

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(worker, range(32)))
    for n, replies in enumerate(results):
        assert replies == [f"v2: hello c{n}-{i}" for i in range(25)]


def test_no_leaked_connections_after_close(peers: Peers) -> None:
    clients = [peers.client(MAIN) for _ in range(8)]
    for client in clients:
        client.ping()
    engine = peers.engine
    assert engine.stat("metaprotocol_downstream_connections_active") >= 8
    for client in clients:
        client.close()
    engine.wait_for(lambda: engine.stat("metaprotocol_downstream_connections_active") == 0)


def test_engine_stops_without_leftover_tasks(harness: ModuleType, apache_hello: ModuleType) -> None:
    """A separate engine with live client and upstream connections stops cleanly."""
    server = HelloServer("solo").start()
    yaml = "".join(
        [
            harness.application_protocol_yaml("thrift"),
            harness.service_yaml("solo", "thrift", *MAIN, {"v1": server.port}),
            router("solo", MAIN, route("all", dest(MAIN))),
            harness.proxy_yaml([MAIN]),
        ]
    )
    engine = harness.RunningEngine(yaml)
    client = untyped("thriftpy2.rpc").make_client(
        hello().Hello,
        "127.0.0.1",
        engine.port(*MAIN),
        trans_factory=untyped("thriftpy2.transport").TFramedTransportFactory(),
        timeout=3000,
    )
    try:
        assert client.ping() == "solo: pong"
        left = engine.close()
        assert left == []
        # The engine closed the downstream connection: the next call fails, it does not hang.
        with pytest.raises(untyped("thriftpy2.transport").TTransportException):
            client.ping()
    finally:
        client.close()
        server.close()


@pytest.mark.parametrize("transport", ["framed", "buffered"])
def test_compact_protocol_and_unframed_transport(harness: ModuleType, transport: str) -> None:
    """thriftpy2's compact protocol, framed and unframed, through a separate engine."""
    server = HelloServer("compact", transport=transport, protocol="compact").start()
    yaml = "".join(
        [
            harness.application_protocol_yaml("thrift"),
            harness.service_yaml("compact", "thrift", *MAIN, {"v1": server.port}),
            router("compact", MAIN, route("all", dest(MAIN))),
            harness.proxy_yaml([MAIN]),
        ]
    )
    engine = harness.RunningEngine(yaml)
    tt, tp = untyped("thriftpy2.transport"), untyped("thriftpy2.protocol")
    factory = (
        tt.TFramedTransportFactory() if transport == "framed" else tt.TBufferedTransportFactory()
    )
    client = untyped("thriftpy2.rpc").make_client(
        hello().Hello,
        "127.0.0.1",
        engine.port(*MAIN),
        proto_factory=tp.TCompactProtocolFactory(),
        trans_factory=factory,
        timeout=3000,
    )
    try:
        assert [client.sayHello(f"k{i}") for i in range(5)] == [
            f"compact: hello k{i}" for i in range(5)
        ]
    finally:
        client.close()
        assert engine.close() == []
        server.close()


def test_local_reply_to_a_theader_client(peers: Peers) -> None:
    """Apache Thrift's THeader client gets the engine's reply in THeader framing."""
    from thrift.Thrift import TApplicationException

    client, trans = peers.header_client(ERR)
    try:
        for _ in range(2):  # the connection survives a local reply
            with pytest.raises(TApplicationException) as info:
                client.headers()  # no route on this listener
            assert "RouteNotFound" in str(info.value.message)
    finally:
        trans.close()
