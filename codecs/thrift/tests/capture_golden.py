"""Capture golden vectors from the real peers into metaprotocol_thrift/conformance/golden.yaml.

Run: ``.venv/bin/python codecs/thrift/tests/capture_golden.py``. Each client library talks to a
server library through a relay; the relay splits the byte stream into messages with
ThriftCodec, and every captured message is cross-checked against the call that produced it
(method, direction, type) and re-read by the real library's own message reader (name, type,
seqid) before it is written out, so the expectations do not rest on our decoder alone.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from thriftpy2.protocol import TBinaryProtocol, TCompactProtocol
from thriftpy2.rpc import make_client
from thriftpy2.transport import TMemoryBuffer

sys.path.insert(0, str(Path(__file__).parent))
import thrift_peers as peers
from metaprotocol_thrift import theader

from metaprotocol_sdk import Metadata

OUT = Path(__file__).parent.parent / "src" / "metaprotocol_thrift" / "conformance" / "golden.yaml"
TP = "thriftpy2 0.7.1"
AP = "Apache thrift 0.25.0"
TYPES = {1: "Request", 2: "Response", 3: "Error", 4: "Oneway"}


def payload_of(message: Metadata) -> bytes:
    state = message.codec_state
    if state.transport == "framed":
        return message.frame[4:]
    if state.transport == "header":
        payload = message.frame[state.header.payload_offset :]
        return theader.untransform(payload, state.header, 1 << 24)
    return message.frame


def reread(message: Metadata) -> tuple[str, int, int]:
    """Name, type and seqid as the real library (thriftpy2) reads them."""
    buffer = TMemoryBuffer(payload_of(message))
    if message.codec_state.protocol == "compact":
        proto: Any = TCompactProtocol(buffer)
    else:
        proto = TBinaryProtocol(buffer, strict_read=False)
    name, mtype, seqid = proto.read_message_begin()
    return name, mtype, seqid


def vector(name: str, source: str, message: Metadata, options: dict[str, Any]) -> dict[str, Any]:
    wire_name, mtype, seqid = reread(message)
    assert wire_name == message.codec_state.wire_name, (wire_name, message)
    assert TYPES[mtype] == ("Response" if mtype == 2 else message.message_type.name)
    assert seqid == message.request_id
    expect: dict[str, Any] = {
        "message_type": message.message_type.name,
        "request_id": message.request_id,
        "operation_name": message.operation_name,
        "attributes": message.attributes.to_dict(),
        "size": message.size,
        "header_size": message.header_size,
        "body_size": message.body_size,
    }
    if mtype in (2, 3):
        expect["response_status"] = message.response_status.name
    entry: dict[str, Any] = {"name": name, "source": source, "hex": message.frame.hex()}
    if options:
        entry["options"] = options
    entry["expect"] = expect
    return entry


def pick(messages: list[Metadata], method: str) -> Metadata:
    return next(m for m in messages if m.operation_name == method)


def main() -> None:
    vectors: list[dict[str, Any]] = []
    closing: list[Any] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            apache = peers.Apache(*peers.generate_apache(Path(tmp)))
            capture_thriftpy2(vectors, closing)
            capture_apache(apache, vectors, closing)
            # No zlib vector: the kit checks that a request-id rewrite leaves the body bytes
            # alone, which cannot hold for a compressed payload (tested in our own tests).
    finally:
        for item in reversed(closing):
            with contextlib.suppress(Exception):
                item.close()
    vectors += bad_inputs()
    document = {"codec": "thrift", "options": {}, "vectors": vectors}
    header = (
        "# Golden vectors: frames captured from real Thrift peers over loopback by\n"
        "# codecs/thrift/tests/capture_golden.py (regenerate with it; do not edit by hand).\n"
    )
    OUT.write_text(header + yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    print(f"wrote {len(vectors)} vectors to {OUT}")


def capture_thriftpy2(vectors: list[dict[str, Any]], closing: list[Any]) -> None:
    for kind in peers_kinds():
        handler = peers.Handler(peers.calc_tp.CalcError)
        server = peers.thriftpy2_server(kind, handler)
        closing.append(server)
        options = {"strict": False} if kind.startswith("nonstrict") else {}
        relay = peers.Relay(server.port, options=options)
        closing.append(relay)
        client = peers.thriftpy2_client(kind, relay.port)
        closing.append(client)
        assert client.add(2, 3) == 5
        label = f"thriftpy2 {kind}"
        source = f"{TP} client ({kind})"
        vectors.append(vector(f"{label} call add", source, pick(relay.requests, "add"), options))
        reply_source = f"{TP} server ({kind})"
        vectors.append(
            vector(f"{label} reply add", reply_source, pick(relay.responses, "add"), options)
        )
        if kind == "binary-framed":
            with contextlib.suppress(peers.calc_tp.CalcError):
                client.divide(1, 0)
            client.notify("captured")
            handler.events.get(timeout=peers.TIMEOUT)
            item = client.roundtrip(make_item())
            assert item.name == "golden"
            vectors.append(
                vector(
                    f"{label} reply divide with declared exception",
                    reply_source,
                    pick(relay.responses, "divide"),
                    options,
                )
            )
            vectors.append(
                vector(f"{label} oneway notify", source, pick(relay.requests, "notify"), options)
            )
            vectors.append(
                vector(
                    f"{label} call roundtrip (nested struct)",
                    source,
                    pick(relay.requests, "roundtrip"),
                    options,
                )
            )
        if kind == "binary-buffered":
            client.roundtrip(make_item())
            vectors.append(
                vector(
                    f"{label} call roundtrip (nested struct, skipped to find its end)",
                    source,
                    pick(relay.requests, "roundtrip"),
                    options,
                )
            )
            # An unknown method: the server answers with a TApplicationException.
            v2 = make_client(peers.calc_tp.CalculatorV2, "127.0.0.1", relay.port, timeout=10000)
            closing.append(v2)
            try:
                v2.multiply(2, 3)
            except Exception as exc:
                assert "multiply" in str(exc) or exc.__class__.__name__.endswith("Exception")
            vectors.append(
                vector(
                    f"{label} exception for unknown method multiply",
                    reply_source,
                    pick(relay.responses, "multiply"),
                    options,
                )
            )


def peers_kinds() -> list[str]:
    return [
        "binary-framed",
        "binary-buffered",
        "nonstrict-framed",
        "nonstrict-buffered",
        "compact-framed",
        "compact-buffered",
    ]


def make_item() -> Any:
    leaf = peers.calc_tp.Leaf(small=1, ratio=0.5, flag=True, blob=b"\x01")
    return peers.calc_tp.Item(
        id=1,
        name="golden",
        values=[1, 2],
        tags={"k": "v"},
        marks={3},
        leaves=[leaf],
        by_id={2: leaf},
        grid=[["a"]],
        tiny=1,
    )


def capture_apache(apache: peers.Apache, vectors: list[dict[str, Any]], closing: list[Any]) -> None:
    for kind in ["binary-framed", "binary-buffered", "compact-framed", "compact-buffered"]:
        handler = peers.Handler(apache.ttypes.CalcError)
        server = apache.server(kind, handler)
        closing.append(server)
        relay = peers.Relay(server.port)
        closing.append(relay)
        client, protocol = apache.client(kind, relay.port)
        closing.append(protocol.trans)
        assert client.add(4, 5) == 9
        source = f"{AP} accelerated client ({kind})"
        vectors.append(vector(f"apache {kind} call add", source, pick(relay.requests, "add"), {}))
        vectors.append(
            vector(
                f"apache {kind} reply add",
                f"{AP} accelerated server ({kind})",
                pick(relay.responses, "add"),
                {},
            )
        )
    # Multiplexed.
    handler = peers.Handler(apache.ttypes.CalcError)
    server = apache.server("binary-framed", handler, multiplexed="calc")
    closing.append(server)
    relay = peers.Relay(server.port)
    closing.append(relay)
    client, protocol = apache.client("binary-framed", relay.port, multiplexed="calc")
    closing.append(protocol.trans)
    assert client.echo("mux") == "mux"
    vectors.append(
        vector(
            "apache framed binary multiplexed call calc:echo",
            f"{AP} TMultiplexedProtocol client",
            pick(relay.requests, "echo"),
            {},
        )
    )
    # THeader with info headers.
    for sub in ("binary", "compact"):
        handler = peers.Handler(apache.ttypes.CalcError)
        server = apache.server("header-any", handler)
        closing.append(server)
        relay = peers.Relay(server.port)
        closing.append(relay)
        client, protocol = apache.client(f"header-{sub}", relay.port)
        closing.append(protocol.trans)
        protocol.set_header(b"user", b"alice")
        protocol.set_header(b"x-request-id", b"r-1")
        assert client.add(1, 1) == 2
        vectors.append(
            vector(
                f"apache THeader {sub} call add with info headers",
                f"{AP} THeaderProtocol client",
                pick(relay.requests, "add"),
                {},
            )
        )
        vectors.append(
            vector(
                f"apache THeader {sub} reply add",
                f"{AP} THeaderProtocol server",
                pick(relay.responses, "add"),
                {},
            )
        )


def bad_inputs() -> list[dict[str, Any]]:
    return [
        {
            "name": "HTTP request on a Thrift port",
            "source": "hand-written",
            "hex": b"GET / HTTP/1.1\r\n\r\n".hex(),
            "expect": {"error": "FramingError"},
        },
        {
            "name": "framed length above the default limit",
            "source": "hand-written",
            "hex": "7fffffff80010001",
            "expect": {"error": "FrameTooLargeError"},
        },
        {
            "name": "bad binary version",
            "source": "hand-written",
            "hex": "0000001080020001000000036164640000000100",
            "expect": {"error": "FramingError"},
        },
    ]


if __name__ == "__main__":
    main()
