"""Conformance material for the MetaProtocol conformance kit.

``golden.yaml`` holds frames captured from real Dubbo peers (sofa-rpc-node with
dubbo-remoting, dubbo-ssl-python) and what the codec must decode from them;
:mod:`.strategies` generates requests and responses; :data:`MUTATION` is what the kit's
round-trip checks write; :func:`payload` names the bytes a mutation must not touch.
"""

from __future__ import annotations

from metaprotocol_sdk import Metadata

from ..codec import RequestState, ResponseState

#: The mutation the kit writes in its round-trip checks (attachments added and replaced).
MUTATION: dict[str, str] = {"x-conformance": "1", "group": "conformance"}


def payload(metadata: Metadata) -> bytes | memoryview:
    """The bytes a mutation must leave unchanged: everything in the body but the attachments.

    Dubbo carries attachments inside the body, so the kit's ``mutation_body_unchanged`` check
    compares the arguments (requests) or the result value (responses) instead of the body.
    """
    state = metadata.codec_state
    frame = metadata.frame
    if isinstance(state, RequestState) and state.attachments is not None:
        start, end = state.attachments.start, state.attachments.end
        return frame[metadata.header_size : start] + frame[end:]
    if isinstance(state, ResponseState) and state.result_flag is not None:
        return frame[state.value_start : state.value_end]
    return metadata.body
