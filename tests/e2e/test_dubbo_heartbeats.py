"""Dubbo pings end to end: the engine pings a real sofa-rpc-node provider on its idle upstream
connection (``spec.upstream.heartbeat``), the provider answers, and the connection stays; an
upstream that goes silent behind a black hole is found by its unanswered ping and its request
answered at once (no Java Dubbo provider runs here: its idle close of a connection that read
nothing for 180 s is read from its code, see docs/codecs/dubbo.md)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from dubbo_kit import Consumer, dest, route, router, version_of

from metaprotocol_sdk.demo.procs import Child, node_child

IDLE = ("idle.dubbo.e2e", 20892)
HOLE = ("hole.dubbo.e2e", 20893)
PINGS = "{interval: 200ms, timeout: 500ms}"


class BlackHole:
    """Accepts connections and reads everything, answering nothing (a peer gone behind a NAT
    that still takes the bytes)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    @staticmethod
    def _drain(conn: socket.socket) -> None:
        while True:
            try:
                if not conn.recv(65536):
                    return
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


class Peers:
    def __init__(self, harness: ModuleType, start_engine: Any) -> None:
        self.provider: Child = node_child("ping-provider", "provider", "v1")
        port = self.provider.wait_ready()
        self.hole = BlackHole()
        yaml = "".join(
            [
                harness.application_protocol_yaml("dubbo"),
                harness.service_yaml("idle", "dubbo", *IDLE, {"v1": port}),
                harness.service_yaml("hole", "dubbo", *HOLE, {"v1": self.hole.port}),
                router("idle", IDLE, route("all", dest(IDLE))),
                router("hole", HOLE, route("all", dest(HOLE))),
                harness.proxy_yaml([IDLE, HOLE], route_timeout="20s").replace(
                    "  admin:", f"  upstream: {{heartbeat: {PINGS}}}\n  admin:"
                ),
            ]
        )
        self.engine = start_engine(yaml)
        self.idle = Consumer(self.engine.port(*IDLE))
        self.blind = Consumer(self.engine.port(*HOLE))

    def close(self) -> None:
        for child in (self.idle.child, self.blind.child, self.provider):
            child.stop()
        self.hole.close()


@pytest.fixture(scope="module")
def peers(harness: ModuleType, start_engine: Any) -> Iterator[Peers]:
    p = Peers(harness, start_engine)
    yield p
    p.close()


def test_a_real_provider_answers_the_pings_and_keeps_the_connection(peers: Peers) -> None:
    engine = peers.engine
    assert version_of(peers.idle.call("ping")) == "v1"
    cluster = 'cluster="outbound|20892||idle.dubbo.e2e"'
    engine.wait_for(lambda: engine.stat(f"metaprotocol_upstream_pings_total{{{cluster}") >= 3)
    answered = f'metaprotocol_heartbeats_total{{{cluster},side="upstream"'
    engine.wait_for(lambda: engine.stat(answered) >= 3)
    assert version_of(peers.idle.call("ping")) == "v1"
    assert engine.stat(f"metaprotocol_upstream_connections_total{{{cluster}") == 1
    closed = 'metaprotocol_upstream_connections_closed_total{cluster="outbound|20892'
    assert engine.stat(closed) == 0


def test_a_silent_upstream_is_found_by_its_unanswered_ping(peers: Peers) -> None:
    reply = peers.blind.call("sayHello", ["anyone"])  # route timeout 20 s: the ping ends it
    assert not reply["ok"]
    assert "UpstreamReset" in reply["error"] and "heartbeat" in reply["error"], reply
    closed = 'metaprotocol_upstream_connections_closed_total{cluster="outbound|20893||hole'
    assert peers.engine.stat(closed) == 1
