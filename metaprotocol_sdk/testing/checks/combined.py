"""Encode calls the engine combines: a mutation with a new request id, a mutation that
replaces keys the message already carries."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from metaprotocol_sdk.codec import Codec, Encoded, LocalError, join_encoded
from metaprotocol_sdk.enums import ErrorType, MessageType
from metaprotocol_sdk.errors import CodecError, MutationError
from metaprotocol_sdk.metadata import Metadata
from metaprotocol_sdk.testing.golden import Sample
from metaprotocol_sdk.testing.hexdump import compare, hexdump

from ._support import (
    STREAM_FRAMES,
    decode_whole,
    encode_bytes,
    fail,
    for_each_sample,
    reference,
    same_metadata,
)
from .base import CheckContext, CheckFailed, CheckSkipped, check
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
            ignored = (
                " (encode returned the message's frame unchanged: it ignored the mutation)"
                if data == before.frame
                else ""
            )
            fail(
                f"after the mutation {key}={value!r}, re-decoding gives "
                f"{key}={after.attributes.get(key)!r} (it was {before.attributes.get(key)!r})"
                f"{ignored}\nencoded:\n{hexdump(data)}"
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
    the reply is matched by that id. Stream frames are left out: the engine never rewrites
    their ids.
    """
    tally = _Tally()

    def prop(sample: Sample) -> None:
        original = reference(ctx, sample)
        if not _mutable(ctx, original) or original.message_type in STREAM_FRAMES:
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
    MutationError) and the keys of a first mutation, written again with new values, then
    again in another case: attributes ignore case, so a key equal ignoring case is replaced
    (a message left with both spellings would read two ways; a codec that refuses colliding
    keys refuses it on re-decoding).
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
        respelled = {
            key.swapcase(): f"{value}-case"
            for key, value in ctx.target.mutation.items()
            if key.swapcase() != key
        }
        if not respelled:
            return
        data = _encode(ctx, sample, middle, respelled, tally)
        if data is None:
            fail(
                f"encode accepted the mutation {dict(ctx.target.mutation)!r} but refused to "
                f"replace the same keys in another case in its output with {respelled!r}"
            )
        again = decode_whole(
            ctx.target.new_codec(sample.options),
            data,
            f"the message mutated with {dict(ctx.target.mutation)!r}, then with the same keys "
            f"in another case, {respelled!r} (a key left in both spellings?)",
        )
        _visible(ctx, middle, again, respelled, data)

    for_each_sample(ctx, prop)
    tally.finish()
    if replaced == 0:
        raise CheckSkipped("no message had a key a mutation could replace")
    ctx.details["replaced"] = replaced


#: A mutation value whose UTF-8 bytes outnumber its characters (2-, 3- and 4-byte sequences).
NON_ASCII = "z\u00fcrich \u6771\u4eac \U0001f600"


@check("mutation_any_value", "roundtrip", requires="mutation")
def mutation_any_value(ctx: CheckContext) -> None:
    """A mutation's value may be any text: empty, or non-ASCII, written as it is.

    Routes and filters write what they are configured with and what clients sent: an empty
    value blanks a key a client set (``x-user: ""`` must not leave the client's ``admin``),
    and non-ASCII text has more UTF-8 bytes than characters (a length counted in characters
    corrupts the frame). Each mutable message gets, one at a time, a new key (the first of the
    kit's mutation) with the non-ASCII value and with an empty value, and each key it carries
    (that the codec replaces with a plain value) set to empty; each is written and re-decodes
    as exactly that (or raises MutationError).
    """
    tally = _Tally()
    key = next(iter(ctx.target.mutation))

    def prop(sample: Sample) -> None:
        original = reference(ctx, sample)
        if not _mutable(ctx, original):
            return
        mutations = [{key: NON_ASCII}, {key: ""}]
        mutations += [
            {name: ""}
            for name, value in original.attributes.items()
            if value and _replaces(ctx, sample, original, name)
        ]
        for mutation in mutations:
            data = _encode(ctx, sample, original, mutation, tally)
            if data is None:
                continue
            what = f"the message mutated with {mutation!r}"
            try:
                again = decode_whole(ctx.target.new_codec(sample.options), data, what)
                _visible(ctx, original, again, mutation, data)
            except CheckFailed as exc:
                fail(
                    f"{exc}\nA mutation's value is any text, written as it is (or refused with "
                    "MutationError): an empty value blanks the key (never skipped, which leaves "
                    "a client's own value for the server), and a length field counts the "
                    "value's UTF-8 bytes, not its characters"
                )

    for_each_sample(ctx, prop)
    tally.finish()


#: Mutation keys beyond ASCII: 2-, 3- and 4-byte UTF-8 sequences (a key length counted in
#: characters corrupts the frame), and letters whose case ``bytes.lower()`` does not fold.
NON_ASCII_KEYS = ("x-mp-z\u00fcrich-\u6771\u4eac-\U0001f600", "x-mp-\u00fcber-\u0436")
#: The value written under them: plain ASCII, so that only the key is new.
KEY_VALUE = "kit-key"
#: An ASCII key written with them: where the codec does not replace it in another case, only
#: mutation_replaces_key fails.
_ASCII_KEY = "x-mp-kit-case"
#: The rule, for the failure messages.
_ANY_KEY = (
    "A mutation's key is any text (a route or filter sets any key, YAML keys may be "
    "non-ASCII), written as it is or refused with MutationError: its length field counts its "
    "UTF-8 bytes, not its characters, and it is never dropped or mangled; attributes ignore "
    "case, so the key in another case (non-ASCII letters too) replaces it"
)


@check("mutation_any_key", "roundtrip", requires="mutation")
def mutation_any_key(ctx: CheckContext) -> None:
    """A mutation's key may be any text: non-ASCII keys are written as they are.

    Each mutable message gets each of :data:`NON_ASCII_KEYS` set to a plain value (values are
    mutation_any_value's), one at a time, then both at once; each re-decodes with exactly
    those attributes (or raises MutationError). The message with the second key written then
    gets it in upper case, which must replace it (where the codec replaces an ASCII key in
    another case).
    """
    tally = _Tally()

    def written(sample: Sample, before: Metadata, mutation: dict[str, str]) -> None:
        data = _encode(ctx, sample, before, mutation, tally)
        if data is None:
            return
        what = f"the message mutated with {mutation!r}"
        try:
            again = decode_whole(ctx.target.new_codec(sample.options), data, what)
            _visible(ctx, before, again, mutation, data)
        except CheckFailed as exc:
            fail(f"{exc}\n{_ANY_KEY}")

    def prop(sample: Sample) -> None:
        original = reference(ctx, sample)
        if not _mutable(ctx, original):
            return
        for key in NON_ASCII_KEYS:
            written(sample, original, {key: KEY_VALUE})
        written(sample, original, dict.fromkeys(NON_ASCII_KEYS, f"{KEY_VALUE}-both"))
        key = NON_ASCII_KEYS[1]
        first = _encode(ctx, sample, original, {key: KEY_VALUE, _ASCII_KEY: KEY_VALUE}, tally)
        if first is None:
            return
        middle = decode_whole(ctx.target.new_codec(sample.options), first, "the mutated message")
        if not _replaces(ctx, sample, middle, _ASCII_KEY.upper()):
            return  # not even an ASCII key in another case: mutation_replaces_key reports it
        upper = {key.upper(): f"{KEY_VALUE}-upper"}
        if _encode(ctx, sample, middle, upper, _Tally()) is None:
            fail(
                f"encode wrote the key {key!r} but refused to replace it in its output with "
                f"{upper!r}\n{_ANY_KEY}"
            )
        written(sample, middle, upper)

    for_each_sample(ctx, prop)
    tally.finish()
    ctx.details.update(written=tally.applied, refused=len(tally.refused))


#: Why the check below matters, for its failure messages.
_EACH_CALL = (
    "encode writes the message and the mutation it is given, every call: an engine applies "
    "a route's one mutation mapping to every request on a connection, and builds a new "
    "mapping per request when a filter or tracing adds keys (Python gives it the address of "
    "the last one freed), so a cache keyed by the mapping alone, or by its identity, hands a "
    "request another's headers"
)


@check("mutation_each_call", "roundtrip", requires="mutation")
def mutation_each_call(ctx: CheckContext) -> None:
    """encode writes each call's own message and mutation: one codec encodes a message with
    a mutation, another message with the same mapping, the message with that mapping changed
    in place, with new mappings each built after the last was dropped, and with a mapping of
    other keys (none of the earlier keys may come along).

    A codec may remember what it encoded for a mutation (a route applies the same one to
    every request), but never by the mapping's identity alone, nor for another message.
    """
    tally = _Tally()
    base = ctx.target.mutation
    other = f"{next(iter(base))}-other"
    alone = f"{next(iter(base))}-alone"

    def fresh(tag: str) -> dict[str, str]:
        return {key: f"{value}-{tag}" for key, value in base.items()}

    def prop(sample: Sample) -> None:
        original = reference(ctx, sample)
        if not _mutable(ctx, original):
            return
        variant = _encode(ctx, sample, original, {other: "1"}, tally)
        if variant is None:
            return
        second = decode_whole(ctx.target.new_codec(sample.options), variant, "the variant")
        codec = ctx.target.new_codec(sample.options)
        done: list[tuple[str, Metadata, dict[str, str], bytes]] = []

        def encode(what: str, message: Metadata, mutation: dict[str, str]) -> None:
            data = encode_bytes(codec, lambda: codec.encode(message, mutation), what)
            done.append((what, message, dict(mutation), data))

        try:
            mutation = fresh("a")
            encode("the message with a mutation", original, mutation)
            encode("another message with the same mapping", second, mutation)
            for key in mutation:
                mutation[key] += "-changed"
            encode("the message with that mapping changed in place", original, mutation)
            del mutation
            for tag in ("b", "c", "d"):  # each built where the last was freed, most likely
                encode(f"the message with a new mapping ({tag})", original, fresh(tag))
            # Keys of its own only: none of the earlier mappings' keys may come along.
            encode("the message with a mapping of other keys", original, {alone: "1"})
        except MutationError:
            return  # mutation_visible and capabilities_honored judge refusals
        except CodecError as exc:
            fail(f"encode raised {type(exc).__name__}: {exc}")
        for index, (what, message, mutation, data) in enumerate(done):
            try:
                again = decode_whole(ctx.target.new_codec(sample.options), data, what)
                _visible(ctx, message, again, mutation, data)
                _nothing_added(message, again, mutation, data)
            except CheckFailed as exc:
                earlier = ", then ".join(w for w, *_ in done[:index]) or "nothing"
                fail(f"on one codec, after {earlier}: {what} {mutation!r}: {exc}\n{_EACH_CALL}")

    for_each_sample(ctx, prop)
    tally.finish()


def _nothing_added(
    before: Metadata, after: Metadata, mutation: Mapping[str, str], data: bytes
) -> None:
    """Fail when ``after`` has a key neither ``before`` nor ``mutation`` had: an earlier call's
    key that came along."""
    known = {key.lower() for key in (*before.attributes, *mutation)}
    added = [key for key in after.attributes if key.lower() not in known]
    if added:
        fail(
            f"the encoded message carries {', '.join(map(repr, added))}, which neither the "
            f"message nor the mutation {dict(mutation)!r} had\nencoded:\n{hexdump(data)}"
        )


def _replaces(ctx: CheckContext, sample: Sample, message: Metadata, key: str) -> bool:
    """Whether the codec replaces ``key`` with a plain value (mutation_replaces_key reports
    a codec that does not)."""
    encoder = ctx.target.new_codec(sample.options)
    try:
        data = join_encoded(encoder.encode(message, {key: REPLACED}))
        again = ctx.target.new_codec(sample.options).decode(bytearray(data))
    except Exception:
        return False
    return isinstance(again, Metadata) and again.attributes.get(key) == REPLACED


def _snapshot(message: Metadata) -> tuple[dict[str, Any], bytes, dict[str, Any]]:
    """What an engine reads from a request or reply after handing it to the codec
    (``codec_state`` is the codec's own, a cache it may fill)."""
    return (message.to_dict(), bytes(message.frame), dict(message.values))


@check("encode_leaves_message", "roundtrip")
def encode_leaves_message(ctx: CheckContext) -> None:
    """encode, on_error and heartbeat_reply leave the Metadata as it was, and encode again
    gives the same bytes; after all of them, each gives what it gives on a message fresh from
    decode (a cache in the message keyed by less than all of encode's arguments does not).

    An engine keeps the request after encoding it: it matches the reply by the request's id
    (an upstream id goes only to the wire), encodes it again for a retry or a mirror, and logs
    it; replies are encoded once per downstream. Every call an engine makes: ``encode`` with
    no mutation, a mutation, a new request id and both, ``on_error`` and ``heartbeat_reply``.
    """
    seen = 0

    def prop(sample: Sample) -> None:
        nonlocal seen
        message = reference(ctx, sample)
        before = _snapshot(message)
        codec = ctx.target.new_codec(sample.options)
        calls = _engine_calls(ctx, codec, message)
        for what, call in calls.items():
            outputs = []
            for _ in range(2):
                try:
                    result = call()
                except MutationError:
                    break
                except Exception as exc:
                    fail(f"{what} raised {type(exc).__name__}: {exc}")
                outputs.append(None if result is None else join_encoded(result))
                after = _snapshot(message)
                if after != before:
                    changed = [
                        name
                        for name, a, b in zip(
                            ("metadata", "frame", "values"),
                            before,
                            after,
                            strict=True,
                        )
                        if a != b
                    ]
                    diff = same_metadata_dicts(before[0], after[0])
                    fail(
                        f"{what} changed the message it was given ({', '.join(changed)}"
                        + (f": {diff}" if diff else "")
                        + "): an engine reads the request after encoding it (the reply is "
                        "matched by its id and re-labelled with it) and encodes it again for "
                        f"retries and mirrors\nmessage:\n{hexdump(before[1])}"
                    )
            seen += 1
            if len(outputs) == 2 and outputs[0] != outputs[1]:
                first, second = outputs
                fail(
                    f"{what} called twice on the same message gave different bytes: "
                    + compare(first or b"", second or b"")
                )
        # Each call once more, on a message and codec fresh from decode: what the calls made
        # before it (a retry's new id, a mirror's mutation) must not show in its bytes.
        for what, call in calls.items():
            try:
                again = join_encoded(call() or b"")
            except MutationError:
                continue
            except Exception as exc:
                fail(f"{what} raised {type(exc).__name__}: {exc}")
            fresh_message = reference(ctx, sample)
            fresh_call = _engine_calls(ctx, ctx.target.new_codec(sample.options), fresh_message)
            wanted = join_encoded(fresh_call[what]() or b"")
            if again != wanted:
                fail(
                    f"{what}, after the other calls on the same message, gave other bytes than "
                    "on a message fresh from decode (an engine encodes a request again for a "
                    "retry, with a new id on another connection, and for a mirror: a cache in "
                    "the message must be keyed by all of encode's arguments): "
                    + compare(wanted, again)
                )

    for_each_sample(ctx, prop)
    if seen == 0:
        raise CheckSkipped("no message to encode")


def _engine_calls(
    ctx: CheckContext, codec: Codec, message: Metadata
) -> dict[str, Callable[[], Encoded | None]]:
    """Every call an engine makes with ``message`` on ``codec``, by name, in the order an engine
    makes them: ``encode`` unchanged, with a new id, with the kit's mutation, with both;
    ``on_error`` of a request, ``heartbeat_reply`` of a heartbeat."""
    caps = ctx.target.codec.capabilities
    new_id = message.request_id - 1 if message.request_id > 0 else message.request_id + 1
    calls: dict[str, Callable[[], Encoded | None]] = {
        "encode(message)": lambda: codec.encode(message)
    }
    beat = message.message_type is MessageType.Heartbeat
    if caps.rewrite_request_id and not beat:
        calls[f"encode(message, request_id={new_id})"] = lambda: codec.encode(
            message, request_id=new_id
        )
    if caps.mutation and _mutable(ctx, message):
        mutation = ctx.target.mutation
        calls[f"encode(message, {dict(mutation)!r})"] = lambda: codec.encode(message, mutation)
        if caps.rewrite_request_id:
            calls[f"encode(message, {dict(mutation)!r}, request_id={new_id})"] = lambda: (
                codec.encode(message, mutation, request_id=new_id)
            )
    if caps.error_reply and message.message_type.is_request_side and not beat:
        error = LocalError(ErrorType.Unspecified, "conformance kit")
        calls["on_error(message)"] = lambda: codec.on_error(message, error)
    if caps.heartbeat and beat:
        calls["heartbeat_reply(message)"] = lambda: codec.heartbeat_reply(message)
    return calls


def same_metadata_dicts(a: dict[str, Any], b: dict[str, Any]) -> str:
    """The fields where two ``Metadata.to_dict()`` summaries differ."""
    return "; ".join(f"{k}: {a[k]!r} -> {b.get(k)!r}" for k in a if a[k] != b.get(k))


@check("encode_buffers_kept", "roundtrip")
def encode_buffers_kept(ctx: CheckContext) -> None:
    """What encode returned stays the same after the next encode call on the same codec.

    An engine queues the buffers ``encode`` returns for a large message and writes them when
    the loop has delivered every read, after encoding more messages: a codec that returns a
    view of a scratch buffer it reuses overwrites the queued bytes. Each pair of calls:
    a new request id, then another; a mutation, then another (and both with ids).
    """
    caps = ctx.target.codec.capabilities
    seen = 0

    def prop(sample: Sample) -> None:
        nonlocal seen
        message = reference(ctx, sample)
        if message.message_type is MessageType.Heartbeat:
            return
        codec = ctx.target.new_codec(sample.options)
        # Small new ids, which any id field carries (a wrong max_request_id is
        # rewrite_request_id's to find, not this check's).
        ids = tuple(i for i in (1, 2, 3) if i != message.request_id)[:2]
        calls: list[tuple[Mapping[str, str] | None, int | None]] = []
        if caps.rewrite_request_id:
            calls += [(None, i) for i in ids]
        if caps.mutation and _mutable(ctx, message):
            for n, i in enumerate(ids):
                mutation = {key: f"{value}-{n}" for key, value in ctx.target.mutation.items()}
                calls.append((mutation, None))
                if caps.rewrite_request_id:
                    calls.append((mutation, i))
        previous: tuple[str, Encoded, bytes] | None = None
        for written, request_id in calls:
            what = f"encode(message, {written!r}, request_id={request_id})"
            try:
                raw = codec.encode(message, written, request_id=request_id)
            except MutationError:
                continue
            except Exception as exc:
                fail(f"{what} raised {type(exc).__name__}: {exc}")
            seen += 1
            if previous is not None:
                before_what, before_raw, before = previous
                after = join_encoded(before_raw)
                if after != before:
                    fail(
                        f"what {before_what} returned changed when {what} ran on the same "
                        "codec: it returns a buffer the codec reuses, and an engine writes "
                        "queued buffers after encoding more messages: " + compare(before, after)
                    )
            previous = (what, raw, bytes(join_encoded(raw)))

    for_each_sample(ctx, prop)
    if seen == 0:
        raise CheckSkipped(
            "nothing encodes two ways: the codec declares neither mutation nor "
            "rewrite_request_id, or refused every mutation"
        )


@check("capabilities_honored", "roundtrip")
def capabilities_honored(ctx: CheckContext) -> None:
    """A declared capability is used: ``mutation`` is taken by some request, ``response_mutation``
    by some reply, ``peek_reply`` peeks some reply.

    The other checks skip where a codec refuses every mutation (``MutationError``) or peeks
    nothing; an engine accepts routes by the declared capabilities
    (``active_capabilities``), so a codec that declares one and never honours it skips every
    route's mutations silently, or pays for peeking for nothing.
    """
    offered = {"mutation": 0, "response_mutation": 0, "peek_reply": 0}
    honoured = dict.fromkeys(offered, 0)
    declared: set[str] = set()
    #: The first message each capability was offered, for the failure message.
    first: dict[str, bytes] = {}

    def prop(sample: Sample) -> None:
        message = reference(ctx, sample)
        codec = ctx.target.new_codec(sample.options)
        caps = codec.active_capabilities
        kind = message.message_type
        if kind is MessageType.Heartbeat:
            return
        if kind.is_request_side:
            name = "mutation"
        elif kind in (MessageType.Response, MessageType.Error):
            name = "response_mutation"
        else:
            name = ""
        if name and getattr(caps, name):
            declared.add(name)
            offered[name] += 1
            first.setdefault(name, sample.frame)
            try:
                encode_bytes(
                    codec, lambda: codec.encode(message, ctx.target.mutation), "encode(mutation)"
                )
            except MutationError:
                pass
            except CodecError as exc:
                fail(f"encode(message, mutation) raised {type(exc).__name__}: {exc}")
            else:
                honoured[name] += 1
        if caps.peek_reply and kind in (MessageType.Response, MessageType.Error):
            declared.add("peek_reply")
            offered["peek_reply"] += 1
            first.setdefault("peek_reply", sample.frame)
            buffer = bytearray(sample.frame)
            try:
                head = codec.peek_reply(buffer)
            except Exception as exc:
                fail(f"peek_reply raised {type(exc).__name__}: {exc}")
            if head is not None:
                honoured["peek_reply"] += 1

    for_each_sample(ctx, prop)
    if not declared:
        raise CheckSkipped("the codec declares none of mutation, response_mutation, peek_reply")
    for name in sorted(declared):
        if offered[name] and not honoured[name]:
            what = "peeked at none" if name == "peek_reply" else "refused the mutation for all"
            fail(
                f"the codec declares {name!r} but {what} of the {offered[name]} "
                f"{'replies' if name != 'mutation' else 'requests'} the kit tried; declare "
                "only what the codec does (active_capabilities narrows by options)\n"
                f"the first of them:\n{hexdump(first[name])}"
            )
    ctx.details.update(offered=offered, honoured=honoured)
