"""What each traffic policy costs per request: the engine's Python work with and without it.

Fake transports stand in for the sockets (as ``tests/proxy/bench_hotpath.py``), so this
measures routing, the filter chain, the policy and the KV codec only. Every variant runs in
the same process, in interleaved windows (a few thousand requests each, forward then backward
order), and the figure is the median over windows of CPU per request; the ratio is to the
variant with nothing configured, measured in the same rounds.

Run: ``./dev bench policies`` or ``.venv/bin/python bench/bench_policies.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import time
import types
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "proxy"))

from proxy_kit import mesh, wire_fakes

from metaprotocol_sdk.examples.kv import REQUEST, RESPONSE, build_frame
from metaprotocol_sdk.filters import Filter, RequestContext, ResponseContext
from metaprotocol_sdk.proxy import Engine, loads_config


class NoopRequestFilter(Filter):
    """A user filter that looks at every request and lets it go on."""

    name = "noop-request"

    def on_request(self, context: RequestContext) -> Awaitable[None] | None:
        return None


class NoopResponseFilter(Filter):
    """A user filter that looks at every answer's status (replies stay undecoded)."""

    name = "noop-response"

    def on_response(self, context: ResponseContext) -> None:
        return None


_mod = types.ModuleType("bench_policy_filters")
_mod.NoopRequestFilter = NoopRequestFilter  # type: ignore[attr-defined]
_mod.NoopResponseFilter = NoopResponseFilter  # type: ignore[attr-defined]
sys.modules["bench_policy_filters"] = _mod

ROUTE = "- name: hello\n  route: [{destination: {host: svc.test, subset: v1}}]\n"
NEVER = "{value: 0.0001}"  # a sampled policy that (almost) never fires: the check's cost

VARIANTS: dict[str, dict[str, str]] = {
    "nothing configured": {},
    "user request filter (no-op)": {"filter": "bench_policy_filters:NoopRequestFilter"},
    "user response filter (no-op)": {"filter": "bench_policy_filters:NoopResponseFilter"},
    "localRateLimit (never empty)": {
        "limit": "{tokenBucket: {maxTokens: 1000000000, tokensPerFill: 1, fillInterval: 1h}}"
    },
    "fault abort (0.0001 %)": {
        "route": f"  fault: {{abort: {{errorType: Unspecified, percentage: {NEVER}}}}}\n"
    },
    "fault delay (0.0001 %)": {
        "route": f"  fault: {{delay: {{fixedDelay: 1s, percentage: {NEVER}}}}}\n"
    },
    "retries (none needed)": {"route": "  retries: {attempts: 2}\n"},
    "mirror (100 %, same host)": {"route": "  mirror: {host: svc.test, subset: v1}\n"},
    "outlierDetection": {"policy": "{outlierDetection: {consecutive5xxErrors: 5}}"},
    "connectionPool (http2MaxRequests)": {
        "policy": "{connectionPool: {http: {http2MaxRequests: 1000000}}}"
    },
    # Spans go to a no-op exporter through the engine's batch processor (its thread's CPU counts).
    "tracing (1 % sampled)": {"tracing": "1"},
    "tracing (100 % sampled)": {"tracing": "100"},
    "tracing (client sent unsampled ctx)": {"tracing": "1", "traceparent": "00"},
    # Lines go to /dev/null through the log's writer thread (its CPU counts).
    "accessLog (every request)": {"proxy": "accessLog: {path: /dev/null}\n"},
    "accessLog (every request, 2 attributes)": {
        "proxy": "accessLog: {path: /dev/null, attributes: [method, interface]}\n"
    },
    "accessLog (failures only: none)": {
        "proxy": "accessLog: {path: /dev/null, filter: {failures: true}}\n"
    },
}


def config(variant: dict[str, str]) -> str:
    text = mesh(
        [(1, "v1")],
        router=ROUTE + variant.get("route", ""),
        traffic_policy=variant.get("policy", "{}"),
        proxy=(
            f"tracing: {{endpoint: '127.0.0.1:4317', randomSampling: {variant['tracing']}}}\n"
            if "tracing" in variant
            else variant.get("proxy", "")
        ),
    )
    if "limit" in variant:
        text = text.replace("  routes:\n", f"  localRateLimit: {variant['limit']}\n  routes:\n", 1)
    if "filter" in variant:
        text = text.replace(
            "bind: '127.0.0.1:0'}]",
            f"bind: '127.0.0.1:0', filters: [{{name: '{variant['filter']}'}}]}}]",
            1,
        )
    return text


async def driver(text: str, flags: str | None = None) -> tuple[Engine, Callable[[], None]]:
    """A started engine and a function that runs one request and its reply through it
    (``flags``: the request carries a W3C ``traceparent`` with these flags)."""
    engine = Engine(loads_config(text))
    await engine.start()
    down, down_t, up, up_t = wire_fakes(engine)
    headers = {"method": "sayHello", "interface": "greeter"}
    if flags is not None:
        headers["traceparent"] = f"00-{'ab' * 16}-{'cd' * 8}-{flags}"
    request = build_frame(REQUEST, 7, headers, b"x" * 64)
    replies: dict[int, bytes] = {}

    def reply(wire_id: int) -> bytes:
        frame = replies.get(wire_id)
        if frame is None:
            frame = replies[wire_id] = build_frame(RESPONSE, wire_id, {"s": "1"}, b"ok")
        return frame

    def one() -> None:
        down.data_received(request)
        up._flush()  # normally run by the loop once it has delivered all it read
        sent: list[Any] = [frame for call in up_t.calls for frame in call]
        up_t.calls.clear()
        for frame in sent:  # the request, and its mirrored copy when there is one
            up.data_received(reply(struct.unpack_from(">I", frame, 4)[0]))
        down_t.calls.clear()

    for _ in range(2000):
        one()
    return engine, one


def export_nowhere() -> None:
    """Spans of the tracing variants go to a no-op exporter instead of a collector."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from metaprotocol_sdk.proxy import tracing

    class Nowhere(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracing.exporter_factory = lambda settings: Nowhere()


async def main(rounds: int, window: int) -> None:
    export_nowhere()
    drivers = {name: await driver(config(v), v.get("traceparent")) for name, v in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in drivers}
    ratios: dict[str, list[float]] = {name: [] for name in drivers}
    names = list(drivers)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        this_round: dict[str, float] = {}
        for name in order:
            one = drivers[name][1]
            start = time.process_time()
            for _ in range(window):
                one()
            this_round[name] = (time.process_time() - start) / window * 1e6
        base = this_round["nothing configured"]
        for name, us in this_round.items():
            times[name].append(us)
            ratios[name].append(us / base)
    print(f"CPU per request, median of {rounds} interleaved windows of {window} requests")
    print(f"{'variant':38} {'us/request':>10} {'vs nothing':>10} {'+us':>7}")
    base_us = statistics.median(times["nothing configured"])
    for name in names:
        us = statistics.median(times[name])
        ratio = statistics.median(ratios[name])
        print(f"{name:38} {us:10.2f} {ratio:9.3f}x {us - base_us:7.2f}")
    for engine, _ in drivers.values():
        await engine.stop(drain=0.1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--window", type=int, default=3000)
    args = parser.parse_args()
    uvloop.run(main(args.rounds, args.window))
