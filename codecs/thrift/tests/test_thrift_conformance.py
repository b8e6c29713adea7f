"""The MetaProtocol conformance kit against the installed Thrift codec.

Golden vectors and message strategies come from ``metaprotocol_thrift.conformance``;
``metaprotocol check thrift`` runs the same checks.
"""

from __future__ import annotations

from metaprotocol_sdk.testing import CodecConformance


class TestThriftConformance(CodecConformance):
    codec = "thrift"
