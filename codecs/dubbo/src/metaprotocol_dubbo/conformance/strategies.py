"""Hypothesis strategies of Dubbo frames: requests, responses and heartbeats (Hessian 2.0)."""

from __future__ import annotations

import string
from typing import Any

from hypothesis import strategies as st

from ..codec import heartbeat_request
from ..frames import build_request, build_response
from ..header import FLAG_EVENT, FLAG_REQUEST, FLAG_TWOWAY, HESSIAN2, build_header
from ..hessian2 import dumps
from ..status import ResultFlag, Status

_names = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=24)
_ascii_names = st.text(
    alphabet=string.ascii_letters + string.digits + "._-$", min_size=1, max_size=24
)
_keys = st.one_of(_ascii_names, _names)
_strings = st.one_of(_ascii_names, st.text(max_size=40))
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    _strings,
)
_values: st.SearchStrategy[Any] = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(_ascii_names, inner, max_size=3)
    ),
    max_leaves=5,
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A request (two-way or one-way) with mixed arguments and mostly-string attachments."""
    args = draw(st.lists(st.one_of(_strings, _values), max_size=4))
    attachments = draw(st.dictionaries(_keys, _strings, max_size=6))
    if draw(st.booleans()):
        attachments.update(draw(st.dictionaries(_ascii_names, _values, max_size=2)))
    return build_request(
        draw(_ascii_names),
        draw(_names),
        args,
        request_id=draw(st.integers(min_value=0, max_value=2**64 - 1)),
        version=draw(st.one_of(st.just(""), _ascii_names)),
        attachments=attachments,
        two_way=draw(st.booleans()),
    )


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    """A response: any status, any result flag, with or without attachments."""
    request_id = draw(st.integers(min_value=0, max_value=2**64 - 1))
    status = draw(st.sampled_from(list(Status)))
    if status is not Status.OK:
        return build_response(status=status, error_message=draw(_strings), request_id=request_id)
    flag = draw(st.sampled_from(list(ResultFlag)))
    value = draw(_values) if flag.has_value else None
    attachments = draw(st.dictionaries(_keys, _strings, max_size=4))
    return build_response(
        value,
        result_flag=flag,
        attachments=attachments if flag.has_attachments else None,
        request_id=request_id,
    )


#: Hessian 2 encodings of the string "R", the body of Dubbo's read-only event: compact (what
#: Java and hessian.js write), the two-byte length form, the 'S' form, an empty chunk first.
READONLY_BODIES = (b"\x01R", b"\x30\x01R", b"S\x00\x01R", b"R\x00\x00\x01R")

#: Event bodies that are not the read-only marker: null, other strings (and "R" in a list).
_other_event_bodies = st.one_of(
    st.just(b"N"),
    st.sampled_from([b"\x01S", b"\x01r", b"\x02RR", b"\x00", b"\x79\x01R"]),
    _strings.filter(lambda text: text != "R").map(dumps),
)


@st.composite
def events(draw: st.DrawFn) -> bytes:
    """An event other than a plain heartbeat request: a heartbeat reply (event response), a
    read-only event (one-way, body "R" in any of its Hessian encodings), or an event of
    another kind (any body, one-way or two-way, "R" in a two-way one too)."""
    request_id = draw(st.integers(min_value=0, max_value=2**63))
    kind = draw(st.sampled_from(["reply", "readonly", "other"]))
    if kind == "reply":
        status = draw(st.sampled_from([Status.OK, Status.SERVER_ERROR]))
        return build_header(FLAG_EVENT | HESSIAN2, status.value, request_id, 1) + b"N"
    flag = FLAG_REQUEST | FLAG_EVENT | HESSIAN2
    if kind == "readonly":
        body = draw(st.sampled_from(READONLY_BODIES))
    else:
        two_way = draw(st.booleans())
        flag |= FLAG_TWOWAY if two_way else 0
        body = draw(
            st.one_of(st.sampled_from(READONLY_BODIES), _other_event_bodies)
            if two_way
            else _other_event_bodies
        )
    return build_header(flag, 0, request_id, len(body)) + body


def messages() -> st.SearchStrategy[bytes]:
    """Any Dubbo frame this codec handles: requests, responses, heartbeat requests and the
    other events (:func:`events`)."""
    return st.one_of(
        requests(),
        responses(),
        st.integers(min_value=0, max_value=2**63).map(heartbeat_request),
        events(),
    )


#: Alias used by this codec's own property tests.
frames = messages


def grown(n: int) -> dict[str, bytes]:
    """Messages whose size grows in proportion to ``n``, for the kit's linear-time check:
    requests, and a response (which the kit's ``peek_reply_large`` peeks at).

    Among them the shape of issue 13's quadratic decode: attachments that refer to lists
    inside the (skipped) arguments, 16 per unit of ``n``.
    """
    lists = [[i] for i in range(16 * n)]
    path = "com.example.Service"
    return {
        "attachments": build_request(
            path, "m", ["x"], attachments={f"k{i}": "v" for i in range(n)}
        ),
        "argument bytes": build_request(path, "m", ["x" * (64 * n)]),
        "arguments": build_request(path, "m", [f"a{i}" for i in range(n)]),
        "attachments referring to skipped arguments": build_request(
            path, "m", [lists], attachments={f"k{i}": item for i, item in enumerate(lists)}
        ),
        "response value bytes": build_response("r" * (64 * n), request_id=2),
    }


def _long_string(text: str) -> bytes:
    """``text`` (ASCII) in the 'S' form, which Java uses only from 1024 units on."""
    return b"S" + len(text).to_bytes(2, "big") + text.encode()


def _unusual_request(request_id: int, value: str, variant: int) -> bytes:
    """A legal request in a form our encoder never writes (see :func:`unusual_messages`)."""
    strings = [_long_string(s) for s in ("2.0.2", "com.example.Service", "1.0.0", "call")]
    descriptor = "Ljava/util/List;I" if variant == 2 else "Ljava/lang/String;I"
    head = b"".join(strings) + _long_string(descriptor)
    if variant == 0:  # the int argument in its 5-byte form, the string argument in 'S' form
        args = _long_string(value) + b"I\x00\x00\x00\x07"
        # a key in the long form; no key twice (decode refuses colliding keys)
        attachments = b"H" + _long_string("group") + b"\x01aZ"
    elif variant == 1:  # a chunked string argument; attachments as a typed map
        args = b"R\x00\x01x" + _long_string(value) + b"\x91"
        attachments = b"M\x0djava.util.Map\x03env\x04prodZ"
    else:  # a variable-length list ('W'), an int in 3-byte form where one byte fits
        args = b"W" + _long_string(value) + b"Z" + b"\xd4\x00\x01"
        attachments = b"H\x04path\x13com.example.ServiceZ"
    body = head + args + attachments
    return build_header(0xC2, 0, request_id, len(body)) + body


def unusual_messages() -> st.SearchStrategy[bytes]:
    """Legal requests our encoder never writes: long string forms where compact ones fit, ints
    in longer forms, chunked strings, variable-length lists, typed attachment maps, attachment
    keys in the long form.
    A codec that re-serialised them would change their bytes."""
    return st.builds(
        _unusual_request,
        st.integers(1, 2**62),
        st.text(alphabet=string.ascii_letters, max_size=12),
        st.integers(0, 2),
    )
