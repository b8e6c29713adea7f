"""The 16-byte Dubbo frame header, declared with the SDK header DSL.

::

    offset  size  field
    0       2     magic 0xdabb
    2       1     flag: 0x80 request, 0x40 two-way, 0x20 event, low 5 bits serialization id
    3       1     status (responses; 0 in requests)
    4       8     request id (big-endian)
    12      4     body length (big-endian, signed as Java writes it)
"""

from __future__ import annotations

from construct import Const, Int8ub, Int32sb, Int64ub, Struct

from metaprotocol_sdk import compile_header

#: The compiled header layout: ``HEADER.unpack(buf)`` gives
#: ``(magic, flag, status, request_id, body_length)`` or ``None`` (need more data).
HEADER = compile_header(
    Struct(
        "magic" / Const(b"\xda\xbb"),
        "flag" / Int8ub,
        "status" / Int8ub,
        "request_id" / Int64ub,
        "body_length" / Int32sb,
    )
)
HEADER_SIZE = 16
MAGIC = b"\xda\xbb"

FLAG_REQUEST = 0x80
FLAG_TWOWAY = 0x40
FLAG_EVENT = 0x20
SERIALIZATION_MASK = 0x1F

#: Offsets of the fields a re-encode patches in place.
STATUS_OFFSET = 3
REQUEST_ID_OFFSET = 4
BODY_LENGTH_OFFSET = 12

#: Dubbo's serialization ids (``org.apache.dubbo.common.serialize.Constants``).
HESSIAN2 = 2
SERIALIZATIONS: dict[int, str] = {
    2: "hessian2",
    3: "java",
    4: "compactedjava",
    6: "fastjson",
    7: "nativejava",
    8: "kryo",
    9: "fst",
    10: "native-hessian",
    11: "protostuff",
    12: "avro",
    16: "gson",
    21: "protobuf-json",
    22: "protobuf",
    23: "fastjson2",
}


def serialization_name(sid: int) -> str:
    """A readable name for a serialization id (``"unknown"`` if Dubbo defines none)."""
    return SERIALIZATIONS.get(sid, "unknown")


if HEADER.struct is None:  # pragma: no cover - every field above is fixed-size
    raise ImportError("the Dubbo header layout did not compile to a struct")
#: The compiled layout's struct, for the hot paths (no keyword handling, no magic check).
HEADER_STRUCT = HEADER.struct


def build_header(flag: int, status: int, request_id: int, body_length: int) -> bytes:
    """Serialise one header (magic filled in)."""
    return HEADER_STRUCT.pack(MAGIC, flag, status, request_id, body_length)
