"""Golden-vector and known-failures file formats: parsing, validation, matching."""

from __future__ import annotations

from pathlib import Path

import pytest

from metaprotocol_sdk import ConfigError
from metaprotocol_sdk.examples.kv import REQUEST, KVCodec, build_frame
from metaprotocol_sdk.testing import CodecTarget, Outcome, load_golden, load_golden_text, run_check
from metaprotocol_sdk.testing.golden import mismatches
from metaprotocol_sdk.testing.known_failures import parse_known_failures

FRAME = build_frame(REQUEST, 5, {"method": "get", "Service": "kv.Store"}, b"body")


def _golden(expect: str, hex_text: str = FRAME.hex()) -> str:
    return f"""
codec: kv
options: {{}}
vectors:
  - name: get
    source: test
    hex: "{hex_text}"
    expect: {expect}
"""


def test_golden_file_parses_hex_with_whitespace_and_options(tmp_path: Path) -> None:
    spaced = " ".join(FRAME.hex()[i : i + 8] for i in range(0, len(FRAME.hex()), 8))
    path = tmp_path / "golden.yaml"
    text = _golden("{message_type: Request}", spaced)
    path.write_text(text.replace("options: {}", "options: {max_frame_size: 4096}"))
    golden = load_golden(path)
    assert golden.codec == "kv"
    assert golden.vectors[0].frame == FRAME
    assert golden.vectors[0].options == {"max_frame_size": 4096}


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        (_golden("{message_type: Request}", "zz"), "not valid hex"),
        (_golden("{message_type: Requets}"), "is not one of"),
        (_golden("{method: get}"), "unknown keys ['method']"),
        (_golden("{drain_notice: yes please}"), "expect.drain_notice: must be true or false"),
        ("codec: kv\nvectors:\n  - name: x\n", "hex"),
        ("- just a list", "a golden file is a mapping"),
        ("codec: [unclosed", "not valid YAML"),
    ],
)
def test_golden_file_errors_name_the_problem(text: str, complaint: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_golden_text(text, source="g.yaml")
    assert complaint in str(info.value)
    assert "g.yaml" in str(info.value)


def test_golden_vectors_say_which_are_drain_notices() -> None:
    golden = load_golden_text(_golden("{message_type: Request, drain_notice: false}"))
    assert golden.vectors[0].expect["drain_notice"] is False


def test_expectations_match_subset_of_attributes_case_insensitively() -> None:
    metadata = KVCodec().decode(bytearray(FRAME))
    assert not isinstance(metadata, type(None))
    expect = {"message_type": "Request", "request_id": 5, "attributes": {"service": "kv.Store"}}
    assert mismatches(metadata, expect) == []  # type: ignore[arg-type]
    wrong = {"request_id": 6, "operation_name": "put", "attributes": {"service": "x"}}
    problems = mismatches(metadata, wrong)  # type: ignore[arg-type]
    assert len(problems) == 3 and "request_id: expected 6, got 5" in problems[0]


def test_golden_check_fails_on_a_wrong_expectation_and_shows_bytes() -> None:
    golden = load_golden_text(_golden("{request_id: 6, operation_name: get}"))
    result = run_check(CodecTarget.discover(KVCodec, golden=golden), "golden_vectors")
    assert result.outcome is Outcome.failed
    assert "request_id: expected 6, got 5" in result.reason
    assert "00000000  4b 56" in result.reason


def test_golden_check_names_the_file_of_the_failing_vectors(tmp_path: Path) -> None:
    # A wire-format change makes every captured vector stale at once: the report says which
    # file to capture again, once, in its first line (the one the summary table shows).
    path = tmp_path / "golden_stale.yaml"
    path.write_text(_golden("{request_id: 6}"), encoding="utf-8")
    result = run_check(CodecTarget.discover(KVCodec, golden=path), "golden_vectors")
    assert result.outcome is Outcome.failed
    first = result.reason.splitlines()[0]
    assert first == f"1 of 1 golden vectors (in {path}) fail:"
    assert result.reason.count(str(path)) == 1


def test_golden_bad_input_vector_needs_the_named_error() -> None:
    text = _golden("{error: FramingError}", "4b57" + "00" * 14)
    ok = run_check(CodecTarget.discover(KVCodec, golden=load_golden_text(text)), "golden_vectors")
    assert ok.outcome is Outcome.passed, ok.reason
    text = _golden("{error: FrameTooLargeError}", "4b57" + "00" * 14)
    bad = run_check(CodecTarget.discover(KVCodec, golden=load_golden_text(text)), "golden_vectors")
    assert bad.outcome is Outcome.failed
    assert "raised FramingError, expected FrameTooLargeError" in bad.reason


def test_known_failures_formats_and_required_reason() -> None:
    listed = {"known_failures": [{"check": "golden_vectors", "reason": "tracked in #1"}]}
    assert parse_known_failures(listed) == {"golden_vectors": "tracked in #1"}
    assert parse_known_failures({"golden_vectors": "why"}) == {"golden_vectors": "why"}
    assert parse_known_failures(None) == {}
    with pytest.raises(ConfigError, match="written reason"):
        parse_known_failures([{"check": "golden_vectors"}])
