"""The fuzz oracle: what an input may make a codec, the Hessian decoder or the loader do.

Every rule here is one the engine relies on (docs/fuzzing.md lists them). A broken rule raises
:class:`Violation`, naming the rule; the runner records the input as a find. The codec rules:

* ``decode`` returns a :class:`Metadata` or a :class:`NeedData`, or raises a ``CodecError``;
  any other exception is a crash (the engine does not catch it).
* On error and on ``NeedData`` the buffer is byte-for-byte unchanged; a message consumes
  exactly its frame (``Metadata.frame``), at most ``max_frame_size`` bytes.
* ``NeedData`` is never an answer to a buffer longer than ``max_frame_size`` (the codec would
  buffer without bound), and ``NeedData(n)`` is exact: given ``n`` bytes, decode decides.
* A message decoded from a whole buffer is ``NeedData`` for every shorter prefix and the same
  message once complete (the engine feeds bytes as they arrive).
* What the engine then does with a decoded message does not crash: ``encode`` with no change
  gives the frame back, a new request id or a header mutation gives a frame that decodes to
  it, ``peek_reply`` agrees with ``decode`` and never raises, ``relabel`` equals ``encode``,
  ``on_error`` and ``heartbeat_reply`` answer, ``is_drain_notice`` answers for a heartbeat,
  and a drain notice gets no heartbeat reply.
* A ping built with the message's request id (when it is one an engine could allocate,
  ``1..max_request_id``) decodes as one heartbeat carrying that id, which ``heartbeat_reply``
  answers.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

from metaprotocol_sdk.codec import Codec, LocalError, NeedData, join_encoded
from metaprotocol_sdk.enums import ErrorType, MessageType
from metaprotocol_sdk.errors import CodecError
from metaprotocol_sdk.metadata import Metadata

#: The attribute a mutation check adds (and then expects to read back).
MUTATION_KEY = "x-fuzz"
_LOCAL_ERROR = LocalError(ErrorType.RouteNotFound, "fuzz")


class Violation(Exception):
    """An input broke one of the oracle's rules.

    ``rule`` is a short stable name, ``detail`` says what happened and ``kind`` groups finds
    that are likely one defect (the rule, plus the exception type and place for a crash).
    """

    def __init__(self, rule: str, detail: str, kind: str = "") -> None:
        self.rule = rule
        self.detail = detail
        self.kind = kind or rule
        super().__init__(f"{rule}: {detail}")


def crash(where: str, exc: BaseException) -> Violation:
    """A :class:`Violation` for an exception no rule allows, with its traceback head."""
    head = "".join(traceback.format_exception(exc, limit=-4)).rstrip()
    frames = traceback.extract_tb(exc.__traceback__)
    place = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
    return Violation(
        "crash",
        f"{where} raised {type(exc).__name__}: {exc}\n{head}",
        f"crash:{where}:{type(exc).__name__}:{place}",
    )


def _unchanged(buffer: bytearray, before: bytes, after_what: str, kind: str) -> None:
    if buffer != before:
        raise Violation(
            "buffer-changed",
            f"{after_what}, yet the buffer went from {len(before)} to {len(buffer)} bytes"
            + ("" if len(buffer) != len(before) else " (same length, other bytes)"),
            f"buffer-changed:{kind}",
        )


def check_codec(factory: Callable[[], Codec], data: bytes) -> None:
    """Decode ``data`` as one connection's bytes and check every codec rule on the way."""
    codec = factory()
    buffer = bytearray(data)
    first = True
    # Each round consumes at least one byte or ends, so this bounds the loop.
    for _ in range(len(data) + 1):
        if not buffer:
            return
        before = bytes(buffer)
        head = _peek(codec, buffer)
        try:
            result = codec.decode(buffer)
        except CodecError as exc:
            _unchanged(
                buffer, before, f"decode raised {type(exc).__name__}({exc})", type(exc).__name__
            )
            if head is not None:
                raise Violation(
                    "peek-disagrees", f"peek_reply gave {head}, decode raised {exc}"
                ) from None
            size = exc.frame_size
            if size is None:
                return
            if not 0 < size <= len(buffer):
                raise Violation(
                    "bad-frame-size", f"{exc!r} has frame_size={size} of {len(buffer)} bytes"
                ) from None
            del buffer[:size]  # what the engine does: drop the bad frame, go on
            first = False
            continue
        except Exception as exc:
            raise crash("decode", exc) from None
        if isinstance(result, NeedData):
            _unchanged(buffer, before, f"decode answered {result!r}", "NeedData")
            if head is not None:
                raise Violation("peek-disagrees", f"peek_reply gave {head}, decode {result!r}")
            _check_need(codec, buffer, result)
            return
        if not isinstance(result, Metadata):
            raise Violation("bad-return", f"decode returned {type(result).__name__}")
        _check_message(codec, factory, before, buffer, result, head)
        if first:
            _check_prefixes(factory, before, result)
            first = False
    raise Violation("no-progress", "decode kept returning messages without consuming bytes")


def _peek(codec: Codec, buffer: bytearray) -> tuple[int, int, Any] | None:
    if not codec.capabilities.peek_reply:
        return None
    before = bytes(buffer)
    try:
        head = codec.peek_reply(buffer)
    except Exception as exc:  # the engine calls peek_reply unguarded
        raise crash("peek_reply", exc) from None
    _unchanged(buffer, before, "peek_reply", "peek_reply")
    return head


def _check_message(
    codec: Codec,
    factory: Callable[[], Codec],
    before: bytes,
    buffer: bytearray,
    md: Metadata,
    head: tuple[int, int, Any] | None,
) -> None:
    consumed = len(before) - len(buffer)
    if consumed <= 0 or md.size != consumed or md.frame != before[:consumed]:
        raise Violation(
            "frame-mismatch",
            f"decode consumed {consumed} bytes but its message's frame has {md.size}"
            + ("" if md.size != consumed else " other bytes"),
        )
    if md.size > codec.max_frame_size:
        raise Violation("over-limit", f"a {md.size}-byte message above {codec.max_frame_size}")
    if head is not None and head != (md.request_id, md.size, md.response_status):
        got = (md.request_id, md.size, md.response_status)
        raise Violation("peek-disagrees", f"peek_reply gave {head}, decode {got}")
    try:
        same = join_encoded(codec.encode(md))
    except Exception as exc:
        raise crash("encode (no change)", exc) from None
    if same != md.frame:
        raise Violation("encode-not-identity", "encode with no change altered the frame")
    caps = codec.capabilities
    kind = md.message_type
    if caps.rewrite_request_id and kind is not MessageType.Heartbeat:
        new_id = 2 if md.request_id == 1 else 1
        relabelled = _reencode(factory, md, "request_id", new_id, {})
        if head is not None and caps.peek_reply and relabelled is not None:
            try:
                out: bytes | None = join_encoded(codec.relabel(md.frame, new_id))
            except CodecError:
                out = None  # the engine answers BadResponse
            except Exception as exc:
                raise crash("relabel", exc) from None
            if out is not None and out != relabelled:
                raise Violation("relabel-differs", "relabel differs from encode with the new id")
    mutable = caps.mutation and (
        kind in (MessageType.Request, MessageType.Oneway)
        or (caps.response_mutation and kind in (MessageType.Response, MessageType.Error))
    )
    if mutable:
        # Add a key and replace the first existing one; then replace the last one alone (often
        # a field the codec derives from the message, like ``method``): a silent drop of any
        # is the bug, refusing with MutationError is allowed.
        keys = [k for k in md.attributes if k.lower() != MUTATION_KEY]
        added = {MUTATION_KEY: "1", **dict.fromkeys(keys[:1], "fuzz")}
        _reencode(factory, md, "mutation", 0, added)
        if len(keys) > 1:
            _reencode(factory, md, "mutation", 0, {keys[-1]: "fuzz"})
    try:
        if kind is MessageType.Request:
            reply = codec.on_error(md, _LOCAL_ERROR)
            if not reply:
                raise Violation("empty-error-reply", "on_error returned an empty reply")
        elif kind is MessageType.Heartbeat and caps.heartbeat:
            answer = codec.heartbeat_reply(md)
            if caps.drain_notice and codec.is_drain_notice(md) and answer is not None:
                raise Violation("notice-answered", "heartbeat_reply answers a drain notice")
    except Violation:
        raise
    except Exception as exc:  # the engine calls them unguarded
        raise crash("on_error/heartbeat_reply/is_drain_notice", exc) from None
    if caps.heartbeat_request and 1 <= md.request_id <= type(codec).max_request_id:
        _check_ping(factory, md.request_id)


def _check_ping(factory: Callable[[], Codec], request_id: int) -> None:
    """``heartbeat_request(request_id)`` decodes as one Heartbeat with that id, answered."""
    try:
        ping = bytes(factory().heartbeat_request(request_id))
    except Exception as exc:  # the engine calls it unguarded, with any id it allocates
        raise crash("heartbeat_request", exc) from None
    buffer = bytearray(ping)
    codec = factory()
    try:
        md = codec.decode(buffer)
    except CodecError as exc:
        raise Violation("ping-undecodable", f"heartbeat_request({request_id}): {exc}") from None
    except Exception as exc:
        raise crash("decode of a ping", exc) from None
    if not isinstance(md, Metadata) or buffer or md.message_type is not MessageType.Heartbeat:
        raise Violation(
            "ping-undecodable",
            f"heartbeat_request({request_id}) decodes to {md!r}, {len(buffer)} bytes left",
        )
    if md.request_id != request_id:
        raise Violation(
            "ping-wrong-id", f"heartbeat_request({request_id}) carries id {md.request_id}"
        )
    try:
        reply = codec.heartbeat_reply(md)
    except Exception as exc:
        raise crash("heartbeat_reply to a ping", exc) from None
    if reply is None:
        raise Violation("ping-unanswered", f"heartbeat_reply does not answer the ping {request_id}")


def _reencode(
    factory: Callable[[], Codec], md: Metadata, what: str, new_id: int, mutation: dict[str, str]
) -> bytes | None:
    """Encode ``md`` with a new id or a mutation; the result must decode to what was asked."""
    codec = factory()
    try:
        if what == "request_id":
            encoded = codec.encode(md, request_id=new_id)
        else:
            encoded = codec.encode(md, mutation)
    except CodecError:
        return None  # refusing a change (MutationError) is allowed
    except Exception as exc:
        raise crash(f"encode with a new {what}", exc) from None
    frame = join_encoded(encoded)
    buffer = bytearray(frame)
    # A reply's body passes through unparsed, so once mutated a reply with a broken body may
    # not decode, or decode to other attributes; a new id, or a mutated request, must decode.
    lenient = what == "mutation" and md.message_type in (MessageType.Response, MessageType.Error)
    try:
        again = factory().decode(buffer)
    except CodecError as exc:
        if lenient:
            return None
        raise Violation(
            "reencode-undecodable",
            f"the {md.message_type.name} encoded with a new {what} does not decode: {exc}",
            f"reencode-undecodable:{what}:{md.message_type.name}",
        ) from None
    except Exception as exc:
        raise crash(f"decode of a frame encoded with a new {what}", exc) from None
    if not isinstance(again, Metadata) or buffer:
        raise Violation(
            "reencode-undecodable",
            f"the frame encoded with a new {what} decodes to {again!r}, {len(buffer)} bytes left",
            f"reencode-undecodable:{what}",
        )
    if again.message_type is not md.message_type:
        raise Violation(
            "reencode-changed-type",
            f"encoding with a new {what} turned a {md.message_type.name} into a "
            f"{again.message_type.name}",
        )
    if what == "request_id" and again.request_id != new_id:
        raise Violation(
            "reencode-lost-id",
            f"asked for request id {new_id}, the frame carries {again.request_id}",
        )
    if what == "mutation" and not lenient:
        lost = [k for k, v in mutation.items() if again.attributes.get(k) != v]
        if lost:
            raise Violation(
                "reencode-lost-mutation",
                f"encoding {mutation} into a {md.message_type.name}: {lost} read back "
                f"as {[again.attributes.get(k) for k in lost]}",
            )
    return frame


def _check_need(codec: Codec, buffer: bytearray, need: NeedData) -> None:
    """NeedData must be exact and bounded: the bytes it asks for let decode decide."""
    limit = codec.max_frame_size
    wanted = need.needed
    if wanted:
        if wanted <= len(buffer):
            raise Violation("need-not-more", f"NeedData({wanted}) with {len(buffer)} bytes held")
        if wanted > limit:
            raise Violation(
                "need-over-limit",
                f"NeedData({wanted}) above max_frame_size={limit} (FrameTooLargeError expected)",
            )
        rule = "need-not-exact"
    else:
        wanted = limit + 1
        rule = "unbounded-buffering"
    if len(buffer) >= wanted:
        raise Violation(rule, f"NeedData with {len(buffer)} bytes held, max_frame_size={limit}")
    filled = buffer + bytes(wanted - len(buffer))  # zeros: any byte value would do
    before = bytes(filled)
    try:
        result = codec.decode(filled)
    except CodecError as exc:
        _unchanged(filled, before, f"decode raised {type(exc).__name__}({exc})", "completed")
        return
    except Exception as exc:
        raise crash("decode (completed with zeros)", exc) from None
    if isinstance(result, NeedData):
        raise Violation(
            rule,
            f"{need!r} with {len(buffer)} bytes, then {result!r} with {len(filled)} "
            f"(max_frame_size={limit})",
        )


def _check_prefixes(factory: Callable[[], Codec], data: bytes, md: Metadata) -> None:
    """Fed in pieces, the first message is NeedData until complete, then the same message."""
    size = md.size
    codec = factory()
    buffer = bytearray()
    for cut in sorted({1, size // 2, size - 1}):
        if not 0 < cut < size:
            continue
        buffer += data[len(buffer) : cut]
        try:
            result = codec.decode(buffer)
        except Exception as exc:
            raise Violation(
                "prefix-refused",
                f"a {size}-byte message decodes whole, but its first {cut} bytes raise "
                f"{type(exc).__name__}: {exc}",
            ) from None
        if not isinstance(result, NeedData) or buffer != data[:cut]:
            raise Violation(
                "prefix-not-need",
                f"the first {cut} bytes of a {size}-byte message gave {result!r}",
            )
        if result.needed and not cut < result.needed <= size:
            raise Violation(
                "need-not-exact",
                f"the first {cut} bytes of a {size}-byte message gave {result!r}",
            )
    buffer += data[len(buffer) : size]
    try:
        result = codec.decode(buffer)
    except Exception as exc:
        raise Violation(
            "prefix-refused",
            f"a {size}-byte message decodes whole but not when fed in pieces: {exc!r}",
        ) from None
    if (
        not isinstance(result, Metadata)
        or result.size != size
        or result.request_id != md.request_id
        or result.message_type is not md.message_type
    ):
        raise Violation("prefix-differs", f"fed in pieces: {result!r}; whole: {md!r}")
