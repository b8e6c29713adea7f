"""The codec contract: what every protocol implements, and nothing an engine must guess.

A codec is sans-IO (the h11 model): bytes in, :class:`Metadata` out, bytes back. It never
touches a socket, an event loop or a thread. One instance serves one connection in one
direction and may keep parse state between calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self, TypeAlias

from .enums import ErrorType, ResponseStatus
from .errors import ConfigError, FramingError, UnsupportedError
from .keywords import from_keywords
from .metadata import Metadata, Mutation

#: Default ceiling on one frame's size: 8 MiB, Dubbo's default payload limit.
DEFAULT_MAX_FRAME_SIZE = 8 * 1024 * 1024

#: What :meth:`Codec.encode` returns: bytes, or a list of buffers for ``writelines``.
Encoded: TypeAlias = bytes | list[bytes | memoryview]

#: What :meth:`Codec.peek_reply` returns: the reply's request id, its frame size in bytes and
#: its response status.
ReplyHead: TypeAlias = tuple[int, int, ResponseStatus]


class NeedData:
    """Returned by :meth:`Codec.decode` when the buffer holds no complete message yet.

    ``needed`` is the total number of bytes the first frame needs when the codec already knows
    it (from a length field), else 0. A caller may wait until the buffer holds that many bytes
    before calling :meth:`Codec.decode` again.
    """

    __slots__ = ("needed",)

    def __init__(self, needed: int = 0) -> None:
        self.needed = needed

    def __repr__(self) -> str:
        return f"NeedData(needed={self.needed})" if self.needed else "NEED_DATA"


#: The "need more data" answer when the frame size is not known yet.
NEED_DATA = NeedData()


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a codec supports, declared so engines and the conformance kit know what to expect."""

    #: Recognises heartbeats and builds replies (:meth:`Codec.heartbeat_reply`).
    heartbeat: bool = False
    #: Marks one-way requests as :attr:`MessageType.Oneway` (no response follows).
    oneway: bool = False
    #: Carries streaming frames (Stream_Init, Stream_Data, Stream_Close_*).
    streaming: bool = False
    #: Writes request mutations into the wire format.
    mutation: bool = False
    #: Writes mutations into responses too.
    response_mutation: bool = False
    #: Can replace the request id on encode, so an engine may multiplex many downstream
    #: connections over one upstream connection without id collisions.
    rewrite_request_id: bool = False
    #: Builds protocol-level error replies (:meth:`Codec.on_error`).
    error_reply: bool = True
    #: Tells a reply's request id, size and status without decoding it
    #: (:meth:`Codec.peek_reply`) and, with ``rewrite_request_id``, rewrites its id in the
    #: frame (:meth:`Codec.relabel`): an engine forwards replies that need no mutation
    #: without building their :class:`Metadata`.
    peek_reply: bool = False
    #: Has a message announcing that a connection is closing (Dubbo's read-only event,
    #: HTTP/2's GOAWAY): :meth:`Codec.drain_notice` builds it and
    #: :meth:`Codec.is_drain_notice` recognises it. An engine writes it to its clients when
    #: it drains and stops sending new requests on an upstream connection that sent it.
    #: Requires ``heartbeat``: a notice decodes as a ``Heartbeat`` that needs no reply.
    drain_notice: bool = False
    #: Builds heartbeat requests (:meth:`Codec.heartbeat_request`), so an engine can ping its
    #: peers: keep an idle connection open past the peer's idle check, and find a connection
    #: whose peer is gone. Requires ``heartbeat``: the request decodes as a ``Heartbeat`` that
    #: :meth:`Codec.heartbeat_reply` answers.
    heartbeat_request: bool = False

    def names(self) -> list[str]:
        """The names of the declared capabilities."""
        return [f.name for f in fields(self) if getattr(self, f.name)]


@dataclass(frozen=True, slots=True)
class LocalError:
    """Why the engine answers a request itself (Aeraki's ``Error``)."""

    type: ErrorType
    message: str = ""


class Codec(ABC):
    """Base class of every codec. Subclass it and implement the three abstract methods.

    An instance decodes one direction of one connection and may keep parse state for it;
    ``encode``, ``on_error`` and ``heartbeat_reply`` depend only on their arguments, so an
    engine may call them on whichever instance serves the connection the bytes go out on.

    Rules (the conformance kit checks each of them):

    * :meth:`decode` consumes exactly one complete message from the front of ``buffer`` and
      returns its :class:`Metadata`, or consumes nothing and returns a :class:`NeedData`.
      It never returns a message built from a truncated frame.
    * Malformed input raises a :class:`~metaprotocol_sdk.errors.CodecError` subclass naming the
      problem and the byte offset; a length above ``max_frame_size`` raises
      :class:`~metaprotocol_sdk.errors.FrameTooLargeError` before the body is buffered.
    * ``max_frame_size`` bounds the whole frame, as :attr:`Metadata.size` measures it.
    * :meth:`encode` with an empty mutation and no new request id returns the original bytes.
      A mutation the message cannot carry raises
      :class:`~metaprotocol_sdk.errors.MutationError` (never a silent drop). ``encode`` works
      on any instance of the codec, not only the one that decoded the message.
    * :meth:`on_error` returns a non-empty reply carrying the request's id.
    * A ``CodecError`` is raised before anything is consumed, so ``frame_size`` (when set)
      counts from the front of the buffer as it was passed in. Without ``frame_size`` the
      stream cannot be re-synchronised; call :meth:`reset` before reusing the codec.
    """

    #: Protocol name, as in Aeraki's ``ApplicationProtocol.protocol`` (``dubbo``, ``thrift``).
    protocol: ClassVar[str] = ""
    #: Declared capabilities.
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: Largest request id the wire format can carry; engines that rewrite ids
    #: (``rewrite_request_id``) allocate ids in ``1..max_request_id``. The default fits a
    #: signed 32-bit field; codecs with wider id fields may raise it.
    max_request_id: ClassVar[int] = 0x7FFFFFFF
    #: The options ``__init__`` takes, for a codec compiled with mypyc, whose class has no
    #: signature to read them from (:meth:`from_options` names the accepted ones in its errors
    #: from it); empty: the signature is read.
    option_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        # An option from YAML or `-o KEY=VALUE` may be any type: name the field, not a TypeError.
        if isinstance(max_frame_size, bool) or not isinstance(max_frame_size, int):
            raise ConfigError(
                f"must be a positive integer (bytes), got {max_frame_size!r}",
                field="max_frame_size",
            )
        if max_frame_size <= 0:
            raise ConfigError(f"must be positive, got {max_frame_size}", field="max_frame_size")
        self.max_frame_size = max_frame_size

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None) -> Self:
        """Build a codec from configuration key-values, with a clear error for bad keys."""
        name = cls.protocol or cls.__name__
        return from_keywords(cls, options, "codec", name, "option", cls.option_names)

    @property
    def active_capabilities(self) -> Capabilities:
        """What this instance, as configured, can do: :attr:`capabilities` unless its options
        switch something off (a forced transport with no room for headers cannot carry
        mutations, say). Engines check a configuration's routes against this."""
        return self.capabilities

    @abstractmethod
    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        """Consume one complete message from the front of ``buffer``, or nothing."""

    def decode_frame(self, frame: bytes) -> Metadata:
        """Decode ``frame``: one whole frame, of exactly the size :attr:`NeedData.needed`
        announced for it.

        Engines call it instead of :meth:`decode` for a large frame they assembled from many
        reads, to spare a copy of it. The default copies ``frame`` into a buffer and calls
        :meth:`decode`; a codec whose ``decode`` copies the frame out of the buffer may override
        it to parse ``frame`` itself (``Metadata.frame`` may then be ``frame``). It must agree
        with ``decode``: the same :class:`Metadata`, the same errors (``frame_size``, when set,
        is ``len(frame)``). The conformance kit checks that.
        """
        buffer = bytearray(frame)
        message = self.decode(buffer)
        if not isinstance(message, Metadata) or buffer:
            left = f"left {len(buffer)} bytes" if isinstance(message, Metadata) else "needed more"
            raise FramingError(
                f"decode of a whole frame of {len(frame)} bytes (the size NeedData.needed "
                f"announced) {left}"
            )
        return message

    @abstractmethod
    def encode(
        self,
        message: Metadata,
        mutation: Mutation | None = None,
        *,
        request_id: int | None = None,
    ) -> Encoded:
        """Bytes for ``message`` with ``mutation`` written in and, if given, a new request id.

        With no mutation and no new id this returns ``message.frame`` itself.
        """

    @abstractmethod
    def on_error(self, metadata: Metadata, error: LocalError) -> bytes:
        """The protocol's own error reply to the request described by ``metadata``."""

    def peek_reply(self, buffer: bytearray) -> ReplyHead | None:
        """``(request_id, size, response_status)`` of the reply at the front of ``buffer``.

        Only for codecs declaring the ``peek_reply`` capability; consumes nothing. When the
        buffer starts with a complete Response or Error message that :meth:`decode` would
        accept, this returns what ``decode`` would report for it: its request id, the frame's
        size (``Metadata.size``) and its response status. In every other case (anything but a
        reply, an incomplete frame, a frame ``decode`` might refuse, or simply not sure) it
        returns ``None`` and the engine calls :meth:`decode`. The conformance kit checks that
        the two agree.
        """
        return None

    def relabel(self, frame: bytes, request_id: int) -> Encoded:
        """A reply ``frame`` that :meth:`peek_reply` sized, with ``request_id`` as its id.

        Needed with both ``peek_reply`` and ``rewrite_request_id``. Like :meth:`encode` it may
        return buffers (a large frame's body as a view, say); joined, they must equal what
        ``encode(decode(frame), request_id=request_id)`` gives.
        """
        raise UnsupportedError(f"codec {self.protocol or type(self).__name__} cannot relabel")

    def heartbeat_reply(self, metadata: Metadata) -> bytes | None:
        """The reply to a heartbeat, or ``None`` if this heartbeat needs none (it is a reply)."""
        raise UnsupportedError(f"codec {self.protocol or type(self).__name__} has no heartbeats")

    def heartbeat_request(self, request_id: int) -> bytes:
        """A heartbeat request (a ping) with ``request_id``, which the peer answers.

        Only for codecs declaring the ``heartbeat_request`` capability. It must decode (with
        this codec) as one ``Heartbeat`` carrying ``request_id`` whose
        :meth:`heartbeat_reply` is not ``None``, and that reply must decode as a
        ``Heartbeat`` whose own ``heartbeat_reply`` is ``None``. Like :meth:`on_error` it
        depends on no parse state.
        """
        raise UnsupportedError(
            f"codec {self.protocol or type(self).__name__} builds no heartbeat requests"
        )

    def drain_notice(self) -> bytes:
        """The message telling the peer that this connection is closing: send no new requests
        on it, the ones sent are still answered.

        Only for codecs declaring the ``drain_notice`` capability. It must decode (with this
        codec) as one ``Heartbeat`` for which :meth:`heartbeat_reply` is ``None`` and
        :meth:`is_drain_notice` is true. Like :meth:`on_error` it depends on no parse state.
        """
        raise UnsupportedError(f"codec {self.protocol or type(self).__name__} has no drain notice")

    def is_drain_notice(self, metadata: Metadata) -> bool:
        """Whether a decoded ``Heartbeat`` is the peer's drain notice (see :meth:`drain_notice`);
        false for every other message. Engines ask only about heartbeats."""
        return False

    def reset(self) -> None:  # noqa: B027 - optional hook with a no-op default
        """Forget parse state (called by engines before reusing a codec after an error)."""


def take_frame(buffer: bytearray, size: int) -> bytes:
    """Remove the first ``size`` bytes of ``buffer`` and return them as ``bytes`` (one copy)."""
    if size == len(buffer):
        frame = bytes(buffer)
        buffer.clear()
        return frame
    with memoryview(buffer) as view:
        frame = view[:size].tobytes()
    del buffer[:size]
    return frame


def join_encoded(encoded: Encoded) -> bytes:
    """Flatten what :meth:`Codec.encode` returned into one ``bytes`` object."""
    if isinstance(encoded, bytes):
        return encoded
    return b"".join(encoded)


def buffers_of(encoded: Encoded) -> Sequence[bytes | memoryview]:
    """What :meth:`Codec.encode` returned, as a sequence of buffers for ``writelines``."""
    return (encoded,) if isinstance(encoded, bytes) else encoded
