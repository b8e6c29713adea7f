"""Building :class:`~metaprotocol_sdk.Attributes` from already-validated string dicts, fast.

``Attributes(mapping)`` validates and case-folds every item through ``__setitem__`` (a Python
call per item), which is a fifth of a typical request decode. The decoder only ever hands
it ``str`` keys and values, so this fills the same internal table in one comprehension.
The SDK has no public bulk constructor yet (asked for in the codec's report); when its
internals are not the expected ones, the public constructor is used instead.
"""

from __future__ import annotations

from metaprotocol_sdk import Attributes

_BULK = "_items" in getattr(Attributes, "__slots__", ()) and not hasattr(Attributes, "from_dict")


def make_attributes(items: dict[str, str], extra: dict[str, str] | None = None) -> Attributes:
    """Attributes holding ``items`` then ``extra`` (every key and value must be a ``str``)."""
    if not _BULK:
        attributes = Attributes(items)
        if extra:
            attributes.update(extra)
        return attributes
    table = {key.lower(): (key, value) for key, value in items.items()}
    if extra:
        for key, value in extra.items():
            table[key.lower()] = (key, value)
    attributes = Attributes.__new__(Attributes)
    attributes._items = table
    return attributes


def attributes_from_folded(folded: dict[str, tuple[str, str]]) -> Attributes:
    """Attributes from a ``{lower-cased key: (key, value)}`` table, which they take over."""
    if not _BULK:
        return Attributes(dict(folded.values()))
    attributes = Attributes.__new__(Attributes)
    attributes._items = folded
    return attributes
