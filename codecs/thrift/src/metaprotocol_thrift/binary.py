"""Binary protocol: message header reading and writing (strict and non-strict)."""

from __future__ import annotations

import struct
from typing import NamedTuple

from metaprotocol_sdk.errors import FramingError

from .wire import BINARY_VERSION_1, I32, Buffer, Incomplete


class MessageBegin(NamedTuple):
    """A Thrift message header, as read from the wire."""

    #: Thrift message type code (1 call, 2 reply, 3 exception, 4 oneway).
    message_type: int
    #: The method name exactly as on the wire (``service:method`` when multiplexed).
    name: str
    seqid: int
    #: Where the seqid is in the buffer read, and its encoded size (4, or a varint's).
    seqid_offset: int
    seqid_size: int
    #: Where the argument (or result) struct starts.
    body: int
    #: Binary only: the message had a version word.
    strict: bool


#: Builds a MessageBegin from a tuple without NamedTuple's keyword handling (hot paths).
new_begin = tuple.__new__

_VERSION_WORD = struct.Struct(">Ii")  # version | type, name length
_STRICT_HEAD = struct.Struct(">Hxbi")  # version, type, name length
_VERSION = BINARY_VERSION_1 >> 16
_unpack_i32 = I32.unpack_from
_unpack_strict = _STRICT_HEAD.unpack_from


def read_message_begin(buf: Buffer, pos: int, end: int, allow_non_strict: bool) -> MessageBegin:
    """Parse a binary message header at ``pos`` (bytes up to ``end`` are available).

    Raises :class:`Incomplete` when ``end`` comes first and ``FramingError`` on bad bytes.
    """
    if end - pos < 8:
        raise Incomplete(pos + 8)
    if buf[pos] & 0x80:
        version, mtype, name_len = _unpack_strict(buf, pos)
        if version != _VERSION:
            raise FramingError(f"bad binary protocol version 0x{version:04x}", offset=pos)
        if name_len < 0:
            raise FramingError(f"negative method name length {name_len}", offset=pos + 4)
        name_start = pos + 8
        name_end = name_start + name_len
        body = name_end + 4
        if body > end:
            raise Incomplete(body)
        seqid_pos = name_end
        strict = True
    else:
        if not allow_non_strict:
            raise FramingError(
                "non-strict binary message (no version word) and strict=True", offset=pos
            )
        name_len = _unpack_i32(buf, pos)[0]
        name_start = pos + 4
        name_end = name_start + name_len
        body = name_end + 5
        if body > end:
            raise Incomplete(body)
        mtype = buf[name_end]
        seqid_pos = name_end + 1
        strict = False
    if not 1 <= mtype <= 4:
        raise FramingError(f"bad message type {mtype}", offset=pos + 3 if strict else name_end)
    try:
        name = str(buf[name_start:name_end], "utf-8")
    except UnicodeDecodeError:
        raise FramingError("method name is not UTF-8", offset=name_start) from None
    seqid = _unpack_i32(buf, seqid_pos)[0]
    return new_begin(MessageBegin, (mtype, name, seqid, seqid_pos, 4, body, strict))


def reply_field_id(buf: Buffer, pos: int, end: int) -> int | None:
    """Field id of the first field of the struct at ``pos``; ``None`` for an empty struct."""
    if pos >= end:
        raise Incomplete(pos + 1)
    if buf[pos] == 0:
        return None
    if pos + 3 > end:
        raise Incomplete(pos + 3)
    return int.from_bytes(buf[pos + 1 : pos + 3], "big", signed=True)


def write_message_begin(name: bytes, mtype: int, seqid: int, strict: bool) -> bytes:
    """A binary message header; ``seqid`` is an unsigned 32-bit value."""
    seq = seqid.to_bytes(4, "big")
    if strict:
        return _VERSION_WORD.pack(BINARY_VERSION_1 | mtype, len(name)) + name + seq
    return I32.pack(len(name)) + name + bytes((mtype,)) + seq


def write_application_exception(message: bytes, type_code: int) -> bytes:
    """The binary ``TApplicationException`` struct: 1: string message, 2: i32 type."""
    return (
        b"\x0b\x00\x01"
        + I32.pack(len(message))
        + message
        + b"\x08\x00\x02"
        + I32.pack(type_code)
        + b"\x00"
    )
