"""Linear time: four times the input may cost about four times as much, never sixteen.

Costs are compared as a ratio of CPU time (this thread only) between an input of size ``n``
and one of size ``4n``, each the best of several interleaved rounds, so the check holds on a
busy shared machine: noise slows both sizes alike, and a quadratic codec's ratio (towards 16)
stays above the allowed ``linear_limit`` (8 by default: twice what linear costs).

Every timed call gets an input it has not seen (built, untimed, just before), because a hostile
client sends new frames: a codec that caches what it parsed must not look linear only because
the same frame was decoded again.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from metaprotocol_sdk.codec import Codec, NeedData, join_encoded
from metaprotocol_sdk.enums import MessageType
from metaprotocol_sdk.errors import CodecError, ConfigError, MutationError
from metaprotocol_sdk.metadata import Metadata
from metaprotocol_sdk.testing.golden import Sample
from metaprotocol_sdk.testing.hexdump import hexdump
from metaprotocol_sdk.testing.hooks import grown_samples

from ._support import collect, decode_whole, fail, no_messages, reference
from .base import CheckContext, CheckSkipped, check

#: How much larger the big input is than the small one.
SCALE = 4
#: Each timing runs its operation on enough inputs to use about this much CPU, to rise above
#: the clock's resolution.
MIN_SECONDS = 0.001
#: The most inputs one timing builds.
MAX_BATCH = 32
#: Interleaved small/large rounds per measurement; the best of each is compared.
ROUNDS = 3
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
class Sized:
    """One size of a growth dimension: a first frame and a source of new ones like it."""

    sample: Sample
    #: A new frame of the same size and shape each call (or the same one when the kit has
    #: no way to vary it).
    fresh: Callable[[], bytes]


@dataclass(frozen=True)
class Pair:
    """One growth dimension: the same kind of message at size ``n`` and ``4n``."""

    name: str
    small: Sized
    large: Sized
    #: The operations to time on it (default: every operation on one message, ``_ops``).
    ops: Callable[[CheckContext, str, Sized], dict[str, tuple[Op, float]]] | None = None


@dataclass(frozen=True)
class Op:
    """An operation to time: ``run(prepare(frame))``, only ``run`` timed."""

    prepare: Callable[[bytes], Any]
    run: Callable[[Any], object]


def _cost(op: Op, fresh: Callable[[], bytes], batch: int) -> float:
    """CPU seconds per call of ``op`` over ``batch`` new inputs."""
    inputs = [op.prepare(fresh()) for _ in range(batch)]
    start = _clock()
    for value in inputs:
        op.run(value)
    return (_clock() - start) / batch


def _batch(once: float) -> int:
    return max(1, min(MAX_BATCH, int(MIN_SECONDS / max(once, 1e-7)) + 1))


def _ratio(
    op: str, pair: Pair, ops: Mapping[str, tuple[Op, Op, float, float]]
) -> tuple[float, float, float]:
    """(large/small, small, large) per-call costs, each the best of ROUNDS interleaved rounds."""
    small_op, large_op, small_once, large_once = ops[op]
    small_batch, large_batch = _batch(small_once), _batch(large_once)
    enabled = gc.isenabled()
    gc.disable()  # a collection landing in one timing but not the other is noise
    try:
        best_small = best_large = float("inf")
        for _ in range(ROUNDS):
            best_small = min(best_small, _cost(small_op, pair.small.fresh, small_batch))
            best_large = min(best_large, _cost(large_op, pair.large.fresh, large_batch))
    finally:
        if enabled:
            gc.enable()
    return best_large / best_small, best_small, best_large


def _reads(codec: Codec, frame: bytes) -> object:
    """Deliver ``frame`` in READ_SIZE reads, calling decode as an engine does (once the buffer
    holds what the last ``NeedData.needed`` asked for)."""
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


def _roomy(ctx: CheckContext, sample: Sample) -> Codec:
    """A codec whose max_frame_size admits the sample (the default when that is refused)."""
    try:
        return ctx.target.new_codec(
            sample.options, max_frame_size=max(2 * len(sample.frame), 1 << 20)
        )
    except ConfigError:
        return ctx.target.new_codec(sample.options)


def _ops(ctx: CheckContext, pair: str, sized: Sized) -> dict[str, tuple[Op, float]]:
    """Every operation the engine runs on a message of this kind, tried once: (op, seconds)."""
    sample = sized.sample
    frame = sample.frame
    codec, reader = _roomy(ctx, sample), _roomy(ctx, sample)
    message = decode_whole(reader, frame, f"the grown message {pair!r}")
    caps = ctx.target.codec.capabilities

    def decoded(data: bytes) -> Metadata:
        result = reader.decode(bytearray(data))
        assert isinstance(result, Metadata)
        return result

    def encoding(mutation: Mapping[str, str] | None, new_id: int | None) -> Op:
        return Op(decoded, lambda m: join_encoded(codec.encode(m, mutation, request_id=new_id)))

    ops: dict[str, Op] = {
        "decode": Op(bytearray, codec.decode),
        f"decode in {READ_SIZE}-byte reads": Op(bytes, lambda data: _reads(codec, data)),
        "encode": encoding(None, None),
    }
    if caps.rewrite_request_id and message.message_type is not MessageType.Heartbeat:
        new_id = message.request_id - 1 if message.request_id > 0 else message.request_id + 1
        ops["encode(request_id=)"] = encoding(None, new_id)
    if caps.mutation:
        mutation = dict(ctx.target.mutation)
        try:
            codec.encode(message, mutation)
        except MutationError:
            pass
        else:
            ops["encode(mutation)"] = encoding(mutation, None)
    tried: dict[str, tuple[Op, float]] = {}
    for name, op in ops.items():
        what = f"{name} of {pair} ({len(frame)} bytes)"
        value = op.prepare(frame)
        start = _clock()
        try:
            result = op.run(value)
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


def _mutated(
    ctx: CheckContext, sample: Sample, original: Metadata, mutation: dict[str, str]
) -> Sized:
    """Frames of ``original`` with ``mutation`` written, each new one with another counter."""
    encoder = ctx.target.new_codec(sample.options)
    counter = itertools.count()

    def fresh() -> bytes:
        unique = {**mutation, "x-mp-linear-n": str(next(counter))}
        return join_encoded(encoder.encode(original, unique))

    return Sized(Sample(fresh(), options=sample.options), fresh)


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
        pairs = []
        for name, make in _SHAPES.items():
            try:
                small = _mutated(ctx, sample, original, make(n))
                large = _mutated(ctx, sample, original, make(SCALE * n))
            except MutationError:
                continue
            except CodecError as exc:
                fail(f"encode with {name} raised {type(exc).__name__}: {exc}")
            pairs.append(Pair(f"{kind.name} with {name}", small, large))
        if pairs:
            return pairs
    return []


def _relabelled(ctx: CheckContext, sample: Sample) -> Sized:
    """The author's frame, with a new request id each call when the codec can rewrite ids."""
    codec = _roomy(ctx, sample)
    message = decode_whole(codec, sample.frame, "a frame grown(n) returned")
    caps = ctx.target.codec.capabilities
    if not caps.rewrite_request_id or message.message_type is MessageType.Heartbeat:
        return Sized(sample, lambda: sample.frame)
    ids = itertools.count(1)
    top = ctx.target.codec.max_request_id

    def fresh() -> bytes:
        new_id = next(ids) % top or 1
        return join_encoded(codec.encode(message, request_id=new_id))

    return Sized(sample, fresh)


def _grown_pairs(ctx: CheckContext, n: int) -> list[Pair]:
    grown = ctx.target.grown
    if grown is None:
        return []
    small, large = grown_samples(grown, n), grown_samples(grown, SCALE * n)
    return [
        Pair(name, _relabelled(ctx, small[name]), _relabelled(ctx, large[name]))
        for name in small
        if name in large
    ]


#: Bytes the kit pads a pipelined message to with a mutation, so that a decode copying the
#: rest of the buffer on every call shows against the cost of decoding one message.
PIPELINED_PAD = 1024


def _drain(codec: Codec, buffer: bytearray) -> int:
    """Decode every message in ``buffer`` (one read holding many): how many there were."""
    count = 0
    while buffer:
        result = codec.decode(buffer)
        if not isinstance(result, Metadata):
            break
        count += 1
    return count


def _forward(codec: Codec, buffer: bytearray) -> int:
    """Take every reply in ``buffer`` as an engine forwards replies: ``peek_reply``, and
    ``decode`` where it gives no head. How many there were."""
    count = 0
    while buffer:
        head = codec.peek_reply(buffer)
        if head is None:
            if not isinstance(codec.decode(buffer), Metadata):
                break
        else:
            del buffer[: head[1]]
        count += 1
    return count


def _pipelined_ops(
    ctx: CheckContext, pair: str, sized: Sized, peeked: bool = False
) -> dict[str, tuple[Op, float]]:
    frame = sized.sample.frame
    codec = _roomy(ctx, sized.sample)
    op = Op(bytearray, lambda buffer: (_forward if peeked else _drain)(codec, buffer))
    start = _clock()
    try:
        left = bytearray(frame)
        count = op.run(left)
    except CodecError as exc:
        fail(f"decode of {pair} raised {type(exc).__name__}: {exc}")
    once = _clock() - start
    if left:
        fail(
            f"decode of {pair} ({len(frame)} bytes) stopped with {len(left)} bytes left after "
            f"{count} messages"
        )
    if peeked:
        return {"peek_reply (decode where it gives no head) of every reply in one read": (op, once)}
    return {"decode of every message in one read": (op, once)}


def _pipelined_pair(ctx: CheckContext, n: int) -> list[Pair]:
    """n and 4n messages back to back in one read: each decode must cost what its own message
    costs, not what the rest of the buffer holds (copying it, or scanning it, per call). With
    ``peek_reply``, the same for replies an engine forwards by peeking at them."""
    caps = ctx.target.codec.capabilities
    best: tuple[int, Sample, bytes] | None = None
    reply: tuple[int, Sample, bytes] | None = None
    for sample in collect(ctx, 5):
        message = reference(ctx, sample)
        frame = sample.frame
        kind = message.message_type
        if caps.mutation and kind.is_request_side:
            frame = _padded(ctx, sample, message)
        if best is None or len(frame) > best[0]:
            best = (len(frame), sample, frame)
        if caps.peek_reply and kind in (MessageType.Response, MessageType.Error):
            codec = ctx.target.new_codec(sample.options)
            padded = _padded(ctx, sample, message) if caps.response_mutation else frame
            for frame in dict.fromkeys((padded, sample.frame)):  # the padded one, if peeked
                if codec.peek_reply(bytearray(frame)) is not None:
                    if reply is None or len(frame) > reply[0]:
                        reply = (len(frame), sample, frame)
                    break
    pairs = []
    for found, name in ((best, "pipelined messages"), (reply, "pipelined replies, peeked")):
        if found is None:
            continue
        _, sample, frame = found

        def sized(count: int, sample: Sample = sample, frame: bytes = frame) -> Sized:
            data = frame * count
            return Sized(Sample(data, options=sample.options), lambda: data)

        ops = functools.partial(_pipelined_ops, peeked=found is reply)
        label = f"{n} {name}, of {len(frame)} bytes"
        pairs.append(Pair(label, sized(n), sized(SCALE * n), ops))
    return pairs


def _padded(ctx: CheckContext, sample: Sample, message: Metadata) -> bytes:
    """``sample``'s frame padded to about :data:`PIPELINED_PAD` bytes with a mutation (as is
    when the codec refuses it)."""
    encoder = ctx.target.new_codec(sample.options)
    with contextlib.suppress(MutationError):
        return join_encoded(encoder.encode(message, {"x-mp-linear-pad": "p" * PIPELINED_PAD}))
    return sample.frame


@check("perf_linear", "perf")
def perf_linear(ctx: CheckContext) -> None:
    """Decode and encode are linear: 4x the input (more keys, bigger values, the codec's own
    ``grown(n)`` dimensions) costs at most ``linear_limit`` (8) times as much."""
    n = ctx.target.settings.linear_scale
    pairs = _grown_pairs(ctx, n) + _mutation_pairs(ctx, n)
    if not pairs:
        raise CheckSkipped(
            "nothing to grow: the codec ships no grown(n) hook and takes no mutation the kit "
            "could grow a message with"
        )
    _judge(ctx, pairs)


@check("perf_linear_pipelined", "perf")
def perf_linear_pipelined(ctx: CheckContext) -> None:
    """Decoding one read of many messages is linear: 4x the messages back to back (each
    padded to about 1 KiB with a mutation when the codec takes one) cost at most
    ``linear_limit`` (8) times as much; a decode that copies or scans the rest of the buffer
    on every call is quadratic in what one read holds. With ``peek_reply``, the same for a
    read of replies taken as an engine forwards them (peeked, decoded where not)."""
    pairs = _pipelined_pair(ctx, ctx.target.settings.linear_scale)
    if not pairs:
        no_messages()
    _judge(ctx, pairs)


def _judge(ctx: CheckContext, pairs: list[Pair]) -> None:
    """Time every operation of every pair at both sizes; fail above ``linear_limit``."""
    settings = ctx.target.settings
    limit = settings.linear_limit
    worst = 0.0
    measured = []
    for pair in pairs:
        measure = pair.ops or _ops
        small_ops = measure(ctx, pair.name, pair.small)
        large_ops = measure(ctx, pair.name, pair.large)
        ops = {
            name: (small_ops[name][0], op, small_ops[name][1], once)
            for name, (op, once) in large_ops.items()
            if name in small_ops and once >= FLOOR_SECONDS
        }
        for op_name in ops:
            tries = 0
            while True:
                tries += 1
                ratio, small_cost, large_cost = _ratio(op_name, pair, ops)
                if ratio <= limit or tries == ATTEMPTS or large_cost < FLOOR_SECONDS:
                    break
            if large_cost < FLOOR_SECONDS:
                continue
            what = f"{op_name} of {pair.name}"
            measured.append(f"{what}: x{ratio:.1f}")
            worst = max(worst, ratio)
            if ratio > limit:
                small_size, large_size = len(pair.small.sample.frame), len(pair.large.sample.frame)
                fail(
                    f"{what} is not linear: {large_size} bytes cost {large_cost * 1e6:.0f} us, "
                    f"{ratio:.1f}x the {small_cost * 1e6:.0f} us of {small_size} bytes (allowed "
                    f"{limit:g}x for {SCALE}x the input; {tries} measurements, best of {ROUNDS} "
                    f"rounds each)\nthe larger input:\n" + hexdump(pair.large.sample.frame)
                )
    ctx.details["ratios"] = measured
    ctx.details["summary"] = (
        f"worst cost ratio {worst:.1f}x for {SCALE}x the input over {len(measured)} "
        f"operations (allowed {limit:g}x)"
    )
