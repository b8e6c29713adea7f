"""The MetaProtocol conformance kit against the installed Dubbo codec.

Golden vectors, message strategies, the mutation and the payload hook come from
``metaprotocol_dubbo.conformance``; ``metaprotocol check dubbo`` runs the same checks.
"""

from __future__ import annotations

import sys

from metaprotocol_sdk.testing import CodecConformance


class TestDubboConformance(CodecConformance):
    codec = "dubbo"


# codecs/dubbo/tests and codecs/thrift/tests are both packages named ``tests``, so pytest's
# importlib mode names both files ``tests.test_conformance`` and would reuse this module for
# the other codec's file. Forgetting the module name after import lets each file load its own.
sys.modules.pop(__name__, None)
