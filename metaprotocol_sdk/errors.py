"""Typed errors. Every error says what went wrong and, for wire errors, at which byte offset."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .metadata import Metadata


class MetaProtocolError(Exception):
    """Base class of every error the SDK raises on purpose."""


class CodecError(MetaProtocolError):
    """Bytes that a codec cannot accept.

    ``offset`` is the byte offset, from the start of the frame being decoded, at which the
    problem was found (``None`` when it does not apply). After a ``CodecError`` the stream
    cannot be re-synchronised unless ``frame_size`` is set.

    ``metadata`` is what the codec could read before the problem (at least the request id
    when the header was readable), so an engine can still send the protocol's error reply.
    ``frame_size`` is set when the bad frame's extent is known: codecs raise before consuming
    anything, so dropping that many bytes from the front of the buffer leaves the stream in
    sync and the other messages of the connection can go on.
    """

    def __init__(
        self,
        reason: str,
        *,
        offset: int | None = None,
        metadata: Metadata | None = None,
        frame_size: int | None = None,
    ) -> None:
        self.reason = reason
        self.offset = offset
        self.metadata = metadata
        self.frame_size = frame_size
        where = "" if offset is None else f" at byte {offset}"
        super().__init__(f"{reason}{where}")


class FramingError(CodecError):
    """The bytes do not form a frame of this protocol (bad magic, impossible field value)."""


class FrameTooLargeError(CodecError):
    """A length field announces a frame above the configured maximum.

    Raised from the length field alone, before the body is buffered. ``metadata`` is set when
    the header carrying the request id was readable, so the engine can still send an error
    reply.
    """

    def __init__(
        self,
        size: int,
        limit: int,
        *,
        offset: int | None = None,
        metadata: Metadata | None = None,
    ) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"frame of {size} bytes exceeds the limit of {limit} bytes",
            offset=offset,
            metadata=metadata,
        )


class UnsupportedError(CodecError):
    """A well-formed variant of the protocol that this codec does not implement."""


class MutationError(CodecError):
    """A mutation that cannot be written into this message (for example, no header space)."""


#: Longest reason a :class:`ConfigError` keeps: reasons quote the values they refuse, and a
#: value may be megabytes (a list where a string belongs): its middle is cut.
MAX_REASON_CHARS = 1000


def _shortened(text: str, most: int = MAX_REASON_CHARS) -> str:
    """``text``, with its middle cut when it is longer than ``most`` characters (the end
    often says what was expected)."""
    if len(text) <= most:
        return text
    tail = most // 4
    head = most - tail
    return f"{text[:head]} [... {len(text) - most} characters cut ...] {text[-tail:]}"


class ConfigError(MetaProtocolError):
    """Invalid configuration: names the document, the field and the reason (at most
    :data:`MAX_REASON_CHARS` of it: its middle is cut)."""

    def __init__(self, reason: str, *, source: str | None = None, field: str | None = None):
        reason = _shortened(reason)
        self.reason = reason
        self.source = source
        self.field = field
        parts = [p for p in (source, field) if p]
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {reason}" if prefix else reason)


class RegistryError(MetaProtocolError):
    """A codec name that cannot be resolved, or a codec that cannot be loaded."""


class UnknownCodecError(RegistryError, LookupError):
    """No installed codec has the requested name."""


class CodecLoadError(RegistryError, ImportError):
    """An installed codec failed to import or is not a :class:`~metaprotocol_sdk.Codec`."""
