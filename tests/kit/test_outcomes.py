"""Skips carry reasons, known failures are strict, codecs that ship nothing get a report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from broken_codecs import DropsRequestIdInErrorReply

from metaprotocol_sdk import Capabilities, ConfigError
from metaprotocol_sdk.examples.kv import KVCodec
from metaprotocol_sdk.testing import CodecTarget, Outcome, check_names, run_check, run_kit


class NoMutationKV(KVCodec):
    conformance = "metaprotocol_sdk.examples.kv_conformance"
    capabilities = Capabilities(heartbeat=True, oneway=True, error_reply=True)


class ShipsNothingKV(KVCodec):
    conformance = None


def test_undeclared_capabilities_skip_with_a_written_reason() -> None:
    report = run_kit(CodecTarget.discover(NoMutationKV))
    assert report.passed
    by_name = {r.check: r for r in report.results}
    for name in ("mutation_visible", "mutation_body_unchanged", "rewrite_request_id"):
        assert by_name[name].outcome is Outcome.skipped
        assert "capability" in by_name[name].reason
    assert all(r.reason for r in report.results if r.outcome is Outcome.skipped)


def test_a_drain_notice_switched_off_by_a_subclass_skips_with_a_reason() -> None:
    # NoMutationKV's own capabilities leave out the notice KVCodec implements: switched off,
    # not forgotten (UndeclaredNotice in broken_codecs is the forgotten flag, which fails).
    result = run_check(CodecTarget.discover(NoMutationKV), "drain_notice_declared")
    assert result.outcome is Outcome.skipped
    assert "set in NoMutationKV, switch off the drain notice it inherits" in result.reason
    assert "drain_notice (from KVCodec)" in result.reason
    for name in ("drain_notice_heartbeat", "drain_notice_only_notices"):
        assert run_check(CodecTarget.discover(NoMutationKV), name).outcome is Outcome.skipped


def test_a_ping_switched_off_by_a_subclass_skips_with_a_reason() -> None:
    # NoMutationKV's own capabilities leave out the ping KVCodec builds: switched off, not
    # forgotten (UndeclaredPing in broken_codecs is the forgotten flag, which fails).
    target = CodecTarget.discover(NoMutationKV)
    result = run_check(target, "heartbeat_request_declared")
    assert result.outcome is Outcome.skipped
    assert "set in NoMutationKV, switch off the heartbeat_request it inherits" in result.reason
    assert "(from KVCodec)" in result.reason
    for name in ("heartbeat_request_heartbeat", "heartbeat_request_answered"):
        assert run_check(target, name).outcome is Outcome.skipped


def test_known_failure_that_still_fails_is_xfailed_and_run_passes() -> None:
    target = CodecTarget.discover(
        DropsRequestIdInErrorReply,
        known_failures={"error_reply_request_id": "ids are added in the next release"},
    )
    report = run_kit(target, ["error_reply_nonempty", "error_reply_request_id"])
    result = report.result("error_reply_request_id")
    assert result.outcome is Outcome.xfailed
    assert result.reason.startswith("known failure: ids are added in the next release")
    assert report.passed


def test_known_failure_that_now_passes_fails_the_run() -> None:
    target = CodecTarget.discover(KVCodec, known_failures={"heartbeat_reply": "not done"})
    result = run_check(target, "heartbeat_reply")
    assert result.outcome is Outcome.fixed
    assert "now passes, remove it from known failures" in result.reason
    report = run_kit(target, ["heartbeat_reply"])
    assert not report.passed
    assert report.to_dict()["passed"] is False


def test_unknown_known_failure_is_noted() -> None:
    target = CodecTarget.discover(KVCodec, known_failures={"no_such_check": "typo"})
    report = run_kit(target, ["golden_vectors"])
    assert any("no_such_check" in note for note in report.notes)


def test_codec_shipping_nothing_gets_generic_checks_and_says_what_was_not_covered() -> None:
    target = CodecTarget.discover(ShipsNothingKV)
    report = run_kit(target)
    assert report.passed, report.format_text()
    assert any("ships no conformance package" in note for note in report.notes)
    assert any("only the generic random-bytes" in note for note in report.notes)
    outcomes = {r.check: r.outcome for r in report.results}
    assert outcomes["bad_input_random_bytes"] is Outcome.passed
    assert outcomes["framing_split_points"] is Outcome.skipped
    text = report.format_text()
    assert "not covered:" in text and "no golden vectors" in text
    assert json.loads(report.to_json())["notes"] == report.notes


def test_report_lists_every_check_in_text_and_json() -> None:
    report = run_kit(CodecTarget.discover(KVCodec), ["golden_vectors", "perf_throughput"])
    document = report.to_dict()
    assert [r["check"] for r in document["results"]] == ["golden_vectors", "perf_throughput"]
    perf = report.result("perf_throughput")
    assert perf.details["decode_msgs_per_s"] > 0 and "msg/s" in perf.reason
    assert set(check_names()) >= {r["check"] for r in document["results"]}


def test_payload_hook_narrows_what_a_mutation_must_leave_unchanged() -> None:
    from broken_codecs import CorruptsBodyOnMutation

    strict = CodecTarget.discover(CorruptsBodyOnMutation)
    assert run_check(strict, "mutation_body_unchanged").outcome is Outcome.failed
    # A codec whose first body byte were a mutable attachment would ship this hook.
    narrowed = CodecTarget.discover(CorruptsBodyOnMutation, payload=lambda md: md.body[1:])
    assert run_check(narrowed, "mutation_body_unchanged").outcome is Outcome.passed


def test_unusual_frames_and_grown_inputs_come_from_the_package_or_the_caller() -> None:
    from broken_codecs import QuadraticHeaders, RebuildsFrameOnEncode
    from hypothesis import strategies as st

    from metaprotocol_sdk.examples.kv import REQUEST, build_frame

    class Bare(RebuildsFrameOnEncode):
        conformance = None

    class BareQuadratic(QuadraticHeaders):
        conformance = None

    # Without unusual frames the check skips and says what is missing.
    bare = CodecTarget.discover(Bare)
    result = run_check(bare, "roundtrip_identity_unusual")
    assert result.outcome is Outcome.skipped
    assert "ships no unusual_messages" in result.reason
    # The caller's strategy is used instead of the package's (here: only canonical frames).
    canonical = st.just(build_frame(REQUEST, 5, {"a": "b"}, b"body"))
    target = CodecTarget.discover(RebuildsFrameOnEncode, unusual=canonical)
    assert run_check(target, "roundtrip_identity_unusual").outcome is Outcome.passed

    # grown(n) given by the caller: the only input, and the quadratic dimension is named.
    def grown(n: int) -> dict[str, bytes]:
        return {"many headers": build_frame(REQUEST, 1, {f"h{i}": "v" for i in range(n)})}

    quadratic = CodecTarget.discover(BareQuadratic, grown=grown)
    result = run_check(quadratic, "perf_linear")
    assert result.outcome is Outcome.failed
    assert "decode of many headers is not linear" in result.reason


def test_bad_hooks_are_config_errors_naming_the_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "bad_hooks_conformance"
    package.mkdir()
    (package / "__init__.py").write_text("unusual_messages = 42\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"bad_hooks_conformance\.unusual_messages must be"):
        CodecTarget.discover(KVCodec, conformance="bad_hooks_conformance")
