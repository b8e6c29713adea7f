"""Finding the end of an unframed message that arrives in pieces, without starting over.

An unframed message has no length: only walking its struct tells where it ends. The fast
skippers (:mod:`.skip`) walk it in one go and give up at the end of the bytes; walking again
from the start on every read would cost time quadratic in the message size (a 2 MB message in
4 KiB writes took 4.4 s). :class:`ResumableSkip` walks with generator functions instead: when
the bytes run out they yield the offset they need, and :meth:`ResumableSkip.feed` resumes them
where they stopped, so each byte is walked once whatever the number of reads.

Collections declare their element count up front; each element takes at least one byte (binary
strings four), so a count that cannot fit in ``max_frame_size`` is reported at once (the caller
raises ``FrameTooLargeError``) instead of buffering up to the limit first.
"""

from __future__ import annotations

import struct
from collections.abc import Generator

from metaprotocol_sdk.errors import FramingError

from .detect import COMPACT

#: What the walkers yield (the offset they need bytes up to) and return (the end offset).
Walk = Generator[int, None, int]

_unpack_i32 = struct.Struct(">i").unpack_from
_BINARY_LIST = struct.Struct(">Bi")
_BINARY_MAP = struct.Struct(">BBi")

# Binary type id -> size of a fixed-size value (0: variable size or invalid).
_BINARY_FIXED = bytes([0, 0, 1, 1, 8, 0, 2, 0, 4, 0, 8, 0, 0, 0, 0, 0, 16] + [0] * 239)
# Binary type id -> fewest bytes a value of that type takes (string 4, struct 1, list/set 5,
# map 6), for the lower bound of a collection's size.
_BINARY_LEAST = bytes([0, 0, 1, 1, 8, 0, 2, 0, 4, 0, 8, 4, 1, 6, 5, 5, 16] + [0] * 239)
# Compact element type id -> size of a fixed-size element (booleans are a byte in lists).
_COMPACT_FIXED = bytes([0, 1, 1, 1, 0, 0, 0, 8, 0, 0, 0, 0, 0, 16, 0, 0])
_COMPACT_VARIABLE = frozenset({4, 5, 6, 8, 9, 10, 11, 12})


class _Feed:
    """The bytes available so far (re-bound on every read)."""

    __slots__ = ("buf", "end")

    def __init__(self) -> None:
        self.buf: bytes | bytearray = b""
        self.end = 0


def _wait(feed: _Feed, upto: int) -> Walk:
    """Yield until the bytes reach ``upto``."""
    while upto > feed.end:
        yield upto
    return upto


def _too_deep(pos: int) -> FramingError:
    return FramingError("structs nested deeper than max_depth", offset=pos)


# -- binary ------------------------------------------------------------------------------------


def _binary_struct(feed: _Feed, pos: int, depth: int) -> Walk:
    if depth <= 0:
        raise _too_deep(pos)
    while True:
        if pos >= feed.end:
            yield from _wait(feed, pos + 1)
        ftype = feed.buf[pos]
        if ftype == 0:
            return pos + 1
        pos += 3  # type and field id
        pos = yield from _binary_value(feed, pos, ftype, depth - 1, depth)


def _binary_value(feed: _Feed, pos: int, vtype: int, inner: int, depth: int) -> Walk:
    """A value of type ``vtype`` at ``pos``: a struct is walked at depth ``inner``, a
    collection at ``depth`` (the accounting of :mod:`.skip`, so both refuse the same)."""
    width = _BINARY_FIXED[vtype]
    if width:
        pos += width
        if pos > feed.end:
            yield from _wait(feed, pos)
        return pos
    if vtype == 11:
        if pos + 4 > feed.end:
            yield from _wait(feed, pos + 4)
        size = _unpack_i32(feed.buf, pos)[0]
        if size < 0:
            raise FramingError(f"negative string length {size}", offset=pos)
        pos += 4 + size
        if pos > feed.end:
            yield from _wait(feed, pos)
        return pos
    if vtype == 12:
        return (yield from _binary_struct(feed, pos, inner))
    if vtype == 14 or vtype == 15:
        if pos + 5 > feed.end:
            yield from _wait(feed, pos + 5)
        etype, count = _BINARY_LIST.unpack_from(feed.buf, pos)
        return (yield from _binary_items(feed, pos + 5, count, (etype,), depth))
    if vtype == 13:
        if pos + 6 > feed.end:
            yield from _wait(feed, pos + 6)
        ktype, etype, count = _BINARY_MAP.unpack_from(feed.buf, pos)
        return (yield from _binary_items(feed, pos + 6, count, (ktype, etype), depth))
    raise FramingError(f"unknown binary type {vtype}", offset=pos)


def _binary_items(feed: _Feed, pos: int, count: int, types: tuple[int, ...], depth: int) -> Walk:
    """``count`` list elements (one type) or map entries (two types) starting at ``pos``."""
    if count <= 0:
        if count:
            raise FramingError(f"negative collection size {count}", offset=pos - 4)
        return pos  # an empty collection's element types are not looked at (as skip.py does)
    least = 0
    for vtype in types:
        if not _BINARY_LEAST[vtype]:
            raise FramingError(f"unknown binary element type {vtype}", offset=pos)
        least += _BINARY_LEAST[vtype]
    # The fewest bytes these elements take: all of them when they are fixed-size.
    if pos + count * least > feed.end:
        yield from _wait(feed, pos + count * least)
    if all(_BINARY_FIXED[vtype] for vtype in types):
        return pos + count * least
    if depth <= 1:
        raise _too_deep(pos)
    for _ in range(count):
        for vtype in types:
            pos = yield from _binary_value(feed, pos, vtype, depth - 2, depth - 1)
    return pos


# -- compact -----------------------------------------------------------------------------------


def _varint(feed: _Feed, pos: int, limit: int) -> Walk:
    """Walk a varint of at most ``limit`` bytes; its value is ``_value`` (read after)."""
    start = pos
    while True:
        if pos >= feed.end:
            yield from _wait(feed, pos + 1)
        if feed.buf[pos] < 0x80:
            return pos + 1
        pos += 1
        if pos - start >= limit:
            raise FramingError(f"varint longer than {limit} bytes", offset=start)


def _value(buf: bytes | bytearray, start: int, end: int) -> int:
    """The unsigned varint in ``buf[start:end]``."""
    value = 0
    for shift, byte in enumerate(buf[start:end]):
        value |= (byte & 0x7F) << (7 * shift)
    return value


def _compact_struct(feed: _Feed, pos: int, depth: int) -> Walk:
    if depth <= 0:
        raise _too_deep(pos)
    while True:
        if pos >= feed.end:
            yield from _wait(feed, pos + 1)
        head = feed.buf[pos]
        if head == 0:
            return pos + 1
        ftype = head & 0x0F
        if head >> 4:
            pos += 1
        else:  # long form: the field id follows as a zigzag varint
            pos = yield from _varint(feed, pos + 1, 10)  # as skip.py reads it
        if ftype == 1 or ftype == 2:  # booleans live in the field header
            continue
        pos = yield from _compact_value(feed, pos, ftype, depth - 1, depth)


def _compact_value(feed: _Feed, pos: int, vtype: int, inner: int, depth: int) -> Walk:
    """As :func:`_binary_value`, for the compact protocol."""
    width = _COMPACT_FIXED[vtype]
    if width:
        pos += width
        if pos > feed.end:
            yield from _wait(feed, pos)
        return pos
    if 4 <= vtype <= 6:
        return (yield from _varint(feed, pos, 10))
    if vtype == 8:
        stop = yield from _varint(feed, pos, 5)
        pos = stop + _value(feed.buf, pos, stop)
        if pos > feed.end:
            yield from _wait(feed, pos)
        return pos
    if vtype == 12:
        return (yield from _compact_struct(feed, pos, inner))
    if vtype == 9 or vtype == 10:
        if pos >= feed.end:
            yield from _wait(feed, pos + 1)
        head = feed.buf[pos]
        count = head >> 4
        pos += 1
        if count == 15:  # the long form: a size varint follows
            stop = yield from _varint(feed, pos, 5)
            count, pos = _value(feed.buf, pos, stop), stop
        return (yield from _compact_items(feed, pos, count, (head & 0x0F,), depth))
    if vtype == 11:
        stop = yield from _varint(feed, pos, 5)
        count, pos = _value(feed.buf, pos, stop), stop
        if not count:
            return pos
        if pos >= feed.end:
            yield from _wait(feed, pos + 1)
        kinds = feed.buf[pos]
        return (yield from _compact_items(feed, pos + 1, count, (kinds >> 4, kinds & 0x0F), depth))
    raise FramingError(f"unknown compact type {vtype}", offset=pos)


def _compact_items(feed: _Feed, pos: int, count: int, types: tuple[int, ...], depth: int) -> Walk:
    if not count:
        return pos  # an empty collection's element types are not looked at (as skip.py does)
    for vtype in types:
        if not _COMPACT_FIXED[vtype] and vtype not in _COMPACT_VARIABLE:
            raise FramingError(f"unknown compact element type {vtype}", offset=pos)
    # Every element takes at least one byte.
    if pos + count * len(types) > feed.end:
        yield from _wait(feed, pos + count * len(types))
    if all(_COMPACT_FIXED[vtype] for vtype in types):
        return pos + count * sum(_COMPACT_FIXED[vtype] for vtype in types)
    if depth <= 1:
        raise _too_deep(pos)
    for _ in range(count):
        for vtype in types:
            pos = yield from _compact_value(feed, pos, vtype, depth - 2, depth - 1)
    return pos


# -- the resumable walk ------------------------------------------------------------------------


class ResumableSkip:
    """The walk over one unframed message whose struct starts at ``body``.

    :meth:`feed` is given the buffer (which must still start with the same message, longer
    each time) and returns the message's end offset, or the offset it needs bytes up to.
    ``head`` (the bytes up to the body) lets the caller check that the buffer still holds the
    message this walk started on.
    """

    __slots__ = ("_done", "_feed", "_walk", "head")

    def __init__(self, head: bytes, protocol: str, body: int, max_depth: int) -> None:
        self.head = head
        self._feed = _Feed()
        walk = _compact_struct if protocol == COMPACT else _binary_struct
        self._walk = walk(self._feed, body, max_depth)
        self._done = -1

    def feed(self, buffer: bytes | bytearray) -> tuple[bool, int]:
        """``(True, end)`` once the message is complete, else ``(False, bytes needed)``.

        Raises ``FramingError`` on bytes that are no Thrift value.
        """
        if self._done >= 0:
            return True, self._done
        self._feed.buf = buffer
        self._feed.end = len(buffer)
        try:
            return False, self._walk.send(None)
        except StopIteration as stop:
            self._done = stop.value
            return True, self._done
