"""No Dubbo cache outlives its connection or holds more than its stated bytes (issue 13: a
module-level class-definition cache took an engine from 38 MB to 404 MB; a descriptor cache
kept descriptors of any length, even from rejected frames)."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable, Iterator

import pytest
from metaprotocol_dubbo import DubboCodec
from metaprotocol_dubbo.frames import build_request
from metaprotocol_dubbo.hessian2 import JavaObject

from metaprotocol_sdk import CodecError, Metadata


@pytest.fixture
def retained() -> Iterator[Callable[[], int]]:
    """Bytes allocated since the fixture started and still alive (after a collection)."""
    gc.collect()
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]

    def now() -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - start

    yield now
    tracemalloc.stop()


def _pojo_request(n: int, fields: int) -> bytes:
    """A request whose argument is an object of a class seen nowhere else, with a class
    definition of about ``fields`` x 200 bytes."""
    names = [f"field_{i}_" + "x" * 190 for i in range(fields)]
    value = JavaObject(f"com.example.Dto{n}", dict.fromkeys(names, 1))
    return build_request("com.example.S", "m", [value], request_id=n)


def test_class_definitions_are_not_kept_after_the_codec(retained: Callable[[], int]) -> None:
    frames = [_pojo_request(n, 500) for n in range(20)]  # 20 x 100 KB of class definitions
    baseline = retained()
    codec = DubboCodec()
    for frame in frames:
        assert isinstance(codec.decode(bytearray(frame)), Metadata)
    del codec
    assert retained() - baseline < 256 * 1024


def test_rejected_descriptors_are_not_kept(retained: Callable[[], int]) -> None:
    # Long descriptors whose arguments are missing: every frame is refused.
    frames = [
        build_request("com.example.S", "m", [], descriptor="I" * 50_000 + f"L{n};", request_id=n)
        for n in range(20)
    ]
    baseline = retained()
    codec = DubboCodec()
    for frame in frames:
        with pytest.raises(CodecError):
            codec.decode(bytearray(frame))
    del codec
    assert retained() - baseline < 256 * 1024


def test_a_codec_remembers_at_most_its_stated_bytes(retained: Callable[[], int]) -> None:
    """Many distinct heads and attachment maps on one connection: what the codec keeps stays
    within its bound (68 KiB of wire bytes, plus their parsed entries), however large they
    are."""
    codec = DubboCodec()
    frames = [
        build_request(
            "com.example.Service" + "s" * (n % 9) * 100,
            "call",
            ["x"],
            # 24 KB of compact strings (600 chars: a length byte below 0x80, the inline shape)
            attachments={f"k{i}": f"{n:03d}" + "v" * 597 for i in range(40)},
            request_id=n,
        )
        for n in range(200)
    ]
    baseline = retained()
    for frame in frames:
        assert isinstance(codec.decode(bytearray(frame)), Metadata)
    assert retained() - baseline < 512 * 1024
