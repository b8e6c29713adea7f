"""Spans under a hostile collector: every span is exported or counted as dropped, by reason.

Real engines and sockets, a real OTLP/gRPC receiver (``collector.py``) that never answers,
answers errors, or holds each call until the test lets it go. The counts of
``metaprotocol_tracing_spans_total{result}`` must add up to the spans made (one per request:
sampling is 100 %).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from collector import Collector
from proxy_kit import Client, Upstream, address, engine_for, mesh, run

from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.tracing import RESULTS, SPANS_TOTAL, provider_of


@pytest.fixture
def collectors() -> Iterator[list[Collector]]:
    made: list[Collector] = []
    yield made
    for c in made:
        c.stop()


def traced(port: int, collector: Collector, queue: int, timeout: str) -> str:
    tracing = (
        f"tracing: {{endpoint: '{collector.address}', maxQueueSize: {queue}, "
        f"exportTimeout: {timeout}}}\n"
    )
    return mesh([(port, "v1")], proxy=tracing)


def counts(engine: Engine) -> dict[str, int]:
    return {r: engine.stats.get(SPANS_TOTAL, result=r) for r in RESULTS}


async def calls(engine: Engine, n: int, clients: int = 4) -> None:
    """``n`` requests over ``clients`` connections; every one answered by the upstream."""
    conns = [await Client.connect(address(engine)) for _ in range(clients)]
    replies = await asyncio.gather(*(conns[i % clients].call("get") for i in range(n)))
    assert all(r.attributes.get("server") == "a" for r in replies)
    for c in conns:
        c.close()


async def flush(engine: Engine) -> None:
    """Export (or count) every queued span now."""
    provider = provider_of(engine)
    assert provider is not None
    await asyncio.to_thread(provider.force_flush)


def test_a_collector_that_never_answers_costs_counted_spans(
    collectors: list[Collector],
) -> None:
    collector = Collector("hang")
    collectors.append(collector)

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(traced(up.port, collector, 20, "0.3s")) as engine:
            await calls(engine, 300)
            await flush(engine)
            got = counts(engine)
            assert sum(got.values()) == 300, got
            assert got["exported"] == 0 and got["export_failed"] == 0, got
            assert got["timeout"] >= 20 and got["queue_full"] > 0, got
            text = engine.prometheus()
            assert f'{SPANS_TOTAL}{{result="timeout"}} {got["timeout"]}\n' in text
        await up.close()

    run(main())


def test_a_collector_that_answers_errors_costs_counted_spans(
    collectors: list[Collector],
) -> None:
    collector = Collector("error")
    collectors.append(collector)

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(traced(up.port, collector, 2048, "5s")) as engine:
            await calls(engine, 50)
            await flush(engine)
            got = counts(engine)
            assert got == {**dict.fromkeys(RESULTS, 0), "export_failed": 50}, got
        await up.close()

    run(main())


def test_a_slow_collector_drops_what_overflows_the_queue_and_exports_the_rest(
    collectors: list[Collector],
) -> None:
    """The first batch (10 spans: the queue's size) is held by the collector; of the next
    100 requests 10 wait in the queue and 90 are dropped; then the collector takes them."""
    collector = Collector("gate")
    collectors.append(collector)

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(traced(up.port, collector, 10, "30s")) as engine:
            await calls(engine, 10)
            assert await asyncio.to_thread(collector.called.wait, 10)
            await calls(engine, 100)
            assert counts(engine)["queue_full"] == 90
            collector.gate.set()
            await flush(engine)
            got = counts(engine)
            assert got == {**dict.fromkeys(RESULTS, 0), "exported": 20, "queue_full": 90}, got
            assert len(collector.spans) == 20
        await up.close()

    run(main())


def test_stop_counts_what_a_collector_that_never_answers_did_not_take(
    collectors: list[Collector],
) -> None:
    """The spans still queued or being exported when the engine stops are counted as
    ``shutdown``; the stop stays bounded (``engine.TRACING_FLUSH``)."""
    collector = Collector("hang")
    collectors.append(collector)

    async def main() -> None:
        up = await Upstream("a").start()
        took = 0.0
        async with engine_for(traced(up.port, collector, 2048, "30s")) as engine:
            await calls(engine, 600)  # a batch of 512 goes (held), 88 wait in the queue
            assert await asyncio.to_thread(collector.called.wait, 10)
            start = time.monotonic()
        took = time.monotonic() - start
        await up.close()
        assert took < 3.0, took
        deadline = time.monotonic() + 5
        while sum(counts(engine).values()) < 600 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the exporter's thread counts the cancelled batch
        assert counts(engine) == {**dict.fromkeys(RESULTS, 0), "shutdown": 600}

    run(main())


def exporter_threads() -> int:
    return sum(t.name == "metaprotocol-tracing-export" for t in threading.enumerate())


def test_a_start_that_fails_ends_the_exporters_thread(collectors: list[Collector]) -> None:
    """The routes make the exporter's thread (with the tracer); a start that failed after
    (a listener's address in use) left it running, with its gRPC channel, for the life of
    the process: one more per failed start."""
    collector = Collector("ok")
    collectors.append(collector)

    async def main() -> None:
        up = await Upstream("a").start()
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            text = traced(up.port, collector, 64, "1s").replace(
                "bind: '127.0.0.1:0'", f"bind: '127.0.0.1:{busy.getsockname()[1]}'"
            )
            before = exporter_threads()
            for _ in range(3):
                with pytest.raises(OSError):
                    await Engine(loads_config(text, "test.yaml")).start()
            assert exporter_threads() == before
        await up.close()

    run(main())
