"""Every local reply reaches the client as the codec's error reply, with the request's id."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from proxy_kit import (
    REQUEST,
    RESPONSE,
    Client,
    Upstream,
    address,
    build_frame,
    engine_for,
    error_type,
    mesh,
    refusing_port,
    run,
    until,
)

from metaprotocol_sdk.examples.kv import KVCodec


def test_route_not_found() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        router = (
            "- match: {attributes: {method: {exact: only}}}\n"
            "  route: [{destination: {host: svc.test}}]\n"
        )
        async with engine_for(mesh([(up.port, "v1")], router=router)) as engine:
            c = await Client.connect(address(engine))
            reply = await c.call("other", rid=11)
            assert (reply.request_id, error_type(reply)) == (11, "RouteNotFound")
            assert (
                engine.stats.get(
                    "metaprotocol_local_replies_total",
                    listener="svc.test:9000",
                    type="RouteNotFound",
                )
                == 1
            )
            assert up.received == []
            c.close()
        await up.close()

    run(main())


def test_cluster_not_found() -> None:
    async def main() -> None:
        router = "- route: [{destination: {host: ghost.test}}]\n"
        async with engine_for(mesh([(refusing_port(), "v1")], router=router)) as engine:
            c = await Client.connect(address(engine))
            reply = await c.call(rid=12)
            assert (reply.request_id, error_type(reply)) == (12, "ClusterNotFound")
            c.close()

    run(main())


def test_no_healthy_upstream_for_empty_subset() -> None:
    async def main() -> None:
        router = "- route: [{destination: {host: svc.test, subset: empty}}]\n"
        async with engine_for(mesh([(refusing_port(), "v1")], router=router)) as engine:
            c = await Client.connect(address(engine))
            reply = await c.call(rid=13)
            assert (reply.request_id, error_type(reply)) == (13, "NoHealthyUpstream")
            c.close()

    run(main())


def test_upstream_connect_failure() -> None:
    async def main() -> None:
        async with engine_for(mesh([(refusing_port(), "v1")])) as engine:
            c = await Client.connect(address(engine))
            replies = await asyncio.wait_for(
                asyncio.gather(c.start(rid=14), c.start(rid=15)), 5
            )  # both queued on the same connecting upstream connection
            assert [(r.request_id, error_type(r)) for r in replies] == [
                (14, "UpstreamConnectFailure"),
                (15, "UpstreamConnectFailure"),
            ]
            assert engine.stats.total("metaprotocol_upstream_connect_errors_total") == 1
            c.close()

    run(main())


def test_upstream_reset_mid_request_then_recovery() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")])) as engine:
            c = await Client.connect(address(engine))
            hanging = c.start("hang", rid=20)
            await up.wait_received(1)
            reply = await c.call("close", rid=21)  # the server drops the connection
            assert (reply.request_id, error_type(reply)) == (21, "UpstreamReset")
            other = await asyncio.wait_for(hanging, 5)
            assert (other.request_id, error_type(other)) == (20, "UpstreamReset")
            ok = await c.call(rid=22)  # a new upstream connection is opened
            assert ok.attributes["server"] == "a" and ok.request_id == 22
            assert up.accepted == 2
            c.close()
        await up.close()

    run(main())


def test_route_timeout() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        router = "- route: [{destination: {host: svc.test}}]\n  timeout: 100ms\n"
        async with engine_for(mesh([(up.port, "v1")], router=router)) as engine:
            c = await Client.connect(address(engine))
            reply = await c.call("hang", rid=30)
            assert (reply.request_id, error_type(reply)) == (30, "Timeout")
            assert engine.pending == 0
            assert (await c.call(rid=31)).attributes["server"] == "a"  # connection still fine
            c.close()
        await up.close()

    run(main())


def test_upstream_error_reply_passes_through() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")])) as engine:
            c = await Client.connect(address(engine))
            reply = await c.call("fail", rid=33)
            assert reply.request_id == 33 and reply.attributes["server"] == "a"
            assert engine.stats.total("metaprotocol_requests_total", status="Error") == 1
            c.close()
        await up.close()

    run(main())


def test_over_limit_pending_requests() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        proxy = "limits: {maxPendingRequests: 1}\n"
        async with engine_for(mesh([(up.port, "v1")], proxy=proxy)) as engine:
            c = await Client.connect(address(engine))
            slow = c.start("slow", rid=40)
            reply = await c.call(rid=41)
            assert (reply.request_id, error_type(reply)) == (41, "OverLimit")
            up.release.set()
            first = await asyncio.wait_for(slow, 5)
            assert first.request_id == 40 and error_type(first) is None
            c.close()
        await up.close()

    run(main())


def test_oversized_frame_gets_overlimit_then_close() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        proxy = "codecOptions: {kv: {max_frame_size: 256}}\n"
        async with engine_for(mesh([(up.port, "v1")], proxy=proxy)) as engine:
            c = await Client.connect(address(engine))
            reply_fut = c.expect(50)
            c.send(build_frame(REQUEST, 50, {"method": "get"}, b"x" * 1000))
            reply = await asyncio.wait_for(reply_fut, 5)
            assert (reply.request_id, error_type(reply)) == (50, "OverLimit")
            await asyncio.wait_for(c.closed, 5)
            assert up.received == []
        await up.close()

    run(main())


def test_malformed_request_among_good_ones() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh([(up.port, "v1")], codec="proxy_test_codecs:LenientKVCodec")
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            slow = c.start("slow", rid=60)  # in flight while the bad frame arrives
            good = build_frame(REQUEST, 61, {"method": "get"})
            bad = bytearray(build_frame(REQUEST, 62, {"method": "get"}))
            bad[16] = 200  # key length runs past the headers block
            futs = [c.expect(61), c.expect(62), c.expect(63)]
            c.send(good + bytes(bad) + build_frame(REQUEST, 63, {"method": "get"}))
            r61, r62, r63 = await asyncio.wait_for(asyncio.gather(*futs), 5)
            assert error_type(r61) is None and error_type(r63) is None
            assert (r62.request_id, error_type(r62)) == (62, "BadRequest")
            up.release.set()
            assert (await asyncio.wait_for(slow, 5)).request_id == 60
            c.close()
        await up.close()

    run(main())


def test_unframeable_bytes_close_the_connection() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")])) as engine:
            c = await Client.connect(address(engine))
            c.send(b"XX" + bytes(30))  # bad magic: no id, no way to resync
            await asyncio.wait_for(c.closed, 5)
            assert engine.stats.total("metaprotocol_decode_errors_total", side="downstream") == 1
        await up.close()

    run(main())


def test_bad_response_from_upstream() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")])) as engine:
            c = await Client.connect(address(engine))
            hanging = c.start("hang", rid=70)
            await up.wait_received(1)
            reply = await c.call("garbage", rid=71)
            other = await asyncio.wait_for(hanging, 5)
            assert {(r.request_id, error_type(r)) for r in (reply, other)} == {
                (70, "BadResponse"),
                (71, "BadResponse"),
            }
            assert engine.stats.total("metaprotocol_decode_errors_total", side="upstream") == 1
            assert (await c.call(rid=72)).attributes["server"] == "a"  # fresh connection
            c.close()
        await up.close()

    run(main())


def test_client_leaving_is_not_an_upstream_error() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh([(up.port, "v1")], protocol="kvnr", codec="proxy_test_codecs:NoRewriteKVCodec")
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            c.start("hang", rid=90)
            await up.wait_received(1)
            # A reset: a FIN alone may be a half-close, after which the reply is still owed.
            c.reset()
            await asyncio.wait_for(c.closed, 5)
            # The engine learns of the reset on a later loop turn.
            await until(lambda: engine.pending == 0, "the request to end with its client")
            assert engine.stats.total("metaprotocol_requests_total", status="DownstreamClosed") == 1
            assert engine.stats.total("metaprotocol_upstream_resets_total") == 0
            assert engine.stats.total("metaprotocol_local_replies_total") == 0
        await up.close()

    run(main())


def test_codec_refusing_a_mutation() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        router = """\
        - name: bad-request
          match: {attributes: {method: {exact: req}}}
          route: [{destination: {host: svc.test}}]
          requestMutation: [{key: x-bad, value: "1"}]
        - name: bad-response
          route: [{destination: {host: svc.test}}]
          responseMutation: [{key: x-bad, value: "1"}]
        """
        text = mesh([(up.port, "v1")], router=router, codec="proxy_test_codecs:PickyKVCodec")
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            reply = await c.call("req", rid=95)
            assert (reply.request_id, error_type(reply)) == (95, "BadRequest")
            assert up.received == []
            # The real reply is forwarded without the mutation it cannot carry, and counted.
            reply = await c.call("resp", rid=96)
            assert (reply.request_id, error_type(reply)) == (96, None)
            assert "x-bad" not in reply.attributes
            assert engine.pending == 0
            stats = engine.stats
            assert stats.total("metaprotocol_mutations_skipped_total", route="bad-response") == 1
            assert stats.total("metaprotocol_local_replies_total", type="BadResponse") == 0
            ok = stats.total("metaprotocol_requests_total", route="bad-response", status="Ok")
            assert ok == 1
            c.close()
        await up.close()

    run(main())


def test_responses_from_clients_are_refused() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")])) as engine:
            c = await Client.connect(address(engine))
            fut = c.expect(99)
            c.send(build_frame(RESPONSE, 99, {"method": "get"}))
            reply = await asyncio.wait_for(fut, 5)
            assert (reply.request_id, error_type(reply)) == (99, "BadRequest")
            assert (await c.call(rid=100)).attributes["server"] == "a"
            assert up.received[0].request_id != 99 and len(up.received) == 1
            c.close()
        await up.close()

    run(main())


class KibKVCodec(KVCodec):
    """A codec whose own ``from_options`` reads an option ``__init__`` does not take."""

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None) -> KibKVCodec:
        kib = int(dict(options or {}).get("max_kib", 1024))
        return cls(max_frame_size=kib * 1024)


def test_a_codec_with_its_own_from_options_builds_every_connections_codec() -> None:
    """Each connection's codec is built without checking the options again (they were
    checked at load), except for a codec that overrides ``from_options``: its own reading of
    the options holds on every connection, both sides."""

    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh(
            [(up.port, "v1")],
            codec=f"{__name__}:KibKVCodec",
            proxy="codecOptions: {kv: {max_kib: 1}}\n",
        )
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            assert error_type(await c.call(body=b"x" * 100, rid=1)) is None
            reply = await c.call(body=b"x" * 2000, rid=2)
            assert (reply.request_id, error_type(reply)) == (2, "OverLimit")
            c.close()  # a frame past the limit ends its connection
            c = await Client.connect(address(engine))
            big = await c.call("big", {"size": "2000"}, rid=3)
            assert (big.request_id, error_type(big)) == (3, "BadResponse")
            c.close()
        await up.close()

    run(main())
