"""Hostile Hessian streams cost time linear in their size and memory bounded by the limits.

References to skipped containers are decoded once (issue 13: each reference used to copy the
reference table, so a 894 KB Dubbo request took 37 s); every stream has a bound on its lists,
maps and objects (``max_refs``) and on its class definitions (``max_classes``).
"""

from __future__ import annotations

import encodings
import itertools
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from metaprotocol_dubbo import COMPILED, DubboCodec
from metaprotocol_dubbo.frames import build_request
from metaprotocol_dubbo.header import HEADER_SIZE, build_header
from metaprotocol_dubbo.hessian2 import Decoder, HessianError, JavaObject, dumps, loads
from metaprotocol_dubbo.hessian2 import decoder as decoder_module

from metaprotocol_sdk import CodecError, ConfigError, Metadata

sys.modules["codecs"] = encodings.codecs  # see test_hessian2_errors.py


def _int(n: int) -> bytes:
    """A Hessian int in its three-byte compact form (up to 2^18)."""
    return bytes((0xD4 + (n >> 16), (n >> 8) & 0xFF, n & 0xFF))


def _fixed_list(items: list[bytes]) -> bytes:
    return b"\x58" + _int(len(items)) + b"".join(items)


def _refs_to_skipped(n: int) -> bytes:
    """A list of ``n`` empty lists (skipped), then a list of ``n`` references to them."""
    return _fixed_list([b"\x78"] * n) + _fixed_list([b"\x51" + _int(i + 1) for i in range(n)])


def _cpu(work: Callable[[], Any]) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        work()
        best = min(best, time.process_time() - start)
    return best


def _skip_then_read(data: bytes) -> Any:
    decoder = Decoder(data)
    decoder.skip()
    return decoder.read()


def test_references_to_skipped_containers_cost_linear_time() -> None:
    small, large = _refs_to_skipped(10_000), _refs_to_skipped(40_000)
    assert len(_skip_then_read(large)) == 40_000
    costs = {len(small): float("inf"), len(large): float("inf")}
    for _ in range(3):  # in turns, so a busy spell of the machine weighs on both
        for data in (small, large):
            costs[len(data)] = min(costs[len(data)], _cpu(lambda d=data: _skip_then_read(d)))
    ratio = costs[len(large)] / costs[len(small)]
    # Four times the input: about 4 when linear, about 16 when quadratic (as it was); the bound
    # is their geometric mean, so load on the machine does not decide it.
    assert ratio < 8, f"four times the references cost {ratio:.1f}x the time"


def _nested(depth: int) -> bytes:
    """``depth`` lists nested in each other (each holds a string and the next), skipped, then
    references to them from the innermost out."""
    inner = b"\x78"
    for _ in range(depth):
        inner = b"\x7a\x05hello" + inner
    refs = [b"\x51" + _int(i) for i in range(depth, 0, -1)]
    return _fixed_list([inner]) + _fixed_list(refs)


@pytest.mark.skipif(
    decoder_module.__name__ in COMPILED,
    reason="counts calls by monkeypatching, which compiled callers do not see",
)
def test_nested_skipped_containers_are_decoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    depth = 100
    filled = 0
    fill = decoder_module._fill_fixed

    def counting(*args: Any) -> Any:
        nonlocal filled
        filled += 1
        return fill(*args)

    monkeypatch.setattr(decoder_module, "_fill_fixed", counting)
    values = _skip_then_read(_nested(depth))
    # Each skipped list (depth + 1 nested ones and the one around them) is built once, and so
    # is the list of references (it was about depth^2 / 2: each reference rebuilt its subtree).
    assert filled == depth + 3
    outer = values[-1]
    assert outer[0] == "hello"
    # Every reference resolves to the very list found inside its parent.
    for inner, parent in itertools.pairwise(values):
        assert parent[1] is inner


def test_max_refs_bounds_skipped_and_read_containers() -> None:
    data = _fixed_list([b"\x78"] * 10)  # eleven containers
    for action in (Decoder.skip, Decoder.read):
        with pytest.raises(HessianError, match=r"more than max_refs=10 lists") as info:
            action(Decoder(data, max_refs=10))
        assert info.value.offset == len(data) - 1  # the eleventh container's tag
        action(Decoder(data, max_refs=11))


def test_max_classes_bounds_class_definitions() -> None:
    objects = [JavaObject(f"com.example.C{i}", {"f": i}) for i in range(5)]
    data = dumps(objects)
    for action in (Decoder.skip, Decoder.read):
        with pytest.raises(HessianError, match=r"more than max_classes=4 class definitions"):
            action(Decoder(data, max_classes=4))
    assert loads(data) == objects


def test_dubbo_request_with_too_many_containers_is_a_codec_error() -> None:
    """The default bound: a request whose argument holds more lists than max_refs is refused
    with a typed error, not bookkept at ~100 bytes per one-byte container."""
    n = decoder_module.DEFAULT_MAX_REFS + 1
    frame = build_request("com.example.S", "m", ["x"], descriptor="Ljava/util/List;")
    # Replace the argument with a list of n empty lists.
    head = frame[: frame.index(b"\x01x")]
    body = head[HEADER_SIZE:] + _fixed_list([b"\x78"] * n) + b"HZ"
    frame = build_header(frame[2], 0, 1, len(body)) + body
    buffer = bytearray(frame)
    with pytest.raises(CodecError, match="max_refs"):
        DubboCodec().decode(buffer)
    assert buffer == frame


def test_dubbo_codec_options_set_the_hessian_limits() -> None:
    """max_hessian_refs and max_hessian_classes reach every Hessian decoder of the codec:
    arguments skipped, attachments read, response values and re-encoded attachments."""
    lists = [[i] for i in range(20)]
    request = build_request("com.example.S", "m", [lists], attachments={"k": lists[3]})
    objects = [JavaObject(f"com.example.C{i}", {"f": i}) for i in range(5)]
    classes = build_request("com.example.S", "m", [objects])
    for frame, options, match in (
        (request, {"max_hessian_refs": "20"}, "max_refs=20"),
        (classes, {"max_hessian_classes": 4}, "max_classes=4"),
    ):
        assert isinstance(DubboCodec().decode(bytearray(frame)), Metadata)
        buffer = bytearray(frame)
        with pytest.raises(CodecError, match=match):
            DubboCodec.from_options(options).decode(buffer)
        assert buffer == frame
    with pytest.raises(ConfigError, match="positive integer"):
        DubboCodec.from_options({"max_hessian_refs": "0"})


def test_attachments_of_many_small_entries_are_bounded_in_memory() -> None:
    """A map of one-byte int entries costs two bytes each on the wire and ~100 bytes each as
    a Python dict: 300k entries in 0.6 MB would have built ~30 MB of objects. The items
    budget refuses it with a typed error long before, and a raised budget decodes it."""
    import tracemalloc

    entries = 300_000
    attachments = {i: i & 0x3F for i in range(entries)}  # compact ints: small on the wire
    frame = build_request("com.example.S", "m", ["x"], attachments=attachments)
    codec = DubboCodec(max_frame_size=16 << 20)
    buffer = bytearray(frame)
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="max_items=65536"):
            codec.decode(buffer)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert buffer == frame  # nothing consumed
    assert peak < 12 * len(frame), f"peak {peak} bytes for a {len(frame)}-byte frame"
    roomy = DubboCodec(max_frame_size=16 << 20, max_hessian_items=1 << 20)
    message = roomy.decode(bytearray(frame))
    assert isinstance(message, Metadata)


@pytest.mark.parametrize(
    ("entries", "options"),
    [
        (300_000, {}),  # a large frame: its map is read inline from its tail
        (1_000, {"max_hessian_items": 999}),  # a small one: the whole body is read inline
    ],
)
def test_string_attachments_are_held_to_the_items_budget(
    entries: int, options: dict[str, int]
) -> None:
    """String-to-string attachments (the common shape, read inline without the Hessian
    decoder) escaped ``max_hessian_items``: 900 000 of them in a 6 MB request built 205 MiB
    of Python objects in one decode (0.7 s), when the same map of ints was refused. Now they
    are refused the same way, and a map within the budget decodes as before."""
    import tracemalloc

    attachments = {f"{i:x}": "" for i in range(entries)}
    frame = build_request("com.example.S", "m", ["x"], attachments=attachments, request_id=9)
    codec = DubboCodec.from_options(options)
    buffer = bytearray(frame)
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="max_items=") as caught:
            codec.decode(buffer)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.metadata is not None and caught.value.metadata.request_id == 9
    assert buffer == frame  # nothing consumed
    assert peak < 12 * len(frame) + (1 << 20), f"peak {peak} bytes for {len(frame)} bytes"
    most = options.get("max_hessian_items", 65536)  # exactly the budget: decoded
    fewer = {f"{i:x}": "" for i in range(most)}
    message = codec.decode(bytearray(build_request("com.example.S", "m", ["x"], attachments=fewer)))
    assert isinstance(message, Metadata) and message.attributes.get(f"{most - 1:x}") == ""


def test_string_attachments_of_a_response_are_held_to_the_items_budget() -> None:
    """The same for a response's attachments (an upstream's reply)."""
    from metaprotocol_dubbo.frames import build_response

    attachments = {f"{i:x}": "" for i in range(100_000)}
    frame = build_response("v", request_id=5, attachments=attachments)
    with pytest.raises(CodecError, match="max_items=65536"):
        DubboCodec().decode(bytearray(frame))
    roomy = DubboCodec(max_hessian_items=1 << 17)
    assert isinstance(roomy.decode(bytearray(frame)), Metadata)


def test_the_items_budget_counts_lists_and_maps_of_the_stream() -> None:
    assert loads(dumps([[1, 2], {"a": 1}]), max_items=5) == [[1, 2], {"a": 1}]
    with pytest.raises(HessianError, match="max_items=4"):
        loads(dumps([[1, 2], {"a": 1}]), max_items=4)
    with pytest.raises(ConfigError):
        DubboCodec.from_options({"max_hessian_items": 0})
