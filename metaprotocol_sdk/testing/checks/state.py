"""State: instances never share parse state; a codec recovers after an error and reset()."""

from __future__ import annotations

import contextlib
import copy
import functools
from typing import Any

from hypothesis import assume
from hypothesis import strategies as st

from metaprotocol_sdk.codec import Codec, NeedData, join_encoded
from metaprotocol_sdk.enums import MessageType
from metaprotocol_sdk.errors import CodecError
from metaprotocol_sdk.metadata import Metadata
from metaprotocol_sdk.testing.golden import Sample
from metaprotocol_sdk.testing.hexdump import hexdump

from ._support import (
    call_decode,
    collect,
    corruptions,
    decode_whole,
    fail,
    for_each_sample,
    labelled,
    no_messages,
    reference,
    run_property,
    same_metadata,
)
from .base import CheckContext, CheckSkipped, check

_MUTABLE = (dict, list, set, bytearray)


def _class_state(codec: type[Codec]) -> dict[str, Any]:
    """Snapshot of mutable class-level attributes (the classic shared-state bug)."""
    state = {}
    for klass in codec.__mro__:
        for name, value in vars(klass).items():
            if isinstance(value, _MUTABLE) and not name.startswith("__"):
                state[f"{klass.__name__}.{name}"] = copy.deepcopy(value)
    return state


def _attributes(codec: object) -> dict[str, Any]:
    """The instance's attributes: ``vars()`` and the slots, where a class with ``__slots__``
    and a class compiled with mypyc (``__mypyc_attrs__``) keep attributes ``vars()`` misses."""
    names = set(getattr(codec, "__dict__", ()))
    for klass in type(codec).__mro__:
        for declared in ("__slots__", "__mypyc_attrs__"):
            slots = vars(klass).get(declared, ())
            names.update([slots] if isinstance(slots, str) else slots)
    names -= {"__dict__", "__weakref__"}
    return {name: getattr(codec, name) for name in sorted(names) if hasattr(codec, name)}


def _pair_prop(ctx: CheckContext, a: Sample, b: Sample) -> None:
    codec_type = ctx.target.codec
    before = _class_state(codec_type)
    expected_a, expected_b = reference(ctx, a), reference(ctx, b)
    first = ctx.target.new_codec(a.options)
    second = ctx.target.new_codec(b.options)
    theirs = _attributes(second)
    for name, value in _attributes(first).items():
        if isinstance(value, _MUTABLE) and theirs.get(name) is value:
            fail(f"two instances share the mutable object self.{name}")
    half = max(1, len(a.frame) // 2)
    buffer = bytearray(a.frame[:half])
    try:
        pending = call_decode(first, buffer)
    except CodecError as exc:
        fail(f"the first {half} bytes of a valid message raised {type(exc).__name__}: {exc}")
    if not isinstance(pending, NeedData):
        fail(f"the first {half} of {len(a.frame)} bytes gave {pending!r}, expected NeedData")
    got_b = decode_whole(second, b.frame, "message B on instance 2 while instance 1 waits")
    diff = same_metadata(expected_b, got_b)
    if diff:
        fail(
            f"instance 2 decoded message B differently while instance 1 held part of message "
            f"A: {diff}\nmessage A:\n{hexdump(a.frame, mark=half)}\nmessage B:\n{hexdump(b.frame)}"
        )
    buffer += a.frame[half:]
    got_a = call_decode(first, buffer)
    if not isinstance(got_a, Metadata) or got_a.frame != a.frame or buffer:
        fail(
            f"instance 1 did not finish message A after instance 2 decoded B: got {got_a!r}\n"
            f"message A:\n{hexdump(a.frame, mark=half)}\nmessage B:\n{hexdump(b.frame)}"
        )
    diff = same_metadata(expected_a, got_a)
    if diff:
        fail(f"instance 1 decoded message A differently after instance 2 ran: {diff}")
    after = _class_state(codec_type)
    changed = sorted(k for k in after if before.get(k) != after[k])
    if changed:
        fail(f"decoding changed class-level state shared by every instance: {', '.join(changed)}")


@check("state_independent_instances", "state")
def state_independent_instances(ctx: CheckContext) -> None:
    """Two instances interleaved (one mid-message) decode exactly as each would alone."""
    target = ctx.target
    if not target.samples and target.messages is None:
        no_messages()
    samples = [s for s in target.samples if len(s.frame) > 1]
    for a in samples:
        for b in samples[:4]:
            _pair_prop(ctx, a, b)
    if target.messages is not None:

        def prop(pair: tuple[Sample, Sample]) -> None:
            assume(len(pair[0].frame) > 1)
            _pair_prop(ctx, *pair)

        run_property(
            ctx, st.tuples(target.messages, target.messages), prop, target.settings.examples
        )


_GARBAGE = (b"\xff" * 64, b"\x00" * 64, bytes(range(256)), b"\x80" + b"\x7f" * 63)


def _rejected(ctx: CheckContext, sample: Sample) -> tuple[bytes, CodecError] | None:
    candidates = list(_GARBAGE)
    frame = sample.frame
    candidates += [bytes((b ^ 0xFF,)) + frame[1:] for b in frame[:1]]
    candidates += [
        frame[:i] + b"\xff\xff" + frame[i + 2 :] for i in range(0, min(len(frame), 32), 2)
    ]
    for data in candidates:
        codec = ctx.target.new_codec(sample.options)
        try:
            result = codec.decode(bytearray(data))
        except CodecError as exc:
            return data, exc
        except Exception:
            continue
        del result
    return None


@check("state_reset_after_error", "state")
def state_reset_after_error(ctx: CheckContext) -> None:
    """After a CodecError and reset(), the same instance decodes a valid message."""
    found = 0

    def prop(sample: Sample) -> None:
        nonlocal found
        rejected = _rejected(ctx, sample)
        if rejected is None:
            return
        garbage, _ = rejected
        found += 1
        codec = ctx.target.new_codec(sample.options)
        with contextlib.suppress(CodecError):
            codec.decode(bytearray(garbage))
        try:
            codec.reset()
        except Exception as exc:
            fail(f"reset() raised {type(exc).__name__}: {exc}")
        again = decode_whole(codec, sample.frame, "a valid message after an error and reset()")
        diff = same_metadata(reference(ctx, sample), again)
        if diff:
            fail(
                f"after an error on\n{hexdump(garbage)}\nand reset(), a valid message decodes "
                f"differently: {diff}"
            )

    for_each_sample(ctx, prop)
    if found == 0:
        raise CheckSkipped("found no input this codec rejects with a CodecError")


def _outcomes(codec: Codec, buffer: bytearray) -> list[Any]:
    """What decode gives, call after call, until it wants more data or raises."""
    out: list[Any] = []
    for _ in range(8):
        try:
            result = codec.decode(buffer)
        except CodecError as exc:
            out.append((type(exc).__name__, exc.frame_size))
            break
        if isinstance(result, NeedData):
            out.append(("NeedData", result.needed))
            break
        out.append((result.to_dict(), bytes(result.frame)))
        if not buffer:
            break
    return out


@check("state_resync_after_error", "state")
def state_resync_after_error(ctx: CheckContext) -> None:
    """After a decode error with frame_size, the same instance (no reset) reads on as a fresh
    one would.

    An engine drops ``frame_size`` bytes and goes on decoding on the same codec, without
    ``reset()``. Each message corrupted in its first 64 bytes arrives in two reads (its first
    half, then the rest with the intact message after it); where decode refuses it with a
    ``frame_size``, what follows must decode as on a fresh codec.
    """
    found = 0

    def prop(sample: Sample) -> None:
        nonlocal found
        for _, data in corruptions(sample.frame):
            codec = ctx.target.new_codec(sample.options)
            half = max(1, len(data) // 2)
            buffer = bytearray(data[:half])
            try:
                if not isinstance(codec.decode(buffer), NeedData):
                    continue
                buffer += data[half:] + sample.frame
                codec.decode(buffer)
            except CodecError as exc:
                size = exc.frame_size
            else:
                continue
            if size is None or not 0 < size <= len(buffer):
                continue
            found += 1
            del buffer[:size]
            rest = bytes(buffer)
            reused = _outcomes(codec, buffer)
            fresh = _outcomes(ctx.target.new_codec(sample.options), bytearray(rest))
            if reused != fresh:
                fail(
                    f"after an error with frame_size={size} on a frame that came in two reads, "
                    f"the same codec decodes what follows differently from a fresh one (an "
                    f"engine goes on without reset()):\nsame codec: {reused!r}\nfresh codec: "
                    f"{fresh!r}\nthe bad frame:\n{hexdump(data, mark=half)}\nwhat follows:\n"
                    f"{hexdump(rest)}"
                )

    for_each_sample(ctx, prop)
    if found == 0:
        raise CheckSkipped("no corrupted message arriving in two reads raised with a frame_size")


def _same_id_frames(ctx: CheckContext, first: Sample, second: Sample) -> list[bytes]:
    """``first``, then messages other than it that carry its request id: ``second`` rewritten
    with it (capability ``rewrite_request_id``; as is when it already has that id) and
    ``first`` with the kit's mutation (capability ``mutation``, ``response_mutation`` for
    replies). ``first`` itself is rewritten with id 1 when its id is outside the range an
    engine rewrites ids in (``1..max_request_id``)."""
    message = reference(ctx, first)
    caps = ctx.target.codec.capabilities
    top = ctx.target.codec.max_request_id
    encoder = ctx.target.new_codec(first.options)
    base = first.frame
    if caps.rewrite_request_id and not 1 <= message.request_id <= top:
        with contextlib.suppress(CodecError):
            base = join_encoded(encoder.encode(message, request_id=1))
            if _reference_id(ctx, first, base) != 1:
                base = first.frame  # rewrite_request_id reports it
            else:
                message = decode_whole(ctx.target.new_codec(first.options), base)
    out: list[bytes] = []
    other = reference(ctx, second) if second.frame != first.frame else None
    if other is not None and other.request_id == message.request_id:
        out.append(second.frame)
    elif other is not None and caps.rewrite_request_id and 1 <= message.request_id <= top:
        with contextlib.suppress(CodecError):
            out.append(join_encoded(encoder.encode(other, request_id=message.request_id)))
    mutable = caps.mutation if message.message_type.is_request_side else caps.response_mutation
    if mutable and message.message_type is not MessageType.Heartbeat:
        with contextlib.suppress(CodecError):
            out.append(join_encoded(encoder.encode(message, ctx.target.mutation)))
        out.extend(_same_size_variant(ctx, first, message, base))
    wanted = message.request_id
    same = [f for f in out if f != base and _reference_id(ctx, first, f) == wanted]
    return [base, *same] if same else []


def _same_size_variant(
    ctx: CheckContext, sample: Sample, message: Metadata, base: bytes
) -> list[bytes]:
    """``base`` with the value of its first attribute that the codec replaces set to other
    text of the same byte length, where that gives a frame of ``base``'s size: a message of
    the same shape, id, size and key set, which a cache keyed by any of those hands the
    first one's attributes."""
    encoder = ctx.target.new_codec(sample.options)
    for key, value in message.attributes.items():
        size = len(value.encode())
        if not size:
            continue
        other = ("y" if value.startswith("z") else "z") * size
        try:
            frame = join_encoded(encoder.encode(message, {key: other}))
        except CodecError:
            continue
        if len(frame) == len(base) and frame != base:
            return [frame]
    return []


def _reference_id(ctx: CheckContext, sample: Sample, frame: bytes) -> int | None:
    """The request id a fresh codec decodes from ``frame``, or None if it is not one message."""
    buffer = bytearray(frame)
    try:
        result = ctx.target.new_codec(sample.options).decode(buffer)
    except Exception:
        return None
    return result.request_id if isinstance(result, Metadata) and not buffer else None


def _same_id_prop(ctx: CheckContext, first: Sample, *, same: list[bytes]) -> None:
    frames = [*same, same[0]]
    codec = ctx.target.new_codec(first.options)
    buffer = bytearray(b"".join(frames))
    for index, frame in enumerate(frames):
        what = f"message {index + 1} of {len(frames)} (one request id) in one read"
        try:
            got = call_decode(codec, buffer)
        except CodecError as exc:
            fail(f"{what} raised {type(exc).__name__}: {exc}\n{hexdump(frame)}")
        if not isinstance(got, Metadata) or got.frame != frame:
            fail(f"{what}: decode returned {got!r}, not the message\n{hexdump(frame)}")
        fresh = decode_whole(ctx.target.new_codec(first.options), frame, what)
        diff = same_metadata(fresh, got)
        if diff:
            fail(
                f"{what}: after {index} earlier messages with the same request id "
                f"{fresh.request_id}, the same codec decodes it otherwise than a fresh one: "
                f"{diff} (request ids are the client's to choose; a codec must not hand a "
                f"message what it decoded from another under the same id or key)\n"
                f"{hexdump(frame)}"
            )


@check("state_same_id", "state")
def state_same_id(ctx: CheckContext) -> None:
    """Different messages with the same request id decode on one codec as on fresh ones.

    Request ids (and every other key on the wire) are the client's to choose, and clients
    reuse them; a codec that caches what it decoded by id hands a later message the earlier
    one's metadata. Each message is followed, in one read on one codec, by the next message
    rewritten with its id (``encode(request_id=)``), by itself with the kit's mutation (same
    id and operation, other attributes), by itself with one attribute's value changed to
    another of the same length (same id, size and keys: a cache keyed by the frame's shape),
    and by itself again; each must decode as a fresh codec decodes it.
    """
    samples = collect(ctx, ctx.target.settings.examples)
    runs = 0
    for first, second in zip(samples, samples[1:] + samples[:1], strict=True):
        if first.name or second.name or first.options != second.options:
            # Golden vectors may come from different connections: only mutations of their own.
            second = first
        same = _same_id_frames(ctx, first, second)
        if same:
            labelled(first, functools.partial(_same_id_prop, ctx, same=same))
            runs += 1
    if not runs:
        if not samples:
            no_messages()
        raise CheckSkipped(
            "no two different messages with the same request id: the codec declares neither "
            "rewrite_request_id nor mutation, and no two messages share an id"
        )
    ctx.details["runs"] = runs
