"""The filter chain (user filters from ProxyConfig) and the traffic policies built on it:
fault injection, local rate limit, mirroring, retries. Real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import sys
import types
from collections.abc import Awaitable
from typing import Any

import pytest
from proxy_kit import (
    ERROR,
    ONEWAY,
    Client,
    CountingKVCodec,
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

from metaprotocol_sdk import ConfigError, ErrorType
from metaprotocol_sdk.filters import Filter, RequestContext, ResponseContext
from metaprotocol_sdk.proxy import loads_config

# -- user filters ------------------------------------------------------------------------------


class AuditFilter(Filter):
    """Adds a key to every request; answers ``denied`` locally; holds ``held`` requests until
    ``gate`` is set; sees every answer."""

    name = "audit"
    gate: asyncio.Event | None = None
    holding: asyncio.Event | None = None
    seen: list[tuple[str, str, Any, Any]] = []

    def __init__(self, *, tag: str = "yes") -> None:
        self.tag = tag

    def on_request(self, context: RequestContext) -> Awaitable[None] | None:
        method = context.request.attributes.get("method")
        if method == "denied":
            context.local_reply(ErrorType.OverLimit, "denied by audit")
            return None
        if method == "explode":
            raise RuntimeError("boom")
        context.add_mutation("x-audit", self.tag)
        if method == "held":
            assert AuditFilter.gate is not None
            if AuditFilter.holding is not None:
                AuditFilter.holding.set()
            return AuditFilter.gate.wait()
        return None

    def on_response(self, context: ResponseContext) -> None:
        server = None if context.attributes is None else context.attributes.get("server")
        type(self).seen.append((context.route, context.status.name, context.local_error, server))


class ReadingAuditFilter(AuditFilter):
    """The same, reading the replies' attributes (so replies are decoded, not peeked)."""

    name = "reading-audit"
    response_attributes = True


_mod = types.ModuleType("filter_test_filters")
_mod.AuditFilter = AuditFilter  # type: ignore[attr-defined]
_mod.ReadingAuditFilter = ReadingAuditFilter  # type: ignore[attr-defined]
sys.modules["filter_test_filters"] = _mod


def with_filter(port: int, name: str = "filter_test_filters:AuditFilter", **kw: Any) -> str:
    text = mesh([(port, "v1")], **kw)
    return text.replace(
        "bind: '127.0.0.1:0'}]",
        f"bind: '127.0.0.1:0', filters: [{{name: '{name}', config: {{tag: audited}}}}]}}]",
        1,
    )


def test_user_filter_mutates_answers_holds_and_sees_replies() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        AuditFilter.gate, AuditFilter.holding = asyncio.Event(), asyncio.Event()
        AuditFilter.seen = []
        async with engine_for(with_filter(up.port)) as engine:
            c = await Client.connect(address(engine))
            reply = await c.call("get")
            assert reply.attributes["req-x-audit"] == "audited"  # the upstream saw it
            denied = await c.call("denied")
            assert (error_type(denied), up.received[-1].operation_name) == ("OverLimit", "get")
            held = c.start("held")
            await asyncio.wait_for(AuditFilter.holding.wait(), 5)
            # A request sent after it goes through the one upstream connection: had the held
            # one been forwarded, the upstream would have read it first.
            assert error_type(await c.call("get")) is None
            assert [m.operation_name for m in up.received] == ["get", "get"]
            assert engine.pending == 1 and not held.done()  # held, yet counted as pending
            AuditFilter.gate.set()
            assert error_type(await asyncio.wait_for(held, 5)) is None
            assert [m.operation_name for m in up.received] == ["get", "get", "held"]
            assert [s[:3] for s in AuditFilter.seen] == [
                ("default", "Ok", None),
                ("default", "Error", ErrorType.OverLimit),
                ("default", "Ok", None),
                ("default", "Ok", None),
            ]
            assert AuditFilter.seen[0][3] is None  # replies not decoded for this filter
            stats = engine.stats
            assert stats.total("metaprotocol_requests_total", route="default", status="Ok") == 3
            assert stats.total("metaprotocol_local_replies_total", type="OverLimit") == 1
            c.close()
        await up.close()

    run(main())


def test_response_filter_asking_for_attributes_gets_decoded_replies() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        ReadingAuditFilter.seen = []
        CountingKVCodec.reply_decodes = 0
        text = with_filter(
            up.port,
            "filter_test_filters:ReadingAuditFilter",
            protocol="kvc",
            codec="proxy_test_codecs:CountingKVCodec",
        )
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            await c.call("get")
            assert ReadingAuditFilter.seen[-1][3] == "a"
            assert CountingKVCodec.reply_decodes == 1
            c.close()
        await up.close()

    run(main())


def test_a_filter_that_raises_answers_only_its_request() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(with_filter(up.port)) as engine:
            c = await Client.connect(address(engine))
            assert error_type(await c.call("explode")) == "Unspecified"
            assert error_type(await c.call("get")) is None
            assert engine.stats.total("metaprotocol_filter_errors_total", filter="audit") == 1
            c.close()
        await up.close()

    run(main())


@pytest.mark.parametrize(
    ("filters", "field"),
    [
        ("[{name: no.such.filter}]", "spec.listeners[0].filters[0].name"),
        ("[{name: 'filter_test_filters:AuditFilter', config: {colour: red}}]", "colour"),
        ("[{name: 'proxy_test_codecs:CountingKVCodec'}]", "spec.listeners[0].filters[0].name"),
        ("[{config: {}}]", "spec.listeners[0].filters[0].name"),
    ],
)
def test_bad_filter_configuration(filters: str, field: str) -> None:
    text = mesh([(1, "v1")]).replace(
        "bind: '127.0.0.1:0'}]", f"bind: '127.0.0.1:0', filters: {filters}}}]", 1
    )
    with pytest.raises(ConfigError) as caught:
        loads_config(text)
    assert field in str(caught.value)


# -- fault injection ---------------------------------------------------------------------------


def test_fault_abort_and_delay() -> None:
    router = """\
    - name: aborted
      match: {attributes: {method: {exact: abort}}}
      route: [{destination: {host: svc.test}}]
      fault: {abort: {errorType: NoHealthyUpstream}}
    - name: delayed
      match: {attributes: {method: {exact: delay}}}
      route: [{destination: {host: svc.test}}]
      fault: {delay: {fixedDelay: 200ms, percentage: {value: 100}}}
    - name: half
      route: [{destination: {host: svc.test}}]
      fault: {abort: {errorType: Unspecified, percentage: {value: 50}}}
    """

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")], router=router)) as engine:
            c = await Client.connect(address(engine))
            assert error_type(await c.call("abort")) == "NoHealthyUpstream"
            assert up.received == []
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert error_type(await c.call("delay")) is None
            # A timer never fires early; uvloop's clock counts whole milliseconds, so the
            # difference of two readings may be 0.2 less a float's rounding (ci: 0.19999...).
            assert loop.time() - started >= 0.2 - 1e-6
            replies = await asyncio.gather(*(c.start("get") for _ in range(400)))
            aborted = sum(error_type(r) == "Unspecified" for r in replies)
            assert 140 <= aborted <= 260, aborted  # 50 %, about 6 sigma either way
            stats = engine.stats
            assert stats.total("metaprotocol_faults_total", route="aborted", type="abort") == 1
            assert stats.total("metaprotocol_faults_total", route="delayed", type="delay") == 1
            assert stats.total("metaprotocol_requests_total", route="aborted") == 1
            c.close()
        await up.close()

    run(main())


def test_fault_delay_is_bounded_by_the_route_timeout() -> None:
    router = """\
    - name: slow
      route: [{destination: {host: svc.test}}]
      timeout: 100ms
      fault: {delay: {fixedDelay: 10s}}
    """

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")], router=router)) as engine:
            c = await Client.connect(address(engine))
            assert error_type(await c.call()) == "Timeout"
            assert engine.pending == 0 and up.received == []
            c.close()
        await up.close()

    run(main())


# -- local rate limit --------------------------------------------------------------------------


def rate_limited(port: int, limit: str) -> str:
    """A mesh whose MetaRouter has ``localRateLimit: <limit>`` (at spec level, as Aeraki)."""
    router = "- name: all\n  route: [{destination: {host: svc.test}}]\n"
    text = mesh([(port, "v1")], router=router)
    return text.replace("  routes:\n", f"  localRateLimit: {limit}\n  routes:\n", 1)


def test_local_rate_limit_default_and_conditions() -> None:
    limit = (
        "{tokenBucket: {maxTokens: 5, tokensPerFill: 5, fillInterval: 1h}, conditions: ["
        "{match: {attributes: {method: {exact: vip}}},"
        " tokenBucket: {maxTokens: 2, tokensPerFill: 2, fillInterval: 1h}}]}"
    )

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(rate_limited(up.port, limit)) as engine:
            c = await Client.connect(address(engine))
            plain = [error_type(r) for r in await asyncio.gather(*(c.start() for _ in range(8)))]
            vip = [error_type(r) for r in await asyncio.gather(*(c.start("vip") for _ in range(4)))]
            assert plain == [None] * 5 + ["OverLimit"] * 3
            assert vip == [None] * 2 + ["OverLimit"] * 2
            stats = engine.stats
            name = "metaprotocol_ratelimit_total"
            assert stats.total(name, bucket="default", result="limited") == 3
            assert stats.total(name, bucket="conditions[0]", result="allowed") == 2
            c.close()
        await up.close()

    run(main())


def test_local_rate_limit_refills() -> None:
    limit = "{tokenBucket: {maxTokens: 1, tokensPerFill: 1, fillInterval: 50ms}}"

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(rate_limited(up.port, limit)) as engine:
            c = await Client.connect(address(engine))
            loop = asyncio.get_running_loop()
            started = loop.time()
            allowed = 0
            while loop.time() - started < 0.5:
                allowed += error_type(await c.call()) is None
            # one token at the start plus one per 50 ms: 11 at most in 0.5 s, and the bucket
            # refills (a bucket that never refilled would allow exactly 1)
            assert 3 <= allowed <= 12, allowed
            c.close()
        await up.close()

    run(main())


# -- mirroring ---------------------------------------------------------------------------------


def test_mirror_gets_copies_and_the_client_sees_only_the_primary() -> None:
    router = """\
    - name: mirrored
      route: [{destination: {host: svc.test, subset: v1}}]
      requestMutation: [{key: x-route, value: mirrored}]
      mirror: {host: svc.test, subset: v2}
    """

    async def main() -> None:
        primary, mirror = await Upstream("primary").start(), await Upstream("mirror").start()
        text = mesh([(primary.port, "v1"), (mirror.port, "v2")], router=router)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            replies = await asyncio.gather(*(c.start("get") for _ in range(20)))
            assert {r.attributes["server"] for r in replies} == {"primary"}
            await mirror.wait_received(20)
            assert {m.attributes.get("x-route") for m in mirror.received} == {"mirrored"}
            name = "metaprotocol_mirror_total"
            sink = engine.mirror_sink
            # The copies' replies arrive on later loop turns.
            await until(lambda: engine.stats.total(name, status="Ok") >= 20, "20 mirror replies")
            assert engine.stats.total(name, status="Ok") == 20 and sink.inflight == 0
            c.close()
        await primary.close()
        await mirror.close()

    run(main())


def test_dead_or_slow_mirror_changes_nothing_for_the_client() -> None:
    router = """\
    - name: mirrored
      route: [{destination: {host: svc.test, subset: v1}}]
      mirror: {host: svc.test, subset: v2}
    """

    async def main() -> None:
        primary = await Upstream("primary").start()
        text = mesh([(primary.port, "v1"), (refusing_port(), "v2")], router=router)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            replies = await asyncio.gather(*(c.start("get") for _ in range(10)))
            assert [error_type(r) for r in replies] == [None] * 10
            stats = engine.stats
            assert stats.total("metaprotocol_requests_total", status="Ok") == 10
            assert stats.total("metaprotocol_local_replies_total") == 0
            c.close()
        await primary.close()

    run(main())


# -- retries -----------------------------------------------------------------------------------


def test_retry_lands_on_the_healthy_endpoint() -> None:
    router = """\
    - name: retried
      match: {attributes: {method: {exact: get}}}
      route: [{destination: {host: svc.test, subset: v1}}]
      retries: {attempts: 2, retryOn: "connect-failure,reset"}
    - name: flaky
      match: {attributes: {method: {exact: fail}}}
      route: [{destination: {host: svc.test, subset: v2}}]
      retries: {attempts: 2, retryOn: error}
    - name: once
      match: {attributes: {method: {exact: once}}}
      route: [{destination: {host: svc.test, subset: v1}}]
    """

    async def main() -> None:
        good = await Upstream("good").start()
        text = mesh([(refusing_port(), "v1"), (good.port, "v1"), (good.port, "v2")], router=router)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            replies = await asyncio.gather(*(c.start("get") for _ in range(10)))
            assert [(error_type(r), r.attributes.get("server")) for r in replies] == [
                (None, "good")
            ] * 10
            retried = engine.stats.total("metaprotocol_retries_total", reason="connect-failure")
            assert retried >= 1
            # the upstream's Error status is retried too, up to the attempts, then passed on
            before = sum(m.operation_name == "fail" for m in good.received)
            reply = await c.call("fail")
            assert reply.codec_state == ERROR and reply.attributes["server"] == "good"
            assert sum(m.operation_name == "fail" for m in good.received) - before == 3
            assert engine.stats.total("metaprotocol_retries_total", reason="error") == 2
            # a route without retries answers the failure at once (round robin over a dead and
            # a good endpoint: one of two calls fails)
            once = [error_type(await c.call("once")) for _ in range(2)]
            assert sorted(once, key=str) == [None, "UpstreamConnectFailure"]
            c.close()
        await good.close()

    run(main())


def test_config_dump_shows_the_chain_and_the_policies() -> None:
    router = """\
    - name: all
      route: [{destination: {host: svc.test, subset: v1}}]
      fault: {abort: {errorType: Unspecified, percentage: {value: 1}}}
      mirror: {host: svc.test, subset: v2}
      mirrorPercentage: {value: 10}
      retries: {attempts: 2, perTryTimeout: 1s, retryOn: "reset,timeout"}
    """
    traffic = (
        "{connectionPool: {tcp: {maxConnections: 7}}, "
        "outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 1m}}"
    )

    async def main() -> None:
        text = with_filter(1, router=router, traffic_policy=traffic)
        text = text.replace(
            "  routes:\n",
            "  localRateLimit: {tokenBucket: {maxTokens: 9, tokensPerFill: 1, fillInterval: 1s}}"
            "\n  routes:\n",
            1,
        )
        async with engine_for(text) as engine:
            dump = json.loads(json.dumps(engine.config_dump()))
            (listener,) = dump["listeners"]
            assert listener["filters"] == ["filter_test_filters:AuditFilter"]
            assert listener["localRateLimit"]["bucket"]["max_tokens"] == 9
            (route,) = listener["routes"]
            assert route["chain"] == ["local_rate_limit", "fault.abort", "audit"]
            assert route["fault"]["abort_error"] == "Unspecified"
            assert route["mirror"]["percent"] == 10.0
            assert route["retries"] == {
                "attempts": 2,
                "per_try_timeout": 1.0,
                "retry_on": ["reset", "timeout"],
            }
            v1 = next(c for c in dump["clusters"] if c["name"] == "outbound|9000|v1|svc.test")
            assert v1["connectionPool"]["max_connections"] == 7
            assert v1["outlierDetection"]["consecutive_errors"] == 3
            assert v1["ejected"] == []

    run(main())


def test_oneway_messages_pass_the_chain() -> None:
    """A rate limit (and any refusing filter) stops one-way messages too; they get no reply,
    the refusal is counted."""

    async def main() -> None:
        up = await Upstream("a").start()
        limit = "{tokenBucket: {maxTokens: 2, tokensPerFill: 1, fillInterval: 1h}}"
        async with engine_for(rate_limited(up.port, limit)) as engine:
            c = await Client.connect(address(engine))
            for i in range(5):
                c.send(build_frame(ONEWAY, 100 + i, {"method": "notify"}))
            assert error_type(await c.call()) == "OverLimit"  # the bucket is empty now
            await up.wait_received(2)
            assert len(up.received) == 2  # the other three were dropped, not forwarded
            stats = engine.stats
            assert stats.total("metaprotocol_oneway_total", status="Forwarded") == 2
            assert stats.total("metaprotocol_oneway_total", status="OverLimit") == 3
            c.close()
        await up.close()

    run(main())


def test_response_filters_see_requests_whose_client_left() -> None:
    """A request still in flight when its client resets is shown to the response filters
    (status Unknown, no local error) once it ends, so a tracing or audit filter sees it."""
    router = """\
    - name: slow
      route: [{destination: {host: svc.test}}]
      timeout: 50ms
    """

    async def main() -> None:
        up = await Upstream("a").start()
        AuditFilter.seen = []
        async with engine_for(with_filter(up.port, router=router)) as engine:
            c = await Client.connect(address(engine))
            c.start("hang")
            await up.wait_received(1)
            c.reset()
            await until(lambda: AuditFilter.seen, "the route's 50 ms timeout to end it")
            assert AuditFilter.seen == [("slow", "Unknown", None, None)]
            assert engine.stats.total("metaprotocol_requests_total", status="DownstreamClosed") == 1
        await up.close()

    run(main())
