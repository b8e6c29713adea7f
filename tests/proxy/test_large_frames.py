"""Large frames are assembled from their reads at once: decoded with ``decode_frame`` when the
codec overrides it, else by ``decode`` from a buffer joined once.

Driven call by call on fake transports: the reads a socket would deliver are handed to the
connections directly, so every split is exact and nothing depends on timing.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
import uvloop
from proxy_kit import mesh, wire_fakes

from metaprotocol_sdk import Metadata, NeedData
from metaprotocol_sdk.examples.kv import ERROR, REQUEST, RESPONSE, KVCodec, build_frame
from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.assembly import LARGE_FRAME, Reads

PIECE = 16 << 10
BODY = 5 * LARGE_FRAME  # a frame of many reads


class WholeFrameKVCodec(KVCodec):
    """The KV codec, recording the size of every frame it is given whole."""

    protocol = "kvw"
    whole: list[int] = []

    def decode_frame(self, frame: bytes) -> Metadata:
        WholeFrameKVCodec.whole.append(len(frame))
        return super().decode_frame(frame)


class PlainKVCodec(KVCodec):
    """The KV codec as it is (no ``decode_frame`` of its own), under a protocol of its own."""

    protocol = "kvw"


class LowballKVCodec(WholeFrameKVCodec):
    """Breaks ``framing_needed_exact`` on large frames: asks for no more than it holds."""

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        result = super().decode(buffer)
        if isinstance(result, NeedData) and len(buffer) > LARGE_FRAME:
            return NeedData(len(buffer))
        return result


CODEC = f"{__name__}:WholeFrameKVCodec"
#: Both ways an assembled frame is decoded.
CODECS = pytest.mark.parametrize("codec", ["WholeFrameKVCodec", "PlainKVCodec"])


def pieces(data: bytes, size: int = PIECE) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def frames_in(calls: list[list[Any]]) -> list[Metadata]:
    """Every KV message the engine handed a fake transport, decoded."""
    buffer = bytearray(b"".join(bytes(b) for call in calls for b in call))
    codec, out = KVCodec(), []
    while buffer:
        message = codec.decode(buffer)
        assert isinstance(message, Metadata), f"{len(buffer)} bytes left over"
        out.append(message)
    return out


def drive(steps: Any, codec: str = "WholeFrameKVCodec") -> None:
    """Run ``steps(engine, down, down_t, up, up_t)`` on a started engine with fake wires."""

    async def main() -> None:
        text = mesh([(1, "v1")], protocol="kvw", codec=f"{__name__}:{codec}")
        engine = Engine(loads_config(text))
        await engine.start()
        try:
            steps(engine, *wire_fakes(engine))
        finally:
            await engine.stop(drain=0.1)

    WholeFrameKVCodec.whole.clear()
    uvloop.run(main())


def joined(head: bytes, reads: list[bytes], size: int, whole: bool) -> tuple[Any, bytes]:
    kept = Reads()
    for data in reads:
        kept.add(data)
    assert kept.size == sum(map(len, reads))
    frame, buffer = kept.join(bytearray(head), size, whole)
    assert kept.size == 0 and kept.blocks == []
    return frame, bytes(buffer)


def test_reads_join_the_frame_once_and_keep_what_follows_it() -> None:
    assert joined(b"ab", [b"cde", b"fgh", b"ijk"], 11, True) == (b"abcdefghijk", b"")
    assert joined(b"ab", [b"cde", b"fgh", b"ijk"], 9, True) == (b"abcdefghi", b"jk")
    assert joined(b"ab", [b"cdefgh"], 3, True) == (b"abc", b"defgh")
    # A codec without decode_frame gets the frame and what follows in one buffer.
    assert joined(b"ab", [b"cde", b"fgh", b"ijk"], 9, False) == (None, b"abcdefghijk")


@CODECS
def test_a_large_request_is_assembled_from_its_reads_and_what_follows_goes_on(codec: str) -> None:
    large = build_frame(REQUEST, 7, {"method": "big"}, b"q" * BODY)
    small = build_frame(REQUEST, 8, {"method": "small"}, b"s")
    reads = pieces(large)
    reads[-1] += small + small[:5]  # the next request, and the start of a third, in one read

    def steps(engine: Engine, down: Any, down_t: Any, up: Any, up_t: Any) -> None:
        fed = 0
        for data in reads[:-1]:
            down.data_received(data)
            fed += len(data)
            assert down.held == fed  # the reads kept count against the buffer budget
        assert up_t.calls == [] and WholeFrameKVCodec.whole == []
        down.data_received(reads[-1])
        # decode_frame, where the codec has one: given the whole frame once.
        assert WholeFrameKVCodec.whole == ([len(large)] if codec == "WholeFrameKVCodec" else [])
        assert down.held == 5  # only the third request's start is left
        up._flush()
        sent = frames_in(up_t.calls)
        assert [m.operation_name for m in sent] == ["big", "small"]
        assert bytes(sent[0].body) == b"q" * BODY and bytes(sent[1].body) == b"s"
        down.data_received(small[5:])
        up._flush()
        assert [m.operation_name for m in frames_in(up_t.calls)] == ["big", "small", "small"]

    drive(steps, codec)


@CODECS
def test_a_large_reply_is_assembled_from_its_reads_and_what_follows_goes_on(codec: str) -> None:
    def steps(engine: Engine, down: Any, down_t: Any, up: Any, up_t: Any) -> None:
        down.data_received(build_frame(REQUEST, 7, {"method": "a"}))
        down.data_received(build_frame(REQUEST, 8, {"method": "b"}))
        up._flush()
        first, second = (m.request_id for m in frames_in(up_t.calls))
        large = build_frame(RESPONSE, first, {"s": "1"}, b"r" * BODY)
        small = build_frame(RESPONSE, second, {"s": "2"}, b"t")
        reads = pieces(large)
        reads[-1] += small
        fed = 0
        for data in reads[:-1]:
            up.data_received(data)
            fed += len(data)
            assert up.held == fed
        up.data_received(reads[-1])
        assert WholeFrameKVCodec.whole == ([len(large)] if codec == "WholeFrameKVCodec" else [])
        assert up.held == 0
        replies = frames_in(down_t.calls)
        assert [(m.request_id, len(m.body)) for m in replies] == [(7, BODY), (8, 1)]
        assert bytes(replies[0].body) == b"r" * BODY

    drive(steps, codec)


def test_a_large_request_sent_a_byte_at_a_time_is_kept_in_blocks_not_per_read() -> None:
    """A peer trickling a large frame one byte per read: the engine gathers the small reads into
    blocks (a list entry and a ``bytes`` object per byte would cost 40 times the frame)."""
    large = build_frame(REQUEST, 7, {"method": "big"}, b"q" * (2 * LARGE_FRAME))

    def steps(engine: Engine, down: Any, down_t: Any, up: Any, up_t: Any) -> None:
        down.data_received(large[:LARGE_FRAME])
        for i in range(LARGE_FRAME, len(large) - 1):
            down.data_received(large[i : i + 1])
        assert down.held == len(large) - 1
        assert len(down.reads.blocks) <= 2, len(down.reads.blocks)
        down.data_received(large[-1:])
        up._flush()
        (sent,) = frames_in(up_t.calls)
        assert bytes(sent.body) == b"q" * (2 * LARGE_FRAME)

    drive(steps)


def test_a_bad_large_request_gets_its_error_reply_and_the_next_one_is_served() -> None:
    large = bytearray(build_frame(REQUEST, 9, {"method": "big", "k": "v"}, b"q" * BODY))
    large[large.index(b"\x01v") + 1] = 0xFF  # the header value is no longer UTF-8
    small = build_frame(REQUEST, 10, {"method": "small"}, b"s")
    reads = pieces(bytes(large))
    reads[-1] += small

    def steps(engine: Engine, down: Any, down_t: Any, up: Any, up_t: Any) -> None:
        for data in reads:
            down.data_received(data)
        assert WholeFrameKVCodec.whole == [len(large)]
        (reply,) = frames_in(down_t.calls)
        assert (reply.codec_state, reply.request_id) == (ERROR, 9)
        assert "UTF-8" in reply.attributes["error-message"], reply.attributes
        up._flush()
        (sent,) = frames_in(up_t.calls)
        assert sent.operation_name == "small"
        assert struct.unpack_from(">I", sent.frame, 4)[0] == sent.request_id
        assert not down.closed and down.held == 0

    drive(steps)


def test_a_codec_asking_for_no_more_than_it_holds_still_gets_its_frame_decoded() -> None:
    """A codec that breaks framing_needed_exact on a large frame (its NeedData asks for what
    the buffer already holds) is called again as the frame grows, as before assembly existed:
    no frame is cut from a wrong size."""
    large = build_frame(REQUEST, 7, {"method": "big"}, b"q" * BODY)

    def steps(engine: Engine, down: Any, down_t: Any, up: Any, up_t: Any) -> None:
        for data in pieces(large, 2 * LARGE_FRAME):  # decode sees more than LARGE_FRAME
            down.data_received(data)
        up._flush()
        (sent,) = frames_in(up_t.calls)
        assert sent.operation_name == "big" and bytes(sent.body) == b"q" * BODY
        assert down.held == 0

    drive(steps, "LowballKVCodec")
