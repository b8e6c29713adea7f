"""Dubbo end to end: sofa-rpc-node providers (v1, v2) and consumers (sofa-rpc-node and
dubbo-ssl-python) through the engine on 127.0.0.1.

Not covered here, by the peers' limits: response mutation (both consumers understand result
flags 0/1/2 only, so an attachment added to a response cannot be observed by them) and oneway
(neither consumer sends Dubbo oneway requests); Thrift covers both.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import pytest
from dubbo_kit import INTERFACE, Consumer, dest, route, router, version_of

from metaprotocol_sdk.demo.procs import Child, node_child

MAIN, HASH, ERR, DEAD, KILL = (
    ("demoservice.dubbo.e2e", 20880),
    ("hash.dubbo.e2e", 20881),
    ("errors.dubbo.e2e", 20882),
    ("dead.dubbo.e2e", 20883),
    ("kill.dubbo.e2e", 20884),
)


class Peers:
    """Providers v1/v2 and a victim, the engine, and a consumer per listener."""

    def __init__(self, harness: ModuleType, start_engine: Any) -> None:
        self.children: list[Child] = []
        self.v1 = self._provider("v1")
        self.v2 = self._provider("v2")
        self.victim_child = self._provider_child("victim")
        ports = {c: c.wait_ready() for c in (self.v1, self.v2, self.victim_child)}
        eps = {"v1": ports[self.v1], "v2": ports[self.v2]}
        svc = harness.service_yaml
        yaml = "".join(
            [
                harness.application_protocol_yaml("dubbo"),
                svc("main", "dubbo", *MAIN, eps),
                svc("hash", "dubbo", *HASH, eps, hash_header="x-user"),
                svc("err", "dubbo", *ERR, {"v1": eps["v1"]}, subsets=("v1", "v9")),
                svc("dead", "dubbo", *DEAD, {"v1": harness.closed_port()}),
                svc("kill", "dubbo", *KILL, {"v1": ports[self.victim_child]}),
                router(
                    "main",
                    MAIN,
                    route("canary", dest(MAIN, "v1"), "x-canary: {exact: 'yes'}")
                    + route(
                        "mutate",
                        dest(MAIN, "v2"),
                        "method: {exact: attachments}",
                        "\n      requestMutation: [{key: x-mesh, value: metaprotocol}]",
                    )
                    + route("sayhello", dest(MAIN, "v2"), "method: {exact: sayHello}")
                    + route("split", dest(MAIN, "v1", 20) + dest(MAIN, "v2", 80)),
                ),
                router("hash", HASH, route("all", dest(HASH))),
                router(
                    "err",
                    ERR,
                    route("ok", dest(ERR, "v1"), "method: {exact: sayHello}")
                    + route("empty-subset", dest(ERR, "v9"), "method: {exact: ping}")
                    + route("refused", dest(DEAD), "method: {exact: attachments}")
                    + route(
                        "slow", dest(ERR, "v1"), "method: {exact: sleep}", "\n      timeout: 300ms"
                    )
                    + route(
                        "mutated-error",
                        dest(ERR, "v1"),
                        "method: {exact: fail}, x-mutate: {exact: 'yes'}",
                        "\n      responseMutation: [{key: x-mesh, value: metaprotocol}]",
                    ),
                ),
                router("kill", KILL, route("all", dest(KILL))),
                harness.proxy_yaml([MAIN, HASH, ERR, KILL]),
            ]
        )
        self.engine = start_engine(yaml)
        self.main, self.hash, self.err = (self._consumer(s) for s in (MAIN, HASH, ERR))
        for consumer in (self.main, self.hash, self.err):
            consumer.child.wait_ready()

    def _provider_child(self, version: str) -> Child:
        child = node_child(f"provider-{version}", "provider", version)
        self.children.append(child)
        return child

    _provider = _provider_child

    def _consumer(self, svc: tuple[str, int]) -> Consumer:
        consumer = Consumer(self.engine.port(*svc), wait=False)
        self.children.append(consumer.child)
        return consumer

    def close(self) -> None:
        for child in self.children:
            child.stop()


@pytest.fixture(scope="module")
def peers(harness: ModuleType, start_engine: Any) -> Iterator[Peers]:
    p = Peers(harness, start_engine)
    yield p
    p.close()


def within(observed: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(observed / n - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 0.5 / n


def test_route_by_method(peers: Peers) -> None:
    ids = [peers.main.send("sayHello", [f"n{i}"]) for i in range(30)]
    replies = peers.main.results(ids)
    assert Counter(version_of(r) for r in replies.values()) == {"v2": 30}


def test_weighted_split_within_bound(peers: Peers) -> None:
    ids = [peers.main.send("ping") for _ in range(400)]
    seen = Counter(version_of(r) for r in peers.main.results(ids).values())
    assert set(seen) <= {"v1", "v2"}
    assert within(seen["v1"], 400, 0.2), seen


def test_route_by_attachment(peers: Peers) -> None:
    ids = [peers.main.send("ping", **{"x-canary": "yes"}) for _ in range(20)]
    assert {version_of(r) for r in peers.main.results(ids).values()} == {"v1"}


def test_request_mutation_seen_by_provider(peers: Peers) -> None:
    reply = peers.main.call("attachments", **{"x-client": "e2e"})
    seen = json.loads(reply["result"])
    assert seen["version"] == "v2"
    assert seen["props"]["x-mesh"] == "metaprotocol"
    assert seen["props"]["x-client"] == "e2e"
    assert seen["props"]["path"] == INTERFACE


def test_consistent_hash_is_sticky(peers: Peers) -> None:
    users = [f"user-{i}" for i in range(12)]
    ids = {u: [peers.hash.send("ping", **{"x-user": u}) for _ in range(8)] for u in users}
    replies = peers.hash.results([i for group in ids.values() for i in group])
    chosen = {u: {version_of(replies[i]) for i in group} for u, group in ids.items()}
    assert all(len(v) == 1 for v in chosen.values()), chosen
    assert {v for vs in chosen.values() for v in vs} == {"v1", "v2"}


@pytest.mark.parametrize(
    ("method", "args", "error_type"),
    [
        ("fail", ["x"], "RouteNotFound"),
        ("ping", [], "NoHealthyUpstream"),
        ("attachments", [], "UpstreamConnectFailure"),
        ("sleep", [1000], "Timeout"),
    ],
    ids=["no-route", "no-healthy-upstream", "connect-failure", "timeout"],
)
def test_local_replies_are_remote_errors(
    peers: Peers, method: str, args: list[Any], error_type: str
) -> None:
    started = time.monotonic()
    reply = peers.err.call(method, args)
    assert time.monotonic() - started < 2.5
    assert not reply["ok"]
    assert error_type in reply["error"], reply
    assert version_of(peers.err.call("sayHello", ["after"])) == "v1"


def test_exception_reply_survives_a_response_mutation(peers: Peers) -> None:
    """The provider's exception cannot carry the route's response mutation: it reaches the
    consumer unchanged (its own message, not a local BadResponse) and the skip is counted."""
    engine = peers.engine
    skipped = engine.stat("metaprotocol_mutations_skipped_total")
    bad = engine.stat('metaprotocol_local_replies_total{listener="errors.dubbo.e2e:20882",type="B')
    reply = peers.err.call("fail", ["boom from node"], **{"x-mutate": "yes"})
    assert not reply["ok"]
    assert "boom from node" in reply["error"], reply
    assert "BadResponse" not in reply["error"], reply
    assert engine.stat("metaprotocol_mutations_skipped_total") == skipped + 1
    assert (
        engine.stat('metaprotocol_local_replies_total{listener="errors.dubbo.e2e:20882",type="B')
        == bad
    )


def test_upstream_killed_mid_request(peers: Peers) -> None:
    consumer = Consumer(peers.engine.port(*KILL))
    peers.children.append(consumer.child)
    started = time.monotonic()
    reply = consumer.call("crash")  # the provider exits while handling the request
    assert time.monotonic() - started < 4
    assert not reply["ok"]
    assert "Upstream" in reply["error"], reply


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_dubbo_ssl_python_consumers_concurrently(peers: Peers) -> None:
    """Many dubbo-ssl-python clients in threads: every reply belongs to its own request."""
    from dubbo_ssl.client import DubboClient

    host = f"127.0.0.1:{peers.engine.port(*MAIN)}"

    def worker(n: int) -> list[str]:
        client = DubboClient(INTERFACE, group="", version="1.0.0", host=host)
        return [str(client.call("sayHello", [f"c{n}-{i}"], timeout=5)) for i in range(15)]

    logging.disable(logging.CRITICAL)  # the library logs every exception it reports
    try:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(worker, range(16)))
    finally:
        logging.disable(logging.NOTSET)
    for n, replies in enumerate(results):
        assert replies == [f"v2: hello c{n}-{i}" for i in range(15)]


def test_many_concurrent_requests_one_connection(peers: Peers) -> None:
    ids = {peers.main.send("sayHello", [f"m{i}"]): i for i in range(300)}
    replies = peers.main.results(list(ids))
    for call_id, i in ids.items():
        assert replies[call_id]["result"] == f"v2: hello m{i}"


def test_no_leaked_connections_after_close(peers: Peers) -> None:
    engine = peers.engine
    consumers = [Consumer(engine.port(*MAIN), wait=False) for _ in range(3)]
    for consumer in consumers:
        consumer.child.wait_ready()
        assert consumer.call("ping")["ok"]
    before = engine.stat("metaprotocol_downstream_connections_active")
    for consumer in consumers:
        consumer.child.stop()
    engine.wait_for(lambda: engine.stat("metaprotocol_downstream_connections_active") <= before - 3)
