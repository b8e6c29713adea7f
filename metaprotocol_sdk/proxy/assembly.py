"""Large frames, assembled from their reads at once.

Appending each read of a large frame to the connection's ``bytearray`` copies the bytes in,
and each time the array outgrows its block the allocator may copy everything again; the codec
then copies the frame out. Once a codec has announced a frame of more than
:data:`LARGE_FRAME` bytes (``NeedData.needed``), a connection keeps its further reads as they
came and, when they complete the frame, joins them once into the frame's ``bytes``, which it
hands to :meth:`Codec.decode_frame <metaprotocol_sdk.codec.Codec.decode_frame>`.
"""

from __future__ import annotations

from typing import Final

#: Frames announced above this many bytes are assembled from their reads.
LARGE_FRAME: Final = 64 << 10

#: Reads smaller than this are gathered into one block of up to :data:`LARGE_FRAME` bytes, so
#: that a peer sending a large frame a byte at a time costs a list entry per block, not one
#: (and a ``bytes`` object of 33 bytes' overhead) per byte.
SMALL_READ: Final = 16 << 10


def add_read(reads: list[bytes | bytearray], data: bytes) -> None:
    """Keep ``data``, a read of the frame being assembled, at the end of ``reads``."""
    if len(data) >= SMALL_READ:
        reads.append(data)
        return
    last = reads[-1] if reads else None
    if type(last) is bytearray and len(last) < LARGE_FRAME:
        last += data
    else:
        reads.append(bytearray(data))


def join_frame(head: bytearray, reads: list[bytes | bytearray], size: int) -> tuple[bytes, bytes]:
    """The first ``size`` bytes of ``head`` followed by ``reads`` as one ``bytes`` (one copy),
    and what follows them (part of the last read only: at most one read's worth)."""
    last = reads[-1]
    over = len(head) + sum(map(len, reads)) - size
    if not over:
        return b"".join([head, *reads]), b""
    cut = len(last) - over
    with memoryview(last) as view:
        frame = b"".join([head, *reads[:-1], view[:cut]])
    return frame, bytes(last[cut:])
