"""Tracing through a real Apache Thrift THeader client and server: the context rides in the
request's THeader info headers, written by the engine's mutation."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
from collector import Collector
from test_dubbo_tracing import e2e_harness

from metaprotocol_sdk.demo.idl import HELLO_THRIFT
from metaprotocol_sdk.proxy.tracing import parse_traceparent, provider_of, shutdown

SVC = ("greeter.thrift.tracing", 9190)


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def apache_hello(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """Apache Thrift code for the demo IDL, generated with the Debian ``thrift`` compiler."""
    compiler = shutil.which("thrift")
    if compiler is None:
        pytest.fail("the Apache Thrift compiler is missing: run ./dev setup (thrift-compiler)")
    out = tmp_path_factory.mktemp("gen-py")
    idl = out / "hello.thrift"
    idl.write_text(HELLO_THRIFT.replace("namespace py hello", "namespace py tracing_hello"))
    subprocess.run([compiler, "--gen", "py", "-out", str(out), str(idl)], check=True)
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("tracing_hello.Hello")
    finally:
        sys.path.remove(str(out))


def test_a_theader_server_sees_the_engines_span_as_parent(
    collector: Collector, apache_hello: ModuleType
) -> None:
    from thrift.protocol.THeaderProtocol import THeaderProtocol
    from thrift.transport.THeaderTransport import THeaderClientType
    from thrift.transport.TSocket import TSocket

    h = e2e_harness()
    server = h.ApacheHeaderServer(apache_hello, "v1")
    engine = None
    try:
        tracing = (
            f"  tracing: {{endpoint: '{collector.address}', randomSampling: 100, "
            "serviceName: thrift-proxy, operation: ingress}\n"
        )
        yaml = (
            h.application_protocol_yaml("thrift")
            + h.service_yaml("greeter", "thrift", *SVC, {"v1": server.port})
            + h.proxy_yaml([SVC])
            + tracing
        )
        engine = h.RunningEngine(yaml)
        sock = TSocket("127.0.0.1", engine.port(*SVC))
        sock.setTimeout(5000)
        proto = THeaderProtocol(sock, allowed_client_types=(THeaderClientType.HEADERS,))
        proto.trans.open()
        try:
            # No context from the client: the engine starts the trace.
            seen = json.loads(apache_hello.Client(proto).headers())
        finally:
            proto.trans.close()
        provider = provider_of(engine.engine)
        assert provider is not None and provider.force_flush(5000)
    finally:
        if engine is not None:
            shutdown(engine.engine)
            engine.close()
        server.close()
    [span] = collector.spans
    assert span.name == "ingress headers" and span.parent_span_id == 0
    assert span.kind == 2  # SPAN_KIND_SERVER
    assert parse_traceparent(seen["traceparent"]) == (span.trace_id, span.span_id, 1)
    assert span.attributes["upstream_address"] == f"127.0.0.1:{server.port}"
