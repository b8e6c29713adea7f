"""``connectionPool.http.maxConcurrentStreams``: requests in flight per upstream connection.

As Envoy's HTTP/2 pool: a full connection makes the next request open another (within
``tcp.maxConnections`` and the process's budget), or wait for room, bounded by
``http1MaxPendingRequests`` and the route's timeout. Over real sockets, against a KV upstream
that holds its replies until told, and counts the requests each connection has in flight.
"""

from __future__ import annotations

import asyncio

from proxy_kit import (
    RESPONSE,
    Client,
    KVServer,
    Upstream,
    address,
    build_frame,
    engine_for,
    error_type,
    mesh,
    refusing_port,
    run,
    until,
)

from metaprotocol_sdk import Metadata
from metaprotocol_sdk.examples.kv import KVCodec
from metaprotocol_sdk.proxy import loads_config

ROUTER = """\
- name: all
  route: [{destination: {host: svc.test}}]
  timeout: 5s
"""
QUEUED = "metaprotocol_upstream_requests_queued_total"
WAITING = "metaprotocol_upstream_requests_queued_active"
NO_REWRITE = {"protocol": "kvnr", "codec": "proxy_test_codecs:NoRewriteKVCodec"}


class Holding(Upstream):
    """Holds every reply until :meth:`answer`; counts each connection's requests in flight
    (``peak``: the most any connection had at once)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.held: list[tuple[KVServer, Metadata]] = []
        self.inflight: dict[KVServer, int] = {}
        self.peak = 0
        self.order: list[str] = []

    def on_message(self, conn: KVServer, msg: Metadata) -> None:
        self.received.append(msg)
        self.order.append(msg.attributes.get("n") or "")
        n = self.inflight[conn] = self.inflight.get(conn, 0) + 1
        self.peak = max(self.peak, n)
        self.held.append((conn, msg))
        for count, fut in self._waiters:  # (wait_received)
            if len(self.received) >= count and not fut.done():
                fut.set_result(None)

    def answer(self, count: int | None = None) -> None:
        """Answer the ``count`` oldest held requests (all by default)."""
        count = len(self.held) if count is None else count
        taken, self.held = self.held[:count], self.held[count:]
        for conn, msg in taken:
            self.inflight[conn] -= 1
            if conn.transport is not None and not conn.transport.is_closing():
                headers = {"server": self.name, "n": msg.attributes.get("n") or ""}
                conn.transport.write(build_frame(RESPONSE, msg.request_id, headers))


def policy(http: str, tcp: str = "") -> str:
    pool = f"http: {{{http}}}" + (f", tcp: {{{tcp}}}" if tcp else "")
    return f"{{connectionPool: {{{pool}}}}}"


def send(c: Client, count: int) -> list[asyncio.Future[Metadata]]:
    return [c.start("get", {"n": str(i)}) for i in range(count)]


def test_a_full_connection_makes_the_next_request_open_another() -> None:
    """Streams 2, five requests at once: three connections, none with more than two."""

    async def main() -> None:
        up = await Holding("a").start()
        text = mesh([(up.port, "v1")], ROUTER, policy("maxConcurrentStreams: 2"))
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            replies = send(c, 5)
            await up.wait_received(5)
            assert (up.accepted, up.peak) == (3, 2)
            up.answer()
            answers = await asyncio.wait_for(asyncio.gather(*replies), 5)
            assert [error_type(a) for a in answers] == [None] * 5
            assert engine.stats.total(QUEUED) == 0
            c.close()
        await up.close()

    run(main())


def test_past_max_connections_requests_wait_for_room_in_order() -> None:
    """Streams 2, one connection: the others wait, and each reply lets the oldest go."""

    async def main() -> None:
        up = await Holding("a").start()
        pool = policy("maxConcurrentStreams: 2", "maxConnections: 1")
        async with engine_for(mesh([(up.port, "v1")], ROUTER, pool)) as engine:
            c = await Client.connect(address(engine))
            replies = send(c, 6)
            await up.wait_received(2)
            await until(lambda: engine.stats.total(WAITING) == 4, "four waiting")
            assert engine.stats.total(QUEUED) == 4
            for sent in range(3, 7):
                up.answer(1)
                await up.wait_received(sent)
                assert up.peak == 2
            up.answer()
            answers = await asyncio.wait_for(asyncio.gather(*replies), 5)
            assert [error_type(a) for a in answers] == [None] * 6
            assert [a.attributes["n"] for a in answers] == [str(i) for i in range(6)]
            assert up.order == [str(i) for i in range(6)]  # sent in their order
            assert (up.accepted, engine.stats.total(WAITING), engine.pending) == (1, 0, 0)
            c.close()
        await up.close()

    run(main())


def test_waiting_requests_are_bounded_by_http1_max_pending_requests() -> None:
    async def main() -> None:
        up = await Holding("a").start()
        pool = policy("maxConcurrentStreams: 1, http1MaxPendingRequests: 2", "maxConnections: 1")
        async with engine_for(mesh([(up.port, "v1")], ROUTER, pool)) as engine:
            c = await Client.connect(address(engine))
            await up.wait_received(0)
            first = c.start("get", {"n": "0"})
            await up.wait_received(1)  # connected: the next ones wait for room, not to open
            replies = [first, *send(c, 4)]
            refused = await asyncio.wait_for(asyncio.gather(*replies[3:]), 5)
            assert [error_type(r) for r in refused] == ["OverLimit"] * 2
            assert "http1MaxPendingRequests" in refused[0].attributes["error-message"]
            overflow = "metaprotocol_upstream_overflow_total"
            assert engine.stats.total(overflow, limit="http1MaxPendingRequests") == 2
            for sent in (2, 3):
                up.answer(1)
                await up.wait_received(sent)
            up.answer()
            answers = await asyncio.wait_for(asyncio.gather(*replies[:3]), 5)
            assert [error_type(a) for a in answers] == [None] * 3
            c.close()
        await up.close()

    run(main())


def test_a_request_waiting_for_room_times_out_with_its_route() -> None:
    """The route's timeout counts from the request's arrival, its wait included; a request
    that waited all of it was never sent."""
    router = """\
- name: slow
  match: {attributes: {method: {exact: hang}}}
  route: [{destination: {host: svc.test}}]
  timeout: 5s
- name: all
  route: [{destination: {host: svc.test}}]
  timeout: 300ms
"""

    async def main() -> None:
        up = await Upstream("a").start()
        pool = policy("maxConcurrentStreams: 1", "maxConnections: 1")
        async with engine_for(mesh([(up.port, "v1")], router, pool)) as engine:
            c = await Client.connect(address(engine))
            c.start("hang")
            await up.wait_received(1)
            waited = await asyncio.wait_for(c.start("get"), 5)
            assert error_type(waited) == "Timeout"
            assert "waited for room" in waited.attributes["error-message"]
            assert len(up.received) == 1  # the one that waited was never sent
            assert (engine.stats.total(WAITING), engine.pending) == (0, 1)
            status = "metaprotocol_requests_total"
            assert engine.stats.total(status, route="all", status="Timeout") == 1
            c.close()
        await up.close()

    run(main())


def test_a_client_that_leaves_takes_its_waiting_requests_along() -> None:
    async def main() -> None:
        up = await Holding("a").start()
        pool = policy("maxConcurrentStreams: 1", "maxConnections: 1")
        async with engine_for(mesh([(up.port, "v1")], ROUTER, pool)) as engine:
            c = await Client.connect(address(engine))
            first = c.start("get", {"n": "0"})
            await up.wait_received(1)
            leaving = await Client.connect(address(engine))
            leaving.start("get", {"n": "gone"})
            await until(lambda: engine.stats.total(WAITING) == 1, "one waiting")
            leaving.reset()
            await until(lambda: engine.stats.total(WAITING) == 0, "none waiting")
            assert engine.pending == 1
            later = c.start("get", {"n": "1"})
            up.answer(1)
            assert error_type(await asyncio.wait_for(first, 5)) is None
            await up.wait_received(2)
            up.answer()
            assert error_type(await asyncio.wait_for(later, 5)) is None
            assert up.order == ["0", "1"]  # the request of the client that left never went
            closed = "metaprotocol_requests_total"
            assert engine.stats.total(closed, status="DownstreamClosed") == 1
            c.close()
        await up.close()

    run(main())


def test_a_connect_failure_fails_the_requests_waiting_for_its_endpoint() -> None:
    """As Envoy purges a pool's pending requests: one connect attempt, five answers (not
    one connection attempt per request that had waited)."""

    async def main() -> None:
        port = refusing_port()
        pool = policy("maxConcurrentStreams: 1", "maxConnections: 1")
        async with engine_for(mesh([(port, "v1")], ROUTER, pool)) as engine:
            c = await Client.connect(address(engine))
            replies = send(c, 5)
            answers = await asyncio.wait_for(asyncio.gather(*replies), 5)
            assert [error_type(a) for a in answers] == ["UpstreamConnectFailure"] * 5
            assert engine.stats.total("metaprotocol_upstream_connect_errors_total") == 1
            assert engine.stats.total(QUEUED) == 4
            assert (engine.stats.total(WAITING), engine.pending) == (0, 0)
            c.close()

    run(main())


def test_a_client_s_own_connection_with_one_stream_does_not_pipeline() -> None:
    """A codec without id rewriting: each client has its own connection, and streams 1
    means one request at a time on it, the others waiting in the client's order (for
    servers that cannot take pipelined requests)."""

    async def main() -> None:
        up = await Holding("a").start()
        text = mesh([(up.port, "v1")], ROUTER, policy("maxConcurrentStreams: 1"), **NO_REWRITE)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            replies = send(c, 4)
            for sent in range(1, 5):
                await up.wait_received(sent)
                left = 4 - sent
                await until(lambda left=left: engine.stats.total(WAITING) == left, "waiting")
                assert up.peak == 1
                up.answer(1)
            answers = await asyncio.wait_for(asyncio.gather(*replies), 5)
            assert [a.attributes["n"] for a in answers] == ["0", "1", "2", "3"]
            assert up.accepted == 1
            c.close()
        await up.close()

    run(main())


def test_a_client_s_own_connection_held_by_timed_out_requests_is_replaced() -> None:
    """Streams 1 on a client's own connection whose request timed out: the upstream may still
    be working on it, so the next request does not go there but to a fresh connection (as
    Envoy's HTTP/1 pool closes a connection whose request timed out)."""
    # The one that waits has time to spare: it does not race the hung one's timeout.
    hang = "- name: slow\n  match: {attributes: {method: {exact: hang}}}\n"
    router = hang + "  route: [{destination: {host: svc.test}}]\n  timeout: 300ms\n" + ROUTER

    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh([(up.port, "v1")], router, policy("maxConcurrentStreams: 1"), **NO_REWRITE)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            hung = c.start("hang")
            await up.wait_received(1)
            waited = c.start("get")
            assert error_type(await asyncio.wait_for(hung, 5)) == "Timeout"
            assert error_type(await asyncio.wait_for(waited, 5)) is None
            assert up.accepted == 2
            c.close()
        await up.close()

    run(main())


def test_a_reload_sends_the_waiting_requests_to_the_endpoints_of_now() -> None:
    """A request waiting for room on an endpoint a reload removed goes to the new one (as a
    retry after a reload does), not to a connection opened to the removed endpoint."""

    async def main() -> None:
        old, new = await Holding("old").start(), await Holding("new").start()
        pool = policy("maxConcurrentStreams: 1", "maxConnections: 1")
        async with engine_for(mesh([(old.port, "v1")], ROUTER, pool)) as engine:
            c = await Client.connect(address(engine))
            first = c.start("get", {"n": "0"})
            await old.wait_received(1)
            waiting = c.start("get", {"n": "1"})
            await until(lambda: engine.stats.total(WAITING) == 1, "one waiting")
            await engine.apply(loads_config(mesh([(new.port, "v1")], ROUTER, pool), "t.yaml"))
            await new.wait_received(1)
            new.answer()
            answer = await asyncio.wait_for(waiting, 5)
            assert answer.attributes["server"] == "new"
            old.answer()
            assert (await asyncio.wait_for(first, 5)).attributes["server"] == "old"
            assert (old.accepted, len(old.received)) == (1, 1)
            c.close()
        await old.close()
        await new.close()

    run(main())


class TinyIdKV(KVCodec):
    """The KV codec with room for three request ids only."""

    max_request_id = 3


def test_a_codec_with_few_ids_gets_a_connection_more_instead_of_failing() -> None:
    """Three ids (``max_request_id``): two requests per connection (the last id is kept for
    one-way messages); the third opens another, and with ``maxConnections: 1`` waits. Before,
    the fourth request with all ids in flight was answered BadRequest."""
    codec = f"{__name__}:TinyIdKV"

    async def main() -> None:
        up = await Holding("a").start()
        async with engine_for(mesh([(up.port, "v1")], ROUTER, codec=codec)) as engine:
            c = await Client.connect(address(engine))
            replies = send(c, 5)
            await up.wait_received(5)
            assert (up.accepted, up.peak) == (3, 2)
            up.answer()
            answers = await asyncio.wait_for(asyncio.gather(*replies), 5)
            assert [error_type(a) for a in answers] == [None] * 5
            c.close()
        await up.close()

    run(main())


def test_max_concurrent_streams_is_read_and_shown() -> None:
    text = mesh([(9, "v1")], ROUTER, policy("maxConcurrentStreams: 7"))
    config = loads_config(text, "test.yaml")
    rule = next(iter(config.destination_rules.values()))
    assert rule.policy.connection_pool is not None
    assert rule.policy.connection_pool.max_concurrent_streams == 7
