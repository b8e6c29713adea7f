"""Hessian 2.0: our pure-Python serializer vs python-hessian 1.2.0 vs hessian.js 2.11.0.

Run: ``.venv/bin/python bench/bench_hessian2.py`` (or ``./dev bench hessian2``).
Goals: our decode at least 3x faster than python-hessian's decoder; a typical Dubbo request
body (five header strings read, arguments skipped, attachments read) in <= 10 us.

All three are measured in the same run on the same bytes, as CPU time per operation (the best
of 15 windows of about 20 ms), so that other processes on a shared machine inflate the numbers
as little as possible. hessian.js times its own loop the same way (``process.cpuUsage``) in one
node process, with no IPC in the timing.
python-hessian has no Hessian 2 encoder: its encode column is its Hessian 1 encoder, shown
only as a reference point.
"""

from __future__ import annotations

import importlib.util
import sys
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import cpu_us, print_table
from metaprotocol_dubbo.hessian2 import (
    Decoder,
    Encoder,
    JavaLong,
    JavaObject,
    TypedList,
    dumps,
    loads,
)

ROOT = Path(__file__).resolve().parents[1]


def _peers() -> Any:
    spec = importlib.util.spec_from_file_location(
        "hessian2_interop_peers", ROOT / "codecs" / "dubbo" / "tests" / "interop" / "peers.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def nested_value() -> JavaObject:
    """A typical RPC argument: an object with scalars, a list, a map and a nested object."""
    address = JavaObject(
        "com.example.Address",
        {"street": "1 Main Street", "city": "Springfield", "zip": "12345", "country": "US"},
    )
    return JavaObject(
        "com.example.User",
        {
            "id": JavaLong(1234567890123),
            "name": "Alice Example",
            "email": "alice@example.com",
            "age": 34,
            "score": 98.25,
            "active": True,
            "created": datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC),
            "tags": ["admin", "beta", "early-adopter", "ops"],
            "roles": TypedList("[int", [1, 2, 3, 5, 8]),
            "address": address,
            "previous": [address, JavaObject("com.example.Address", {
                "street": "2 Elm Road", "city": "Shelbyville", "zip": "54321", "country": "US",
            })],
            "settings": {"theme": "dark", "lang": "en-US", "tz": "Europe/Paris", "n": 7},
            "avatar": bytes(range(48)),
            "nickname": "Ålice ☃",
        },
    )  # fmt: skip


ATTACHMENTS = {
    "path": "com.example.UserService",
    "interface": "com.example.UserService",
    "version": "1.0.0",
    "group": "prod",
    "timeout": "3000",
    "traceid": "4bf92f3577b34da6a3ce929d0e0e4736",
}


def request_body() -> tuple[bytes, int]:
    """A large Dubbo request body: header strings, a nested object and a string, attachments."""
    e = Encoder()
    for s in ("2.0.2", "com.example.UserService", "1.0.0", "updateUser",
              "Lcom/example/User;Ljava/lang/String;"):  # fmt: skip
        e.write(s)
    e.write(nested_value())
    e.write("request-42")
    e.write(ATTACHMENTS)
    return e.getvalue(), 8


def typical_body() -> tuple[bytes, int]:
    """A typical Dubbo request body: ``greet(String, int)`` with six attachments."""
    e = Encoder()
    for v in ("2.0.2", "com.example.UserService", "1.0.0", "greet", "Ljava/lang/String;I",
              "Alice", 42, ATTACHMENTS):  # fmt: skip
        e.write(v)
    return e.getvalue(), 8


def decode_request(data: bytes) -> tuple[Any, ...]:
    """What the Dubbo codec does per request: header strings, skip the args, attachments."""
    d = Decoder(data)
    rs = d.read_string
    version, path, iface_version, method, types = rs(), rs(), rs(), rs(), rs()
    d.skip()
    d.skip()
    attachments = d.read()
    return version, path, iface_version, method, types, attachments


def pyhessian_reader(data: bytes, count: int = 1) -> Any:
    from pyhessian.parser import Parser  # type: ignore[import-untyped]

    def read() -> Any:
        p = Parser()
        p._stream = BytesIO(data)
        p.version = 2
        r = p._adapter._read_object
        return [r() for _ in range(count)]

    return read


def pyhessian_v1_encoder(value: Any) -> Any:
    from pyhessian.encoder import encode_object  # type: ignore[import-untyped]

    return lambda: encode_object(value)


def to_pyhessian(value: Any) -> Any:
    """The nested value in python-hessian's own types (for its v1 encoder)."""
    from pyhessian.protocol import Binary, cls_factory  # type: ignore[import-untyped]

    if isinstance(value, JavaObject):
        cls = cls_factory(value.type, list(value))
        obj = cls.__new__(cls)
        obj.__setstate__({k: to_pyhessian(v) for k, v in value.items()})
        return obj
    if isinstance(value, list):
        return [to_pyhessian(v) for v in value]
    if isinstance(value, dict):
        return {k: to_pyhessian(v) for k, v in value.items()}
    if isinstance(value, datetime):
        return value.replace(tzinfo=None)
    if isinstance(value, bytes):
        return Binary(value)
    if isinstance(value, JavaLong):
        from pyhessian.data_types import long  # type: ignore[import-untyped]

        return long(value)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else value


def main() -> None:
    """Measure and print the comparison table."""
    peers = _peers()
    value = nested_value()
    data = dumps(value)
    assert loads(data) == value
    body, count = request_body()

    rows: list[list[object]] = []

    def row(name: str, ours: float, theirs: float | None, node: float | None) -> None:
        ratio = f"{theirs / ours:.1f}x" if theirs else "-"
        rows.append([name, ours, theirs if theirs else "-", node if node else "-", ratio])

    node_dec, node_enc = peers.node_bench(data, 20000)
    node_body_dec, _ = peers.node_bench(body, 20000, count)

    cpu_us(lambda: loads(data), repeat=3)  # warm-up
    ours_dec = cpu_us(lambda: loads(data))
    ph_dec = cpu_us(pyhessian_reader(data))
    row(f"decode nested object ({len(data)} B)", ours_dec, ph_dec, node_dec)

    ours_enc = cpu_us(lambda: dumps(value))
    ph_enc = cpu_us(pyhessian_v1_encoder(to_pyhessian(value)))
    row("encode nested object (py-hessian: v1)", ours_enc, ph_enc, node_enc)

    def skip() -> None:
        Decoder(data).skip()

    row("skip nested object", cpu_us(skip), None, None)

    typical, tcount = typical_body()
    node_typ_dec, _ = peers.node_bench(typical, 20000, tcount)
    ours_req = cpu_us(lambda: decode_request(typical))
    row(
        f"typical Dubbo request ({len(typical)} B): ours skips args",
        ours_req,
        cpu_us(pyhessian_reader(typical, tcount)),
        node_typ_dec,
    )
    ph_req = cpu_us(pyhessian_reader(body, count))
    row(
        f"large Dubbo request ({len(body)} B): ours skips args",
        cpu_us(lambda: decode_request(body)),
        ph_req,
        node_body_dec,
    )
    row(
        "large Dubbo request: read all 8 values",
        cpu_us(lambda: _read_all(body, count)),
        ph_req,
        node_body_dec,
    )

    print_table(
        "Hessian 2.0 (us per operation; ratio = python-hessian / ours)",
        ["case", "ours us/op", "python-hessian us/op", "hessian.js us/op", "ratio"],
        rows,
    )
    print(
        f"\ndecode speed-up over python-hessian: {ph_dec / ours_dec:.1f}x (goal >= 3x); "
        f"typical request decode: {ours_req:.1f} us (goal <= 10 us)"
    )


def _read_all(data: bytes, count: int) -> list[Any]:
    d = Decoder(data)
    return [d.read() for _ in range(count)]


if __name__ == "__main__":
    main()
