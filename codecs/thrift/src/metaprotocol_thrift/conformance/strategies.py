"""Hypothesis strategies of valid Thrift messages for the MetaProtocol conformance kit.

Calls, oneway calls, replies and exceptions in the strict binary and compact protocols, carried
framed, unframed and in THeader frames (with info headers). Argument structs hold a few
scalar and string fields; the kit only needs valid frames, not a particular IDL.
"""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from metaprotocol_sdk.testing import Sample

from .. import binary, compact, theader
from ..wire import write_varint

CALL, REPLY, EXCEPTION, ONEWAY = 1, 2, 3, 4
_TYPES = {CALL: "Request", ONEWAY: "Oneway"}

_names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,20}", fullmatch=True)
_text = st.text(max_size=24).map(lambda s: s.encode())
# One field: (kind, value); kinds are i32, i64, string, bool.
_fields: st.SearchStrategy[list[tuple[str, object]]] = st.lists(
    st.one_of(
        st.tuples(st.just("i32"), st.integers(-(2**31), 2**31 - 1)),
        st.tuples(st.just("i64"), st.integers(-(2**63), 2**63 - 1)),
        st.tuples(st.just("string"), _text),
        st.tuples(st.just("bool"), st.booleans()),
    ),
    max_size=5,
)


def _binary_struct(fields: list[tuple[str, object]], first_id: int = 1) -> bytes:
    out = bytearray()
    for field_id, (kind, value) in enumerate(fields, first_id):
        if kind == "i32":
            out += struct.pack(">bhi", 8, field_id, value)
        elif kind == "i64":
            out += struct.pack(">bhq", 10, field_id, value)
        elif kind == "bool":
            out += struct.pack(">bhb", 2, field_id, 1 if value else 0)
        else:
            assert isinstance(value, bytes)
            out += struct.pack(">bhi", 11, field_id, len(value)) + value
    return bytes(out + b"\x00")


def _zigzag(value: int, bits: int) -> int:
    return ((value << 1) ^ (value >> (bits - 1))) & ((1 << bits) - 1)


def _compact_struct(fields: list[tuple[str, object]], first_id: int = 1) -> bytes:
    out = bytearray()
    previous = 0
    for field_id, (kind, value) in enumerate(fields, first_id):
        delta = field_id - previous
        previous = field_id
        ctype = {"i32": 5, "i64": 6, "string": 8}.get(kind, 1 if value else 2)
        if 0 < delta <= 15:
            out.append((delta << 4) | ctype)
        else:
            out.append(ctype)
            out += write_varint(_zigzag(field_id, 16))
        if kind == "i32":
            assert isinstance(value, int)
            out += write_varint(_zigzag(value, 32))
        elif kind == "i64":
            assert isinstance(value, int)
            out += write_varint(_zigzag(value, 64))
        elif kind == "string":
            assert isinstance(value, bytes)
            out += write_varint(len(value)) + value
    return bytes(out + b"\x00")


@st.composite
def _message(draw: st.DrawFn) -> Sample:
    protocol = draw(st.sampled_from(["binary", "compact"]))
    transport = draw(st.sampled_from(["framed", "unframed", "header"]))
    mtype = draw(st.sampled_from([CALL, ONEWAY, REPLY, EXCEPTION]))
    name = draw(_names)
    seqid = draw(st.integers(1, 2**31 - 1))
    write_struct = _binary_struct if protocol == "binary" else _compact_struct
    if mtype == EXCEPTION:
        fields: list[tuple[str, object]] = [
            ("string", draw(_text)),
            ("i32", draw(st.integers(0, 10))),
        ]
        body = write_struct(fields)
    elif mtype == REPLY:
        body = write_struct([("i32", draw(st.integers(0, 99)))], 0)
    else:
        body = write_struct(draw(_fields))
    if protocol == "binary":
        begin = binary.write_message_begin(name.encode(), mtype, seqid, True)
    else:
        begin = compact.write_message_begin(name.encode(), mtype, seqid)
    payload = begin + body
    if transport == "unframed":
        frame = payload
    elif transport == "framed":
        frame = len(payload).to_bytes(4, "big") + payload
    else:
        headers = draw(st.dictionaries(_names, _names, max_size=3))
        info = [(k.encode(), v.encode()) for k, v in headers.items()]
        protocol_id = 2 if protocol == "compact" else 0
        block = theader.THeaderBlock(0, seqid, protocol_id, b"\x00", [], b"", 0)
        frame = theader.build_frame(0, seqid, theader.build_block(block, info), payload)
    expect: dict[str, object] = {"request_id": seqid, "operation_name": name}
    if mtype in _TYPES:
        expect["message_type"] = _TYPES[mtype]
    # One connection carries one transport and protocol, so each message names its own (the
    # kit only concatenates messages with equal options). The contract wants MutationError
    # for a mutation a message cannot carry; ``skip`` (the default) drops it silently.
    options = {"transport": transport, "protocol": protocol, "mutation_without_headers": "error"}
    return Sample(frame, expect=expect, options=options)


def messages() -> st.SearchStrategy[Sample]:
    """Valid Thrift messages across protocols and transports, with expected metadata."""
    return _message()


def _call(fields: bytes, protocol: str = "binary") -> bytes:
    if protocol == "compact":
        return compact.write_message_begin(b"grown", 1, 7) + fields + b"\x00"
    return binary.write_message_begin(b"grown", 1, 7, True) + fields + b"\x00"


def grown(n: int) -> dict[str, Sample]:
    """Messages whose size grows in proportion to ``n``, for the kit's linear-time check (and
    framed replies, one with a long method name, for ``peek_reply_large``).

    Among them issue 13's shape: unframed messages (no length: decode walks the struct to find
    the end), which the kit also delivers in 256-byte reads.
    """
    unframed = {"transport": "unframed"}
    strings = b"".join(struct.pack(">bhi", 11, i + 1, 16) + b"s" * 16 for i in range(n))
    ints = struct.pack(">bhbi", 15, 1, 8, 8 * n) + b"\x00\x00\x00\x01" * (8 * n)
    structs = struct.pack(">bhbi", 15, 1, 12, n) + (b"\x08\x00\x01\x00\x00\x00\x07\x00" * n)
    compact_strings = b"".join(b"\x18\x10" + b"s" * 16 for _ in range(n))
    framed = _call(ints)
    value = b"r" * (64 * n)
    reply = binary.write_message_begin(b"grown", 2, 8, True)  # REPLY, its success a string
    reply += b"\x0b\x00\x00" + len(value).to_bytes(4, "big") + value + b"\x00"
    # A reply whose method name is n bytes long: its length needs more than a byte, so a
    # peek_reply or relabel that reads one finds the seqid in the name.
    named = binary.write_message_begin(b"m" * n, 2, 9, True) + b"\x0b\x00\x00\x00\x00\x00\x01r\x00"
    info = [(f"key{i}".encode(), b"v" * 8) for i in range(n)]
    block = theader.THeaderBlock(0, 7, 0, b"\x00", info, b"", 0)
    return {
        "unframed string fields": Sample(_call(strings), options=unframed),
        "unframed list of i32": Sample(_call(ints), options=unframed),
        "unframed list of structs": Sample(_call(structs), options=unframed),
        "unframed compact string fields": Sample(
            _call(compact_strings, "compact"), options=unframed
        ),
        "framed list of i32": Sample(len(framed).to_bytes(4, "big") + framed),
        "THeader info headers": Sample(
            theader.build_frame(0, 7, theader.build_block(block, info), _call(strings))
        ),
        "framed reply string": Sample(len(reply).to_bytes(4, "big") + reply),
        "framed reply name": Sample(len(named).to_bytes(4, "big") + named),
    }


def _unusual(seqid: int, name: str, variant: int) -> Sample:
    """A legal message in a form our codec and Apache's libraries do not write."""
    raw = name.encode()
    call = binary.write_message_begin(raw, CALL, seqid, True) + b"\x08\x00\x01\x00\x00\x00\x07\x00"
    if variant == 0:  # non-strict binary (no version word), framed
        payload = binary.write_message_begin(raw, CALL, seqid, False) + b"\x00"
        frame = len(payload).to_bytes(4, "big") + payload
        options = {"transport": "framed", "protocol": "binary", "strict": "false"}
        return Sample(frame, expect={"request_id": seqid}, options=options)
    if variant == 1:  # compact, every field header in the long form (a delta would fit)
        body = b"\x05\x02\x0e" + b"\x08\x04\x04abcd" + b"\x00"
        payload = compact.write_message_begin(raw, CALL, seqid) + body
        frame = len(payload).to_bytes(4, "big") + payload
        return Sample(frame, expect={"request_id": seqid}, options={"transport": "framed"})
    # THeader: two key-value sections, an unknown info section kept verbatim, extra padding
    # (no key twice: decode refuses colliding keys)
    info = (
        b"\x01\x01\x03env\x04prod"  # a key-value section of one pair, then another
        + b"\x01\x01\x04zone\x01a"
        + b"\x07\x01\x02xy"  # an info section of an unknown type (7)
    )
    block = b"\x00\x00" + info
    block += b"\x00" * (-len(block) % 4 + 4)  # one more padding word than needed
    frame = theader.build_frame(0, seqid, block, call)
    return Sample(frame, expect={"request_id": seqid}, options={"transport": "header"})


def unusual_messages() -> st.SearchStrategy[Sample]:
    """Legal messages in forms no writer we know produces: non-strict binary, compact long-form
    field headers, THeader split key-value sections, unknown info sections and extra padding.
    A codec that re-serialised them would change their bytes."""
    return st.builds(_unusual, st.integers(1, 2**31 - 1), _names, st.integers(0, 2))
