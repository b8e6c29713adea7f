"""Per-message wire facts the codec keeps in :attr:`Metadata.codec_state` to re-encode."""

from __future__ import annotations

from typing import NamedTuple

from .theader import THeaderBlock


class WireState(NamedTuple):
    """Where things are in one decoded frame, and which variant it was."""

    #: ``framed``, ``unframed`` or ``header``.
    transport: str
    #: ``binary`` or ``compact``.
    protocol: str
    #: Binary only: True when the message had a version word.
    strict: bool
    #: Thrift message type code (1 call, 2 reply, 3 exception, 4 oneway).
    message_type: int
    #: Method name exactly as on the wire (``service:method`` when multiplexed).
    wire_name: str
    #: Offset of the payload's seqid in the frame, and its encoded size (4, or a varint's).
    seqid_offset: int
    seqid_size: int
    #: THeader transport: the parsed header block; ``None`` otherwise.
    header: THeaderBlock | None = None
