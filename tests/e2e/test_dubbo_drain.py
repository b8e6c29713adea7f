"""Dubbo drain notices end to end: the read-only event between real Dubbo peers and the engine.

- **The engine drains**: a sofa-rpc-node consumer and a dubbo-ssl-python consumer, each with
  a call in flight when the engine stops, are sent the read-only event. Neither knows it
  (sofa-rpc-node ignores events, dubbo-ssl-python answers any event request as a heartbeat),
  and neither breaks: each gets its reply.
- **An upstream drains**: a sofa-rpc-node provider behind a relay that does what Apache
  Dubbo's provider does when it shuts down (no peer here sends the event itself: Java Dubbo is
  not obtainable): it sends the read-only event on each connection it has, then closes every
  connection it is offered. The consumer's calls all go to the other provider, none fails;
  once the relay closes the noticed connection, the provider is picked again.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import pytest
from dubbo_kit import INTERFACE, Consumer, dest, route, router, version_of
from metaprotocol_dubbo import DubboCodec

from metaprotocol_sdk.demo.procs import Child, node_child

NOTICE = DubboCodec().drain_notice()
SVC = ("drain.dubbo.e2e", 20890)
HEADER = 16


class AnnouncingRelay:
    """A TCP relay in front of a Dubbo provider, on its own event loop thread, that can send
    the provider's read-only event on its connections (between two whole frames) and close
    the connections it is offered, as a provider shutting down does."""

    def __init__(self, provider_port: int) -> None:
        self.provider_port = provider_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="relay", daemon=True)
        self.thread.start()
        self.writers: set[asyncio.StreamWriter] = set()
        self.refusing = False
        self.accepted = 0
        self.server = self._call(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port: int = self.server.sockets[0].getsockname()[1]

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.refusing:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.provider_port)
        self.writers.add(writer)

        async def requests() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
            up_writer.close()

        async def replies() -> None:  # frame by frame: an event goes in between two frames
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    head = await up_reader.readexactly(HEADER)
                    body = await up_reader.readexactly(int.from_bytes(head[12:16], "big"))
                    writer.write(head + body)
            writer.close()

        try:
            await asyncio.gather(requests(), replies(), return_exceptions=True)
        finally:
            self.writers.discard(writer)

    def announce(self) -> None:
        """Send the read-only event on every connection; close new ones from now on."""

        async def go() -> None:
            self.refusing = True
            for writer in self.writers:
                writer.write(NOTICE)

        self._call(go())

    def finish(self) -> None:
        """The provider's drain is over: close its connections; it is back for new ones."""

        async def go() -> None:
            for writer in list(self.writers):
                writer.close()
            self.refusing = False

        self._call(go())

    def close(self) -> None:
        async def go() -> None:
            self.server.close()
            for writer in list(self.writers):
                writer.close()

        self._call(go())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Peers:
    def __init__(self, harness: ModuleType, start_engine: Any) -> None:
        self.children: list[Child] = []
        self.v1 = node_child("drain-provider-v1", "provider", "v1")
        self.v2 = node_child("drain-provider-v2", "provider", "v2")
        self.children += [self.v1, self.v2]
        ports = {c: c.wait_ready() for c in (self.v1, self.v2)}
        self.relay = AnnouncingRelay(ports[self.v1])
        eps = {"v1": self.relay.port, "v2": ports[self.v2]}
        yaml = "".join(
            [
                harness.application_protocol_yaml("dubbo"),
                harness.service_yaml(
                    "drain",
                    "dubbo",
                    *SVC,
                    eps,
                    traffic_policy="{loadBalancer: {simple: ROUND_ROBIN}}",
                ),
                router("drain", SVC, route("all", dest(SVC))),
                harness.proxy_yaml([SVC]),
            ]
        )
        self.engine = start_engine(yaml)
        self.consumer = Consumer(self.engine.port(*SVC), wait=False)
        self.children.append(self.consumer.child)
        self.consumer.child.wait_ready()

    def close(self) -> None:
        self.relay.close()
        for child in self.children:
            child.stop()


@pytest.fixture(scope="module")
def peers(harness: ModuleType, start_engine: Any) -> Iterator[Peers]:
    p = Peers(harness, start_engine)
    yield p
    p.close()


def versions(consumer: Consumer, n: int) -> Counter[str]:
    replies = consumer.results([consumer.send("ping") for _ in range(n)])
    return Counter(version_of(r) for r in replies.values())


def test_a_provider_that_announces_its_drain_gets_no_new_calls(peers: Peers) -> None:
    engine, relay = peers.engine, peers.relay
    assert set(versions(peers.consumer, 10)) == {"v1", "v2"}
    relay.announce()
    engine.wait_for(lambda: engine.stat("metaprotocol_drain_notices_total") >= 1)
    accepted = relay.accepted
    assert versions(peers.consumer, 30) == {"v2": 30}  # none failed, none to v1
    assert relay.accepted == accepted  # no connection tried to the draining provider
    relay.finish()
    engine.wait_for(
        lambda: (
            not engine.loop_call(lambda: any(c.draining for c in engine.engine.clusters.values()))
        )
    )
    assert set(versions(peers.consumer, 10)) == {"v1", "v2"}


def test_the_engines_drain_notice_breaks_neither_consumer(
    harness: ModuleType, start_engine: Any
) -> None:
    """Each consumer has a call in flight (the provider sleeps 1.5 s) when the engine stops
    (drain 5 s): each is sent the read-only event, and each gets its reply."""
    from dubbo_ssl.client import DubboClient

    provider = node_child("drain-provider-slow", "provider", "v1")
    try:
        port = provider.wait_ready()
        yaml = "".join(
            [
                harness.application_protocol_yaml("dubbo"),
                harness.service_yaml("slow", "dubbo", "slow.dubbo.e2e", 20891, {"v1": port}),
                harness.proxy_yaml([("slow.dubbo.e2e", 20891)]),
            ]
        )
        engine = start_engine(yaml)
        listen = engine.port("slow.dubbo.e2e", 20891)
        consumer = Consumer(listen)
        assert version_of(consumer.call("ping")) == "v1"
        client = DubboClient(INTERFACE, group="", version="1.0.0", host=f"127.0.0.1:{listen}")
        assert "v1" in str(client.call("ping", [], timeout=5))
        node_call = consumer.send("sleep", [1500])
        with ThreadPoolExecutor(1) as pool:
            python_call = pool.submit(client.call, "sleep", [1500], timeout=10)
            engine.wait_for(lambda: engine.stat("metaprotocol_requests_pending") == 2)
            stopping = asyncio.run_coroutine_threadsafe(engine.engine.stop(drain=5.0), engine.loop)
            assert "slept 1500" in str(python_call.result(10))
        reply = consumer.results([node_call])[node_call]
        assert reply["ok"] and "slept 1500" in reply["result"], reply
        stopping.result(10)
        assert engine.stat("metaprotocol_drain_notices_total") == 2
        assert engine.stat("metaprotocol_decode_errors_total") == 0
        consumer.child.stop()
    finally:
        provider.stop()
