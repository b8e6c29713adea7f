"""Conformance material for the MetaProtocol conformance kit.

``golden.yaml`` holds frames captured from real Dubbo peers (sofa-rpc-node with
dubbo-remoting, dubbo-ssl-python) and what the codec must decode from them;
:mod:`.strategies` generates requests and responses; :data:`MUTATION` is what the kit's
round-trip checks write; :func:`payload` names the bytes a mutation must not touch;
:func:`messages` adds expectations to the generated frames (which of them are drain notices,
Dubbo's read-only event, too).
"""

from __future__ import annotations

from hypothesis import strategies as st

from metaprotocol_sdk import Metadata
from metaprotocol_sdk.testing import Sample

from ..codec import RequestState, ResponseState
from . import strategies

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


def _expect(frame: bytes) -> Sample:
    """A generated frame with the message type and id its header announces (Dubbo's spec)."""
    flag = frame[2]
    if flag & 0x20:
        kind = "Heartbeat"
    elif flag & 0x80:
        kind = "Request" if flag & 0x40 else "Oneway"
    else:
        kind = "Response" if frame[3] == 20 else "Error"
    request_id = int.from_bytes(frame[4:12], "big")
    expect: dict[str, object] = {"message_type": kind, "request_id": request_id}
    # Dubbo's read-only event: a one-way event request whose body is the string "R".
    expect["drain_notice"] = flag & 0xE0 == 0xA0 and frame[16:] in strategies.READONLY_BODIES
    return Sample(frame, expect=expect)


def messages() -> st.SearchStrategy[Sample]:
    """:func:`.strategies.messages`, each frame with its expected type and id."""
    return strategies.messages().map(_expect)
