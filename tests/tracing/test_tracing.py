"""Tracing end to end: real engines, a real KV upstream, spans received over OTLP/gRPC."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest
from collector import Collector, ReceivedSpan
from proxy_kit import ONEWAY, Client, Upstream, address, build_frame, engine_for, mesh, run

from metaprotocol_sdk.metadata import Metadata
from metaprotocol_sdk.proxy import Engine
from metaprotocol_sdk.proxy.tracing import parse_traceparent, provider_of, shutdown

CLIENT_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
CLIENT_SPAN = 0xB7AD6B7169203331
ROUTES = """\
- name: nohost
  match: {attributes: {method: {exact: nohost}}}
  route: [{destination: {host: svc.test, subset: empty}}]
- name: hello
  route: [{destination: {host: svc.test, subset: v1}}]
"""


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.stop()


def config(port: int, collector: Collector, service: str, sampling: float = 100) -> str:
    tracing = (
        f"tracing: {{endpoint: '{collector.address}', randomSampling: {sampling}, "
        f"serviceName: {service}}}\n"
    )
    return mesh([(port, "v1")], router=ROUTES, proxy=tracing)


@contextlib.asynccontextmanager
async def traced(text: str) -> AsyncIterator[Engine]:
    async with engine_for(text) as engine:
        try:
            yield engine
        finally:
            await flush(engine)
            await asyncio.to_thread(shutdown, engine)


async def flush(engine: Engine) -> None:
    """Export every ended span now (the exporter's RPC is done when this returns)."""
    provider = provider_of(engine)
    assert provider is not None
    assert await asyncio.to_thread(provider.force_flush, 5000)


def traceparent(msg: Metadata) -> tuple[int, int, int]:
    """The one ``traceparent`` a request carried upstream (any case), parsed."""
    values = [v for k, v in msg.attributes.to_dict().items() if k.lower() == "traceparent"]
    assert len(values) == 1, msg.attributes.to_dict()
    # One key on the wire too: a mutation replaces the key in the request's own spelling.
    assert bytes(msg.frame).lower().count(b"traceparent") == 1, bytes(msg.frame)
    parsed = parse_traceparent(values[0])
    assert parsed is not None, values[0]
    return parsed


def test_two_engines_in_a_row_link_parent_and_child(collector: Collector) -> None:
    async def main() -> None:
        upstream = await Upstream("kv").start()
        async with traced(config(upstream.port, collector, "engine-b")) as b:
            async with traced(config(address(b)[1], collector, "engine-a")) as a:
                client = await Client.connect(address(a))
                header = f"00-{CLIENT_TRACE:032x}-{CLIENT_SPAN:016x}-01"
                # A mixed-case key: read case-insensitively, replaced in the same spelling.
                reply = await client.call("sayHello", {"TraceParent": header})
                assert reply.attributes["server"] == "kv"
                client.close()
                await flush(a)
            await flush(b)
        await upstream.close()
        spans = {s.service: s for s in collector.spans}
        assert sorted(spans) == ["engine-a", "engine-b"], collector.spans
        span_a, span_b = spans["engine-a"], spans["engine-b"]
        assert span_a.trace_id == span_b.trace_id == CLIENT_TRACE
        assert span_a.parent_span_id == CLIENT_SPAN
        assert span_b.parent_span_id == span_a.span_id
        trace_id, parent, flags = traceparent(upstream.received[0])
        assert (trace_id, parent, flags) == (CLIENT_TRACE, span_b.span_id, 1)
        assert span_a.name == span_b.name == "egress sayHello"

    run(main())


def test_a_request_without_traceparent_starts_a_new_trace(collector: Collector) -> None:
    async def main() -> None:
        upstream = await Upstream("kv").start()
        async with traced(config(upstream.port, collector, "engine")) as engine:
            client = await Client.connect(address(engine))
            await client.call("sayHello")
            client.close()
        await upstream.close()
        [span] = collector.spans
        assert span.parent_span_id == 0 and span.trace_id != 0
        assert traceparent(upstream.received[0]) == (span.trace_id, span.span_id, 1)

    run(main())


def attributes_of(span: ReceivedSpan) -> dict[str, object]:
    keys = (
        "metaprotocol.route",
        "metaprotocol.status",
        "upstream_cluster",
        "upstream_address",
        "error",
        "error.type",
    )
    return {k: span.attributes[k] for k in keys if k in span.attributes}


def test_span_attributes_for_a_reply_an_error_and_a_local_reply(collector: Collector) -> None:
    async def main() -> None:
        upstream = await Upstream("kv").start()
        async with traced(config(upstream.port, collector, "engine")) as engine:
            client = await Client.connect(address(engine))
            await client.call("sayHello")
            await client.call("fail")
            await client.call("nohost")
            client.close()
        await upstream.close()
        spans = {s.name: s for s in collector.spans}
        where = f"127.0.0.1:{upstream.port}"
        assert attributes_of(spans["egress sayHello"]) == {
            "metaprotocol.route": "hello",
            "metaprotocol.status": "Ok",
            "upstream_cluster": "outbound|9000|v1|svc.test",
            "upstream_address": where,
        }
        assert spans["egress sayHello"].attributes["request_size"] > 0
        assert attributes_of(spans["egress fail"]) == {
            "metaprotocol.route": "hello",
            "metaprotocol.status": "Error",
            "upstream_cluster": "outbound|9000|v1|svc.test",
            "upstream_address": where,
            "error": True,
        }
        assert attributes_of(spans["egress nohost"]) == {
            "metaprotocol.route": "nohost",
            "metaprotocol.status": "Error",
            "upstream_cluster": "outbound|9000|empty|svc.test",
            "upstream_address": "",
            "error": True,
            "error.type": "NoHealthyUpstream",
        }
        assert spans["egress fail"].status_code == 2  # STATUS_CODE_ERROR
        assert spans["egress sayHello"].status_code == 0

    run(main())


def test_sampling_at_100_percent_emits_every_request(collector: Collector) -> None:
    async def main() -> None:
        upstream = await Upstream("kv").start()
        async with traced(config(upstream.port, collector, "engine", 100)) as engine:
            client = await Client.connect(address(engine))
            await asyncio.gather(*(client.call("sayHello") for _ in range(20)))
            client.close()
        await upstream.close()
        assert len(collector.spans) == 20
        assert len({s.trace_id for s in collector.spans}) == 20

    run(main())


def test_sampling_at_0_percent_emits_nothing_and_tells_the_next_hops(
    collector: Collector,
) -> None:
    async def main() -> None:
        upstream = await Upstream("kv").start()
        async with traced(config(upstream.port, collector, "engine", 0)) as engine:
            client = await Client.connect(address(engine))
            await asyncio.gather(*(client.call("sayHello") for _ in range(20)))
            # A client's sampled trace is kept whole: its flag wins over random sampling.
            header = f"00-{CLIENT_TRACE:032x}-{CLIENT_SPAN:016x}-01"
            await client.call("sayHello", {"traceparent": header})
            client.close()
        await upstream.close()
        assert [s.parent_span_id for s in collector.spans] == [CLIENT_SPAN]
        unsampled = [traceparent(m) for m in upstream.received[:20]]
        assert all(flags == 0 for _, _, flags in unsampled)
        assert len({trace_id for trace_id, _, _ in unsampled}) == 20

    run(main())


def test_policy_local_replies_are_traced_and_oneway_spans_end(collector: Collector) -> None:
    """Tracing heads the chain: the rate limit's local reply has a span; a one-way message's
    span ends when it goes on (no answer will come)."""
    limited = mesh(
        [(0, "v1")],
        router=ROUTES,
        proxy=f"tracing: {{endpoint: '{collector.address}', serviceName: engine}}\n",
    ).replace(
        "  routes:\n",
        "  localRateLimit: {tokenBucket: {maxTokens: 1, tokensPerFill: 1, fillInterval: 1h}}\n"
        "  routes:\n",
        1,
    )

    async def main() -> None:
        upstream = await Upstream("kv").start()
        text = limited.replace("svc: 0}", f"svc: {upstream.port}}}")
        async with traced(text) as engine:
            client = await Client.connect(address(engine))
            client.send(build_frame(ONEWAY, 0, {"method": "notify"}))
            await upstream.wait_received(1)
            await client.call("sayHello")  # the bucket's only token went to the one-way
            client.close()
        await upstream.close()
        spans = {s.name: s for s in collector.spans}
        assert spans["egress notify"].attributes["metaprotocol.oneway"] is True
        assert traceparent(upstream.received[0])[1] == spans["egress notify"].span_id
        limited_span = spans["egress sayHello"]
        assert limited_span.attributes["error.type"] == "OverLimit"
        assert limited_span.attributes["upstream_address"] == ""

    run(main())


def test_stop_exports_the_spans_still_queued(collector: Collector) -> None:
    """No flush by hand: stopping the engine exports what the batch processor holds."""

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(config(up.port, collector, "stopper")) as engine:
            c = await Client.connect(address(engine))
            for _ in range(3):
                await c.call("get")
            c.close()
        await up.close()

    run(main())
    assert len(collector.spans) == 3
