"""The oracle catches each kind of misbehaviour: one planted bug per rule, on the KV codec.

Each test runs the same input through the real KV codec (which passes) and through a copy with
one planted bug (which must break exactly the rule aimed at).
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import pytest
from metaprotocol_dubbo.hessian2 import Decoder, Encoder

from fuzz import config_oracle
from fuzz.bounds import Bounds, bounded
from fuzz.hessian_oracle import check_hessian
from fuzz.minimize import kind_of, minimize
from fuzz.oracle import Violation, check_codec
from metaprotocol_sdk.codec import NEED_DATA, Codec, Encoded, NeedData
from metaprotocol_sdk.examples.kv import (
    GOAWAY,
    PING,
    PONG,
    REQUEST,
    RESPONSE,
    KVCodec,
    build_frame,
)
from metaprotocol_sdk.metadata import Metadata, Mutation

GET = build_frame(REQUEST, 1, {"method": "get", "key": "k"}, b"body")
REPLY = build_frame(RESPONSE, 1, {"status": "ok"}, b"value")
BAD_VERSION = b"KV\x09" + GET[3:]
NOTICE = build_frame(PONG, 3, {GOAWAY: "bye", "x": "1"})
BIG_ID = build_frame(REQUEST, 0x9ABCDEF0, {"method": "get"})


class ConsumesOnError(KVCodec):
    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        if len(buffer) > 2 and buffer[2] != 1:
            del buffer[:16]
        return super().decode(buffer)


class LeaksValueError(KVCodec):
    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        if len(buffer) > 2 and buffer[2] != 1:
            raise ValueError("bad version")
        return super().decode(buffer)


class NeedsOneMore(KVCodec):
    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        result = super().decode(buffer)
        return (
            NeedData(result.needed + 1)
            if isinstance(result, NeedData) and result.needed
            else result
        )


class BuffersForever(KVCodec):
    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        if len(buffer) >= 16 and buffer[:2] != b"KV":
            return NEED_DATA  # never decides on junk
        return super().decode(buffer)


class KeepsOldId(KVCodec):
    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        return super().encode(message, mutation)


class DropsMutation(KVCodec):
    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        return super().encode(message, None, request_id=request_id)


class KeepsExistingKeys(KVCodec):
    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        new = {k: v for k, v in (mutation or {}).items() if k not in message.attributes}
        return super().encode(message, new, request_id=request_id)


class Reserialises(KVCodec):
    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        if mutation or request_id is not None:
            return super().encode(message, mutation, request_id=request_id)
        headers = dict(sorted(message.attributes.to_dict().items()))  # a new header order
        return build_frame(REQUEST, message.request_id, headers, bytes(message.body))


class PeekOffByOne(KVCodec):
    def peek_reply(self, buffer: bytearray) -> tuple[int, int, object] | None:  # type: ignore[override]
        head = super().peek_reply(buffer)
        return None if head is None else (head[0], head[1] + 1, head[2])


class NoticeKeyError(KVCodec):
    def is_drain_notice(self, metadata: Metadata) -> bool:
        return bool(metadata.attributes.to_dict()["reason"])  # KeyError: no "reason"


class AnswersNotice(KVCodec):
    def heartbeat_reply(self, metadata: Metadata) -> bytes | None:
        return build_frame(PONG, metadata.request_id)  # pongs, the notice among them, too


class PingIdIn16Bits(KVCodec):
    def heartbeat_request(self, request_id: int) -> bytes:
        return build_frame(PING, request_id & 0xFFFF)  # the id field written too narrow


class PingOverflows(KVCodec):
    def heartbeat_request(self, request_id: int) -> bytes:
        return build_frame(PING, request_id * 2)  # struct.error above 2^31


class PingIsAPong(KVCodec):
    def heartbeat_request(self, request_id: int) -> bytes:
        return build_frame(PONG, request_id)  # needs no answer


class Hangs(KVCodec):
    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        while buffer[:2] == b"ZZ":
            pass
        return super().decode(buffer)


class Hoards(KVCodec):
    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        junk = bytearray(64 * 1024 * 1024) if buffer[:2] == b"ZZ" else b""
        del junk
        return super().decode(buffer)


def rule_of(codec: Callable[[], Codec], data: bytes, bounds: Bounds | None = None) -> str | None:
    try:
        bounded(lambda d: check_codec(codec, d), data, bounds or Bounds())
    except Violation as violation:
        return violation.rule
    return None


@pytest.mark.parametrize(
    ("broken", "data", "rule"),
    [
        (ConsumesOnError, BAD_VERSION, "buffer-changed"),
        (LeaksValueError, BAD_VERSION, "crash"),
        (NeedsOneMore, GET, "need-not-exact"),
        (BuffersForever, b"JUNK" * 8, "unbounded-buffering"),
        (KeepsOldId, GET, "reencode-lost-id"),
        (DropsMutation, GET, "reencode-lost-mutation"),
        (KeepsExistingKeys, GET, "reencode-lost-mutation"),
        (Reserialises, GET, "encode-not-identity"),
        (PeekOffByOne, REPLY, "peek-disagrees"),
        (NoticeKeyError, NOTICE, "crash"),
        (AnswersNotice, NOTICE, "notice-answered"),
        (PingIdIn16Bits, BIG_ID, "ping-wrong-id"),
        (PingOverflows, BIG_ID, "crash"),
        (PingIsAPong, GET, "ping-unanswered"),
    ],
)
def test_each_codec_rule_catches_its_planted_bug(
    broken: type[KVCodec], data: bytes, rule: str
) -> None:
    assert rule_of(KVCodec, data) is None
    assert rule_of(broken, data) == rule


def test_a_hang_is_interrupted_and_reported() -> None:
    quick = Bounds(seconds=0.05, seconds_per_byte=0)
    assert rule_of(KVCodec, b"ZZ" + GET, quick) is None
    assert rule_of(Hangs, b"ZZ" + GET, quick) == "hang"


def test_memory_out_of_proportion_is_reported() -> None:
    tracemalloc.start()
    try:
        assert rule_of(KVCodec, b"ZZ" + GET) is None
        assert rule_of(Hoards, b"ZZ" + GET) == "memory"
    finally:
        tracemalloc.stop()


def test_hessian_skip_then_read_must_agree_with_read(monkeypatch: pytest.MonkeyPatch) -> None:
    shared = [1, 2, 3]
    encoder = Encoder()
    encoder.write(shared)
    encoder.write(shared)  # a reference to the first list, which the third pass skips
    stream = encoder.getvalue()
    check_hessian(stream)
    monkeypatch.setattr(Decoder, "_resolve", lambda self, idx: [])
    with pytest.raises(Violation) as caught:
        check_hessian(stream)
    assert caught.value.rule == "skip-then-read-differs"


def test_config_errors_other_than_config_error_are_crashes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config_oracle.check_config(b"kind: [")

    def broken(text: str, source: str) -> None:
        raise KeyError("spec")

    monkeypatch.setattr(config_oracle, "loads_config", broken)
    with pytest.raises(Violation) as caught:
        config_oracle.check_config(b"kind: [")
    assert caught.value.rule == "crash"


def test_minimize_keeps_the_kind_and_drops_the_rest() -> None:
    def check(data: bytes) -> None:
        check_codec(ConsumesOnError, data)

    big = BAD_VERSION + b"x" * 200
    small = minimize(check, big)
    # 16 bytes the planted bug drops, then 16 that fail the magic check: nothing shorter works.
    assert len(small) == 32
    assert kind_of(check, small) == kind_of(check, big) == "buffer-changed:FramingError"
