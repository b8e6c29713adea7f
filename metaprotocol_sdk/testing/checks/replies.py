"""Replies the codec builds itself: error replies, heartbeat replies; oneway and streams."""

from __future__ import annotations

import contextlib

from hypothesis import strategies as st

from metaprotocol_sdk.codec import Codec, LocalError, ReplyHead, join_encoded
from metaprotocol_sdk.enums import ErrorType, MessageType, ResponseStatus, StreamType
from metaprotocol_sdk.errors import CodecError, ConfigError, FrameTooLargeError, MutationError
from metaprotocol_sdk.metadata import Metadata
from metaprotocol_sdk.testing.golden import Sample
from metaprotocol_sdk.testing.hexdump import hexdump
from metaprotocol_sdk.testing.hooks import grown_samples

from ._support import (
    STREAM_FRAMES,
    collect,
    compare,
    corruptions,
    decode_whole,
    encode_bytes,
    fail,
    for_each_sample,
    labelled,
    raised_at,
    reference,
    run_property,
    same_metadata,
    split_points,
)
from .base import CheckContext, CheckSkipped, check
from .linear import _roomy

_REPLY_TYPES = (MessageType.Response, MessageType.Error)


#: What an empty error reply breaks, for the failure messages.
EMPTY_REPLY = (
    "on_error must return the protocol's own error reply, a whole Response or Error frame "
    "with the request's id, which an engine sends the client instead of an upstream's reply "
    "(with nothing to send, the client waits until it gives up)"
)


def _needs_reply(metadata: Metadata) -> bool:
    return metadata.message_type in (MessageType.Request, MessageType.Stream_Init)


def _resets_stream(message: Metadata, reply: Metadata) -> bool:
    """True when ``reply`` is the protocol's reset of the stream ``message`` is a frame of:
    a ``Stream_Close_Two_Way`` with its (non-zero) stream id, which the contract allows as
    ``on_error``'s answer to a stream frame instead of a Response or Error."""
    return (
        message.message_type in STREAM_FRAMES
        and reply.message_type is MessageType.Stream_Close_Two_Way
        and reply.stream_id == message.stream_id != 0
    )


def _error_reply(
    ctx: CheckContext, sample: Sample, request: Metadata, kind: ErrorType, message: str = ""
) -> bytes:
    codec = ctx.target.new_codec(sample.options)
    error = LocalError(kind, message or f"conformance kit: {kind.name}")
    what = f"on_error({kind.name}" + (f", message {_shown(message)})" if message else ")")
    try:
        reply = codec.on_error(request, error)
    except Exception as exc:
        fail(
            f"{what} raised {type(exc).__name__}: {exc}{raised_at(exc, codec)}; on_error must "
            "build a reply for any message text (an engine's reasons quote bytes off the "
            "wire): escape, replace or cut what the protocol cannot carry"
        )
    if not isinstance(reply, bytes | bytearray | memoryview):
        fail(f"{what} returned {type(reply).__name__}, expected bytes")
    return bytes(reply)


def _shown(message: str) -> str:
    """``message`` as a failure names it: its first 60 characters, quoted, and its length."""
    cut = message if len(message) <= 60 else message[:60] + "..."
    return f"{cut!r} ({len(message)} characters)"


def _or_reset(message: Metadata) -> str:
    """What else a reply to a stream frame may be, for the failure messages."""
    if message.message_type not in STREAM_FRAMES:
        return ""
    return f", or the stream's reset (a Stream_Close_Two_Way of stream {message.stream_id})"


#: Messages an engine may pass to ``on_error``: its reasons quote upstream errors and codec
#: errors, which quote bytes off the wire (any text, any length).
_MESSAGES = (
    "",
    "kit: non-ASCII \u00e9\u00fc\u4e2d\u0416 \U0001f600, quotes \"'\\ and a\nnewline",
    "kit: a long reason " + "0123456789" * 100,
)


def _error_replies(
    ctx: CheckContext,
    check_id: bool,
    check_status: bool = False,
    messages: tuple[str, ...] = ("",),
    wide_ids: bool = False,
) -> None:
    seen = 0

    def prop(sample: Sample) -> None:
        nonlocal seen
        request = reference(ctx, sample)
        if not _needs_reply(request):
            return
        seen += 1
        answer(sample, request)
        if wide_ids:  # the request again with the widest ids it may carry
            for wide in _widest_ids(ctx, sample, request):
                answer(sample, wide)

    def answer(sample: Sample, request: Metadata) -> None:
        for kind in ErrorType:
            for message in messages:
                reply = _error_reply(ctx, sample, request, kind, message)
                if not reply:
                    fail(f"on_error({kind.name}) returned an empty reply: {EMPTY_REPLY}")
                decoded = decode_whole(
                    ctx.target.new_codec(sample.options), reply, f"the {kind.name} error reply"
                )
                if _resets_stream(request, decoded):
                    continue  # the stream's reset: its id, not a request id or a status
                if decoded.message_type not in _REPLY_TYPES:
                    fail(
                        f"the {kind.name} error reply decodes as {decoded.message_type.name}, "
                        f"expected Response or Error{_or_reset(request)}\nreply:\n{hexdump(reply)}"
                    )
                if check_id and decoded.request_id != request.request_id:
                    fail(
                        f"the {kind.name} error reply carries request id {decoded.request_id}, "
                        f"the request had {request.request_id}\nreply:\n{hexdump(reply)}"
                    )
                if check_status and decoded.response_status is not ResponseStatus.Error:
                    fail(
                        f"the {kind.name} error reply decodes with response_status "
                        f"{decoded.response_status.name}, expected Error (an engine counts "
                        f"replies and retries by it)\nreply:\n{hexdump(reply)}"
                    )

    for_each_sample(ctx, prop)
    if seen == 0:
        raise CheckSkipped("no request among golden vectors or generated messages")


def _widest_ids(ctx: CheckContext, sample: Sample, request: Metadata) -> list[Metadata]:
    """``request`` rewritten (``encode(request_id=)``, capability ``rewrite_request_id``) with
    the codec's ``max_request_id`` and with an id of four distinct bytes, and decoded: a client
    chooses its ids, and an error reply that writes too few of its bits answers another
    request. Empty without the capability, or where the codec refuses the id."""
    codec_type = ctx.target.codec
    if not codec_type.capabilities.rewrite_request_id or request.message_type in STREAM_FRAMES:
        return []
    top = codec_type.max_request_id
    found = []
    for request_id in sorted({top, 0x01020304} - {request.request_id}):
        if not 1 <= request_id <= top:
            continue
        encoder = ctx.target.new_codec(sample.options)
        try:
            data = join_encoded(encoder.encode(request, request_id=request_id))
            wide = ctx.target.new_codec(sample.options).decode(bytearray(data))
        except Exception:  # an id the codec cannot write is rewrite_request_id's to report
            continue
        if isinstance(wide, Metadata) and wide.request_id == request_id:
            found.append(wide)
    return found


@check("error_reply_nonempty", "errors", requires="error_reply")
def error_reply_nonempty(ctx: CheckContext) -> None:
    """on_error() for every ErrorType is a non-empty reply that decodes as Response or Error
    (or, for a stream frame, as the stream's reset)."""
    _error_replies(ctx, check_id=False)


@check("error_reply_request_id", "errors", requires="error_reply")
def error_reply_request_id(ctx: CheckContext) -> None:
    """Every error reply carries the request's id (a stream's reset: the stream's id), also for
    the request rewritten with ``max_request_id`` and with an id of four distinct bytes."""
    _error_replies(ctx, check_id=True, wide_ids=True)


@check("error_reply_status", "errors", requires="error_reply")
def error_reply_status(ctx: CheckContext) -> None:
    """Every error reply decodes with response_status Error (a stream's reset need not).

    An engine retries a route on an Error reply and counts replies by status; an error reply
    that decodes as Ok is counted a success and never retried.
    """
    _error_replies(ctx, check_id=False, check_status=True)


@check("error_reply_any_message", "errors", requires="error_reply")
def error_reply_any_message(ctx: CheckContext) -> None:
    """on_error() takes any message text: empty, non-ASCII, quotes, newlines, 1000 chars.

    An engine's reasons quote upstream and codec errors, which quote bytes off the wire; the
    reply must still be built, decode as one Response or Error and carry the request's id
    (or be the stream's reset, for a stream frame).
    """
    _error_replies(ctx, check_id=True, messages=_MESSAGES)


def _reply_to(ctx: CheckContext, sample: Sample, metadata: Metadata, what: str) -> None:
    """on_error(metadata) is one Response or Error carrying metadata's request id."""
    codec = ctx.target.new_codec(sample.options)
    try:
        reply = codec.on_error(metadata, LocalError(ErrorType.BadRequest, "conformance kit"))
    except Exception as exc:
        fail(
            f"on_error for {what} raised {type(exc).__name__}: {exc} (an engine answers any "
            "message a client should not send, and any frame it refuses, with on_error)"
        )
    if not isinstance(reply, bytes | bytearray | memoryview) or not reply:
        fail(f"on_error for {what} returned {reply!r}: {EMPTY_REPLY}")
    decoded = decode_whole(ctx.target.new_codec(sample.options), bytes(reply), "the reply")
    if _resets_stream(metadata, decoded):
        return
    if decoded.message_type is MessageType.Stream_Close_Two_Way and metadata.stream_id == 0:
        fail(
            f"on_error for {what} (request id {metadata.request_id}, no stream_id) decodes as "
            f"a Stream_Close_Two_Way of stream {decoded.stream_id}: a reset names no stream "
            "without the stream's id (set stream_id in a CodecError's metadata, or answer "
            f"with a Response or Error with the request id)\nreply:\n{hexdump(bytes(reply))}"
        )
    if decoded.message_type not in _REPLY_TYPES or decoded.request_id != metadata.request_id:
        fail(
            f"on_error for {what} (request id {metadata.request_id}) decodes as a "
            f"{decoded.message_type.name} with request id {decoded.request_id}, expected a "
            f"Response or Error with the same id{_or_reset(metadata)}\n"
            f"reply:\n{hexdump(bytes(reply))}"
        )


@check("error_reply_any_metadata", "errors", requires="error_reply")
def error_reply_any_metadata(ctx: CheckContext) -> None:
    """on_error() answers any metadata an engine passes it: every message type, and what a
    decode error carries.

    An engine answers a message a client should not send (a Response, an Error, a stream
    frame) with on_error, and a frame the codec refused with on_error on the error's
    ``metadata`` (what was readable: often no frame, no attributes). Inputs: every message,
    and the metadata of each CodecError from corrupting its first 64 bytes.
    """
    seen = 0

    def prop(sample: Sample) -> None:
        nonlocal seen
        decoded = reference(ctx, sample)
        if decoded.message_type is not MessageType.Heartbeat:
            seen += 1
            _reply_to(ctx, sample, decoded, f"a {decoded.message_type.name} message")
        for pos, data in corruptions(sample.frame):
            codec = ctx.target.new_codec(sample.options)
            try:
                codec.decode(bytearray(data + sample.frame))
            except CodecError as exc:
                partial, error_name = exc.metadata, type(exc).__name__
            except Exception:
                continue  # bad_input_corrupted reports it
            else:
                continue
            if partial is None:
                continue
            seen += 1
            what = (
                f"the metadata of {error_name} ({partial.message_type.name}) "
                f"raised on byte {pos} corrupted"
            )
            _reply_to(ctx, sample, partial, what)

    for_each_sample(ctx, prop)
    if seen == 0:
        raise CheckSkipped("no message and no decode error's metadata to answer")


@check("error_reply_after_decode_error", "errors", requires="error_reply")
def error_reply_after_decode_error(ctx: CheckContext) -> None:
    """A request refused as too large still gets an error reply with its id.

    ``FrameTooLargeError.metadata`` (what the codec read before refusing) is what an engine
    passes to ``on_error``; the reply must be non-empty and carry the request's id.
    """
    seen = 0

    def prop(sample: Sample) -> None:
        nonlocal seen
        request = reference(ctx, sample)
        if not _needs_reply(request) or len(sample.frame) < 2:
            return
        try:
            codec = ctx.target.new_codec(sample.options, max_frame_size=len(sample.frame) - 1)
        except ConfigError:
            return
        try:
            codec.decode(bytearray(sample.frame))
        except FrameTooLargeError as exc:
            partial = exc.metadata
        except CodecError:
            return
        else:
            return  # bad_input_frame_limit reports this
        if partial is None:
            return
        seen += 1
        for kind in (ErrorType.OverLimit, ErrorType.BadRequest):
            reply = _error_reply(ctx, sample, partial, kind)
            if not reply:
                fail(
                    f"on_error({kind.name}) for a too-large request returned an empty reply: "
                    f"{EMPTY_REPLY}"
                )
            decoded = decode_whole(
                ctx.target.new_codec(sample.options), reply, f"the {kind.name} error reply"
            )
            if decoded.message_type is MessageType.Stream_Close_Two_Way and _needs_reply(request):
                if _resets_stream(request, decoded):
                    continue
                fail(
                    f"the {kind.name} reply to a too-large {request.message_type.name} resets "
                    f"stream {decoded.stream_id}, the frame was of stream {request.stream_id} "
                    "(set stream_id in the FrameTooLargeError's metadata: it is all on_error "
                    f"gets)\nreply:\n{hexdump(reply)}"
                )
            if decoded.request_id != request.request_id:
                fail(
                    f"the {kind.name} reply to a too-large request carries id "
                    f"{decoded.request_id}, the request had {request.request_id}\n"
                    f"reply:\n{hexdump(reply)}"
                )

    for_each_sample(ctx, prop)
    if seen == 0:
        raise CheckSkipped(
            "no FrameTooLargeError carried metadata (the codec cannot say which request a "
            "refused frame was), so no error reply could be sent for it"
        )


@check("heartbeat_reply", "errors", requires="heartbeat")
def heartbeat_reply(ctx: CheckContext) -> None:
    """A heartbeat gets a heartbeat reply with the same id (or None when it is a reply).

    The reply, decoded, is itself a reply: ``heartbeat_reply`` gives ``None`` for it.
    """
    seen = replied = 0

    def prop(sample: Sample) -> None:
        nonlocal seen, replied
        beat = reference(ctx, sample)
        if beat.message_type is not MessageType.Heartbeat:
            return
        seen += 1
        codec = ctx.target.new_codec(sample.options)
        try:
            reply = codec.heartbeat_reply(beat)
        except CodecError as exc:
            fail(f"heartbeat_reply raised {type(exc).__name__}: {exc}")
        if reply is None:
            return
        replied += 1
        decoded = decode_whole(ctx.target.new_codec(sample.options), bytes(reply), "the reply")
        if decoded.message_type is not MessageType.Heartbeat:
            fail(f"the heartbeat reply decodes as {decoded.message_type.name}")
        if decoded.request_id != beat.request_id:
            fail(
                f"the heartbeat reply carries id {decoded.request_id}, the heartbeat had "
                f"{beat.request_id}\nreply:\n{hexdump(reply)}"
            )
        try:
            again = ctx.target.new_codec(sample.options).heartbeat_reply(decoded)
        except CodecError as exc:
            fail(f"heartbeat_reply on the reply raised {type(exc).__name__}: {exc}")
        if again is not None:
            fail(
                "heartbeat_reply answers its own reply (it must be None for a heartbeat that "
                "is a reply): two peers would send heartbeats back and forth forever\n"
                f"reply:\n{hexdump(reply)}\nits reply:\n{hexdump(bytes(again))}"
            )

    for_each_sample(ctx, prop)
    if seen == 0:
        raise CheckSkipped(
            "no heartbeat among golden vectors or generated messages; add one to check replies"
        )
    ctx.details.update(heartbeats=seen, replied=replied)


#: What an engine does with a message of the wrong type, by what ``_expected_types`` checks.
_ENGINE_READS = {
    "oneway": ": an engine waits for its reply, which never comes",
    "streaming": (
        ": an engine routes it as that, not as a frame of its stream, whose connection never "
        "sees it"
    ),
}


def _expected_types(ctx: CheckContext, wanted: tuple[MessageType, ...], what: str) -> None:
    matched = 0

    def prop(sample: Sample) -> None:
        nonlocal matched
        name = sample.expect.get("message_type")
        if name is None or MessageType[name] not in wanted:
            return
        matched += 1
        decoded = reference(ctx, sample)
        if decoded.message_type is not MessageType[name]:
            fail(
                f"expected a {name} message, the codec decoded {decoded.message_type.name}"
                f"{_ENGINE_READS.get(what, '')}"
            )
        if what == "streaming" and decoded.stream_type is StreamType.Unary:
            fail(
                f"a {name} message has stream_type Unary (a stream frame's type is its "
                "stream's: ClientStream, ServerStream or BidiStream)"
            )

    for_each_sample(ctx, prop)
    if matched == 0:
        kinds = ", ".join(t.name for t in wanted)
        raise CheckSkipped(
            f"no golden vector or generated message expects message_type {kinds}; "
            f"{what} marking is unverified"
        )


@check("oneway_marked", "errors", requires="oneway")
def oneway_marked(ctx: CheckContext) -> None:
    """Messages expected to be oneway decode as MessageType.Oneway."""
    _expected_types(ctx, (MessageType.Oneway,), "oneway")


@check("streaming_marked", "errors", requires="streaming")
def streaming_marked(ctx: CheckContext) -> None:
    """Messages expected to be stream frames decode as such, with a non-unary stream type."""
    _expected_types(ctx, STREAM_FRAMES, "streaming")


@check("streaming_ids", "errors", requires="streaming")
def streaming_ids(ctx: CheckContext) -> None:
    """Stream frames carry a non-zero stream id, which golden vectors of stream frames state."""
    seen = 0

    def prop(sample: Sample) -> None:
        nonlocal seen
        decoded = reference(ctx, sample)
        kind = decoded.message_type
        if kind not in STREAM_FRAMES:
            return
        seen += 1
        if decoded.stream_id == 0:
            fail(
                f"a {kind.name} frame decodes with stream_id 0: an engine finds a stream's "
                "frames by their stream_id (never 0), so this one reaches no stream (set it on "
                "every stream frame, from the field that carries it)"
            )

    for_each_sample(ctx, prop)
    if seen == 0:
        raise CheckSkipped(
            "no golden vector or generated message decodes as a stream frame; stream ids are "
            "unverified"
        )
    unstated = [
        sample
        for sample in ctx.target.samples
        if "stream_id" not in sample.expect and reference(ctx, sample).message_type in STREAM_FRAMES
    ]
    if unstated:
        names = ", ".join(repr(sample.name) for sample in unstated)
        files = sorted({sample.file for sample in unstated} - {""})
        origin = f" in {', '.join(files)}" if files else ""
        fail(
            f"{len(unstated)} golden vectors of stream frames{origin} do not state their "
            f"stream_id ({names}): an engine sends each frame to the stream its stream_id "
            "names, and only a stated id shows a codec that reads it from the wrong field or "
            "leaves it at another frame's; add `stream_id: N` to each one's expect\n"
            f"{hexdump(unstated[0].frame)}"
        )
    ctx.details.update(stream_frames=seen)


def _peek(codec: Codec, data: bytes, what: str) -> ReplyHead | None:
    buffer = bytearray(data)
    try:
        head = codec.peek_reply(buffer)
    except Exception as exc:
        fail(f"peek_reply raised {type(exc).__name__}: {exc} on {what}")
    if buffer != data:
        fail(f"peek_reply changed the buffer it was given ({what}); it must consume nothing")
    return head


def _peek_corruptions(ctx: CheckContext, sample: Sample, codec: Codec) -> None:
    """Where peek_reply gives a head for a reply corrupted in its first bytes, decode must
    accept the same reply: a head for a frame decode refuses forwards it unchecked."""
    for pos, data in corruptions(sample.frame):
        head = _peek(codec, data, f"the reply with byte {pos} corrupted")
        if head is None:
            continue
        buffer = bytearray(data)
        try:
            decoded = ctx.target.new_codec(sample.options).decode(buffer)
        except Exception as exc:
            got = f"raises {type(exc).__name__}: {exc}"
        else:
            if isinstance(decoded, Metadata) and decoded.message_type in _REPLY_TYPES:
                found = (decoded.request_id, decoded.size, decoded.response_status)
                if tuple(head) == found:
                    continue
                got = f"gives (id, size, status) {found}"
            elif isinstance(decoded, Metadata):
                got = f"gives a {decoded.message_type.name} message"
            else:
                got = f"returns {decoded!r}"
        fail(
            f"peek_reply gave {head} for the reply with byte {pos} corrupted, but decode {got}"
            f" (peek_reply must be None where decode would refuse or differ)\n"
            f"{hexdump(data, mark=pos)}"
        )


@check("peek_reply_agrees", "errors", requires="peek_reply")
def peek_reply_agrees(ctx: CheckContext) -> None:
    """peek_reply() agrees with decode() on replies, consumes nothing, is None otherwise.

    Where it gives a head, it is decode's (request id, size, response status) and it is the
    same with more bytes after the frame; for every truncation, for a frame above
    ``max_frame_size`` and for anything but a Response or Error it is ``None``; on each
    corruption of a frame's first 64 bytes it is ``None`` or what decode gives. With
    ``rewrite_request_id``, ``relabel(frame, id)`` equals ``encode(decoded, request_id=id)``,
    and relabelled back gives the frame; the same on the unusual replies it peeks.
    """
    replies = peeked = 0
    rewrites = ctx.target.codec.capabilities.rewrite_request_id

    def prop(sample: Sample) -> None:
        nonlocal replies, peeked
        decoded = reference(ctx, sample)
        frame = sample.frame
        codec = ctx.target.new_codec(sample.options)
        head = _peek(codec, frame, "a whole frame")
        if decoded.message_type in _REPLY_TYPES:
            replies += 1
        if head is None:
            return
        peeked += 1
        if decoded.message_type not in _REPLY_TYPES:
            fail(f"peek_reply gave {head} for a {decoded.message_type.name} message")
        expected = (decoded.request_id, decoded.size, decoded.response_status)
        if tuple(head) != expected:
            fail(f"peek_reply gave {head}; decode gives (id, size, status) {expected}")
        if _peek(codec, frame + frame, "a frame followed by another") != head:
            fail("peek_reply gives another head when more bytes follow the frame")
        for cut in split_points(len(frame), ctx.target.settings.max_split_points):
            if _peek(codec, frame[:cut], f"the first {cut} bytes") is not None:
                fail(f"peek_reply gave a head for the first {cut} of {len(frame)} bytes")
        if len(frame) > 1:
            with contextlib.suppress(ConfigError):
                small = ctx.target.new_codec(sample.options, max_frame_size=len(frame) - 1)
                if _peek(small, frame, "a frame above max_frame_size") is not None:
                    fail("peek_reply gave a head for a frame above max_frame_size")
        _peek_corruptions(ctx, sample, codec)
        if rewrites:
            fresh = ctx.target.new_codec(sample.options)
            _relabel_agrees(codec, fresh, frame, decoded, "frame")

    for_each_sample(ctx, prop)
    if replies == 0:
        raise CheckSkipped("no Response or Error among golden vectors or generated messages")
    unusual = ctx.target.unusual
    if unusual is not None:
        # A peer's unusual replies (reserved bits, non-canonical forms) are forwarded through
        # peek_reply and relabel too, which must keep every byte but the id.
        def unusual_prop(sample: Sample) -> None:
            nonlocal peeked
            decoded = reference(ctx, sample)
            codec = ctx.target.new_codec(sample.options)
            head = _peek(codec, sample.frame, "an unusual frame")
            if head is None:
                return
            peeked += 1
            expected = (decoded.request_id, decoded.size, decoded.response_status)
            if decoded.message_type not in _REPLY_TYPES or tuple(head) != expected:
                fail(f"peek_reply gave {head} for an unusual {decoded.message_type.name}")
            if rewrites:
                fresh = ctx.target.new_codec(sample.options)
                _relabel_agrees(codec, fresh, sample.frame, decoded, "unusual frame")

        # Four lists of as many frames as the examples: one frame per example drew long
        # streaks of one kind (20 of KV's six kinds of frames were no reply at all), which
        # the frames of one list do not.
        count = ctx.target.settings.examples
        drawn: list[Sample] = []
        run_property(ctx, st.lists(unusual, min_size=count, max_size=count), drawn.extend, 4)
        for sample in drawn:
            labelled(sample, unusual_prop)
    ctx.details.update(replies=replies, peeked=peeked)


#: Sizes in bytes a reply's headers grow to with a response mutation: past the widths of
#: 1- and 2-byte varints (128, 16384) and of 16-bit lengths (65536), up to a few hundred KiB.
LARGE_HEADERS = (300, 20_000, 70_000, 300_000)
#: The largest reply the check builds or takes from ``grown(n)``.
LARGE_CAP = 512 << 10
#: Why the size matters, for the failure messages.
_LARGE_RULE = (
    "peek_reply must give decode's (request id, size, status) for a reply of any size, or "
    "None: an engine forwards the reply's first `size` bytes undecoded and reads what follows "
    "as the next reply, so a wrong size (a length field read too narrow, a varint that "
    "widens) desynchronises a shared upstream connection"
)


def _grown_replies(ctx: CheckContext) -> list[tuple[str, Sample]]:
    """The replies among ``grown(n)``'s frames at n, 4n and (when there were any) 16n."""
    grown = ctx.target.grown
    if grown is None:
        return []
    n = ctx.target.settings.linear_scale
    found: list[tuple[str, Sample]] = []
    for scale in (n, 4 * n, 16 * n):
        if scale == 16 * n and not found:
            break
        for name, sample in grown_samples(grown, scale).items():
            if len(sample.frame) > LARGE_CAP:
                continue
            try:  # a request over the codec's own limits at 16n is not this check's
                message = _roomy(ctx, sample).decode(bytearray(sample.frame))
            except CodecError:
                continue
            if isinstance(message, Metadata) and message.message_type in _REPLY_TYPES:
                found.append((f"grown({scale})[{name!r}]", sample))
    return found


def _mutated_replies(ctx: CheckContext) -> list[tuple[str, Sample]]:
    """A Response and an Error the codec peeks at, their headers grown to each of
    :data:`LARGE_HEADERS` with one long value and with many keys (where it takes them)."""
    if not ctx.target.codec.capabilities.response_mutation:
        return []
    found: list[tuple[str, Sample]] = []
    kinds: set[MessageType] = set()
    for sample in collect(ctx, 10):
        message = reference(ctx, sample)
        kind = message.message_type
        if kind not in _REPLY_TYPES or kind in kinds:
            continue
        codec = ctx.target.new_codec(sample.options)
        if _peek(codec, sample.frame, "a whole reply") is None:
            continue
        kinds.add(kind)
        for size in LARGE_HEADERS:
            shapes = {
                f"one value of {size} bytes": {"x-mp-peek": "p" * size},
                f"{size // 40} keys": {f"x-mp-peek-{i:06d}": "v" * 24 for i in range(size // 40)},
            }
            for shape, mutation in shapes.items():
                try:
                    frame = join_encoded(codec.encode(message, mutation))
                except MutationError:
                    continue
                except CodecError as exc:
                    fail(
                        f"encode of a {kind.name} with {shape} raised {type(exc).__name__}: "
                        f"{exc} (a mutation the codec cannot carry raises MutationError)"
                    )
                if len(frame) <= LARGE_CAP:
                    what = f"a {kind.name} with {shape} written"
                    found.append((what, Sample(frame, options=sample.options)))
    return found


def _peek_large(ctx: CheckContext, what: str, sample: Sample) -> bool:
    """Hold peek_reply to decode on one large reply: whether it gave a head."""
    frame = sample.frame
    what = f"{what} ({len(frame)} bytes)"
    codec = _roomy(ctx, sample)
    decoded = decode_whole(_roomy(ctx, sample), frame, what)
    if decoded.message_type not in _REPLY_TYPES:
        return False
    expected = (decoded.request_id, decoded.size, decoded.response_status)
    head = _peek(codec, frame, what)
    if head is not None and tuple(head) != expected:
        cut = head[1] if 0 < head[1] < len(frame) else None
        fail(
            f"peek_reply gave {head} for {what}; decode gives (id, size, status) {expected}.\n"
            f"{_LARGE_RULE}\n"
            + ("(^^ where an engine would cut the frame)\n" if cut is not None else "")
            + hexdump(frame, mark=cut)
        )
    if _peek(codec, frame + frame[:64], f"{what}, more bytes after it") != head:
        fail(f"peek_reply gives another head for {what} when more bytes follow it\n{_LARGE_RULE}")
    cuts = {1, decoded.header_size - 1, decoded.header_size, decoded.header_size + 1}
    cuts |= {len(frame) // 2, len(frame) - 1, *split_points(len(frame), 8)}
    for cut in sorted(c for c in cuts if 0 < c < len(frame)):
        got = _peek(codec, frame[:cut], f"the first {cut} bytes of {what}")
        if got is not None:
            fail(
                f"peek_reply gave {got} for the first {cut} bytes of {what}, which is "
                f"incomplete (decode gives (id, size, status) {expected} for the whole).\n"
                f"{_LARGE_RULE}\n{hexdump(frame, mark=cut)}"
            )
    with contextlib.suppress(ConfigError):
        small = ctx.target.new_codec(sample.options, max_frame_size=len(frame) - 1)
        if _peek(small, frame, f"{what} above max_frame_size") is not None:
            fail(f"peek_reply gave a head for {what} with max_frame_size={len(frame) - 1}")
    if head is not None and ctx.target.codec.capabilities.rewrite_request_id:
        _relabel_agrees(codec, _roomy(ctx, sample), frame, decoded, what)
    return head is not None


def _relabel_agrees(codec: Codec, fresh: Codec, frame: bytes, decoded: Metadata, what: str) -> None:
    """``relabel`` of a reply gives what ``encode(request_id=)`` of its decoded form does
    (an id one off the reply's), which relabelled back to the reply's id gives the reply again
    and decodes (on ``fresh``) as the reply with the new id and nothing else changed: a codec
    whose encode calls its relabel agrees with itself."""
    new_id = decoded.request_id - 1 if decoded.request_id > 0 else decoded.request_id + 1
    try:
        relabelled = join_encoded(codec.relabel(frame, new_id))
    except Exception as exc:
        fail(f"relabel of {what} raised {type(exc).__name__}: {exc}")
    wanted = encode_bytes(
        codec, lambda: codec.encode(decoded, request_id=new_id), "encode(request_id=)"
    )
    if relabelled != wanted:
        fail(
            f"relabel({what}, {new_id}) differs from encode(request_id={new_id}): "
            + compare(wanted, relabelled)
        )
    try:
        back = join_encoded(codec.relabel(relabelled, decoded.request_id))
    except Exception as exc:
        fail(f"relabel of the relabelled {what} raised {type(exc).__name__}: {exc}")
    if back != frame:
        fail(
            f"relabel({what}, {new_id}) and back to {decoded.request_id} does not give the reply "
            "again: relabel changed bytes other than the id (it writes the id, and nothing "
            "else)\n" + compare(frame, back)
        )
    again = decode_whole(fresh, relabelled, f"relabel({what}, {new_id})")
    diff = same_metadata(decoded, again, ignore=("request_id", "size", "header_size"))
    if not diff and bytes(again.body) != bytes(decoded.body):
        diff = "the body changed"
    if again.request_id != new_id or diff:
        got = diff or f"request id {again.request_id}"
        fail(
            f"relabel({what}, {new_id}) decodes otherwise than the reply with id {new_id}: "
            f"{got} (an engine forwards what relabel returns as the reply, with the client's "
            "id and nothing else changed)\n" + compare(frame, relabelled)
        )


@check("peek_reply_large", "errors", requires="peek_reply")
def peek_reply_large(ctx: CheckContext) -> None:
    """peek_reply() agrees with decode() on large replies too: the Responses and Errors of
    ``grown(n)`` (at n, 4n and 16n, bodies of a protocol's own kind), and a peeked Response
    and Error with their headers grown to 300 B .. 300 KB by a response mutation (one long
    value, many keys), each up to 512 KiB.

    Each gives decode's head or None, also with more bytes after it; no truncation and no
    ``max_frame_size`` below it gets a head; ``relabel`` equals ``encode(request_id=)``.
    """
    replies = _grown_replies(ctx) + _mutated_replies(ctx)
    if not replies:
        raise CheckSkipped(
            "no large reply: grown(n) returns no Response or Error, and the codec takes no "
            "response mutation on a reply it peeks at; ship a reply among grown(n)'s frames"
        )
    peeked = sum(_peek_large(ctx, what, sample) for what, sample in replies)
    largest = max(len(sample.frame) for _, sample in replies)
    ctx.details.update(replies=len(replies), peeked=peeked, largest=largest)
