"""A codec that declares ``rewrite_request_id`` but whose ``encode`` does not write the new id
it is given: on a shared upstream connection, the upstream answers with the client's id,
which no request on that connection has. The request waits for its timeout (the reply cannot
be told apart from another client's), and the engine names the codec: one log line and
``metaprotocol_codec_errors_total{method="encode"}``. Before, only the unmatched replies
counter grew, with nothing saying why (the kit's ``mutation_with_request_id`` finds it)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from proxy_kit import Client, Upstream, address, engine_for, error_type, mesh, run, until

from metaprotocol_sdk import Encoded, Metadata, Mutation
from metaprotocol_sdk.examples.kv import KVCodec
from metaprotocol_sdk.proxy import codec_bugs

#: By this module's own name: by its file name the engine would import a second copy of it.
CODEC = f"{__name__}:IdKeepingKV"
ROUTER = """\
- name: all
  route: [{destination: {host: svc.test}}]
  timeout: 300ms
"""


class IdKeepingKV(KVCodec):
    """The KV codec with a bug: ``encode`` keeps the frame's own id, whatever it is given."""

    def encode(
        self, message: Metadata, mutation: Mutation | None = None, *, request_id: int | None = None
    ) -> Encoded:
        return super().encode(message, mutation)


def test_a_codec_that_does_not_write_the_new_request_id_is_named(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(codec_bugs, "LOG_INTERVAL", 3600.0)

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")], router=ROUTER, codec=CODEC)) as engine:
            c = await Client.connect(address(engine))
            seen = [error_type(await c.call(rid=7777 + i)) for i in range(3)]
            assert seen == ["Timeout"] * 3  # a reply by the client's id cannot be delivered
            errors: Any = engine.stats.total(
                "metaprotocol_codec_errors_total", codec=CODEC, method="encode"
            )
            assert errors == 1  # said once per connection, not per reply
            unmatched = engine.stats.total("metaprotocol_upstream_unmatched_replies_total")
            assert unmatched == 3
            c.close()
        await up.close()

    with caplog.at_level(logging.INFO):
        run(main())
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert (
        f"codec {CODEC}: encode: a reply on cluster outbound|9000||svc.test carried id 7777"
        in (lines[0])
    )


def test_a_late_reply_to_a_timed_out_request_does_not_name_a_correct_codec(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request times out on a shared connection (engine id 1); another request, which its
    client also numbered 1, is in flight there under engine id 2 when the first one's reply
    comes, late, with id 1: dropped as unmatched, and nothing more. The correct KV codec was
    named as one that did not write the id it was given (the late id equals the client's
    id of a request in flight): an error line and a codec error counted."""

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")], router=ROUTER)) as engine:
            c = await Client.connect(address(engine))
            assert error_type(await c.call("slow", rid=1)) == "Timeout"
            second = c.start("hang", rid=1)
            await until(lambda: len(up.received) == 2, "the second request at the upstream")
            up.release.set()  # the first one's reply, late
            unmatched = "metaprotocol_upstream_unmatched_replies_total"
            await until(lambda: engine.stats.total(unmatched) == 1, "the late reply dropped")
            assert engine.stats.total("metaprotocol_codec_errors_total", method="encode") == 0
            assert error_type(await second) == "Timeout"
            c.close()
        await up.close()

    with caplog.at_level(logging.INFO):
        run(main())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


class TinyIdKV(KVCodec):
    """The KV codec with room for three request ids only."""

    max_request_id = 3


def test_a_codec_whose_ids_are_all_in_flight_waits_for_one() -> None:
    """A codec of three request ids (``max_request_id``) on one shared connection
    (``maxConnections: 1``): two requests in flight (the third id kept for one-way
    messages), the next ones wait for a free id and go as the first time out. The engine
    looked for a free id forever once, and its loop hung; then it answered BadRequest."""
    codec = f"{__name__}:TinyIdKV"
    pool = "{connectionPool: {tcp: {maxConnections: 1}}}"

    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh([(up.port, "v1")], router=ROUTER, codec=codec, traffic_policy=pool)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            hung = [c.start("hang") for _ in range(2)]
            waiting = c.start("get")
            answers = await asyncio.wait_for(asyncio.gather(*hung), 4)
            assert [error_type(a) for a in answers] == ["Timeout"] * 2
            # (the wait counts against the route's timeout: sent as the first ones time out,
            # it may time out too, or be answered: either way, it was never refused)
            assert error_type(await asyncio.wait_for(waiting, 4)) in (None, "Timeout")
            assert engine.stats.total("metaprotocol_upstream_requests_queued_total") == 1
            assert engine.pending == 0
            c.close()
        await up.close()

    run(main())
