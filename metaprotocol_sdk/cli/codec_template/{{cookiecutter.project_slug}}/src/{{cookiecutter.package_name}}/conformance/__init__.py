"""Conformance material the SDK's kit finds next to the codec (``<package>.conformance``).

* ``golden.yaml``: golden vectors, real frames with the metadata they must decode to. For the
  example protocol they are what the example client prints with ``--golden``; for your
  protocol, capture them from real clients and servers.
* :func:`messages`: a hypothesis strategy of valid frames, each with its expected metadata,
  so every check also runs on generated messages.

Only the kit imports this package (it needs ``hypothesis``, a test dependency).
"""

from __future__ import annotations

from hypothesis import strategies as st
from metaprotocol_sdk.testing import Sample

from ..protocol import {% if cookiecutter.streaming %}STREAM_KINDS, {% endif %}Kind, build_frame

#: Message type names (as golden ``expect`` spells them) of each kind of frame.
MESSAGE_TYPES: dict[Kind, str] = {
    Kind.REQUEST: "Request",
    Kind.RESPONSE: "Response",
{%- if cookiecutter.oneway %}
    Kind.ONEWAY: "Oneway",
{%- endif %}
{%- if cookiecutter.heartbeat %}
    Kind.PING: "Heartbeat",
    Kind.PONG: "Heartbeat",
{%- endif %}
    Kind.ERROR: "Error",
{%- if cookiecutter.streaming %}
    Kind.STREAM_OPEN: "Stream_Init",
    Kind.STREAM_DATA: "Stream_Data",
    Kind.STREAM_HALF_CLOSE: "Stream_Close_One_Way",
    Kind.STREAM_CLOSE: "Stream_Close_Two_Way",
{%- endif %}
}

_KEY_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789-_."


@st.composite
def _frame(draw: st.DrawFn) -> Sample:
    kind = draw(st.sampled_from(sorted(MESSAGE_TYPES)))
{%- if cookiecutter.streaming %}
    # A stream frame's id field is its stream id, never 0.
    request_id = draw(st.integers(1 if kind in STREAM_KINDS else 0, 2**32 - 1))
{%- else %}
    request_id = draw(st.integers(0, 2**32 - 1))
{%- endif %}
    # Keys are distinct even ignoring case: attributes are case-insensitive.
    pairs = draw(
        st.dictionaries(
            st.text(_KEY_ALPHABET, min_size=1, max_size=16),
            st.text(st.characters(exclude_categories=["Cs"]), max_size=24),
            max_size=4,
        )
    )
    method = draw(st.one_of(st.none(), st.sampled_from(["sayHello", "getUser", "ping"])))
    if method is not None:
        pairs["method"] = method
    body = draw(st.binary(max_size=64))
    status = 0
    if kind == Kind.ERROR:
        status = draw(st.integers(0, 255))
    expect: dict[str, object] = {
        "message_type": MESSAGE_TYPES[kind],
        "request_id": request_id,
        "operation_name": pairs.get("method", ""),
        "body_size": len(body),
        "attributes": pairs,
    }
    if kind == Kind.RESPONSE:
        expect["response_status"] = "Ok"
{%- if cookiecutter.streaming %}
    if kind in STREAM_KINDS:
        expect.update(stream_id=request_id, stream_type="BidiStream")
{%- endif %}
    return Sample(frame=build_frame(kind, request_id, pairs, body, status=status), expect=expect)


def messages() -> st.SearchStrategy[Sample]:
    """Valid frames of every kind, each with the metadata the codec must decode from it."""
    return _frame()
