"""Thrift wire constants and the small readers shared by every variant."""

from __future__ import annotations

import struct
from typing import Final

from metaprotocol_sdk.errors import FramingError

#: Message types as Thrift numbers them (``TMessageType``).
CALL: Final = 1
REPLY: Final = 2
EXCEPTION: Final = 3
ONEWAY: Final = 4

#: Binary protocol: high half of the first word of a strict message.
BINARY_VERSION_1: Final = 0x80010000
BINARY_VERSION_MASK: Final = 0xFFFF0000

#: Compact protocol: first byte, and version in the low 5 bits of the second.
COMPACT_PROTOCOL_ID: Final = 0x82
COMPACT_VERSION: Final = 1
COMPACT_VERSION_MASK: Final = 0x1F

#: THeader: magic in the two bytes after the frame length.
THEADER_MAGIC: Final = 0x0FFF
#: THeader sub-protocol ids.
THEADER_PROTOCOL_BINARY: Final = 0
THEADER_PROTOCOL_COMPACT: Final = 2
#: THeader info header id of a key-value section.
THEADER_INFO_KEYVALUE: Final = 1
#: fbthrift's persistent key-value info headers: they apply to every later message of the
#: connection at the server (Apache's THeaderTransport stops reading at them).
THEADER_INFO_PKEYVALUE: Final = 2

#: ``TApplicationException`` type codes.
TAPP_UNKNOWN: Final = 0
TAPP_UNKNOWN_METHOD: Final = 1
TAPP_INVALID_MESSAGE_TYPE: Final = 2
TAPP_WRONG_METHOD_NAME: Final = 3
TAPP_BAD_SEQUENCE_ID: Final = 4
TAPP_MISSING_RESULT: Final = 5
TAPP_INTERNAL_ERROR: Final = 6
TAPP_PROTOCOL_ERROR: Final = 7
TAPP_INVALID_TRANSFORM: Final = 8
TAPP_INVALID_PROTOCOL: Final = 9
TAPP_UNSUPPORTED_CLIENT_TYPE: Final = 10

I32 = struct.Struct(">i")
U32 = struct.Struct(">I")
I16 = struct.Struct(">h")
U16 = struct.Struct(">H")

Buffer = bytes | bytearray | memoryview


class Incomplete(Exception):
    """Internal: the bytes end before the thing being read; ``needed`` is a lower bound."""

    __slots__ = ("needed",)

    def __init__(self, needed: int) -> None:
        self.needed = needed


def read_varint(buf: Buffer, pos: int, end: int, max_bytes: int = 10) -> tuple[int, int]:
    """Read an unsigned LEB128 varint at ``pos``: ``(value, next position)``."""
    shift = 0
    value = 0
    limit = pos + max_bytes
    while True:
        if pos >= end:
            raise Incomplete(pos + 1)
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if pos >= limit:
            raise FramingError(f"varint longer than {max_bytes} bytes", offset=pos - 1)


def write_varint(value: int) -> bytes:
    """Encode a non-negative integer as an unsigned LEB128 varint."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def to_i32(value: int) -> int:
    """Interpret the low 32 bits of ``value`` as a signed int32."""
    value &= 0xFFFFFFFF
    return value - 0x100000000 if value & 0x80000000 else value


def check_seqid(request_id: int) -> int:
    """Validate a request id for the 32-bit seqid field; return it as an unsigned value."""
    if not -0x80000000 <= request_id <= 0xFFFFFFFF:
        raise ValueError(f"request id {request_id} does not fit a 32-bit Thrift seqid")
    return request_id & 0xFFFFFFFF
