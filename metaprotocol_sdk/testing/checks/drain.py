"""The drain notice: the message a codec builds to tell its peer a connection is closing
(``Capabilities.drain_notice``), and how it recognises the peer's."""

from __future__ import annotations

from collections.abc import Callable

from metaprotocol_sdk.codec import Codec, LocalError
from metaprotocol_sdk.enums import ErrorType, MessageType
from metaprotocol_sdk.errors import CodecError
from metaprotocol_sdk.metadata import Metadata
from metaprotocol_sdk.testing.golden import Sample
from metaprotocol_sdk.testing.hexdump import hexdump

from . import replies as _after_the_heartbeat_checks  # noqa: F401 - registered first
from ._support import decode_whole, defining_class, fail, for_each_sample, reference
from .base import CheckContext, CheckSkipped, check

#: What an engine does with a notice, for the failure messages.
_ENGINE = (
    "an engine writes the notice to its clients when it drains, and stops sending new requests "
    "on an upstream connection whose peer sent it"
)
_METHODS = ("drain_notice", "is_drain_notice")


def _notice(codec: Codec) -> bytes:
    """``codec.drain_notice()``, which must be non-empty bytes."""
    try:
        notice = codec.drain_notice()
    except Exception as exc:
        fail(
            f"drain_notice() raised {type(exc).__name__}: {exc}; a codec declaring "
            f"drain_notice builds its notice from nothing ({_ENGINE})"
        )
    if not isinstance(notice, bytes | bytearray | memoryview) or not notice:
        fail(f"drain_notice() returned {notice!r}, expected the notice's bytes")
    return bytes(notice)


def _is_notice(codec: Codec, message: Metadata, what: str) -> bool:
    try:
        answer = codec.is_drain_notice(message)
    except Exception as exc:
        fail(
            f"is_drain_notice raised {type(exc).__name__}: {exc} on {what} (a "
            f"{message.message_type.name}); it answers for any decoded message"
        )
    if not isinstance(answer, bool):
        fail(f"is_drain_notice returned {answer!r} for {what}, expected True or False")
    return answer


@check("drain_notice_heartbeat", "errors", requires="drain_notice")
def drain_notice_heartbeat(ctx: CheckContext) -> None:
    """drain_notice() decodes as exactly one Heartbeat that needs no reply and that
    is_drain_notice recognises.

    A notice that needs a reply would have the peer answer every notice; one the codec does
    not recognise is never honoured when a peer of the same protocol sends it.
    """
    notice = _notice(ctx.target.new_codec())
    message = decode_whole(ctx.target.new_codec(), notice, "the drain notice")
    shown = f"\nnotice:\n{hexdump(notice)}"
    if message.message_type is not MessageType.Heartbeat:
        fail(
            f"the drain notice decodes as a {message.message_type.name}, expected a "
            f"Heartbeat (an engine routes any other message as traffic){shown}"
        )
    try:
        reply = ctx.target.new_codec().heartbeat_reply(message)
    except CodecError as exc:
        fail(f"heartbeat_reply raised {type(exc).__name__}: {exc} on the drain notice{shown}")
    if reply is not None:
        fail(
            "heartbeat_reply answers the drain notice: a notice needs no reply (the peer "
            f"would answer each one, on a connection that is closing){shown}\nreply:\n"
            f"{hexdump(bytes(reply))}"
        )
    if not _is_notice(ctx.target.new_codec(), message, "the drain notice"):
        fail(
            "is_drain_notice is False for the codec's own drain notice: a peer's notice is "
            f"never recognised, and an engine goes on sending requests to a closing peer{shown}"
        )
    ctx.details.update(notice_size=len(notice))


@check("drain_notice_stateless", "errors", requires="drain_notice")
def drain_notice_stateless(ctx: CheckContext) -> None:
    """drain_notice() gives the same bytes on any instance, before and after it decoded
    other messages, and the notice decodes after them as it does on a fresh codec.

    An engine builds the notice on whichever codec serves a connection, at any point of its
    traffic: like on_error, it depends on no parse state.
    """
    seen = 0

    def prop(sample: Sample) -> None:
        nonlocal seen
        seen += 1
        codec = ctx.target.new_codec(sample.options)
        fresh = _notice(ctx.target.new_codec(sample.options))
        before = _notice(codec)
        if before != fresh:
            fail(
                "two fresh codecs build different drain notices: it must depend on no "
                f"state\nfirst:\n{hexdump(fresh)}\nsecond:\n{hexdump(before)}"
            )
        decode_whole(codec, sample.frame)
        after = _notice(codec)
        if after != before:
            fail(
                "drain_notice() changed after the codec decoded this message: it must depend "
                f"on no parse state\nbefore:\n{hexdump(before)}\nafter:\n{hexdump(after)}"
            )
        alone = ctx.target.new_codec(sample.options)
        expected = _is_notice(alone, decode_whole(alone, fresh, "the drain notice"), "it")
        decoded = decode_whole(codec, fresh, "the drain notice after this message")
        if _is_notice(codec, decoded, "the drain notice after this message") != expected:
            fail(
                "is_drain_notice answers differently for the drain notice decoded after this "
                f"message than on a fresh codec ({expected} there): it depends on parse "
                f"state\nnotice:\n{hexdump(fresh)}"
            )

    for_each_sample(ctx, prop)
    ctx.details.update(messages=seen)


def _decoded_replies(ctx: CheckContext, sample: Sample, message: Metadata) -> list[Metadata]:
    """The codec's own replies to ``message``, decoded: its heartbeat reply, its error reply
    to a request; none of them is a drain notice."""
    codec = ctx.target.new_codec(sample.options)
    built: list[tuple[str, Callable[[], bytes | None]]] = []
    if message.message_type is MessageType.Heartbeat:
        built.append(("the heartbeat reply", lambda: codec.heartbeat_reply(message)))
    if message.message_type is MessageType.Request and codec.capabilities.error_reply:
        error = LocalError(ErrorType.BadRequest, "conformance kit")
        built.append(("the error reply", lambda: codec.on_error(message, error)))
    replies = []
    for what, build in built:
        try:
            reply = build()
        except CodecError:
            continue  # what the reply checks judge
        if reply:
            replies.append((what, bytes(reply)))
    return [
        decode_whole(ctx.target.new_codec(sample.options), data, what) for what, data in replies
    ]


@check("drain_notice_only_notices", "errors", requires="drain_notice")
def drain_notice_only_notices(ctx: CheckContext) -> None:
    """is_drain_notice is True for the messages that are notices (golden ``drain_notice:
    true``) and False for every other: requests, replies, errors, heartbeats and the codec's
    own heartbeat and error replies.

    An engine asks about every heartbeat: a codec that says True for a ping retires every
    connection at its first keep-alive.
    """
    notices = others = 0

    def prop(sample: Sample) -> None:
        nonlocal notices, others
        message = reference(ctx, sample)
        expected = bool(sample.expect.get("drain_notice", False))
        codec = ctx.target.new_codec(sample.options)
        if _is_notice(codec, message, "this message") != expected:
            if expected:
                fail(
                    "is_drain_notice is False for a message that is a drain notice (its "
                    "expect says drain_notice: true): a peer's notice is not honoured"
                )
            fail(
                f"is_drain_notice is True for a {message.message_type.name} that is not a drain "
                f"notice: {_ENGINE}, so this message would retire the connection (a codec "
                "that says True for every heartbeat retires each one at its first keep-alive)"
            )
        notices += expected
        others += not expected
        for reply in _decoded_replies(ctx, sample, message):
            if _is_notice(codec, reply, "the codec's reply to this message"):
                fail(
                    f"is_drain_notice is True for the codec's own reply to this message (a "
                    f"{reply.message_type.name}): {_ENGINE}, so a peer answering it would "
                    f"retire the connection\nreply:\n{hexdump(reply.frame)}"
                )

    for_each_sample(ctx, prop)
    ctx.details.update(notices=notices, others=others)


@check("drain_notice_needs_heartbeat", "errors", requires="drain_notice")
def drain_notice_needs_heartbeat(ctx: CheckContext) -> None:
    """A codec declaring drain_notice declares heartbeat too (a notice is a Heartbeat)."""
    codec = ctx.target.new_codec()
    for where, capabilities in (
        ("capabilities", type(codec).capabilities),
        ("active_capabilities", codec.active_capabilities),
    ):
        if capabilities.drain_notice and not capabilities.heartbeat:
            fail(
                f"the codec's {where} declare drain_notice without heartbeat: a drain notice "
                "decodes as a Heartbeat that needs no reply, and an engine handles heartbeats "
                "(answers them, asks is_drain_notice) only for a codec that declares them; "
                "declare heartbeat=True and implement heartbeat_reply\n"
                f"notice:\n{hexdump(_notice(codec))}"
            )


@check("drain_notice_declared", "errors")
def drain_notice_declared(ctx: CheckContext) -> None:
    """A codec that implements drain_notice or is_drain_notice declares the capability.

    Engines call them only for codecs declaring ``drain_notice``: undeclared, the notice is
    never sent and a peer's is never recognised. A subclass whose own ``capabilities`` leave
    out an inherited notice switches it off, which is skipped with a reason, as any
    undeclared capability is.
    """
    codec_type = ctx.target.codec
    if codec_type.capabilities.drain_notice:
        ctx.details.update(summary="drain_notice declared")
        return
    owners = {name: defining_class(codec_type, name) for name in _METHODS}
    overridden = {name: owner for name, owner in owners.items() if owner is not Codec}
    declared_in = defining_class(codec_type, "capabilities")
    undeclared = (
        "codec does not declare the 'drain_notice' capability (Capabilities.drain_notice=False)"
    )
    if not overridden:
        raise CheckSkipped(
            f"{undeclared} and overrides neither drain_notice nor is_drain_notice: it has no "
            "drain notice"
        )
    # Written beside (or below) the capabilities that leave them out: a forgotten flag.
    forgotten = {n: o for n, o in overridden.items() if issubclass(o, declared_in)}
    if not forgotten:
        inherited = " and ".join(f"{n} (from {o.__qualname__})" for n, o in overridden.items())
        raise CheckSkipped(
            f"{undeclared}: its capabilities, set in {declared_in.__qualname__}, switch off "
            f"the drain notice it inherits ({inherited}), which engines then never use"
        )
    try:
        shown = f"\nnotice:\n{hexdump(bytes(ctx.target.new_codec().drain_notice()))}"
    except Exception:
        shown = ""
    names = " and ".join(f"{n} (in {o.__qualname__})" for n, o in forgotten.items())
    fail(
        f"the codec implements {names} but does not declare the 'drain_notice' capability "
        f"(its capabilities are set in {declared_in.__qualname__}): engines call them only "
        "for codecs that declare it, so its notice is never sent and a peer's never "
        "recognised; declare drain_notice=True (with heartbeat=True) in Capabilities, or "
        f"remove them{shown}"
    )
