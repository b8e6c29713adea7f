"""Heartbeat requests: the ping a codec builds for an engine to send its peers
(``Capabilities.heartbeat_request``), and the peer's answer to it."""

from __future__ import annotations

from metaprotocol_sdk.codec import Codec
from metaprotocol_sdk.enums import MessageType
from metaprotocol_sdk.errors import CodecError
from metaprotocol_sdk.metadata import Metadata
from metaprotocol_sdk.testing.golden import Sample
from metaprotocol_sdk.testing.hexdump import hexdump

from . import drain as _after_the_drain_checks  # noqa: F401 - registered first
from ._support import decode_whole, defining_class, fail, for_each_sample
from .base import CheckContext, CheckSkipped, check

#: What an engine does with a ping, for the failure messages.
_ENGINE = (
    "an engine sends it on idle connections, to keep them open past the peer's idle check and "
    "to find a peer that is gone"
)
#: Ids tried on every codec (those up to its ``max_request_id``), with its top one: each byte
#: width's edges, so an id field read or written too narrow shows.
_IDS = (1, 2, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
_IDS_WIDE = (2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1)


def request_ids(codec_type: type[Codec]) -> list[int]:
    """The ids a ping is built with: small, byte-width edges, large, and ``max_request_id``."""
    top = codec_type.max_request_id
    return sorted({i for i in (*_IDS, *_IDS_WIDE, top // 3, top - 1, top) if 1 <= i <= top})


def _ping(codec: Codec, request_id: int) -> bytes:
    """``codec.heartbeat_request(request_id)``, which must be non-empty bytes."""
    try:
        ping = codec.heartbeat_request(request_id)
    except Exception as exc:
        fail(
            f"heartbeat_request({request_id}) raised {type(exc).__name__}: {exc}; a codec "
            f"declaring heartbeat_request builds a ping for any id in 1..max_request_id "
            f"({type(codec).max_request_id}), the ids an engine allocates ({_ENGINE})"
        )
    if not isinstance(ping, bytes | bytearray | memoryview) or not ping:
        fail(f"heartbeat_request({request_id}) returned {ping!r}, expected the ping's bytes")
    return bytes(ping)


def _reply(codec: Codec, message: Metadata, what: str, shown: str) -> bytes | None:
    try:
        reply = codec.heartbeat_reply(message)
    except CodecError as exc:
        fail(f"heartbeat_reply raised {type(exc).__name__}: {exc} on {what}{shown}")
    return None if reply is None else bytes(reply)


def _as_ping(codec: Codec, ping: bytes, request_id: int, what: str) -> Metadata:
    """``ping`` decoded by ``codec``: exactly one Heartbeat carrying ``request_id``."""
    message = decode_whole(codec, ping, what)
    shown = f"\nping:\n{hexdump(ping)}"
    if message.message_type is not MessageType.Heartbeat:
        fail(
            f"{what} decodes as a {message.message_type.name}, expected a Heartbeat (a peer "
            f"of this protocol would take it for traffic, not a ping){shown}"
        )
    if message.request_id != request_id:
        fail(
            f"{what} decodes with request id {message.request_id}, it was built with "
            f"{request_id} (an engine matches the peer's answer by that id: a ping whose id "
            f"field is written too narrow or ignored gets an answer that matches none){shown}"
        )
    return message


@check("heartbeat_request_heartbeat", "errors", requires="heartbeat_request")
def heartbeat_request_heartbeat(ctx: CheckContext) -> None:
    """heartbeat_request(id) decodes as exactly one Heartbeat carrying that id, for ids 1,
    byte-width edges, large ones and ``max_request_id``."""
    ids = request_ids(ctx.target.codec)
    for request_id in ids:
        ping = _ping(ctx.target.new_codec(), request_id)
        _as_ping(ctx.target.new_codec(), ping, request_id, f"heartbeat_request({request_id})")
    ctx.details.update(ids=len(ids), top=ids[-1])


@check("heartbeat_request_answered", "errors", requires="heartbeat_request")
def heartbeat_request_answered(ctx: CheckContext) -> None:
    """The ping needs a reply (heartbeat_reply is not None), and that reply decodes as a
    Heartbeat with the ping's id that needs none itself.

    A ping nobody answers finds no live peer dead-or-alive; a reply that is a ping again has
    two peers send heartbeats back and forth forever.
    """
    for request_id in request_ids(ctx.target.codec):
        ping = _ping(ctx.target.new_codec(), request_id)
        what = f"heartbeat_request({request_id})"
        message = decode_whole(ctx.target.new_codec(), ping, what)
        shown = f"\nping:\n{hexdump(ping)}"
        reply = _reply(ctx.target.new_codec(), message, f"the ping {what}", shown)
        if reply is None:
            fail(
                f"heartbeat_reply is None for the ping {what}: it is a heartbeat that needs no "
                f"answer (a pong), so the peer never answers it and {_ENGINE} in vain{shown}"
            )
        decoded = decode_whole(ctx.target.new_codec(), reply, f"the reply to {what}")
        shown += f"\nreply:\n{hexdump(reply)}"
        if decoded.message_type is not MessageType.Heartbeat:
            fail(f"the reply to {what} decodes as a {decoded.message_type.name}{shown}")
        if decoded.request_id != message.request_id:
            fail(
                f"the reply to {what} carries id {decoded.request_id}, the ping had "
                f"{message.request_id}: an engine matches the answer by that id{shown}"
            )
        again = _reply(ctx.target.new_codec(), decoded, f"the reply to {what}", shown)
        if again is not None:
            fail(
                f"heartbeat_reply answers the reply to {what}: the reply is a ping again, so "
                f"two peers send heartbeats back and forth forever{shown}\nits reply:\n"
                f"{hexdump(again)}"
            )
    ctx.details.update(ids=len(request_ids(ctx.target.codec)))


@check("heartbeat_request_stateless", "errors", requires="heartbeat_request")
def heartbeat_request_stateless(ctx: CheckContext) -> None:
    """heartbeat_request(id) gives the same bytes on any instance, before and after it
    decoded other messages, and the ping decodes after them as on a fresh codec.

    An engine builds the ping on whichever codec serves an idle connection, after any
    traffic: like on_error, it depends on no parse state.
    """
    ids = sorted({1, ctx.target.codec.max_request_id})
    seen = 0

    def prop(sample: Sample) -> None:
        nonlocal seen
        seen += 1
        codec = ctx.target.new_codec(sample.options)
        for request_id in ids:
            fresh = _ping(ctx.target.new_codec(sample.options), request_id)
            before = _ping(codec, request_id)
            if before != fresh:
                fail(
                    f"two fresh codecs build different pings for id {request_id}: it must "
                    f"depend on no state\nfirst:\n{hexdump(fresh)}\nsecond:\n{hexdump(before)}"
                )
        decode_whole(codec, sample.frame)
        for request_id in ids:
            fresh = _ping(ctx.target.new_codec(sample.options), request_id)
            after = _ping(codec, request_id)
            if after != fresh:
                fail(
                    f"heartbeat_request({request_id}) changed after the codec decoded this "
                    f"message: it must depend on no parse state\nbefore:\n{hexdump(fresh)}"
                    f"\nafter:\n{hexdump(after)}"
                )
            what = f"heartbeat_request({request_id})"
            alone = decode_whole(ctx.target.new_codec(sample.options), fresh, what)
            decoded = decode_whole(codec, after, f"{what} after this message")
            if (decoded.message_type, decoded.request_id) != (alone.message_type, alone.request_id):
                fail(
                    f"{what} decoded after this message is a {decoded.message_type.name} with "
                    f"id {decoded.request_id}, on a fresh codec a {alone.message_type.name} "
                    f"with id {alone.request_id}: it depends on parse state\n"
                    f"ping:\n{hexdump(fresh)}"
                )

    for_each_sample(ctx, prop)
    ctx.details.update(messages=seen)


@check("heartbeat_request_needs_heartbeat", "errors", requires="heartbeat_request")
def heartbeat_request_needs_heartbeat(ctx: CheckContext) -> None:
    """A codec declaring heartbeat_request declares heartbeat too (a ping is a Heartbeat)."""
    codec = ctx.target.new_codec()
    for where, capabilities in (
        ("capabilities", type(codec).capabilities),
        ("active_capabilities", codec.active_capabilities),
    ):
        if capabilities.heartbeat_request and not capabilities.heartbeat:
            fail(
                f"the codec's {where} declare heartbeat_request without heartbeat: a ping "
                "decodes as a Heartbeat, and an engine handles heartbeats (answers a peer's "
                "ping, reads the answer to its own) only for a codec that declares them; "
                "declare heartbeat=True and implement heartbeat_reply\n"
                f"ping:\n{hexdump(_ping(codec, 1))}"
            )


@check("heartbeat_request_declared", "errors")
def heartbeat_request_declared(ctx: CheckContext) -> None:
    """A codec that implements heartbeat_request declares the capability.

    Engines call it only for codecs declaring ``heartbeat_request``: undeclared, no ping is
    ever sent, and idle connections close at the peer's idle check. A subclass whose own
    ``capabilities`` leave out an inherited ping switches it off, which is skipped with a
    reason, as any undeclared capability is.
    """
    codec_type = ctx.target.codec
    if codec_type.capabilities.heartbeat_request:
        ctx.details.update(summary="heartbeat_request declared")
        return
    owner = defining_class(codec_type, "heartbeat_request")
    declared_in = defining_class(codec_type, "capabilities")
    undeclared = (
        "codec does not declare the 'heartbeat_request' capability "
        "(Capabilities.heartbeat_request=False)"
    )
    if owner is Codec:
        raise CheckSkipped(f"{undeclared} and does not override heartbeat_request: it has no ping")
    # Written beside (or below) the capabilities that leave it out: a forgotten flag.
    if not issubclass(owner, declared_in):
        raise CheckSkipped(
            f"{undeclared}: its capabilities, set in {declared_in.__qualname__}, switch off "
            f"the heartbeat_request it inherits (from {owner.__qualname__}), which engines "
            "then never call"
        )
    try:
        shown = f"\nping:\n{hexdump(bytes(ctx.target.new_codec().heartbeat_request(1)))}"
    except Exception:
        shown = ""
    fail(
        f"the codec implements heartbeat_request (in {owner.__qualname__}) but does not declare "
        f"the 'heartbeat_request' capability (its capabilities are set in "
        f"{declared_in.__qualname__}): engines call it only for codecs that declare it, so no "
        "ping is ever sent; declare heartbeat_request=True (with heartbeat=True) in "
        f"Capabilities, or remove it{shown}"
    )
