"""Deliberately broken codecs: the working KV example codec with exactly ONE fault each.

Each class names the check that must catch it in ``catches``. They point the kit at the KV
example's conformance package through the ``conformance`` class attribute, so they are driven
with the same golden vectors and messages as the working codec.
"""

from __future__ import annotations

import struct
from dataclasses import replace
from typing import Any, ClassVar

from metaprotocol_sdk import (
    NEED_DATA,
    Attributes,
    CodecError,
    Encoded,
    FrameTooLargeError,
    FramingError,
    LocalError,
    MessageType,
    Metadata,
    Mutation,
    MutationError,
    NeedData,
    ReplyHead,
    ResponseStatus,
    StreamType,
    UnsupportedError,
    take_frame,
)
from metaprotocol_sdk.examples import kv
from metaprotocol_sdk.examples.kv import HEADER, HEADER_SIZE, KVCodec, build_frame


def copied(message: Metadata) -> Metadata:
    """A copy of ``message``, field by field (``copy.copy`` cannot make a compiled
    ``Metadata``: its constructor wants the message type)."""
    return Metadata(
        message.message_type,
        message.frame,
        message.request_id,
        message.operation_name,
        message.header_size,
        message.body_size,
        message.response_status,
        message.attributes,
        message.codec_state,
        message.stream_type,
        message.stream_id,
        message.values,
    )


class _Broken(KVCodec):
    conformance = "metaprotocol_sdk.examples.kv_conformance"
    #: The check that must fail for this codec.
    catches: ClassVar[str] = ""


def _message(frame: bytes, kind: int, request_id: int, headers_length: int) -> Metadata:
    """The metadata KVCodec.decode builds for a complete frame."""
    headers = kv._decode_headers(frame, HEADER_SIZE, HEADER_SIZE + headers_length)
    streaming = kind >= kv.STREAM_OPEN
    return Metadata(
        kv._KIND_TO_TYPE[kind],
        frame=frame,
        request_id=request_id,
        operation_name=headers.get("method", ""),
        header_size=HEADER_SIZE + headers_length,
        body_size=len(frame) - HEADER_SIZE - headers_length,
        response_status=ResponseStatus.Ok if kind == kv.RESPONSE else ResponseStatus.Unknown,
        attributes=Attributes(headers),
        codec_state=kind,
        stream_type=StreamType.BidiStream if streaming else StreamType.Unary,
        stream_id=request_id if streaming else 0,
    )


def _block(headers: dict[str, str], tail: bytes = b"") -> bytes:
    """``kv.encode_headers(headers) + tail``, refused with MutationError where KV's lengths
    cannot carry it, as KVCodec.encode refuses it."""
    try:
        block = kv.encode_headers(headers) + tail
    except ValueError as exc:
        raise MutationError(str(exc)) from None
    if len(block) > 0xFFFF:
        raise MutationError(f"the headers block would be {len(block)} bytes")
    return block


class IgnoresPartialFrames(_Broken):
    """Throws a partial frame away instead of keeping it for the next call."""

    catches = "framing_split_points"

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        fields = HEADER.unpack(buffer)
        if fields is not None and len(buffer) >= HEADER_SIZE + fields[4] + fields[6]:
            return super().decode(buffer)
        buffer.clear()  # the fault
        return NEED_DATA


class ShortValueOnTruncation(_Broken):
    """Returns a message built from whatever bytes arrived when the body is truncated."""

    catches = "bad_input_truncated"

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        fields = HEADER.unpack(buffer)
        if fields is None:
            return NEED_DATA
        _, _, kind, request_id, headers_length, _, body_length = fields
        size = HEADER_SIZE + headers_length + body_length
        if len(buffer) >= size or len(buffer) < HEADER_SIZE + headers_length:
            return super().decode(buffer)
        frame = take_frame(buffer, len(buffer))  # the fault: a short value
        return _message(frame, kind, request_id, headers_length)


class DropsRequestIdInErrorReply(_Broken):
    """Builds error replies with request id 0."""

    catches = "error_reply_request_id"

    def on_error(self, metadata: Metadata, error: LocalError) -> bytes:
        return build_frame(kv.ERROR, 0, {"error-type": error.type.name})


class EmptyErrorReply(_Broken):
    """Returns an empty error reply."""

    catches = "error_reply_nonempty"

    def on_error(self, metadata: Metadata, error: LocalError) -> bytes:
        return b""


class CorruptsBodyOnMutation(_Broken):
    """Flips the body's first byte when writing a mutation."""

    catches = "mutation_body_unchanged"

    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        encoded = super().encode(message, mutation, request_id=request_id)
        if not mutation or isinstance(encoded, bytes) or not message.body_size:
            return encoded
        body = bytearray(encoded[-1])
        body[0] ^= 0xFF  # the fault
        return [*encoded[:-1], bytes(body)]


class ForgetsLengthAfterMutation(_Broken):
    """Writes the mutated headers but leaves the old headers length in place."""

    catches = "mutation_length_fields"

    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        encoded = super().encode(message, mutation, request_id=request_id)
        if not mutation or isinstance(encoded, bytes):
            return encoded
        fixed = bytearray(encoded[0])
        old_length = message.header_size - HEADER_SIZE
        struct.pack_into(">H", fixed, 8, old_length)  # the fault: the stale length
        return [bytes(fixed), *encoded[1:]]


_KINDS = [kv._KIND_TO_TYPE[k] for k in range(6)]


class IndexErrorOnGarbage(_Broken):
    """Looks the message kind up in a list, so an unknown kind raises IndexError."""

    catches = "bad_input_corrupted"

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        fields = HEADER.unpack(buffer)
        if fields is not None:
            _KINDS[fields[2]]  # the fault: IndexError for kind >= 6 instead of FramingError
        return super().decode(buffer)


class BuffersOversizedLength(_Broken):
    """Never compares the announced size with max_frame_size: waits for any length."""

    catches = "bad_input_oversized_length"

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        fields = HEADER.unpack(buffer)
        if fields is None:
            return NEED_DATA
        size = HEADER_SIZE + fields[4] + fields[6]
        if len(buffer) < size:
            return NeedData(size)  # the fault: no FrameTooLargeError
        saved, self.max_frame_size = self.max_frame_size, max(self.max_frame_size, size)
        try:
            return super().decode(buffer)
        finally:
            self.max_frame_size = saved


class SharesStateBetweenInstances(_Broken):
    """Caches a partly received header at class level, so every instance sees it."""

    catches = "state_independent_instances"
    _pending: ClassVar[dict[str, Any]] = {}  # the fault: one dict for all instances

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        fields = self._pending.get("header") or HEADER.unpack(buffer)
        if fields is None:
            return NEED_DATA
        _, _, kind, request_id, headers_length, _, body_length = fields
        size = HEADER_SIZE + headers_length + body_length
        if size > self.max_frame_size:
            raise FrameTooLargeError(size, self.max_frame_size, offset=12)
        if len(buffer) < size:
            self._pending["header"] = fields
            return NeedData(size)
        self._pending.clear()
        frame = take_frame(buffer, size)
        return _message(frame, kind, request_id, headers_length)


class KeepsOldIdWithMutation(_Broken):
    """Writes the mutation but drops the new request id when both are given."""

    catches = "mutation_with_request_id"

    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        if mutation:
            request_id = None  # the fault: the engine's shared-connection path loses its id
        return super().encode(message, mutation, request_id=request_id)


class AsksOneByteTooMany(_Broken):
    """Reports one byte more than the frame needs in NeedData."""

    catches = "framing_needed_exact"

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        result = super().decode(buffer)
        if isinstance(result, NeedData) and result.needed:
            # The fault (capped at the limit, which a later byte would be refused by anyway).
            return NeedData(min(result.needed + 1, self.max_frame_size))
        return result


class KeepsExistingKeys(_Broken):
    """Puts the mutation's entries in front of the existing headers instead of replacing them,
    so a key the message already has keeps its old value (the decoder keeps the last one)."""

    catches = "mutation_replaces_key"

    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        if not mutation:
            return super().encode(message, mutation, request_id=request_id)
        frame = message.frame
        block = _block(dict(mutation), bytes(frame[HEADER_SIZE : message.header_size]))
        fixed = bytearray(frame[:HEADER_SIZE])
        struct.pack_into(">H", fixed, 8, len(block))
        if request_id is not None:
            struct.pack_into(">I", fixed, 4, request_id)
        return [bytes(fixed), block, message.body]


class RebuildsFrameOnEncode(_Broken):
    """Builds a fresh frame from the decoded fields instead of returning the original bytes:
    a canonical frame comes back the same, an unusual one (reserved bits, duplicate keys)
    does not."""

    catches = "roundtrip_identity_unusual"

    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        if mutation or request_id is not None:
            return super().encode(message, mutation, request_id=request_id)
        headers = kv._decode_headers(message.frame, HEADER_SIZE, message.header_size)
        return build_frame(message.codec_state, message.request_id, headers, bytes(message.body))


class ConsumesBeforeRaising(_Broken):
    """Takes a frame with bad headers off the buffer, then raises (Dubbo's bug in issue 13)."""

    catches = "bad_input_consumes_nothing"

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        try:
            return super().decode(buffer)
        except CodecError as exc:
            if exc.frame_size:
                del buffer[: exc.frame_size]  # the fault: the engine drops frame_size again
            raise


class QuadraticHeaders(_Broken):
    """Compares each header with every header before it: quadratic in the number of headers."""

    catches = "perf_linear"

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        result = super().decode(buffer)
        if isinstance(result, Metadata):
            keys: list[str] = []
            for key, _ in result.attributes.items():
                for earlier in keys:  # the fault: an O(n) scan per header
                    if earlier == key:
                        break
                keys.append(key)
        return result


class WholeFrameSkipsHeaders(_Broken):
    """Overrides decode_frame to spare a copy, and forgets the headers there: only large
    frames, which an engine hands over whole, route without their attributes."""

    catches = "framing_decode_frame"

    def decode_frame(self, frame: bytes) -> Metadata:
        message = super().decode_frame(frame)
        message.attributes = Attributes({})  # the fault
        return message


class StaleStateAfterWholeFrame(_Broken):
    """Remembers the size of the incomplete frame it last answered NeedData for, and answers
    later calls from it until that frame is there (decode forgets it once the frame decodes or
    is refused).
    Its own decode_frame, sparing a copy, does not forget it: after a large frame the engine
    assembled, the next, shorter message waits forever."""

    catches = "framing_decode_frame_state"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._waiting = 0

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        if self._waiting and len(buffer) < self._waiting:
            return NeedData(self._waiting)
        try:
            result = super().decode(buffer)
        except CodecError:
            self._waiting = 0  # (a refused frame is forgotten too: only decode_frame is wrong)
            raise
        self._waiting = result.needed if isinstance(result, NeedData) else 0
        return result

    def decode_frame(self, frame: bytes) -> Metadata:
        buffer = bytearray(frame)
        result = KVCodec.decode(self, buffer)  # the fault: self._waiting stays as it was
        assert isinstance(result, Metadata) and not buffer
        return result


class ErrorReplyAsResponse(_Broken):
    """Builds its error replies as ordinary responses carrying the error in headers: they
    decode as Response with status Ok, so an engine counts them as successes and never
    retries them."""

    catches = "error_reply_status"

    def on_error(self, metadata: Metadata, error: LocalError) -> bytes:
        headers = {"error-type": error.type.name, "error-message": error.message}
        return build_frame(kv.RESPONSE, metadata.request_id, headers)  # the fault: not ERROR


class PongForPong(_Broken):
    """Answers every heartbeat with a pong, pongs too: two peers (or a proxy and its
    upstream) send pongs back and forth forever."""

    catches = "heartbeat_reply"
    # (Its reply to our own ping being answered again is heartbeat_request_answered's.)
    capabilities = replace(KVCodec.capabilities, heartbeat_request=False)

    def heartbeat_reply(self, metadata: Metadata) -> bytes | None:
        if self.is_drain_notice(metadata):
            return None  # (answering the drain notice, a pong too, is drain_notice_heartbeat's)
        return build_frame(kv.PONG, metadata.request_id)  # the fault: a pong gets one too


class PeekSkipsHeaders(_Broken):
    """peek_reply skips validating the headers block to stay cheap: a reply decode refuses
    is forwarded to the client unchecked instead of answered with BadResponse."""

    catches = "peek_reply_agrees"

    def peek_reply(self, buffer: bytearray) -> ReplyHead | None:
        if len(buffer) < HEADER_SIZE or buffer[:2] != b"KV":
            return None
        _, version, kind, request_id, headers_length, _, body_length = HEADER.unpack(buffer)
        size = HEADER_SIZE + headers_length + body_length
        if version != 1 or kind not in (kv.RESPONSE, kv.ERROR):
            return None
        if size > len(buffer) or size > self.max_frame_size:
            return None
        # The fault: no _decode_headers here.
        status = ResponseStatus.Ok if kind == kv.RESPONSE else ResponseStatus.Error
        return request_id, size, status


class RecordsWireIdOnMutation(_Broken):
    """Keeps the message in step with what it wrote: a mutation with a new request id also
    stores that id in the Metadata. The engine then answers the client with the upstream id."""

    catches = "encode_leaves_message"

    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        encoded = super().encode(message, mutation, request_id=request_id)
        if mutation and request_id is not None:
            message.request_id = request_id  # the fault
        return encoded


class WideMaxRequestId(_Broken):
    """Declares a 64-bit id range (copied from a protocol with wider ids) on a 32-bit field:
    an engine sharing a connection allocates ids the field cannot carry."""

    catches = "rewrite_request_id"
    max_request_id = 2**64 - 1  # the fault
    # (A ping at that id, which the field cannot carry, is heartbeat_request_heartbeat's.)
    capabilities = replace(KVCodec.capabilities, heartbeat_request=False)


class AsciiErrorMessage(_Broken):
    """Writes the error message as ASCII: a reason quoting non-ASCII text off the wire makes
    on_error raise, so the engine sends no reply at all."""

    catches = "error_reply_any_message"

    def on_error(self, metadata: Metadata, error: LocalError) -> bytes:
        message = error.message.encode("ascii").decode("ascii")  # the fault: UnicodeEncodeError
        headers = {"error-type": error.type.name, "error-message": message}
        return build_frame(kv.ERROR, metadata.request_id, headers)


class ShortFrameSize(_Broken):
    """Sets a bad frame's frame_size to the header and headers block, forgetting the body:
    an engine drops that much and decodes the bad frame's body as the next message."""

    catches = "bad_input_frame_size"

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        try:
            return super().decode(buffer)
        except CodecError as exc:
            fields = HEADER.unpack(buffer)
            if exc.frame_size and fields is not None:
                exc.frame_size = HEADER_SIZE + fields[4]  # the fault: no + body_length
            raise


class NeverMutates(_Broken):
    """Declares the mutation capability but refuses every mutation (not written yet): every
    mutation check skips, and an engine accepts routes with mutations it then drops."""

    catches = "capabilities_honored"

    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        if mutation:
            raise MutationError("mutations are not supported yet")  # the fault
        return super().encode(message, mutation, request_id=request_id)


class ErrorRepliesOnlyToRequests(_Broken):
    """Refuses to build an error reply for anything but a request: the engine answers a
    client's stray Response, or a refused frame whose error metadata is not a request, and
    the exception escapes into the connection's read path."""

    catches = "error_reply_any_metadata"

    def on_error(self, metadata: Metadata, error: LocalError) -> bytes:
        if not metadata.message_type.is_request_side:  # the fault
            raise UnsupportedError(f"no error reply to a {metadata.message_type.name}")
        return super().on_error(metadata, error)


class CopiesWholeBuffer(_Broken):
    """Parses from a bytes copy of the whole buffer (to hand its parser immutable bytes): one
    message costs what the whole read holds, so a read of many pipelined messages is
    quadratic."""

    catches = "perf_linear_pipelined"

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        copy = bytearray(bytes(buffer))  # the fault: the rest of the buffer, every call
        result = super().decode(copy)
        if isinstance(result, Metadata):
            del buffer[: result.size]
        return result


class ReusesHeaderScratch(_Broken):
    """Writes a mutated message's fixed header into one scratch buffer it keeps, and returns a
    view of it (sparing an allocation per message): the next encode overwrites the header of
    a large message the engine has queued but not yet written."""

    catches = "encode_buffers_kept"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._scratch = bytearray(HEADER_SIZE)

    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        encoded = super().encode(message, mutation, request_id=request_id)
        if not mutation or isinstance(encoded, bytes):
            return encoded
        self._scratch[:] = encoded[0]
        return [memoryview(self._scratch), *encoded[1:]]  # the fault: a view of reused bytes


class KeepsHeaderAfterError(_Broken):
    """Remembers the header of a frame that arrived in part (sparing a re-parse when the rest
    comes) and forgets it when the frame decodes, but not when it is refused with frame_size:
    the engine drops the bad frame and the same codec reads the next message with its sizes."""

    catches = "state_resync_after_error"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._header: tuple[Any, ...] | None = None

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        fields = self._header or HEADER.unpack(buffer)
        if fields is None:
            return NEED_DATA
        _, version, kind, request_id, headers_length, _, body_length = fields
        size = HEADER_SIZE + headers_length + body_length
        if size > self.max_frame_size or version != 1 or kind not in kv._KIND_TO_TYPE:
            return super().decode(buffer)
        if len(buffer) < size:
            self._header = fields
            return NeedData(size)
        try:
            kv._decode_headers(buffer, HEADER_SIZE, HEADER_SIZE + headers_length)
        except FramingError as exc:  # the fault: self._header stays set
            exc.frame_size = size
            exc.metadata = Metadata(kv._KIND_TO_TYPE[kind], request_id=request_id)
            raise
        self._header = None
        return super().decode(buffer)


class WholeFrameView(_Broken):
    """Overrides decode_frame and keeps a view of the frame it was given as ``Metadata.frame``
    (a zero-copy habit): only large frames, which an engine hands over whole, get a frame that
    is not bytes. The engine forwards what an empty-mutation encode returns, the frame itself,
    and takes anything but bytes for a list of buffers; relabelling it raises TypeError."""

    catches = "framing_frame_owned"

    def decode_frame(self, frame: bytes) -> Metadata:
        message = super().decode_frame(frame)
        message.frame = memoryview(frame)  # type: ignore[assignment]  # the fault
        return message


class FrameViewOfScratch(_Broken):
    """Copies each frame into one scratch buffer it keeps (sparing an allocation per message)
    and hands out a view of it as ``Metadata.frame``: an engine keeps a request for retries,
    mirrors and local replies while the same codec decodes the next message over its bytes."""

    catches = "framing_frame_owned"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._scratch = bytearray(1 << 16)

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        result = super().decode(buffer)
        if isinstance(result, Metadata) and result.size <= len(self._scratch):
            self._scratch[: result.size] = result.frame
            result.frame = memoryview(self._scratch)[: result.size]  # type: ignore[assignment]
        return result

    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        if isinstance(message.frame, memoryview):  # its own views: read them as bytes
            message = copied(message)
            message.frame = bytes(message.frame)
        return super().encode(message, mutation, request_id=request_id)


class TooLargeWithoutId(_Broken):
    """Refuses an oversized length without the metadata the header gave: an engine cannot
    tell which request it refused, so the client gets no OverLimit reply and waits."""

    catches = "bad_input_error_id"

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        try:
            return super().decode(buffer)
        except FrameTooLargeError as exc:
            exc.metadata = None  # the fault
            raise


class CachesById(_Broken):
    """Remembers each request's operation and attributes by its id and hands a later request
    with the same id (a client's retry, it assumes) the ones it already has: a different
    request under a reused id (ids are the client's to choose) routes as the earlier one."""

    catches = "state_same_id"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._by_id: dict[int, tuple[str, Attributes]] = {}

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        result = super().decode(buffer)
        if isinstance(result, Metadata) and result.message_type.is_request_side:
            if len(self._by_id) > 1024:
                self._by_id.clear()
            cached = self._by_id.setdefault(
                result.request_id, (result.operation_name, result.attributes)
            )
            result.operation_name, result.attributes = cached  # the fault
        return result


def _lenient_headers(frame: bytes | bytearray, start: int, end: int) -> dict[str, Any] | None:
    """kv._decode_headers, but a value that is not UTF-8 stays raw bytes (None where
    kv._decode_headers refuses the block for another reason)."""
    headers: dict[str, Any] = {}
    pos = start
    while pos < end:
        klen = frame[pos]
        try:
            key = bytes(frame[pos + 1 : pos + 1 + klen]).decode()
        except UnicodeDecodeError:
            return None
        pos += 1 + klen
        if pos + 2 > end:
            return None
        vlen = int.from_bytes(frame[pos : pos + 2], "big")
        pos += 2
        if pos + vlen > end:
            return None
        raw = bytes(frame[pos : pos + vlen])
        pos += vlen
        try:
            headers[key] = raw.decode()
        except UnicodeDecodeError:
            headers[key] = raw  # the fault: not a str
    return headers


class BytesForBadUtf8(_Broken):
    """Keeps a header value that is not UTF-8 as its raw bytes instead of refusing the frame
    (lenient, as some peers are), through the unchecked ``Attributes.from_strings``: the
    attribute is not a str, and the engine's route matcher, consistent-hash balancer and
    rate-limit keys raise on it in the middle of a client's read."""

    catches = "bad_input_corrupted"

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        try:
            return super().decode(buffer)
        except FramingError as exc:
            if "not UTF-8" not in exc.reason or exc.frame_size is None:
                raise
            error, size = exc, exc.frame_size
        _, _, kind, request_id, headers_length, _, _ = HEADER.unpack(buffer)
        headers = _lenient_headers(buffer, HEADER_SIZE, HEADER_SIZE + headers_length)
        if headers is None:
            raise error
        frame = take_frame(buffer, size)
        message = _message(frame, kind, request_id, 0)
        message.header_size = HEADER_SIZE + headers_length
        message.body_size = size - message.header_size
        message.attributes = Attributes.from_strings(headers)
        return message


class SkipsEmptyValues(_Broken):
    """Takes an empty mutation value for "not set" and skips it: an operator's route that
    blanks a client's header (``x-user: ""``) leaves the client's own value for the server."""

    catches = "mutation_any_value"

    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        if mutation:
            mutation = {key: value for key, value in mutation.items() if value}  # the fault
        return super().encode(message, mutation, request_id=request_id)


class ValueLengthInCharacters(_Broken):
    """Splices a mutation's entries after the headers it keeps as they came, and writes each
    value's length as ``len(value)``: its characters, not its UTF-8 bytes. ASCII values
    come out right; a non-ASCII one corrupts the headers block and the server refuses the
    request."""

    catches = "mutation_any_value"

    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        if not mutation:
            return super().encode(message, mutation, request_id=request_id)
        frame = message.frame
        written = {key.lower() for key in mutation}
        headers = kv._decode_headers(frame, HEADER_SIZE, message.header_size)
        block = _block({k: v for k, v in headers.items() if k.lower() not in written})
        for key, value in mutation.items():
            k, v = key.encode(), value.encode()
            if len(k) > 0xFF or len(v) > 0xFFFF:
                raise MutationError(f"header {key!r} is too long")
            block += bytes((len(k),)) + k + len(value).to_bytes(2, "big") + v  # the fault
        block = _block({}, block)
        fixed = bytearray(frame[:HEADER_SIZE])
        struct.pack_into(">H", fixed, 8, len(block))
        if request_id is not None:
            struct.pack_into(">I", fixed, 4, request_id)
        return [bytes(fixed), block, message.body]


class CachesBlockByMutation(_Broken):
    """Remembers the headers block it wrote for a mutation, by the mutation's content (a
    route applies the same one to every request), and forgets that the block holds the
    message's own headers too: every later request on the connection goes out with the
    first one's headers."""

    catches = "mutation_each_call"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._blocks: dict[tuple[tuple[str, str], ...], bytes] = {}

    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        if not mutation:
            return super().encode(message, mutation, request_id=request_id)
        key = tuple(mutation.items())
        block = self._blocks.get(key)  # the fault: not keyed by the message's headers
        if block is None:
            encoded = super().encode(message, mutation)
            assert isinstance(encoded, list)
            block = self._blocks[key] = bytes(encoded[1])
        fixed = bytearray(message.frame[:HEADER_SIZE])
        struct.pack_into(">H", fixed, 8, len(block))
        if request_id is not None:
            struct.pack_into(">I", fixed, 4, request_id)
        return [bytes(fixed), block, message.body]


class CachesMutationById(_Broken):
    """Recognises the route's mutation by the mapping's identity (``id()``) alone, to spare
    comparing it: a mapping changed in place, or a new one that Python gives a freed one's
    address (the engine builds one per request when a filter or tracing adds keys), is
    written with the values it remembered."""

    catches = "mutation_each_call"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._last: tuple[int, dict[str, str]] | None = None

    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        if mutation:
            if self._last is not None and self._last[0] == id(mutation):
                mutation = self._last[1]  # the fault
            else:
                self._last = (id(mutation), dict(mutation))
        return super().encode(message, mutation, request_id=request_id)


class PeekCopiesWholeBuffer(_Broken):
    """peek_reply parses an immutable copy of the buffer (to hand its parser bytes): an
    engine peeks at every reply in a read, so a read of many pipelined replies (a shared
    upstream connection's) costs quadratic time."""

    catches = "perf_linear_pipelined"

    def peek_reply(self, buffer: bytearray) -> ReplyHead | None:
        return super().peek_reply(bytearray(bytes(buffer)))  # the fault: the whole read, per reply


class PeekBodyLength16(_Broken):
    """peek_reply reads the body length as 16 bits (the low half of its 32-bit field, as a
    protocol with 16-bit lengths would): right for every reply under 64 KiB, but a larger
    one is sized short, so the engine forwards part of it and reads the rest of its body as
    the next reply on a shared upstream connection."""

    catches = "peek_reply_large"

    def peek_reply(self, buffer: bytearray) -> ReplyHead | None:
        head = super().peek_reply(buffer)
        if head is None:
            return None
        request_id, _, status = head
        headers_length, body_length = struct.unpack_from(">H4xH", buffer, 8)  # the fault
        return request_id, HEADER_SIZE + headers_length + body_length, status


class KeyLengthInCharacters(_Broken):
    """Writes a mutation's entries after the headers it keeps: a key the message carries with
    the length it came with, a new key with ``len(key)``, its characters, not its UTF-8 bytes.
    New ASCII keys (every key a route had in its tests) come out right; a new non-ASCII one
    corrupts the headers block."""

    catches = "mutation_any_key"

    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        if not mutation:
            return super().encode(message, mutation, request_id=request_id)
        frame = message.frame
        written = {key.lower() for key in mutation}
        headers = kv._decode_headers(frame, HEADER_SIZE, message.header_size)
        block = _block({k: v for k, v in headers.items() if k.lower() not in written})
        carried = {key.lower() for key in headers}
        for key, value in mutation.items():
            k, v = key.encode(), value.encode()
            if len(k) > 0xFF or len(v) > 0xFFFF:
                raise MutationError(f"header {key!r} is too long")
            length = len(k) if key.lower() in carried else len(key)  # the fault
            block += bytes((length,)) + k + len(v).to_bytes(2, "big") + v
        block = _block({}, block)
        fixed = bytearray(frame[:HEADER_SIZE])
        struct.pack_into(">H", fixed, 8, len(block))
        if request_id is not None:
            struct.pack_into(">I", fixed, 4, request_id)
        return [bytes(fixed), block, message.body]


def _restamped(
    message: Metadata | NeedData,
    *,
    message_type: MessageType | None = None,
    stream_type: StreamType | None = None,
    stream_id: int | None = None,
) -> Metadata | NeedData:
    """``message`` with the given fields changed (a stream frame's faults)."""
    if isinstance(message, NeedData):
        return message
    return Metadata(
        message.message_type if message_type is None else message_type,
        frame=message.frame,
        request_id=message.request_id,
        operation_name=message.operation_name,
        header_size=message.header_size,
        body_size=message.body_size,
        response_status=message.response_status,
        attributes=message.attributes,
        codec_state=message.codec_state,
        stream_type=message.stream_type if stream_type is None else stream_type,
        stream_id=message.stream_id if stream_id is None else stream_id,
    )


class ZeroStreamIdAfterInit(_Broken):
    """Sets the stream id on a stream's opening frame only (the one it routes) and leaves it 0
    on the frames after it: the engine finds none of them a stream, and answers each
    ``BadRequest`` "no open stream 0"."""

    catches = "streaming_ids"

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        message = super().decode(buffer)
        if isinstance(message, Metadata) and message.codec_state > kv.STREAM_OPEN:
            return _restamped(message, stream_id=0)
        return message


class UnaryStreamType(_Broken):
    """Marks stream frames with the right message types and ids but leaves ``stream_type``
    at its default, ``Unary``."""

    catches = "streaming_marked"

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        message = super().decode(buffer)
        if isinstance(message, Metadata) and message.stream_id:
            return _restamped(message, stream_type=StreamType.Unary)
        return message


class StreamFramesRebuiltOnEncode(_Broken):
    """Returns requests and replies as they came, but builds stream frames afresh from the
    decoded fields (the route's mutation is empty for most streams): a stream frame with a
    reserved bit set or a duplicate key reaches the server changed. The same fault as
    ``RebuildsFrameOnEncode``, on the frames the engine passes through a stream."""

    catches = "roundtrip_identity_unusual"

    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        if mutation or request_id is not None or not message.stream_id:
            return super().encode(message, mutation, request_id=request_id)
        headers = kv._decode_headers(message.frame, HEADER_SIZE, message.header_size)
        return build_frame(message.codec_state, message.request_id, headers, bytes(message.body))


_STREAM_FRAMES = (
    MessageType.Stream_Init,
    MessageType.Stream_Data,
    MessageType.Stream_Close_One_Way,
    MessageType.Stream_Close_Two_Way,
)


class ResetsStreams(KVCodec):
    """Not broken: answers a stream frame's error with the stream's reset (a close of both
    sides with the stream's id), the contract's other answer to a ``Stream_Init``."""

    conformance = "metaprotocol_sdk.examples.kv_conformance"

    def on_error(self, metadata: Metadata, error: LocalError) -> bytes:
        if metadata.message_type in _STREAM_FRAMES:
            reason = {"error-type": error.type.name, "error-message": error.message}
            return build_frame(kv.STREAM_CLOSE, metadata.stream_id, reason)
        return super().on_error(metadata, error)


class TooLargeResetOfNoStream(ResetsStreams, _Broken):
    """Resets streams, but refuses an oversized frame without the stream id its header gave:
    the reset it then builds for a too-large ``Stream_Init`` names stream 0, which the client
    never opened, and its stream hangs."""

    catches = "error_reply_after_decode_error"

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        try:
            return super().decode(buffer)
        except FrameTooLargeError as exc:
            if exc.metadata is not None:
                exc.metadata = Metadata(
                    exc.metadata.message_type, request_id=exc.metadata.request_id
                )
            raise


class NoticeNeedsReply(_Broken):
    """Sends a ping carrying ``goaway`` as its drain notice: the peer answers it with a pong,
    on a connection that is closing."""

    catches = "drain_notice_heartbeat"

    def drain_notice(self) -> bytes:
        return build_frame(kv.PING, 0, {kv.GOAWAY: "draining"})  # the fault: a ping

    def is_drain_notice(self, metadata: Metadata) -> bool:
        return metadata.codec_state in (kv.PING, kv.PONG) and kv.GOAWAY in metadata.attributes


class NoticeWithLastId(_Broken):
    """Builds its drain notice with the id of the last message it decoded: the notice
    depends on parse state, so an engine that builds it on another instance sends other
    bytes."""

    catches = "drain_notice_stateless"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._last_id = 0

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        result = super().decode(buffer)
        if isinstance(result, Metadata):
            self._last_id = result.request_id  # the fault: state the notice reads
        return result

    def drain_notice(self) -> bytes:
        return build_frame(kv.PONG, self._last_id, {kv.GOAWAY: "draining"})


class EveryPongANotice(_Broken):
    """Takes every pong for a drain notice: an engine retires each upstream connection at
    the first answer to its keep-alive."""

    catches = "drain_notice_only_notices"

    def is_drain_notice(self, metadata: Metadata) -> bool:
        return bool(metadata.codec_state == kv.PONG)  # the fault: no look at the goaway header


class NoticeWithoutHeartbeat(_Broken):
    """Declares a drain notice but not heartbeats, which the notice is one of."""

    catches = "drain_notice_needs_heartbeat"
    # The fault; (a ping without heartbeats is heartbeat_request_needs_heartbeat's).
    capabilities = replace(KVCodec.capabilities, heartbeat=False, heartbeat_request=False)


class UndeclaredNotice(_Broken):
    """Builds and recognises a drain notice (its own, a pong saying ``closing``) but does not
    declare it: engines never send it and never honour a peer's."""

    catches = "drain_notice_declared"
    capabilities = replace(KVCodec.capabilities, drain_notice=False)  # the fault

    def drain_notice(self) -> bytes:
        return build_frame(kv.PONG, 0, {"closing": "1"})

    def is_drain_notice(self, metadata: Metadata) -> bool:
        return metadata.codec_state == kv.PONG and "closing" in metadata.attributes


class PingIdIn16Bits(_Broken):
    """Writes only the low 16 bits of its ping's id: the answer to a ping with a larger id
    carries another id, which matches no ping an engine sent."""

    catches = "heartbeat_request_heartbeat"

    def heartbeat_request(self, request_id: int) -> bytes:
        return build_frame(kv.PING, request_id & 0xFFFF)  # the fault


class PingIsAPong(_Broken):
    """Sends a pong as its ping: a heartbeat that needs no answer, so the peer never answers
    it."""

    catches = "heartbeat_request_answered"

    def heartbeat_request(self, request_id: int) -> bytes:
        return build_frame(kv.PONG, request_id)  # the fault


class PingWithLastId(_Broken):
    """Adds the id of the last message it decoded to its ping: the ping depends on parse
    state, so it differs with the traffic the connection carried."""

    catches = "heartbeat_request_stateless"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._last_id = 0

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        result = super().decode(buffer)
        if isinstance(result, Metadata):
            self._last_id = result.request_id  # the fault: state the ping reads
        return result

    def heartbeat_request(self, request_id: int) -> bytes:
        headers = {"after": str(self._last_id)} if self._last_id else {}
        return build_frame(kv.PING, request_id, headers)


class PingWithoutHeartbeat(_Broken):
    """Declares pings but not heartbeats, which a ping is one of."""

    catches = "heartbeat_request_needs_heartbeat"
    # The fault; (its drain notice, a heartbeat too, switched off: drain_notice_needs_heartbeat).
    capabilities = replace(KVCodec.capabilities, heartbeat=False, drain_notice=False)


class UndeclaredPing(_Broken):
    """Builds a ping but does not declare it: engines never send it, and idle connections
    close at the peer's idle check."""

    catches = "heartbeat_request_declared"
    capabilities = replace(KVCodec.capabilities, heartbeat_request=False)  # the fault

    def heartbeat_request(self, request_id: int) -> bytes:
        return build_frame(kv.PING, request_id)


class RelabelsLargeErrorsAtWrongOffset(_Broken):
    """Relabels a large error reply (a 16 KiB fast path keeping the rest as a view) with the
    new id written 4 bytes late, over the headers length, and the old id left in place; its
    ``encode(request_id=)`` calls ``relabel``, as KV's does, so the two agree with each other.
    Found by writing broken codecs from outside (kit-teeth): ``peek_reply_large`` compared
    relabel only with encode."""

    catches = "peek_reply_large"

    def relabel(self, frame: bytes, request_id: int) -> Encoded:
        if frame[3] == kv.ERROR and len(frame) > 0x4000:
            return [frame[:8], kv._ID.pack(request_id), memoryview(frame)[12:]]  # the fault
        return super().relabel(frame, request_id)


class WholeFrameWithoutParsedHeaders(_Broken):
    """Keeps each message's parsed headers in ``codec_state`` so that ``encode`` need not
    parse them again, but its own ``decode_frame`` (which parses the frame it is given, sparing
    the copy into a buffer) keeps only the kind: a large request, which an engine decodes with
    ``decode_frame``, loses the client's headers to the route's mutation. Its metadata is
    decode's in every field a filter reads."""

    catches = "framing_decode_frame"

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        message = super().decode(buffer)
        if isinstance(message, Metadata):
            message.codec_state = (message.codec_state, message.attributes.to_dict())
        return message

    def decode_frame(self, frame: bytes) -> Metadata:
        return KVCodec.decode(self, bytearray(frame))  # type: ignore[return-value]  # the fault

    @staticmethod
    def _plain(message: Metadata) -> Metadata:
        """``message`` with KV's own ``codec_state`` (the kind)."""
        state = message.codec_state
        if not isinstance(state, tuple):
            return message
        plain = copied(message)
        plain.codec_state = state[0]
        return plain

    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        state = message.codec_state
        if not mutation:
            return super().encode(self._plain(message), mutation, request_id=request_id)
        headers = dict(state[1]) if isinstance(state, tuple) else {}  # none kept: none written
        for key in list(headers):
            if key.lower() in {k.lower() for k in mutation}:
                del headers[key]
        block = _block({**headers, **mutation})
        head = bytearray(message.frame[:HEADER_SIZE])
        struct.pack_into(">H", head, 8, len(block))
        if request_id is not None:
            struct.pack_into(">I", head, 4, request_id)
        return [bytes(head), block, message.body]

    def on_error(self, metadata: Metadata, error: LocalError) -> bytes:
        return super().on_error(self._plain(metadata), error)

    def heartbeat_reply(self, metadata: Metadata) -> bytes | None:
        return super().heartbeat_reply(self._plain(metadata))

    def is_drain_notice(self, metadata: Metadata) -> bool:
        return super().is_drain_notice(self._plain(metadata))


class ConsumesAfterEarlierRead(_Broken):
    """Remembers the size of the frame it waited for and, once the rest has come, takes the
    frame out of the buffer before parsing its headers: a bad frame that arrived in two reads
    raises with its bytes already gone (one that arrived whole is refused cleanly)."""

    catches = "bad_input_consumes_nothing"

    def __init__(self, **options: int) -> None:
        super().__init__(**options)
        self._waited = 0

    def reset(self) -> None:
        super().reset()
        self._waited = 0

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        waited, self._waited = self._waited, 0
        if waited and len(buffer) >= waited:
            frame = bytearray(take_frame(buffer, waited))  # the fault: taken, then parsed
            return super().decode(frame)
        result = super().decode(buffer)
        if isinstance(result, NeedData):
            self._waited = result.needed
        return result


class AccumulatesMutations(_Broken):
    """Keeps the headers of every mutation it wrote in one dict on the instance (to spare a
    dict per call), so each call writes all the keys of the earlier ones too: a route's
    mutation lands in the next route's requests on the same upstream connection."""

    catches = "mutation_each_call"

    def __init__(self, **options: int) -> None:
        super().__init__(**options)
        self._written: dict[str, str] = {}

    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        if mutation:
            self._written.update(mutation)  # the fault: never cleared
            mutation = dict(self._written)
        return super().encode(message, mutation, request_id=request_id)


class CachesEncodedByMutation(_Broken):
    """Caches what ``encode`` wrote for a mutated message in the message's ``codec_state`` (a
    retry encodes the same request again), keyed by the mutation but not by the request id: a
    retry on another upstream connection, with a new id, goes out with the first attempt's
    id, and its reply answers no one. Each call alone is right, and gives the same bytes
    twice."""

    catches = "encode_leaves_message"

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        message = super().decode(buffer)
        if isinstance(message, Metadata):
            message.codec_state = [message.codec_state, None]  # [kind, (mutation, bytes)]
        return message

    @staticmethod
    def _plain(message: Metadata) -> Metadata:
        """``message`` with KV's own ``codec_state`` (the kind)."""
        state = message.codec_state
        if not isinstance(state, list):
            return message
        plain = copied(message)
        plain.codec_state = state[0]
        return plain

    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        state = message.codec_state
        plain = self._plain(message)
        if not mutation or not isinstance(state, list):
            return super().encode(plain, mutation, request_id=request_id)
        key = tuple(sorted(mutation.items()))  # the fault: request_id is not in the key
        if state[1] is None or state[1][0] != key:
            encoded = super().encode(plain, mutation, request_id=request_id)
            state[1] = (key, b"".join(encoded) if isinstance(encoded, list) else encoded)
        return state[1][1]  # type: ignore[no-any-return]

    def on_error(self, metadata: Metadata, error: LocalError) -> bytes:
        return super().on_error(self._plain(metadata), error)

    def heartbeat_reply(self, metadata: Metadata) -> bytes | None:
        return super().heartbeat_reply(self._plain(metadata))

    def is_drain_notice(self, metadata: Metadata) -> bool:
        return super().is_drain_notice(self._plain(metadata))


class ErrorReplyIdIn24Bits(_Broken):
    """Writes the request id of its error replies in 24 bits (its author's clients count ids
    from 1): a client whose ids reach 2**24 gets its error replies under another id. Material
    whose requests all have small ids shows nothing."""

    catches = "error_reply_request_id"

    def on_error(self, metadata: Metadata, error: LocalError) -> bytes:
        fault = copied(metadata)
        fault.request_id &= 0xFFFFFF  # the fault
        return super().on_error(fault, error)


class CachesHeadersBySize(_Broken):
    """Caches parsed headers by the size of the headers block (its clients send the same
    headers on every request): the next message whose headers differ but have the same size,
    a client's other user or key, gets the first one's attributes and method."""

    catches = "state_same_id"

    def __init__(self, **options: int) -> None:
        super().__init__(**options)
        self._seen: dict[int, tuple[Attributes, str]] = {}

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        message = super().decode(buffer)
        if isinstance(message, Metadata):
            hit = self._seen.setdefault(
                message.header_size, (message.attributes, message.operation_name)
            )
            message.attributes, message.operation_name = hit  # the fault
        return message


class RelabelClearsReserved(_Broken):
    """Relabels a reply by writing its fixed header anew, with the reserved field 0, and
    its ``encode(request_id=)`` calls ``relabel``: a reply whose peer set reserved bits
    reaches the client without them. Its metadata says nothing of the reserved field."""

    catches = "peek_reply_agrees"

    def relabel(self, frame: bytes, request_id: int) -> Encoded:
        return (
            frame[:4]
            + struct.pack(">IHH", request_id, len(frame) and frame[8] << 8 | frame[9], 0)
            + frame[12:]
        )  # the fault: reserved 0


class ErrorMetadataOfBytes(_Broken):
    """Gives its decode errors' metadata the method it read as bytes (the frame is refused,
    so why decode it?): an engine answers, counts and logs a refused frame by that metadata,
    as it does a decoded message, and reads its fields as the contract types them."""

    catches = "bad_input_error_id"

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        try:
            return super().decode(buffer)
        except CodecError as exc:
            if exc.metadata is not None:
                exc.metadata.operation_name = b"put"  # type: ignore[assignment]  # the fault
            raise


# The rules the engine relies on in combination (issue 13): each of these codecs has one fault
# that the older checks all missed, so it must fail its own check and pass every other one.
ONLY_ONE: list[type[_Broken]] = [
    KeepsOldIdWithMutation,
    AsksOneByteTooMany,
    KeepsExistingKeys,
    RebuildsFrameOnEncode,
    ConsumesBeforeRaising,
    QuadraticHeaders,
    WholeFrameSkipsHeaders,
    StaleStateAfterWholeFrame,
    # The rules the engine relies on beyond those (hunt of the kit's blind spots): each of
    # these passed every check before its own was added or strengthened.
    ErrorReplyAsResponse,
    PongForPong,
    PeekSkipsHeaders,
    RecordsWireIdOnMutation,
    WideMaxRequestId,
    AsciiErrorMessage,
    ShortFrameSize,
    NeverMutates,
    ErrorRepliesOnlyToRequests,
    CopiesWholeBuffer,
    ReusesHeaderScratch,
    KeepsHeaderAfterError,
    # The engine keeps a message's frame, answers a refused frame by the id its error
    # carries, and sees request ids its clients chose: each of these passed every check.
    WholeFrameView,
    TooLargeWithoutId,
    CachesById,
    # Mutations carry what routes and filters are given: any text, each call's own.
    SkipsEmptyValues,
    CachesBlockByMutation,
    # An engine forwards peeked replies of any size undecoded.
    PeekBodyLength16,
    # Mutation keys are any text.
    KeyLengthInCharacters,
    # The drain notice: built from no state, a heartbeat needing no reply, declared with
    # heartbeats, recognised for itself only.
    NoticeNeedsReply,
    NoticeWithLastId,
    EveryPongANotice,
    NoticeWithoutHeartbeat,
    UndeclaredNotice,
    # The ping: any id the engine allocates, answered, built from no state, declared with
    # heartbeats.
    PingIdIn16Bits,
    PingIsAPong,
    PingWithLastId,
    PingWithoutHeartbeat,
    UndeclaredPing,
]

# Written from outside, as careless authors would (derived from the Dubbo and Thrift codecs
# first, then made of KV here): each passed every check until its check was strengthened, and
# each targets a check another broken codec above targets too (test_teeth runs them apart).
FROM_OUTSIDE: list[type[_Broken]] = [
    RelabelsLargeErrorsAtWrongOffset,
    WholeFrameWithoutParsedHeaders,
    ConsumesAfterEarlierRead,
    AccumulatesMutations,
    CachesEncodedByMutation,
    CachesHeadersBySize,
    RelabelClearsReserved,
    ErrorMetadataOfBytes,
]

BROKEN: list[type[_Broken]] = [
    IgnoresPartialFrames,
    ShortValueOnTruncation,
    DropsRequestIdInErrorReply,
    EmptyErrorReply,
    CorruptsBodyOnMutation,
    ForgetsLengthAfterMutation,
    IndexErrorOnGarbage,
    BuffersOversizedLength,
    SharesStateBetweenInstances,
    # Stream frames: golden vectors that state the stream id and type catch these too;
    # test_teeth shows each alone caught by its own check where they do not.
    ZeroStreamIdAfterInit,
    UnaryStreamType,
    TooLargeResetOfNoStream,
    *ONLY_ONE,
]

__all__ = ["BROKEN", "FROM_OUTSIDE", "ONLY_ONE", "MessageType"]
