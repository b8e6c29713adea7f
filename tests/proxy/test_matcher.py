"""Compiled route conditions: each kind, case-insensitive keys, missing and empty values."""

from __future__ import annotations

import pytest

from metaprotocol_sdk import Attributes
from metaprotocol_sdk.proxy.config.models import AttributeMatch
from metaprotocol_sdk.proxy.matcher import compile_match

ATTRS = Attributes({"Method": "sayHello", "x-tag": "", "version": "v2.1"})


@pytest.mark.parametrize(
    ("kind", "attribute", "value", "expected"),
    [
        ("exact", "method", "sayHello", True),
        ("exact", "METHOD", "sayHello", True),  # keys ignore case
        ("exact", "method", "sayhello", False),  # values do not
        ("exact", "missing", "", False),  # absent is not the empty string
        ("exact", "x-tag", "", True),
        ("prefix", "version", "v2", True),
        ("prefix", "version", "v3", False),
        ("prefix", "missing", "", False),
        ("prefix", "x-tag", "", True),
        ("regex", "version", r"v\d\.\d", True),
        ("regex", "version", r"v\d", False),  # a full match, as Istio's regex
        ("regex", "missing", ".*", False),
        ("present", "x-tag", "", True),  # present even when empty
        ("present", "Version", "", True),
        ("present", "missing", "", False),
    ],
)
def test_each_condition_kind(kind: str, attribute: str, value: str, expected: bool) -> None:
    match = compile_match([AttributeMatch(attribute, kind, value)])  # type: ignore[arg-type]
    assert match(ATTRS) is expected


def test_conditions_combine_with_and() -> None:
    both = compile_match(
        [AttributeMatch("method", "exact", "sayHello"), AttributeMatch("version", "prefix", "v2")]
    )
    assert both(ATTRS)
    assert not both(Attributes({"method": "sayHello", "version": "v1"}))
    assert compile_match([])(Attributes())  # no conditions match everything
