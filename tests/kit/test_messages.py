"""Failure messages say what to change: the beginner's faults, each with the rule it breaks.

Each codec here is the KV example with one fault a newcomer writes (found by writing a codec
from the scaffold); the test holds the failure message to a hint the author can act on.
"""

from __future__ import annotations

from hypothesis import strategies as st

from metaprotocol_sdk import (
    CodecError,
    Encoded,
    ErrorType,
    LocalError,
    MessageType,
    Metadata,
    Mutation,
    NeedData,
)
from metaprotocol_sdk.examples.kv import KVCodec
from metaprotocol_sdk.testing import CodecTarget, KitSettings, Outcome, run_check

SETTINGS = KitSettings(examples=4, random_examples=20, perf_seconds=0.01)


class Fault(KVCodec):
    conformance = "metaprotocol_sdk.examples.kv_conformance"


def failure(codec: type[KVCodec], check: str) -> str:
    return failure_of(CodecTarget.discover(codec, settings=SETTINGS), check)


def failure_of(target: CodecTarget, check: str) -> str:
    result = run_check(target, check)
    assert result.outcome is Outcome.failed, result.reason
    return result.reason


class CountsWithoutItsLengthField(Fault):
    """Asks for the frame's size less its 4-byte prefix (the length field's value alone)."""

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        result = super().decode(buffer)
        if isinstance(result, NeedData) and result.needed:
            return NeedData(result.needed - 4)
        return result


def test_a_need_data_short_of_the_frame_says_what_needed_counts() -> None:
    reason = failure(CountsWithoutItsLengthField, "framing_needed_exact")
    assert "but the buffer already holds" in reason
    assert "needed is the size of the whole first frame, counted from its first byte" in reason


class AssertsAfterAnError(Fault):
    """Keeps a flag from a refused frame and trips an assert on the next decode."""

    failed = False

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        if self.failed:  # (pytest rewrites an assert statement's message)
            raise AssertionError("decode after an error")
        try:
            return super().decode(buffer)
        except CodecError:
            self.failed = True
            raise


def test_a_stray_exception_in_a_check_that_calls_decode_itself_names_the_codec_line() -> None:
    # state_resync_after_error decodes on after an error without the kit's guard: the stray
    # AssertionError reached the runner, reported as "unexpected AssertionError", as if the
    # kit had failed.
    reason = failure(AssertsAfterAnError, "state_resync_after_error")
    assert reason.startswith("the codec raised AssertionError: decode after an error (raised at ")
    assert "test_messages.py:" in reason and "in decode: raise AssertionError(" in reason
    assert "only CodecError subclasses may escape a codec's methods" in reason


class RefusesANewline(Fault):
    """Builds its error reply with a format that cannot hold a line break."""

    def on_error(self, metadata: Metadata, error: LocalError) -> bytes:
        if "\n" in error.message:
            raise ValueError("a header value cannot hold a newline")
        return super().on_error(metadata, error)


def test_an_error_message_the_codec_cannot_carry_is_shown() -> None:
    reason = failure(RefusesANewline, "error_reply_any_message")
    # The text itself, so the author sees the newline, and what to do about it.
    assert "quotes \"\\'\\\\ and a\\nnewline' (47 characters))" in reason
    assert "raised ValueError: a header value cannot hold a newline (raised at " in reason
    assert "escape, replace or cut what the protocol cannot carry" in reason


class EmptyReply(Fault):
    def on_error(self, metadata: Metadata, error: LocalError) -> bytes:
        return b""


def test_an_empty_error_reply_says_what_on_error_must_return() -> None:
    for check in ("error_reply_nonempty", "error_reply_any_metadata"):
        reason = failure(EmptyReply, check)
        assert "on_error must return the protocol's own error reply" in reason, check


class IgnoresTheMutation(Fault):
    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        return super().encode(message, None, request_id=request_id)


def test_an_ignored_mutation_is_named_as_such() -> None:
    ignored = "(encode returned the message's frame unchanged: it ignored the mutation)"
    assert ignored in failure(IgnoresTheMutation, "mutation_visible")
    assert ignored in failure(IgnoresTheMutation, "mutation_replaces_key")


def _unbuildable(key: str) -> bytes:
    """The author's frame builder, which refuses a key its format cannot hold."""
    if "\n" in key:
        raise ValueError(f"header {key!r} cannot be written as a key=value line")
    request = Metadata(MessageType.Request, request_id=1)
    return KVCodec().on_error(request, LocalError(ErrorType.Unspecified, key))


def test_a_strategy_that_raises_is_named_not_the_codec() -> None:
    # A messages() strategy that draws what its own builder refuses raised inside the codec's
    # package, so the kit said "the codec raised ValueError ... only CodecError subclasses
    # may escape a codec's methods": the author looked for the fault in decode and encode.
    strategy = st.just("a\nb").map(_unbuildable)
    target = CodecTarget.discover(Fault, settings=SETTINGS, messages=strategy)
    reason = failure_of(target, "framing_concatenated")
    assert reason.startswith(
        "the messages strategy raised ValueError: header 'a\\nb' cannot be written as a "
        "key=value line (raised at "
    ), reason
    assert "in _unbuildable: raise ValueError(" in reason
    assert "while it generated a message, before the codec was called" in reason
    assert "only CodecError subclasses may escape" not in reason


class IgnoresANewIdAlone(Fault):
    """Returns the frame as it came when there is no mutation, whatever ``request_id`` says."""

    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        if not mutation:
            return message.frame
        return super().encode(message, mutation, request_id=request_id)


def test_an_ignored_request_id_is_named_as_such() -> None:
    # Was "encode(message, request_id=0) re-decodes with request id 1": true, but not why
    # nor what it breaks.
    reason = failure(IgnoresANewIdAlone, "rewrite_request_id")
    assert "(encode returned the message's frame unchanged: it ignored request_id)" in reason
    assert "an engine sharing the upstream connection never matches the reply" in reason


class LeavesTheFrame(Fault):
    """Copies the frame out of the buffer and leaves it there (no ``take_frame``)."""

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        before = bytes(buffer)
        result = super().decode(buffer)
        buffer[:0] = before[: len(before) - len(buffer)]
        return result


def test_a_frame_left_in_the_buffer_points_at_take_frame() -> None:
    reason = failure(LeavesTheFrame, "framing_whole")
    assert "it consumed 0 bytes but metadata.frame holds" in reason
    assert "(take_frame(buffer, size) removes it and returns it)" in reason


class TakesThenRaises(Fault):
    """Takes a frame with bad headers off the buffer, then raises."""

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        try:
            return super().decode(buffer)
        except CodecError as exc:
            if exc.frame_size:
                del buffer[: exc.frame_size]
            raise


def test_a_frame_consumed_before_the_error_points_at_raising_first() -> None:
    reason = failure(TakesThenRaises, "bad_input_consumes_nothing")
    assert " bytes; a decode error must leave the buffer as it was (raise before take_frame: " in (
        reason
    )
