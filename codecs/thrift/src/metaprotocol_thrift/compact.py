"""Compact protocol: message header reading and writing."""

from __future__ import annotations

from metaprotocol_sdk.errors import FramingError

from .binary import MessageBegin, new_begin
from .wire import (
    COMPACT_PROTOCOL_ID,
    COMPACT_VERSION,
    COMPACT_VERSION_MASK,
    Buffer,
    Incomplete,
    read_varint,
    to_i32,
    write_varint,
)


def read_message_begin(buf: Buffer, pos: int, end: int) -> MessageBegin:
    """Parse a compact message header at ``pos`` (bytes up to ``end`` are available)."""
    if end - pos < 4:
        raise Incomplete(pos + 4)
    if buf[pos] != COMPACT_PROTOCOL_ID:
        raise FramingError(f"bad compact protocol id 0x{buf[pos]:02x}", offset=pos)
    second = buf[pos + 1]
    if second & COMPACT_VERSION_MASK != COMPACT_VERSION:
        raise FramingError(
            f"bad compact protocol version {second & COMPACT_VERSION_MASK}", offset=pos + 1
        )
    mtype = second >> 5
    if not 1 <= mtype <= 4:
        raise FramingError(f"bad message type {mtype}", offset=pos + 1)
    seqid_pos = pos + 2
    if buf[seqid_pos] < 0x80 and buf[seqid_pos + 1] < 0x80:  # one-byte seqid and name length
        seqid = buf[seqid_pos]
        seqid_len = 1
        name_start = seqid_pos + 2
        name_end = name_start + buf[seqid_pos + 1]
    else:
        seqid, name_len_pos = read_varint(buf, seqid_pos, end, 5)
        name_len, name_start = read_varint(buf, name_len_pos, end, 5)
        name_end = name_start + name_len
        seqid_len = name_len_pos - seqid_pos
    if name_end > end:
        raise Incomplete(name_end)
    try:
        name = str(buf[name_start:name_end], "utf-8")
    except UnicodeDecodeError:
        raise FramingError("method name is not UTF-8", offset=name_start) from None
    return new_begin(
        MessageBegin, (mtype, name, to_i32(seqid), seqid_pos, seqid_len, name_end, True)
    )


def reply_field_id(buf: Buffer, pos: int, end: int) -> int | None:
    """Field id of the first field of the struct at ``pos``; ``None`` for an empty struct."""
    if pos >= end:
        raise Incomplete(pos + 1)
    head = buf[pos]
    if head == 0:
        return None
    delta = head >> 4
    if delta:
        return delta
    raw, _ = read_varint(buf, pos + 1, end, 3)
    return (raw >> 1) ^ -(raw & 1)


def write_message_begin(name: bytes, mtype: int, seqid: int) -> bytes:
    """A compact message header; ``seqid`` is an unsigned 32-bit value."""
    return (
        bytes((COMPACT_PROTOCOL_ID, (mtype << 5) | COMPACT_VERSION))
        + write_varint(seqid)
        + write_varint(len(name))
        + name
    )


def write_application_exception(message: bytes, type_code: int) -> bytes:
    """The compact ``TApplicationException`` struct: 1: string message, 2: i32 type."""
    zigzag = (type_code << 1) ^ (type_code >> 31)
    return b"\x18" + write_varint(len(message)) + message + b"\x15" + write_varint(zigzag) + b"\x00"
