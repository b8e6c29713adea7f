"""``ThriftCodec``: Thrift framed, unframed and THeader transports; binary and compact."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from dataclasses import replace
from typing import Any, ClassVar

from metaprotocol_sdk.codec import (
    DEFAULT_MAX_FRAME_SIZE,
    NEED_DATA,
    Capabilities,
    Codec,
    Encoded,
    LocalError,
    NeedData,
    ReplyHead,
    take_frame,
)
from metaprotocol_sdk.enums import MessageType, ResponseStatus
from metaprotocol_sdk.errors import (
    CodecError,
    FrameTooLargeError,
    FramingError,
    MutationError,
    UnsupportedError,
)
from metaprotocol_sdk.metadata import Attributes, Metadata, Mutation

from . import binary, compact, theader
from .detect import AUTO, BINARY, COMPACT, FRAMED, HEADER, UNFRAMED, detect
from .options import choice, flag, positive
from .replies import APPLICATION_EXCEPTION_TYPES, error_text
from .resumable import ResumableSkip
from .skip import skip_binary_struct, skip_compact_struct
from .state import WireState
from .wire import (
    BINARY_VERSION_1,
    BINARY_VERSION_MASK,
    CALL,
    EXCEPTION,
    I32,
    ONEWAY,
    REPLY,
    THEADER_PROTOCOL_BINARY,
    THEADER_PROTOCOL_COMPACT,
    Buffer,
    Incomplete,
    check_seqid,
    write_varint,
)

#: MessageType by Thrift message type code (CALL 1, REPLY 2, EXCEPTION 3, ONEWAY 4).
_MESSAGE_TYPES = (
    MessageType.Error,  # 0 is not a valid code; never looked up
    MessageType.Request,
    MessageType.Response,
    MessageType.Error,
    MessageType.Oneway,
)
_FRAMED_BINARY = (FRAMED, BINARY)
_unpack_i32 = I32.unpack_from
# Frame length, strict binary version (0x8001), message type, name length.
_FRAMED_STRICT_HEAD = struct.Struct(">iHxBi")
_VERSION_1 = BINARY_VERSION_1 >> 16
_UNFRAMED_STRICT_HEAD = struct.Struct(">Ii")  # version | type, name length
_new_state = tuple.__new__  # WireState without the NamedTuple keyword machinery
#: A MessageBegin's fields in order: the fast paths pass plain tuples, not MessageBegin.
_BeginFields = tuple[int, str, int, int, int, int, bool]


_folded = Attributes.from_folded  # bound once: the hot paths skip the class attribute lookup
#: Response status by Thrift message type (a reply may still turn out to be an Error).
_STATUSES = (
    ResponseStatus.Unknown,
    ResponseStatus.Unknown,
    ResponseStatus.Ok,
    ResponseStatus.Error,
    ResponseStatus.Unknown,
)
#: Default bound on struct and container nesting while skipping unframed messages.
DEFAULT_MAX_DEPTH = 64

#: What every framed strict-binary message of one type and method shares (all but the frame
#: and the seqid): its MessageType, ResponseStatus, WireState (None when the name is
#: multiplexed, which takes the general path) and ``method`` attribute entry.
_Shape = tuple[MessageType, ResponseStatus, WireState | None, tuple[str, str]]
#: Each codec (one connection) remembers the shapes of up to this many method names per Thrift
#: message type, names of up to _SHAPE_NAME_MAX bytes: at most 5 x 64 x 128 = 40 KiB of names.
_MAX_SHAPES = 64
_SHAPE_NAME_MAX = 128
#: Replies up to this size are relabelled into one new frame; larger ones keep a view.
_RELABEL_COPY_LIMIT = 16 * 1024


def _declares_exception(buffer: bytearray, body: int, end: int) -> bool:
    """Whether the binary reply struct at ``body`` starts with a declared exception: its first
    field is not the ``success`` field 0 (a field type, then an i16 id other than 0).

    The struct must lie before ``end``, the end of its frame: a ``FramingError`` (with
    ``frame_size=end``) when its first field's header does not.
    """
    if body < end and not buffer[body]:
        return False  # an empty struct: a void success
    if body + 3 > end:
        raise FramingError("reply struct runs past the frame end", offset=body, frame_size=end)
    return bool(buffer[body + 1] or buffer[body + 2])


def _framed_shape(shapes: dict[str, _Shape], mtype: int, name: str, name_end: int) -> _Shape:
    """The shape of a framed strict-binary message, remembered in ``shapes`` within bounds."""
    state = None
    if ":" not in name:
        state = WireState(FRAMED, BINARY, True, mtype, name, name_end, 4, None)
    shape = (_MESSAGE_TYPES[mtype], _STATUSES[mtype], state, ("method", name))
    if len(shapes) < _MAX_SHAPES and name_end - 12 <= _SHAPE_NAME_MAX:
        shapes[name] = shape
    return shape


class _Pending:
    """An unframed message not complete yet: its walk, its header, and how many bytes of the
    buffer the walk has seen (a shorter buffer cannot hold the same message)."""

    __slots__ = ("begin", "protocol", "seen", "walk")

    def __init__(self, walk: ResumableSkip, begin: binary.MessageBegin, protocol: str) -> None:
        self.walk = walk
        self.begin = begin
        self.protocol = protocol
        self.seen = 0


class ThriftCodec(Codec):
    """Apache Thrift codec: framed, unframed (buffered) and THeader; binary and compact.

    Options (all keyword-only; strings are accepted, so configuration maps work directly):

    * ``transport``: ``auto`` (default), ``framed``, ``unframed`` or ``header``.
    * ``protocol``: ``auto`` (default), ``binary`` or ``compact``.
    * ``strict``: ``True`` (default) accepts only strict binary (with a version word);
      ``False`` also accepts non-strict binary (and lets ``auto`` look for it by shape).
    * ``max_frame_size``: largest frame accepted, in bytes, counting the whole frame (the
      4-byte length prefix included; for unframed messages, the whole message).
    * ``max_depth``: deepest struct/container nesting accepted when skipping a message.
    * ``max_inflated_size``: largest zlib-inflated THeader payload accepted when a request id
      must be rewritten inside it (decoding only inflates the first 64 KiB).
    * ``mutation_without_headers``: what :meth:`encode` does with a mutation for a framed or
      unframed message, which has no header to carry it: ``error`` (default:
      :class:`~metaprotocol_sdk.errors.MutationError`) or ``skip`` (the message goes out
      unchanged, and :attr:`mutations_skipped` counts it).

    In ``auto`` mode the transport and protocol are detected for every message.
    """

    protocol: ClassVar[str] = "thrift"
    capabilities: ClassVar[Capabilities] = Capabilities(
        heartbeat=False,
        oneway=True,
        streaming=False,
        mutation=True,
        response_mutation=True,
        rewrite_request_id=True,
        error_reply=True,
        peek_reply=True,
    )
    #: ``__init__``'s options (the compiled build has no signature to read them from).
    option_names: ClassVar[tuple[str, ...]] = (
        "transport",
        "protocol",
        "strict",
        "max_frame_size",
        "max_depth",
        "mutation_without_headers",
        "max_inflated_size",
    )

    def __init__(
        self,
        *,
        transport: str = AUTO,
        protocol: str = AUTO,
        strict: bool | int | str = True,
        max_frame_size: int | str = DEFAULT_MAX_FRAME_SIZE,
        max_depth: int | str = DEFAULT_MAX_DEPTH,
        mutation_without_headers: str = "error",
        max_inflated_size: int | str = DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        super().__init__(max_frame_size=positive("max_frame_size", max_frame_size))
        self.transport = choice("transport", transport, (AUTO, FRAMED, UNFRAMED, HEADER))
        self.wire_protocol = choice("protocol", protocol, (AUTO, BINARY, COMPACT))
        self.strict = flag("strict", strict)
        self.max_depth = positive("max_depth", max_depth)
        self.max_inflated_size = positive("max_inflated_size", max_inflated_size)
        self.mutation_without_headers = choice(
            "mutation_without_headers", mutation_without_headers, ("skip", "error")
        )
        #: Mutations not written because the message's transport has no headers.
        self.mutations_skipped = 0
        #: The unframed message being walked across reads, if one is incomplete.
        self._pending: _Pending | None = None
        #: Shapes of framed strict-binary messages by method name, per message type code.
        self._shapes: tuple[dict[str, _Shape], ...] = ({}, {}, {}, {}, {})
        self._protocol = self.wire_protocol
        self._detected = (self.transport, self.wire_protocol)
        # Whether decode tries the framed strict-binary fast path first: AUTO (and then records
        # the detection), FRAMED, or None when the configuration rules it out.
        self._fast_framed: str | None = None
        if self.wire_protocol != COMPACT and self.transport in (AUTO, FRAMED):
            self._fast_framed = self.transport

    @property
    def active_capabilities(self) -> Capabilities:
        """No mutations when the options force a transport without headers (framed or
        unframed): only THeader carries them."""
        if self.transport in (FRAMED, UNFRAMED):
            return replace(self.capabilities, mutation=False, response_mutation=False)
        return self.capabilities

    def reset(self) -> None:
        """Forget what ``auto`` detected last (detection is per message, so nothing else)."""
        self._protocol = self.wire_protocol
        self._detected = (self.transport, self.wire_protocol)
        self._pending = None

    @property
    def detected(self) -> tuple[str, str]:
        """``(transport, protocol)`` of the last message (``auto`` where not known)."""
        return self._detected

    # -- decode -----------------------------------------------------------------------------

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        """Consume one complete Thrift message from the front of ``buffer``, or nothing."""
        fast = self._fast_framed
        available = len(buffer)
        if fast and available >= 12:
            # Fast path: framed strict binary (the common case) whose message header lies
            # inside the frame; anything else takes the general paths below.
            size, version, mtype, name_len = _FRAMED_STRICT_HEAD.unpack_from(buffer, 0)
            if 0 < size <= self.max_frame_size - 4 and version == _VERSION_1 and name_len >= 0:
                if fast == AUTO and self._detected is not _FRAMED_BINARY:
                    self._protocol = BINARY  # set together with _detected everywhere
                    self._detected = _FRAMED_BINARY
                total = size + 4
                if available < total:
                    return NeedData(total)
                name_end = 12 + name_len
                body = name_end + 4
                if body <= total and 1 <= mtype <= 4:
                    try:
                        name = buffer[12:name_end].decode()
                    except UnicodeDecodeError:
                        pass  # the general path reports it
                    else:
                        shapes = self._shapes[mtype]
                        message_type, status, state, method = shapes.get(name) or _framed_shape(
                            shapes, mtype, name, name_end
                        )
                        if mtype == REPLY and _declares_exception(buffer, body, total):
                            status = ResponseStatus.Error
                        seqid = _unpack_i32(buffer, name_end)[0]
                        frame = take_frame(buffer, total)
                        if state is None:  # multiplexed: service and method attributes
                            begin = (mtype, name, seqid, name_end, 4, body, True)
                            declared = status is ResponseStatus.Error and mtype == REPLY
                            return self._metadata(frame, begin, FRAMED, BINARY, None, declared)
                        return Metadata(
                            message_type,
                            frame,
                            seqid,
                            name,
                            body,
                            total - body,
                            status,
                            _folded({"method": method}),
                            state,
                        )
                return self._decode_framed(buffer)
        transport = self.transport
        if transport == FRAMED:
            return self._decode_framed(buffer)
        if transport == AUTO:
            # Detected per message, as Apache's THeader server does: a connection keeps one
            # variant, but a codec fed captured frames of several variants still works.
            if len(buffer) >= 12 and buffer[0] < 0x80 and buffer[4] == 0x80:
                # The most common case, without detect() or allocations.
                if self.wire_protocol != COMPACT:
                    self._protocol = BINARY
                self._detected = _FRAMED_BINARY
                return self._decode_framed(buffer)
            if len(buffer) >= 12 and buffer[0] < 0x80 and buffer[4] == 0x0F and buffer[5] == 0xFF:
                transport, protocol = HEADER, AUTO
            elif len(buffer) >= 2 and buffer[0] == 0x80 and buffer[1] == 0x01:
                transport, protocol = UNFRAMED, BINARY
            else:
                try:
                    transport, protocol = detect(buffer, not self.strict, self.max_frame_size)
                except Incomplete as more:
                    if more.needed > self.max_frame_size:
                        raise FrameTooLargeError(
                            more.needed, self.max_frame_size, offset=0
                        ) from None
                    return NEED_DATA
            if transport == HEADER:
                protocol = self.wire_protocol  # the THeader block names the payload protocol
                self._protocol = protocol
            elif self.wire_protocol == AUTO:
                self._protocol = protocol
            self._detected = (transport, protocol)
            if transport == FRAMED:
                return self._decode_framed(buffer)
        if transport == UNFRAMED:
            return self._decode_unframed(buffer)
        return self._decode_header(buffer)

    def _frame_size(self, buffer: bytearray, transport: str) -> int:
        """Total size of the frame at the front of ``buffer`` (prefix included)."""
        size: int = _unpack_i32(buffer, 0)[0]
        if size <= 0:
            raise FramingError(f"bad frame length {size}", offset=0)
        if size + 4 > self.max_frame_size:  # the limit bounds the whole frame, prefix included
            raise FrameTooLargeError(
                size + 4,
                self.max_frame_size,
                offset=0,
                metadata=self._partial(buffer, transport),
            )
        return size + 4

    def _reader(self, first: int) -> tuple[str, Callable[..., Any]]:
        protocol = self._protocol
        if protocol == AUTO:
            protocol = COMPACT if first == 0x82 else BINARY
        if protocol == COMPACT:
            return COMPACT, compact.read_message_begin
        return BINARY, self._read_binary

    def _read_binary(self, buf: Buffer, pos: int, end: int) -> binary.MessageBegin:
        return binary.read_message_begin(buf, pos, end, not self.strict)

    def _decode_framed(self, buffer: bytearray) -> Metadata | NeedData:
        available = len(buffer)
        if available < 12:
            if available >= 4:
                self._frame_size(buffer, FRAMED)  # refuse a bad length early
            if available < 8:
                return NEED_DATA
        total = self._frame_size(buffer, FRAMED)
        if available < total:
            return NeedData(total)
        if buffer[4] == 0x82 and self._protocol != BINARY and total > 9:
            # Fast path: framed compact with a one-byte seqid and name length.
            second = buffer[5]
            mtype = second >> 5
            name_end = 8 + buffer[7]
            if (
                second & 0x1F == 1
                and 1 <= mtype <= 4
                and buffer[6] < 0x80
                and buffer[7] < 0x80
                and name_end + 1 < total
            ):
                head = buffer[name_end]
                # A reply's first field: short form = id delta (>0: a declared exception);
                # long form with zigzag 0 = field 0 (success); empty struct = void success.
                declared = mtype == REPLY and head != 0 and bool(head >> 4 or buffer[name_end + 1])
                try:
                    name = buffer[8:name_end].decode()
                except UnicodeDecodeError:
                    pass
                else:
                    frame = take_frame(buffer, total)
                    begin = (mtype, name, frame[6], 6, 1, name_end, True)
                    return self._metadata(frame, begin, FRAMED, COMPACT, None, declared)
        protocol, read = self._reader(buffer[4])
        try:
            begin = read(buffer, 4, total)
            declared = self._declares_exception(protocol, begin, buffer, total)
        except Incomplete:
            raise FramingError(
                "message header runs past the frame end", offset=4, frame_size=total
            ) from None
        except CodecError as exc:
            exc.frame_size = total
            raise
        frame = take_frame(buffer, total)
        return self._metadata(frame, begin, FRAMED, protocol, None, declared)

    def _decode_unframed(self, buffer: bytearray) -> Metadata | NeedData:
        available = len(buffer)
        if available == 0:
            return NEED_DATA
        pending = self._pending
        if pending is not None:
            if available >= pending.seen and buffer.startswith(pending.walk.head):
                return self._resume(buffer, pending)
            self._pending = None  # not the message the walk started on: start over
        if available >= 12 and buffer[0] == 0x80 and self._protocol != COMPACT:
            # Fast path: unframed strict binary, complete in the buffer; anything else
            # (incomplete, unusual or wrong) takes the general path.
            word, name_len = _UNFRAMED_STRICT_HEAD.unpack_from(buffer, 0)
            name_end = 8 + name_len
            body = name_end + 4
            mtype = word & 0xFF
            if (
                word & BINARY_VERSION_MASK == BINARY_VERSION_1
                and name_len >= 0
                and body < available
                and 1 <= mtype <= 4
                and body <= self.max_frame_size
            ):
                try:
                    name = buffer[8:name_end].decode()
                    end = skip_binary_struct(buffer, body, available, self.max_depth)
                except Incomplete:
                    seqid = _unpack_i32(buffer, name_end)[0]
                    begin = binary.MessageBegin(mtype, name, seqid, name_end, 4, body, True)
                    return self._walk(buffer, begin, BINARY)
                except (UnicodeDecodeError, CodecError):
                    end = -1  # the general path raises the precise error
                if 0 < end <= self.max_frame_size:
                    declared = mtype == REPLY and _declares_exception(buffer, body, end)
                    seqid = _unpack_i32(buffer, name_end)[0]
                    frame = take_frame(buffer, end)
                    fields = (mtype, name, seqid, name_end, 4, body, True)
                    return self._metadata(frame, fields, UNFRAMED, BINARY, None, declared)
        protocol, read = self._reader(buffer[0])
        try:
            begin = read(buffer, 0, available)
        except Incomplete as more:
            needed = max(more.needed, available)
            if needed > self.max_frame_size:
                raise FrameTooLargeError(needed, self.max_frame_size, offset=0) from None
            return NEED_DATA
        body = begin.body
        skip = skip_compact_struct if protocol == COMPACT else skip_binary_struct
        try:
            end = skip(buffer, body, available, self.max_depth)
        except Incomplete:
            return self._walk(buffer, begin, protocol)
        except CodecError as exc:
            if exc.metadata is None:
                exc.metadata = self._metadata(b"", begin, UNFRAMED, protocol, None, False)
            raise
        return self._unframed_message(buffer, end, begin, protocol)

    def _walk(
        self, buffer: bytearray, begin: binary.MessageBegin, protocol: str
    ) -> Metadata | NeedData:
        """Start walking an unframed message that is not all here yet, resumably: later reads
        continue where this one stops instead of starting over."""
        body = begin.body
        walk = ResumableSkip(bytes(buffer[:body]), protocol, body, self.max_depth)
        return self._resume(buffer, _Pending(walk, begin, protocol))

    def _resume(self, buffer: bytearray, pending: _Pending) -> Metadata | NeedData:
        """Walk the pending unframed message over the bytes that arrived since."""
        self._pending = None
        try:
            done, at = pending.walk.feed(buffer)
            if not done and at > self.max_frame_size:
                raise FrameTooLargeError(at, self.max_frame_size, offset=0)
        except CodecError as exc:
            if exc.metadata is None:
                exc.metadata = self._metadata(
                    b"", pending.begin, UNFRAMED, pending.protocol, None, False
                )
            raise
        if not done:
            pending.seen = len(buffer)
            self._pending = pending
            return NEED_DATA
        return self._unframed_message(buffer, at, pending.begin, pending.protocol)

    def _unframed_message(
        self, buffer: bytearray, end: int, begin: binary.MessageBegin, protocol: str
    ) -> Metadata:
        """Take the complete unframed message of ``end`` bytes off the buffer."""
        if end > self.max_frame_size:
            raise FrameTooLargeError(
                end,
                self.max_frame_size,
                offset=0,
                metadata=self._metadata(b"", begin, UNFRAMED, protocol, None, False),
            )
        declared = self._declares_exception(protocol, begin, buffer, end)
        frame = take_frame(buffer, end)
        return self._metadata(frame, begin, UNFRAMED, protocol, None, declared)

    def _decode_header(self, buffer: bytearray) -> Metadata | NeedData:
        available = len(buffer)
        if available < 8:
            if available >= 4:
                self._frame_size(buffer, HEADER)
            return NEED_DATA
        if buffer[4] != 0x0F or buffer[5] != 0xFF:
            raise FramingError(
                f"expected the THeader magic 0x0fff, got 0x{buffer[4]:02x}{buffer[5]:02x}",
                offset=4,
            )
        total = self._frame_size(buffer, HEADER)
        if available < total:
            return NeedData(total)
        try:
            block = theader.read_block(buffer, total)
            protocol = self._header_protocol(block)
            data: Buffer = buffer
            start, end = block.payload_offset, total
            if block.transform_count:
                # Compressed payload: inflate it (bounded) to read the message header.
                try:
                    data = theader.untransform(
                        bytes(buffer[start:total]), block, theader.HEADER_PEEK, whole=False
                    )
                except CodecError as exc:
                    begin = (CALL, "", block.seqid, 0, 0, total, True)
                    exc.metadata = self._metadata(b"", begin, HEADER, protocol, block, False)
                    raise
                start, end = 0, len(data)
            if protocol == COMPACT:
                begin = compact.read_message_begin(data, start, end)
            else:
                begin = self._read_binary(data, start, end)
            declared = self._declares_exception(protocol, begin, data, end)
            if block.pairs != len(block.items):
                raise FramingError(
                    f"{theader.key_clash(block)}: refused as ambiguous (routing and "
                    "authorization read one value for keys equal ignoring case, the server's "
                    "map may read another)",
                    offset=theader.PREFIX_SIZE,
                    metadata=self._metadata(b"", begin, HEADER, protocol, block, False),
                )
            if block.persistent and begin[0] in (CALL, ONEWAY):
                raise FramingError(
                    f"{block.persistent} persistent THeader info headers (fbthrift's info id "
                    "2): refused, as a server applies them to every later message of its "
                    "connection, which the proxy shares between clients and routes and "
                    "authorizes message by message; send them as ordinary info headers with "
                    "each request",
                    offset=theader.PREFIX_SIZE,
                    metadata=self._metadata(b"", begin, HEADER, protocol, block, False),
                )
        except Incomplete:
            raise FramingError(
                "message header runs past the frame end", offset=4, frame_size=total
            ) from None
        except CodecError as exc:
            exc.frame_size = total
            raise
        frame = take_frame(buffer, total)
        message = self._metadata(frame, begin, HEADER, protocol, block, declared)
        if block.transform_count:  # offsets in codec_state refer to the inflated payload
            message.header_size = block.payload_offset
            message.body_size = total - block.payload_offset
        return message

    def _header_protocol(self, block: theader.THeaderBlock) -> str:
        if block.protocol_id == THEADER_PROTOCOL_BINARY:
            protocol = BINARY
        elif block.protocol_id == THEADER_PROTOCOL_COMPACT:
            protocol = COMPACT
        else:
            raise UnsupportedError(
                f"THeader payload protocol id {block.protocol_id} (only binary 0 and compact 2)",
                offset=theader.PREFIX_SIZE,
            )
        if self._protocol not in (AUTO, protocol):
            raise FramingError(
                f"THeader payload is {protocol} but protocol={self._protocol} is configured",
                offset=theader.PREFIX_SIZE,
            )
        return protocol

    @staticmethod
    def _declares_exception(
        protocol: str, begin: binary.MessageBegin, buf: Buffer, end: int
    ) -> bool:
        """Whether a reply's struct starts with a declared exception (a field other than the
        ``success`` field 0); False for other message types."""
        if begin.message_type != REPLY:
            return False
        read = compact.reply_field_id if protocol == COMPACT else binary.reply_field_id
        return bool(read(buf, begin.body, end))

    def _partial(self, buffer: bytearray, transport: str) -> Metadata | None:
        """Metadata from the message header of an oversized frame, if it is already buffered."""
        try:
            if transport == HEADER:
                return self._partial_header(buffer)
            protocol, read = self._reader(buffer[4] if len(buffer) > 4 else 0)
            begin = read(buffer, 4, len(buffer))
        except (Incomplete, CodecError):
            return None
        return self._metadata(b"", begin, transport, protocol, None, False)

    def _partial_header(self, buffer: bytearray) -> Metadata | None:
        """What the buffered start of an oversized THeader frame tells (id, protocol, name)."""
        fields = theader.PREFIX.unpack(buffer, 0)
        if fields is None:
            return None
        _, _, flags, seqid, words = fields
        protocol_id = buffer[14] if len(buffer) > 14 else THEADER_PROTOCOL_BINARY
        protocol = COMPACT if protocol_id == THEADER_PROTOCOL_COMPACT else BINARY
        payload = theader.PREFIX_SIZE + words * 4
        block = theader.THeaderBlock(flags, seqid, protocol_id, b"\x00", [], b"", payload)
        begin = (CALL, "", seqid, 0, 0, 0, True)
        with contextlib.suppress(Incomplete, CodecError):
            if protocol == COMPACT:
                begin = compact.read_message_begin(buffer, payload, len(buffer))
            else:
                begin = self._read_binary(buffer, payload, len(buffer))
        return self._metadata(b"", begin, HEADER, protocol, block, False)

    def _metadata(
        self,
        frame: bytes,
        begin: _BeginFields,
        transport: str,
        protocol: str,
        block: theader.THeaderBlock | None,
        declared_exception: bool,
    ) -> Metadata:
        """The one general place a message's Metadata is built (the framed strict-binary fast
        path builds the same from its per-method shapes). ``frame`` is empty for the partial
        metadata of an error; ``declared_exception``: a reply whose struct holds a declared
        exception (an Error status)."""
        mtype, name, seqid, seqid_offset, seqid_size, body, strict = begin
        if ":" in name:
            service, _, method = name.partition(":")
            items = {"service": ("service", service), "method": ("method", method)}
        else:
            method = name
            items = {"method": ("method", method)}
        if block is not None and block.items:
            # Info headers first, so the protocol's own facts win on a name clash.
            headers = dict(block.items)
            headers.update(items)
            items = headers
        status = ResponseStatus.Error if declared_exception else _STATUSES[mtype]
        return Metadata(
            _MESSAGE_TYPES[mtype],
            frame,
            seqid,
            method,
            body,
            len(frame) - body if frame else 0,
            status,
            _folded(items),
            _new_state(
                WireState,
                (transport, protocol, strict, mtype, name, seqid_offset, seqid_size, block),
            ),
        )

    # -- replies forwarded undecoded --------------------------------------------------------

    def peek_reply(self, buffer: bytearray) -> ReplyHead | None:
        """The seqid, size and status of a framed strict-binary reply, read from its message
        header as :meth:`decode`'s fast path reads it; ``None`` for anything else (other
        variants, calls, multiplexed names, incomplete frames)."""
        if not self._fast_framed or len(buffer) < 12:
            return None
        size, version, mtype, name_len = _FRAMED_STRICT_HEAD.unpack_from(buffer, 0)
        total = size + 4
        name_end = 12 + name_len
        body = name_end + 4
        if (
            version != _VERSION_1
            or not 0 < size <= self.max_frame_size - 4
            or name_len < 0
            or total > len(buffer)
            or body >= total
            or (mtype != REPLY and mtype != EXCEPTION)
        ):
            return None
        try:
            name = buffer[12:name_end].decode()
        except UnicodeDecodeError:
            return None
        if ":" in name:  # multiplexed: decode reads the service name too
            return None
        status = _STATUSES[mtype]
        if mtype == REPLY:
            try:
                if _declares_exception(buffer, body, total):
                    status = ResponseStatus.Error
            except FramingError:
                return None  # decode refuses it
        seqid: int = _unpack_i32(buffer, name_end)[0]
        return seqid, total, status

    def relabel(self, frame: bytes, request_id: int) -> Encoded:
        """A framed strict-binary reply with ``request_id`` as its seqid (the rest of a large
        frame as a view, not a copy)."""
        at = 12 + _unpack_i32(frame, 8)[0]
        head = frame[:at] + check_seqid(request_id).to_bytes(4, "big")
        if len(frame) <= _RELABEL_COPY_LIMIT:
            return head + frame[at + 4 :]
        return [head, memoryview(frame)[at + 4 :]]

    # -- encode -----------------------------------------------------------------------------

    def encode(
        self,
        message: Metadata,
        mutation: Mutation | None = None,
        *,
        request_id: int | None = None,
    ) -> Encoded:
        """The frame of ``message`` with ``mutation`` in its THeader and a new seqid if given.

        With no mutation and no new id this returns ``message.frame`` itself. Framed and
        unframed messages have no headers: see ``mutation_without_headers``.
        """
        if not mutation and request_id is None:
            return message.frame
        state = message.codec_state
        if not isinstance(state, WireState):
            raise UnsupportedError("this metadata was not produced by the thrift codec")
        frame = message.frame
        seqid = None if request_id is None else check_seqid(request_id)
        if state.transport == HEADER and state.header is not None:
            return self._encode_header(frame, state, state.header, mutation, seqid)
        if mutation:
            if self.mutation_without_headers == "error":
                raise MutationError(
                    f"a {state.transport} Thrift message has no headers to carry a mutation "
                    "(only the THeader transport does)"
                )
            self.mutations_skipped += 1
        if seqid is None:
            return frame
        # Head, new seqid, and the rest of the frame as an untouched slice (no copy of the body).
        at = state.seqid_offset
        size = 4 if state.protocol != COMPACT else state.seqid_size
        encoded = seqid.to_bytes(4, "big") if state.protocol != COMPACT else write_varint(seqid)
        head = frame[:at]
        if len(encoded) != size and state.transport == FRAMED:
            head = (len(frame) - 4 + len(encoded) - size).to_bytes(4, "big") + head[4:]
        return [head, encoded, memoryview(frame)[at + size :]]

    def _encode_header(
        self,
        frame: bytes,
        state: WireState,
        block: theader.THeaderBlock,
        mutation: Mutation | None,
        seqid: int | None,
    ) -> bytes:
        if mutation:
            _refuse_name_keys(mutation, state.wire_name)
        start = block.payload_offset
        header_seqid = block.seqid & 0xFFFFFFFF if seqid is None else seqid
        payload: bytes | memoryview
        if seqid is None:
            payload = memoryview(frame)[start:]
        elif block.transform_count:
            plain = theader.untransform(frame[start:], block, self.max_inflated_size)
            payload = theader.transform(_rewrite_seqid(plain, state, 0, seqid)[0], block)
        else:
            payload, _ = _rewrite_seqid(frame, state, start, seqid)
            payload = payload[start:]
        if mutation:
            header_block = theader.build_block(block, theader.merge_info(block.info, mutation))
        else:
            header_block = frame[theader.PREFIX_SIZE : start]
        return theader.build_frame(block.flags, header_seqid, header_block, payload)

    # -- error replies ----------------------------------------------------------------------

    def on_error(self, metadata: Metadata, error: LocalError) -> bytes:
        """A ``TApplicationException`` reply in the request's transport and protocol."""
        state = metadata.codec_state
        if isinstance(state, WireState):
            transport, protocol, strict = state.transport, state.protocol, state.strict
            block = state.header
        else:
            # Not our metadata: answer in the configured (or last detected) variant.
            transport, protocol = self._detected
            transport = FRAMED if transport == AUTO else transport
            protocol = BINARY if protocol == AUTO else protocol
            strict, block = True, None
        name = metadata.operation_name.encode()
        seqid = metadata.request_id & 0xFFFFFFFF
        text = error_text(error.type, error.message).encode()
        code = APPLICATION_EXCEPTION_TYPES.get(error.type, 0)
        if protocol == COMPACT:
            payload = compact.write_message_begin(
                name, EXCEPTION, seqid
            ) + compact.write_application_exception(text, code)
        else:
            payload = binary.write_message_begin(
                name, EXCEPTION, seqid, strict
            ) + binary.write_application_exception(text, code)
        if transport == UNFRAMED:
            return payload
        if transport == HEADER:
            protocol_id = THEADER_PROTOCOL_COMPACT if protocol == COMPACT else 0
            header_block = write_varint(protocol_id) + b"\x00"
            header_block += b"\0" * (-len(header_block) % 4)
            flags = block.flags if block is not None else 0
            return theader.build_frame(flags, seqid, header_block, payload)
        return len(payload).to_bytes(4, "big") + payload


def _refuse_name_keys(mutation: Mutation, wire_name: str) -> None:
    """``method`` (and ``service`` of a multiplexed name) come from the message name, which
    wins over info headers: such a mutation would change nothing, so it is refused."""
    for key in mutation:
        folded = key.lower()
        if folded == "method" or (folded == "service" and ":" in wire_name):
            raise MutationError(
                f"{key!r} of a Thrift message is its message name; an info header would not "
                "change it"
            )


def _rewrite_seqid(frame: bytes, state: WireState, start: int, seqid: int) -> tuple[bytes, int]:
    """``frame`` with the payload seqid replaced, and the change in length."""
    at = state.seqid_offset
    if state.protocol == COMPACT:
        encoded = write_varint(seqid)
        return frame[:at] + encoded + frame[at + state.seqid_size :], len(encoded) - (
            state.seqid_size
        )
    return frame[:at] + seqid.to_bytes(4, "big") + frame[at + 4 :], 0
