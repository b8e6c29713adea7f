"""Route matchers compiled once: keys folded in advance, regexes precompiled."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from metaprotocol_sdk.metadata import Attributes

from .config.models import AttributeMatch

#: A compiled condition: ``True`` when the message's attributes satisfy it.
Matcher = Callable[[Attributes], bool]


_ABSENT = ("", None)  # what a missing key reads as: its value is None


def _one(cond: AttributeMatch) -> Matcher:
    # Each test reads the attributes' folded table directly (one dict lookup, no method
    # call): ``folded_items`` maps a lower-cased key to (key as set, value).
    key = cond.attribute.lower()
    value = cond.value
    if cond.kind == "exact":
        return lambda attrs: attrs.folded_items.get(key, _ABSENT)[1] == value
    if cond.kind == "prefix":

        def prefix(attrs: Attributes) -> bool:
            got = attrs.folded_items.get(key, _ABSENT)[1]
            return got is not None and got.startswith(value)

        return prefix
    if cond.kind == "regex":
        # Full match, as Istio's StringMatch.regex does.
        full = re.compile(value).fullmatch

        def regex(attrs: Attributes) -> bool:
            got = attrs.folded_items.get(key, _ABSENT)[1]
            return got is not None and full(got) is not None

        return regex
    return lambda attrs: key in attrs.folded_items


def _always(attrs: Attributes) -> bool:
    return True


def compile_match(conditions: Sequence[AttributeMatch]) -> Matcher:
    """One function testing every condition (logical AND); no conditions match everything."""
    compiled = tuple(_one(c) for c in conditions)
    if not compiled:
        return _always
    if len(compiled) == 1:
        return compiled[0]

    def all_of(attrs: Attributes) -> bool:
        for test in compiled:  # noqa: SIM110 - a plain loop beats all() with a generator
            if not test(attrs):
                return False
        return True

    return all_of
