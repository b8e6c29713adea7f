"""Building :class:`Metadata` on the hot path.

The public constructors (keyword arguments, per-key validation in ``Attributes``) cost about
1.5 us per message, most of a framed decode. When the SDK classes have exactly the slots this
module was written against, it fills the slots directly (same values the constructors would
set); otherwise it falls back to the public constructors, so an SDK change can slow this down
but never break it. ``tests/test_thrift_codec.py`` checks both paths give equal objects.
"""

from __future__ import annotations

from typing import Any

from metaprotocol_sdk.enums import MessageType, ResponseStatus, StreamType
from metaprotocol_sdk.metadata import Attributes, Metadata

_METADATA_SLOTS = frozenset(
    {
        "attributes",
        "body_size",
        "codec_state",
        "frame",
        "header_size",
        "message_type",
        "operation_name",
        "request_id",
        "response_status",
        "stream_id",
        "stream_type",
        "values",
    }
)

#: True when the direct slot filling matches the SDK classes in use.
FAST = frozenset(getattr(Metadata, "__slots__", ())) == _METADATA_SLOTS and tuple(
    getattr(Attributes, "__slots__", ())
) == ("_items",)

_new_metadata = Metadata.__new__
_new_attributes = Attributes.__new__
_UNARY = StreamType.Unary


def attributes_of(items: dict[str, tuple[str, str]]) -> Attributes:
    """``Attributes`` from ``{key.lower(): (key, value)}`` (the caller folds the keys)."""
    if FAST:
        attributes = _new_attributes(Attributes)
        attributes._items = items
        return attributes
    return Attributes(dict(items.values()))


def metadata(
    message_type: MessageType,
    frame: bytes,
    request_id: int,
    operation_name: str,
    header_size: int,
    body_size: int,
    response_status: ResponseStatus,
    attributes: Attributes,
    codec_state: Any,
) -> Metadata:
    """A ``Metadata`` equal to what its constructor gives for these arguments."""
    if not FAST:
        return Metadata(
            message_type,
            frame=frame,
            request_id=request_id,
            operation_name=operation_name,
            header_size=header_size,
            body_size=body_size,
            response_status=response_status,
            attributes=attributes,
            codec_state=codec_state,
        )
    message = _new_metadata(Metadata)
    message.message_type = message_type
    message.frame = frame
    message.request_id = request_id
    message.operation_name = operation_name
    message.header_size = header_size
    message.body_size = body_size
    message.response_status = response_status
    message.stream_type = _UNARY
    message.stream_id = 0
    message.attributes = attributes
    message.values = {}
    message.codec_state = codec_state
    return message
