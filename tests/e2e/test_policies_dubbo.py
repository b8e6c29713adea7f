"""Traffic policies end to end with Dubbo peers: sofa-rpc-node providers and consumers through
the engine on 127.0.0.1 (fault injection, mirroring, local rate limit, retries, outlier
detection).

A small TCP relay (:class:`Relay`) stands in front of a real provider where a test needs to
see the bytes a provider received (the mirror's copies and their attachments: the provider's
reply to a copy is discarded by the engine) or to turn an endpoint from refusing connections
into a working one on the same port (outlier readmission).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import dubbo_kit
import pytest

from metaprotocol_sdk.demo.procs import Child, node_child

POLICY, DEADM, RATE, RETRY, OUTLIER, PANIC, INFLIGHT = (
    ("policy.dubbo.pol", 20990),
    ("deadmirror.dubbo.pol", 20991),
    ("rate.dubbo.pol", 20992),
    ("retry.dubbo.pol", 20993),
    ("outlier.dubbo.pol", 20994),
    ("panic.dubbo.pol", 20995),
    ("inflight.dubbo.pol", 20996),
)
DELAY = 0.3  # the fault's fixedDelay, seconds
#: The event loop's clock: uvloop's (libuv's) is in milliseconds and read once per loop turn,
#: so a timer may end up to a few milliseconds before the client's own clock says (Envoy's
#: timers are alike); the delay is held, not shortened by more than that.
TIMER_SLACK = 0.005


class Relay:
    """A TCP relay on 127.0.0.1 to a provider's port that keeps the bytes sent to it.

    Until :meth:`open` its socket is bound but not listening, so connections to its port are
    refused (as to a dead server), and nothing else can take the port meanwhile.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.sent = bytearray()
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._conns: list[socket.socket] = []

    def open(self) -> None:
        """Start accepting and relaying."""
        self._sock.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def received(self) -> bytes:
        with self._lock:
            return bytes(self.sent)

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._sock.accept()
                up = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return
            self._conns += [down, up]
            threading.Thread(target=self._pump, args=(down, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if record:
                    with self._lock:
                        self.sent += data
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._sock.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.close()


class Consumer(dubbo_kit.Consumer):
    """The sofa-rpc-node consumer, telling which provider answered."""

    def __init__(self, port: int) -> None:
        super().__init__(port, wait=False)

    def outcome(self, method: str = "ping", args: list[Any] | None = None) -> str:
        """The replying provider's version, or ``"error: <message>"``."""
        reply = self.call(method, args)
        return str(reply["result"]).split(":", 1)[0] if reply["ok"] else f"error: {reply['error']}"


def count(provider: Child) -> int:
    """How many requests the provider served (its ``count`` command)."""
    provider.send("count")
    while not (line := provider.readline(5)).startswith("COUNT "):
        pass
    return int(line.split()[1])


def dest(svc: tuple[str, int], subset: str | None = None) -> str:
    sub = f", subset: {subset}" if subset else ""
    return f"\n        - destination: {{host: {svc[0]}, port: {{number: {svc[1]}}}{sub}}}"


def route(name: str, dests: str, method: str = "", extra: str = "") -> str:
    when = f"\n      match: {{attributes: {{method: {{exact: {method}}}}}}}" if method else ""
    return f"\n    - name: {name}{when}{extra}\n      route:{dests}"


def router(name: str, svc: tuple[str, int], routes: str, spec: str = "") -> str:
    return f"""
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata: {{name: {name}}}
spec:
  hosts: [{svc[0]}]{spec}
  routes:{routes}
---"""


class Peers:
    """Providers v1, mirror, a and c (victims) and flaky, relays, the engine, consumers."""

    def __init__(self, harness: ModuleType, start_engine: Any) -> None:
        self.children: list[Child] = []
        self.v1, self.mirror, self.a, self.c, self.flaky = (
            self._child(f"provider-{v}", "provider", v) for v in ("v1", "mirror", "a", "c", "flaky")
        )
        ports = {c: c.wait_ready() for c in (self.v1, self.mirror, self.a, self.c, self.flaky)}
        self.tap = Relay(ports[self.mirror])
        self.tap.open()
        self.gate = Relay(ports[self.flaky])  # refuses connections until opened
        svc = harness.service_yaml
        outlier = (
            "{outlierDetection: {consecutiveGatewayErrors: 2, baseEjectionTime: 1s,"
            " interval: 250ms, maxEjectionPercent: 100}}"
        )
        yaml = "".join(
            [
                harness.application_protocol_yaml("dubbo"),
                svc("policy", "dubbo", *POLICY, {"v1": ports[self.v1], "v2": self.tap.port}),
                svc("deadm", "dubbo", *DEADM, {"v1": harness.closed_port()}),
                svc("rate", "dubbo", *RATE, {"v1": ports[self.v1]}),
                svc("retry", "dubbo", *RETRY, {"a": ports[self.a], "b": ports[self.v1]}),
                svc("inflight", "dubbo", *INFLIGHT, {"c": ports[self.c], "d": ports[self.v1]}),
                svc(
                    "outlier",
                    "dubbo",
                    *OUTLIER,
                    {"good": ports[self.v1], "flaky": self.gate.port},
                    traffic_policy=outlier,
                ),
                router(
                    "policy",
                    POLICY,
                    route(
                        "abort",
                        dest(POLICY, "v1"),
                        "sayHello",
                        "\n      fault: {abort: {errorType: OverLimit}}",
                    )
                    + route(
                        "delay",
                        dest(POLICY, "v1"),
                        "sleep",
                        f"\n      fault: {{delay: {{fixedDelay: {int(DELAY * 1000)}ms}}}}",
                    )
                    + route(
                        "to-dead-mirror",
                        dest(POLICY, "v1"),
                        "ping",
                        f"\n      mirror: {{host: {DEADM[0]}, port: {{number: {DEADM[1]}}}}}",
                    )
                    + route(
                        "mirrored",
                        dest(POLICY, "v1"),
                        "attachments",
                        "\n      requestMutation: [{key: x-mesh, value: metaprotocol}]"
                        f"\n      mirror: {{host: {POLICY[0]}, subset: v2,"
                        f" port: {{number: {POLICY[1]}}}}}",
                    ),
                ),
                router(
                    "rate",
                    RATE,
                    route("all", dest(RATE)),
                    spec="\n  localRateLimit:"
                    "\n    tokenBucket: {maxTokens: 5, tokensPerFill: 5, fillInterval: 1h}",
                ),
                router(
                    "retry",
                    RETRY,
                    route(
                        "in-flight",
                        dest(INFLIGHT),
                        "sleep",
                        "\n      retries: {attempts: 1, retryOn: reset}",
                    )
                    + route(
                        "all",
                        dest(RETRY),
                        extra="\n      retries: {attempts: 2, retryOn: 'connect-failure,reset'}",
                    ),
                ),
                router("outlier", OUTLIER, route("all", dest(OUTLIER))),
                svc(
                    "panic",
                    "dubbo",
                    *PANIC,
                    {"p1": ports[self.v1], "p2": ports[self.flaky]},
                    traffic_policy="{outlierDetection: {consecutive5xxErrors: 1,"
                    " baseEjectionTime: 30s, maxEjectionPercent: 100}}",
                ),
                router("panic", PANIC, route("all", dest(PANIC))),
                harness.proxy_yaml([POLICY, RATE, RETRY, OUTLIER, PANIC]),
            ]
        )
        self.engine = start_engine(yaml)
        self.policy, self.rate, self.retry, self.outlier, self.panic = (
            self._consumer(s) for s in (POLICY, RATE, RETRY, OUTLIER, PANIC)
        )
        for consumer in (self.policy, self.rate, self.retry, self.outlier, self.panic):
            consumer.child.wait_ready()

    def _child(self, name: str, *args: str) -> Child:
        child = node_child(name, *args)
        self.children.append(child)
        return child

    def _consumer(self, svc: tuple[str, int]) -> Consumer:
        consumer = Consumer(self.engine.port(*svc))
        self.children.append(consumer.child)
        return consumer

    def close(self) -> None:
        for child in self.children:
            child.stop()
        self.tap.close()
        self.gate.close()


@pytest.fixture(scope="module")
def peers(harness: ModuleType, start_engine: Any) -> Iterator[Peers]:
    p = Peers(harness, start_engine)
    yield p
    p.close()


def test_fault_abort_is_a_remote_error(peers: Peers) -> None:
    before = count(peers.v1)
    for _ in range(3):
        reply = peers.policy.call("sayHello", ["x"])
        assert not reply["ok"]
        assert "OverLimit" in reply["error"] and "fault injected" in reply["error"], reply
    assert count(peers.v1) == before  # the aborted requests never reached the provider
    assert peers.engine.stat('metaprotocol_faults_total{listener="policy.dubbo.pol:20990"') >= 3


def test_fault_delay_holds_each_call(peers: Peers) -> None:
    for _ in range(3):
        started = time.monotonic()
        assert peers.policy.outcome("sleep", [0]) == "v1"
        assert time.monotonic() - started >= DELAY - TIMER_SLACK


def test_mirror_receives_copies_with_the_mutation(peers: Peers) -> None:
    engine = peers.engine
    before = count(peers.mirror)
    replies = [peers.policy.call("attachments") for _ in range(10)]
    seen = [json.loads(r["result"]) for r in replies]
    assert [s["version"] for s in seen] == ["v1"] * 10  # only the primary's replies
    assert all(s["props"]["x-mesh"] == "metaprotocol" for s in seen)
    engine.wait_for(lambda: count(peers.mirror) == before + 10)  # the mirror served the copies
    received = peers.tap.received()
    assert received.count(b"attachments") == 10
    assert received.count(b"x-mesh") == 10 and received.count(b"metaprotocol") == 10
    ok = 'metaprotocol_mirror_total{listener="policy.dubbo.pol:20990",route="mirrored"'
    engine.wait_for(lambda: engine.stat(ok) == 10)


def test_dead_mirror_changes_nothing_for_the_client(peers: Peers) -> None:
    engine = peers.engine
    attempts = 'metaprotocol_mirror_total{listener="policy.dubbo.pol:20990",route="to-dead-mirror"'
    for _ in range(10):
        started = time.monotonic()
        assert peers.policy.outcome() == "v1"
        assert time.monotonic() - started < 2.5  # generous: a call takes milliseconds
    engine.wait_for(lambda: engine.stat(attempts) == 10)  # the copies were tried, and failed
    snapshot = engine.loop_call(engine.engine.stats_snapshot)
    statuses = {k.rsplit("status=", 1)[1] for k in snapshot if k.startswith(attempts)}
    assert statuses <= {'"UpstreamConnectFailure"}', '"Dropped"}'}, statuses


def test_local_rate_limit_lets_exactly_max_tokens_through(peers: Peers) -> None:
    ids = [peers.rate.send("ping") for _ in range(12)]
    replies = list(peers.rate.results(ids).values())
    passed = [r for r in replies if r["ok"]]
    assert len(passed) == 5, replies
    assert all("OverLimit" in r["error"] for r in replies if not r["ok"]), replies


def test_retry_lands_on_the_healthy_endpoint(peers: Peers) -> None:
    consumer = peers.retry
    assert {consumer.outcome() for _ in range(6)} == {"a", "v1"}  # both endpoints in use
    peers.a.stop()  # kills provider a: its connection resets, new ones are refused
    assert [consumer.outcome() for _ in range(20)] == ["v1"] * 20
    assert peers.engine.stat('metaprotocol_retries_total{listener="retry.dubbo.pol:20993"') >= 1


def test_retry_after_the_provider_dies_with_the_request(peers: Peers) -> None:
    """Provider c is killed while it holds a request: the engine retries it (retryOn reset)
    on the other endpoint and the consumer gets that provider's reply."""
    consumer = peers.retry
    counts = {p: count(p) for p in (peers.c, peers.v1)}
    reply: dict[str, Any] = {}
    for _ in range(2):  # round robin: one of two calls is held by c
        call_id = consumer.send("sleep", [1000])
        deadline = time.monotonic() + 5
        while (served := {p for p in counts if count(p) > counts[p]}) == set():
            assert time.monotonic() < deadline, "the call reached no provider"
        if peers.c in served:
            peers.c.stop()  # the process exits with the request in flight
            reply = consumer.results([call_id])[call_id]
            break
        counts[peers.v1] += 1
        consumer.results([call_id])  # v1 got this one: wait for it, then try again
    assert reply["ok"] and reply["result"] == "v1: slept 1000", reply
    reset = 'metaprotocol_retries_total{listener="retry.dubbo.pol:20993",route="in-flight",reason="'
    assert peers.engine.stat(reset + 'reset"}') == 1


def test_outlier_ejected_then_readmitted(peers: Peers) -> None:
    engine, consumer = peers.engine, peers.outlier
    seen = Counter(consumer.outcome() for _ in range(4))  # flaky refuses: 2 errors in a row
    ejected_at = time.monotonic()
    assert seen["v1"] == 2 and sum(seen.values()) == 4, seen
    assert engine.stat("metaprotocol_outlier_ejections_active") == 1
    assert [consumer.outcome() for _ in range(20)] == ["v1"] * 20  # flaky is skipped
    peers.gate.open()  # flaky works now, but stays ejected until readmitted
    engine.wait_for(lambda: engine.stat("metaprotocol_outlier_ejections_active") == 0, 10)
    assert time.monotonic() - ejected_at >= 0.9  # baseEjectionTime 1 s
    after = Counter(consumer.outcome() for _ in range(10))
    assert set(after) == {"v1", "flaky"}, after  # readmitted
    assert engine.stat("metaprotocol_outlier_ejections_total") == 1


def test_every_endpoint_ejected_still_gets_traffic(peers: Peers) -> None:
    """Both providers answer errors and both are ejected: the cluster then balances over all
    of them (Envoy's panic threshold), so the consumer still gets the providers' own answers
    rather than NoHealthyUpstream."""
    engine, consumer = peers.engine, peers.panic
    active = 'metaprotocol_outlier_ejections_active{cluster="outbound|20995||panic.dubbo.pol"}'
    first = [consumer.call("fail", ["boom from node"]) for _ in range(2)]
    assert all(not r["ok"] and "boom from node" in r["error"] for r in first), first
    assert engine.stat(active) == 2, engine.loop_call(engine.engine.stats_snapshot)
    after = [consumer.call("fail", ["again"]) for _ in range(2)]
    assert all("again" in r["error"] and "NoHealthyUpstream" not in r["error"] for r in after)
    assert {consumer.outcome() for _ in range(4)} == {"v1", "flaky"}
