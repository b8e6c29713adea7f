"""Pre-built request and reply frames for the proxy benchmark (Thrift framed binary, Dubbo, and
the example KV protocol's stream frames).

Frames are built once; the load generator and the canned upstream only patch the request id.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

DUBBO_INTERFACE = "org.apache.dubbo.samples.basic.api.DemoService"
DUBBO_HOST = "org.apache.dubbo.samples.basic.api.demoservice"
THRIFT_HOST = "thrift-sample-server.meta-thrift.svc.cluster.local"
METHOD = "ping"


@dataclass(frozen=True)
class Wire:
    """How to frame one protocol and where its request id lives."""

    name: str
    header_size: int  # bytes needed to know a frame's size

    def frame_size(self, buf: bytes | bytearray, pos: int) -> int:
        """Total size of the frame starting at ``pos`` (needs ``header_size`` bytes)."""
        if self.name == "thrift":
            return 4 + int.from_bytes(buf[pos : pos + 4], "big")
        if self.name == "kv":
            head = int.from_bytes(buf[pos + 8 : pos + 10], "big")
            return 16 + head + int.from_bytes(buf[pos + 12 : pos + 16], "big")
        return 16 + int.from_bytes(buf[pos + 12 : pos + 16], "big")

    def is_error(self, buf: bytes | bytearray, pos: int) -> bool:
        """Whether the reply at ``pos`` is an error (a proxy's local reply, for instance)."""
        if self.name == "thrift":
            return buf[pos + 7] != 2  # message type: 2 REPLY, 3 EXCEPTION
        if self.name == "kv":
            return buf[pos + 3] == KV_ERROR
        return buf[pos + 3] != 20  # Dubbo status 20 OK

    def id_offset(self, frame: bytes | bytearray, pos: int = 0) -> tuple[int, int]:
        """(offset, size) of the request id within the frame at ``pos``."""
        if self.name == "thrift":
            name_len = int.from_bytes(frame[pos + 8 : pos + 12], "big")
            return pos + 12 + name_len, 4
        if self.name == "kv":
            return pos + 4, 4  # a stream frame's stream id
        return pos + 4, 8


THRIFT = Wire("thrift", 12)
DUBBO = Wire("dubbo", 16)
KV = Wire("kv", 16)
WIRES = {"thrift": THRIFT, "dubbo": DUBBO, "kv": KV}


# --- Thrift (framed transport, strict binary protocol) -----------------------------------


def _thrift_message(kind: int, name: str, seqid: int, body: bytes) -> bytes:
    n = name.encode()
    msg = struct.pack(">IIs", 0x80010000 | kind, len(n), b"")[:8] + n + struct.pack(">i", seqid)
    msg += body
    return struct.pack(">I", len(msg)) + msg


def _thrift_string_field(field_id: int, value: bytes) -> bytes:
    return struct.pack(">bhI", 11, field_id, len(value)) + value


def thrift_request(payload: int, seqid: int = 1) -> bytes:
    """``ping``-style call with one string argument of ``payload`` bytes."""
    return _thrift_message(1, METHOD, seqid, _thrift_string_field(1, b"x" * payload) + b"\x00")


def thrift_reply(payload: int, seqid: int = 1) -> bytes:
    """A successful reply whose result is a string of ``payload`` bytes."""
    return _thrift_message(2, METHOD, seqid, _thrift_string_field(0, b"y" * payload) + b"\x00")


# --- Dubbo (Hessian2) --------------------------------------------------------------------


def _h2_string(value: str) -> bytes:
    """Hessian 2 string (ASCII only here, so UTF-16 units equal bytes)."""
    data = value.encode()
    out = bytearray()
    while len(data) > 0xFFFF:
        out += b"R" + struct.pack(">H", 0xFFFF) + data[:0xFFFF]
        data = data[0xFFFF:]
    n = len(data)
    if n < 32:
        out += bytes((n,)) + data
    elif n < 1024:
        out += bytes((0x30 + (n >> 8), n & 0xFF)) + data
    else:
        out += b"S" + struct.pack(">H", n) + data
    return bytes(out)


def _dubbo_frame(flags: int, status: int, request_id: int, body: bytes) -> bytes:
    return struct.pack(">HBBqI", 0xDABB, flags, status, request_id, len(body)) + body


def dubbo_request(payload: int, request_id: int = 1, method: str = METHOD) -> bytes:
    """A two-way Hessian2 invocation of ``method(String)`` with a ``payload``-byte argument."""
    body = (
        _h2_string("2.0.2")
        + _h2_string(DUBBO_INTERFACE)
        + _h2_string("1.0.0")
        + _h2_string(method)
        + _h2_string("Ljava/lang/String;")
        + _h2_string("x" * payload)
        + b"H"
        + _h2_string("path")
        + _h2_string(DUBBO_INTERFACE)
        + _h2_string("interface")
        + _h2_string(DUBBO_INTERFACE)
        + _h2_string("version")
        + _h2_string("1.0.0")
        + b"Z"
    )
    return _dubbo_frame(0xC2, 0, request_id, body)


def dubbo_reply(payload: int, request_id: int = 1) -> bytes:
    """An OK response carrying a ``payload``-byte string value (RESPONSE_VALUE)."""
    return _dubbo_frame(0x02, 20, request_id, b"\x91" + _h2_string("y" * payload))


REQUESTS = {"thrift": thrift_request, "dubbo": dubbo_request}
REPLIES = {"thrift": thrift_reply, "dubbo": dubbo_reply}


# --- KV streams (metaprotocol_sdk/examples/kv.py) -----------------------------------------

#: Frame kinds: error, stream open, stream data, stream half-close.
KV_ERROR, KV_OPEN, KV_DATA, KV_HALF_CLOSE = 5, 6, 7, 8


def kv_frame(
    kind: int, stream_id: int, headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    """One KV frame (built here, so the load generator does not import the SDK)."""
    block = b"".join(
        bytes((len(k),)) + k.encode() + len(v).to_bytes(2, "big") + v.encode()
        for k, v in (headers or {}).items()
    )
    return (
        b"KV\x01" + struct.pack(">BIHHI", kind, stream_id, len(block), 0, len(body)) + block + body
    )
