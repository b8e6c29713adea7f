"""Performance smoke: decode and encode throughput, reported and never asserted."""

from __future__ import annotations

import contextlib
import time

from metaprotocol_sdk.codec import join_encoded
from metaprotocol_sdk.errors import CodecError

from ._support import collect, no_messages, reference
from .base import CheckContext, check


@check("perf_throughput", "perf")
def perf_throughput(ctx: CheckContext) -> None:
    """Measure decode and encode (plain and mutated) throughput on the sample messages."""
    samples = collect(ctx, 20)
    if not samples:
        no_messages()
    budget = ctx.target.settings.perf_seconds
    decoded = [(s, reference(ctx, s)) for s in samples]
    codecs = [ctx.target.new_codec(s.options) for s in samples]
    total_bytes = sum(len(s.frame) for s in samples)

    def rate(run_once: object) -> tuple[float, int]:
        assert callable(run_once)
        rounds = 0
        start = time.perf_counter()
        while True:
            run_once()
            rounds += 1
            elapsed = time.perf_counter() - start
            if elapsed >= budget:
                return elapsed, rounds

    def decode_all() -> None:
        for (sample, _), codec in zip(decoded, codecs, strict=True):
            codec.decode(bytearray(sample.frame))

    def encode_all() -> None:
        for (_, metadata), codec in zip(decoded, codecs, strict=True):
            join_encoded(codec.encode(metadata))

    mutation = ctx.target.mutation

    def encode_mutated() -> None:
        for (_, metadata), codec in zip(decoded, codecs, strict=True):
            with contextlib.suppress(CodecError):
                join_encoded(codec.encode(metadata, mutation))

    lines = []
    runs = [("decode", decode_all), ("encode", encode_all)]
    if ctx.target.codec.capabilities.mutation:
        runs.append(("encode+mutation", encode_mutated))
    for name, run in runs:
        elapsed, rounds = rate(run)
        messages = rounds * len(samples) / elapsed
        megabytes = rounds * total_bytes / elapsed / 1e6
        ctx.details[f"{name}_msgs_per_s"] = round(messages)
        ctx.details[f"{name}_mb_per_s"] = round(megabytes, 2)
        lines.append(f"{name} {messages:,.0f} msg/s ({megabytes:.1f} MB/s)")
    ctx.details["messages"] = len(samples)
    ctx.details["summary"] = f"{'; '.join(lines)} over {len(samples)} messages"
