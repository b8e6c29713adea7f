"""A tiny length-prefixed key-value protocol: the worked example of the codec contract.

Wire format (big-endian)::

    offset  size  field
    0       2     magic "KV"
    2       1     version (1)
    3       1     kind: 0 request, 1 response, 2 oneway, 3 ping, 4 pong, 5 error,
                  6 stream open, 7 stream data, 8 stream half-close, 9 stream close
    4       4     request id (a stream's frames: the stream id)
    8       2     headers length H
    10      2     reserved (0)
    12      4     body length B
    16      H     headers: repeated [key length u8][key][value length u16][value], UTF-8
    16+H    B     body (opaque)

Headers are the routable attributes; ``method`` names the operation. The example is small on
purpose, but it is a complete codec: it frames, refuses oversized lengths before buffering,
writes mutations into the headers without touching the body, rewrites request ids and builds
error replies.

A pong whose headers carry ``goaway`` is the drain notice: the sender is closing the
connection, and the receiver sends no new requests on it (those sent are still answered). It
needs no reply, and a peer that does not know it reads an unsolicited pong and ignores it.

Streams: a client opens one with a stream-open frame (routed by its headers, as a request),
then either side sends stream-data frames with the same id; each side ends its half with a
half-close, and either may end both halves at once with a close. An error frame with the
stream's id ends the stream too (it is what the proxy sends when it resets one).
"""

from __future__ import annotations

import struct

from construct import Const, Int8ub, Int16ub, Int32ub, Struct

from metaprotocol_sdk import (
    NEED_DATA,
    Attributes,
    Capabilities,
    Codec,
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
    compile_header,
    take_frame,
)

HEADER = compile_header(
    Struct(
        "magic" / Const(b"KV"),
        "version" / Int8ub,
        "kind" / Int8ub,
        "request_id" / Int32ub,
        "headers_length" / Int16ub,
        "reserved" / Int16ub,
        "body_length" / Int32ub,
    )
)
HEADER_SIZE = 16
REQUEST, RESPONSE, ONEWAY, PING, PONG, ERROR = range(6)
STREAM_OPEN, STREAM_DATA, STREAM_HALF_CLOSE, STREAM_CLOSE = range(6, 10)
#: The header that makes a pong the drain notice (its value is free text, a reason).
GOAWAY = "goaway"

_KIND_TO_TYPE = {
    REQUEST: MessageType.Request,
    RESPONSE: MessageType.Response,
    ONEWAY: MessageType.Oneway,
    PING: MessageType.Heartbeat,
    PONG: MessageType.Heartbeat,
    ERROR: MessageType.Error,
    STREAM_OPEN: MessageType.Stream_Init,
    STREAM_DATA: MessageType.Stream_Data,
    STREAM_HALF_CLOSE: MessageType.Stream_Close_One_Way,
    STREAM_CLOSE: MessageType.Stream_Close_Two_Way,
}
_ID = struct.Struct(">I")


def encode_headers(headers: dict[str, str]) -> bytes:
    """Serialise a headers block."""
    out = bytearray()
    for key, value in headers.items():
        k, v = key.encode(), value.encode()
        if len(k) > 0xFF or len(v) > 0xFFFF:
            raise ValueError(f"header {key!r} is too long")
        out += bytes((len(k),)) + k + len(v).to_bytes(2, "big") + v
    return bytes(out)


def build_frame(
    kind: int, request_id: int, headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    """Build one complete KV frame (used by examples, tests and error replies)."""
    block = encode_headers(headers or {})
    return (
        HEADER.build(
            version=1,
            kind=kind,
            request_id=request_id,
            headers_length=len(block),
            reserved=0,
            body_length=len(body),
        )
        + block
        + body
    )


def _decode_headers(frame: bytes | bytearray, start: int, end: int) -> dict[str, str]:
    headers: dict[str, str] = {}
    pos = start
    try:
        while pos < end:
            klen = frame[pos]
            key = frame[pos + 1 : pos + 1 + klen].decode()
            pos += 1 + klen
            if pos + 2 > end:
                raise FramingError("header value length runs past the headers block", offset=pos)
            vlen = int.from_bytes(frame[pos : pos + 2], "big")
            pos += 2
            if pos + vlen > end:
                raise FramingError(f"header {key!r} runs past the headers block", offset=pos)
            headers[key] = frame[pos : pos + vlen].decode()
            pos += vlen
    except UnicodeDecodeError as exc:
        raise FramingError(f"header is not UTF-8: {exc.reason}", offset=pos) from None
    return headers


class KVCodec(Codec):
    """Codec for the example KV protocol."""

    protocol = "kv"
    capabilities = Capabilities(
        heartbeat=True,
        oneway=True,
        mutation=True,
        response_mutation=True,
        rewrite_request_id=True,
        error_reply=True,
        peek_reply=True,
        streaming=True,
        drain_notice=True,
        heartbeat_request=True,
    )
    max_request_id = 0xFFFFFFFF  # unsigned 32-bit id field

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        fields = HEADER.unpack(buffer)
        if fields is None:
            return NEED_DATA
        _, version, kind, request_id, headers_length, _, body_length = fields
        if version != 1:
            raise UnsupportedError(f"KV version {version} is not supported", offset=2)
        if kind not in _KIND_TO_TYPE:
            raise FramingError(f"unknown message kind {kind}", offset=3)
        size = HEADER_SIZE + headers_length + body_length
        message_type = _KIND_TO_TYPE[kind]
        stream_id = request_id if kind >= STREAM_OPEN else 0
        if size > self.max_frame_size:
            partial = Metadata(message_type, request_id=request_id, stream_id=stream_id)
            raise FrameTooLargeError(size, self.max_frame_size, offset=12, metadata=partial)
        if len(buffer) < size:
            return NeedData(size)
        try:
            # Validate before consuming, so a bad frame can be dropped and the stream goes on.
            headers = _decode_headers(buffer, HEADER_SIZE, HEADER_SIZE + headers_length)
        except FramingError as exc:
            exc.frame_size = size
            exc.metadata = Metadata(message_type, request_id=request_id, stream_id=stream_id)
            raise
        frame = take_frame(buffer, size)
        status = ResponseStatus.Unknown
        if kind == RESPONSE:
            status = ResponseStatus.Ok
        elif kind == ERROR:
            status = ResponseStatus.Error
        return Metadata(
            message_type,
            frame=frame,
            request_id=request_id,
            operation_name=headers.get("method", ""),
            header_size=HEADER_SIZE + headers_length,
            body_size=body_length,
            response_status=status,
            attributes=Attributes(headers),
            codec_state=kind,
            stream_type=StreamType.BidiStream if kind >= STREAM_OPEN else StreamType.Unary,
            stream_id=stream_id,
        )

    def encode(
        self,
        message: Metadata,
        mutation: Mutation | None = None,
        *,
        request_id: int | None = None,
    ) -> Encoded:
        frame = message.frame
        if mutation:
            headers = _decode_headers(frame, HEADER_SIZE, message.header_size)
            headers.update(mutation)
            try:
                block = encode_headers(headers)
            except ValueError as exc:
                raise MutationError(str(exc)) from None
            if len(block) > 0xFFFF:
                raise MutationError(
                    f"the headers block would be {len(block)} bytes; its length holds 65535"
                )
            fixed = bytearray(frame[:HEADER_SIZE])
            struct.pack_into(">H", fixed, 8, len(block))
            if request_id is not None:
                _ID.pack_into(fixed, 4, request_id)
            # The body travels as an untouched slice of the original frame.
            return [bytes(fixed), block, message.body]
        if request_id is not None and request_id != message.request_id:
            return self.relabel(frame, request_id)
        return frame

    def peek_reply(self, buffer: bytearray) -> ReplyHead | None:
        # Only a complete, well-formed response or error; anything else is left to decode.
        try:
            fields = HEADER.unpack(buffer)
        except FramingError:
            return None
        if fields is None:
            return None
        _, version, kind, request_id, headers_length, _, body_length = fields
        size = HEADER_SIZE + headers_length + body_length
        if version != 1 or kind not in (RESPONSE, ERROR):
            return None
        if size > len(buffer) or size > self.max_frame_size:
            return None
        try:
            _decode_headers(buffer, HEADER_SIZE, HEADER_SIZE + headers_length)
        except FramingError:
            return None
        return request_id, size, ResponseStatus.Ok if kind == RESPONSE else ResponseStatus.Error

    def relabel(self, frame: bytes, request_id: int) -> Encoded:
        return frame[:4] + _ID.pack(request_id) + frame[8:]

    def on_error(self, metadata: Metadata, error: LocalError) -> bytes:
        return build_frame(
            ERROR,
            metadata.request_id,
            {"error-type": error.type.name, "error-message": error.message},
        )

    def heartbeat_reply(self, metadata: Metadata) -> bytes | None:
        if metadata.codec_state == PING:
            return build_frame(PONG, metadata.request_id)
        return None

    def heartbeat_request(self, request_id: int) -> bytes:
        """A ping with ``request_id``, which the peer answers with a pong carrying it."""
        return build_frame(PING, request_id)

    def drain_notice(self) -> bytes:
        """A pong with a ``goaway`` header: one heartbeat that needs no reply."""
        return _DRAIN_NOTICE

    def is_drain_notice(self, metadata: Metadata) -> bool:
        """A pong with ``goaway`` only: never a ping or a plain pong (keep-alives)."""
        return metadata.codec_state == PONG and GOAWAY in metadata.attributes


#: A pong with a ``goaway`` header, id 0 (it answers no ping).
_DRAIN_NOTICE = build_frame(PONG, 0, {GOAWAY: "draining"})
