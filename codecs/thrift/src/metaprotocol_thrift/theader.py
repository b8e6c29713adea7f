"""THeader transport: the fixed prefix, the variable header block, and rebuilding it."""

from __future__ import annotations

import zlib
from collections.abc import Mapping

from construct import Const, Int16ub, Int32sb, Int32ub, Struct

from metaprotocol_sdk.errors import (
    FrameTooLargeError,
    FramingError,
    MutationError,
    UnsupportedError,
)
from metaprotocol_sdk.header import compile_header

from .wire import (
    THEADER_INFO_KEYVALUE,
    THEADER_INFO_PKEYVALUE,
    THEADER_MAGIC,
    Buffer,
    Incomplete,
    read_varint,
    write_varint,
)

#: The 14 fixed bytes that open every THeader frame (the frame length included).
PREFIX = compile_header(
    Struct(
        "length" / Int32ub,
        "magic" / Const(THEADER_MAGIC, Int16ub),
        "flags" / Int16ub,
        "seqid" / Int32sb,
        "header_words" / Int16ub,
    )
)
PREFIX_SIZE = 14
SEQID_OFFSET = 8
#: THeader transform id of zlib compression (the only transform Apache's libraries define).
TRANSFORM_ZLIB = 1
#: Most transforms one frame may list. Each id may appear once (applying the same transform
#: twice gains nothing), and the ids Thrift implementations define (zlib, hmac, snappy, qlz,
#: zstd) are fewer; so undoing and redoing them costs a bounded number of passes.
MAX_TRANSFORMS = 8
#: How much of a compressed payload is inflated to read its message header.
HEADER_PEEK = 64 * 1024
#: Largest header block the 16-bit word count can describe.
MAX_HEADER_BLOCK = 0xFFFF * 4


class THeaderBlock:
    """What a THeader frame's header block holds, as raw bytes (so rebuilding is lossless).

    ``protocol_id`` is the payload protocol (0 binary, 2 compact); ``transforms`` the encoded
    transform list (count and ids, verbatim); ``info`` the key-value info headers in wire order;
    ``tail`` the persistent key-value sections (fbthrift's info id 2) and any info sections of
    unknown type, kept verbatim; ``payload_offset`` where the payload starts in the frame;
    ``items`` the info headers as attribute items (``{key.lower(): (key, value)}``, decoded as
    UTF-8); ``pairs`` how many the wire held (more than ``items`` holds: keys collide, see
    :func:`key_clash`); ``persistent`` how many persistent key-value pairs it held (never
    attributes: a server applies them to the connection's later messages too).

    :func:`read_block` fills ``items`` and keeps the info section's raw bytes; ``info`` and
    ``tail`` are parsed from them only when asked for (a mutation needs them, routing does not).
    """

    __slots__ = (
        "_info",
        "_raw",
        "_tail",
        "flags",
        "items",
        "pairs",
        "payload_offset",
        "persistent",
        "protocol_id",
        "seqid",
        "transforms",
    )

    def __init__(
        self,
        flags: int,
        seqid: int,
        protocol_id: int,
        transforms: bytes,
        info: list[tuple[bytes, bytes]] | None,
        tail: bytes,
        payload_offset: int,
        items: dict[str, tuple[str, str]] | None = None,
        raw: bytes = b"",
        pairs: int = -1,
        persistent: int = 0,
    ) -> None:
        self.flags = flags
        self.seqid = seqid
        self.protocol_id = protocol_id
        self.transforms = transforms
        self._info = info
        self._tail = tail
        self._raw = raw
        self.payload_offset = payload_offset
        if items is None:
            items = {}
            for key, value in info or ():
                text = key.decode("utf-8", "replace")
                items[text.lower()] = (text, value.decode("utf-8", "replace"))
        self.items = items
        self.pairs = len(items) if pairs < 0 else pairs
        self.persistent = persistent

    @property
    def info(self) -> list[tuple[bytes, bytes]]:
        """The key-value info headers, raw, in wire order."""
        if self._info is None:
            self._info, self._tail = _parse_info(self._raw)
        return self._info

    @property
    def tail(self) -> bytes:
        """Persistent key-value sections and info sections of unknown type, verbatim (padding
        removed)."""
        if self._info is None:
            self._info, self._tail = _parse_info(self._raw)
        return self._tail

    @property
    def transform_count(self) -> int:
        """How many transforms (zlib, ...) were applied to the payload."""
        return self.transforms[0] if self.transforms else 0


def _parse_info(raw: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The key-value pairs of an info section already validated by read_block, and the rest
    to keep verbatim: its persistent key-value sections, then what follows a section of
    unknown type."""
    info: list[tuple[bytes, bytes]] = []
    kept = bytearray()
    pos = 0
    end = len(raw)
    while pos < end:
        info_id = raw[pos]
        if info_id == 0:
            break
        if info_id not in (THEADER_INFO_KEYVALUE, THEADER_INFO_PKEYVALUE):
            kept += raw[pos:].rstrip(b"\0")
            break
        start = pos
        pairs, pos = read_varint(raw, pos + 1, end, 5)
        for _ in range(pairs):
            size, pos = read_varint(raw, pos, end, 5)
            key = raw[pos : pos + size]
            size, pos = read_varint(raw, pos + size, end, 5)
            if info_id == THEADER_INFO_KEYVALUE:
                info.append((key, raw[pos : pos + size]))
            pos += size
        if info_id == THEADER_INFO_PKEYVALUE:
            kept += raw[start:pos]
    return info, bytes(kept)


def read_block(buf: Buffer, end: int) -> THeaderBlock:
    """Parse the THeader prefix and header block of the complete frame ``buf[:end]``."""
    fields = PREFIX.unpack(buf, 0)
    if fields is None or end < PREFIX_SIZE:
        raise FramingError("THeader frame shorter than its 14-byte prefix", offset=0)
    _, _, flags, seqid, words = fields
    block_end = PREFIX_SIZE + words * 4
    if block_end > end:
        raise FramingError(
            f"THeader header block of {words * 4} bytes runs past the frame end", offset=12
        )
    pos = PREFIX_SIZE
    try:
        # Varints here are almost always one byte: read those inline, others with read_varint.
        if pos < block_end and buf[pos] < 0x80:
            protocol_id = buf[pos]
            pos += 1
        else:
            protocol_id, pos = read_varint(buf, pos, block_end, 5)
        transforms_start = pos
        if pos < block_end and buf[pos] == 0:
            pos += 1
            transforms = b"\x00"
        else:
            count, pos = read_varint(buf, pos, block_end, 5)
            if count > MAX_TRANSFORMS:
                raise FramingError(
                    f"THeader frame lists {count} transforms (at most {MAX_TRANSFORMS})",
                    offset=transforms_start,
                )
            seen: set[int] = set()
            for _ in range(count):
                at = pos
                transform_id, pos = read_varint(buf, pos, block_end, 5)
                if transform_id in seen:
                    raise FramingError(
                        f"THeader transform {transform_id} is listed twice", offset=at
                    )
                seen.add(transform_id)
            transforms = bytes(buf[transforms_start:pos])
        info_start = pos
        items: dict[str, tuple[str, str]] = {}
        total = 0
        persistent = 0
        while pos < block_end:
            info_id = buf[pos]
            if info_id != THEADER_INFO_KEYVALUE:
                if info_id != THEADER_INFO_PKEYVALUE:  # padding, or a section kept verbatim
                    break
                # Persistent headers: fbthrift reads on past them (Apache stops), so the
                # sections after them are read here too: a server must not see headers that
                # routing did not.
                pos += 1
                pairs, pos = read_varint(buf, pos, block_end, 5)
                persistent += pairs
                for _ in range(2 * pairs):  # keys and values, skipped
                    size, pos = read_varint(buf, pos, block_end, 5)
                    pos += size
                if pos > block_end:
                    raise Incomplete(pos)
                continue
            pos += 1
            pairs, pos = read_varint(buf, pos, block_end, 5)
            total += pairs
            for _ in range(pairs):
                if pos < block_end and buf[pos] < 0x80:
                    size = buf[pos]
                    pos += 1
                else:
                    size, pos = read_varint(buf, pos, block_end, 5)
                key = str(buf[pos : pos + size], "utf-8", "replace")
                pos += size
                if pos < block_end and buf[pos] < 0x80:
                    size = buf[pos]
                    pos += 1
                else:
                    size, pos = read_varint(buf, pos, block_end, 5)
                value = str(buf[pos : pos + size], "utf-8", "replace")
                pos += size
                if pos > block_end:
                    raise Incomplete(pos)
                items[key.lower()] = (key, value)
    except Incomplete:
        raise FramingError("THeader header block is truncated", offset=pos) from None
    raw = bytes(buf[info_start:block_end]) if items or persistent or pos < block_end else b""
    return THeaderBlock(
        flags, seqid, protocol_id, transforms, None, b"", block_end, items, raw, total, persistent
    )


def key_clash(block: THeaderBlock) -> str | None:
    """Why the block's info headers are ambiguous, or ``None``: a key that came twice, or two
    keys equal ignoring case (or read as the same text: invalid UTF-8 reads as U+FFFD). The
    engine's attributes keep one value for them, while a THeader server's map is keyed by the
    exact bytes. Checked only when ``pairs`` exceeds the attributes' count."""
    if block.pairs == len(block.items):
        return None
    seen: dict[str, bytes] = {}
    for key, _ in block.info:
        text = key.decode("utf-8", "replace")
        first = seen.get(text.lower())
        if first is None:
            seen[text.lower()] = key
        elif first == key:
            return f"header key {text!r} appears twice"
        elif (first_text := first.decode("utf-8", "replace")) == text:
            return f"header keys {first!r} and {key!r} read as the same text {text!r}"
        else:
            return f"header keys {first_text!r} and {text!r} differ only in case"
    return f"{block.pairs} info headers hold {len(block.items)} keys"  # pragma: no cover


def merge_info(
    info: list[tuple[bytes, bytes]], mutation: Mapping[str, str]
) -> list[tuple[bytes, bytes]]:
    """``info`` with ``mutation`` applied: keys replaced in place, else added. Keys are
    compared as decoding reads them (UTF-8 with replacement, then ignoring case), so a
    mutation of a key the attributes hold replaces that key whatever its bytes were (an
    invalid UTF-8 key, or one whose case differs beyond ASCII), never adds a second one the
    next decoder would refuse as colliding."""
    merged = list(info)
    index = {key.decode("utf-8", "replace").lower(): n for n, (key, _) in enumerate(merged)}
    for key, value in mutation.items():
        raw = (key.encode(), value.encode())
        folded = key.lower()
        n = index.get(folded)
        if n is None:
            index[folded] = len(merged)
            merged.append(raw)
        else:
            merged[n] = raw
    return merged


def build_block(block: THeaderBlock, info: list[tuple[bytes, bytes]]) -> bytes:
    """A header block (padded to 4 bytes) with ``info`` as its key-value section."""
    out = bytearray(write_varint(block.protocol_id))
    out += block.transforms
    if info:
        out += write_varint(THEADER_INFO_KEYVALUE)
        out += write_varint(len(info))
        for key, value in info:
            out += write_varint(len(key))
            out += key
            out += write_varint(len(value))
            out += value
    out += block.tail
    out += b"\0" * (-len(out) % 4)
    if len(out) > MAX_HEADER_BLOCK:
        raise MutationError(
            f"THeader header block of {len(out)} bytes exceeds {MAX_HEADER_BLOCK} bytes"
        )
    return bytes(out)


def build_frame(flags: int, seqid: int, block: bytes, payload: bytes | memoryview) -> bytes:
    """A complete THeader frame (length prefix included); ``seqid`` is unsigned 32-bit."""
    return (
        (10 + len(block) + len(payload)).to_bytes(4, "big")
        + THEADER_MAGIC.to_bytes(2, "big")
        + flags.to_bytes(2, "big")
        + seqid.to_bytes(4, "big")
        + (len(block) // 4).to_bytes(2, "big")
        + block
        + payload
    )


def transform_ids(block: THeaderBlock) -> list[int]:
    """The transform ids of ``block``, in the order the sender applied them."""
    count, pos = read_varint(block.transforms, 0, len(block.transforms), 5)
    ids = []
    for _ in range(count):
        transform_id, pos = read_varint(block.transforms, pos, len(block.transforms), 5)
        ids.append(transform_id)
    return ids


def untransform(payload: bytes, block: THeaderBlock, limit: int, *, whole: bool = True) -> bytes:
    """The payload with the block's transforms undone.

    With ``whole`` it must inflate completely within ``limit`` bytes (else
    ``FrameTooLargeError``); without, only the first ``limit`` bytes are produced (enough to
    read a message header, and never a decompression bomb).
    """
    for transform_id in reversed(transform_ids(block)):
        if transform_id != TRANSFORM_ZLIB:
            raise UnsupportedError(
                f"THeader transform {transform_id} (only zlib, 1, is supported)",
                offset=PREFIX_SIZE,
            )
        inflater = zlib.decompressobj()
        try:
            plain = inflater.decompress(payload, limit)
        except zlib.error as exc:
            raise FramingError(f"bad zlib payload: {exc}", offset=block.payload_offset) from None
        if whole and inflater.unconsumed_tail:
            raise FrameTooLargeError(limit + 1, limit, offset=block.payload_offset)
        if whole and not inflater.eof:
            raise FramingError("truncated zlib payload", offset=block.payload_offset)
        payload = plain
    return payload


def transform(payload: bytes, block: THeaderBlock) -> bytes:
    """``payload`` with the block's transforms applied again (zlib only)."""
    for transform_id in transform_ids(block):
        if transform_id != TRANSFORM_ZLIB:
            raise UnsupportedError(f"THeader transform {transform_id} is not supported")
        payload = zlib.compress(payload)
    return payload
