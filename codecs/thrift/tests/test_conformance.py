"""The MetaProtocol conformance kit against the installed Thrift codec.

Golden vectors and message strategies come from ``metaprotocol_thrift.conformance``;
``metaprotocol check thrift`` runs the same checks.
"""

from __future__ import annotations

import sys

from metaprotocol_sdk.testing import CodecConformance


class TestThriftConformance(CodecConformance):
    codec = "thrift"


# codecs/dubbo/tests and codecs/thrift/tests are both packages named ``tests``, so pytest's
# importlib mode names both files ``tests.test_conformance`` and would reuse this module for
# the other codec's file. Forgetting the module name after import lets each file load its own.
sys.modules.pop(__name__, None)
