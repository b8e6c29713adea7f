"""The MetaProtocol conformance kit against the installed Dubbo codec.

Golden vectors, message strategies, the mutation and the payload hook come from
``metaprotocol_dubbo.conformance``; ``metaprotocol check dubbo`` runs the same checks.
"""

from __future__ import annotations

from metaprotocol_sdk.testing import CodecConformance


class TestDubboConformance(CodecConformance):
    codec = "dubbo"
