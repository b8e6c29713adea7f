"""Large frames, assembled from their reads at once.

Appending each read of a large frame to the connection's ``bytearray`` copies the bytes in,
and each time the array outgrows its block the allocator may copy everything again; the codec
then copies the frame out. Once a codec has announced a frame of more than
:data:`LARGE_FRAME` bytes (``NeedData.needed``), a connection keeps its further reads as they
came (:class:`Reads`) and, when they complete the frame, joins them once: into the frame's
``bytes`` for a codec that overrides
:meth:`Codec.decode_frame <metaprotocol_sdk.codec.Codec.decode_frame>` (it parses them in
place), else into the connection's new buffer, which ``decode`` reads as usual.
"""

from __future__ import annotations

from typing import Final

from metaprotocol_sdk.codec import Codec

#: Frames announced above this many bytes are assembled from their reads.
LARGE_FRAME: Final = 64 << 10

#: Frames of one peer decoded in one turn of the event loop, at most: the rest of a longer
#: read waits for the next turn, with reading paused. A read holds up to 256 KiB, and uvloop
#: reads a connection up to 32 times in a row: a client (or an upstream) that pipelined tiny
#: frames had 86 000 of them decoded and answered in one turn, over a second while every
#: other connection waited. At a few microseconds to a few tens per frame, a turn takes a
#: few milliseconds.
DECODE_TURN: Final = 128

#: Reads smaller than this are gathered into one block of up to :data:`LARGE_FRAME` bytes, so
#: that a peer sending a large frame a byte at a time costs a list entry per block, not one
#: (and a ``bytes`` object of 33 bytes' overhead) per byte.
SMALL_READ: Final = 16 << 10


def parses_whole_frames(codec: Codec) -> bool:
    """Whether ``codec`` overrides ``decode_frame`` (else the engine gives ``decode`` a buffer
    holding the assembled frame, as it always did)."""
    return type(codec).decode_frame is not Codec.decode_frame


class Reads:
    """The reads of the large frame at the front of a connection's buffer."""

    __slots__ = ("blocks", "size")

    def __init__(self) -> None:
        self.blocks: list[bytes | bytearray] = []
        #: Bytes kept (counted against the buffer limits like the buffer itself).
        self.size = 0

    def add(self, data: bytes) -> int:
        """Keep ``data``; the bytes kept so far."""
        blocks = self.blocks
        if len(data) >= SMALL_READ:
            blocks.append(data)
        else:
            last = blocks[-1] if blocks else None
            if type(last) is bytearray and len(last) < LARGE_FRAME:
                last += data
            else:
                blocks.append(bytearray(data))
        self.size += len(data)
        return self.size

    def clear(self) -> None:
        self.blocks = []
        self.size = 0

    def join(self, head: bytearray, size: int, whole: bool) -> tuple[bytes | None, bytearray]:
        """Once ``head`` and the reads hold the ``size``-byte frame: with ``whole``, the frame
        as ``bytes`` (one copy) and a new buffer with what follows it (part of the last read);
        else ``None`` and a new buffer holding the frame and what follows it (one copy). The
        reads are cleared."""
        blocks = self.blocks
        self.clear()
        if not whole:
            return None, bytearray().join([head, *blocks])
        last = blocks[-1]
        cut = size - (len(head) + sum(map(len, blocks)) - len(last))
        if cut == len(last):
            return b"".join([head, *blocks]), bytearray()
        with memoryview(last) as view:
            frame = b"".join([head, *blocks[:-1], view[:cut]])
            return frame, bytearray(view[cut:])
