"""Red team of ``maxConcurrentStreams`` and the requests waiting for room (see room.py):
hostile clients, upstreams and configurations, over real sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import socket
import sys
import tracemalloc
from types import FrameType
from typing import Any

import pytest
from proxy_kit import (
    ONEWAY,
    REQUEST,
    RESPONSE,
    Client,
    Upstream,
    address,
    build_frame,
    engine_for,
    error_type,
    gather,
    mesh,
    run,
    until,
)
from test_concurrent_streams import NO_REWRITE, WAITING, Holding, policy, send

from metaprotocol_sdk.examples.kv import KVCodec

ROUTER = """\
- name: all
  route: [{destination: {host: svc.test}}]
  timeout: 5s
"""
HANG = """\
- name: slow
  match: {attributes: {method: {exact: hang}}}
  route: [{destination: {host: svc.test}}]
  timeout: 300ms
"""


def test_a_client_s_own_connection_a_timed_out_request_holds_takes_no_later_request() -> None:
    """Streams 1 on a client's own connection whose only request timed out, and a request
    that comes after the timeout: it goes to a fresh connection at once. Before, the
    connection (its one place held by the timed-out request) kept it waiting until its
    route's timeout: only a request already waiting when the other timed out moved."""

    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh(
            [(up.port, "v1")], HANG + ROUTER, policy("maxConcurrentStreams: 1"), **NO_REWRITE
        )
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            assert error_type(await c.call("hang")) == "Timeout"
            later = await asyncio.wait_for(c.start("get"), 5)
            assert error_type(later) is None
            assert up.accepted == 2
            assert engine.stats.total(WAITING) == 0
            c.close()
        await up.close()

    run(main())


def test_requests_that_waited_for_room_let_go_of_their_frames_when_their_client_leaves() -> None:
    """A client sends large requests that wait for room and leaves: their frames are freed
    then, as a finished request's are (``RELEASED``), not kept by the deadline queue until
    their route's timeout, outside the buffer budget (which no longer counts them)."""
    size, count = 256 * 1024, 16

    async def main() -> None:
        up = await Holding("a").start()
        pool = policy("maxConcurrentStreams: 1", "maxConnections: 1")
        async with engine_for(mesh([(up.port, "v1")], ROUTER, pool)) as engine:
            c = await Client.connect(address(engine))
            first = c.start("get", {"n": "0"})
            await up.wait_received(1)
            c.start("get", {"n": "1"})  # waits, ahead of the leaving client's: kept alive
            await until(lambda: engine.stats.total(WAITING) == 1, "one waiting")
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                leaving = await Client.connect(address(engine))
                for _ in range(count):
                    leaving.start("get", body=bytes(size))
                await until(lambda: engine.stats.total(WAITING) == 1 + count, "all waiting")
                leaving.reset()
                await until(lambda: engine.stats.total(WAITING) == 1, "one waiting again")
                del leaving
                gc.collect()
                held = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            assert held < size * count / 4, held
            up.answer()
            assert error_type(await asyncio.wait_for(first, 5)) is None
            c.close()
        await up.close()

    run(main())


class OneIdKV(KVCodec):
    """The KV codec with one request id."""

    max_request_id = 1


class ThreeIdKV(KVCodec):
    """The KV codec with three request ids (two requests per connection)."""

    max_request_id = 3


def answer_n(up: Holding, n: str) -> None:
    """Answer the held request whose ``n`` is ``n``."""
    for i, (conn, msg) in enumerate(up.held):
        if msg.attributes.get("n") == n:
            del up.held[i]
            up.inflight[conn] -= 1
            assert conn.transport is not None
            headers = {"server": up.name, "n": n}
            conn.transport.write(build_frame(RESPONSE, msg.request_id, headers))
            return
    raise AssertionError(f"no request {n} held")


@pytest.mark.parametrize(("codec", "before"), [("OneIdKV", 0), ("ThreeIdKV", 2)])
def test_a_late_reply_never_answers_another_client_s_request_on_a_codec_with_few_ids(
    codec: str, before: int
) -> None:
    """A codec with few ids (fewer than the requests the engine may have in flight): a
    request times out, and the upstream answers it after another client's requests were
    sent. That reply answers none of them: the timed-out request's id is given to no other
    request until its reply comes, and a connection whose every place a timed-out request
    holds retires (as Envoy's HTTP/1 pool closes a connection whose request timed out).
    Before, the id was given again as the ids came round, and the late reply went to the
    other client."""
    router = HANG.replace("exact: hang", "exact: first") + ROUTER

    async def main() -> None:
        up = await Holding("a").start()
        text = mesh([(up.port, "v1")], router, codec=f"{__name__}:{codec}")
        async with engine_for(text) as engine:
            c1, c2 = await Client.connect(address(engine)), await Client.connect(address(engine))
            assert error_type(await c1.call("first", {"n": "mine"})) == "Timeout"
            for i in range(before):  # the ids come round
                theirs = c2.start("get", {"n": str(i)})
                await up.wait_received(2 + i)
                answer_n(up, str(i))
                assert (await asyncio.wait_for(theirs, 5)).attributes["n"] == str(i)
            theirs = c2.start("get", {"n": "theirs"})
            await up.wait_received(2 + before)
            up.answer()  # the late reply to the first request (where its connection is open)
            answer = await asyncio.wait_for(theirs, 5)
            assert answer.attributes.get("n") == "theirs", answer.attributes.to_dict()
            c1.close()
            c2.close()
        await up.close()

    run(main())


def test_a_request_waiting_while_its_connection_retires_waits_for_the_next_one() -> None:
    """Streams 1, one connection, two requests per connection: the second request is sent
    as the first is answered, and retires the connection (``maxRequestsPerConnection``); the
    third, still waiting, goes on the connection opened once that one closes. Before, it was
    refused (``OverLimit``) as if no connection could ever take it."""

    async def main() -> None:
        up = await Holding("a").start()
        pool = policy("maxConcurrentStreams: 1, maxRequestsPerConnection: 2", "maxConnections: 1")
        async with engine_for(mesh([(up.port, "v1")], ROUTER, pool)) as engine:
            c = await Client.connect(address(engine))
            replies = send(c, 3)
            await up.wait_received(1)
            await until(lambda: engine.stats.total(WAITING) == 2, "two waiting")
            up.answer()
            await up.wait_received(2)
            up.answer()
            await up.wait_received(3)
            up.answer()
            answers = await asyncio.wait_for(asyncio.gather(*replies), 5)
            assert [error_type(a) for a in answers] == [None] * 3
            assert up.accepted == 2
            c.close()
        await up.close()

    run(main())


class FlakyKV(KVCodec):
    """The KV codec whose construction fails while :attr:`failing` is set (a resource it
    needs per connection is gone)."""

    failing = False

    def __init__(self, **options: Any) -> None:
        if FlakyKV.failing:
            raise RuntimeError("no resource")
        super().__init__(**options)


def test_a_codec_that_cannot_be_built_fails_the_requests_waiting_for_room() -> None:
    """Requests wait for room; the endpoint's connection closes, and the one to open in its
    place cannot get a codec: they are answered (``UpstreamConnectFailure``, as a request
    whose connection cannot be made is) at once. Before, the codec's error escaped the
    connection's close, and they waited for their route's timeout."""
    router = ROUTER.replace("timeout: 5s", "timeout: 30s")

    async def main() -> None:
        up = await Holding("a").start()
        pool = policy("maxConcurrentStreams: 1", "maxConnections: 1")
        text = mesh([(up.port, "v1")], router, pool, codec=f"{__name__}:FlakyKV")
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            first = c.start("get")
            await up.wait_received(1)
            waiting = send(c, 2)
            await until(lambda: engine.stats.total(WAITING) == 2, "two waiting")
            FlakyKV.failing = True
            try:
                for conn in up.connections:  # the upstream closes the connection
                    assert conn.transport is not None
                    conn.transport.close()
                answers = await asyncio.wait_for(asyncio.gather(first, *waiting), 5)
            finally:
                FlakyKV.failing = False
            kinds = [error_type(a) for a in answers]
            assert kinds == ["UpstreamReset"] + ["UpstreamConnectFailure"] * 2, kinds
            assert (engine.stats.total(WAITING), engine.pending) == (0, 0)
            c.close()
        await up.close()

    run(main())


def test_a_one_way_message_with_no_id_left_is_dropped_as_over_limit() -> None:
    """A codec of one id, one connection, a request in flight: a one-way message has no id
    on any connection the pool may use. It is dropped as the pool's overflow
    (``OverLimit``), not blamed on the request (``BadRequest``, "cannot encode")."""

    async def main() -> None:
        up = await Holding("a").start()
        pool = policy("maxConcurrentStreams: 5", "maxConnections: 1")
        text = mesh([(up.port, "v1")], ROUTER, pool, codec=f"{__name__}:OneIdKV")
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            first = c.start("get")
            await up.wait_received(1)
            c.send(build_frame(ONEWAY, 99, {"method": "note"}))
            oneway = "metaprotocol_oneway_total"
            await until(lambda: engine.stats.total(oneway) == 1, "the one-way message")
            assert engine.stats.total(oneway, status="OverLimit") == 1
            up.answer()
            assert error_type(await asyncio.wait_for(first, 5)) is None
            c.send(build_frame(ONEWAY, 100, {"method": "note"}))  # an id free: it goes
            await up.wait_received(2)
            assert engine.stats.total(oneway, status="Forwarded") == 1
            c.close()
        await up.close()

    run(main())


def test_pending_requests_cost_no_pass_over_the_connections_opening() -> None:
    """Streams 1 to an endpoint that never completes a connect: each request opens a
    connection, and ``http1MaxPendingRequests`` counts the requests on the connections
    opening. That count is kept, not summed over them at each request: the calls made
    while checking the pool's limits grow with the requests (they were about the square of
    them, some 20,000 for 200), and the count is right again once the client left."""
    count, limit = 200, 150

    async def main() -> None:
        hold = socket.socket()
        hold.bind(("127.0.0.1", 0))
        hold.listen(0)  # never accepts: past its backlog, connects hang
        http = f"maxConcurrentStreams: 1, http1MaxPendingRequests: {limit}"
        pool = policy(http, "connectTimeout: 30s")
        text = mesh([(hold.getsockname()[1], "v1")], ROUTER, pool)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            calls = 0

            def profile(frame: FrameType, event: str, arg: object) -> None:
                nonlocal calls
                if event == "c_call" and "over_pool_limits" in frame.f_code.co_qualname:
                    calls += 1

            data = b"".join(build_frame(REQUEST, i + 1, {"method": "get"}) for i in range(count))
            refused = [c.expect(i + 1) for i in range(count)]
            sys.setprofile(profile)
            try:
                c.send(data)
                await until(
                    lambda: engine.pending + sum(m.done() for m in refused) == count,
                    "each request sent or refused",
                )
            finally:
                sys.setprofile(None)
            over = [m for m in refused if m.done() and error_type(m.result()) == "OverLimit"]
            assert len(over) >= count - limit - 5  # (a connection or two may complete)
            assert calls < 5 * count, calls
            cluster = engine.clusters["outbound|9000||svc.test"]
            assert cluster.opening_requests == sum(len(u.pending) for u in cluster.opening)
            c.reset()
            await until(lambda: engine.pending == 0, "the client gone")
            assert cluster.opening and cluster.opening_requests == 0
        hold.close()

    run(main())


def test_a_connection_that_may_open_again_takes_the_oldest_waiting_request_first() -> None:
    """Streams 1 and an upstream connection budget of two, spent on a connection to each of
    two endpoints (two subsets): a request waits for the first endpoint. The second
    endpoint's connection closes, so a connection may open again: the request that waited
    goes on it, not the next one to the first endpoint, which waits its turn. Before, the
    newcomer opened it and was sent, and the one that waited kept waiting for a reply that
    might never come."""
    router = """\
- name: b
  match: {attributes: {method: {exact: tob}}}
  route: [{destination: {host: svc.test, subset: v2}}]
  timeout: 5s
- name: a
  route: [{destination: {host: svc.test, subset: v1}}]
  timeout: 5s
"""

    async def main() -> None:
        a, b = await Holding("a").start(), await Holding("b").start()
        pool = policy("maxConcurrentStreams: 1")
        proxy = "limits: {maxUpstreamConnections: 2}\n"
        text = mesh([(a.port, "v1"), (b.port, "v2")], router, pool, proxy=proxy)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            replies = [c.start("get", {"n": "a0"}), c.start("tob", {"n": "b0"})]
            await a.wait_received(1)
            await b.wait_received(1)
            replies.append(c.start("get", {"n": "a1"}))  # no room, no connection: waits
            await until(lambda: engine.stats.total(WAITING) == 1, "one waiting")
            for conn in list(b.connections):  # b's connection closes: room for one more
                assert conn.transport is not None
                conn.transport.close()
            assert error_type(await asyncio.wait_for(replies[1], 5)) == "UpstreamReset"
            replies.append(c.start("get", {"n": "a2"}))
            await a.wait_received(2)
            assert a.order[:2] == ["a0", "a1"], a.order
            a.answer()
            await a.wait_received(3)
            a.answer()
            answers = await asyncio.wait_for(gather(replies[0], *replies[2:]), 5)
            assert [error_type(r) for r in answers] == [None] * 3
            c.close()
        await a.close()
        await b.close()

    run(main())


def test_each_waiting_request_refused_a_connection_counts_as_an_overflow() -> None:
    """Two endpoints, streams 1, an upstream connection budget of two
    (``limits.maxUpstreamConnections``): two requests wait for each. The first endpoint's
    connection closes, and the retry of its request takes the connection that may open (to
    the second endpoint): the first endpoint has none left, none may open, and its two
    waiting requests are refused. Each counts in ``metaprotocol_upstream_overflow_total``
    as a request refused at once does: the series says what the clients saw (it counted one
    for both)."""
    router = """\
- name: all
  route: [{destination: {host: svc.test}}]
  timeout: 5s
  retries: {attempts: 1, retryOn: reset}
"""

    async def main() -> None:
        a, b = await Holding("a").start(), await Holding("b").start()
        pool = policy("maxConcurrentStreams: 1")
        budget = "limits: {maxUpstreamConnections: 2}\n"
        text = mesh([(a.port, "v1"), (b.port, "v1")], router, pool, proxy=budget)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            replies = [c.start("get", {"n": f"{i}"}) for i in range(6)]  # round robin
            await a.wait_received(1)
            await b.wait_received(1)
            await until(lambda: engine.stats.total(WAITING) == 4, "four waiting")
            for conn in list(a.connections):
                assert conn.transport is not None
                conn.transport.close()
            refused = [replies[2], replies[4]]  # waited for a
            answers = await asyncio.wait_for(gather(*refused), 5)
            assert [error_type(r) for r in answers] == ["OverLimit"] * 2
            overflow = "metaprotocol_upstream_overflow_total"
            assert engine.stats.total(overflow, limit="maxUpstreamConnections") == 2
            c.close()
        await a.close()
        await b.close()

    run(main())


def test_an_endpoint_without_a_connection_gets_one_past_max_connections() -> None:
    """``maxConnections: 1`` on two endpoints of shared connections: the first request opens
    the cluster's one connection, to the first endpoint; the second, to the other endpoint,
    which has none, was refused ``OverLimit`` for a connection of another endpoint's. Envoy
    opens one for a host that has none whatever the limit (counting the overflow), so that
    its requests can be served at all: so does the engine now, within its process budget."""

    async def main() -> None:
        a, b = await Holding("a").start(), await Holding("b").start()
        pool = policy("maxConcurrentStreams: 4", "maxConnections: 1")
        text = mesh([(a.port, "v1"), (b.port, "v1")], ROUTER, pool)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            replies = [c.start("get", {"n": f"{i}"}) for i in range(4)]  # round robin
            await a.wait_received(2)
            await b.wait_received(2)
            assert (a.accepted, b.accepted) == (1, 1)
            a.answer()
            b.answer()
            answers = await asyncio.wait_for(gather(*replies), 5)
            assert [error_type(r) for r in answers] == [None] * 4
            overflow = "metaprotocol_upstream_overflow_total"
            assert engine.stats.total(overflow, limit="maxConnections") == 1
            c.close()
        await a.close()
        await b.close()

    run(main())


def test_requests_that_waited_for_room_are_held_to_http2_max_requests_when_sent() -> None:
    """Streams 2, ``http2MaxRequests: 3``, an upstream connection budget of two, spent on a
    connection to each of two endpoints (two subsets). The second endpoint's is idle: with
    two requests in flight, below the limit, three more wait for the first endpoint. The
    idle connection closes and a reply makes room: the oldest waiting request takes it, the
    next opens a connection, and the third would be the fourth in flight. Envoy checks
    ``max_requests`` as it attaches a pending request to a connection, and fails it as an
    overflow; before, it was sent, and the upstream had four."""
    router = """\
- name: b
  match: {attributes: {method: {exact: tob}}}
  route: [{destination: {host: svc.test, subset: v2}}]
  timeout: 5s
- name: a
  route: [{destination: {host: svc.test, subset: v1}}]
  timeout: 5s
"""

    async def main() -> None:
        a, b = await Holding("a").start(), await Holding("b").start()
        pool = policy("maxConcurrentStreams: 2, http2MaxRequests: 3")
        proxy = "limits: {maxUpstreamConnections: 2}\n"
        text = mesh([(a.port, "v1"), (b.port, "v2")], router, pool, proxy=proxy)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            b0 = c.start("tob", {"n": "b0"})
            await b.wait_received(1)
            b.answer()
            assert error_type(await asyncio.wait_for(b0, 5)) is None  # b's connection: idle
            replies = [c.start("get", {"n": f"a{i}"}) for i in range(5)]
            await a.wait_received(2)
            await until(lambda: engine.stats.total(WAITING) == 3, "three waiting")
            for conn in list(b.connections):  # b's connection closes: room for one more
                assert conn.transport is not None
                conn.transport.close()
            await until(lambda: len(engine.upstreams) == 1, "b's connection closed")
            a.answer(1)  # a0: a2 takes its place, a3 opens a connection, a4 is one too many
            refused = await asyncio.wait_for(replies[4], 5)
            assert error_type(refused) == "OverLimit"
            assert "http2MaxRequests" in refused.attributes["error-message"]
            await a.wait_received(4)
            assert len(a.held) == 3, a.order
            a.answer()
            answers = await asyncio.wait_for(gather(*replies[:4]), 5)
            assert [error_type(r) for r in answers] == [None] * 4
            assert (engine.stats.total(WAITING), engine.pending) == (0, 0)
            c.close()
        await a.close()
        await b.close()

    run(main())


def test_a_mirror_s_copy_never_waits_for_room() -> None:
    """Streams 1 and one connection to the mirror, whose upstream holds its replies: the
    first copy takes the connection, and the next ones, finding it full, are dropped
    (counted ``Dropped``), never sent past the limit nor kept waiting."""
    router = """\
- name: mirrored
  route: [{destination: {host: svc.test, subset: v1}}]
  mirror: {host: svc.test, subset: v2}
  timeout: 5s
"""

    async def main() -> None:
        primary, mirror = await Upstream("primary").start(), await Holding("mirror").start()
        pool = policy("maxConcurrentStreams: 1", "maxConnections: 1")
        text = mesh([(primary.port, "v1"), (mirror.port, "v2")], router, pool)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            for _ in range(3):
                assert error_type(await c.call("get")) is None
            await mirror.wait_received(1)
            name = "metaprotocol_mirror_total"
            assert engine.stats.total(name, status="Dropped") == 2
            assert (len(mirror.received), mirror.peak, engine.stats.total(WAITING)) == (1, 1, 0)
            mirror.answer()
            await until(lambda: engine.mirror_sink.inflight == 0, "the copy answered")
            c.close()
        await primary.close()
        await mirror.close()

    run(main())


def test_requests_waiting_on_a_client_s_own_connection_that_is_lost_go_on_a_new_one() -> None:
    """Streams 1 on a client's own connection: one request in flight, one waiting. The
    upstream resets the connection: the first is answered ``UpstreamReset``, and the one
    that waited goes on the client's next connection (it was left on the lost one's queue,
    to time out)."""

    async def main() -> None:
        up = await Holding("a").start()
        text = mesh([(up.port, "v1")], ROUTER, policy("maxConcurrentStreams: 1"), **NO_REWRITE)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            first, waited = send(c, 2)
            await up.wait_received(1)
            await until(lambda: engine.stats.total(WAITING) == 1, "one waiting")
            for conn in list(up.connections):
                assert conn.transport is not None
                conn.transport.abort()
            assert error_type(await asyncio.wait_for(first, 5)) == "UpstreamReset"
            await up.wait_received(2)
            up.answer()
            assert (await asyncio.wait_for(waited, 5)).attributes["n"] == "1"
            assert (up.accepted, engine.stats.total(WAITING)) == (2, 0)
            c.close()
        await up.close()

    run(main())


def test_a_connection_whose_every_id_a_timed_out_request_holds_is_replaced() -> None:
    """Three ids (two requests per connection), one connection: both requests on it time
    out and keep their ids (their late replies may come). A request waiting for room goes
    on a fresh connection: the full one retired, and closed, as nothing live is on it. It
    waited for the ids' late replies, and timed out."""

    async def main() -> None:
        up = await Upstream("a").start()
        pool = policy("maxConcurrentStreams: 2", "maxConnections: 1")
        text = mesh([(up.port, "v1")], HANG + ROUTER, pool, codec=f"{__name__}:ThreeIdKV")
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            hung = [c.start("hang"), c.start("hang")]
            await up.wait_received(2)
            waited = c.start("get")
            await until(lambda: engine.stats.total(WAITING) == 1, "one waiting")
            answers = await asyncio.wait_for(gather(*hung), 5)
            assert [error_type(a) for a in answers] == ["Timeout"] * 2
            assert error_type(await asyncio.wait_for(waited, 5)) is None
            assert up.accepted == 2
            c.close()
        await up.close()

    run(main())


class ThreeIdNoPeekKV(ThreeIdKV):
    """Three ids, and no ``peek_reply``: every reply is decoded."""

    capabilities = dataclasses.replace(KVCodec.capabilities, peek_reply=False)


@pytest.mark.parametrize("codec", ["ThreeIdKV", "ThreeIdNoPeekKV"])
def test_a_late_reply_frees_the_place_of_its_timed_out_request(codec: str) -> None:
    """Three ids (two requests per connection): a request times out and keeps its id; its
    late reply comes and frees it. Another request times out: one place of two is held, so
    the next request goes on the same connection. Checked with the reply peeked and
    decoded (two paths). The place a late reply freed would stay counted as held, and the
    second timeout retire the connection as if both were."""
    first = HANG.replace("exact: hang", "exact: first")

    async def main() -> None:
        up = await Holding("a").start()
        text = mesh([(up.port, "v1")], first + ROUTER, codec=f"{__name__}:{codec}")
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            assert error_type(await c.call("first", {"n": "a"})) == "Timeout"
            unmatched = "metaprotocol_upstream_unmatched_replies_total"
            answer_n(up, "a")  # late: dropped, its id free again
            await until(lambda: engine.stats.total(unmatched) == 1, "the late reply")
            assert error_type(await c.call("first", {"n": "b"})) == "Timeout"
            third = c.start("get", {"n": "c"})
            await up.wait_received(3)
            answer_n(up, "c")
            assert error_type(await asyncio.wait_for(third, 5)) is None
            assert up.accepted == 1
            c.close()
        await up.close()

    run(main())


def test_requests_waiting_on_a_client_s_own_connection_that_retires_go_on_a_new_one() -> None:
    """Streams 2 and three requests per connection on a client's own connection: two in
    flight, two waiting. A reply lets the third go, which retires the connection; the fourth
    goes on the client's next connection at once, not after the retired one's requests are
    answered."""

    async def main() -> None:
        up = await Holding("a").start()
        pool = policy("maxConcurrentStreams: 2, maxRequestsPerConnection: 3")
        async with engine_for(mesh([(up.port, "v1")], ROUTER, pool, **NO_REWRITE)) as engine:
            c = await Client.connect(address(engine))
            replies = send(c, 4)
            await up.wait_received(2)
            await until(lambda: engine.stats.total(WAITING) == 2, "two waiting")
            up.answer(1)
            await up.wait_received(4)  # the two held ones unanswered
            assert (up.accepted, up.order) == (2, ["0", "1", "2", "3"])
            up.answer()
            answers = await asyncio.wait_for(gather(*replies), 5)
            assert [a.attributes["n"] for a in answers] == ["0", "1", "2", "3"]
            c.close()
        await up.close()

    run(main())


def test_a_waiting_request_whose_client_left_is_reported_against_its_endpoint() -> None:
    """Istio's metrics of a request that waited for room and whose client left (``0``,
    ``DC``) name the endpoint it waited for (``destination_version``), whichever side saw
    the client go: the client's close, or the room made for it. The client's close
    reported it against no endpoint (``unknown``)."""
    from test_telemetry import istio_series, with_istio

    async def main() -> None:
        up = await Holding("a").start()
        pool = policy("maxConcurrentStreams: 1", "maxConnections: 1")
        engine = with_istio(mesh([(up.port, "v1")], ROUTER, pool))
        await engine.start()
        try:
            c = await Client.connect(address(engine))
            first = c.start("get", {"n": "0"})
            await up.wait_received(1)
            leaving = await Client.connect(address(engine))
            leaving.start("get", {"n": "gone"}).add_done_callback(lambda f: f.exception())
            await until(lambda: engine.stats.total(WAITING) == 1, "one waiting")
            leaving.reset()
            await until(lambda: engine.stats.total(WAITING) == 0, "none waiting")
            up.answer()
            assert error_type(await asyncio.wait_for(first, 5)) is None
            gone = [s for s in istio_series(engine) if s["response_flags"] == "DC"]
            assert [(s["destination_version"], s["value"]) for s in gone] == [("v1", "1")]
            c.close()
        finally:
            await engine.stop()
            await up.close()

    run(main())
