"""Framing: every message decodes whole, at every split point, and several per read."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

from hypothesis import strategies as st

from metaprotocol_sdk.codec import Codec, Encoded, LocalError, NeedData, join_encoded
from metaprotocol_sdk.enums import ErrorType
from metaprotocol_sdk.errors import CodecError
from metaprotocol_sdk.metadata import Metadata
from metaprotocol_sdk.testing.golden import Sample, mismatches
from metaprotocol_sdk.testing.hexdump import compare, hexdump

from ._support import (
    call_decode,
    check_expectations,
    collect,
    corruptions,
    decode_whole,
    fail,
    for_each_sample,
    labelled,
    no_messages,
    raised_at,
    reference,
    run_property,
    same_metadata,
    split_points,
    type_problems,
)
from .base import CheckContext, CheckSkipped, check


@check("golden_vectors", "golden")
def golden_vectors(ctx: CheckContext) -> None:
    """Every golden vector decodes whole to its expected metadata (or expected error)."""
    vectors = ctx.target.golden
    if not vectors:
        raise CheckSkipped("the codec ships no golden vectors (conformance/golden.yaml)")
    problems: list[str] = []
    files: set[str] = set()  # where the failing vectors are, to name them once
    for vector in vectors:
        problem = _golden_problem(ctx, vector)
        if problem is not None:
            problems.append(problem)
            files.add(vector.file)
    ctx.details["vectors"] = len(vectors)
    if problems:
        named = sorted(files - {""})
        origin = f" (in {', '.join(named)})" if named else ""
        fail(
            f"{len(problems)} of {len(vectors)} golden vectors{origin} fail:\n"
            + "\n".join(problems)
        )


def _golden_problem(ctx: CheckContext, vector: Sample) -> str | None:
    """What is wrong with one golden vector, or ``None``."""
    codec = ctx.target.new_codec(vector.options)
    where = f"golden vector {vector.name!r}"
    if vector.is_bad_input:
        wanted = str(vector.expect["error"])
        try:
            result = call_decode(codec, bytearray(vector.frame))
        except CodecError as exc:
            names = [cls.__name__ for cls in type(exc).__mro__]
            if wanted not in names:
                return f"{where}: raised {type(exc).__name__}, expected {wanted}"
            return None
        return f"{where}: expected {wanted}, decode returned {result!r}"
    try:
        metadata = decode_whole(codec, vector.frame, where)
    except AssertionError as exc:
        return str(exc)
    wrong = mismatches(metadata, vector.expect)
    if wrong:
        return f"{where}: " + "; ".join(wrong) + f"\nmessage:\n{hexdump(vector.frame)}"
    return None


@check("framing_whole", "framing")
def framing_whole(ctx: CheckContext) -> None:
    """A complete message decodes to exactly its bytes; generated ``expect`` keys match."""

    def prop(sample: Sample) -> None:
        metadata = decode_whole(ctx.target.new_codec(sample.options), sample.frame)
        if sample.name == "":
            check_expectations(metadata, sample)
        codec = ctx.target.new_codec(sample.options)
        empty = bytearray()
        result = call_decode(codec, empty)
        if not isinstance(result, NeedData):
            fail(f"decode of an empty buffer returned {result!r}, expected NeedData")

    for_each_sample(ctx, prop)


def _split_prop(ctx: CheckContext, sample: Sample) -> None:
    frame = sample.frame
    whole = reference(ctx, sample)
    for k in split_points(len(frame), ctx.target.settings.max_split_points):
        codec = ctx.target.new_codec(sample.options)
        buffer = bytearray(frame[:k])
        try:
            first = call_decode(codec, buffer)
        except CodecError as exc:
            fail(
                f"split at byte {k}: decode raised {type(exc).__name__}: {exc} on the first "
                f"{k} of {len(frame)} bytes of a valid message:\n{hexdump(frame, mark=k)}"
            )
        if isinstance(first, Metadata):
            fail(
                f"split at byte {k}: decode returned a message from the first {k} of "
                f"{len(frame)} bytes:\n{hexdump(frame, mark=k)}"
            )
        buffer += frame[k:]
        second = call_decode(codec, buffer)
        if not isinstance(second, Metadata) or buffer:
            fail(
                f"split at byte {k}: after the rest arrived decode returned {second!r} with "
                f"{len(buffer)} bytes left, expected the whole {len(frame)}-byte message:\n"
                f"{hexdump(frame, mark=k)}"
            )
        diff = same_metadata(whole, second)
        if diff:
            fail(f"split at byte {k}: metadata differs from a whole decode: {diff}")
    # Byte by byte through one codec instance: parse state carried across calls.
    codec = ctx.target.new_codec(sample.options)
    buffer = bytearray()
    for i, byte in enumerate(frame):
        buffer.append(byte)
        result = call_decode(codec, buffer)
        if i < len(frame) - 1 and not isinstance(result, NeedData):
            fail(f"fed byte by byte, decode returned {result!r} after {i + 1} bytes")
        if i == len(frame) - 1:
            if not isinstance(result, Metadata) or buffer:
                fail(f"fed byte by byte, decode returned {result!r} after the last byte")
            diff = same_metadata(whole, result)
            if diff:
                fail(f"fed byte by byte, metadata differs from a whole decode: {diff}")


@check("framing_split_points", "framing")
def framing_split_points(ctx: CheckContext) -> None:
    """Split at every offset (and fed byte by byte), a message decodes the same as whole."""
    for_each_sample(ctx, lambda s: _split_prop(ctx, s))


def _concat_prop(ctx: CheckContext, samples: list[Sample]) -> None:
    options = samples[0].options
    codec = ctx.target.new_codec(options)
    data = b"".join(s.frame for s in samples)
    buffer = bytearray(data)
    offset = 0
    for index, sample in enumerate(samples):
        try:
            result = call_decode(codec, buffer)
        except CodecError as exc:
            fail(
                f"message {index + 1} of {len(samples)} in one read raised "
                f"{type(exc).__name__}: {exc}\nstream:\n{hexdump(data, mark=offset)}"
            )
        if not isinstance(result, Metadata):
            fail(
                f"message {index + 1} of {len(samples)} in one read: decode returned {result!r}"
                f"\nstream:\n{hexdump(data, mark=offset)}"
            )
        if result.frame != sample.frame:
            fail(
                f"message {index + 1} of {len(samples)} in one read (offset {offset}): "
                + compare(sample.frame, result.frame, what="frames")
            )
        offset += len(sample.frame)
    if buffer:
        fail(f"{len(buffer)} bytes left after decoding every message:\n{hexdump(buffer)}")


@check("framing_concatenated", "framing")
def framing_concatenated(ctx: CheckContext) -> None:
    """Several messages in one read decode one per call, in order, each exactly."""
    target = ctx.target
    if not target.samples and target.messages is None:
        no_messages()
    # Golden vectors may come from different connections (a codec detecting the transport
    # locks onto the first message's), so each is only concatenated with itself.
    for sample in target.samples:
        labelled(sample, lambda s: _concat_prop(ctx, [s, s, s]))
    if target.messages is not None:

        def prop(samples: list[Sample]) -> None:
            # One connection carries one configuration: keep the messages sharing the first
            # one's options (a sample's options say which configuration it needs).
            same = [s for s in samples if s.options == samples[0].options]
            _concat_prop(ctx, same if len(same) > 1 else [same[0], same[0]])

        run_property(
            ctx, st.lists(target.messages, min_size=2, max_size=4), prop, target.settings.examples
        )


def _trailing_prop(ctx: CheckContext, first: Sample, second: Sample, cut: float) -> None:
    if first.options != second.options:
        second = first  # one connection carries one configuration
    k = min(len(second.frame) - 1, max(1, int(len(second.frame) * cut)))
    partial = second.frame[:k]
    codec = ctx.target.new_codec(first.options)
    buffer = bytearray(first.frame + partial)
    result = call_decode(codec, buffer)
    if not isinstance(result, Metadata) or result.frame != first.frame:
        fail(
            f"with {k} bytes of a second message behind it, the first message did not decode "
            f"exactly (got {result!r})\nstream:\n"
            + hexdump(first.frame + partial, mark=len(first.frame))
        )
    if bytes(buffer) != partial:
        fail(
            "the trailing partial message was not left in the buffer:\n" + compare(partial, buffer)
        )
    try:
        again = call_decode(codec, buffer)
    except CodecError as exc:
        fail(f"the trailing {k}-byte partial message raised {type(exc).__name__}: {exc}")
    if not isinstance(again, NeedData):
        fail(f"the trailing {k}-byte partial message gave {again!r}, expected NeedData")
    buffer += second.frame[k:]
    last = call_decode(codec, buffer)
    if not isinstance(last, Metadata) or last.frame != second.frame or buffer:
        fail(f"after the rest of the second message arrived decode returned {last!r}")


@check("framing_trailing_partial", "framing")
def framing_trailing_partial(ctx: CheckContext) -> None:
    """A message followed by part of the next: the part stays in the buffer for later."""
    target = ctx.target
    if not target.samples and target.messages is None:
        no_messages()
    for sample in target.samples:
        if len(sample.frame) > 1:
            for cut in (0.0, 0.5, 1.0):
                labelled(sample, lambda s, c=cut: _trailing_prop(ctx, s, s, c))  # type: ignore[misc]
    if target.messages is not None:
        run_property(
            ctx,
            st.tuples(target.messages, target.messages, st.floats(0, 1)),
            lambda t: _trailing_prop(ctx, *t) if len(t[1].frame) > 1 else None,
            target.settings.examples,
        )


#: Prefixes ``framing_needed_exact`` starts from, per message (sampled like split points).
_NEEDED_PREFIXES = 64


def _needed_prop(ctx: CheckContext, sample: Sample) -> None:
    frame = sample.frame
    for k in split_points(len(frame), _NEEDED_PREFIXES):
        codec = ctx.target.new_codec(sample.options)
        buffer = bytearray(frame[:k])
        steps = [k]
        while True:
            try:
                result = call_decode(codec, buffer)
            except CodecError as exc:
                fail(
                    f"after {len(buffer)} of {len(frame)} bytes (fed as {steps}) decode raised "
                    f"{type(exc).__name__}: {exc}\n{hexdump(frame, mark=len(buffer))}"
                )
            if isinstance(result, Metadata):
                if result.frame != frame or buffer:
                    fail(
                        f"fed as {steps} bytes, decode returned a {result.size}-byte message "
                        f"with {len(buffer)} bytes left; expected the {len(frame)}-byte message"
                    )
                break
            # An engine waits for `needed` bytes before it calls decode again; 0 promises
            # nothing, so the rest arrives (byte-by-byte feeding is framing_split_points').
            want = result.needed or len(frame)
            if len(buffer) >= len(frame):
                fail(f"decode returned {result!r} with the whole {len(frame)}-byte message")
            if want > len(frame):
                fail(
                    f"after {len(buffer)} of {len(frame)} bytes decode returned {result!r}: it "
                    f"asks for more bytes than the message holds, so an engine that waits for "
                    f"them never decodes a message whose sender then waits for the reply\n"
                    f"{hexdump(frame, mark=len(buffer))}"
                )
            buffer += frame[len(buffer) : want]
            steps.append(want)


@check("framing_needed_exact", "framing")
def framing_needed_exact(ctx: CheckContext) -> None:
    """NeedData.needed is exact: from any prefix, fed exactly `needed` bytes, the frame decodes.

    An engine does not call decode again until the buffer holds ``needed`` bytes; a codec that
    asks for even one byte more than the frame holds leaves that request undecoded forever.
    """
    for_each_sample(ctx, lambda s: _needed_prop(ctx, s))


def _decode_frame(codec: Codec, frame: bytes, what: str) -> Metadata | CodecError:
    """``codec.decode_frame(frame)``: its message or its CodecError; anything else fails."""
    try:
        result = codec.decode_frame(frame)
    except CodecError as exc:
        return exc
    except Exception as exc:
        fail(
            f"decode_frame raised {type(exc).__name__}: {exc}{raised_at(exc, codec)} (only "
            f"CodecError subclasses may escape it) on {what}:\n{hexdump(frame)}"
        )
    if not isinstance(result, Metadata):
        fail(f"decode_frame returned {type(result).__name__}, not Metadata, on {what}")
    wrong = type_problems(result)
    if wrong:
        fail(
            f"decode_frame returned metadata whose fields do not have the contract's types on "
            f"{what}: " + "; ".join(wrong) + f"\n{hexdump(frame)}"
        )
    return result


def _whole_frame_prop(
    ctx: CheckContext, data: bytes, options: dict[str, object], what: str
) -> Metadata | CodecError | None:
    """decode_frame agrees with decode on ``data`` when decode takes it as one whole frame
    (else an engine never hands it over whole): what both gave, ``None`` if not compared."""
    buffer = bytearray(data)
    try:
        expected: Metadata | NeedData | CodecError = call_decode(
            ctx.target.new_codec(options), buffer
        )
    except CodecError as exc:
        if exc.frame_size != len(data):
            return None
        expected = exc
    if isinstance(expected, NeedData) or (isinstance(expected, Metadata) and buffer):
        return None
    got = _decode_frame(ctx.target.new_codec(options), data, what)
    if isinstance(expected, CodecError):
        if not isinstance(got, CodecError):
            fail(
                f"{what}: decode raised {type(expected).__name__}: {expected}, but "
                f"decode_frame returned a message\n{hexdump(data, mark=expected.offset)}"
            )
        if type(got) is not type(expected) or got.frame_size != expected.frame_size:
            fail(
                f"{what}: decode raised {type(expected).__name__} (frame_size="
                f"{expected.frame_size}), decode_frame {type(got).__name__} (frame_size="
                f"{got.frame_size}): {got}\n{hexdump(data, mark=expected.offset)}"
            )
        ids = [None if e.metadata is None else e.metadata.request_id for e in (expected, got)]
        if ids[0] != ids[1]:
            said = ["no metadata" if i is None else f"request id {i}" for i in ids]
            fail(
                f"{what}: decode's {type(expected).__name__} carries {said[0]}, "
                f"decode_frame's {said[1]}: an engine answers a refused frame to the id in "
                f"the error's metadata, so a large frame would go unanswered or answered to "
                f"another id\n{hexdump(data, mark=expected.offset)}"
            )
        return got
    if isinstance(got, CodecError):
        fail(
            f"{what}: decode_frame raised {type(got).__name__}: {got} on a frame decode "
            f"accepts\n{hexdump(data, mark=got.offset)}"
        )
    if got.frame != data:
        fail(f"{what}: decode_frame's metadata.frame is not the frame it was given")
    diff = same_metadata(expected, got)
    if diff:
        fail(f"{what}: decode_frame's metadata differs from decode's: {diff}")
    if not _same_values(expected.values, got.values):
        fail(
            f"{what}: decode_frame's metadata.values differ from decode's: "
            f"{_shown(expected.values)} != {_shown(got.values)} (filters read them)"
        )
    overrides = type(ctx.target.new_codec(options)).decode_frame is not Codec.decode_frame
    if overrides and isinstance(got.frame, bytes):  # another type is framing_frame_owned's
        _encodes_alike(ctx, options, expected, got, what)
    return got


def _same_values(a: object, b: object) -> bool:
    try:
        return bool(a == b)
    except Exception:  # values a filter may want need not compare (arrays, ...)
        return True


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _encodes_alike(
    ctx: CheckContext,
    options: dict[str, object],
    by_decode: Metadata,
    by_frame: Metadata,
    what: str,
) -> None:
    """Each call an engine makes with a message (``encode`` unchanged, with the kit's mutation,
    with a new request id, with both; ``on_error``; ``heartbeat_reply``) gives the same bytes,
    or the same error, for decode_frame's message as for decode's: an engine encodes and
    answers a large request or reply that decode_frame decoded, so what those read
    (``codec_state``, ``values``) must be there too."""
    codec = ctx.target.new_codec(options)
    capabilities = codec.active_capabilities
    mutates = capabilities.mutation or capabilities.response_mutation
    mutation = dict(ctx.target.mutation) if mutates else None
    new_id = None
    if capabilities.rewrite_request_id:
        new_id = by_decode.request_id - 1 if by_decode.request_id > 1 else by_decode.request_id + 1
    calls: dict[str, tuple[dict[str, str] | None, int | None]] = {"encode(message)": (None, None)}
    if mutation:
        calls["encode(message, mutation)"] = (mutation, None)
    if new_id is not None:
        calls[f"encode(message, request_id={new_id})"] = (None, new_id)
        if mutation:
            calls[f"encode(message, mutation, request_id={new_id})"] = (mutation, new_id)
    answers: dict[str, Callable[[Metadata], Encoded | None]] = {}
    if capabilities.error_reply:
        error = LocalError(ErrorType.Timeout, "conformance kit")
        answers["on_error(message, Timeout)"] = lambda m: codec.on_error(m, error)
    if capabilities.heartbeat:
        answers["heartbeat_reply(message)"] = codec.heartbeat_reply
    for call, (change, request_id) in calls.items():
        answers[call] = functools.partial(_encode_call, codec, change, request_id)
    for call, answer in answers.items():
        outcomes = [_outcome(answer, m) for m in (by_decode, by_frame)]
        if outcomes[0] != outcomes[1]:
            shown = [o if isinstance(o, str) else f"{len(o)} bytes" for o in outcomes]
            detail = (
                compare(outcomes[0], outcomes[1])
                if isinstance(outcomes[0], bytes) and isinstance(outcomes[1], bytes)
                else f"decode's message: {shown[0]}; decode_frame's: {shown[1]}"
            )
            fail(
                f"{what}: {call} gives for decode_frame's message what it does not for "
                f"decode's ({detail}): an engine encodes a large message that decode_frame "
                "decoded, with the route's mutation and a new request id, and answers it with "
                "on_error, so its codec_state must hold what they need, as decode's does"
            )


def _encode_call(
    codec: Codec, mutation: dict[str, str] | None, request_id: int | None, message: Metadata
) -> Encoded:
    return codec.encode(message, mutation, request_id=request_id)


def _outcome(call: Callable[[Metadata], Encoded | None], message: Metadata) -> bytes | str:
    """What ``call`` gives for ``message``: its bytes, ``"None"``, or the name of what it
    raised (its text may name the message's own objects)."""
    try:
        result = call(message)
        return "None" if result is None else join_encoded(result)
    except Exception as exc:
        return f"raised {type(exc).__name__}"


def _engine_order_prop(ctx: CheckContext, first: Sample, *, second: Sample) -> None:
    """One codec instance, called as an engine calls it: ``decode`` on the start of a large
    frame (NeedData), ``decode_frame`` on the whole frame, then ``decode`` on the next frame,
    which must give what a fresh codec gives."""
    options = dict(first.options)
    frame, after = first.frame, second.frame
    codec = ctx.target.new_codec(options)
    start = bytearray(frame[: len(frame) // 2])
    if not start or not isinstance(call_decode(codec, start), NeedData):
        return
    # What decode_frame gives is framing_decode_frame's to judge; here, what it leaves.
    _decode_frame(codec, frame, "a whole frame after decode saw its first half")
    what = "the next message after decode_frame (a fresh codec decodes it: was state left?)"
    result = decode_whole(codec, after, what)
    diff = same_metadata(reference(ctx, second), result)
    if diff:
        fail(f"after decode_frame, the next message decodes otherwise than fresh: {diff}")


@check("framing_decode_frame", "framing")
def framing_decode_frame(ctx: CheckContext) -> None:
    """decode_frame() agrees with decode() on every whole frame: same metadata, same errors.

    Engines hand a large frame they assembled from many reads to ``decode_frame``; a codec
    that overrides it to spare a copy must not decode differently there. Inputs: every message,
    and each corrupted in its first 64 bytes, where decode still takes it as one frame.
    """
    compared = errors = 0

    def prop(sample: Sample) -> None:
        nonlocal compared, errors
        options = dict(sample.options)
        if _whole_frame_prop(ctx, sample.frame, options, "a whole message") is None:
            fail(f"decode does not take a whole {len(sample.frame)}-byte message as one frame")
        compared += 1
        for pos, data in corruptions(sample.frame):
            got = _whole_frame_prop(ctx, data, options, f"byte {pos} corrupted")
            compared += got is not None
            errors += isinstance(got, CodecError)

    for_each_sample(ctx, prop)
    ctx.details.update(compared=compared, errors=errors)


@check("framing_decode_frame_state", "framing")
def framing_decode_frame_state(ctx: CheckContext) -> None:
    """decode_frame() leaves the codec's state as decode() would, in the order an engine calls
    one codec: decode on a frame's first half (NeedData), decode_frame on the whole frame, then
    decode on the next message, which must give what a fresh codec gives.
    """
    samples = collect(ctx, ctx.target.settings.examples)
    pairs = 0
    for first, second in zip(samples, samples[1:] + samples[:1], strict=True):
        if first.options == second.options:
            labelled(first, functools.partial(_engine_order_prop, ctx, second=second))
            pairs += 1
    if not pairs:
        no_messages()
    ctx.details["pairs"] = pairs


def _frame_kept(kept: Metadata, original: bytes, what: str) -> None:
    """Fail unless ``kept.frame`` still holds ``original`` and is ``bytes``."""
    frame: object = kept.frame
    try:
        now = bytes(frame)  # type: ignore[call-overload]
    except Exception as exc:
        fail(f"{what}: metadata.frame ({type(frame).__name__}) cannot be read: {exc}")
    if now != original:
        fail(
            f"{what}: a kept message's frame changed under it once its codec decoded the next "
            "message and the caller reused its buffer (an engine keeps a request's frame for "
            "retries, mirrors and local replies meanwhile): "
            + compare(original, now, what="frames")
        )
    if not isinstance(frame, bytes):
        fail(
            f"{what}: metadata.frame is a {type(frame).__name__}, not bytes. The frame must be "
            "immutable bytes the message owns: an engine keeps it (retries, mirrors, local "
            "replies; an empty-mutation encode returns it as is and it is written as one "
            "buffer) while it reuses its read buffers, and a view or a bytearray can change "
            "or pin the memory under it"
        )


def _owned_prop(ctx: CheckContext, first: Sample, *, second: Sample) -> None:
    """On one codec: ``first`` decoded from a read that also holds half of ``second``; the
    read buffer overwritten and refilled with ``second``, decoded too; then, on another codec,
    ``decode_frame(first)`` followed by ``decode(second)``. Every frame stays as it was."""
    options = dict(first.options)
    codec = ctx.target.new_codec(options)
    buffer = bytearray(first.frame + second.frame[: len(second.frame) // 2])
    try:
        kept = call_decode(codec, buffer)
    except CodecError:
        return  # framing_trailing_partial reports a message followed by part of the next
    if not isinstance(kept, Metadata):
        return
    try:
        # The caller reuses its buffer: overwrites what is left, then refills it.
        buffer[:] = b"\xff" * len(buffer)
        buffer[:] = second.frame
    except BufferError as exc:
        fail(
            f"decode left a view of the caller's buffer (resizing it raised BufferError: "
            f"{exc}); a frame must be bytes the message owns"
        )
    try:
        after: Metadata | NeedData | None = call_decode(codec, buffer)
    except CodecError:
        after = None  # a codec that locks onto one variant may refuse another's frame
    _frame_kept(kept, first.frame, "decode")
    if isinstance(after, Metadata):
        _frame_kept(after, second.frame, "decode of the next message")
    whole = ctx.target.new_codec(options)
    try:
        kept = whole.decode_frame(first.frame)
    except Exception:
        return  # framing_decode_frame judges decode_frame's errors
    if not isinstance(kept, Metadata):
        return
    with contextlib.suppress(CodecError):
        call_decode(whole, bytearray(second.frame))
    _frame_kept(kept, first.frame, "decode_frame")


@check("framing_frame_owned", "framing")
def framing_frame_owned(ctx: CheckContext) -> None:
    """Metadata.frame is immutable bytes the message owns, from decode and decode_frame alike.

    An engine keeps a request's frame (for retries, mirrors, local replies) while its codec
    decodes the next message and while it reuses its read buffer. Each message is decoded
    from a read that also holds part of the next; the read is overwritten and refilled with
    the next message, which the same codec decodes; the kept frame must be unchanged and of
    type ``bytes`` (a ``memoryview`` or ``bytearray`` can change under it, or pin the read).
    ``decode_frame``'s frame is held to the same rule.
    """
    samples = collect(ctx, ctx.target.settings.examples)
    pairs = 0
    for first, second in zip(samples, samples[1:] + samples[:1], strict=True):
        if first.options != second.options:
            second = first  # one connection carries one configuration
        labelled(first, functools.partial(_owned_prop, ctx, second=second))
        pairs += 1
    if not pairs:
        no_messages()
    ctx.details["pairs"] = pairs
