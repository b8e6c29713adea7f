"""Thrift messages serialised in memory by the real libraries, for unit and property tests."""

from __future__ import annotations

from typing import Any

from metaprotocol_thrift import theader
from thrift_peers import calc_tp
from thriftpy2.protocol import TBinaryProtocol, TCompactProtocol
from thriftpy2.transport import TMemoryBuffer

PROTOCOLS = ("binary", "nonstrict", "compact")
TRANSPORTS = ("framed", "unframed", "header")


def message(protocol: str, name: str, mtype: int, seqid: int, args: Any) -> bytes:
    """One Thrift message (no transport) written by thriftpy2."""
    buffer = TMemoryBuffer()
    if protocol == "compact":
        proto: Any = TCompactProtocol(buffer)
    else:
        proto = TBinaryProtocol(buffer, strict_write=protocol == "binary")
    proto.write_message_begin(name, mtype, seqid)
    proto.write_struct(args)
    proto.write_message_end()
    return bytes(buffer.getvalue())


def frame(
    transport: str,
    protocol: str,
    payload: bytes,
    headers: dict[bytes, bytes] | None = None,
    seqid: int = 0,
) -> bytes:
    """``payload`` in ``transport``; THeader frames are built like Apache's THeaderTransport."""
    if transport == "unframed":
        return payload
    if transport == "framed":
        return len(payload).to_bytes(4, "big") + payload
    block = theader.THeaderBlock(0, seqid, 2 if protocol == "compact" else 0, b"\x00", [], b"", 0)
    return theader.build_frame(
        0, seqid & 0xFFFFFFFF, theader.build_block(block, list((headers or {}).items())), payload
    )


def add_call(a: int = 1, b: int = 2) -> Any:
    return calc_tp.Calculator.add_args(a=a, b=b)


def sample_item() -> Any:
    leaf = calc_tp.Leaf(small=-3, ratio=0.25, flag=True, blob=b"\x00\xff")
    return calc_tp.Item(
        id=2**40,
        name="ünïcode",
        values=[1, -2, 300000],
        tags={"a": "b"},
        marks={5, 6},
        leaves=[leaf, calc_tp.Leaf(small=1)],
        by_id={1: leaf},
        grid=[["x", "y"], []],
        tiny=-1,
    )


def sample(
    transport: str,
    protocol: str,
    name: str = "add",
    mtype: int = 1,
    seqid: int = 7,
    args: Any = None,
    headers: dict[bytes, bytes] | None = None,
) -> bytes:
    """A complete frame of ``transport``/``protocol``."""
    payload = message(protocol, name, mtype, seqid, add_call() if args is None else args)
    return frame(transport, protocol, payload, headers, seqid)


def options_for(transport: str, protocol: str) -> dict[str, Any]:
    """Codec options that decode the variant (auto for all but non-strict binary)."""
    return {"strict": False} if protocol == "nonstrict" else {}
