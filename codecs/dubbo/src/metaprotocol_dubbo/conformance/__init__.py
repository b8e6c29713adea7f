"""Conformance material for the MetaProtocol conformance kit.

``golden.yaml`` holds frames captured from real Dubbo peers (sofa-rpc-node with
dubbo-remoting, dubbo-ssl-python) and what the codec must decode from them;
:mod:`.strategies` generates requests and responses; :data:`MUTATION` is what the kit's
round-trip checks write.
"""

from __future__ import annotations

#: The mutation the kit writes in its round-trip checks (attachments added and replaced).
MUTATION: dict[str, str] = {"x-conformance": "1", "group": "conformance"}
