"""Java's string encoding in Hessian: UTF-16 code units, each written as a UTF-8 sequence.

Hessian lengths count UTF-16 code units, and Java writes every unit on its own (1 to 3 bytes),
so a character outside the BMP is two 3-byte sequences (one per surrogate), not one 4-byte
UTF-8 sequence. These helpers convert between that form and Python ``str``.
"""

from __future__ import annotations

import re
from typing import Final

#: Bytes 0x80-0xbf: UTF-8 continuation bytes (they start no character).
CONTINUATION: Final = bytes(range(0x80, 0xC0))

_NON_BMP: Final = re.compile("[\U00010000-\U0010ffff]")
# Raw patterns: ``re`` reads the escapes (a compiled module cannot hold lone surrogates).
_SURROGATE: Final = re.compile(r"[\ud800-\udfff]")
_PAIR: Final = re.compile(r"[\ud800-\udbff][\udc00-\udfff]")
_FOUR_BYTE_LEAD: Final = re.compile(b"[\xf0-\xff]")


def _split_pair(m: re.Match[str]) -> str:
    cp = ord(m.group()) - 0x10000
    return chr(0xD800 + (cp >> 10)) + chr(0xDC00 + (cp & 0x3FF))


def to_units(s: str) -> str:
    """Return ``s`` with each non-BMP character split into its UTF-16 surrogate pair.

    ``len()`` of the result is the Hessian length (UTF-16 units) of ``s``.
    """
    if s.isascii() or not _NON_BMP.search(s):
        return s
    return _NON_BMP.sub(_split_pair, s)


def encode_units(units: str) -> bytes:
    """Encode a string of UTF-16 units (as :func:`to_units` returns) the way Java does."""
    return units.encode("utf-8", "surrogatepass")


def _join_pair(m: re.Match[str]) -> str:
    pair = m.group()
    return chr(0x10000 + ((ord(pair[0]) - 0xD800) << 10) + (ord(pair[1]) - 0xDC00))


def join_pairs(s: str) -> str:
    """Join surrogate pairs in ``s`` into the characters they stand for (lone ones stay).

    Done with a regular expression rather than a UTF-16 round trip, so that no codec module
    has to be imported lazily on a hot path.
    """
    if s.isascii() or _SURROGATE.search(s) is None:
        return s
    return _PAIR.sub(_join_pair, s)


def units_end(data: bytes, pos: int, n: int, end: int) -> int:
    """Return where ``n`` UTF-16 units written Java's way, starting at ``pos``, end.

    Counts lead bytes (non-continuation bytes) a slice at a time instead of walking
    characters in Python. Returns ``-1`` when the data ends first. The bytes are not
    validated here; :func:`decode_units` does that.
    """
    stop = pos
    need = n
    cont = CONTINUATION
    while need:
        nxt = stop + need
        if nxt > end:
            return -1
        # The slice holds `need` bytes; its continuation bytes are units still missing.
        chunk = data[stop:nxt]
        # ASCII (the common case) has none; isascii is ~20x cheaper than translate.
        need = 0 if chunk.isascii() else len(chunk) - len(chunk.translate(None, cont))
        stop = nxt
    if n:
        lead = data[stop - 1]
        if lead >= 0xC0:
            stop += 1 if lead < 0xE0 else 2 if lead < 0xF0 else 3
            if stop > end:
                return -1
    return stop


def decode_units(raw: bytes, n: int) -> str | None:
    """Decode ``raw`` (``n`` UTF-16 units written Java's way) to a str of units.

    Surrogates are kept as they are (call :func:`join_pairs` on the whole string). Returns
    ``None`` when the bytes are not valid for Java (bad UTF-8, 4-byte sequences, wrong count).
    """
    try:
        s = raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None
    if len(s) != n or _FOUR_BYTE_LEAD.search(raw) is not None:
        return None
    return s
