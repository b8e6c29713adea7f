"""Reading and writing the parts of a Hessian 2.0 Dubbo body that a proxy needs.

The common case (ASCII strings in compact form, string-to-string attachments) is read inline
with byte arithmetic; anything else falls back to the full Hessian decoder in
:mod:`metaprotocol_dubbo.hessian2`, positioned at the same offset. Strings, booleans, nulls
and numbers create no Hessian references or class definitions, so handing over to a fresh
decoder after the inline fast path keeps the reference numbering right.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from metaprotocol_sdk import FramingError

from .hessian2 import DEFAULT_MAX_ITEMS, Decoder, Encoder

#: Makes the Hessian decoder of a body at an offset (``Decoder``, or one with a codec's limits).
NewDecoder = Callable[[bytes, int], Decoder]

#: Hessian tags read inline.
TAG_NULL = 0x4E  # 'N'
TAG_MAP_UNTYPED = 0x48  # 'H'
TAG_MAP_TYPED = 0x4D  # 'M'
TAG_END = 0x5A  # 'Z'
#: Result flags 0..5 written as compact ints (0x90 + n).
COMPACT_INT_ZERO = 0x90

#: One parameter of a JVM descriptor (array dimensions, then a class or a primitive), and a
#: whole parameter list. The alternatives start with different characters: no backtracking.
_PARAMETER = re.compile(r"\[*(?:L[^;]*;|[ZBCDFIJS])")
_PARAMETERS = re.compile(r"(?:\[*(?:L[^;]*;|[ZBCDFIJS]))*")


def read_string(frame: bytes, pos: int) -> tuple[str, int]:
    """Read the Hessian string (or null, as "") at ``pos``; return it and the offset after it.

    Compact ASCII strings are read inline; the rest goes through the Hessian decoder.
    Raises :class:`~metaprotocol_sdk.FramingError` (a ``HessianError``) when it is not a string.
    """
    if pos >= len(frame):
        raise FramingError("body ends where a string should start", offset=pos)
    tag = frame[pos]
    if tag < 0x20:
        start = pos + 1
        stop = start + tag
    elif 0x30 <= tag <= 0x33:
        start = pos + 2
        stop = start + ((tag - 0x30) << 8 | (frame[pos + 1] if start <= len(frame) else 0))
    else:
        stop = -1
    if 0 <= stop <= len(frame):
        raw = frame[start:stop]
        if raw.isascii():
            return raw.decode("ascii"), stop
    decoder = Decoder(frame, pos)
    value = decoder.read_string()
    # A null where a string belongs reads as "" (Dubbo writes null for an absent version).
    return value or "", decoder.offset


def parameter_count(desc: str, offset: int) -> int:
    """Number of parameters in a JVM method descriptor's parameter list.

    Two C-level regular-expression passes (validate, count); not cached: a codec remembers
    the heads of recent requests, descriptor included.
    """
    if _PARAMETERS.fullmatch(desc) is None:
        raise FramingError(_descriptor_error(desc), offset=offset)
    return len(_PARAMETER.findall(desc))


def _descriptor_error(desc: str) -> str:
    """What is wrong with a descriptor that does not parse (quoting at most 80 characters)."""
    valid = _PARAMETERS.match(desc)
    rest = desc[valid.end() if valid is not None else 0 :]
    quoted = repr(desc) if len(desc) <= 80 else f"{desc[:80]!r}... ({len(desc)} characters)"
    kind = rest.lstrip("[")
    if not kind:
        return f"parameter descriptor {quoted} ends inside a type"
    if kind[0] == "L":
        return f"parameter descriptor {quoted}: unterminated class"
    return f"parameter descriptor {quoted}: bad type code {kind[0]!r}"


def skip_values(
    frame: bytes, pos: int, count: int, new_decoder: NewDecoder = Decoder
) -> tuple[int, Decoder | None]:
    """Skip ``count`` Hessian values from ``pos``; return the offset after them.

    Also returns the Hessian decoder used once the inline fast path (compact ASCII strings,
    small ints, null, booleans) gave up, so later reads share its reference state.
    ``new_decoder(frame, pos)`` makes that decoder (a codec's limits).
    """
    end = len(frame)
    decoder: Decoder | None = None
    for _ in range(count):
        if decoder is None and pos < end:
            tag = frame[pos]
            if tag < 0x20:
                stop = pos + 1 + tag
                if stop <= end and frame[pos + 1 : stop].isascii():
                    pos = stop
                    continue
            elif 0x30 <= tag <= 0x33 and pos + 1 < end:
                stop = pos + 2 + ((tag - 0x30) << 8 | frame[pos + 1])
                if stop <= end and frame[pos + 2 : stop].isascii():
                    pos = stop
                    continue
            elif 0x80 <= tag <= 0xBF or tag in (0x4E, 0x54, 0x46):  # small int, N, T, F
                pos += 1
                continue
            decoder = new_decoder(frame, pos)
        if decoder is None:
            decoder = new_decoder(frame, pos)
        decoder.skip()
        pos = decoder.offset
    return pos, decoder


class KnownHead:
    """A request head parsed before: its five strings (dubbo version, path, version, method,
    descriptor), the argument count and its length in bytes."""

    __slots__ = ("arg_count", "length", "strings")

    def __init__(self, strings: list[str], arg_count: int, length: int) -> None:
        self.strings = strings
        self.arg_count = arg_count
        self.length = length


class Attachments:
    """An attachments map as read from the wire.

    ``strings`` holds the string-to-string entries (the routable ones). ``others`` holds the
    entries with a non-string key or value, materialised, for filters that want them.
    ``all_strings`` tells that the map held nothing else, so it can be rewritten from
    ``strings`` alone. ``entries`` is how many entries the wire held (-1: not known, for a map
    reached by a Hessian reference): more than ``strings`` and ``others`` hold means a key
    came twice.
    """

    __slots__ = ("all_strings", "end", "entries", "others", "start", "strings")

    def __init__(
        self,
        strings: dict[str, str],
        others: dict[Any, Any] | None,
        start: int,
        end: int,
        entries: int = -1,
    ) -> None:
        self.strings = strings
        self.others = others
        self.all_strings = not others
        self.start = start
        self.end = end
        self.entries = entries


def read_attachments(
    frame: bytes,
    pos: int,
    decoder: Decoder | None,
    text: str | None = None,
    new_decoder: NewDecoder = Decoder,
    max_items: int = DEFAULT_MAX_ITEMS,
) -> Attachments:
    """Read the attachments map at ``pos`` (an untyped or typed Hessian map, or null).
    ``max_items`` is the ``max_items`` of the decoders ``new_decoder`` makes: a map of
    strings read inline holds no more entries than they would build."""
    end = len(frame)
    if pos >= end:
        raise FramingError("body ends where the attachments map should start", offset=pos)
    tag = frame[pos]
    if tag == TAG_NULL:
        return Attachments({}, None, pos, pos + 1, 0)
    if decoder is None and tag == TAG_MAP_UNTYPED:
        fast = _read_string_map(frame, pos, text, max_items)
        if fast is not None:
            return fast
    # General case: materialise the map with the Hessian decoder.
    if decoder is None:
        decoder = new_decoder(frame, pos)
    elif decoder.offset != pos:
        raise AssertionError("decoder out of step")  # pragma: no cover - internal invariant
    decoder.map_entries = -1
    value = decoder.read()
    if not isinstance(value, dict):
        raise FramingError(f"attachments must be a map, got {type(value).__name__}", offset=pos)
    # The map's own count, when it was read here (the last map to end); not for a reference.
    entries = decoder.map_entries if tag in (TAG_MAP_UNTYPED, TAG_MAP_TYPED) else -1
    strings: dict[str, str] = {}
    others: dict[Any, Any] = {}
    for key, item in value.items():
        if isinstance(key, str) and isinstance(item, str):
            strings[key] = item
        else:
            others[key] = item
    return Attachments(strings, others or None, pos, decoder.offset, entries)


def _read_string_map(
    frame: bytes, pos: int, text: str | None = None, max_items: int = DEFAULT_MAX_ITEMS
) -> Attachments | None:
    """Inline reader for an 'H' map of compact ASCII strings; ``None`` means "use the decoder"
    (which also refuses a map of more than ``max_items`` entries)."""
    # An entry takes two bytes at least (two empty strings): only a tail with room for more
    # than max_items of them needs counting.
    most = 2 * max_items if (len(frame) - pos) >> 1 > max_items else -1
    base = 0
    if text is None:
        # Scan only the tail: the map is the last thing in the body, after the arguments.
        base, frame = pos, frame[pos:]
        text, pos = frame.decode("latin-1"), 0
    items: list[str] = []
    stop = scan_map_strings(frame, text, pos + 1, items, most)
    if stop < 0 or not text[pos:stop].isascii():
        return None
    it = iter(items)
    strings = dict(zip(it, it, strict=True))
    return Attachments(strings, None, base + pos, base + stop, len(items) >> 1)


def scan_strings(frame: bytes, text: str, pos: int, count: int, out: list[str]) -> int:
    """Append ``count`` compact strings read from ``pos`` to ``out``; return the end, or -1.

    ``text`` is ``frame`` decoded as latin-1 (one byte-to-char copy), so each string is a str
    slice. -1 means something other than a compact string turned up (the caller then uses
    the full decoder). The caller checks ``text[pos:end].isascii()``: the span holds only
    string tags (all below 0x80) and string bytes, so that one check covers every string.
    """
    append = out.append
    try:
        while count:
            tag = frame[pos]
            if tag < 0x20:
                stop = pos + 1 + tag
                append(text[pos + 1 : stop])
            elif 0x30 <= tag <= 0x33:
                stop = pos + 2 + ((tag - 0x30) << 8 | frame[pos + 1])
                append(text[pos + 2 : stop])
            else:
                return -1
            pos = stop
            count -= 1
    except IndexError:
        return -1
    return pos if pos <= len(frame) else -1


def scan_request(
    frame: bytes,
    text: str,
    start: int,
    known: KnownHead | None = None,
    max_items: int = DEFAULT_MAX_ITEMS,
) -> tuple[list[str], dict[str, str], dict[str, tuple[str, str]], int, int, int] | None:
    """The whole request body in one pass, when it holds only compact ASCII strings.

    Returns ``(head, attachments, folded, args_start, arg_count, attachments_start)``:
    ``head`` holds the five leading strings (dubbo version, path, version, method,
    descriptor); ``folded`` maps each lower-cased attachment key to ``(key, value)`` (the
    shape attributes are stored in); the attachments map ends at the end of the frame.
    ``None`` means "not that shape" (the caller takes the general path, which reports any
    error), and also a map whose keys collide (one key twice, or two equal ignoring case):
    the general path refuses it with the keys named, and a map of more than ``max_items``
    entries, which the general path refuses as its decoder does. ``known`` is the head's
    :class:`KnownHead` when the caller already knows that the frame starts with the bytes of
    a head parsed before.
    """
    out: list[str] = []
    if known is not None:
        out, count, length = known.strings, known.arg_count, known.length
        pos = start + length
    else:
        pos = scan_strings(frame, text, start, 5, out)
        if pos < 0:
            return None
        desc = out[4]
        if not desc:
            count = 0
        elif not text[start:pos].isascii():
            return None
        else:
            count = parameter_count(desc, pos)
    args_start = pos
    pos = skip_compact_strings(frame, pos, count)
    if pos < 0:
        return None
    try:
        map_start = pos
        if frame[pos] != TAG_MAP_UNTYPED:
            return None
        pos += 1
        strings: dict[str, str] = {}
        folded: dict[str, tuple[str, str]] = {}
        pairs = 0
        while True:
            tag = frame[pos]
            if tag < 0x20:
                stop = pos + 1 + tag
                key = text[pos + 1 : stop]
            elif tag == TAG_END:
                break
            elif 0x30 <= tag <= 0x33:
                stop = pos + 2 + ((tag - 0x30) << 8 | frame[pos + 1])
                key = text[pos + 2 : stop]
            else:
                return None
            pos = stop
            tag = frame[pos]
            if tag < 0x20:
                stop = pos + 1 + tag
                value = text[pos + 1 : stop]
            elif 0x30 <= tag <= 0x33:
                stop = pos + 2 + ((tag - 0x30) << 8 | frame[pos + 1])
                value = text[pos + 2 : stop]
            else:
                return None
            pos = stop
            strings[key] = value
            folded[key.lower()] = (key, value)
            pairs += 1
    except IndexError:
        return None
    if (
        pos + 1 != len(frame)
        or len(folded) != pairs
        or pairs > max_items  # counted once made: the codec scans frames of 64 KiB at most
        or not text[start:pos].isascii()
    ):
        return None
    return out, strings, folded, args_start, count, map_start


def skip_compact_strings(frame: bytes, pos: int, count: int) -> int:
    """Skip ``count`` compact strings from ``pos``; the end, or -1 at anything else.

    Their characters are counted as bytes, which the caller validates with one ASCII check
    over the span (for ASCII, UTF-16 units and bytes are the same count).
    """
    try:
        while count:
            tag = frame[pos]
            if tag < 0x20:
                pos += 1 + tag
            elif 0x30 <= tag <= 0x33:
                pos += 2 + ((tag - 0x30) << 8 | frame[pos + 1])
            else:
                return -1
            count -= 1
    except IndexError:
        return -1
    return pos if pos <= len(frame) else -1


def scan_map_strings(frame: bytes, text: str, pos: int, out: list[str], most: int = -1) -> int:
    """Like :func:`scan_strings` up to a map's end tag; returns the offset after it, or -1
    (also past ``most`` strings, unless it is -1)."""
    if most >= 0:
        return _scan_map_strings_counted(frame, text, pos, out, most)
    append = out.append
    try:
        while True:
            tag = frame[pos]
            if tag < 0x20:
                stop = pos + 1 + tag
                append(text[pos + 1 : stop])
            elif tag == TAG_END:
                break
            elif 0x30 <= tag <= 0x33:
                stop = pos + 2 + ((tag - 0x30) << 8 | frame[pos + 1])
                append(text[pos + 2 : stop])
            else:
                return -1
            pos = stop
    except IndexError:
        return -1
    if len(out) & 1:
        return -1
    return pos + 1


def _scan_map_strings_counted(frame: bytes, text: str, pos: int, out: list[str], most: int) -> int:
    """:func:`scan_map_strings` for a map that may hold more than ``most`` strings: -1 past
    them, before their objects are made (a one-byte string is a Python object of ~50)."""
    append = out.append
    try:
        while True:
            tag = frame[pos]
            if tag < 0x20:
                stop = pos + 1 + tag
                append(text[pos + 1 : stop])
            elif tag == TAG_END:
                break
            elif 0x30 <= tag <= 0x33:
                stop = pos + 2 + ((tag - 0x30) << 8 | frame[pos + 1])
                append(text[pos + 2 : stop])
            else:
                return -1
            pos = stop
            most -= 1
            if most < 0:
                return -1
    except IndexError:
        return -1
    if len(out) & 1:
        return -1
    return pos + 1


def encode_string(value: str) -> bytes:
    """A Hessian string (inline for short ASCII, the Hessian encoder otherwise)."""
    if value.isascii():
        n = len(value)
        if n < 0x20:
            return bytes((n,)) + value.encode("ascii")
        if n < 0x400:
            return bytes((0x30 + (n >> 8), n & 0xFF)) + value.encode("ascii")
    encoder = Encoder()
    encoder.write(value)
    return encoder.getvalue()


#: Hessian length prefixes of compact strings (n < 1024) as latin-1 text.
_PREFIX: list[str] = [
    chr(n) if n < 0x20 else chr(0x30 + (n >> 8)) + chr(n & 0xFF) for n in range(0x400)
]


def _string_text(value: str) -> str:
    """:func:`encode_string` as latin-1 text (bytes 0..255 as characters 0..255)."""
    return encode_string(value).decode("latin-1")


def encode_string_map(entries: dict[str, str]) -> bytes:
    """An untyped Hessian map ('H' ... 'Z') of strings.

    Compact ASCII strings are assembled as latin-1 text (prefix characters plus the string)
    and encoded once, instead of one small ``bytes`` per string.
    """
    parts: list[str] = ["H"]
    append = parts.append
    prefix = _PREFIX
    for key, value in entries.items():
        n = len(key)
        append(prefix[n] + key if n < 0x400 and key.isascii() else _string_text(key))
        n = len(value)
        append(prefix[n] + value if n < 0x400 and value.isascii() else _string_text(value))
    append("Z")
    return "".join(parts).encode("latin-1")


def rewrite_map(
    frame: bytes,
    start: int,
    end: int,
    mutation: Mapping[str, str],
    replay: tuple[int, int] = (0, 0),
    new_decoder: NewDecoder = Decoder,
) -> bytes:
    """Re-encode the map at ``frame[start:end]`` with ``mutation`` added or replacing entries.

    Entries the mutation does not touch keep their exact bytes (so non-string values, typed
    objects and their references survive); replaced entries and new ones are written as
    strings. A mutation key replaces every string key equal to it ignoring case (attributes
    ignore case): the first in place, written as the mutation spells it (an exact match keeps
    its bytes), the others dropped, so the map holds the key once. ``replay`` is the offset
    and count of the values written before the map in the same Hessian stream.
    """
    folded = fold_mutation(mutation)
    if frame[start] == TAG_NULL:
        return encode_string_map(dict(folded.values()))
    # Replay the values before the map (skipping them) so that class definitions, type names
    # and reference numbers they introduced resolve inside the map.
    values_start, values_count = replay
    decoder = new_decoder(frame, values_start if values_count else start)
    for _ in range(values_count):
        decoder.skip()
    tag = frame[start]
    if decoder.offset != start:
        raise FramingError("attachments do not follow the values", offset=start)
    if tag == TAG_MAP_TYPED:
        decoder.offset = start + 1
        decoder.skip()  # the type name (a string or a type reference)
    elif tag == TAG_MAP_UNTYPED:
        decoder.offset = start + 1
    else:
        raise FramingError("attachments are not a map", offset=start)
    pos = decoder.offset
    # The map's own header (tag and type) is kept, so type references stay numbered.
    parts = [frame[start:pos]]
    written: set[str] = set()
    while frame[pos] != TAG_END:
        key_start = pos
        key: Any = decoder.read()
        value_start = decoder.offset
        decoder.skip()
        pos = decoder.offset
        item = folded.get(key.lower()) if isinstance(key, str) else None
        if item is None:
            parts.append(frame[key_start:pos])
        elif item[0] not in written:
            # A later occurrence (the key again, or a case variant: a reply may hold them) is
            # dropped: decode would read the last one, the provider's map both.
            written.add(item[0])
            parts.append(frame[key_start:value_start] if key == item[0] else encode_string(item[0]))
            parts.append(encode_string(item[1]))
    if pos + 1 != end:
        raise FramingError("attachments map ends early", offset=pos)
    for key, value in folded.values():
        if key not in written:
            parts.append(encode_string(key))
            parts.append(encode_string(value))
    parts.append(b"Z")
    return b"".join(parts)


def fold_mutation(mutation: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """``mutation`` as attributes hold it, ``{key.lower(): (key, value)}``: of two keys equal
    ignoring case the last one is written (as :class:`~metaprotocol_sdk.Attributes` keep it)."""
    return {key.lower(): (key, value) for key, value in mutation.items()}


def merge_strings(strings: dict[str, str], folded: dict[str, tuple[str, str]]) -> dict[str, str]:
    """The string map ``strings`` with the folded mutation ``folded`` applied: a key equal to
    a mutation key ignoring case is replaced in place (the mutation's spelling, once), other
    keys are appended."""
    merged: dict[str, str] = {}
    for key, value in strings.items():
        item = folded.get(key.lower())
        if item is None:
            merged[key] = value
        else:
            merged[item[0]] = item[1]
    merged.update(folded.values())
    return merged
