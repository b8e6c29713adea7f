"""Metadata: what a codec learned from one message, plus the message's original bytes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any

from .enums import MessageType, ResponseStatus, StreamType

#: Key-values to add to or replace in a message (Aeraki's ``Mutation``).
Mutation = Mapping[str, str]

EMPTY_MUTATION: Mutation = {}


class Attributes(MutableMapping[str, str]):
    """Routable string attributes with case-insensitive keys.

    Keys keep the spelling they were set with (for display), but lookups ignore case, as
    Aeraki's routing does. :meth:`get_folded` skips the case folding for callers that folded
    the key once in advance. ``folded_items`` is the table behind it all,
    ``{key.lower(): (key, value)}``: hot paths may read it directly (the engine's route
    matcher does); writes go through the mapping methods, which check the values.
    """

    __slots__ = ("folded_items",)

    def __init__(self, items: Mapping[str, str] | None = None) -> None:
        self.folded_items: dict[str, tuple[str, str]] = {}
        if items:
            for key, value in items.items():
                self[key] = value

    @classmethod
    def from_strings(cls, items: Mapping[str, str]) -> Attributes:
        """Attributes from a mapping whose keys and values are all ``str`` (not re-checked).

        The fast path for codecs: one comprehension instead of a ``__setitem__`` call per item.
        """
        attributes = _new_attributes(cls)
        attributes.folded_items = {key.lower(): (key, value) for key, value in items.items()}
        return attributes

    @classmethod
    def from_folded(cls, table: dict[str, tuple[str, str]]) -> Attributes:
        """Attributes that take over a ``{key.lower(): (key, value)}`` table built by a codec."""
        attributes = _new_attributes(cls)
        attributes.folded_items = table
        return attributes

    def __getitem__(self, key: str) -> str:
        return self.folded_items[key.lower()][1]

    def __setitem__(self, key: str, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"attribute {key!r} must be a str, got {type(value).__name__}")
        self.folded_items[key.lower()] = (key, value)

    def __delitem__(self, key: str) -> None:
        del self.folded_items[key.lower()]

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self.folded_items.values())

    def __len__(self) -> int:
        return len(self.folded_items)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self.folded_items

    def get_folded(self, folded_key: str) -> str | None:
        """Return the value for an already lower-cased key, or ``None``."""
        item = self.folded_items.get(folded_key)
        return None if item is None else item[1]

    def to_dict(self) -> dict[str, str]:
        """A plain ``dict`` with the original key spelling."""
        return dict(self.folded_items.values())

    def __repr__(self) -> str:
        return f"Attributes({self.to_dict()!r})"


def key_collision(keys: Iterable[str], what: str = "key") -> str | None:
    """Why ``keys`` (in wire order) cannot become :class:`Attributes` unambiguously, or ``None``.

    Attributes ignore case, so a later key equal to an earlier one, exactly or ignoring case,
    would silently replace it, while a server with a case-sensitive map reads both: a codec
    refuses such a message with this reason (see the contract's "Colliding keys"). Codecs
    call it only once a cheap count (pairs read against the table's length) found a clash.
    """
    seen: dict[str, str] = {}
    for key in keys:
        folded = key.lower()
        first = seen.get(folded)
        if first is None:
            seen[folded] = key
        elif first == key:
            return f"{what} {key!r} appears twice"
        else:
            return f"{what}s {first!r} and {key!r} differ only in case"
    return None


#: Makes an instance without running ``__init__`` (``object.__new__`` itself is refused on the
#: class when compiled; compiled, this runs the empty ``__init__``, which costs next to nothing).
_new_attributes = Attributes.__new__


class Metadata:
    """One decoded message: typed fields, routable attributes and the original frame.

    ``frame`` holds exactly the bytes of the message as they came off the wire; ``view`` gives
    zero-copy slices of it. ``values`` holds non-routable values (anything a filter may want
    that is not a string to route on). ``codec_state`` is private to the codec that produced
    the metadata (offsets it needs to re-encode, the wire variant, ...); nobody else reads it.
    """

    __slots__ = (
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
    )

    def __init__(
        self,
        message_type: MessageType,
        frame: bytes = b"",
        request_id: int = 0,
        operation_name: str = "",
        header_size: int = 0,
        body_size: int = 0,
        response_status: ResponseStatus = ResponseStatus.Unknown,
        attributes: Attributes | None = None,
        codec_state: Any = None,
        stream_type: StreamType = StreamType.Unary,
        stream_id: int = 0,
        values: dict[str, Any] | None = None,
    ) -> None:
        # Positional calls in this order are the hot-path form for codecs (about half the cost
        # of keyword calls); keywords read better everywhere else.
        self.message_type = message_type
        self.frame = frame
        self.request_id = request_id
        self.operation_name = operation_name
        self.header_size = header_size
        self.body_size = body_size
        self.response_status = response_status
        self.attributes = Attributes() if attributes is None else attributes
        self.codec_state = codec_state
        self.stream_type = stream_type
        self.stream_id = stream_id
        self.values: dict[str, Any] = {} if values is None else values

    @property
    def size(self) -> int:
        """Length of the whole frame in bytes."""
        return len(self.frame)

    def view(self, start: int = 0, end: int | None = None) -> memoryview:
        """A zero-copy slice of the original frame."""
        return memoryview(self.frame)[start:end]

    @property
    def header(self) -> memoryview:
        """The frame's header bytes (zero-copy)."""
        return self.view(0, self.header_size)

    @property
    def body(self) -> memoryview:
        """The frame's body bytes (zero-copy)."""
        return self.view(self.header_size, self.header_size + self.body_size)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (what ``metaprotocol decode --json`` prints)."""
        return {
            "message_type": self.message_type.name,
            "request_id": self.request_id,
            "operation_name": self.operation_name,
            "stream_type": self.stream_type.name,
            "stream_id": self.stream_id,
            "response_status": self.response_status.name,
            "header_size": self.header_size,
            "body_size": self.body_size,
            "size": self.size,
            "attributes": self.attributes.to_dict(),
        }

    def __repr__(self) -> str:
        return (
            f"Metadata({self.message_type.name}, request_id={self.request_id}, "
            f"operation={self.operation_name!r}, size={self.size}, "
            f"attributes={self.attributes.to_dict()!r})"
        )
