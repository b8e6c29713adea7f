"""Bad input: truncation, frame limits, oversized and negative lengths, garbage."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Literal

from hypothesis import strategies as st

from metaprotocol_sdk.codec import Codec, NeedData
from metaprotocol_sdk.errors import CodecError, ConfigError, FrameTooLargeError
from metaprotocol_sdk.metadata import Metadata
from metaprotocol_sdk.testing.golden import Sample
from metaprotocol_sdk.testing.hexdump import hexdump

from ._support import (
    HEAD,
    call_decode,
    collect,
    corruptions,
    decode_whole,
    encode_bytes,
    fail,
    for_each_sample,
    labelled,
    no_messages,
    reference,
    run_property,
    split_points,
    type_problems,
)
from .base import CheckContext, CheckSkipped, check

#: A random-bytes case: data, max_frame_size, codec options.
Case = tuple[bytes, int, dict[str, object]]
Order = Literal["big", "little"]


@check("bad_input_truncated", "bad_input")
def bad_input_truncated(ctx: CheckContext) -> None:
    """Every strict prefix of a valid message gives NeedData, never a (short) message."""
    limit = ctx.target.settings.time_limit

    def prop(sample: Sample) -> None:
        frame = sample.frame
        for k in split_points(len(frame), ctx.target.settings.max_split_points):
            buffer = bytearray(frame[:k])
            try:
                result = call_decode(ctx.target.new_codec(sample.options), buffer, limit=limit)
            except CodecError as exc:
                fail(
                    f"the first {k} of {len(frame)} bytes raised {type(exc).__name__}: {exc}; "
                    "a prefix of a valid message must give NeedData (the rest may still "
                    f"arrive)\n{hexdump(frame, mark=k)}"
                )
            if isinstance(result, Metadata):
                fail(
                    f"decode returned a {result.size}-byte message from the first {k} of "
                    f"{len(frame)} bytes (a short value from a truncated frame)\n"
                    f"{hexdump(frame, mark=k)}"
                )

    for_each_sample(ctx, prop)


def _limited(ctx: CheckContext, sample: Sample, limit: int) -> Codec | None:
    try:
        return ctx.target.new_codec(sample.options, max_frame_size=limit)
    except ConfigError:
        return None


@check("bad_input_frame_limit", "bad_input")
def bad_input_frame_limit(ctx: CheckContext) -> None:
    """With max_frame_size at size+1 and size a message decodes; at size-1 it is refused."""

    def prop(sample: Sample) -> None:
        size = len(sample.frame)
        for limit in (size + 1, size):
            codec = _limited(ctx, sample, limit)
            if codec is not None:
                decode_whole(
                    codec, sample.frame, f"a {size}-byte message with max_frame_size={limit}"
                )
        codec = _limited(ctx, sample, size - 1) if size > 1 else None
        if codec is None:
            return
        buffer = bytearray(sample.frame)
        try:
            result = call_decode(codec, buffer, limit=ctx.target.settings.time_limit)
        except FrameTooLargeError:
            return
        except CodecError as exc:
            fail(
                f"a {size}-byte message with max_frame_size={size - 1} raised "
                f"{type(exc).__name__}: {exc}; expected FrameTooLargeError"
            )
        fail(
            f"a {size}-byte message with max_frame_size={size - 1} gave {result!r}; "
            "expected FrameTooLargeError"
        )

    for_each_sample(ctx, prop)


def length_fields(frame: bytes, metadata: Metadata) -> list[tuple[int, int, Order]]:
    """Likely length fields: (offset, width, byte order) of integers in the head of ``frame``
    equal to the body size, the frame size or the bytes that follow the field."""
    size = len(frame)
    found = []
    orders: tuple[Order, Order] = ("big", "little")
    for width in (4, 2, 8):
        for order in orders:
            for offset in range(min(size, HEAD) - width + 1):
                value = int.from_bytes(frame[offset : offset + width], order)
                targets = {size, size - offset - width, metadata.body_size}
                if value >= 2 and value in targets:
                    found.append((offset, width, order))
    return found


def _patches(frame: bytes, field: tuple[int, int, Order]) -> list[tuple[str, bytes]]:
    offset, width, order = field
    bits = 8 * width
    value = int.from_bytes(frame[offset : offset + width], order)
    wanted = {
        "all ones (huge, or -1 signed)": (1 << bits) - 1,
        "most negative signed": 1 << (bits - 1),
        "largest positive signed": (1 << (bits - 1)) - 1,
        "one byte over the limit": value + 1,
    }
    patches = []
    for name, new in wanted.items():
        if new < (1 << bits) and new != value:
            raw = new.to_bytes(width, order)
            patches.append((name, frame[:offset] + raw + frame[offset + width :]))
    return patches


@check("bad_input_oversized_length", "bad_input")
def bad_input_oversized_length(ctx: CheckContext) -> None:
    """Length fields set huge, negative or one over max_frame_size raise a CodecError at once."""
    fields_seen = 0

    def prop(sample: Sample) -> None:
        nonlocal fields_seen
        frame = sample.frame
        original = reference(ctx, sample)
        codec_limit = len(frame)
        for field in length_fields(frame, original):
            for name, data in _patches(frame, field):
                codec = _limited(ctx, sample, codec_limit)
                if codec is None:
                    return
                fields_seen += 1
                buffer = bytearray(data)
                try:
                    call_decode(codec, buffer, limit=ctx.target.settings.time_limit)
                except CodecError:
                    continue
                except AssertionError as exc:
                    offset, width, order = field
                    raise type(exc)(
                        f"length field candidate at offset {offset} ({width} bytes, {order} "
                        f"endian) set to {name}, max_frame_size={codec_limit}: {exc}"
                    ) from None

    for_each_sample(ctx, prop)
    if fields_seen == 0:
        raise CheckSkipped(
            "no length field found: no integer in the first bytes of any message equals its "
            "body size or remaining length (bad_input_frame_limit still covers the limit)"
        )


def _drive(ctx: CheckContext, data: bytes, limit: int, options: object = None) -> None:
    """Decode ``data`` until NeedData or a CodecError; anything else fails the check."""
    sample_options = options if isinstance(options, dict) else {}
    try:
        codec = ctx.target.new_codec(sample_options, max_frame_size=limit)
    except ConfigError:
        codec = ctx.target.new_codec(sample_options)
    buffer = bytearray(data)
    for _ in range(len(data) + 1):
        try:
            result = call_decode(codec, buffer, limit=ctx.target.settings.time_limit)
        except CodecError:
            return
        if isinstance(result, NeedData):
            return
        if result.size == 0:
            fail(f"decode returned an empty message (no progress) on:\n{hexdump(data)}")


@check("bad_input_corrupted", "bad_input")
def bad_input_corrupted(ctx: CheckContext) -> None:
    """Each of the first 64 bytes set to 00/ff/80/7f/flipped: NeedData or CodecError only."""

    def prop(sample: Sample) -> None:
        limit = 2 * len(sample.frame) + ctx.target.settings.small_limit
        for pos, data in corruptions(sample.frame):
            try:
                _drive(ctx, data, limit, dict(sample.options))
            except AssertionError as exc:
                raise type(exc)(f"byte {pos} corrupted: {exc}") from None

    for_each_sample(ctx, prop)


def _random_cases(ctx: CheckContext) -> st.SearchStrategy[Case]:
    """Random bytes (small limit) and randomly edited valid messages."""
    small = ctx.target.settings.small_limit
    random: st.SearchStrategy[Case] = st.binary(max_size=3 * small).map(lambda b: (b, small, {}))
    strategies = [random]
    if ctx.target.messages is not None or ctx.target.samples:
        pool = ctx.target.messages
        if ctx.target.samples:
            golden = st.sampled_from(ctx.target.samples)
            pool = golden if pool is None else st.one_of(golden, pool)
        assert pool is not None

        def edit(args: tuple[Sample, list[tuple[int, int]], int]) -> Case:
            sample, edits, cut = args
            data = bytearray(sample.frame)
            for pos, value in edits:
                data[pos % len(data)] = value
            end = len(data) - cut % (len(data) + 1) if cut >= 0 else len(data)
            return bytes(data[:end]), 2 * len(data) + small, dict(sample.options)

        # Headers are where parsers branch, so most edits land in the first 16 bytes.
        positions = st.one_of(st.integers(0, 15), st.integers(0, 4096))
        values = st.one_of(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]), st.integers(0, 255))
        edits = st.lists(st.tuples(positions, values), min_size=1, max_size=4)
        strategies.append(st.tuples(pool, edits, st.integers(-8, 64)).map(edit))
    return st.one_of(*strategies)


@check("bad_input_random_bytes", "bad_input")
def bad_input_random_bytes(ctx: CheckContext) -> None:
    """Random bytes and randomly edited messages: NeedData or CodecError, bounded and fast."""

    def prop(case: Case) -> None:
        data, limit, options = case
        _drive(ctx, data, limit, options)

    run_property(ctx, _random_cases(ctx), prop, ctx.target.settings.random_examples)
    if ctx.target.messages is None and not ctx.target.samples:
        ctx.details["note"] = "random bytes only: no valid messages to edit"


#: Fixed garbage every codec should refuse or wait on.
_GARBAGE = (b"\xff" * 64, b"\x00" * 64, bytes(range(256)), b"\x80" + b"\x7f" * 63)


class _Untouched:
    """Decodes inputs and fails when a decode error leaves the buffer changed."""

    def __init__(self, ctx: CheckContext, *, extent: bool = False) -> None:
        self.ctx = ctx
        self.errors = 0
        #: Check the errors' frame_size instead (bad_input_frame_size).
        self.extent = extent
        self.sized = 0
        self._new: Callable[[], Codec] = ctx.target.new_codec

    def run(
        self,
        data: bytes,
        what: str,
        options: object = None,
        limit: int | None = None,
        split: int = 0,
    ) -> bool:
        """Decode ``data`` until an error, ``NeedData`` or its end; with ``split``, its first
        ``split`` bytes arrive first and the rest once decode asks for more (an engine's next
        read: a codec may keep what it learnt of the frame from the first). Whether decode
        raised a CodecError."""
        sample_options = options if isinstance(options, dict) else {}
        target = self.ctx.target
        self._new = lambda: target.new_codec(sample_options)
        if limit is not None:
            with contextlib.suppress(ConfigError):
                target.new_codec(sample_options, max_frame_size=limit)
                self._new = lambda: target.new_codec(sample_options, max_frame_size=limit)
        codec = self._new()
        buffer = bytearray(data[:split] if split else data)
        rest = data[split:] if split else b""
        for _ in range(len(data) + 2):
            before = bytes(buffer)
            try:
                result = call_decode(codec, buffer, limit=self.ctx.target.settings.time_limit)
            except CodecError as exc:
                self.errors += 1
                self._check(exc, before, buffer, what)
                return True
            if isinstance(result, NeedData) and rest:
                buffer += rest
                rest = b""
            elif isinstance(result, NeedData) or result.size == 0:
                return False
        return False

    def _check(self, exc: CodecError, before: bytes, buffer: bytearray, what: str) -> None:
        if self.extent:
            self._check_extent(exc, before, what)
            return
        consumed = len(before) - len(buffer)
        if bytes(buffer) != before:
            took = consumed > 0 and bytes(buffer) == before[consumed:]
            how = f"consumed {consumed} bytes" if took else "changed it"
            # The likeliest slip: take_frame (or a del) before the last check of the frame.
            fix = " (raise before take_frame: check every field of the frame first)" if took else ""
            fail(
                f"{what}: decode raised {type(exc).__name__}: {exc} and {how}; a decode error "
                f"must leave the buffer as it was{fix} (an engine then drops the error's "
                "frame_size bytes and goes on with the next message, or closes the connection)\n"
                f"buffer before:\n{hexdump(before, mark=exc.offset)}\nbuffer after:\n"
                f"{hexdump(buffer)}"
            )
        if exc.frame_size is not None and not 0 < exc.frame_size <= len(before):
            fail(
                f"{what}: decode raised {type(exc).__name__} with frame_size={exc.frame_size}, "
                f"but the buffer holds {len(before)} bytes (frame_size must count bytes that "
                f"are there to drop)\n{hexdump(before, mark=exc.offset)}"
            )

    def _check_extent(self, exc: CodecError, before: bytes, what: str) -> None:
        """A ``frame_size`` is the bad frame's extent: an engine drops that many bytes and
        decodes what follows as the next message. The bytes it counts must hold the fault,
        so decoding exactly them raises the same error with the same ``frame_size`` (or
        ``NeedData`` of unknown size, when so few bytes cannot tell the frame apart); a
        message, or ``NeedData`` announcing a longer frame, contradicts it."""
        size = exc.frame_size
        if size is None or not 0 < size <= len(before):
            return  # bad_input_consumes_nothing reports a frame_size past the buffer
        self.sized += 1
        head = before[:size]
        try:
            result = self._new().decode(bytearray(head))
        except CodecError as again:
            if type(again) is type(exc) and again.frame_size == size:
                return
            got = f"raises {type(again).__name__} (frame_size={again.frame_size}): {again}"
        except Exception as again:
            got = f"raises {type(again).__name__}: {again}"
        else:
            if isinstance(result, NeedData) and not result.needed:
                return  # it cannot tell the frame from so few bytes (a transport to detect)
            got = f"returns {result!r}"
        fail(
            f"{what}: decode raised {type(exc).__name__} with frame_size={size}: {exc}; but "
            f"the first {size} bytes alone, the frame it names, are not that bad frame: "
            f"decode {got}. An engine drops frame_size bytes and decodes the rest as the next "
            "message, so a frame_size short of (or past) the bad frame loses the stream's "
            f"sync\ninput:\n{hexdump(before, mark=size)}"
        )


def _provoke(ctx: CheckContext, untouched: _Untouched, *, in_two_reads: bool = False) -> None:
    """Drive ``untouched`` with every input the other checks provoke errors with; with
    ``in_two_reads``, also the first corruption at each offset that decode refuses, in two
    reads split after the corrupted byte."""
    for vector in ctx.target.golden:
        if vector.is_bad_input:
            untouched.run(vector.frame, f"golden vector {vector.name!r}", dict(vector.options))
    for garbage in _GARBAGE:
        untouched.run(garbage, "garbage")

    def prop(sample: Sample) -> None:
        frame = sample.frame
        options = dict(sample.options)
        untouched.run(
            frame,
            f"a {len(frame)}-byte message over max_frame_size",
            options,
            limit=max(1, len(frame) - 1),
        )
        roomy = 4 * len(frame) + ctx.target.settings.small_limit
        split: set[int] = set()
        for pos, data in corruptions(frame):
            refused = untouched.run(data + frame, f"byte {pos} corrupted", options, limit=roomy)
            # The same in two reads, split after the corrupted byte: the error comes on the
            # call that completes the frame, from a codec that kept state from the first.
            if in_two_reads and refused and pos not in split and pos + 1 < len(data):
                split.add(pos)
                what = f"byte {pos} corrupted, in two reads split at {pos + 1}"
                untouched.run(data + frame, what, options, limit=roomy, split=pos + 1)
        original = reference(ctx, sample)
        for field in length_fields(frame, original):
            for name, data in _patches(frame, field):
                what = f"length candidate at offset {field[0]} set to {name}"
                untouched.run(data + frame, what, options, limit=len(frame))

    # Half the usual generated messages and a sixth of the random inputs: each input here is
    # decoded twice over (the bad frame, then the intact one), and the other bad_input checks
    # already drive the full counts through the same codec paths.
    conf = ctx.target.settings
    for sample in collect(ctx, max(1, conf.examples // 2)):
        labelled(sample, prop)

    def random_prop(case: Case) -> None:
        data, limit, options = case
        untouched.run(data, "randomly edited input", options, limit=limit)

    run_property(ctx, _random_cases(ctx), random_prop, max(1, conf.random_examples // 6))


@check("bad_input_consumes_nothing", "bad_input")
def bad_input_consumes_nothing(ctx: CheckContext) -> None:
    """Every decode error the kit provokes leaves the buffer byte-for-byte unchanged.

    Inputs: bad-input golden vectors, fixed garbage, each message corrupted in its first 64
    bytes (in one read, and the first refused corruption at each offset in two reads split
    after the corrupted byte, where the error comes on the call that completes the frame)
    or with a length set huge (each followed by the intact
    message, as a bad request and a good one arrive in one read), over ``max_frame_size``,
    and random edits.
    """
    untouched = _Untouched(ctx)
    _provoke(ctx, untouched, in_two_reads=True)
    if untouched.errors == 0:
        raise CheckSkipped("no input the kit tried made decode raise a CodecError")
    ctx.details["errors"] = untouched.errors


@check("bad_input_frame_size", "bad_input")
def bad_input_frame_size(ctx: CheckContext) -> None:
    """A decode error's frame_size spans exactly the bad frame: its bytes alone raise the same.

    The same inputs as ``bad_input_consumes_nothing``. An engine drops ``frame_size`` bytes
    and decodes the rest as the next message; decoding just those bytes must raise the same
    error type with the same ``frame_size``, or give ``NeedData`` of unknown size (never a
    message, nor ``NeedData`` announcing a longer frame).
    """
    untouched = _Untouched(ctx, extent=True)
    _provoke(ctx, untouched)
    if untouched.sized == 0:
        raise CheckSkipped("no decode error the kit provoked carried a frame_size")
    ctx.details["sized"] = untouched.sized


#: Request ids the kit writes into a message (with ``encode(request_id=)``) to find where its
#: id lies and to know which id a refused header gave: every byte differs between the two.
_KNOWN_IDS = (0x01020304, 0x0A0B0C0D, 0x11223344)


def _known_id(ctx: CheckContext, sample: Sample, message: Metadata) -> tuple[bytes, Metadata, int]:
    """The sample rewritten with a known request id: (frame, its metadata, where the id ends,
    or 0 when the id's bytes cannot be told apart). The sample as is without the capability
    ``rewrite_request_id``."""
    codec_type = ctx.target.codec
    if not codec_type.capabilities.rewrite_request_id:
        return sample.frame, message, 0
    top = codec_type.max_request_id
    ids = [n for n in (*_KNOWN_IDS, top, top - 1) if 1 <= n <= top and n != message.request_id]
    frames = []
    encoder = ctx.target.new_codec(sample.options)
    for request_id in ids[:2]:
        call = functools.partial(encoder.encode, message, request_id=request_id)
        try:
            frames.append(encode_bytes(encoder, call, f"encode(request_id={request_id})"))
        except CodecError:
            return sample.frame, message, 0
    if len(frames) < 2:
        return sample.frame, message, 0
    first, second = frames
    buffer = bytearray(first)
    try:
        relabelled = call_decode(ctx.target.new_codec(sample.options), buffer)
    except CodecError:
        return sample.frame, message, 0
    if not isinstance(relabelled, Metadata) or buffer or relabelled.request_id != ids[0]:
        return sample.frame, message, 0  # rewrite_request_id reports it
    differ = [i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b]
    id_end = differ[-1] + 1 if differ and len(first) == len(second) else 0
    return first, relabelled, id_end


@check("bad_input_error_id", "bad_input")
def bad_input_error_id(ctx: CheckContext) -> None:
    """A decode error on a frame whose header gave a request id carries metadata with that id.

    An engine answers a refused frame (``OverLimit``, ``BadRequest``) with the protocol's error
    reply to the id in the error's ``metadata``; without it the client never hears back.
    Inputs: each message (rewritten with a known id when the codec can) over
    ``max_frame_size`` with its header intact; where the id lies before a length field, that
    field set huge or one over the limit, whole and cut after the header (as a hostile header
    arrives in a first read): each ``FrameTooLargeError`` must carry the id. And each message
    corrupted past its header (within its first 64 bytes): each ``CodecError`` must carry it,
    in metadata whose fields have the contract's types.
    """
    checked = 0

    def prop(sample: Sample) -> None:
        nonlocal checked
        frame, message, id_end = _known_id(ctx, sample, reference(ctx, sample))
        size = len(frame)
        inputs: list[tuple[str, bytes, int, type[CodecError]]] = [
            (f"a {size}-byte message", frame, size - 1, FrameTooLargeError)
        ]
        if id_end:
            for field in length_fields(frame, message):
                offset, width, _ = field
                if offset < id_end:
                    continue  # a length read before the id: the id is not known yet
                head = max(message.header_size, offset + width)
                for name, data in _patches(frame, field):
                    what = f"the length field at offset {offset} set to {name}"
                    inputs.append((what, data, size, FrameTooLargeError))
                    if head < len(data):
                        cut = data[:head]
                        inputs.append(
                            (f"{what}, cut after {head} bytes", cut, size, FrameTooLargeError)
                        )
        roomy = 2 * size + ctx.target.settings.small_limit
        for pos, data in corruptions(frame):
            if pos >= message.header_size:
                inputs.append((f"byte {pos} (past the header) corrupted", data, roomy, CodecError))
        for what, data, limit, kind in inputs:
            codec = _limited(ctx, sample, limit) if limit > 0 else None
            if codec is None:
                continue
            try:
                call_decode(codec, bytearray(data), limit=ctx.target.settings.time_limit)
            except kind as exc:
                checked += 1
                got = exc.metadata
                if got is None or got.request_id != message.request_id:
                    said = "no metadata" if got is None else f"request id {got.request_id}"
                    fail(
                        f"{what}, max_frame_size={limit}: {type(exc).__name__} ({exc}) carries "
                        f"{said}; the header gave request id {message.request_id}, and an "
                        f"engine answers the refused frame to the id in the error's metadata\n"
                        f"{hexdump(data, mark=exc.offset)}"
                    )
                wrong = type_problems(got)
                if wrong:
                    fail(
                        f"{what}, max_frame_size={limit}: the metadata of {type(exc).__name__} "
                        f"({exc}) does not have the contract's types: {'; '.join(wrong)} (an "
                        "engine answers, counts and logs the refused frame by it, as a decoded "
                        f"message)\n{hexdump(data, mark=exc.offset)}"
                    )
            except CodecError:
                continue

    for_each_sample(ctx, prop)
    if checked == 0:
        raise CheckSkipped("no input the kit tried made decode raise FrameTooLargeError")
    ctx.details["refused"] = checked


__all__ = ["length_fields", "no_messages"]
