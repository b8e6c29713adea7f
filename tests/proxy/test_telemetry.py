"""Istio's standard metrics with every label Kiali reads, and latency histograms."""

from __future__ import annotations

import asyncio
import dataclasses
import json

from proxy_kit import (
    Client,
    Upstream,
    address,
    error_type,
    http_get,
    mesh,
    refusing_port,
    run,
    until,
)

from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.config.models import Telemetry
from metaprotocol_sdk.proxy.stats import Stats
from metaprotocol_sdk.proxy.telemetry import workload_from_environment

#: The labels Kiali groups istio_requests_total by (and Istio's standard metrics carry).
KIALI_LABELS = {
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
}

ROUTER = """\
- name: limited
  match: {attributes: {method: {exact: limited}}}
  route: [{destination: {host: svc.test, subset: v1}}]
  fault: {abort: {errorType: Unspecified}}
- name: slow
  match: {attributes: {method: {exact: hang}}}
  route: [{destination: {host: svc.test, subset: v1}}]
  timeout: 50ms
- name: v1
  match: {attributes: {method: {exact: get}}}
  route: [{destination: {host: svc.test, subset: v1}}]
- name: broken
  match: {attributes: {method: {exact: broken}}}
  route: [{destination: {host: svc.test, subset: v2}}]
"""


def with_istio(text: str, on: bool = True) -> Engine:
    """An engine for ``text`` with Istio's standard metrics on (or off)."""
    config = loads_config(text)
    proxy = dataclasses.replace(config.proxy, telemetry=Telemetry(istio_metrics=on))
    return Engine(dataclasses.replace(config, proxy=proxy))


def istio_series(engine: Engine) -> list[dict[str, str]]:
    """The label sets of istio_requests_total, each with its value under 'value'."""
    out = []
    for name, value in engine.stats_snapshot().items():
        if name.startswith("istio_requests_total{"):
            labels = dict(
                part.split("=", 1) for part in name[len("istio_requests_total{") : -1].split('",')
            )
            labels = {k: v.strip('"') for k, v in labels.items()}
            out.append({**labels, "value": str(value)})
    return out


def test_istio_metrics_carry_every_kiali_label_with_meaningful_values() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        engine = with_istio(mesh([(up.port, "v1"), (refusing_port(), "v2")], router=ROUTER))
        await engine.start()
        try:
            c = await Client.connect(address(engine))
            for _ in range(3):
                assert error_type(await c.call("get")) is None
            assert error_type(await c.call("limited")) == "Unspecified"
            assert error_type(await c.call("hang")) == "Timeout"
            assert error_type(await c.call("broken")) == "UpstreamConnectFailure"
            assert error_type(await c.call("nothing")) == "RouteNotFound"
            series = istio_series(engine)
            for labels in series:
                assert labels.keys() >= KIALI_LABELS, KIALI_LABELS - labels.keys()
                empty = {k for k in KIALI_LABELS if not labels[k]} - {"grpc_response_status"}
                assert not empty, (labels, empty)
            by_code = {(s["response_code"], s["response_flags"]): s for s in series}
            ok = by_code[("200", "-")]
            assert ok["value"] == "3"
            assert ok["request_protocol"] == "kv"
            assert ok["destination_service"] == "svc.test"
            assert ok["destination_version"] == "v1"
            assert ok["reporter"] == "source"
            assert ok["connection_security_policy"] == "unknown"  # as Istio at the source
            assert {("500", "FI"), ("504", "UT"), ("503", "UF"), ("404", "NR")} <= by_code.keys()
            assert by_code[("503", "UF")]["destination_version"] == "v2"
            # durations: one observation per request on both histograms
            snapshot = engine.stats_snapshot()
            counts = {
                k: v
                for k, v in snapshot.items()
                if k.startswith("metaprotocol_request_duration_milliseconds_count")
            }
            assert sum(counts.values()) == 7
            istio_count = sum(
                v
                for k, v in snapshot.items()
                if k.startswith("istio_request_duration_milliseconds_count")
            )
            assert istio_count == 7
            # TCP series of the upstream connections (to the v1 endpoint and the refusing v2)
            tcp = {
                k: v
                for k, v in snapshot.items()
                if k.startswith("istio_tcp_") and 'destination_version="v1"' in k
            }
            opened = next(v for k, v in tcp.items() if "connections_opened" in k)
            sent = next(v for k, v in tcp.items() if "sent_bytes" in k)
            received = next(v for k, v in tcp.items() if "received_bytes" in k)
            assert opened == 1 and sent > 0 and received > 0
            c.close()
        finally:
            await engine.stop(drain=0.5)
            await up.close()

    run(main())


def test_histograms_in_prometheus_text() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        engine = with_istio(mesh([(up.port, "v1")]))
        await engine.start()
        try:
            c = await Client.connect(address(engine))
            await asyncio.gather(*(c.start() for _ in range(20)))
            assert engine.admin_address is not None
            status, body = await http_get(engine.admin_address, "/stats")
            assert status == 200
            assert "# TYPE metaprotocol_request_duration_milliseconds histogram" in body
            assert "# TYPE istio_request_bytes histogram" in body
            lines = [line for line in body.splitlines() if line.startswith("istio_request_bytes")]
            buckets = [float(line.rsplit(" ", 1)[1]) for line in lines if "_bucket{" in line]
            assert buckets == sorted(buckets) and buckets[-1] == 20  # cumulative, +Inf = count
            count = next(line for line in lines if line.startswith("istio_request_bytes_count"))
            assert count.endswith(" 20")
            status, body = await http_get(engine.admin_address, "/stats?format=json")
            assert any(k.endswith('le="+Inf"}') for k in json.loads(body))
            c.close()
        finally:
            await engine.stop(drain=0.5)
            await up.close()

    run(main())


def test_histogram_counts_and_sums_are_exact_in_prometheus_text() -> None:
    """Counts and sums are written in full. (They were written with six significant digits:
    a histogram that had counted 1 234 567 requests read 1.23457e+06, 3 requests fewer, and
    a sum of 1 234 567.891 ms read 1.23457e+06.)"""
    stats = Stats()
    histogram = stats.histogram("metaprotocol_request_duration_milliseconds", (1, 10))
    histogram.counts[:] = [1_234_567, 0, 3]
    histogram.sum = 1_234_567.891
    text = stats.prometheus()
    name = "metaprotocol_request_duration_milliseconds"
    assert f'{name}_bucket{{le="1"}} 1234567\n' in text
    assert f'{name}_bucket{{le="+Inf"}} 1234570\n' in text
    assert f"{name}_count 1234570\n" in text
    assert f"{name}_sum 1234567.891\n" in text


def test_istio_metrics_are_off_unless_configured() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        engine = Engine(loads_config(mesh([(up.port, "v1")])))
        await engine.start()
        try:
            c = await Client.connect(address(engine))
            await c.call()
            assert istio_series(engine) == []
            assert any(
                k.startswith("metaprotocol_request_duration_milliseconds_count")
                for k in engine.stats_snapshot()
            )
            c.close()
        finally:
            await engine.stop(drain=0.5)
            await up.close()

    run(main())


def test_workload_from_a_sidecar_environment() -> None:
    env = {
        "ISTIO_META_WORKLOAD_NAME": "greeter-v1",
        "POD_NAMESPACE": "shop",
        "ISTIO_META_CLUSTER_ID": "east",
        "ISTIO_METAJSON_LABELS": json.dumps({"app": "greeter", "version": "v1"}),
    }
    workload = workload_from_environment(env)
    assert (workload.name, workload.namespace, workload.cluster) == ("greeter-v1", "shop", "east")
    assert (workload.app, workload.version) == ("greeter", "v1")
    assert (workload.canonical_service, workload.canonical_revision) == ("greeter", "v1")
    bare = workload_from_environment({"ISTIO_METAJSON_LABELS": "not json"})
    assert (bare.name, bare.namespace, bare.canonical_revision) == ("unknown", "unknown", "latest")


def test_a_stream_is_one_request_of_istios_series() -> None:
    """A stream had no Istio series at all (Kiali showed no traffic for a streaming
    service): it counts as one request when it ends, as Envoy counts a gRPC stream, its
    duration the stream's and its sizes the bytes each way; a stream the upstream refused to
    connect is a 503 with ``UF``."""
    from test_streams import StreamClient, StreamServer

    from metaprotocol_sdk.examples.kv import STREAM_DATA, STREAM_HALF_CLOSE, STREAM_OPEN

    async def main() -> None:
        up = await StreamServer().start()
        engine = with_istio(mesh([(up.port, "v1"), (refusing_port(), "v2")], router=ROUTER))
        await engine.start()
        try:
            c = await StreamClient.connect(address(engine))
            c.frame(STREAM_OPEN, 5, {"method": "get"})
            c.frame(STREAM_DATA, 5, {}, b"x" * 300)
            c.frame(STREAM_HALF_CLOSE, 5)
            await c.until(5, 3)  # the server's open, its data and its half-close
            await until(lambda: not engine.upstreams, "the stream's connection closed")
            c.frame(STREAM_OPEN, 7, {"method": "broken"})  # routed to the refusing v2
            await c.until(7, 1)
            series = {(s["response_code"], s["response_flags"]): s for s in istio_series(engine)}
            ok = series[("200", "-")]
            assert ok["value"] == "1" and ok["request_protocol"] == "kv"
            assert ok["destination_version"] == "v1"
            assert series[("503", "UF")]["value"] == "1"
            snapshot = engine.stats_snapshot()
            sent = sum(
                v
                for k, v in snapshot.items()
                if k.startswith("istio_request_bytes_sum") and 'response_code="200"' in k
            )
            assert sent > 300  # the client's three frames
            c.close()
        finally:
            await engine.stop(drain=0.5)
            await up.close()

    run(main())
