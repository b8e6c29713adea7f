"""Conformance material for the example KV codec: golden vectors and a message strategy.

Found by the kit's naming convention (``<codec module>_conformance`` next to
``metaprotocol_sdk.examples.kv``). ``golden.yaml`` holds captured frames; :func:`messages` is
the hypothesis strategy of valid messages the property checks draw from;
:func:`unusual_messages` gives legal frames a re-serialising codec would change, and
:func:`grown` requests that grow with ``n`` for the linear-time check.
"""

from __future__ import annotations

from hypothesis import strategies as st

from metaprotocol_sdk.examples.kv import (
    ERROR,
    GOAWAY,
    HEADER,
    ONEWAY,
    PING,
    PONG,
    REQUEST,
    RESPONSE,
    STREAM_CLOSE,
    STREAM_DATA,
    STREAM_HALF_CLOSE,
    STREAM_OPEN,
    build_frame,
)
from metaprotocol_sdk.testing import Sample

_TYPES = {
    REQUEST: "Request",
    RESPONSE: "Response",
    ONEWAY: "Oneway",
    PING: "Heartbeat",
    PONG: "Heartbeat",
    ERROR: "Error",
    STREAM_OPEN: "Stream_Init",
    STREAM_DATA: "Stream_Data",
    STREAM_HALF_CLOSE: "Stream_Close_One_Way",
    STREAM_CLOSE: "Stream_Close_Two_Way",
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
    if kind in (REQUEST, ONEWAY, STREAM_OPEN) and draw(st.booleans()):
        headers["method"] = draw(_keys)
    if kind == PONG and draw(st.booleans()):
        headers[GOAWAY] = draw(_values)  # the drain notice
    body = b"" if kind in (PING, PONG) else draw(st.binary(max_size=48))
    expect = {"message_type": _TYPES[kind], "request_id": request_id, "body_size": len(body)}
    expect["drain_notice"] = kind == PONG and GOAWAY in headers
    if kind >= STREAM_OPEN:  # a stream's frames carry its id (never 0) in the id field
        request_id = max(request_id, 1)
        expect.update(request_id=request_id, stream_id=request_id, stream_type="BidiStream")
    return Sample(build_frame(kind, request_id, headers, body), expect=expect)


def messages() -> st.SearchStrategy[Sample]:
    """Valid KV messages of every kind, with their expected metadata."""
    return _message()


def encode_pairs(pairs: list[tuple[str, str]]) -> bytes:
    """A headers block from (key, value) pairs, duplicates and all."""
    out = bytearray()
    for key, value in pairs:
        k, v = key.encode(), value.encode()
        out += bytes((len(k),)) + k + len(v).to_bytes(2, "big") + v
    return bytes(out)


@st.composite
def _unusual(draw: st.DrawFn) -> Sample:
    """A legal frame a codec that rebuilt frames from their metadata would change."""
    kind = draw(st.sampled_from([REQUEST, RESPONSE, ONEWAY, ERROR, STREAM_OPEN, STREAM_DATA]))
    request_id = draw(st.integers(1 if kind >= STREAM_OPEN else 0, 2**32 - 1))
    key = draw(_keys).lower()
    pairs = [(key, draw(_values)), (key, draw(_values))]  # a duplicate key: the last one wins
    pairs.append((key.upper() + "X", draw(_values)))  # upper case: attributes fold case
    pairs.append(("", draw(_values)))  # an empty key is legal
    pairs = draw(st.permutations(pairs))
    block = encode_pairs(pairs)
    body = draw(st.binary(max_size=32))
    reserved = draw(st.integers(1, 0xFFFF))  # reserved, ignored by decode, kept by encode
    header = HEADER.build(
        version=1,
        kind=kind,
        request_id=request_id,
        headers_length=len(block),
        reserved=reserved,
        body_length=len(body),
    )
    return Sample(header + block + body, expect={"message_type": _TYPES[kind]})


def unusual_messages() -> st.SearchStrategy[Sample]:
    """Valid KV frames with a non-zero reserved field, duplicate, upper-case and empty keys."""
    return _unusual()


def grown(n: int) -> dict[str, bytes]:
    """Messages whose size grows with ``n``: a request's body and number of headers, a
    reply's body (which ``peek_reply_large`` peeks at up to ``grown(16 * n)``).

    (The kit grows headers and values itself through mutations; a protocol with nesting or
    references would add those dimensions here.)
    """
    return {
        "body": build_frame(REQUEST, 1, {"method": "put"}, b"b" * (64 * n)),
        "headers": build_frame(REQUEST, 2, {f"h{i}": "v" for i in range(n)}),
        "reply body": build_frame(RESPONSE, 3, {"k": "v"}, b"r" * (64 * n)),
    }
