"""Auto-detection of the transport and protocol from the first bytes of a message.

Strict binary (``0x8001``), compact (``0x82``) and THeader (``0x0FFF`` after the frame length)
carry magic numbers, so they are detected exactly. Non-strict binary starts with the method
name's length, which looks like a frame length; it is only considered when non-strict
messages are allowed, and then recognised by shape (see :func:`detect`).
"""

from __future__ import annotations

from typing import Final

from metaprotocol_sdk.errors import FrameTooLargeError, FramingError

from .wire import COMPACT_PROTOCOL_ID, I32, Buffer, Incomplete

FRAMED: Final = "framed"
UNFRAMED: Final = "unframed"
HEADER: Final = "header"
BINARY: Final = "binary"
COMPACT: Final = "compact"
AUTO: Final = "auto"

_unpack_i32 = I32.unpack_from


def detect(buf: Buffer, allow_non_strict: bool, max_frame_size: int) -> tuple[str, str]:
    """``(transport, protocol)`` of the message at the start of ``buf``.

    Raises :class:`Incomplete` while the bytes seen so far fit more than one variant, and
    ``FramingError`` when they fit none. For non-strict binary the framed reading is tried
    first (a frame length, then a name length that fits in the frame and a valid message
    type byte after the name); then the unframed one (a name length and a valid type byte).
    """
    n = len(buf)
    if n < 2:
        raise Incomplete(2)
    first = buf[0]
    if first == 0x80:
        if buf[1] != 0x01:
            raise FramingError(f"bad binary protocol version 0x80{buf[1]:02x}", offset=0)
        return UNFRAMED, BINARY
    if first == COMPACT_PROTOCOL_ID:
        return UNFRAMED, COMPACT
    if first & 0x80:
        raise FramingError(f"not a Thrift message: first byte 0x{first:02x}", offset=0)
    if n < 8:
        # Whatever follows, a first word above the limit is too big (as a frame length, and
        # as a non-strict name length too): refuse it now, before anything is buffered.
        if n >= 4 and _unpack_i32(buf, 0)[0] + 4 > max_frame_size:
            raise FrameTooLargeError(_unpack_i32(buf, 0)[0] + 4, max_frame_size, offset=0)
        raise Incomplete(8)
    size = _unpack_i32(buf, 0)[0]
    if buf[4] == 0x0F and buf[5] == 0xFF:
        protocol = HEADER
    elif buf[4] == 0x80:
        protocol = BINARY
    elif buf[4] == COMPACT_PROTOCOL_ID:
        protocol = COMPACT
    elif allow_non_strict:
        return _detect_non_strict(buf, size, max_frame_size)
    else:
        raise FramingError(
            "not a strict binary, compact or THeader message (non-strict binary needs "
            "strict=False)",
            offset=0,
        )
    # An oversized length is refused by the framed decoder, which can attach the request id.
    return (HEADER, BINARY) if protocol == HEADER else (FRAMED, protocol)


def _detect_non_strict(buf: Buffer, size: int, max_frame_size: int) -> tuple[str, str]:
    n = len(buf)
    name_len = _unpack_i32(buf, 4)[0]
    # Framed: [frame length][name length][name][type][seqid], all inside the frame.
    if name_len >= 0 and 4 + name_len + 5 <= size:
        type_at = 8 + name_len
        if n <= type_at:
            if size + 4 > max_frame_size:  # would be refused as framed, whatever follows
                return FRAMED, BINARY
            raise Incomplete(type_at + 1)
        if 1 <= buf[type_at] <= 4:
            return FRAMED, BINARY
    # Unframed: [name length][name][type][seqid].
    type_at = 4 + size
    if type_at + 5 > max_frame_size:
        raise FrameTooLargeError(type_at + 5, max_frame_size, offset=0)
    if n <= type_at:
        raise Incomplete(type_at + 1)
    if 1 <= buf[type_at] <= 4:
        return UNFRAMED, BINARY
    raise FramingError("not a Thrift message of any known variant", offset=0)
