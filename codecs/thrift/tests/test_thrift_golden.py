"""Every golden vector (frames captured from real peers) decodes to its expected metadata."""

from __future__ import annotations

from importlib import resources
from typing import Any

import pytest
import yaml
from metaprotocol_thrift import ThriftCodec

from metaprotocol_sdk import CodecError, Metadata, errors
from metaprotocol_sdk.testing.golden import parse_golden

GOLDEN = resources.files("metaprotocol_thrift") / "conformance" / "golden.yaml"
DOCUMENT: dict[str, Any] = yaml.safe_load(GOLDEN.read_text())
VECTORS = parse_golden(DOCUMENT, source="golden.yaml").vectors


def test_golden_file_covers_every_variant() -> None:
    names = " ".join(v.name for v in VECTORS)
    for needed in (
        "binary-framed call",
        "binary-buffered call",
        "nonstrict-framed call",
        "nonstrict-buffered call",
        "compact-framed call",
        "compact-buffered call",
        "reply",
        "declared exception",
        "exception for unknown method",
        "oneway",
        "multiplexed",
        "THeader binary call add with info headers",
        "THeader compact call add with info headers",
    ):
        assert needed in names, needed
    assert DOCUMENT["codec"] == "thrift"


@pytest.mark.parametrize("sample", VECTORS, ids=[v.name for v in VECTORS])
def test_golden_vector_decodes(sample: Any) -> None:
    codec = ThriftCodec.from_options(sample.options)
    buffer = bytearray(sample.frame)
    expect = dict(sample.expect)
    if sample.is_bad_input:
        with pytest.raises(getattr(errors, expect["error"])):
            codec.decode(buffer)
        return
    message = codec.decode(buffer)
    assert isinstance(message, Metadata)
    assert not buffer and message.frame == sample.frame
    attributes = expect.pop("attributes", {})
    assert message.attributes.to_dict() == attributes
    summary = message.to_dict()
    for key, value in expect.items():
        assert summary[key] == value, key
    # Split anywhere, the vector is NeedData until complete.
    for cut in range(len(sample.frame)):
        result = ThriftCodec.from_options(sample.options).decode(bytearray(sample.frame[:cut]))
        assert not isinstance(result, Metadata)
    assert issubclass(errors.FramingError, CodecError)
