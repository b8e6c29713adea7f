"""Traffic policies in combination, with misbehaving clients and upstreams, over real sockets.

Each feature has its own tests elsewhere; these drive two or more at once (retries with a
weighted split, a fault's hold with a drain, retries with outlier detection, ...) and check
the contract: every request answered exactly once, in bounded time, and the stats agree with
what the client saw (:func:`outcomes_agree`).
"""

from __future__ import annotations

import asyncio
import sys
import types
from collections import Counter

import pytest
from proxy_kit import (
    ERROR,
    ONEWAY,
    Client,
    KVServer,
    Upstream,
    address,
    build_frame,
    engine_for,
    error_type,
    mesh,
    run,
    until,
)

from metaprotocol_sdk import Metadata
from metaprotocol_sdk.filters import Filter, ResponseContext
from metaprotocol_sdk.proxy import Engine, loads_config

DURATIONS = "metaprotocol_request_duration_milliseconds"


class Failing(Upstream):
    """Answers every request with an Error reply."""

    def on_message(self, conn: KVServer, msg: Metadata) -> None:
        assert conn.transport is not None
        self.received.append(msg)
        conn.transport.write(build_frame(ERROR, msg.request_id, {"server": self.name}))


class Garbling(Upstream):
    """Answers every request with bytes the codec cannot resynchronise after."""

    def on_message(self, conn: KVServer, msg: Metadata) -> None:
        assert conn.transport is not None
        self.received.append(msg)
        conn.transport.write(b"XX" + bytes(30))


class Seeing(Filter):
    """A response filter that notes every answer it is shown."""

    name = "seeing"
    seen: list[tuple[str, str, str | None]] = []

    def on_response(self, context: ResponseContext) -> None:
        error = None if context.local_error is None else context.local_error.name
        type(self).seen.append((context.route, context.status.name, error))


_mod = types.ModuleType("combination_filters")
_mod.Seeing = Seeing  # type: ignore[attr-defined]
sys.modules["combination_filters"] = _mod


def with_listener_filter(text: str, f: type[Filter]) -> str:
    """``text`` with ``f`` as its listener's filter."""
    return text.replace(
        "bind: '127.0.0.1:0'}]",
        f"bind: '127.0.0.1:0', filters: [{{name: 'combination_filters:{f.__name__}'}}]}}]",
        1,
    )


def outcome(reply: Metadata) -> str:
    """What the client saw, named as ``metaprotocol_requests_total`` names its status."""
    kind = error_type(reply)
    if kind is not None:
        return kind
    return "Error" if reply.codec_state == ERROR else "Ok"


def outcomes_agree(engine: Engine, seen: list[str]) -> None:
    """The engine's per-status request counts and duration histograms match the outcomes the
    clients saw (``seen``), and nothing is pending any more."""
    counted = Counter(
        {
            status: engine.stats.total("metaprotocol_requests_total", status=status)
            for status in set(seen)
        }
    )
    assert counted == Counter(seen), (counted, Counter(seen))
    total = engine.stats.total("metaprotocol_requests_total")
    assert total == len(seen), (total, len(seen))
    durations = sum(h.count for h in engine.stats.histograms(DURATIONS))
    assert durations == len(seen), (durations, len(seen))
    assert engine.pending == 0


def test_a_retry_after_an_empty_destination_keeps_the_requests_clock() -> None:
    """A weighted split whose first pick has no endpoint retries (``unavailable``) on the other
    destination; the retry runs on the request's own clock: the route's timeout, not a
    deadline computed from time zero (it expired a millisecond after the retry was sent)."""
    router = """\
    - name: split
      route:
        - {destination: {host: svc.test, subset: empty}, weight: 50}
        - {destination: {host: svc.test, subset: v1}, weight: 50}
      timeout: 5s
      retries: {attempts: 2, retryOn: unavailable}
    """

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")], router=router)) as engine:
            c = await Client.connect(address(engine))
            replies = [c.start("slow") for _ in range(6)]
            await up.wait_received(6)  # every request reached v1, after its retry
            up.release.set()
            seen = [outcome(r) for r in await asyncio.wait_for(asyncio.gather(*replies), 5)]
            assert seen == ["Ok"] * 6
            retried = engine.stats.total("metaprotocol_retries_total", reason="unavailable")
            # the split alternates, and each retry takes the next pick: v1
            assert retried == 6
            outcomes_agree(engine, seen)
            # every duration is the request's own (well under the 5 s timeout)
            assert sum(h.sum for h in engine.stats.histograms(DURATIONS)) < 6 * 5000
            c.close()
        await up.close()

    run(main())


@pytest.mark.parametrize("end", ["half-close", "stop"])
def test_a_connection_closing_after_a_fault_delay_then_abort_closes_at_once(end: str) -> None:
    """A request a fault delays and then aborts is the last in flight of a connection that is
    closing (the client half-closed, or the engine drains): once the abort is written the
    connection closes, as after any other last answer; it stayed open until the drain's
    deadline (or, half-closed, until ``timeouts.idle``)."""
    router = """\
    - name: chaos
      route: [{destination: {host: svc.test}}]
      fault: {delay: {fixedDelay: 200ms}, abort: {errorType: Unspecified}}
    """

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")], router=router)) as engine:
            c = await Client.connect(address(engine))
            reply = c.start()
            await until(lambda: engine.pending == 1, "the request held by the delay")
            loop = asyncio.get_running_loop()
            stopping = None
            if end == "stop":
                stopping = loop.create_task(engine.stop(drain=4.0))
            else:
                assert c.transport is not None
                c.transport.write_eof()
            assert outcome(await asyncio.wait_for(reply, 2)) == "Unspecified"
            answered = loop.time()
            await asyncio.wait_for(asyncio.shield(c.closed), 4)
            assert loop.time() - answered < 2.5  # well before the drain's 4 s deadline
            if stopping is not None:
                await asyncio.wait_for(stopping, 4)
            assert up.received == []
            outcomes_agree(engine, ["Unspecified"])
        await up.close()

    run(main())


def test_an_error_that_is_retried_still_counts_for_outlier_detection() -> None:
    """An endpoint that answers every request with an Error is ejected after
    ``consecutive5xxErrors`` even when each of its errors was retried on another endpoint:
    the outlier detector sees every try, not only the last (as Envoy's does). Before, the
    retried errors were never seen and the failing endpoint kept half of every try."""
    router = """\
    - name: retried
      route: [{destination: {host: svc.test}}]
      retries: {attempts: 1, retryOn: error}
    """
    outlier = (
        "{outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 1h,"
        " maxEjectionPercent: 50}}"
    )

    async def main() -> None:
        bad, good = await Failing("bad").start(), await Upstream("good").start()
        text = mesh([(bad.port, "v1"), (good.port, "v1")], router=router, traffic_policy=outlier)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            seen = [outcome(await c.call()) for _ in range(8)]
            assert seen == ["Ok"] * 8
            assert engine.stats.total("metaprotocol_outlier_ejections_total") == 1
            assert len(bad.received) == 2  # then it was ejected
            outcomes_agree(engine, seen)
            c.close()
        await bad.close()
        await good.close()

    run(main())


@pytest.mark.parametrize("endpoints", [1, 2])
def test_an_endpoint_that_answers_garbage_is_retried_elsewhere_and_ejected(endpoints: int) -> None:
    """An endpoint whose replies cannot be read (the engine drops its connection, as at a
    reset) is a gateway error for outlier detection and a ``reset`` for retries, as Envoy
    counts an upstream protocol error: its requests are retried on the other endpoint and it
    is ejected after ``consecutiveGatewayErrors``. Before, it was neither: half of the
    requests got ``BadResponse`` for good. Alone in its cluster, each try goes to a fresh
    connection (the one that failed is out of the pool first), so a request gets its every
    retry."""
    router = """\
    - name: retried
      route: [{destination: {host: svc.test}}]
      retries: {attempts: 2, retryOn: reset}
    """
    outlier = (
        "{outlierDetection: {consecutiveGatewayErrors: 2, baseEjectionTime: 1h,"
        " maxEjectionPercent: 50}}"
    )

    async def main() -> None:
        bad, good = await Garbling("bad").start(), await Upstream("good").start()
        eps = [(bad.port, "v1"), (good.port, "v1")][:endpoints]
        async with engine_for(mesh(eps, router=router, traffic_policy=outlier)) as engine:
            c = await Client.connect(address(engine))
            seen = [outcome(await c.call()) for _ in range(8)]
            stats = engine.stats
            if endpoints == 2:
                assert seen == ["Ok"] * 8
                assert stats.total("metaprotocol_outlier_ejections_total") == 1
                assert len(bad.received) == 2  # then it was ejected
            else:
                assert seen == ["BadResponse"] * 8
                assert len(bad.received) == 8 * 3  # every try of every request
                assert stats.total("metaprotocol_retries_total", reason="reset") == 8 * 2
            outcomes_agree(engine, seen)
            c.close()
        await bad.close()
        await good.close()

    run(main())


def test_requests_held_when_their_client_leaves_are_counted_like_any_other() -> None:
    """A request and a one-way message that a fault delays when their client resets: the
    request is counted ``DownstreamClosed`` with its duration, and shown to the response
    filters; the one-way message is counted as one (``metaprotocol_oneway_total``), not as a
    request. Before, the request had no duration and no response filter saw it, and the
    one-way message was counted in ``metaprotocol_requests_total``."""
    router = """\
    - name: delayed
      route: [{destination: {host: svc.test}}]
      fault: {delay: {fixedDelay: 5s}}
    """

    async def main() -> None:
        up = await Upstream("a").start()
        Seeing.seen = []
        text = with_listener_filter(mesh([(up.port, "v1")], router=router), Seeing)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            c.send(build_frame(ONEWAY, 100, {"method": "notify"}))
            reply = c.start()
            await until(lambda: engine.pending == 2, "both held by the delay")
            c.reset()
            with pytest.raises(ConnectionResetError):
                await reply
            await until(lambda: engine.pending == 0, "the holds released")
            outcomes_agree(engine, ["DownstreamClosed"])
            oneway = engine.stats.total("metaprotocol_oneway_total", status="DownstreamClosed")
            assert oneway == 1
            assert Seeing.seen == [("delayed", "Unknown", None)]
            assert up.received == []
        await up.close()

    run(main())


def test_a_retry_that_fails_frees_its_place_under_max_retries() -> None:
    """``connectionPool.http.maxRetries: 1`` with ``attempts: 2``, one request at a time to an
    endpoint that resets every try: each request gets both its retries (one in flight at a
    time) and no overflow is counted. The failed retry's own place was still taken when the
    next one was decided, so every request got one retry and an overflow was counted, with
    never more than one retry in flight."""
    router = """\
    - name: retried
      route: [{destination: {host: svc.test}}]
      retries: {attempts: 2, retryOn: reset}
    """

    async def main() -> None:
        up = await Upstream("a").start()
        pool = "{connectionPool: {http: {maxRetries: 1}}}"
        text = mesh([(up.port, "v1")], router=router, traffic_policy=pool)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            seen = [outcome(await c.call("close")) for _ in range(3)]
            assert seen == ["UpstreamReset"] * 3
            assert len(up.received) == 9  # three tries each
            stats = engine.stats
            assert stats.total("metaprotocol_retries_total", reason="reset") == 6
            assert stats.total("metaprotocol_upstream_overflow_total", limit="maxRetries") == 0
            assert [c.retrying for c in engine.clusters.values()] == [0] * len(engine.clusters)
            outcomes_agree(engine, seen)
            c.close()
        await up.close()

    run(main())


def test_a_request_held_past_a_reload_goes_to_the_endpoints_of_now() -> None:
    """A fault delays a request past a reload that replaced its cluster's endpoint and past
    the reload's drain deadline: the request keeps the route it matched, and goes to the
    cluster of that name as the reload left it, as Envoy looks a cluster up by name when its
    router runs. It went to the endpoint the reload removed, on a connection opened for it."""
    router = """\
    - name: delayed
      route: [{destination: {host: svc.test}}]
      fault: {delay: {fixedDelay: 300ms}}
    """

    async def main() -> None:
        old, new = await Upstream("old").start(), await Upstream("new").start()
        proxy = "timeouts: {drain: 50ms}\n"
        async with engine_for(mesh([(old.port, "v1")], router=router, proxy=proxy)) as engine:
            c = await Client.connect(address(engine))
            reply = c.start()
            await until(lambda: engine.pending == 1, "the request held by the delay")
            await engine.apply(loads_config(mesh([(new.port, "v1")], router=router, proxy=proxy)))
            assert (await asyncio.wait_for(reply, 2)).attributes["server"] == "new"
            assert old.accepted == 0 and not old.received
            serving = set(engine.clusters.values())
            assert all(u.cluster in serving for u in engine.upstreams)
            assert (await c.call()).attributes["server"] == "new"
            outcomes_agree(engine, ["Ok", "Ok"])
            c.close()
        await old.close()
        await new.close()

    run(main())


def test_a_retry_after_a_reload_goes_to_the_endpoints_of_now() -> None:
    """A request's first try hangs at an endpoint a reload then removes; its retry (after
    ``perTryTimeout``) went to the removed endpoint again, on the route's old cluster, and
    the client got Timeout. It goes to the cluster of that name as the reload left it."""
    router = """\
    - name: retried
      route: [{destination: {host: svc.test}}]
      timeout: 5s
      retries: {attempts: 2, perTryTimeout: 300ms, retryOn: timeout}
    """

    async def main() -> None:
        old, new = await Upstream("old").start(), await Upstream("new").start()
        new.release.set()  # "slow" hangs at old, is answered at once by new
        async with engine_for(mesh([(old.port, "v1")], router=router)) as engine:
            c = await Client.connect(address(engine))
            reply = c.start("slow")
            await until(lambda: len(old.received) == 1, "the first try at the old endpoint")
            await engine.apply(loads_config(mesh([(new.port, "v1")], router=router)))
            answer = await asyncio.wait_for(reply, 4)
            assert error_type(answer) is None and answer.attributes["server"] == "new"
            assert len(old.received) == 1
            (cluster,) = engine.clusters.values()
            assert cluster.retrying == 0  # the retry's place was given back where it was taken
            old.release.set()  # its answer, late, answers nobody
            await until(lambda: not old.connections, "the removed endpoint's connection closed")
            c.close()
        await old.close()
        await new.close()

    run(main())


class ResettingOnce(Upstream):
    """Drops the connection of its first request; never answers the others."""

    def on_message(self, conn: KVServer, msg: Metadata) -> None:
        assert conn.transport is not None
        self.received.append(msg)
        if len(self.received) == 1:
            conn.transport.close()


def test_a_retry_after_a_reload_counts_under_max_retries_of_the_cluster_of_now() -> None:
    """``maxRetries: 1``: a request routed before a reload fails (reset) while a request of
    the reloaded cluster has its retry in flight there: no retry for it, the circuit breaker
    of the cluster its retry would go to is open. Its retry was checked against the route's
    old cluster, which has none in flight, and went to the new one: two retries in flight
    on a cluster allowed one."""
    router = """\
    - name: retried
      route: [{destination: {host: svc.test}}]
      timeout: 2s
      retries: {attempts: 1, retryOn: reset}
    """
    pool = "{connectionPool: {http: {maxRetries: 1}}}"
    proxy = "timeouts: {drain: 10s}\n"

    async def main() -> None:
        old, new = await Upstream("old").start(), await ResettingOnce("new").start()
        text = mesh([(old.port, "v1")], router=router, traffic_policy=pool, proxy=proxy)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            first = c.start("hang")
            await until(lambda: len(old.received) == 1, "the first request at the old endpoint")
            new_text = mesh([(new.port, "v1")], router=router, traffic_policy=pool, proxy=proxy)
            await engine.apply(loads_config(new_text))
            second = c.start("hang")
            await until(lambda: len(new.received) == 2, "the second request's retry in flight")
            for conn in list(old.connections):  # the first request's try is reset
                assert conn.transport is not None
                conn.transport.close()
            answer = await asyncio.wait_for(first, 4)
            assert error_type(answer) == "UpstreamReset"
            assert len(new.received) == 2
            overflows = engine.stats.total(
                "metaprotocol_upstream_overflow_total", limit="maxRetries"
            )
            assert overflows == 1
            assert error_type(await asyncio.wait_for(second, 4)) == "Timeout"
            assert all(cluster.retrying == 0 for cluster in engine.clusters.values())
            c.close()
        await old.close()
        await new.close()

    run(main())


def test_a_retry_after_a_reload_avoids_the_endpoint_that_failed() -> None:
    """A reload rebuilds a cluster of two endpoints (another ``connectionPool``) while a
    request's first try hangs at the first one: its retry (``perTryTimeout``) goes to the
    other endpoint, as any retry does. The reloaded cluster has new hosts, and the failed
    one, the old cluster's, was avoided by identity: the retry went to the same endpoint."""
    router = """\
    - name: retried
      route: [{destination: {host: svc.test}}]
      timeout: 5s
      retries: {attempts: 1, perTryTimeout: 300ms, retryOn: timeout}
    """

    async def main() -> None:
        a, b = await Upstream("a").start(), await Upstream("b").start()
        b.release.set()
        eps = [(a.port, "v1"), (b.port, "v1")]
        async with engine_for(mesh(eps, router=router)) as engine:
            c = await Client.connect(address(engine))
            reply = c.start("slow")
            await until(lambda: len(a.received) == 1, "the first try at the first endpoint")
            pool = "{connectionPool: {tcp: {maxConnections: 100}}}"
            await engine.apply(loads_config(mesh(eps, router=router, traffic_policy=pool)))
            answer = await asyncio.wait_for(reply, 4)
            assert error_type(answer) is None and answer.attributes["server"] == "b"
            assert len(a.received) == 1
            a.release.set()
            c.close()
        await a.close()
        await b.close()

    run(main())


def test_a_retry_answered_by_the_engine_keeps_the_time_of_its_first_try() -> None:
    """A request whose first try timed out (``perTryTimeout``) and whose retry the engine
    answered itself (the split's other destination has no ServiceEntry) has the duration of
    both: the first try's 100 ms at least. It was counted as 0 ms (the retry's local reply
    started its own clock)."""
    router = """\
    - name: split
      route:
        - {destination: {host: svc.test}, weight: 50}
        - {destination: {host: nowhere.test, port: {number: 9000}}, weight: 50}
      timeout: 2s
      retries: {attempts: 1, perTryTimeout: 100ms, retryOn: timeout}
    """

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")], router=router)) as engine:
            c = await Client.connect(address(engine))
            seen = [outcome(await c.call("hang"))]
            assert seen == ["ClusterNotFound"]
            outcomes_agree(engine, seen)
            (answered,) = [h for h in engine.stats.histograms(DURATIONS) if h.count]
            assert dict(answered.labels)["destination"].endswith("nowhere.test")
            assert answered.sum >= 99  # the timer fires at its deadline, to rounding
            c.close()
        await up.close()

    run(main())
