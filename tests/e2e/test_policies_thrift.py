"""Traffic policies end to end with Thrift peers: thriftpy2 and Apache Thrift (THeader)
clients and servers through the engine on 127.0.0.1 (fault injection, mirroring, local rate
limit, retries, outlier detection)."""

from __future__ import annotations

import contextlib
import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import pytest

from metaprotocol_sdk.demo.idl import hello, untyped
from metaprotocol_sdk.demo.thrift_server import HelloServer

FAULT, MIRROR, DEADM, RATE, REFILL, RETRY, OUTLIER, RESET, HANG, SLOW = (
    ("fault.thrift.pol", 9190),
    ("mirror.thrift.pol", 9191),
    ("deadmirror.thrift.pol", 9192),
    ("rate.thrift.pol", 9193),
    ("refill.thrift.pol", 9194),
    ("retry.thrift.pol", 9195),
    ("outlier.thrift.pol", 9196),
    ("reset.thrift.pol", 9197),
    ("hang.thrift.pol", 9198),
    ("slow.thrift.pol", 9199),
)
DELAY = 0.3  # the fault's fixedDelay, seconds
#: The event loop's clock: uvloop's (libuv's) is in milliseconds and read once per loop turn,
#: so a timer may end up to a few milliseconds before the client's own clock says (Envoy's
#: timers are alike); the delay is held, not shortened by more than that.
TIMER_SLACK = 0.005
TApplicationException = untyped("thriftpy2.thrift").TApplicationException


def dest(svc: tuple[str, int], subset: str | None = None) -> str:
    sub = f", subset: {subset}" if subset else ""
    return f"\n        - destination: {{host: {svc[0]}, port: {{number: {svc[1]}}}{sub}}}"


def route(name: str, dests: str, *, method: str | None = None, extra: str = "") -> str:
    match = f"\n      match: {{attributes: {{method: {{exact: {method}}}}}}}" if method else ""
    return f"\n    - name: {name}{match}{extra}\n      route:{dests}"


def router(name: str, svc: tuple[str, int], routes: str, spec: str = "") -> str:
    return f"""
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata: {{name: {name}}}
spec:
  hosts: [{svc[0]}]{spec}
  routes:{routes}
---"""


def broken_ping() -> str:
    """A ``ping`` that fails: the server answers a Thrift exception (an Error status)."""
    raise TApplicationException(TApplicationException.INTERNAL_ERROR, "broken on purpose")


class BlackHole:
    """A server on 127.0.0.1 that reads everything and never answers (a hung mirror)."""

    def __init__(self) -> None:
        self.received = bytearray()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def data(self) -> bytes:
        with self._lock:
            return bytes(self.received)

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self._listener.accept()
                self._conns.append(conn)
                threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := conn.recv(65536):
                with self._lock:
                    self.received += data

    def close(self) -> None:
        self._listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class Peers:
    """The module's servers and the engine in front of them."""

    def __init__(self, harness: ModuleType, apache: ModuleType, start_engine: Any) -> None:
        self.harness = harness
        self.apache = apache
        self.v1 = HelloServer("v1").start()
        self.primary = harness.ApacheHeaderServer(apache, "primary")
        self.mirror = harness.ApacheHeaderServer(apache, "mirror")
        self.a, self.b = HelloServer("a").start(), HelloServer("b").start()
        self.good, self.flaky = HelloServer("good").start(), HelloServer("flaky").start()
        self.x, self.y = HelloServer("x").start(), HelloServer("y").start()
        self.hole = BlackHole()
        self.slow, self.fast = HelloServer("slow").start(), HelloServer("fast").start()
        svc = harness.service_yaml
        one = {"v1": self.v1.port}
        outlier = (
            "{outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 1s, interval: 250ms,"
            " maxEjectionPercent: 100}}"
        )
        yaml = "".join(
            [
                harness.application_protocol_yaml("thrift"),
                svc("fault", "thrift", *FAULT, one),
                svc("mirror", "thrift", *MIRROR, {"v1": self.primary.port, "v2": self.mirror.port}),
                svc("deadm", "thrift", *DEADM, {"v1": harness.closed_port()}),
                svc("hang", "thrift", *HANG, {"v1": self.hole.port}),
                svc("rate", "thrift", *RATE, one),
                svc("refill", "thrift", *REFILL, one),
                svc("retry", "thrift", *RETRY, {"a": self.a.port, "b": self.b.port}),
                svc(
                    "outlier",
                    "thrift",
                    *OUTLIER,
                    {"good": self.good.port, "flaky": self.flaky.port},
                    traffic_policy=outlier,
                ),
                router(
                    "fault",
                    FAULT,
                    route(
                        "abort",
                        dest(FAULT),
                        method="sayHello",
                        extra="\n      fault: {abort: {errorType: OverLimit}}",
                    )
                    + route(
                        "delay",
                        dest(FAULT),
                        method="ping",
                        extra=f"\n      fault: {{delay: {{fixedDelay: {int(DELAY * 1000)}ms}}}}",
                    )
                    + route(
                        "sampled-abort",
                        dest(FAULT),
                        method="notified",
                        extra="\n      fault:"
                        "\n        abort: {percentage: {value: 30}, errorType: Unspecified}",
                    )
                    + route("rest", dest(FAULT)),
                ),
                router(
                    "mirror",
                    MIRROR,
                    route(
                        "to-hanging-mirror",
                        dest(MIRROR, "v1"),
                        extra="\n      match: {attributes: {x-mirror: {exact: hang}}}"
                        f"\n      mirror: {{host: {HANG[0]}, port: {{number: {HANG[1]}}}}}",
                    )
                    + route(
                        "to-dead-mirror",
                        dest(MIRROR, "v1"),
                        method="ping",
                        extra=f"\n      mirror: {{host: {DEADM[0]}, port: {{number: {DEADM[1]}}}}}",
                    )
                    + route(
                        "sampled-mirror",
                        dest(MIRROR, "v1"),
                        method="headers",
                        extra=f"\n      mirror: {{host: {MIRROR[0]}, subset: v2,"
                        f" port: {{number: {MIRROR[1]}}}}}"
                        "\n      mirrorPercentage: {value: 25}",
                    )
                    + route(
                        "mirrored",
                        dest(MIRROR, "v1"),
                        extra="\n      requestMutation: [{key: x-mesh, value: metaprotocol}]"
                        f"\n      mirror: {{host: {MIRROR[0]}, subset: v2,"
                        f" port: {{number: {MIRROR[1]}}}}}",
                    ),
                ),
                router(
                    "rate",
                    RATE,
                    route("all", dest(RATE)),
                    spec="\n  localRateLimit:"
                    "\n    tokenBucket: {maxTokens: 5, tokensPerFill: 5, fillInterval: 1h}"
                    "\n    conditions:"
                    "\n      - match: {attributes: {method: {exact: sayHello}}}"
                    "\n        tokenBucket: {maxTokens: 3, tokensPerFill: 3, fillInterval: 1h}",
                ),
                router(
                    "refill",
                    REFILL,
                    route("all", dest(REFILL)),
                    spec="\n  localRateLimit:"
                    "\n    tokenBucket: {maxTokens: 1, tokensPerFill: 1, fillInterval: 100ms}",
                ),
                router(
                    "retry",
                    RETRY,
                    route(
                        "all",
                        dest(RETRY),
                        extra="\n      retries: {attempts: 2, retryOn: 'connect-failure,reset'}",
                    ),
                ),
                router("outlier", OUTLIER, route("all", dest(OUTLIER))),
                svc("reset", "thrift", *RESET, {"x": self.x.port, "y": self.y.port}),
                router(
                    "reset",
                    RESET,
                    route(
                        "all", dest(RESET), extra="\n      retries: {attempts: 1, retryOn: reset}"
                    ),
                ),
                svc("slow", "thrift", *SLOW, {"s": self.slow.port, "f": self.fast.port}),
                router(
                    "slow",
                    SLOW,
                    route(
                        "all",
                        dest(SLOW),
                        extra="\n      retries:"
                        "\n        {attempts: 1, perTryTimeout: 300ms, retryOn: timeout}",
                    ),
                ),
                harness.proxy_yaml([FAULT, MIRROR, RATE, REFILL, RETRY, OUTLIER, RESET, SLOW]),
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
        servers = (self.v1, self.primary, self.mirror, self.a, self.b, self.good, self.flaky)
        for server in (*servers, self.x, self.y, self.hole, self.slow, self.fast):
            server.close()


@pytest.fixture(scope="module")
def peers(harness: ModuleType, apache_hello: ModuleType, start_engine: Any) -> Iterator[Peers]:
    p = Peers(harness, apache_hello, start_engine)
    yield p
    p.close()


def outcome(call: Any) -> str:
    """The reply's version tag, or ``"error: <message>"`` for an application exception."""
    try:
        return str(call()).split(":", 1)[0]
    except TApplicationException as exc:
        return f"error: {exc.message}"


def test_fault_abort_is_an_application_exception(peers: Peers) -> None:
    client = peers.client(FAULT)
    try:
        for _ in range(3):  # every request of the route, and the connection survives
            with pytest.raises(TApplicationException) as info:
                client.sayHello("x")
            assert "OverLimit" in info.value.message
            assert "fault injected" in info.value.message
        assert client.headers() == "{}"  # another route of the listener is served
    finally:
        client.close()
    assert peers.v1.handler.requests == 1  # the aborted requests never reached the server
    assert peers.engine.stat('metaprotocol_faults_total{listener="fault.thrift.pol:9190"') == 3


def test_fault_delay_holds_each_call(peers: Peers) -> None:
    client = peers.client(FAULT)
    try:
        for _ in range(3):
            started = time.monotonic()
            assert client.ping() == "v1: pong"
            assert time.monotonic() - started >= DELAY - TIMER_SLACK
    finally:
        client.close()


def test_fault_delays_do_not_hold_each_other(peers: Peers) -> None:
    """16 clients call the delayed route at once: the holds overlap (the engine's loop is not
    blocked), so the calls end together well before 16 delays back to back would."""
    clients = [peers.client(FAULT) for _ in range(16)]  # connected before the clock starts
    start = threading.Barrier(16)

    def one(client: Any) -> tuple[float, float]:
        start.wait(10)
        began = time.monotonic()
        assert client.ping() == "v1: pong"
        return began, time.monotonic()

    try:
        with ThreadPoolExecutor(16) as pool:
            spans = list(pool.map(one, clients))
    finally:
        for client in clients:
            client.close()
    assert min(end - began for began, end in spans) >= DELAY - TIMER_SLACK
    wall = max(end for _, end in spans) - min(began for began, _ in spans)
    assert wall < 16 * DELAY / 2, wall  # serialised holds would take >= 4.8 s


def test_mirror_receives_copies_with_the_mutation(peers: Peers) -> None:
    engine = peers.engine
    before, primary_before = len(peers.mirror.seen), len(peers.primary.seen)
    client, trans = peers.header_client(MIRROR)
    try:
        replies = []
        for i in range(20):
            trans.set_header(b"x-client", b"e2e")
            replies.append(client.sayHello(f"m{i}"))
    finally:
        trans.close()
    assert replies == [f"primary: hello m{i}" for i in range(20)]  # only the primary's replies
    engine.wait_for(lambda: len(peers.mirror.seen) >= before + 20)
    copies = peers.mirror.seen[before:]
    assert len(copies) == 20
    assert all(h.get("x-mesh") == "metaprotocol" and h.get("x-client") == "e2e" for h in copies)
    assert all(h.get("x-mesh") == "metaprotocol" for h in peers.primary.seen[primary_before:])
    ok = 'metaprotocol_mirror_total{listener="mirror.thrift.pol:9191",route="mirrored"'
    engine.wait_for(lambda: engine.stat(ok) == 20)


def test_dead_mirror_changes_nothing_for_the_client(peers: Peers) -> None:
    engine = peers.engine
    attempts = 'metaprotocol_mirror_total{listener="mirror.thrift.pol:9191",route="to-dead-mirror"'
    client, trans = peers.header_client(MIRROR)
    try:
        for _ in range(10):
            started = time.monotonic()
            assert client.ping() == "primary: pong"
            assert time.monotonic() - started < 2.5  # generous: a call takes milliseconds
    finally:
        trans.close()
    engine.wait_for(lambda: engine.stat(attempts) == 10)  # the copies were tried, and failed
    snapshot = engine.loop_call(engine.engine.stats_snapshot)
    statuses = {k.rsplit("status=", 1)[1] for k in snapshot if k.startswith(attempts)}
    assert statuses <= {'"UpstreamConnectFailure"}', '"Dropped"}'}, statuses


def within(observed: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(observed / n - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 0.5 / n


def test_fault_abort_percentage_within_bound(peers: Peers) -> None:
    client = peers.client(FAULT)
    try:
        seen = [outcome(client.notified) for _ in range(400)]
    finally:
        client.close()
    aborted = sum(s.startswith("error: Unspecified") for s in seen)
    assert aborted + seen.count("0") == 400, set(seen)  # others reach the server (0 events)
    assert within(aborted, 400, 0.3), aborted


def test_mirror_percentage_within_bound(peers: Peers) -> None:
    engine = peers.engine
    sampled = 'metaprotocol_mirror_total{listener="mirror.thrift.pol:9191",route="sampled-mirror"'
    before = len(peers.mirror.seen)
    client, trans = peers.header_client(MIRROR)
    try:
        replies = [json.loads(client.headers())["version"] for _ in range(400)]
    finally:
        trans.close()
    assert replies == ["primary"] * 400
    # Every copy sent is counted once its reply is in: wait until no copy is in flight (those
    # of another test, on the hung mirror, end within the 5 s route timeout). Equal counts
    # alone could be seen while the last copies were still on their way.
    sink = engine.engine.mirror_sink
    engine.wait_for(lambda: engine.loop_call(lambda: sink.inflight) == 0, timeout=10)
    copies = engine.stat(sampled)
    assert len(peers.mirror.seen) - before == copies  # each copy served, and counted once
    assert within(copies, 400, 0.25), copies


def test_hung_mirror_changes_nothing_for_the_client(peers: Peers) -> None:
    """The mirror reads the copies and never answers (its copies wait out the 5 s route
    timeout): each client call still takes only its primary's time."""
    client, trans = peers.header_client(MIRROR)
    try:
        for _ in range(10):
            trans.set_header(b"x-mirror", b"hang")
            started = time.monotonic()
            assert client.ping() == "primary: pong"
            assert time.monotonic() - started < 2.5  # far below the route timeout
    finally:
        trans.close()
    peers.engine.wait_for(lambda: peers.hole.data().count(b"ping") == 10)  # copies arrived


def test_local_rate_limit_lets_exactly_max_tokens_through(peers: Peers) -> None:
    client = peers.client(RATE)
    try:
        pings = [outcome(client.ping) for _ in range(12)]
        hellos = [outcome(lambda: client.sayHello("x")) for _ in range(8)]
    finally:
        client.close()
    limited = "error: OverLimit"
    assert [p for p in pings if not p.startswith(limited)] == ["v1"] * 5, pings
    assert [h for h in hellos if not h.startswith(limited)] == ["v1"] * 3, hellos
    assert len(pings) == 12 and len(hellos) == 8


def test_local_rate_limit_refill_rate(peers: Peers) -> None:
    """One token per 100 ms: over about a second of back-to-back calls, the calls let through
    stay within the bucket's bound (at most 1 + elapsed/0.1) and near it."""
    client = peers.client(REFILL)
    allowed = 0
    try:
        started = time.monotonic()
        while time.monotonic() - started < 1.0:
            allowed += outcome(client.ping) == "v1"
        elapsed = time.monotonic() - started
    finally:
        client.close()
    assert allowed <= 1 + elapsed / 0.1 + 1
    assert allowed >= 0.5 * elapsed / 0.1


def test_retry_lands_on_the_healthy_endpoint(peers: Peers) -> None:
    client = peers.client(RETRY)
    try:
        assert {client.ping().split(":")[0] for _ in range(6)} == {"a", "b"}  # both in use
        peers.a.close()  # kills endpoint a: its connection resets, new ones are refused
        replies = [client.ping() for _ in range(20)]
    finally:
        client.close()
    assert replies == ["b: pong"] * 20
    assert peers.engine.stat('metaprotocol_retries_total{listener="retry.thrift.pol:9195"') >= 1


def test_retry_after_reset_of_a_request_in_flight(peers: Peers) -> None:
    """The server holding the request dies: the engine retries it (retryOn reset) on the
    other endpoint, and the client gets that endpoint's reply, not an error."""
    client = peers.client(RESET)
    peers.y.handler.sleep = lambda ms: f"y: slept {ms}"  # type: ignore[method-assign]
    replies: list[Any] = []

    def call() -> None:
        try:
            replies.append(client.sleep(4000))
        except Exception as exc:  # what the client saw, for the assertion below
            replies.append(exc)

    try:
        for _ in range(2):  # round robin: one of two calls holds x
            replies.clear()
            caller = threading.Thread(target=call)
            caller.start()
            deadline = time.monotonic() + 5
            while caller.is_alive() and not peers.x.handler.sleeping.is_set():
                assert time.monotonic() < deadline, "the call reached neither server"
                time.sleep(0.005)  # polling two conditions (a thread and an event)
            if peers.x.handler.sleeping.is_set():
                peers.x.close()  # drops the engine's connection with the request in flight
                caller.join(timeout=5)
                break
            caller.join()
    finally:
        client.close()
    assert peers.x.handler.sleeping.is_set()
    assert replies == ["y: slept 4000"]
    reset = 'metaprotocol_retries_total{listener="reset.thrift.pol:9197",route="all",reason="'
    assert peers.engine.stat(reset + 'reset"}') == 1


def test_retry_after_a_try_times_out(peers: Peers) -> None:
    """perTryTimeout 300 ms with retryOn timeout: a try stuck on the slow server is retried
    on the other endpoint, and the client gets that reply well before the slow one's."""
    peers.slow.handler.sleep = lambda ms: time.sleep(3) or f"slow: slept {ms}"  # type: ignore[method-assign]
    client = peers.client(SLOW)
    try:
        for _ in range(4):  # round robin: half of the first tries go to the slow server
            started = time.monotonic()
            assert client.sleep(0) == "fast: slept 0"
            assert time.monotonic() - started < 2.5
    finally:
        client.close()
    timeouts = 'metaprotocol_retries_total{listener="slow.thrift.pol:9199",route="all",reason="'
    assert peers.engine.stat(timeouts + 'timeout"}') >= 1


def test_outlier_ejected_then_readmitted(peers: Peers) -> None:
    engine = peers.engine
    active = "metaprotocol_outlier_ejections_active"
    client = peers.client(OUTLIER)
    try:
        assert {outcome(client.ping) for _ in range(4)} == {"good", "flaky"}
        peers.flaky.handler.ping = broken_ping  # type: ignore[method-assign]
        seen = [outcome(client.ping) for _ in range(6)]  # 3 errors in a row on flaky
        ejected_at = time.monotonic()
        assert seen.count("good") == 3, seen
        assert engine.stat(active) == 1
        assert [outcome(client.ping) for _ in range(20)] == ["good"] * 20  # flaky is skipped
        del peers.flaky.handler.ping  # healthy again, but still ejected until readmitted
        engine.wait_for(lambda: engine.stat(active) == 0, timeout=10)
        assert time.monotonic() - ejected_at >= 0.9  # baseEjectionTime 1 s
        after = [outcome(client.ping) for _ in range(10)]
    finally:
        client.close()
    assert set(after) == {"good", "flaky"}, after  # readmitted
    assert engine.stat("metaprotocol_outlier_ejections_total") == 1


def test_engine_stops_with_mirror_copies_in_flight(peers: Peers) -> None:
    """Copies waiting on the hung mirror when the engine stops leave no task behind (this
    test stops the module's engine, so it runs last)."""
    before = peers.hole.data().count(b"ping")
    client, trans = peers.header_client(MIRROR)
    try:
        for _ in range(5):
            trans.set_header(b"x-mirror", b"hang")
            assert client.ping() == "primary: pong"
    finally:
        trans.close()
    peers.engine.wait_for(lambda: peers.hole.data().count(b"ping") == before + 5)
    assert peers.engine.close() == []  # the copies had up to 5 s (route timeout) to go
