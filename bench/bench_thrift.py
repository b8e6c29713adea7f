"""Thrift codec micro-benchmark: our decode/encode beside thriftpy2's Cython binary decode.

Run: ``.venv/bin/python bench/bench_thrift.py`` (``--quick`` for fewer iterations).

For each message (a small ``add`` call and a ``roundtrip`` call carrying a nested struct) and
each variant (framed binary, framed compact, THeader binary with 2 info headers, unframed
binary, unframed compact) it prints the best-of-5 time per operation, in microseconds:

* ``decode``: ``ThriftCodec.decode`` (auto-detect) of one message from a bytearray, including
  taking the frame out of the buffer and building the Metadata. Framed and THeader read the
  headers only; unframed messages are skipped field by field to find their end.
* ``enc=``: ``encode`` with an empty mutation (returns the frame itself).
* ``enc+id``: ``encode`` with a new request id (seqid rewritten, lengths fixed).
* ``enc+mut2``: ``encode`` with a 2-key mutation (THeader only; other transports have no
  headers and refuse it).
* ``skip``: unframed only, the struct skipper alone (how the end of the message is found).
* ``cybin``: thriftpy2's Cython binary protocol reading the same message in strict binary
  (``read_message_begin`` + ``read_struct``), the full decode a Python Thrift server does.
* ``dec/cybin``: decode time over cybin time (below 1 means we are faster).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import thriftpy2
from metaprotocol_thrift import ThriftCodec, theader
from metaprotocol_thrift.skip import skip_binary_struct, skip_compact_struct
from thriftpy2.protocol import TCompactProtocol
from thriftpy2.protocol.cybin import TCyBinaryProtocol
from thriftpy2.transport import TMemoryBuffer
from thriftpy2.transport.memory import TCyMemoryBuffer

from metaprotocol_sdk import Metadata

ROOT = Path(__file__).resolve().parent.parent
IDL = ROOT / "codecs" / "thrift" / "tests" / "idl" / "calc.thrift"
calc: Any = thriftpy2.load(str(IDL), module_name="calc_bench_thrift")


def _message(protocol: str, name: str, args: Any) -> bytes:
    buffer = TMemoryBuffer()
    proto: Any = TCompactProtocol(buffer) if protocol == "compact" else TCyBinaryProtocol(buffer)
    proto.write_message_begin(name, 1, 7)
    proto.write_struct(args)
    proto.write_message_end()
    if hasattr(proto, "trans") and hasattr(proto.trans, "flush"):
        proto.trans.flush()
    return bytes(buffer.getvalue())


def _binary(name: str, args: Any) -> bytes:
    buffer = TCyMemoryBuffer()
    proto = TCyBinaryProtocol(buffer)
    proto.write_message_begin(name, 1, 7)
    proto.write_struct(args)
    proto.write_message_end()
    buffer.flush()
    return bytes(buffer.getvalue())


def _frame(transport: str, protocol: str, payload: bytes) -> bytes:
    if transport == "unframed":
        return payload
    if transport == "framed":
        return len(payload).to_bytes(4, "big") + payload
    block = theader.THeaderBlock(0, 7, 2 if protocol == "compact" else 0, b"\x00", [], b"", 0)
    info = [(b"user", b"alice"), (b"x-request-id", b"r-0001")]
    return theader.build_frame(0, 7, theader.build_block(block, info), payload)


def _item() -> Any:
    leaf = calc.Leaf(small=3, ratio=0.5, flag=True, blob=b"\x00" * 16)
    return calc.Item(
        id=123456789,
        name="a nested item",
        values=list(range(20)),
        tags={f"k{i}": f"v{i}" for i in range(5)},
        marks={1, 2, 3},
        leaves=[leaf] * 4,
        by_id={i: leaf for i in range(3)},
        grid=[["a", "b", "c"]] * 3,
        tiny=1,
    )


MESSAGES: list[tuple[str, str, Any, Any]] = [
    ("echo 1KiB", "echo", calc.Calculator.echo_args(text="x" * 1024), calc.Calculator.echo_args),
    ("add", "add", calc.Calculator.add_args(a=1, b=2), calc.Calculator.add_args),
    (
        "roundtrip",
        "roundtrip",
        calc.Calculator.roundtrip_args(item=_item()),
        calc.Calculator.roundtrip_args,
    ),
]
VARIANTS = [
    ("framed", "binary"),
    ("framed", "compact"),
    ("header", "binary"),
    ("unframed", "binary"),
    ("unframed", "compact"),
]


def _best(run: Callable[[int], float], number: int) -> float:
    return min(run(number) for _ in range(5)) / number * 1e6


# CPU time of this process: the machine is shared, and wall time would count waiting.
_clock = time.process_time


def _time_decode(frame: bytes, number: int) -> float:
    codec = ThriftCodec()
    decode = codec.decode

    def run(n: int) -> float:
        total = 0.0
        for _ in range(max(1, n // 200)):  # batches of fresh buffers, warm in the cache
            buffers = [bytearray(frame) for _ in range(200)]
            start = _clock()
            for buffer in buffers:
                decode(buffer)
            total += _clock() - start
        return total * n / (max(1, n // 200) * 200)

    return _best(run, number)


def _time_call(call: Callable[[], object], number: int) -> float:
    def run(n: int) -> float:
        start = _clock()
        for _ in range(n):
            call()
        return _clock() - start

    return _best(run, number)


def _time_cybin(payload: bytes, args_cls: Any, number: int) -> float:
    def read() -> None:
        proto = TCyBinaryProtocol(TCyMemoryBuffer(payload))
        proto.read_message_begin()
        proto.read_struct(args_cls())

    return _time_call(read, number)


def main() -> None:
    """Print the table."""
    number = 2000 if "--quick" in sys.argv else 20000
    header = (
        f"{'message':<10} {'variant':<17} {'bytes':>5} {'decode':>7} {'enc=':>6} "
        f"{'enc+id':>7} {'enc+mut2':>8} {'skip':>6} {'cybin':>7} {'dec/cybin':>9}"
    )
    print(f"CPU microseconds per operation, best of 5 runs of {number} (thriftpy2 cybin = 1)")
    print(header)
    print("-" * len(header))
    for label, name, args, args_cls in MESSAGES:
        binary_payload = _binary(name, args)
        cybin = _time_cybin(binary_payload, args_cls, number)
        for transport, protocol in VARIANTS:
            payload = binary_payload if protocol == "binary" else _message(protocol, name, args)
            frame = _frame(transport, protocol, payload)
            message = ThriftCodec().decode(bytearray(frame))
            assert isinstance(message, Metadata) and message.frame == frame
            encode = ThriftCodec().encode
            decode = _time_decode(frame, number)
            empty = _time_call(partial(encode, message), number)
            new_id = _time_call(partial(encode, message, request_id=1000), number)
            mutation = {"x-route": "blue", "user": "bob"}
            mut = f"{'-':>8}"
            if transport == "header":
                mut = f"{_time_call(partial(encode, message, mutation), number):8.2f}"
            skip = f"{'-':>6}"
            if transport == "unframed":
                state = message.codec_state
                skipper = skip_compact_struct if state.protocol == "compact" else skip_binary_struct
                call = partial(skipper, frame, message.header_size, len(frame), 64)
                skip = f"{_time_call(call, number):6.2f}"
            print(
                f"{label:<10} {transport + '-' + protocol:<17} {len(frame):>5} {decode:7.2f} "
                f"{empty:6.2f} {new_id:7.2f} {mut} {skip} {cybin:7.2f} {decode / cybin:9.2f}"
            )


if __name__ == "__main__":
    main()
