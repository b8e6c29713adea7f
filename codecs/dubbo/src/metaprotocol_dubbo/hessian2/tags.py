"""Tag bytes of the Hessian 2.0 grammar, named as the spec names them."""

from __future__ import annotations

from typing import Final

NULL: Final = 0x4E  # 'N'
TRUE: Final = 0x54  # 'T'
FALSE: Final = 0x46  # 'F'

INT: Final = 0x49  # 'I' b32
INT_ZERO: Final = 0x90  # 0x80-0xbf: one byte, value = tag - 0x90 (-16..47)
INT_BYTE_ZERO: Final = 0xC8  # 0xc0-0xcf: two bytes (-2048..2047)
INT_SHORT_ZERO: Final = 0xD4  # 0xd0-0xd7: three bytes (-262144..262143)

LONG: Final = 0x4C  # 'L' b64
LONG_ZERO: Final = 0xE0  # 0xd8-0xef: one byte (-8..15)
LONG_BYTE_ZERO: Final = 0xF8  # 0xf0-0xff: two bytes (-2048..2047)
LONG_SHORT_ZERO: Final = 0x3C  # 0x38-0x3f: three bytes (-262144..262143)
LONG_INT: Final = 0x59  # 'Y' b32: a long held in 32 bits

DOUBLE: Final = 0x44  # 'D' b64
DOUBLE_ZERO: Final = 0x5B
DOUBLE_ONE: Final = 0x5C
DOUBLE_BYTE: Final = 0x5D  # signed byte
DOUBLE_SHORT: Final = 0x5E  # signed 16-bit
DOUBLE_MILL: Final = 0x5F  # signed 32-bit count of thousandths (what Caucho writes and reads)

DATE: Final = 0x4A  # b64 milliseconds since the epoch
DATE_MINUTE: Final = 0x4B  # b32 minutes since the epoch

STRING: Final = 0x53  # 'S' final chunk, b16 length in UTF-16 units
STRING_CHUNK: Final = 0x52  # 'R' non-final chunk
STRING_DIRECT_MAX: Final = 0x1F  # 0x00-0x1f: length 0..31
STRING_SHORT: Final = 0x30  # 0x30-0x33: length 0..1023
STRING_SHORT_MAX: Final = 0x3FF

BINARY: Final = 0x42  # 'B' final chunk
BINARY_CHUNK: Final = 0x41  # 'A' non-final chunk
BINARY_DIRECT: Final = 0x20  # 0x20-0x2f: length 0..15
BINARY_DIRECT_MAX: Final = 0x0F
BINARY_SHORT: Final = 0x34  # 0x34-0x37: length 0..1023
BINARY_SHORT_MAX: Final = 0x3FF

LIST_VARIABLE: Final = 0x55  # 'U' type value* 'Z'
LIST_FIXED: Final = 0x56  # 'V' type int value*
LIST_VARIABLE_UNTYPED: Final = 0x57  # 'W' value* 'Z'
LIST_FIXED_UNTYPED: Final = 0x58  # 'X' int value*
LIST_DIRECT: Final = 0x70  # 0x70-0x77: typed, length 0..7, no terminator
LIST_DIRECT_UNTYPED: Final = 0x78  # 0x78-0x7f: untyped, length 0..7, no terminator
LIST_DIRECT_MAX: Final = 7

MAP: Final = 0x4D  # 'M' type (key value)* 'Z'
MAP_UNTYPED: Final = 0x48  # 'H' (key value)* 'Z'
END: Final = 0x5A  # 'Z'

CLASS_DEF: Final = 0x43  # 'C' string int string*
OBJECT: Final = 0x4F  # 'O' int value*
OBJECT_DIRECT: Final = 0x60  # 0x60-0x6f: class ref 0..15
OBJECT_DIRECT_MAX: Final = 0x0F

REF: Final = 0x51  # 'Q' int

#: Longest chunk the encoder writes for strings (UTF-16 units) and binary (bytes).
CHUNK_SIZE: Final = 0x8000
