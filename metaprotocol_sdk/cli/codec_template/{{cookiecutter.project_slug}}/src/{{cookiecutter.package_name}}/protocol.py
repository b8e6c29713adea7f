"""The {{ cookiecutter.protocol_name }} wire format: one place that knows the bytes.

This is the example protocol the scaffold starts you with. Replace it with your protocol's
real layout (and the golden vectors with real captures); the codec, the example server and
the example client all build on the names defined here.

Every frame is a fixed 16-byte header (big-endian), a key-value block and an opaque body::

    offset  size  field
    0       2     magic 0xC0DE
    2       1     version (1)
    3       1     kind (see Kind)
    4       4     request id{% if cookiecutter.streaming %} (a stream's frames: the stream id, never 0){% endif %}
    8       1     status: 0 for success; for ERROR frames, the ErrorType number
    9       1     (padding, written as 0)
    10      2     key-value block length K
    12      4     body length B
    16      K     key-values: repeated [key length u16][value length u16][key][value], UTF-8
    16+K    B     body

The key-values are the routable attributes (``method`` names the operation); the proxy
writes route mutations into them. The body is never parsed.
{%- if cookiecutter.streaming %}

Streams: a client opens one with a STREAM_OPEN frame (routed by its key-values, as a request
is), then either side sends STREAM_DATA frames with the same id; each side ends its half with
a STREAM_HALF_CLOSE, and either may end both halves at once with a STREAM_CLOSE. An ERROR
frame with the stream's id ends the stream too (what the proxy sends when it cannot open or
keep a stream).
{%- endif %}

Keys ignore case and a repeated key's last value wins, as the SDK's ``Attributes`` (and the
example server) read them, so no frame is ambiguous. If your servers read keys exactly (a
case-sensitive map), refuse a frame whose keys collide instead, or a client can show the
engine one value and the server another: see "Colliding keys" in the SDK's codec contract
(``metaprotocol_sdk.key_collision`` words the error).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum

from construct import Const, Int8ub, Int16ub, Int32ub, Padding, Struct
from metaprotocol_sdk import FramingError, compile_header

MAGIC = b"\xc0\xde"
VERSION = 1

#: The fixed header, declared with the SDK's header DSL (compiled to one struct.Struct).
HEADER = compile_header(
    Struct(
        "magic" / Const(MAGIC),
        "version" / Int8ub,
        "kind" / Int8ub,
        "request_id" / Int32ub,
        "status" / Int8ub,
        Padding(1),
        "kv_length" / Int16ub,
        "body_length" / Int32ub,
    )
)
HEADER_SIZE = 16
assert HEADER.size == HEADER_SIZE

#: Offsets of the fields the codec patches in place.
REQUEST_ID_OFFSET = 4
KV_LENGTH_OFFSET = 10
BODY_LENGTH_OFFSET = 12

MAX_KEY = MAX_VALUE = 0xFFFF


class Kind(IntEnum):
    """What a frame is."""

    REQUEST = 0
    RESPONSE = 1
{%- if cookiecutter.oneway %}
    ONEWAY = 2
{%- endif %}
{%- if cookiecutter.heartbeat %}
    PING = 3
    PONG = 4
{%- endif %}
    ERROR = 5
{%- if cookiecutter.streaming %}
    STREAM_OPEN = 6
    STREAM_DATA = 7
    STREAM_HALF_CLOSE = 8
    STREAM_CLOSE = 9


#: The frames of a stream: their request id field carries the stream id.
STREAM_KINDS = frozenset(
    {Kind.STREAM_OPEN, Kind.STREAM_DATA, Kind.STREAM_HALF_CLOSE, Kind.STREAM_CLOSE}
)
{%- endif %}


def encode_kv(pairs: Mapping[str, str]) -> bytes:
    """Serialise a key-value block."""
    out = bytearray()
    for key, value in pairs.items():
        k, v = key.encode(), value.encode()
        if not k or len(k) > MAX_KEY or len(v) > MAX_VALUE:
            raise ValueError(f"key-value {key!r} is empty or too long")
        out += len(k).to_bytes(2, "big") + len(v).to_bytes(2, "big") + k + v
    return bytes(out)


def decode_kv(data: bytes | bytearray, start: int, end: int) -> dict[str, str]:
    """Parse the key-value block ``data[start:end]``; offsets in errors are frame offsets."""
    pairs: dict[str, str] = {}
    pos = start
    while pos < end:
        if pos + 4 > end:
            raise FramingError("key-value entry header runs past the block", offset=pos)
        key_length = int.from_bytes(data[pos : pos + 2], "big")
        value_length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if key_length == 0:
            raise FramingError("empty key in the key-value block", offset=pos)
        key_start = pos + 4
        value_start = key_start + key_length
        pos = value_start + value_length
        if pos > end:
            raise FramingError("key-value entry runs past the block", offset=key_start - 4)
        try:
            key = bytes(data[key_start:value_start]).decode()
            pairs[key] = bytes(data[value_start:pos]).decode()
        except UnicodeDecodeError as exc:
            raise FramingError(f"key-value is not UTF-8: {exc.reason}", offset=key_start) from None
    return pairs


def build_frame(
    kind: Kind,
    request_id: int,
    pairs: Mapping[str, str] | None = None,
    body: bytes = b"",
    *,
    status: int = 0,
) -> bytes:
    """One complete frame (used by the codec's error replies, the examples and the tests)."""
    block = encode_kv(pairs or {})
    header = HEADER.build(
        version=VERSION,
        kind=int(kind),
        request_id=request_id,
        status=status,
        kv_length=len(block),
        body_length=len(body),
    )
    return header + block + body
