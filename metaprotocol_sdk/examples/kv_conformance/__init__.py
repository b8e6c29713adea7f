"""Conformance material for the example KV codec: golden vectors and a message strategy.

Found by the kit's naming convention (``<codec module>_conformance`` next to
``metaprotocol_sdk.examples.kv``). ``golden.yaml`` holds captured frames; :func:`messages` is
the hypothesis strategy of valid messages the property checks draw from.
"""

from __future__ import annotations

from hypothesis import strategies as st

from metaprotocol_sdk.examples.kv import ERROR, ONEWAY, PING, PONG, REQUEST, RESPONSE, build_frame
from metaprotocol_sdk.testing import Sample

_TYPES = {
    REQUEST: "Request",
    RESPONSE: "Response",
    ONEWAY: "Oneway",
    PING: "Heartbeat",
    PONG: "Heartbeat",
    ERROR: "Error",
}

# Keys differing only in case would collapse into one (attributes are case-insensitive).
_keys = st.text(st.characters(codec="utf-8", categories=("L", "N", "Pd")), min_size=1, max_size=8)
_values = st.text(st.characters(codec="utf-8"), max_size=16)


@st.composite
def _message(draw: st.DrawFn) -> Sample:
    kind = draw(st.sampled_from(sorted(_TYPES)))
    request_id = draw(st.integers(0, 2**32 - 1))
    headers = draw(st.dictionaries(_keys, _values, max_size=4))
    headers = {k: v for k, v in headers.items() if k.lower() == k}
    if kind in (REQUEST, ONEWAY) and draw(st.booleans()):
        headers["method"] = draw(_keys)
    body = b"" if kind in (PING, PONG) else draw(st.binary(max_size=48))
    expect = {"message_type": _TYPES[kind], "request_id": request_id, "body_size": len(body)}
    return Sample(build_frame(kind, request_id, headers, body), expect=expect)


def messages() -> st.SearchStrategy[Sample]:
    """Valid KV messages of every kind, with their expected metadata."""
    return _message()
