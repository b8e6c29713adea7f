"""The process's connection budget: how ``maxConnections`` and ``maxUpstreamConnections``
default from ``RLIMIT_NOFILE``, their validation, and upstream connections past the budget
(reused or refused with ``OverLimit``, counted), over real sockets on 127.0.0.1.

The subprocess test with a low ``RLIMIT_NOFILE`` is in ``test_hostile_clients.py``."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

import pytest
from proxy_kit import (
    ONEWAY,
    Client,
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

from metaprotocol_sdk import ConfigError
from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.engine import (
    FD_RESERVE,
    ConnectionBudget,
    _LoopErrors,
    connection_budget,
)

NO_REWRITE = {"protocol": "kvnr", "codec": "proxy_test_codecs:NoRewriteKVCodec"}
ROUND_ROBIN = "{loadBalancer: {simple: ROUND_ROBIN}}"
OVERFLOW = "metaprotocol_upstream_overflow_total"
CLOSED = "metaprotocol_upstream_connections_closed_total"


# -- defaults and validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "shared", "dedicated", "expected"),
    [
        # Shared pooling only: clients get what the shared connections leave; upstream
        # connections have no cap of their own (they take what clients leave).
        ((None, None), 3, False, (1024 - FD_RESERVE - 3, 1024 - FD_RESERVE, 960)),
        # Per-client pooling (or xDS): the rest is halved, clients and their connections.
        ((None, None), 0, True, (480, 480, 960)),
        ((None, None), 4, True, (478, 482, 960)),
        # One set: the other gets what it leaves.
        ((100, None), 0, True, (100, 860, 960)),
        ((None, 100), 0, True, (860, 100, 960)),
        ((None, 100), 0, False, (860, 100, 960)),
        ((100, None), 0, False, (100, 960, 960)),
        # Set beyond the descriptors: kept (a warning says so), the total still bounds them;
        # the other gets half (not one client, not every descriptor for upstream ones).
        ((5000, None), 0, True, (5000, 480, 960)),
        ((None, 5000), 0, True, (480, 5000, 960)),
        ((None, 5000), 0, False, (480, 5000, 960)),
        ((None, 900), 0, False, (480, 900, 960)),
        ((900, None), 0, True, (900, 480, 960)),
        ((7, 9), 0, True, (7, 9, 960)),
    ],
)
def test_budget_defaults_from_rlimit_nofile(
    limits: tuple[int | None, int | None], shared: int, dedicated: bool, expected: tuple[int, ...]
) -> None:
    budget = connection_budget(1024, limits[0], limits[1], shared, dedicated)
    assert budget == ConnectionBudget(*expected)


def test_budget_never_gives_more_than_the_descriptors_by_default() -> None:
    for nofile in (1, 64, 65, 66, 100, 160, 256, 1024, 65536, 1 << 20):
        for shared in (0, 1, 10, 1000):
            for dedicated in (False, True):
                budget = connection_budget(nofile, None, None, shared, dedicated)
                assert budget.clients >= 1 and budget.upstreams >= 1
                if dedicated and nofile - FD_RESERVE >= 2 + shared:
                    assert budget.clients + budget.upstreams == budget.descriptors
                    assert budget.upstreams >= budget.clients + shared  # one each, and shared
                assert budget.descriptors == max(2, nofile - FD_RESERVE)


def _limits_mesh(limits: str) -> str:
    return mesh([(9, "v1")], proxy=f"limits: {limits}\n")


def test_max_upstream_connections_is_read() -> None:
    config = loads_config(_limits_mesh("{maxUpstreamConnections: 7}"), "mesh.yaml")
    assert config.proxy.limits.max_upstream_connections == 7
    assert loads_config(_limits_mesh("{}")).proxy.limits.max_upstream_connections is None


@pytest.mark.parametrize("value", ["0", "-1", "'100'", "true", "1.5", "[1]"])
def test_max_upstream_connections_is_validated(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads_config(_limits_mesh(f"{{maxUpstreamConnections: {value}}}"), "mesh.yaml")
    assert info.value.field == "spec.limits.maxUpstreamConnections"


def test_a_budget_beyond_the_descriptors_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        text = _limits_mesh("{maxConnections: 10000000, maxUpstreamConnections: 10}")
        async with engine_for(text) as engine:
            assert (engine.max_connections, engine.max_upstream_connections) == (10_000_000, 10)

    with caplog.at_level(logging.WARNING, logger="metaprotocol.proxy"):
        run(main())
    assert "more than the" in caplog.text and "RLIMIT_NOFILE" in caplog.text


# -- past the budget ---------------------------------------------------------------------------


async def _endpoints(n: int) -> list[Upstream]:
    return [await Upstream(f"u{i}").start() for i in range(n)]


def test_a_client_past_the_budget_reuses_its_connections_and_a_new_one_takes_an_idle_one() -> None:
    """5 endpoints, round robin, a budget of 3 upstream connections: the first client opens 3
    and sends the rest over them (it takes no one's: it has its own); the next has none and
    takes the place of one of the first's, idle (counted as reclaimed), then reuses it. The
    first is served on, over the two it has left."""

    async def main() -> None:
        ups = await _endpoints(5)
        text = mesh(
            [(u.port, "v1") for u in ups],
            traffic_policy=ROUND_ROBIN,
            proxy="limits: {maxUpstreamConnections: 3}\n",
            **NO_REWRITE,
        )
        async with engine_for(text) as engine:
            first = await Client.connect(address(engine))
            replies = await asyncio.wait_for(asyncio.gather(*(first.start() for _ in range(10))), 5)
            assert [error_type(r) for r in replies] == [None] * 10
            assert len(engine.upstreams) == 3 and sum(u.accepted for u in ups) == 3
            stats = engine.stats
            assert stats.total(CLOSED, reason="reclaimed") == 0
            second = await Client.connect(address(engine))
            served = await asyncio.wait_for(asyncio.gather(second.start(), second.start()), 5)
            assert [(r.request_id, error_type(r)) for r in served] == [(1, None), (2, None)]
            assert stats.total(CLOSED, reason="reclaimed") == 1
            assert sorted(len(d.dedicated) for d in engine.downstreams) == [1, 2]
            replies = await asyncio.wait_for(asyncio.gather(*(first.start() for _ in range(5))), 5)
            assert [error_type(r) for r in replies] == [None] * 5
            assert stats.total(CLOSED, reason="reclaimed") == 1  # it reused its own
            assert len(engine.upstreams) == 3
            assert stats.total(OVERFLOW) == 0
            assert stats.total("metaprotocol_local_replies_total") == 0
            assert stats.total("metaprotocol_upstream_connect_errors_total") == 0
            first.close()
            second.close()
        for u in ups:
            await u.close()

    run(main())


def _holders(engine: Engine, clients: dict[str, Client]) -> set[str]:
    """Which of ``clients`` (by name) have an upstream connection of their own."""
    ports = {
        d.transport.get_extra_info("peername")[1]
        for d in engine.downstreams
        if d.dedicated and d.transport is not None
    }
    return {
        name
        for name, c in clients.items()
        if c.transport is not None and c.transport.get_extra_info("sockname")[1] in ports
    }


def test_clients_that_reached_every_endpoint_and_sit_idle_do_not_deny_the_next() -> None:
    """5 endpoints, a budget of 10: two clients reach every endpoint (5 connections each,
    the whole budget) and sit idle. Each client that comes after takes the place of the
    connection idle longest and is served; so are the idle clients when they come back,
    over the connections they have left. Nobody gets OverLimit, nothing is reset."""

    async def main() -> None:
        ups = await _endpoints(5)
        text = mesh(
            [(u.port, "v1") for u in ups],
            traffic_policy=ROUND_ROBIN,
            proxy="limits: {maxUpstreamConnections: 10}\n",
            **NO_REWRITE,
        )
        async with engine_for(text) as engine:
            idle = [await Client.connect(address(engine)) for _ in range(2)]
            for c in idle:
                for _ in range(5):
                    assert error_type(await c.call()) is None
            assert len(engine.upstreams) == 10
            assert sorted(len(d.dedicated) for d in engine.downstreams) == [5, 5]
            later = [await Client.connect(address(engine)) for _ in range(3)]
            for c in later:
                replies = await asyncio.wait_for(asyncio.gather(*(c.start() for _ in range(5))), 5)
                assert [error_type(r) for r in replies] == [None] * 5
            stats = engine.stats
            assert stats.total(CLOSED, reason="reclaimed") == 3
            # The longest idle went: the first client's first three.
            assert sorted(len(d.dedicated) for d in engine.downstreams) == [1, 1, 1, 2, 5]
            for c in idle:
                replies = await asyncio.wait_for(asyncio.gather(*(c.start() for _ in range(5))), 5)
                assert [error_type(r) for r in replies] == [None] * 5
            assert stats.total(CLOSED, reason="reclaimed") == 3
            assert stats.total(OVERFLOW) == 0
            assert stats.total("metaprotocol_local_replies_total") == 0
            assert len(engine.upstreams) == 10 and len(engine.downstreams) == 5
            for c in [*idle, *later]:
                assert not c.closed.done()
                c.close()
        for u in ups:
            await u.close()

    run(main())


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_client_whose_connection_was_reclaimed_is_served_at_its_next_request(loop: str) -> None:
    """One endpoint, a budget of 2: a, b served, idle; c takes the place of a's (the longest
    idle); a's next request takes b's, b's takes c's. Every request is served, no client is
    reset, and each time the connection idle longest is the one that goes."""

    async def main() -> None:
        (up,) = await _endpoints(1)
        text = mesh([(up.port, "v1")], proxy="limits: {maxUpstreamConnections: 2}\n", **NO_REWRITE)
        async with engine_for(text) as engine:
            clients: dict[str, Client] = {}
            for name in "abc":
                clients[name] = await Client.connect(address(engine))
            await until(lambda: len(engine.downstreams) == 3, "three clients")
            for name in "ab":
                assert error_type(await clients[name].call()) is None
            assert _holders(engine, clients) == {"a", "b"}
            for name, holders in (("c", "bc"), ("a", "ca"), ("b", "ab"), ("c", "bc")):
                reply = await clients[name].call()
                assert error_type(reply) is None and reply.attributes["server"] == "u0"
                assert _holders(engine, clients) == set(holders), name
            stats = engine.stats
            assert stats.total(CLOSED, reason="reclaimed") == 4
            assert stats.total(OVERFLOW) == 0
            assert stats.total("metaprotocol_local_replies_total") == 0
            assert up.accepted == 6 and len(engine.upstreams) == 2
            assert engine.clients_with_upstream == _with_upstream(engine) == 2
            for c in clients.values():
                assert not c.closed.done()
                c.close()
        await up.close()

    run(main(), loop=loop)


def test_a_connection_with_a_request_in_flight_is_never_reclaimed() -> None:
    """One endpoint, a budget of 2. a's connection was idle first, then holds a slow request;
    b's is idle: c takes b's, not a's, and holds a slow request too. Then nothing is idle and
    d gets OverLimit. The slow requests are answered as usual once released; then d is
    served in the place of one of theirs."""

    async def main() -> None:
        (up,) = await _endpoints(1)
        text = mesh([(up.port, "v1")], proxy="limits: {maxUpstreamConnections: 2}\n", **NO_REWRITE)
        async with engine_for(text) as engine:
            clients: dict[str, Client] = {}
            for name in "abcd":
                clients[name] = await Client.connect(address(engine))
            a, b, c, d = clients.values()
            await until(lambda: len(engine.downstreams) == 4, "four clients")
            assert error_type(await a.call()) is None  # a's connection: the first idle
            slow_a = a.start("slow")
            await up.wait_received(2)
            assert error_type(await b.call()) is None
            slow_c = c.start("slow")
            await up.wait_received(4)
            assert _holders(engine, clients) == {"a", "c"}
            stats = engine.stats
            assert stats.total(CLOSED, reason="reclaimed") == 1
            refused = await d.call()
            assert error_type(refused) == "OverLimit"
            message = refused.attributes["error-message"]
            assert message == "too many upstream connections (limits.maxUpstreamConnections 2)"
            assert stats.total(OVERFLOW, limit="maxUpstreamConnections") == 1
            assert stats.total(CLOSED, reason="reclaimed") == 1
            up.release.set()
            for slow in (slow_a, slow_c):
                reply = await asyncio.wait_for(slow, 5)
                assert error_type(reply) is None and reply.attributes["server"] == "u0"
            assert error_type(await d.call()) is None
            assert stats.total(CLOSED, reason="reclaimed") == 2
            assert stats.total("metaprotocol_upstream_resets_total") == 0
            for client in clients.values():
                client.close()
        await up.close()

    run(main())


def test_a_shared_connection_may_take_an_idle_one_s_place_and_is_never_taken() -> None:
    """Two services, a budget of 1: a client of the one without id rewriting holds the only
    connection, idle; a client of the id-rewriting one needs its endpoint's shared
    connection and takes the idle one's place. The shared connection is never reclaimed: the
    first client's next request finds none idle and gets OverLimit; the other is served on."""

    async def main() -> None:
        shared_up, own_up = await _endpoints(2)
        extra = f"""\
            apiVersion: metaprotocol.aeraki.io/v1alpha1
            kind: ApplicationProtocol
            metadata: {{name: kvnr}}
            spec: {{protocol: kvnr, codec: "proxy_kit:NoRewriteKVCodec"}}
            ---
            apiVersion: networking.istio.io/v1beta1
            kind: ServiceEntry
            metadata: {{name: own}}
            spec:
              hosts: [own.test]
              ports: [{{number: 9001, name: tcp-metaprotocol-kvnr-own, protocol: TCP}}]
              resolution: STATIC
              endpoints:
                - {{address: 127.0.0.1, ports: {{tcp-metaprotocol-kvnr-own: {own_up.port}}}}}
            """
        text = mesh(
            [(shared_up.port, "v1")], proxy="limits: {maxUpstreamConnections: 1}\n", extra=extra
        )
        listeners = "listeners: [{host: svc.test, port: 9000, bind: '127.0.0.1:0'}"
        assert listeners in text
        text = text.replace(
            listeners, listeners + ", {host: own.test, port: 9001, bind: '127.0.0.1:0'}"
        )
        async with engine_for(text) as engine:
            own = await Client.connect(engine.listener_addresses[("own.test", 9001)])
            assert error_type(await own.call()) is None
            other = await Client.connect(address(engine))
            reply = await other.call()
            assert error_type(reply) is None and reply.attributes["server"] == "u0"
            stats = engine.stats
            assert stats.total(CLOSED, reason="reclaimed") == 1
            refused = await own.call()
            assert error_type(refused) == "OverLimit"
            assert error_type(await other.call()) is None
            assert stats.total(CLOSED, reason="reclaimed") == 1
            assert len(engine.upstreams) == 1 and not own.closed.done()
            own.close()
            other.close()
        await shared_up.close()
        await own_up.close()

    run(main())


def test_no_connection_is_closed_for_nothing_when_too_few_are_idle() -> None:
    """The connections open are two more than the budget now allows (as when client
    connections took descriptors since) and one is idle: closing it would not make room, so
    it stays open and the request gets OverLimit. With the budget one short, it goes."""

    async def main() -> None:
        ups = await _endpoints(3)
        text = mesh(
            [(u.port, "v1") for u in ups],
            traffic_policy=ROUND_ROBIN,
            proxy="limits: {maxUpstreamConnections: 3}\n",
            **NO_REWRITE,
        )
        async with engine_for(text) as engine:
            busy = await Client.connect(address(engine))
            held = [busy.start("slow") for _ in range(2)]  # two endpoints, requests held there
            await until(lambda: sum(len(u.received) for u in ups) == 2, "both upstream")
            idle = await Client.connect(address(engine))
            assert error_type(await idle.call()) is None  # the third endpoint, idle since
            late = await Client.connect(address(engine))
            await until(lambda: len(engine.downstreams) == 3, "three clients")
            assert len(engine.upstreams) == 3
            engine.max_upstream_connections = 2  # three open, two allowed
            refused = await late.call()
            assert error_type(refused) == "OverLimit"
            stats = engine.stats
            assert stats.total(CLOSED, reason="reclaimed") == 0
            assert len(engine.upstreams) == 3
            engine.max_upstream_connections = 3
            assert error_type(await late.call()) is None
            assert stats.total(CLOSED, reason="reclaimed") == 1
            for u in ups:
                u.release.set()
            for reply in await asyncio.wait_for(asyncio.gather(*held), 5):
                assert error_type(reply) is None
            for c in (busy, idle, late):
                c.close()
        for u in ups:
            await u.close()

    run(main())


def test_a_connection_with_bytes_unsent_is_not_reclaimed_until_they_are_out() -> None:
    """One endpoint that reads nothing, a budget of 1: a's connection has nothing in flight
    but a large one-way message unsent, so b gets OverLimit rather than have it dropped. Once
    the endpoint reads it, the sweep lists the connection as idle again and b takes it."""

    async def main() -> None:
        up = Upstream("u0")
        up.reading_paused = True
        await up.start(rcvbuf=4096)
        text = mesh(
            [(up.port, "v1")],
            proxy="limits: {maxUpstreamConnections: 1}\n"
            "timeouts: {frame: 400ms}\n",  # a sweep every 100 ms
            **NO_REWRITE,
        )
        async with engine_for(text) as engine:
            a = await Client.connect(address(engine))
            b = await Client.connect(address(engine))
            a.send(build_frame(ONEWAY, 1, {"method": "notify"}, b"n" * (6 << 20)))
            await until(lambda: len(engine.upstreams) == 1, "a's connection")
            conn = next(iter(engine.upstreams))
            await until(lambda: conn.write_paused, "the upstream's buffers full")
            refused = await b.call()
            assert error_type(refused) == "OverLimit"
            stats = engine.stats
            assert stats.total(CLOSED, reason="reclaimed") == 0
            assert not conn.closed
            up.resume_reading()
            await up.wait_received(1)
            await until(lambda: conn in engine.idle_upstreams, "listed idle again")
            assert error_type(await b.call()) is None
            assert stats.total(CLOSED, reason="reclaimed") == 1
            assert len(bytes(up.received[0].body)) == 6 << 20
            a.close()
            b.close()
        await up.close()

    run(main(), timeout=30)


def test_clients_with_connections_leave_one_for_each_client_without() -> None:
    """A budget of 4, three clients connected: the first opens 2 (one is kept for each of
    the other two), then reuses them; the others get one each. Nobody is refused."""

    async def main() -> None:
        ups = await _endpoints(5)
        text = mesh(
            [(u.port, "v1") for u in ups],
            traffic_policy=ROUND_ROBIN,
            proxy="limits: {maxUpstreamConnections: 4}\n",
            **NO_REWRITE,
        )
        async with engine_for(text) as engine:
            clients = [await Client.connect(address(engine)) for _ in range(3)]
            await until(lambda: len(engine.downstreams) == 3, "three clients")
            for c in clients:
                replies = await asyncio.wait_for(asyncio.gather(*(c.start() for _ in range(5))), 5)
                assert [error_type(r) for r in replies] == [None] * 5
            assert [len(d.dedicated) for d in engine.downstreams] in (
                [2, 1, 1],
                [1, 2, 1],
                [1, 1, 2],
            )
            assert len(engine.upstreams) == 4 and engine.clients_with_upstream == 3
            assert engine.stats.total(OVERFLOW) == 0
            for c in clients:
                c.close()
            await until(
                lambda: engine.clients_with_upstream == 0 and not engine.upstreams, "all closed"
            )
        for u in ups:
            await u.close()

    run(main())


def test_shared_connections_count_in_the_budget_too() -> None:
    """Id-rewriting codecs share a connection per endpoint: past the budget an endpoint
    without one is refused (``OverLimit``), the others serve."""

    async def main() -> None:
        ups = await _endpoints(3)
        text = mesh(
            [(u.port, "v1") for u in ups],
            traffic_policy=ROUND_ROBIN,
            proxy="limits: {maxUpstreamConnections: 2}\n",
        )
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            replies = await asyncio.wait_for(asyncio.gather(*(c.start() for _ in range(6))), 5)
            kinds = [error_type(r) for r in replies]
            assert kinds == [None, None, "OverLimit"] * 2
            assert len(engine.upstreams) == 2
            assert engine.stats.total(OVERFLOW, limit="maxUpstreamConnections") == 2
            c.close()
        for u in ups:
            await u.close()

    run(main())


def test_client_and_upstream_connections_share_the_descriptors() -> None:
    """Past the descriptors RLIMIT_NOFILE leaves, whichever side would take one more is
    refused: an upstream connection (OverLimit), a client (closed at once, counted)."""

    async def main() -> None:
        ups = await _endpoints(3)
        text = mesh([(u.port, "v1") for u in ups], traffic_policy=ROUND_ROBIN, **NO_REWRITE)
        async with engine_for(text) as engine:
            engine.descriptors = 3  # as if RLIMIT_NOFILE left three connections
            c = await Client.connect(address(engine))
            replies = await asyncio.wait_for(asyncio.gather(*(c.start() for _ in range(3))), 5)
            assert [error_type(r) for r in replies] == [None] * 3  # 2 opened, 1 reused
            assert len(engine.upstreams) == 2
            late = await Client.connect(address(engine))
            await asyncio.wait_for(late.closed, 5)  # refused at the accept
            rejected = "metaprotocol_downstream_connections_rejected_total"
            assert engine.stats.total(rejected, reason="max_connections") == 1
            c.close()
        async with engine_for(text) as engine:
            engine.descriptors = 2
            c = await Client.connect(address(engine))
            replies = await asyncio.wait_for(asyncio.gather(c.start(), c.start()), 5)
            assert [error_type(r) for r in replies] == [None, None]  # 1 opened, 1 reused
            slow = c.start("slow")  # its connection busy: none to take the place of
            await until(
                lambda: any(m.operation_name == "slow" for u in ups for m in u.received),
                "the slow request upstream",
            )
            engine.descriptors = 3  # room for one more client, none for its upstream connection
            other = await Client.connect(address(engine))
            refused = await other.call()
            assert error_type(refused) == "OverLimit"
            assert "no descriptors left" in refused.attributes["error-message"]
            assert engine.stats.total(OVERFLOW, limit="maxUpstreamConnections") == 1
            for u in ups:
                u.release.set()
            assert error_type(await asyncio.wait_for(slow, 5)) is None
            c.close()
            other.close()
        for u in ups:
            await u.close()

    run(main())


def test_one_client_cannot_take_every_descriptor_when_max_connections_is_large() -> None:
    """``maxConnections`` above the descriptors and per-client upstream connections: the
    upstream connections get half the descriptors, so a client reaching many endpoints (it
    reuses its own past them) leaves room for the next clients, which are accepted."""

    async def main() -> None:
        ups = await _endpoints(12)
        text = mesh(
            [(u.port, "v1") for u in ups],
            traffic_policy=ROUND_ROBIN,
            proxy="limits: {maxConnections: 5000}\n",
            **NO_REWRITE,
        )
        async with engine_for(text) as engine:
            # As if RLIMIT_NOFILE left 12 connections.
            budget = connection_budget(FD_RESERVE + 12, 5000, None, 0, True)
            engine.descriptors = budget.descriptors
            engine.max_upstream_connections = budget.upstreams
            first = await Client.connect(address(engine))
            replies = await asyncio.wait_for(asyncio.gather(*(first.start() for _ in range(24))), 5)
            assert [error_type(r) for r in replies] == [None] * 24
            assert len(engine.upstreams) == 6
            others = [await Client.connect(address(engine)) for _ in range(3)]
            await until(lambda: len(engine.downstreams) == 4, "the others accepted")
            rejected = "metaprotocol_downstream_connections_rejected_total"
            assert engine.stats.total(rejected) == 0
            for c in [first, *others]:
                c.close()
        for u in ups:
            await u.close()

    run(main())


# -- the count of clients with connections of their own ----------------------------------------


def _with_upstream(engine: Engine) -> int:
    """The truth ``clients_with_upstream`` must equal: clients with a connection of their own."""
    return sum(1 for d in engine.downstreams if d.dedicated)


def _full_backlog_port() -> int:
    """A port whose accept queue is full: connecting to it hangs (SYNs are dropped)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    filler = socket.create_connection(s.getsockname())
    _BACKLOG.extend((s, filler))
    return int(s.getsockname()[1])


_BACKLOG: list[socket.socket] = []


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_count_of_clients_with_connections_stays_exact_under_churn(loop: str) -> None:
    """Clients come and go while their connections fail to connect (a refusing endpoint),
    hang connecting (left mid-connect), are retired (maxRequestsPerConnection, idle,
    maxConnectionDuration) and are cut by a reload that removes their endpoints: after each
    round the engine's count of clients with connections of their own is the truth, and 0
    once they have all left (a count that drifts up refuses upstream connections for good;
    one that drifts down lets a few clients take the whole budget)."""

    async def main() -> None:
        ups = await _endpoints(2)
        ports = [ups[0].port, ups[1].port, refusing_port(), _full_backlog_port()]
        pool = (
            "{tcp: {maxConnectionDuration: 100ms}, "
            "http: {maxRequestsPerConnection: 2, idleTimeout: 50ms}}"
        )
        policy = f"{{loadBalancer: {{simple: ROUND_ROBIN}}, connectionPool: {pool}}}"
        proxy = "limits: {maxUpstreamConnections: 40}\ntimeouts: {connect: 200ms, drain: 100ms}\n"

        def text(endpoints: list[int]) -> str:
            return mesh(
                [(p, "v1") for p in endpoints], traffic_policy=policy, proxy=proxy, **NO_REWRITE
            )

        async with engine_for(text(ports)) as engine:

            def retired() -> float:
                closed = "metaprotocol_upstream_connections_closed_total"
                stats = engine.stats
                return stats.total(closed, reason="idle") + stats.total(
                    closed, reason="max_connection_duration"
                )

            async def exact(what: str) -> None:
                await until(lambda: engine.clients_with_upstream == _with_upstream(engine), what)

            for round_ in range(4):
                before = retired()
                clients = [await Client.connect(address(engine)) for _ in range(8)]
                await until(lambda: len(engine.downstreams) == 8, "eight clients")
                sent = [c.start() for c in clients for _ in range(3)]
                if round_ < 3:  # the hanging endpoint is there until the reload
                    await until(lambda: any(u.connecting for u in engine.upstreams), "hanging")
                await exact(f"round {round_}: sent")
                if round_ == 2:  # the endpoints go: their connections are cut at the drain
                    await engine.apply(loads_config(text(ports[:1]), "t.yaml"))
                    await exact("reloaded")
                for i, c in enumerate(clients[:4]):  # these leave with their connections
                    c.reset() if i % 2 else c.close()  # (some of them still connecting)
                await until(lambda: len(engine.downstreams) == 4, "four left")
                await exact(f"round {round_}: four left")
                if round_ != 2:  # (the reload retired them all)
                    await until(lambda b=before: retired() > b, f"round {round_}: retired")  # type: ignore[misc]
                await exact(f"round {round_}: retired")
                for c in clients[4:]:
                    c.reset()
                await until(lambda: not engine.downstreams, "all left")
                assert engine.clients_with_upstream == 0
                for f in sent:
                    if not f.done():
                        f.cancel()
                    elif not f.cancelled():
                        f.exception()  # retrieved: a client that left gets ConnectionResetError
        for u in ups:
            await u.close()

    run(main(), loop=loop)


# -- out of descriptors in the event loop ------------------------------------------------------


def test_running_out_of_descriptors_in_the_loop_logs_a_line_not_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        handler = _LoopErrors()
        exc = OSError(errno.EMFILE, "Too many open files")
        for _ in range(5):
            handler(loop, {"message": "socket.accept() out of system resource", "exception": exc})
        handler.logged -= 2.0  # a second and more later
        handler(loop, {"message": "socket.accept() out of system resource", "exception": exc})
        handler(loop, {"message": "something else", "exception": ValueError("boom")})

    with caplog.at_level(logging.ERROR):
        run(main())
    emfile = [r for r in caplog.records if "out of system resource" in r.getMessage()]
    assert [r.getMessage() for r in emfile] == [
        "socket.accept() out of system resource: Too many open files",
        "socket.accept() out of system resource: Too many open files (4 more since the last)",
    ]
    assert all(r.exc_info is None for r in emfile)
    assert any("something else" in r.getMessage() for r in caplog.records)  # as by default


def test_the_engine_sets_its_loop_handler_only_when_there_is_none() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with engine_for(mesh([(9, "v1")])):
            assert isinstance(loop.get_exception_handler(), _LoopErrors)
        assert loop.get_exception_handler() is None

        def mine(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
            pass

        loop.set_exception_handler(mine)
        engine = Engine(loads_config(mesh([(9, "v1")])))
        await engine.start()
        assert loop.get_exception_handler() is mine
        await engine.stop(drain=0.1)
        assert loop.get_exception_handler() is mine

    run(main())


def test_mirror_copies_refused_by_the_budget_are_counted_as_overflow() -> None:
    """A mirror copy that finds no connection under the budget is dropped (the primary is
    served) and counted in the overflow series as a refused request is."""
    router = (
        "- name: mirrored\n"
        "  route: [{destination: {host: svc.test, subset: v1}}]\n"
        "  mirror: {host: svc.test, subset: v2}\n"
    )

    async def main() -> None:
        primary, mirror = await _endpoints(2)
        text = mesh(
            [(primary.port, "v1"), (mirror.port, "v2")],
            router=router,
            proxy="limits: {maxUpstreamConnections: 1}\n",
        )
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            replies = await asyncio.wait_for(asyncio.gather(*(c.start() for _ in range(4))), 5)
            assert [error_type(r) for r in replies] == [None] * 4
            assert len(engine.upstreams) == 1
            assert engine.stats.total("metaprotocol_mirror_total", status="Dropped") == 4
            assert engine.stats.total(OVERFLOW, limit="maxUpstreamConnections") == 4
            c.close()
        await primary.close()
        await mirror.close()

    run(main())
