"""The {{ cookiecutter.protocol_name }} codec: bytes in, Metadata out, bytes back (sans-IO).

It implements the SDK's codec contract (``docs/contract.md`` in the SDK) for the example wire
format in :mod:`{{ cookiecutter.package_name }}.protocol`. The conformance kit checks every
rule; run ``pytest`` or ``metaprotocol check {{ cookiecutter.protocol_name }}``.
"""

from __future__ import annotations

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
    ResponseStatus,
{%- if cookiecutter.streaming %}
    StreamType,
{%- endif %}
    UnsupportedError,
    take_frame,
)

from .protocol import (
    HEADER,
    HEADER_SIZE,
    KV_LENGTH_OFFSET,
    REQUEST_ID_OFFSET,
{%- if cookiecutter.streaming %}
    STREAM_KINDS,
{%- endif %}
    VERSION,
    Kind,
    build_frame,
    decode_kv,
    encode_kv,
)

#: How each kind of frame maps to Aeraki's message types.
MESSAGE_TYPES: dict[int, MessageType] = {
    Kind.REQUEST: MessageType.Request,
    Kind.RESPONSE: MessageType.Response,
{%- if cookiecutter.oneway %}
    Kind.ONEWAY: MessageType.Oneway,
{%- endif %}
{%- if cookiecutter.heartbeat %}
    Kind.PING: MessageType.Heartbeat,
    Kind.PONG: MessageType.Heartbeat,
{%- endif %}
    Kind.ERROR: MessageType.Error,
{%- if cookiecutter.streaming %}
    Kind.STREAM_OPEN: MessageType.Stream_Init,
    Kind.STREAM_DATA: MessageType.Stream_Data,
    Kind.STREAM_HALF_CLOSE: MessageType.Stream_Close_One_Way,
    Kind.STREAM_CLOSE: MessageType.Stream_Close_Two_Way,
{%- endif %}
}


class {{ cookiecutter.__codec_class }}(Codec):
    """Codec for the {{ cookiecutter.protocol_name }} protocol.

    ``codec_state`` of a decoded message is its ``protocol.Kind``.
{%- if cookiecutter.streaming %} A stream frame's ``stream_id``
    is its request id field and its ``stream_type`` ``BidiStream`` (the engine refuses a
    stream opened with id 0); every other frame's ``stream_id`` is 0.
{%- endif %}
    """

    protocol = "{{ cookiecutter.protocol_name }}"
    capabilities = Capabilities(
        heartbeat={{ cookiecutter.heartbeat }},
        oneway={{ cookiecutter.oneway }},
        mutation=True,
        response_mutation=True,
        rewrite_request_id={{ cookiecutter.rewrite_request_id }},
        error_reply=True,
{%- if cookiecutter.streaming %}
        streaming=True,
{%- endif %}
    )

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        """Consume one complete frame from the front of ``buffer``, or nothing."""
        fields = HEADER.unpack(buffer)  # None until the 16 header bytes are there
        if fields is None:
            return NEED_DATA
        _magic, version, kind, request_id, status, kv_length, body_length = fields
        if version != VERSION:
            raise UnsupportedError(f"version {version} is not supported", offset=2)
        message_type = MESSAGE_TYPES.get(kind)
        if message_type is None:
            raise FramingError(f"unknown frame kind {kind}", offset=3)
{%- if cookiecutter.streaming %}
        stream_id = request_id if kind in STREAM_KINDS else 0
{%- endif %}
        size = HEADER_SIZE + kv_length + body_length
        if size > self.max_frame_size:
            # Refused from the length fields alone, before the body is buffered.
{%- if cookiecutter.streaming %}
            # A stream frame's metadata carries its stream id: on_error answers with it.
            partial = Metadata(message_type, request_id=request_id, stream_id=stream_id)
{%- else %}
            partial = Metadata(message_type, request_id=request_id)
{%- endif %}
            raise FrameTooLargeError(size, self.max_frame_size, offset=10, metadata=partial)
        if len(buffer) < size:
            return NeedData(size)
        try:
            pairs = decode_kv(buffer, HEADER_SIZE, HEADER_SIZE + kv_length)
        except FramingError as exc:
            # The frame's extent is known: an engine may drop it and go on with the next one.
{%- if cookiecutter.streaming %}
            exc.metadata = Metadata(message_type, request_id=request_id, stream_id=stream_id)
{%- else %}
            exc.metadata = Metadata(message_type, request_id=request_id)
{%- endif %}
            exc.frame_size = size
            raise
        frame = take_frame(buffer, size)
        if kind == Kind.RESPONSE:
            response_status = ResponseStatus.Ok if status == 0 else ResponseStatus.Error
        elif kind == Kind.ERROR:
            response_status = ResponseStatus.Error
        else:
            response_status = ResponseStatus.Unknown
        return Metadata(
            message_type,
            frame=frame,
            request_id=request_id,
            operation_name=pairs.get("method", ""),
            header_size=HEADER_SIZE + kv_length,
            body_size=body_length,
            response_status=response_status,
            attributes=Attributes(pairs),
            codec_state=Kind(kind),
{%- if cookiecutter.streaming %}
            stream_type=StreamType.BidiStream if kind in STREAM_KINDS else StreamType.Unary,
            stream_id=stream_id,
{%- endif %}
        )

    def encode(
        self,
        message: Metadata,
        mutation: Mutation | None = None,
        *,
        request_id: int | None = None,
    ) -> Encoded:
        """The frame with ``mutation`` written into its key-values and, maybe, a new id."""
        frame = message.frame
        if not mutation and (request_id is None or request_id == message.request_id):
            return frame
        header = bytearray(frame[:HEADER_SIZE])
        if request_id is not None:
            if not 0 <= request_id <= 0xFFFFFFFF:
                raise MutationError(f"request id {request_id} does not fit in 32 bits")
            header[REQUEST_ID_OFFSET : REQUEST_ID_OFFSET + 4] = request_id.to_bytes(4, "big")
        if not mutation:
            return [bytes(header), message.view(HEADER_SIZE)]
        pairs = Attributes(decode_kv(frame, HEADER_SIZE, message.header_size))
        pairs.update(mutation)
        try:
            block = encode_kv(pairs.to_dict())
        except ValueError as exc:
            raise MutationError(str(exc)) from None
        if len(block) > 0xFFFF:
            raise MutationError(f"key-value block of {len(block)} bytes does not fit")
        header[KV_LENGTH_OFFSET : KV_LENGTH_OFFSET + 2] = len(block).to_bytes(2, "big")
        # Only the key-value block is rewritten; the body is an untouched slice of the frame.
        return [bytes(header), block, message.body]

    def on_error(self, metadata: Metadata, error: LocalError) -> bytes:
        """An ERROR frame with the request's id; the status byte carries the error type.
{%- if cookiecutter.streaming %}

        For a stream frame (the engine could not open or keep the stream) the id is the
        stream's: the client reads the ERROR as the end of that stream.
        """
{%- else %}"""{% endif %}
        return build_frame(
            Kind.ERROR,
            metadata.request_id,
            {"error-type": error.type.name, "error-message": error.message},
            status=int(error.type),
        )
{%- if cookiecutter.heartbeat %}

    def heartbeat_reply(self, metadata: Metadata) -> bytes | None:
        """PONG for a PING; a PONG needs no reply."""
        if metadata.codec_state == Kind.PING:
            return build_frame(Kind.PONG, metadata.request_id)
        return None

    # Optional: a drain notice, the message telling the peer that this connection is closing
    # (send no new requests on it; those sent are still answered). An engine writes it to its
    # clients when it drains, and retires an upstream connection whose peer sent it. To have
    # one, declare ``drain_notice=True`` in ``capabilities`` (it needs ``heartbeat``) and
    # implement both methods; the kit's ``drain_notice_*`` checks test them (mark the notices
    # your strategy generates with ``expect={"drain_notice": True}``). A PONG carrying a
    # ``goaway`` key, say:
    #
    # def drain_notice(self) -> bytes:
    #     """A PONG with ``goaway``: one heartbeat that needs no reply, built from no state."""
    #     return build_frame(Kind.PONG, 0, {"goaway": "draining"})
    #
    # def is_drain_notice(self, metadata: Metadata) -> bool:
    #     """That PONG only: true for every PONG would retire connections at each keep-alive."""
    #     return metadata.codec_state == Kind.PONG and "goaway" in metadata.attributes

    # Optional: a heartbeat request (a ping), which an engine sends on idle connections to
    # keep them open past the peer's idle check and to find a peer that is gone. To have one,
    # declare ``heartbeat_request=True`` in ``capabilities`` (it needs ``heartbeat``); the
    # kit's ``heartbeat_request_*`` checks test it (one Heartbeat with the id, for ids up to
    # ``max_request_id``; answered by ``heartbeat_reply`` with a reply that needs none; built
    # from no state). A PING, say:
    #
    # def heartbeat_request(self, request_id: int) -> bytes:
    #     """A PING with ``request_id``, which the peer answers with a PONG carrying it."""
    #     return build_frame(Kind.PING, request_id)
{%- endif %}
