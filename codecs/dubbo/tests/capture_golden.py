"""Capture golden vectors and stream captures from the real Dubbo peers (run by hand).

    .venv/bin/python codecs/dubbo/tests/capture_golden.py

Starts the sofa-rpc-node provider and consumer and the dubbo-ssl-python consumer, relays their
traffic unchanged (no mutation, ids kept) and writes:

* ``src/metaprotocol_dubbo/conformance/golden.yaml``: one vector per kind of frame, with the
  metadata our codec must decode from it (checked by ``test_dubbo_golden.py``);
* ``tests/captures/*.hex``: whole one-direction streams for the CLI test.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dubbo_harness import (
    TESTS_DIR,
    Relay,
    start_node_consumer,
    start_node_provider,
    start_python_consumer,
)
from metaprotocol_dubbo import DubboCodec

from metaprotocol_sdk import MessageType, Metadata

NODE = "sofa-rpc-node 2.10.0 + dubbo-remoting 2.1.4"
PYTHON = "dubbo-ssl-python 0.9.6"
GOLDEN = TESTS_DIR.parent / "src" / "metaprotocol_dubbo" / "conformance" / "golden.yaml"
CAPTURES = TESTS_DIR / "captures"


def expectation(md: Metadata) -> dict[str, Any]:
    """The golden ``expect`` block for a decoded message."""
    out: dict[str, Any] = {
        "message_type": md.message_type.name,
        "request_id": md.request_id,
    }
    if md.operation_name:
        out["operation_name"] = md.operation_name
    if md.message_type is not MessageType.Request:
        out["response_status"] = md.response_status.name
    if len(md.attributes):
        out["attributes"] = md.attributes.to_dict()
    out["size"] = md.size
    return out


def main() -> None:
    """Drive the peers and write the files."""
    provider, port = start_node_provider()
    relay = Relay(port, rewrite_ids=False)
    node = start_node_consumer(relay.port)
    python = start_python_consumer(relay.port)
    vectors: list[dict[str, Any]] = []

    def add(name: str, source: str, md: Metadata) -> None:
        vectors.append(
            {"name": name, "source": source, "hex": md.frame.hex(), "expect": expectation(md)}
        )

    def exchange(consumer: Any, **call: Any) -> tuple[Metadata, Metadata]:
        relay.reset()
        consumer.call(**call)
        request = relay.wait_for(lambda s: s.direction == "down").metadata
        response = relay.wait_for(lambda s: s.direction == "up").metadata
        return request, response

    try:
        request, response = exchange(node, method="sayHello", args=["world"])
        add("sofa-rpc-node consumer sayHello", NODE, request)
        add("sofa-rpc-node provider sayHello response", NODE, response)
        down_stream = [request.frame]
        up_stream = [response.frame]
        request, response = exchange(
            node, method="attachments", props={"x-tenant": "t1", "x-route": "canary"}
        )
        add("sofa-rpc-node consumer request with attachments, no arguments", NODE, request)
        add("sofa-rpc-node provider string response", NODE, response)
        down_stream.append(request.frame)
        up_stream.append(response.frame)
        request, response = exchange(node, method="fail", args=["boom"])
        add("sofa-rpc-node provider exception (status 80)", NODE, response)
        down_stream.append(request.frame)
        up_stream.append(response.frame)
        request, response = exchange(node, method="exceptionResult", args=["bad"])
        add("sofa-rpc-node provider exception result (flag 0)", NODE, response)
        down_stream.append(request.frame)
        up_stream.append(response.frame)

        relay.reset()
        beat = node.call(heartbeat=True)
        heartbeat = relay.wait_for(lambda s: s.direction == "down").metadata
        add("dubbo-remoting heartbeat request", NODE, heartbeat)
        direct = start_node_consumer(port)
        try:
            beat = direct.call(heartbeat=True)
        finally:
            direct.close()
        reply = DubboCodec().decode(bytearray(bytes.fromhex(beat["reply"])))
        assert isinstance(reply, Metadata)
        add("sofa-rpc-node provider heartbeat reply", NODE, reply)

        request, response = exchange(
            python, method="sayHello", args=["py"], context={"x-tenant": "t1"}
        )
        add("dubbo-ssl-python consumer sayHello", PYTHON, request)
        frames = python.call(heartbeat_frames=True)
        for kind in ("request", "reply"):
            md = DubboCodec().decode(bytearray(bytes.fromhex(frames[kind])))
            assert isinstance(md, Metadata)
            add(f"dubbo-ssl-python heartbeat {kind}", PYTHON, md)
    finally:
        python.close()
        node.close()
        relay.close()
        provider.close()

    first = bytes.fromhex(vectors[0]["hex"])
    bad_magic = b"\xca\xfe" + first[2:]
    fastjson = first[:2] + bytes([(first[2] & 0xE0) | 6]) + first[3:]
    vectors.append(
        {
            "name": "bad magic (first vector with its magic changed)",
            "source": "derived",
            "hex": bad_magic.hex(),
            "expect": {"error": "FramingError"},
        }
    )
    vectors.append(
        {
            "name": "fastjson serialization id 6 (first vector with its flag changed)",
            "source": "derived",
            "hex": fastjson.hex(),
            "expect": {"error": "UnsupportedError"},
        }
    )
    document = {"codec": "dubbo", "options": {}, "vectors": vectors}
    header = (
        "# Golden vectors captured from real Dubbo peers over 127.0.0.1 by\n"
        "# codecs/dubbo/tests/capture_golden.py (do not edit by hand; re-run it).\n"
    )
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(header + yaml.safe_dump(document, sort_keys=False, width=100000))
    CAPTURES.mkdir(exist_ok=True)
    (CAPTURES / "sofa_consumer_to_provider.hex").write_text(
        "\n".join(f.hex() for f in down_stream) + "\n"
    )
    (CAPTURES / "sofa_provider_to_consumer.hex").write_text(
        "\n".join(f.hex() for f in up_stream) + "\n"
    )
    print(f"wrote {len(vectors)} vectors to {GOLDEN}")


if __name__ == "__main__":
    main()
