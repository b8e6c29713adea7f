"""Round trip: encode with no mutation gives the original bytes; mutations land correctly."""

from __future__ import annotations

from dataclasses import dataclass

from metaprotocol_sdk.codec import NeedData
from metaprotocol_sdk.enums import MessageType
from metaprotocol_sdk.errors import CodecError, MutationError
from metaprotocol_sdk.metadata import EMPTY_MUTATION, Metadata
from metaprotocol_sdk.testing.golden import Sample
from metaprotocol_sdk.testing.hexdump import compare, hexdump

from ._support import (
    STREAM_FRAMES,
    call_decode,
    decode_whole,
    encode_bytes,
    fail,
    for_each_sample,
    labelled,
    reference,
    run_property,
    same_metadata,
)
from .base import CheckContext, CheckSkipped, check


def _identity_prop(ctx: CheckContext, sample: Sample) -> None:
    original = reference(ctx, sample)
    encoder = ctx.target.new_codec(sample.options)
    calls = {
        "encode(message)": lambda: encoder.encode(original),
        "encode(message, {})": lambda: encoder.encode(original, EMPTY_MUTATION),
        "encode(message, None, request_id=None)": lambda: encoder.encode(
            original, None, request_id=None
        ),
    }
    for what, call in calls.items():
        try:
            data = encode_bytes(encoder, call, what)
        except CodecError as exc:
            fail(f"{what} raised {type(exc).__name__}: {exc}")
        if data != sample.frame:
            fail(f"{what} changed the message: " + compare(sample.frame, data))
        again = decode_whole(ctx.target.new_codec(sample.options), data, f"{what} output")
        diff = same_metadata(original, again)
        if diff:
            fail(f"{what} output decodes differently: {diff}")


@check("roundtrip_identity", "roundtrip")
def roundtrip_identity(ctx: CheckContext) -> None:
    """encode() with no or an empty mutation returns the original bytes, which decode the same."""
    for_each_sample(ctx, lambda sample: _identity_prop(ctx, sample))


@check("roundtrip_identity_unusual", "roundtrip")
def roundtrip_identity_unusual(ctx: CheckContext) -> None:
    """Unusual but legal frames (reserved bits, duplicate keys, ...) also encode byte for byte.

    The frames come from the codec's ``unusual_messages`` strategy: content a codec that
    rebuilds the frame from what it decoded, instead of copying it, would change.
    """
    unusual = ctx.target.unusual
    if unusual is None:
        raise CheckSkipped(
            "the codec ships no unusual_messages strategy (valid frames with reserved bits "
            "set, duplicate keys or non-canonical encodings), so identity is only checked on "
            "the golden vectors and ordinary messages"
        )
    run_property(
        ctx,
        unusual,
        lambda sample: labelled(sample, lambda s: _identity_prop(ctx, s)),
        ctx.target.settings.examples,
    )


@dataclass
class _Mutated:
    original: Metadata
    encoded: bytes


class _Tally:
    """Counts messages that could take the mutation, to skip (with a reason) when none could."""

    def __init__(self) -> None:
        self.applied = 0
        self.refused: list[str] = []

    def finish(self) -> None:
        if self.applied == 0:
            why = "; ".join(self.refused[:3]) or "no request (or response) messages to mutate"
            raise CheckSkipped(f"no message accepted a mutation: {why}")


def _mutate(ctx: CheckContext, sample: Sample, tally: _Tally) -> _Mutated | None:
    original = reference(ctx, sample)
    caps = ctx.target.codec.capabilities
    if original.message_type is MessageType.Heartbeat:
        return None
    if not original.message_type.is_request_side and not caps.response_mutation:
        return None
    encoder = ctx.target.new_codec(sample.options)
    mutation = ctx.target.mutation
    try:
        encoded = encode_bytes(encoder, lambda: encoder.encode(original, mutation), "encode")
    except MutationError as exc:
        tally.refused.append(f"{original.message_type.name}: {exc}")
        return None
    except CodecError as exc:
        fail(f"encode(message, {dict(mutation)!r}) raised {type(exc).__name__}: {exc}")
    tally.applied += 1
    return _Mutated(original, encoded)


def _redecode(ctx: CheckContext, sample: Sample, mutated: _Mutated) -> Metadata:
    return decode_whole(
        ctx.target.new_codec(sample.options),
        mutated.encoded,
        f"the mutated message (mutation {dict(ctx.target.mutation)!r})",
    )


@check("mutation_visible", "roundtrip", requires="mutation")
def mutation_visible(ctx: CheckContext) -> None:
    """After encode(message, mutation) and a re-decode, the mutated keys are visible."""
    tally = _Tally()

    def prop(sample: Sample) -> None:
        mutated = _mutate(ctx, sample, tally)
        if mutated is None:
            return
        again = _redecode(ctx, sample, mutated)
        for key, value in ctx.target.mutation.items():
            if again.attributes.get(key) != value:
                unchanged = (
                    " (encode returned the message's frame unchanged: it ignored the mutation)"
                    if mutated.encoded == mutated.original.frame
                    else ""
                )
                fail(
                    f"mutation {key}={value!r} is not visible after re-decode "
                    f"(got {again.attributes.get(key)!r}){unchanged}; attributes: "
                    f"{again.attributes!r}; encode must write the mutation's keys where decode "
                    "reads attributes, or raise MutationError for a message that cannot carry "
                    f"them\nencoded:\n{hexdump(mutated.encoded)}"
                )
        for key, value in mutated.original.attributes.items():
            if key not in ctx.target.mutation and again.attributes.get(key) != value:
                fail(f"attribute {key}={value!r} was lost or changed by the mutation")
        diff = same_metadata(
            mutated.original, again, ignore=("attributes", "size", "header_size", "body_size")
        )
        if diff:
            fail(f"the mutation changed other fields: {diff}")

    for_each_sample(ctx, prop)
    tally.finish()


@check("mutation_body_unchanged", "roundtrip", requires="mutation")
def mutation_body_unchanged(ctx: CheckContext) -> None:
    """A mutation leaves the body (the codec's ``payload`` hook, if shipped) byte-identical."""
    tally = _Tally()
    payload = ctx.target.payload or (lambda metadata: metadata.body)

    def prop(sample: Sample) -> None:
        mutated = _mutate(ctx, sample, tally)
        if mutated is None:
            return
        again = _redecode(ctx, sample, mutated)
        before, after = bytes(payload(mutated.original)), bytes(payload(again))
        if before != after:
            fail("the mutation changed the body: " + compare(before, after, what="bodies"))

    for_each_sample(ctx, prop)
    tally.finish()


@check("mutation_length_fields", "roundtrip", requires="mutation")
def mutation_length_fields(ctx: CheckContext) -> None:
    """Length fields are fixed after a mutation: a re-decode frames exactly the encoded bytes."""
    tally = _Tally()

    def prop(sample: Sample) -> None:
        mutated = _mutate(ctx, sample, tally)
        if mutated is None:
            return
        encoded = mutated.encoded
        stream = encoded + sample.frame
        buffer = bytearray(stream)
        codec = ctx.target.new_codec(sample.options)
        try:
            first = call_decode(codec, buffer)
        except CodecError as exc:
            fail(
                f"the mutated message, followed by the original, raised {type(exc).__name__}: "
                f"{exc}\nstream:\n{hexdump(stream, mark=len(encoded))}"
            )
        if isinstance(first, NeedData):
            fail(
                f"the mutated message's length fields announce more than the {len(encoded)} "
                f"bytes encode wrote ({first!r})\nencoded:\n{hexdump(encoded)}"
            )
        if first.frame != encoded:
            fail(
                f"re-decoding framed {first.size} bytes but encode wrote {len(encoded)}: a "
                "length field was not fixed after the mutation\n"
                + compare(encoded, first.frame, what="framed bytes")
            )
        second = call_decode(codec, buffer)
        if not isinstance(second, Metadata) or second.frame != sample.frame or buffer:
            fail(f"the original message after the mutated one decoded as {second!r}")

    for_each_sample(ctx, prop)
    tally.finish()


@check("rewrite_request_id", "roundtrip", requires="rewrite_request_id")
def rewrite_request_id(ctx: CheckContext) -> None:
    """encode(message, request_id=N) changes the request id and nothing else.

    Ids 1 and the codec's ``max_request_id`` (the range an engine allocates from) round-trip.
    Stream frames are left out: the engine never rewrites their ids.
    """
    seen = 0

    def prop(sample: Sample) -> None:
        nonlocal seen
        original = reference(ctx, sample)
        if original.message_type is MessageType.Heartbeat or original.message_type in STREAM_FRAMES:
            return
        seen += 1
        encoder = ctx.target.new_codec(sample.options)
        new_id = original.request_id - 1 if original.request_id > 0 else original.request_id + 1
        same = encode_bytes(
            encoder, lambda: encoder.encode(original, request_id=original.request_id), "encode"
        )
        if same != sample.frame:
            fail(
                "encode(message, request_id=<the same id>) changed the bytes: "
                + compare(sample.frame, same)
            )
        data = encode_bytes(encoder, lambda: encoder.encode(original, request_id=new_id), "encode")
        again = decode_whole(ctx.target.new_codec(sample.options), data, "the re-id'd message")
        if again.request_id != new_id:
            ignored = (
                " (encode returned the message's frame unchanged: it ignored request_id)"
                if data == sample.frame
                else ""
            )
            fail(
                f"encode(message, request_id={new_id}) re-decodes with request id "
                f"{again.request_id}{ignored}: an engine sharing the upstream connection never "
                f"matches the reply\nencoded:\n{hexdump(data)}"
            )
        diff = same_metadata(original, again, ignore=("request_id", "size", "header_size"))
        if diff:
            fail(f"rewriting the request id changed other fields: {diff}")
        if bytes(again.body) != bytes(original.body):
            fail("rewriting the request id changed the body: " + compare(original.body, again.body))
        # The engine allocates upstream ids in 1..max_request_id: both ends must fit the field.
        for edge in sorted({1, type(encoder).max_request_id}):
            data = encode_bytes(
                encoder,
                lambda: encoder.encode(original, request_id=edge),  # noqa: B023 - called at once
                f"encode(request_id={edge}) (max_request_id={type(encoder).max_request_id})",
            )
            again = decode_whole(
                ctx.target.new_codec(sample.options), data, f"the message re-id'd to {edge}"
            )
            if again.request_id != edge:
                fail(
                    f"encode(message, request_id={edge}) re-decodes with request id "
                    f"{again.request_id}: max_request_id={type(encoder).max_request_id} "
                    f"promises the engine ids up to it\nencoded:\n{hexdump(data)}"
                )

    for_each_sample(ctx, prop)
    if seen == 0:
        raise CheckSkipped("no non-heartbeat message to rewrite the request id of")
