"""Encode calls the engine combines: a mutation with a new request id, a mutation that
replaces keys the message already carries."""

from __future__ import annotations

from collections.abc import Mapping

from metaprotocol_sdk.enums import MessageType
from metaprotocol_sdk.errors import CodecError, MutationError
from metaprotocol_sdk.metadata import Metadata
from metaprotocol_sdk.testing.golden import Sample
from metaprotocol_sdk.testing.hexdump import compare, hexdump

from ._support import decode_whole, encode_bytes, fail, for_each_sample, reference, same_metadata
from .base import CheckContext, CheckSkipped, check
from .roundtrip import _Tally

#: The value written over an existing key: plain ASCII, so any protocol can carry it.
REPLACED = "kit-replaced"
#: Fields a mutation may change besides the attributes.
_SIZES = ("size", "header_size", "body_size")


def _mutable(ctx: CheckContext, metadata: Metadata) -> bool:
    if metadata.message_type is MessageType.Heartbeat:
        return False
    return metadata.message_type.is_request_side or ctx.target.codec.capabilities.response_mutation


def _encode(
    ctx: CheckContext,
    sample: Sample,
    message: Metadata,
    mutation: Mapping[str, str],
    tally: _Tally,
    request_id: int | None = None,
) -> bytes | None:
    """``encode(message, mutation[, request_id])``; ``None`` when it raises MutationError."""
    encoder = ctx.target.new_codec(sample.options)
    what = f"encode(message, {dict(mutation)!r}" + (
        ")" if request_id is None else f", request_id={request_id})"
    )
    try:
        data = encode_bytes(
            encoder, lambda: encoder.encode(message, mutation, request_id=request_id), what
        )
    except MutationError as exc:
        tally.refused.append(f"{message.message_type.name}: {exc}")
        return None
    except CodecError as exc:
        fail(f"{what} raised {type(exc).__name__}: {exc}")
    tally.applied += 1
    return data


def _visible(
    ctx: CheckContext, before: Metadata, after: Metadata, mutation: Mapping[str, str], data: bytes
) -> None:
    """Fail unless ``after`` is ``before`` with ``mutation`` written over its attributes."""
    for key, value in mutation.items():
        if after.attributes.get(key) != value:
            fail(
                f"after the mutation {key}={value!r}, re-decoding gives "
                f"{key}={after.attributes.get(key)!r} (it was {before.attributes.get(key)!r})"
                f"\nencoded:\n{hexdump(data)}"
            )
    written = {key.lower() for key in mutation}  # attribute keys are case-insensitive
    for key, value in before.attributes.items():
        if key.lower() not in written and after.attributes.get(key) != value:
            fail(f"attribute {key}={value!r} was lost or changed by the mutation {mutation!r}")
    payload = ctx.target.payload or (lambda metadata: metadata.body)
    old, new = bytes(payload(before)), bytes(payload(after))
    if old != new:
        fail("the mutation changed the body: " + compare(old, new, what="bodies"))


@check("mutation_with_request_id", "roundtrip", requires=("mutation", "rewrite_request_id"))
def mutation_with_request_id(ctx: CheckContext) -> None:
    """encode(message, mutation, request_id=N) writes both: the new id and the mutated keys.

    This is the engine's shared-connection path: a mutated request gets an upstream id, and
    the reply is matched by that id.
    """
    tally = _Tally()

    def prop(sample: Sample) -> None:
        original = reference(ctx, sample)
        if not _mutable(ctx, original):
            return
        new_id = original.request_id - 1 if original.request_id > 0 else original.request_id + 1
        mutation = ctx.target.mutation
        data = _encode(ctx, sample, original, mutation, tally, request_id=new_id)
        if data is None:
            return
        again = decode_whole(
            ctx.target.new_codec(sample.options), data, "the mutated, re-id'd message"
        )
        if again.request_id != new_id:
            fail(
                f"encode(message, mutation, request_id={new_id}) re-decodes with request id "
                f"{again.request_id} (the original id was {original.request_id}): an engine "
                f"sharing the upstream connection never matches the reply\nencoded:\n"
                f"{hexdump(data)}"
            )
        _visible(ctx, original, again, mutation, data)
        diff = same_metadata(original, again, ignore=("attributes", "request_id", *_SIZES))
        if diff:
            fail(f"the mutation with a new request id changed other fields: {diff}")

    for_each_sample(ctx, prop)
    tally.finish()


@check("mutation_replaces_key", "roundtrip", requires="mutation")
def mutation_replaces_key(ctx: CheckContext) -> None:
    """A mutation of a key the message already carries replaces its value, visibly.

    Keys the message was decoded with (one at a time; a key the codec cannot write may raise
    MutationError) and the keys of a first mutation, written again with new values.
    """
    tally = _Tally()
    replaced = 0

    def prop(sample: Sample) -> None:
        nonlocal replaced
        original = reference(ctx, sample)
        if not _mutable(ctx, original):
            return
        for key, value in list(original.attributes.items()):
            if value == REPLACED:
                continue
            mutation = {key: REPLACED}
            data = _encode(ctx, sample, original, mutation, tally)
            if data is None:
                continue
            again = decode_whole(ctx.target.new_codec(sample.options), data, "the mutated message")
            _visible(ctx, original, again, mutation, data)
            replaced += 1
        first = _encode(ctx, sample, original, ctx.target.mutation, tally)
        if first is None:
            return
        middle = decode_whole(ctx.target.new_codec(sample.options), first, "the mutated message")
        mutation = {key: f"{value}-{REPLACED}" for key, value in ctx.target.mutation.items()}
        data = _encode(ctx, sample, middle, mutation, tally)
        if data is None:
            fail(
                f"encode accepted the mutation {dict(ctx.target.mutation)!r} but refused to "
                f"replace the same keys in its output with {mutation!r}"
            )
        again = decode_whole(ctx.target.new_codec(sample.options), data, "the re-mutated message")
        _visible(ctx, middle, again, mutation, data)
        replaced += 1

    for_each_sample(ctx, prop)
    tally.finish()
    if replaced == 0:
        raise CheckSkipped("no message had a key a mutation could replace")
    ctx.details["replaced"] = replaced
