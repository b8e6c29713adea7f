"""Golden vectors captured from the real peers decode to their recorded expectations."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import yaml
from metaprotocol_dubbo import DubboCodec

import metaprotocol_sdk
from metaprotocol_sdk import CodecError, Metadata, NeedData

GOLDEN = files("metaprotocol_dubbo") / "conformance" / "golden.yaml"
CAPTURES = Path(__file__).resolve().parent / "captures"
DOCUMENT: dict[str, Any] = yaml.safe_load(GOLDEN.read_text(encoding="utf-8"))
VECTORS: list[dict[str, Any]] = DOCUMENT["vectors"]


def test_golden_file_header_and_coverage() -> None:
    assert DOCUMENT["codec"] == "dubbo" and DOCUMENT["options"] == {}
    names = " | ".join(v["name"] for v in VECTORS)
    for needed in (
        "sofa-rpc-node consumer sayHello",
        "sofa-rpc-node provider sayHello response",
        "exception (status 80)",
        "dubbo-ssl-python consumer sayHello",
        "heartbeat request",
        "heartbeat reply",
    ):
        assert needed in names
    sources = {v["source"] for v in VECTORS}
    assert {"sofa-rpc-node 2.10.0 + dubbo-remoting 2.1.4", "dubbo-ssl-python 0.9.6"} <= sources


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_decodes_to_its_expectation(vector: dict[str, Any]) -> None:
    frame = bytes.fromhex(vector["hex"])
    expect = vector["expect"]
    codec = DubboCodec()
    buffer = bytearray(frame)
    if "error" in expect:
        with pytest.raises(CodecError) as info:
            codec.decode(buffer)
        assert type(info.value).__name__ == expect["error"]
        return
    md = codec.decode(buffer)
    assert isinstance(md, Metadata) and not buffer
    assert md.message_type.name == expect["message_type"]
    assert md.request_id == expect["request_id"]
    assert md.operation_name == expect.get("operation_name", "")
    assert md.size == expect["size"] == len(frame)
    if "response_status" in expect:
        assert md.response_status.name == expect["response_status"]
    assert md.attributes.to_dict() == expect.get("attributes", {})
    # Every prefix is "need more data", never a short message.
    for cut in (0, 1, 15, 16, len(frame) - 1):
        assert isinstance(DubboCodec().decode(bytearray(frame[:cut])), NeedData)


def _cli(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "metaprotocol_sdk", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=str(Path(metaprotocol_sdk.__file__).resolve().parents[1]),
    )


def test_cli_decodes_a_captured_stream_of_several_messages() -> None:
    stream = (CAPTURES / "sofa_consumer_to_provider.hex").read_text()
    frames = [bytes.fromhex(line) for line in stream.split()]
    assert len(frames) >= 3
    result = _cli("decode", "dubbo", "--hex", "--json", stdin=stream)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["operation_name"] for line in lines] == [
        "sayHello",
        "attachments",
        "fail",
        "exceptionResult",
    ]
    offsets = [0]
    for frame in frames[:-1]:
        offsets.append(offsets[-1] + len(frame))
    assert [line["offset"] for line in lines] == offsets
    assert all(line["message_type"] == "Request" for line in lines)
    assert lines[1]["attributes"]["x-tenant"] == "t1"
    assert lines[0]["attributes"]["interface"] == "com.example.DemoService"


def test_cli_decodes_the_response_stream_with_the_aeraki_name() -> None:
    stream = (CAPTURES / "sofa_provider_to_consumer.hex").read_text()
    result = _cli("decode", "aeraki.meta_protocol.codec.dubbo", "--hex", "--json", stdin=stream)
    assert result.returncode == 0, result.stderr
    kinds = [json.loads(line)["message_type"] for line in result.stdout.splitlines()]
    assert kinds == ["Response", "Response", "Error", "Response"]


def test_cli_reports_a_truncated_last_message() -> None:
    stream = (CAPTURES / "sofa_consumer_to_provider.hex").read_text().split()
    result = _cli("decode", "dubbo", "--hex", stdin=stream[0] + stream[1][:40])
    assert result.returncode != 0
    assert "incomplete message" in result.stderr
