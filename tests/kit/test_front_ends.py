"""The two front ends: a pytest suite subclass, and ``metaprotocol check``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from metaprotocol_sdk.cli import main
from metaprotocol_sdk.testing.checks import REGISTRY

pytest_plugins = ("pytester",)

KV = "metaprotocol_sdk.examples.kv:KVCodec"
HERE = Path(__file__).parent


def test_pytest_suite_subclass_runs_every_check_as_a_named_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_kv_conformance="""
        from metaprotocol_sdk.examples.kv import KVCodec
        from metaprotocol_sdk.testing import CodecConformance

        class TestKV(CodecConformance):
            codec = KVCodec
        """
    )
    report = pytester.path / "report.json"
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", f"--conformance-json={report}")
    result.assert_outcomes(passed=len(REGISTRY))  # KV declares every capability
    result.stdout.fnmatch_lines(
        [
            "*metaprotocol conformance*",
            "*streaming_marked*PASSED*",
            "*perf_throughput*PASSED*msg/s*",
        ]
    )
    document = json.loads(report.read_text())
    assert document["passed"] is True
    assert len(document["results"]) == len(REGISTRY)


def test_pytest_skips_point_at_the_users_suite_class_with_the_reason(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_user_suite="""
        from dataclasses import replace
        from metaprotocol_sdk.examples.kv import KVCodec
        from metaprotocol_sdk.testing import CodecConformance
        class UnaryKV(KVCodec):
            capabilities = replace(KVCodec.capabilities, streaming=False)
        class TestMyKV(CodecConformance):
            codec = UnaryKV
            conformance = "metaprotocol_sdk.examples.kv_conformance"
        """
    )
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "-rs", "-k", "streaming_marked or golden_vectors"
    )
    result.assert_outcomes(passed=1, skipped=1)
    # The class statement is line 6 of the user's file; the kit's suite.py is not named.
    result.stdout.fnmatch_lines(
        [
            "SKIPPED [[]1[]] test_user_suite.py:6: codec does not declare the 'streaming' "
            "capability (Capabilities.streaming=False)"
        ]
    )
    assert "metaprotocol_sdk/testing" not in result.stdout.str()


def test_pytest_suite_without_a_loadable_codec_fails_in_one_line_per_test(
    pytester: pytest.Pytester,
) -> None:
    # A misspelt codec name, or no `codec =` at all, failed every test with a traceback
    # through the kit's and the registry's code.
    pytester.makepyfile(
        test_user_suite="""
        from metaprotocol_sdk.testing import CodecConformance
        class TestTypo(CodecConformance):
            codec = "kv_codecc"
        class TestForgot(CodecConformance):
            pass
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-k", "golden_vectors")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*TestTypo (codec kv_codecc): no codec named 'kv_codecc' is installed*",
            "*TestForgot: set `codec` to the codec class, an installed codec's name or "
            "'module:Class'*",
        ]
    )
    assert "Traceback" not in result.stdout.str()
    assert "metaprotocol_sdk/" not in result.stdout.str()
    assert "During handling" not in result.stdout.str()


def test_pytest_suite_reports_failures_xfails_and_fixed_known_failures(
    pytester: pytest.Pytester,
) -> None:
    pytester.syspathinsert(HERE)
    pytester.makepyfile(
        test_broken="""
        from broken_codecs import DropsRequestIdInErrorReply, EmptyErrorReply
        from metaprotocol_sdk.testing import CodecConformance

        class TestEmpty(CodecConformance):
            codec = EmptyErrorReply

        class TestDropsId(CodecConformance):
            codec = DropsRequestIdInErrorReply
            known_failures = {
                "error_reply_request_id": "ids come in 2.0",
                "error_reply_nonempty": "was broken once",
            }
        """
    )
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "-k", "error_reply_nonempty or error_reply_request_id", "-rxX"
    )
    result.assert_outcomes(failed=3, xfailed=1)
    result.stdout.fnmatch_lines(
        [
            "*TestEmpty.test_error_reply_nonempty*",
            "*on_error(RouteNotFound) returned an empty reply*",
            "*TestDropsId.test_error_reply_nonempty*",
            "*error_reply_nonempty now passes, remove it from known failures*",
            "*XFAIL*TestDropsId::test_error_reply_request_id*ids come in 2.0*",
        ]
    )


def test_check_command_passes_the_kv_codec_with_a_readable_report() -> None:
    result = CliRunner().invoke(main, ["check", KV])
    assert result.exit_code == 0, result.output
    assert "golden_vectors" in result.output and "PASSED" in result.output
    line = next(x for x in result.output.splitlines() if "streaming_marked" in x)
    assert "PASSED" in line


def test_check_command_json_report_and_exit_status(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HERE))
    ok = CliRunner().invoke(main, ["check", KV, "--json", "--only", "golden_vectors"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["passed"] is True
    bad = CliRunner().invoke(
        main, ["check", "broken_codecs:EmptyErrorReply", "--json", "--only", "error_reply_nonempty"]
    )
    assert bad.exit_code == 1
    document = json.loads(bad.output)
    assert document["passed"] is False
    assert document["results"][0]["outcome"] == "failed"
    only = ["--only", "error_reply_nonempty"]
    text = CliRunner().invoke(main, ["check", "broken_codecs:EmptyErrorReply", *only])
    assert text.exit_code == 1
    assert "error_reply_nonempty  FAILED" in text.output
    assert "returned an empty reply" in text.output


def test_check_command_errors_for_unknown_codec_and_check() -> None:
    missing = CliRunner().invoke(main, ["check", "no-such-codec"])
    assert missing.exit_code == 2
    assert "no codec named 'no-such-codec'" in missing.output
    typo = CliRunner().invoke(main, ["check", KV, "--only", "golden"])
    assert typo.exit_code == 2
    assert "unknown checks ['golden']" in typo.output
