"""The MetaProtocol conformance kit against the installed Thrift codec.

Golden vectors and message strategies come from ``metaprotocol_thrift.conformance``;
``metaprotocol check thrift`` runs the same checks.
"""

from __future__ import annotations

import pytest
from metaprotocol_thrift import COMPILED, ThriftCodec

from metaprotocol_sdk import Encoded
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


class _OneByteNameLength(ThriftCodec):
    """Relabels and peeks a reply with the method name's length read from its last byte only
    (right for names below 256 bytes)."""

    conformance = "metaprotocol_thrift.conformance"

    def relabel(self, frame: bytes, request_id: int) -> Encoded:
        at = 12 + frame[11]  # the fault: one byte of the 4-byte name length
        return frame[:at] + request_id.to_bytes(4, "big") + frame[at + 4 :]


@pytest.mark.skipif(
    ThriftCodec.__module__ in COMPILED,
    reason="a compiled ThriftCodec takes no interpreted subclass; the material is the same "
    "in both builds, and the pure run checks it",
)
def test_the_material_has_a_reply_with_a_long_method_name() -> None:
    # grown(n)'s "framed reply name" has an n-byte name: before it, every reply of the material
    # had a name below 22 bytes, and this relabel passed every check.
    result = run_check(CodecTarget.discover(_OneByteNameLength), "peek_reply_large")
    assert result.outcome is Outcome.failed, result.reason
    assert "grown(256)['framed reply name']" in result.reason, result.reason
