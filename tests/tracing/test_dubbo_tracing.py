"""Tracing through a real Dubbo provider and consumer (sofa-rpc-node): the context rides in
the request's attachments, written by the engine's mutation."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from collector import Collector

from metaprotocol_sdk.demo.procs import node_child
from metaprotocol_sdk.proxy.tracing import parse_traceparent, provider_of, shutdown

SVC = ("greeter.dubbo.tracing", 20890)
TRACE, PARENT = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7


def e2e_harness() -> ModuleType:
    """The end-to-end tests' helpers (tests/e2e/conftest.py), loaded as a plain module."""
    path = Path(__file__).parent.parent / "e2e" / "conftest.py"
    spec = importlib.util.spec_from_file_location("tracing_e2e_harness", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.stop()


def test_a_dubbo_provider_sees_the_engines_span_as_parent(collector: Collector) -> None:
    h = e2e_harness()
    children = []
    engine = None
    try:
        provider = node_child("provider-v1", "provider", "v1")
        children.append(provider)
        port = provider.wait_ready()
        tracing = (
            f"  tracing: {{endpoint: '{collector.address}', randomSampling: 0, "
            "serviceName: dubbo-proxy}\n"
        )
        yaml = (
            h.application_protocol_yaml("dubbo")
            + h.service_yaml("greeter", "dubbo", *SVC, {"v1": port})
            + h.proxy_yaml([SVC])
            + tracing
        )
        engine = h.RunningEngine(yaml)
        consumer = node_child("dubbo-consumer", "consumer", f"127.0.0.1:{engine.port(*SVC)}")
        children.append(consumer)
        consumer.wait_ready()
        header = f"00-{TRACE:032x}-{PARENT:016x}-01"
        props = {"traceparent": header, "tracestate": "vendor=abc"}
        call = {"id": 1, "method": "attachments", "args": [], "props": props, "timeout": 5000}
        consumer.send(json.dumps(call))
        reply = json.loads(consumer.readline(10))
        assert reply["ok"], reply
        seen = json.loads(reply["result"])["props"]
        provider_ctx = provider_of(engine.engine)
        assert provider_ctx is not None and provider_ctx.force_flush(5000)
    finally:
        if engine is not None:
            shutdown(engine.engine)
            engine.close()
        for child in children:
            child.stop()
    [span] = collector.spans
    assert span.name == "egress attachments" and span.service == "dubbo-proxy"
    assert (span.trace_id, span.parent_span_id) == (TRACE, PARENT)
    assert parse_traceparent(seen["traceparent"]) == (TRACE, span.span_id, 1)
    assert seen["tracestate"] == "vendor=abc"
    assert span.attributes["metaprotocol.status"] == "Ok"
    assert span.attributes["upstream_address"] == f"127.0.0.1:{port}"
