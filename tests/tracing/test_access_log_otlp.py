"""The access log to an OpenTelemetry collector (``spec.accessLog.otlp``, OTLP logs over gRPC),
with real engines and sockets and the tests' OTLP receiver (``collector.py``, on the official
``opentelemetry-proto`` service definitions: no real collector can run here).

Every line reaches the collector as a record (body the line, attributes its fields, the
request's time), alone or next to a file; a collector that hangs, fails or rejects records
never holds up a request, and every record it did not take is counted.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from collector import Collector
from proxy_kit import Client, Upstream, address, engine_for, mesh, run, until

from metaprotocol_sdk import ConfigError
from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.otlp_logs import SCOPE, SEVERITY_INFO


@pytest.fixture
def collectors() -> Iterator[list[Collector]]:
    made: list[Collector] = []
    yield made
    for c in made:
        c.stop()


def exported(port: int, collector: Collector, extra: str = "") -> str:
    log = (
        f"accessLog: {{otlp: {{endpoint: '{collector.address}', serviceName: gateway"
        f"{extra}}}, attributes: [method]}}\n"
    )
    return mesh([(port, "v1")], proxy=log)


async def calls(engine: Engine, n: int, clients: int = 2) -> None:
    """``n`` requests over ``clients`` connections, every one answered by the upstream."""
    conns = [await Client.connect(address(engine)) for _ in range(clients)]
    replies = await asyncio.gather(*(conns[i % clients].call("get") for i in range(n)))
    assert all(r.attributes.get("server") == "a" for r in replies)
    for c in conns:
        c.close()


def stat(engine: Engine, name: str) -> int:
    return int(engine.stats.get(name) or 0)


def test_every_line_reaches_the_collector_as_a_record(
    collectors: list[Collector], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POD_NAME", "gateway-7d9f")
    monkeypatch.setenv("POD_NAMESPACE", "shop")
    collector = Collector()
    collectors.append(collector)

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(exported(up.port, collector)) as engine:
            await calls(engine, 20)
            await until(lambda: len(collector.logs) == 20, "20 records")
            assert stat(engine, "metaprotocol_access_log_dropped_records_total") == 0
        await up.close()

    run(main())
    record = collector.logs[0]
    assert record.resource == {
        "service.name": "gateway",
        "k8s.pod.name": "gateway-7d9f",
        "k8s.namespace.name": "shop",
    }
    assert record.scope == SCOPE and record.severity == SEVERITY_INFO
    line = json.loads(record.body)
    assert record.time_unix_nano == int(line["time"] * 1e9)
    assert record.attributes["listener"] == "svc.test:9000"
    assert record.attributes["status"] == "Ok" and record.attributes["response_flags"] == "-"
    assert record.attributes["attributes"] == {"method": "get"}
    assert isinstance(record.attributes["request_id"], int)
    assert isinstance(record.attributes["duration_ms"], float)
    assert {k: v for k, v in line.items() if k != "time"} == record.attributes
    ids = sorted((r.attributes["downstream"], r.attributes["request_id"]) for r in collector.logs)
    assert len(set(ids)) == 20


def test_a_file_and_the_collector_get_the_same_lines(
    collectors: list[Collector], tmp_path: Path
) -> None:
    collector = Collector()
    collectors.append(collector)
    path = tmp_path / "access.log"

    async def main() -> None:
        up = await Upstream("a").start()
        text = exported(up.port, collector).replace(
            "accessLog: {", f"accessLog: {{path: '{path}', "
        )
        async with engine_for(text) as engine:
            await calls(engine, 10)
            await until(lambda: len(collector.logs) == 10, "10 records")
        await up.close()

    run(main())
    assert sorted(path.read_text().splitlines()) == sorted(r.body for r in collector.logs)


@pytest.mark.parametrize("mode", ["hang", "error"])
def test_a_collector_that_hangs_or_fails_holds_up_no_request_and_its_losses_are_counted(
    collectors: list[Collector], mode: str
) -> None:
    """A collector that never answers (each export given up after exportTimeout) or refuses
    every export: requests are answered as without it, and every record lost is counted."""
    collector = Collector(mode)
    collectors.append(collector)

    async def main() -> None:
        up = await Upstream("a").start()
        text = exported(up.port, collector, ", exportTimeout: 200ms")
        async with engine_for(text) as engine:
            await calls(engine, 30)
            await until(
                lambda: stat(engine, "metaprotocol_access_log_dropped_records_total") == 30,
                "every record counted as lost",
                timeout=20,
            )
            assert stat(engine, "metaprotocol_access_log_export_failures_total") >= 1
            await calls(engine, 5)  # still answered
        await up.close()

    run(main())
    assert collector.called.is_set() and collector.logs == []


def test_records_the_collector_rejects_are_counted(collectors: list[Collector]) -> None:
    collector = Collector()
    collector.reject_records = 3
    collectors.append(collector)

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(exported(up.port, collector)) as engine:
            await calls(engine, 10)
            await until(lambda: collector.log_exports >= 1, "an export")
            await until(
                lambda: (
                    stat(engine, "metaprotocol_access_log_dropped_records_total")
                    == 3 * collector.log_exports
                ),
                "the rejected records counted",
            )
            assert len(collector.logs) + 3 * collector.log_exports == 10
            assert stat(engine, "metaprotocol_access_log_export_failures_total") == 0
        await up.close()

    run(main())


@pytest.mark.parametrize(
    "log,field",
    [
        ("{attributes: [method]}", "spec.accessLog.path"),
        ("{otlp: {}}", "spec.accessLog.otlp.endpoint"),
        ("{otlp: {endpoint: collector}}", "spec.accessLog.otlp.endpoint"),
        ("{otlp: {endpoint: 'c:4317', exportTimeout: 1h}}", "spec.accessLog.otlp.exportTimeout"),
        ("{otlp: {endpoint: 'c:4317', insecure: false}}", "spec.accessLog.otlp.insecure"),
        ("{path: '', otlp: {endpoint: 'c:4317'}}", "spec.accessLog.path"),
    ],
)
def test_the_collector_settings_are_checked(log: str, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        loads_config(mesh([(1, "v1")], proxy=f"accessLog: {log}\n"), "test.yaml")
    assert caught.value.field == field, caught.value
