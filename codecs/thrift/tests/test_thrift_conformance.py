"""The MetaProtocol conformance kit against the installed Thrift codec.

Golden vectors and message strategies come from ``metaprotocol_thrift.conformance``;
``metaprotocol check thrift`` runs the same checks.
"""

from __future__ import annotations

from metaprotocol_sdk.testing import CodecConformance, CodecTarget, Outcome, check_names, run_check


class TestThriftConformance(CodecConformance):
    codec = "thrift"


def test_thrift_has_no_ping_and_the_ping_checks_skip_with_a_reason() -> None:
    # Thrift has no heartbeat message: an engine keeps no idle Thrift connection open by
    # pinging it, and the kit says why it did not test a ping.
    target = CodecTarget.discover("thrift")
    assert not target.codec.capabilities.heartbeat_request
    names = [n for n in check_names() if n.startswith("heartbeat_request_")]
    assert len(names) == 5
    for name in names:
        result = run_check(target, name)
        assert result.outcome is Outcome.skipped, (name, result.reason)
        assert "'heartbeat_request' capability" in result.reason
