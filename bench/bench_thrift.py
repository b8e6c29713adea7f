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
* ``skip/cybin``: unframed only, skip time over cybin time.
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


# CPU time of this process: the machine is shared, and wall time would count waiting.
_clock = time.process_time
# Operations per timed window. The best window of many is kept: a window this short (well under
# a millisecond) often runs undisturbed on a shared machine, where a long run rarely does.
_WINDOW = 200


def _decode_window(frame: bytes) -> Callable[[], float]:
    decode = ThriftCodec().decode

    def window() -> float:
        buffers = [bytearray(frame) for _ in range(_WINDOW)]  # fresh buffers, warm in cache
        start = _clock()
        for buffer in buffers:
            decode(buffer)
        return _clock() - start

    return window


def _call_window(call: Callable[[], object]) -> Callable[[], float]:
    loop = range(_WINDOW)

    def window() -> float:
        start = _clock()
        for _ in loop:
            call()
        return _clock() - start

    return window


def _cybin_window(payload: bytes, args_cls: Any) -> Callable[[], float]:
    def read() -> None:
        proto = TCyBinaryProtocol(TCyMemoryBuffer(payload))
        proto.read_message_begin()
        proto.read_struct(args_cls())

    return _call_window(read)


def _best_windows(windows: dict[str, Callable[[], float]], number: int) -> dict[str, float]:
    """Microseconds per operation: the best window of each, run round-robin.

    Interleaving puts every column of a row (ours and thriftpy2's) under the same machine
    conditions, so the ratios hold even when the absolute times drift.
    """
    best = dict.fromkeys(windows, float("inf"))
    for _ in range(5 * max(1, number // _WINDOW)):
        for key, window in windows.items():
            best[key] = min(best[key], window())
    return {key: seconds / _WINDOW * 1e6 for key, seconds in best.items()}


def main() -> None:
    """Print the table."""
    number = 2000 if "--quick" in sys.argv else 20000
    header = (
        f"{'message':<10} {'variant':<17} {'bytes':>5} {'decode':>7} {'enc=':>6} "
        f"{'enc+id':>7} {'enc+mut2':>8} {'skip':>6} {'cybin':>7} {'dec/cybin':>9} "
        f"{'skip/cybin':>10}"
    )
    print(
        f"CPU microseconds per operation, best {_WINDOW}-operation window of "
        f"{5 * number // _WINDOW} (thriftpy2 cybin = 1)"
    )
    print(header)
    print("-" * len(header))
    goals: list[tuple[str, float, float]] = []  # (what, measured, bound)
    for label, name, args, args_cls in MESSAGES:
        binary_payload = _binary(name, args)
        for transport, protocol in VARIANTS:
            payload = binary_payload if protocol == "binary" else _message(protocol, name, args)
            frame = _frame(transport, protocol, payload)
            message = ThriftCodec().decode(bytearray(frame))
            assert isinstance(message, Metadata) and message.frame == frame
            encode = ThriftCodec().encode
            windows = {
                "decode": _decode_window(frame),
                "empty": _call_window(partial(encode, message)),
                "new_id": _call_window(partial(encode, message, request_id=1000)),
                "cybin": _cybin_window(binary_payload, args_cls),
            }
            if transport == "header":
                mutation = {"x-route": "blue", "user": "bob"}
                windows["mut"] = _call_window(partial(encode, message, mutation))
            if transport == "unframed":
                state = message.codec_state
                skipper = skip_compact_struct if state.protocol == "compact" else skip_binary_struct
                call = partial(skipper, frame, message.header_size, len(frame), 64)
                windows["skip"] = _call_window(call)
            us = _best_windows(windows, number)
            cybin = us["cybin"]
            mut = f"{us['mut']:8.2f}" if "mut" in us else f"{'-':>8}"
            skip = f"{us['skip']:6.2f}" if "skip" in us else f"{'-':>6}"
            skip_ratio = f"{us['skip'] / cybin:10.2f}" if "skip" in us else f"{'-':>10}"
            if (transport, protocol) == ("framed", "binary"):
                goals.append((f"{label} framed-binary decode, us", us["decode"], 2.0))
            if "skip" in us:
                goals.append((f"{label} unframed-{protocol} skip / cybin", us["skip"] / cybin, 1.0))
            print(
                f"{label:<10} {transport + '-' + protocol:<17} {len(frame):>5} "
                f"{us['decode']:7.2f} {us['empty']:6.2f} {us['new_id']:7.2f} {mut} {skip} "
                f"{cybin:7.2f} {us['decode'] / cybin:9.2f} {skip_ratio}"
            )
    print("\nGoals: framed-binary decode <= 2 us; unframed skip no slower than cybin's decode")
    for what, value, bound in goals:
        print(f"  {what:<40} {value:6.2f} <= {bound:.1f}: {'met' if value <= bound else 'NOT met'}")


if __name__ == "__main__":
    main()
