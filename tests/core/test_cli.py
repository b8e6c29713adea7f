"""The ``metaprotocol`` CLI: codecs and decode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from metaprotocol_sdk.cli import main
from metaprotocol_sdk.examples.kv import ONEWAY, REQUEST, RESPONSE, build_frame

KV = "metaprotocol_sdk.examples.kv:KVCodec"
STREAM = (
    build_frame(REQUEST, 1, {"method": "sayHello", "interface": "demo.Greeter"}, b"body")
    + build_frame(RESPONSE, 1, {"status": "ok"}, b"hi")
    + build_frame(ONEWAY, 2, {"method": "log"})
)


def run(*args: str, stdin: bytes | str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), input=stdin)
    return result.exit_code, result.stdout, result.stderr


def test_help_everywhere() -> None:
    for args in ([], ["codecs"], ["decode"]):
        code, out, _ = run(*args, "--help")
        assert code == 0 and "Usage:" in out


def test_decode_hex_json_prints_one_object_per_message() -> None:
    spaced = " ".join(STREAM.hex()[i : i + 8] for i in range(0, len(STREAM) * 2, 8))
    code, out, _ = run("decode", KV, "--hex", "--json", stdin=spaced + "\n")
    assert code == 0
    objects = [json.loads(line) for line in out.splitlines()]
    assert [o["message_type"] for o in objects] == ["Request", "Response", "Oneway"]
    first = objects[0]
    assert first["request_id"] == 1 and first["offset"] == 0
    assert first["attributes"] == {"method": "sayHello", "interface": "demo.Greeter"}
    assert first["header_size"] + first["body_size"] == first["size"]
    assert objects[1]["offset"] == first["size"]


def test_decode_raw_file_prints_a_table(tmp_path: Path) -> None:
    capture = tmp_path / "capture.bin"
    capture.write_bytes(STREAM)
    code, out, _ = run("decode", KV, str(capture))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["#", "OFFSET", "TYPE", "ID"]
    assert "sayHello" in lines[2] and "interface=demo.Greeter" in lines[2]
    assert len(lines) == 5


def test_truncated_last_message_is_reported_as_incomplete() -> None:
    code, out, err = run("decode", KV, "--hex", "--json", stdin=STREAM[:-3].hex())
    assert code == 1
    assert len(out.splitlines()) == 2  # the complete messages are still printed
    assert "incomplete message" in err and "trailing bytes" in err


def test_malformed_input_gives_offset_and_non_zero_exit() -> None:
    first = len(
        build_frame(REQUEST, 1, {"method": "sayHello", "interface": "demo.Greeter"}, b"body")
    )
    bad = STREAM[:first] + b"XX" + STREAM[first + 2 :]
    code, _, err = run("decode", KV, "--hex", stdin=bad.hex())
    assert code == 1
    assert "malformed input" in err and f"at byte {first}" in err and "message 2" in err
    assert "Traceback" not in err


def test_bad_hex_and_unknown_codec_are_clear_errors() -> None:
    code, _, err = run("decode", KV, "--hex", stdin="zz")
    assert code == 2 and "not valid hex" in err
    code, _, err = run("decode", "nosuch", "--hex", stdin="00")
    assert code == 2 and "no codec named 'nosuch'" in err
    code, _, err = run("decode", KV, "-o", "bogus=1", "--hex", stdin="00")
    assert code == 2 and "unknown option" in err


def test_codecs_lists_installed_codecs_as_json() -> None:
    code, out, _ = run("codecs", "--json")
    assert code == 0
    names = {c["name"]: c for c in json.loads(out)["codecs"]}
    for protocol in ("dubbo", "thrift"):
        entry = names[f"aeraki.meta_protocol.codec.{protocol}"]
        assert entry["aliases"] == [protocol]
        assert entry["distribution"] == f"metaprotocol-codec-{protocol}"


@pytest.mark.parametrize("module", ["metaprotocol_sdk"])
def test_console_entry_point_runs(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, "decode", KV, "--hex", "--json"],
        input=STREAM.hex(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3
