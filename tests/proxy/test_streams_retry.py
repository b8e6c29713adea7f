"""A stream whose connection cannot be made is opened again on another endpoint when its route
retries on ``connect-failure``, as a request is: nothing reached the upstream, so the
``Stream_Init`` and the frames the client sent meanwhile are sent again, in order. Real
sockets on 127.0.0.1: a port that refuses connections and a KV stream server."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from proxy_kit import (
    address,
    build_frame,
    engine_for,
    error_type,
    mesh,
    refusing_port,
    run,
    until,
)
from test_streams import StreamClient, StreamServer
from test_tls import Pki, tls_policy

from metaprotocol_sdk.examples.kv import STREAM_DATA, STREAM_HALF_CLOSE, STREAM_OPEN
from metaprotocol_sdk.proxy import loads_config
from metaprotocol_sdk.proxy.engine import Engine

ROUTER = """\
- name: chat
  route: [{destination: {host: svc.test, subset: v1}}]
  retries: {attempts: %d, retryOn: %s}
"""


@contextlib.asynccontextmanager
async def silent_tls() -> AsyncIterator[tuple[int, list[asyncio.StreamWriter]]]:
    """A port that accepts connections and says nothing: a TLS handshake with it never
    ends (until the connect timeout); the connections it accepted."""
    accepted: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield silent.sockets[0].getsockname()[1], accepted
    finally:
        for writer in accepted:
            writer.close()
        silent.close()
        await silent.wait_closed()


def flooding(client: StreamClient, sids: list[int], engine: Engine) -> Callable[[], bool]:
    """A check for :func:`until` that sends 64 data frames of 16 KiB over ``sids`` at each
    call, reading nothing (the engine must apply back-pressure), and records the most bytes
    the engine held (``peak``); true once every stream got its answer."""
    frames = [build_frame(STREAM_DATA, sid, {}, bytes(16 * 1024)) for sid in sids]

    def check() -> bool:
        check.peak = max(check.peak, engine.buffered)  # type: ignore[attr-defined]
        for i in range(64):
            client.send(frames[i % len(frames)])
        return all(client.frames[sid] for sid in sids)

    check.peak = 0  # type: ignore[attr-defined]
    return check


def retries(engine: Engine) -> int:
    return engine.stats.total("metaprotocol_retries_total", reason="connect-failure")


def ended(engine: Engine, outcome: str) -> int:
    return engine.stats.total("metaprotocol_streams_total", outcome=outcome)


def test_a_stream_whose_connection_fails_is_opened_on_another_endpoint_with_its_frames() -> None:
    """Round robin over a refusing port and a server: every other stream's first try is
    refused. Its ``Stream_Init`` and two data frames, all sent before the connect failed,
    reach the server once and in order; the client sees one stream as if nothing failed."""

    async def main() -> None:
        server = await StreamServer("good").start()
        eps = [(refusing_port(), "v1"), (server.port, "v1")]
        async with engine_for(mesh(eps, router=ROUTER % (2, "connect-failure"))) as engine:
            client = await StreamClient.connect(address(engine))
            for sid in (1, 3):
                client.frame(STREAM_OPEN, sid, {"method": "echo"})
                client.frame(STREAM_DATA, sid, {}, b"one")
                client.frame(STREAM_DATA, sid, {}, b"two")
                client.frame(STREAM_HALF_CLOSE, sid)
            for sid in (1, 3):
                frames = await client.until(sid, 4)
                assert [error_type(f) for f in frames] == [None] * 4
                assert frames[0].attributes["server"] == "good"
                assert [bytes(f.body) for f in frames[1:3]] == [b"ONE", b"TWO"]
            await until(lambda: ended(engine, "closed") == 2, "both streams closed")
            assert retries(engine) == 1
            by_stream = {
                sid: [(f.message_type.name, bytes(f.body)) for f in c.frames if f.stream_id == sid]
                for c in server.connections
                for sid in {f.stream_id for f in c.frames}
            }
            for sid in (1, 3):
                assert by_stream[sid] == [
                    ("Stream_Init", b""),
                    ("Stream_Data", b"one"),
                    ("Stream_Data", b"two"),
                    ("Stream_Close_One_Way", b""),
                ]
            assert engine.stats.total("metaprotocol_upstream_connect_errors_total") == 1
            (cluster,) = engine.clusters.values()
            assert cluster.retrying == 0
            client.close()
        await server.close()

    run(main())


def test_a_stream_is_reset_once_its_retries_are_spent_or_when_the_route_has_none() -> None:
    """Only refusing ports: the stream is reset with its ``Stream_Init``'s error reply after
    the first try and ``attempts`` retries; a route that retries nothing (or not
    ``connect-failure``) resets it after the first."""

    async def main() -> None:
        dead = [(refusing_port(), "v1"), (refusing_port(), "v1")]
        for attempts, retry_on, tries in ((2, "connect-failure", 3), (2, "reset", 1)):
            text = mesh(dead, router=ROUTER % (attempts, retry_on))
            async with engine_for(text) as engine:
                client = await StreamClient.connect(address(engine))
                client.frame(STREAM_OPEN, 5, {"method": "echo"})
                client.frame(STREAM_DATA, 5, {}, b"lost")
                (reply,) = await client.until(5, 1)
                assert (reply.request_id, error_type(reply)) == (5, "UpstreamConnectFailure")
                await until(lambda: ended(engine, "UpstreamConnectFailure") == 1, "reset")
                connects = engine.stats.total("metaprotocol_upstream_connect_errors_total")
                assert (connects, retries(engine)) == (tries, tries - 1)
                (cluster,) = engine.clusters.values()
                assert cluster.retrying == 0 and not engine.upstreams
                client.close()

    run(main())


def test_a_stream_the_client_leaves_while_its_retry_connects_frees_its_retry(
    tmp_path: Path,
) -> None:
    """The retry goes to an endpoint that accepts the connection but never answers the TLS
    handshake, so its connection is still being made when the client leaves (a reset): the
    cluster's retries in flight, which ``maxRetries`` bounds, go back to 0, and the
    half-made connection is closed."""
    pki = Pki(tmp_path)

    async def main() -> None:
        async with silent_tls() as (port, accepted):
            text = mesh(
                [(refusing_port(), "v1"), (port, "v1")],
                router=ROUTER % (2, "connect-failure"),
                traffic_policy=tls_policy(mode="SIMPLE", caCertificates=pki.ca_file),
            )
            async with engine_for(text) as engine:
                (cluster,) = engine.clusters.values()
                client = await StreamClient.connect(address(engine))
                client.frame(STREAM_OPEN, 1, {"method": "echo"})
                await until(lambda: retries(engine) == 1 and accepted, "the retry's connect")
                assert cluster.retrying == 1
                client.reset()  # leaves (a FIN would be a half-close: its streams drain)
                await until(lambda: not engine.downstreams and not engine.upstreams, "closed")
                assert cluster.retrying == 0
                assert ended(engine, "DownstreamClosed") == 1

    run(main())


def hanging_tls(pki: Pki, port: int, retry: int, proxy: str, timeout: str = "0.2s") -> str:
    """A mesh of one endpoint (``port``) whose TLS handshake hangs to the connect
    ``timeout``, a route retrying ``retry`` times on connect-failure, and ``proxy``."""
    policy = json.dumps({"mode": "SIMPLE", "caCertificates": pki.ca_file})
    return mesh(
        [(port, "v1")],
        router=ROUTER % (retry, "connect-failure"),
        traffic_policy=f"{{tls: {policy}, connectionPool: {{tcp: {{connectTimeout: {timeout}}}}}}}",
        proxy=proxy,
    )


def test_a_client_flooding_a_stream_whose_connects_time_out_stays_within_its_buffer(
    tmp_path: Path,
) -> None:
    """Every try's TLS handshake hangs until the connect timeout, while the client sends
    data frames without reading anything: each retry sends the saved frames again, and the
    client waits again. The engine holds about ``connectionBufferBytes`` (64 KiB) and a read
    for the stream however many tries fail, not another read's worth per retry."""
    pki = Pki(tmp_path)
    budget = 64 * 1024

    async def main() -> None:
        async with silent_tls() as (port, _):
            proxy = f"limits: {{connectionBufferBytes: {budget}}}\n"
            async with engine_for(hanging_tls(pki, port, 4, proxy)) as engine:
                client = await StreamClient.connect(address(engine))
                client.frame(STREAM_OPEN, 1, {"method": "echo"})
                flood = flooding(client, [1], engine)
                await until(flood, "the stream's reset")
                assert error_type(client.frames[1][0]) == "UpstreamConnectFailure"
                assert retries(engine) == 4
                peak = flood.peak  # type: ignore[attr-defined]
                assert peak < 4 * budget, peak  # was some 250 KiB more per retry
                client.close()

    run(main())


def test_streams_being_connected_take_no_more_frames_while_the_process_is_over_budget(
    tmp_path: Path,
) -> None:
    """Eight streams whose connections are being made (the handshake hangs for a second),
    the client flooding them: past ``overload.maxBufferedBytes`` (1 MiB) the client is not
    read until they are made or fail. Before, each stream took its ``connectionBufferBytes``
    (1 MiB) whatever the process held: some 8 MiB here, ``maxStreamsPerConnection`` MiB a
    client."""
    pki = Pki(tmp_path)
    budget = 1024 * 1024
    sids = list(range(1, 17, 2))

    async def main() -> None:
        async with silent_tls() as (port, _):
            proxy = f"overload: {{maxBufferedBytes: {budget}}}\n"
            async with engine_for(hanging_tls(pki, port, 0, proxy, "1s")) as engine:
                client = await StreamClient.connect(address(engine))
                for sid in sids:
                    client.frame(STREAM_OPEN, sid, {"method": "echo"})
                flood = flooding(client, sids, engine)
                await until(flood, "the streams' resets")
                assert {error_type(client.frames[sid][0]) for sid in sids} == {
                    "UpstreamConnectFailure"
                }
                peak = flood.peak  # type: ignore[attr-defined]
                assert peak < 2.5 * budget, peak
                client.close()

    run(main())


def test_a_stream_retried_after_a_reload_goes_to_the_endpoints_of_now(tmp_path: Path) -> None:
    """A stream's first connection hangs in its TLS handshake while a reload replaces the
    cluster (another endpoint, plain text); when the connect times out, the retry opens the
    stream on the cluster of that name as the reload left it, as a request's retry does. It
    went to the retired cluster's endpoint again and timed out there."""
    pki = Pki(tmp_path)

    async def main() -> None:
        server = await StreamServer("new").start()
        try:
            async with (
                silent_tls() as (port, accepted),
                engine_for(hanging_tls(pki, port, 2, "", "0.5s")) as engine,
            ):
                client = await StreamClient.connect(address(engine))
                client.frame(STREAM_OPEN, 1, {"method": "echo"})
                await until(lambda: accepted, "the first connect, hanging")
                new = mesh([(server.port, "v1")], router=ROUTER % (2, "connect-failure"))
                await engine.apply(loads_config(new, "new.yaml"))
                (opened,) = await client.until(1, 1)
                assert error_type(opened) is None
                assert opened.attributes.get("server") == "new"
                assert len(accepted) == 1  # no second try at the removed endpoint
                assert retries(engine) == 1
                (cluster,) = engine.clusters.values()
                client.frame(STREAM_HALF_CLOSE, 1)
                await until(lambda: ended(engine, "closed") == 1, "the stream's end")
                assert cluster.retrying == 0
                client.close()
        finally:
            await server.close()

    run(main())
