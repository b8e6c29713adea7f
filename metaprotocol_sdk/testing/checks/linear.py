"""Linear time: four times the input may cost about four times as much, never sixteen.

Costs are compared as a ratio of CPU time (this thread only) between an input of size ``n``
and one of size ``4n``, each the best of several interleaved rounds, so the check holds on a
busy shared machine: noise slows both sizes alike, and a quadratic codec's ratio (towards 16)
stays above the allowed ``linear_limit`` (8 by default: twice what linear costs).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

from metaprotocol_sdk.codec import Codec, NeedData, join_encoded
from metaprotocol_sdk.enums import MessageType
from metaprotocol_sdk.errors import CodecError, MutationError
from metaprotocol_sdk.metadata import Metadata
from metaprotocol_sdk.testing.golden import Sample
from metaprotocol_sdk.testing.hexdump import hexdump
from metaprotocol_sdk.testing.hooks import grown_samples

from ._support import collect, decode_whole, fail, reference
from .base import CheckContext, CheckSkipped, check

#: How much larger the big input is than the small one.
SCALE = 4
#: Each timing repeats its operation until it has used this much CPU, to rise above the
#: clock's resolution and the cost of one call's setup.
MIN_SECONDS = 0.002
#: Interleaved small/large rounds per measurement; the best of each is compared.
ROUNDS = 5
#: A measurement over the limit is repeated this often before the check fails: a noisy
#: machine exceeds it now and then, a quadratic codec every time.
ATTEMPTS = 3
#: Operations cheaper than this on the large input are too fast to judge by a ratio (timer
#: and cache noise dominate) and too fast to hurt an engine.
FLOOR_SECONDS = 20e-6
#: Reads the chunked decode delivers a frame in (an engine's reads are larger; smaller reads
#: show a parser that restarts at every read).
READ_SIZE = 256

_clock = time.thread_time if hasattr(time, "thread_time") else time.perf_counter


@dataclass(frozen=True)
class Pair:
    """One growth dimension: the same kind of message at size ``n`` and ``4n``."""

    name: str
    small: Sample
    large: Sample


def _cost(op: Callable[[], object]) -> float:
    """CPU seconds per call of ``op``, averaged over enough calls to span MIN_SECONDS."""
    calls = 0
    start = _clock()
    while True:
        op()
        calls += 1
        elapsed = _clock() - start
        if elapsed >= MIN_SECONDS:
            return elapsed / calls


def _ratio(small: Callable[[], object], large: Callable[[], object]) -> tuple[float, float, float]:
    """(large/small, small, large) from the best of ROUNDS interleaved rounds."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()  # a collection landing in one timing but not the other is noise
    try:
        best_small = best_large = float("inf")
        for _ in range(ROUNDS):
            best_small = min(best_small, _cost(small))
            best_large = min(best_large, _cost(large))
    finally:
        if enabled:
            gc.enable()
    return best_large / best_small, best_small, best_large


def _decode_op(codec: Codec, frame: bytes) -> Callable[[], object]:
    return lambda: codec.decode(bytearray(frame))


def _reads_op(codec: Codec, frame: bytes) -> Callable[[], object]:
    """Deliver ``frame`` in READ_SIZE reads, calling decode as an engine does (once the buffer
    holds what the last ``NeedData.needed`` asked for)."""

    def run() -> object:
        buffer = bytearray()
        need = 0
        for start in range(0, len(frame), READ_SIZE):
            buffer += frame[start : start + READ_SIZE]
            # The last read always decodes: whether `needed` is exact is framing_needed_exact's.
            if len(buffer) < need and len(buffer) < len(frame):
                continue
            result = codec.decode(buffer)
            if not isinstance(result, NeedData):
                return result
            need = result.needed
        return None

    return run


def _encode_op(
    codec: Codec, message: Metadata, mutation: dict[str, str] | None, request_id: int | None
) -> Callable[[], object]:
    return lambda: join_encoded(codec.encode(message, mutation, request_id=request_id))


Ops = dict[str, tuple[Callable[[], object], float]]


def _ops(ctx: CheckContext, pair: str, sample: Sample) -> Ops:
    """Every operation the engine runs on a message of this kind, tried once: (op, seconds)."""
    frame = sample.frame
    codec = ctx.target.new_codec(sample.options, max_frame_size=max(2 * len(frame), 1 << 20))
    message = decode_whole(codec, frame, "a grown message")
    caps = ctx.target.codec.capabilities
    ops: dict[str, Callable[[], object]] = {
        "decode": _decode_op(codec, frame),
        f"decode in {READ_SIZE}-byte reads": _reads_op(codec, frame),
        "encode": _encode_op(codec, message, None, None),
    }
    if caps.rewrite_request_id and message.message_type is not MessageType.Heartbeat:
        new_id = message.request_id - 1 if message.request_id > 0 else message.request_id + 1
        ops["encode(request_id=)"] = _encode_op(codec, message, None, new_id)
    if caps.mutation:
        mutation = dict(ctx.target.mutation)
        try:
            _encode_op(codec, message, mutation, None)()
        except MutationError:
            pass
        else:
            ops["encode(mutation)"] = _encode_op(codec, message, mutation, None)
    tried: Ops = {}
    for name, op in ops.items():
        what = f"{name} of {pair} ({len(frame)} bytes)"
        start = _clock()
        try:
            result = op()
        except CodecError as exc:
            fail(f"{what} raised {type(exc).__name__}: {exc}")
        tried[name] = op, _clock() - start
        if name.startswith("decode") and not isinstance(result, Metadata):
            fail(f"{what} gave {result!r}, not the message")
    return tried


def _many_keys(k: int) -> dict[str, str]:
    return {f"x-mp-linear-{i:05d}": "v" for i in range(k)}


def _long_value(k: int) -> dict[str, str]:
    return {"x-mp-linear": "v" * (32 * k)}


_SHAPES: dict[str, Callable[[int], dict[str, str]]] = {
    "mutation keys": _many_keys,
    "mutation value bytes": _long_value,
}


def _mutation_pairs(ctx: CheckContext, n: int) -> list[Pair]:
    """Grow a message the codec mutates: n keys, then one value of 32n bytes (x4 each)."""
    if not ctx.target.codec.capabilities.mutation:
        return []
    response_ok = ctx.target.codec.capabilities.response_mutation
    for sample in collect(ctx, 5):
        original = reference(ctx, sample)
        kind = original.message_type
        if kind is MessageType.Heartbeat or (not kind.is_request_side and not response_ok):
            continue
        encoder = ctx.target.new_codec(sample.options)
        pairs = []
        for name, make in _SHAPES.items():
            try:
                small, large = (
                    join_encoded(encoder.encode(original, make(size))) for size in (n, SCALE * n)
                )
            except MutationError:
                continue
            except CodecError as exc:
                fail(f"encode with {name} raised {type(exc).__name__}: {exc}")
            pairs.append(
                Pair(
                    f"{kind.name} with {name}",
                    Sample(small, options=sample.options),
                    Sample(large, options=sample.options),
                )
            )
        if pairs:
            return pairs
    return []


def _grown_pairs(ctx: CheckContext, n: int) -> list[Pair]:
    grown = ctx.target.grown
    if grown is None:
        return []
    small, large = grown_samples(grown, n), grown_samples(grown, SCALE * n)
    return [Pair(name, small[name], large[name]) for name in small if name in large]


@check("perf_linear", "perf")
def perf_linear(ctx: CheckContext) -> None:
    """Decode and encode are linear: 4x the input (more keys, bigger values, the codec's own
    ``grown(n)`` dimensions) costs at most ``linear_limit`` (8) times as much."""
    settings = ctx.target.settings
    n = settings.linear_scale
    pairs = _grown_pairs(ctx, n) + _mutation_pairs(ctx, n)
    if not pairs:
        raise CheckSkipped(
            "nothing to grow: the codec ships no grown(n) hook and takes no mutation the kit "
            "could grow a message with"
        )
    limit = settings.linear_limit
    worst = 0.0
    measured = []
    for pair in pairs:
        small_ops = _ops(ctx, pair.name, pair.small)
        large_ops = _ops(ctx, pair.name, pair.large)
        for op_name, (large_op, once) in large_ops.items():
            if op_name not in small_ops or once < FLOOR_SECONDS:
                continue
            tries = 0
            while True:
                tries += 1
                ratio, small_cost, large_cost = _ratio(small_ops[op_name][0], large_op)
                if ratio <= limit or tries == ATTEMPTS or large_cost < FLOOR_SECONDS:
                    break
            what = f"{op_name} of {pair.name}"
            if large_cost < FLOOR_SECONDS:
                continue
            measured.append(f"{what}: x{ratio:.1f}")
            worst = max(worst, ratio)
            if ratio > limit:
                fail(
                    f"{what} is not linear: {len(pair.large.frame)} bytes cost "
                    f"{large_cost * 1e6:.0f} us, {ratio:.1f}x the {small_cost * 1e6:.0f} us of "
                    f"{len(pair.small.frame)} bytes (allowed {limit:g}x for {SCALE}x the input; "
                    f"{tries} measurements, best of {ROUNDS} rounds each)\nthe larger input:\n"
                    + hexdump(pair.large.frame)
                )
    ctx.details["ratios"] = measured
    ctx.details["summary"] = (
        f"worst cost ratio {worst:.1f}x for {SCALE}x the input over {len(measured)} "
        f"operations (allowed {limit:g}x)"
    )
