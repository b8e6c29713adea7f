"""The tracing configuration, the traceparent parser on hostile values, and zero cost when off."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from proxy_kit import mesh

from metaprotocol_sdk.enums import MessageType, ResponseStatus
from metaprotocol_sdk.errors import ConfigError
from metaprotocol_sdk.filters import RequestContext, ResponseContext
from metaprotocol_sdk.metadata import Attributes, Metadata
from metaprotocol_sdk.proxy import loads_config
from metaprotocol_sdk.proxy.config.models import Tracing
from metaprotocol_sdk.proxy.tracing import TracingFilter, parse_traceparent, parse_tracestate

GOOD = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def tracing(section: str) -> str:
    return mesh([(1, "v1")], proxy=f"tracing: {section}\n")


def test_the_section_and_its_defaults() -> None:
    t = loads_config(tracing("{endpoint: 'collector:4317'}")).proxy.tracing
    assert t is not None
    assert (t.endpoint, t.random_sampling, t.service_name, t.operation) == (
        "collector:4317",
        100.0,
        "metaprotocol-proxy",
        "egress",
    )
    text = "{endpoint: 'c:1', randomSampling: {value: 2.5}, serviceName: s, operation: ingress}"
    t = loads_config(tracing(text)).proxy.tracing
    assert t is not None and (t.random_sampling, t.service_name, t.operation) == (
        2.5,
        "s",
        "ingress",
    )
    assert (t.max_queue_size, t.export_timeout) == (2048, 10.0)
    t = loads_config(tracing("{endpoint: 'c:1', maxQueueSize: 10, exportTimeout: 250ms}"))
    assert t.proxy.tracing is not None
    assert (t.proxy.tracing.max_queue_size, t.proxy.tracing.export_timeout) == (10, 0.25)
    assert loads_config(mesh([(1, "v1")])).proxy.tracing is None


@pytest.mark.parametrize(
    ("section", "field", "words"),
    [
        ("{randomSampling: 1}", "spec.tracing.endpoint", "required"),
        ("{endpoint: 'nohost'}", "spec.tracing.endpoint", "host:port"),
        ("{endpoint: 'c:99999'}", "spec.tracing.endpoint", "host:port"),
        ("{endpoint: 'c:1', randomSampling: 101}", "spec.tracing.randomSampling", "[0, 100]"),
        ("{endpoint: 'c:1', randomSampling: true}", "spec.tracing.randomSampling", "[0, 100]"),
        ("{endpoint: 'c:1', randomSampling: {value: -1}}", "spec.tracing.randomSampling", "0, 100"),
        ("{endpoint: 'c:1', operation: sideways}", "spec.tracing.operation", "ingress or egress"),
        ("{endpoint: 'c:1', serviceName: ''}", "spec.tracing.serviceName", "empty"),
        ("{endpoint: 'c:1', sampling: 5}", "spec.tracing.sampling", ""),
        ("{endpoint: 'c:1', maxQueueSize: 0}", "spec.tracing.maxQueueSize", "[1, 1000000]"),
        ("{endpoint: 'c:1', exportTimeout: 0s}", "spec.tracing.exportTimeout", "positive"),
    ],
)
def test_readable_errors(section: str, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        loads_config(tracing(section))
    assert field in str(err.value) and words in str(err.value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        GOOD.upper(),  # W3C: lower-case hex only
        "ff" + GOOD[2:],  # version ff is invalid
        GOOD[:3] + "0" * 32 + GOOD[35:],  # all-zero trace id
        GOOD[:36] + "0" * 16 + GOOD[52:],  # all-zero span id
        GOOD + "-extra",  # version 00 has nothing after the flags
        GOOD[:-1],
        GOOD.replace("-", "_"),
        "00-" + "x" * 1_000_000,
    ],
)
def test_invalid_traceparents_start_a_new_trace(value: str) -> None:
    assert parse_traceparent(value) is None


def test_valid_traceparents() -> None:
    assert parse_traceparent(GOOD) == (
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
        1,
    )
    # A later version may append fields: they are ignored.
    assert parse_traceparent("01" + GOOD[2:] + "-what-comes-next") is not None


def test_parsing_a_huge_value_reads_only_its_head() -> None:
    """Hostile input: the work does not grow with the value (N vs 100N, generous bound)."""
    small, big = "01" + GOOD[2:] + "-" + "a" * 10_000, "01" + GOOD[2:] + "-" + "a" * 1_000_000

    def cost(value: str) -> float:
        start = time.perf_counter()
        for _ in range(200):
            parse_traceparent(value)
        return time.perf_counter() - start

    assert cost(big) < 10 * cost(small) + 0.05


def test_the_engine_runs_without_opentelemetry_when_tracing_is_off() -> None:
    """Without ``spec.tracing`` nothing of OpenTelemetry is imported (it may be absent)."""
    kit = Path(__file__).parent.parent / "proxy"
    script = f"""
import sys
sys.path.insert(0, {str(kit)!r})
sys.modules["opentelemetry"] = None  # as if the tracing extra were not installed
from proxy_kit import Client, Upstream, address, engine_for, mesh, run

async def main():
    upstream = await Upstream("kv").start()
    async with engine_for(mesh([(upstream.port, "v1")])) as engine:
        client = await Client.connect(address(engine))
        reply = await client.call("sayHello")
        assert reply.attributes["server"] == "kv"
        client.close()
    await upstream.close()

run(main())
assert not [m for m in sys.modules if m.startswith("opentelemetry") and sys.modules[m]]
try:
    import metaprotocol_sdk.proxy.tracing
except Exception as exc:
    print(type(exc).__name__, exc)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "ConfigError" in done.stdout and "metaprotocol-sdk[tracing]" in done.stdout


def sampled_span(tracestate: str) -> tuple[object, list[logging.LogRecord]]:
    """Run one sampled request with ``tracestate`` through the filter; its span and logs."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    f = TracingFilter(provider.get_tracer("t"), Tracing("c:1"))
    request = Metadata(
        MessageType.Request,
        operation_name="op",
        attributes=Attributes({"traceparent": GOOD, "tracestate": tracestate}),
    )
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    try:
        f.on_request(RequestContext(request, "r", "l"))
        f.on_response(ResponseContext(request, "r", "l", ResponseStatus.Ok, None, None))
    finally:
        logging.getLogger().removeHandler(handler)
    [span] = exporter.get_finished_spans()
    return span, records


def test_tracestate_reaches_the_span_and_bad_ones_log_nothing() -> None:
    span, records = sampled_span("congo=t61rcWkgMzE, rojo@vendor=00f067aa0ba902b7")
    assert dict(span.parent.trace_state) == {  # type: ignore[attr-defined]
        "congo": "t61rcWkgMzE",
        "rojo@vendor": "00f067aa0ba902b7",
    }
    for bad in ("UPPER=1", "a=1,a=2", "k=" + "v" * 600, ",".join(f"k{i}=v" for i in range(40))):
        span, records = sampled_span(bad)
        assert dict(span.parent.trace_state) == {}, bad  # type: ignore[attr-defined]
        assert records == [], bad
    assert parse_tracestate("a=1, b=2 ,,") is not None


def test_a_huge_operation_name_does_not_go_into_the_span_whole() -> None:
    """A span waits in the exporter's queue (2048 spans) after its request is answered, outside
    the engine's buffer budget, and a client that sends a sampled ``traceparent`` decides that
    its request is traced: a 1 MB method name made a 1 MB span name, so 2 GB for a queue of
    them behind a slow collector. The name keeps at most ``MAX_OPERATION`` characters of it."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from metaprotocol_sdk.proxy.tracing import MAX_OPERATION

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    f = TracingFilter(provider.get_tracer("t"), Tracing("c:1"))
    for name in ("m" * 1_000_000, "sayHello"):
        request = Metadata(
            MessageType.Request, operation_name=name, attributes=Attributes({"traceparent": GOOD})
        )
        f.on_request(RequestContext(request, "r", "l"))
        f.on_response(ResponseContext(request, "r", "l", ResponseStatus.Ok, None, None))
    huge, short = exporter.get_finished_spans()
    assert huge.name == "egress " + "m" * MAX_OPERATION
    assert short.name == "egress sayHello"
