"""A codec whose constructor fails for one connection costs that connection, never the process.

The options were checked when the configuration loaded (the codec was built then), so this is
a constructor that needs something per connection that is missing for a while (a file, a
table, memory). Before, the exception went to the event loop as a traceback per connection
("Exception in protocol factory"; for an upstream connection, "Fatal error: protocol.
data_received() call failed", which also dropped the client with its requests unanswered).
Now: the client's connection is refused (``..._rejected_total{reason="codec_error"}``), a
request that needed an upstream connection is answered ``UpstreamConnectFailure`` with its
id, each counted in ``metaprotocol_codec_errors_total{method="__init__"}`` and logged as one
line; connections made once the codec recovers are served. Real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from mesh_pki import MeshCa
from proxy_kit import (
    ONEWAY,
    WAIT,
    Client,
    Upstream,
    address,
    build_frame,
    engine_for,
    error_type,
    mesh,
    run,
    until,
)
from test_streams import StreamClient, StreamServer
from test_tls import record_loop_errors

from metaprotocol_sdk.examples.kv import STREAM_OPEN, KVCodec
from metaprotocol_sdk.proxy import codec_bugs
from metaprotocol_sdk.proxy.engine import Engine

#: What the constructor raises while ``Flaky.failing``.
BUG = "the codec's table is not there"


class Flaky(KVCodec):
    """The KV codec, whose constructor raises while ``failing`` is set."""

    failing = False

    def __init__(self, **options: Any) -> None:
        if Flaky.failing:
            raise RuntimeError(BUG)
        super().__init__(**options)


class FlakyDedicated(Flaky):
    """The same without id rewriting: each client gets upstream connections of its own."""

    capabilities = KVCodec.capabilities.__class__(
        heartbeat=True, oneway=True, mutation=True, response_mutation=True, streaming=True
    )


@pytest.fixture(autouse=True)
def healthy_codec(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with a codec that builds, and one log line per test at most."""
    monkeypatch.setattr(Flaky, "failing", False)
    monkeypatch.setattr(codec_bugs, "LOG_INTERVAL", 3600.0)


def init_errors(engine: Engine, codec: type[Flaky] = Flaky) -> int:
    name = f"{__name__}:{codec.__qualname__}"
    return engine.stats.total("metaprotocol_codec_errors_total", codec=name, method="__init__")


def rejected(engine: Engine) -> int:
    return engine.stats.total(
        "metaprotocol_downstream_connections_rejected_total", reason="codec_error"
    )


def logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The engine's lines about the constructor (with no traceback)."""
    lines = [r for r in caplog.records if "__init__ raised" in r.getMessage()]
    assert all(r.exc_info is None for r in lines)
    return [r.getMessage() for r in lines]


async def refused(engine: Engine, ssl: Any = None) -> bytes:
    """What a client reads from a connection whose codec cannot be built (its request is
    sent, unread, in case the engine read it)."""
    reader, writer = await asyncio.open_connection(*address(engine), ssl=ssl)
    writer.write(build_frame(0, 1, {"method": "get"}))
    try:
        async with asyncio.timeout(WAIT):
            return await reader.read()
    finally:
        writer.close()


def test_a_client_connection_whose_codec_fails_is_refused_and_the_next_one_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, "metaprotocol.proxy")

    async def main() -> None:
        errors = record_loop_errors()
        up = await Upstream("v1").start()
        async with engine_for(mesh([(up.port, "v1")], codec=f"{__name__}:Flaky")) as engine:
            Flaky.failing = True
            assert await refused(engine) == b""  # closed, cleanly, nothing written
            assert await refused(engine) == b""
            assert rejected(engine) == 2 and init_errors(engine) == 2
            Flaky.failing = False
            client = await Client.connect(address(engine))
            assert error_type(await client.call("get")) is None
            client.close()
        await up.close()
        assert errors == []

    run(main())
    (line,) = logged(caplog)
    assert f"{__name__}:Flaky: __init__ raised RuntimeError: {BUG!r}" in line, line
    assert "client connection refused" in line, line


def test_a_permissive_listener_refuses_plain_and_tls_clients_whose_codec_fails(
    tmp_path: Path,
) -> None:
    """A PERMISSIVE listener builds the connection after reading its first bytes: a plain
    client and a mutual TLS client, each refused there."""
    ca = MeshCa()
    ca.write(tmp_path / "certs", "engine")
    text = mesh(
        [(1, "v1")],
        codec=f"{__name__}:Flaky",
        proxy=f"meshIdentity: {{directory: '{tmp_path / 'certs'}'}}\n",
    )
    ctx = ca.client_context(tmp_path / "default", None)
    ctx.load_cert_chain(*ca.files(tmp_path / "default", "frontend", "default"))

    async def main() -> None:
        errors = record_loop_errors()
        async with engine_for(text) as engine:
            Flaky.failing = True
            assert await refused(engine) == b""
            with pytest.raises((ConnectionError, OSError, asyncio.IncompleteReadError)):
                await refused(engine, ssl=ctx)  # no handshake: the connection ends
            await until(lambda: rejected(engine) == 2, "both refused")
            assert init_errors(engine) == 2
        assert errors == []

    run(main())


@pytest.mark.parametrize("codec", [Flaky, FlakyDedicated], ids=["shared", "dedicated"])
def test_a_request_whose_upstream_codec_fails_is_answered_and_the_next_one_served(
    codec: type[Flaky],
) -> None:
    """The client's connection is made; then its request needs an upstream connection whose
    codec fails: ``UpstreamConnectFailure`` with the request's id, the client's connection
    kept, and neither a connection nor a client with one left counted."""

    async def main() -> None:
        errors = record_loop_errors()
        up = await Upstream("v1").start()
        name = f"{__name__}:{codec.__qualname__}"
        async with engine_for(mesh([(up.port, "v1")], codec=name)) as engine:
            client = await Client.connect(address(engine))
            Flaky.failing = True
            reply = await client.call("get", rid=7)
            assert (reply.request_id, error_type(reply)) == (7, "UpstreamConnectFailure")
            client.send(build_frame(ONEWAY, 8, {"method": "log"}))
            await until(
                lambda: engine.stats.total("metaprotocol_oneway_total") == 1, "one-way counted"
            )
            assert (
                engine.stats.total("metaprotocol_oneway_total", status="UpstreamConnectFailure")
                == 1
            )
            assert init_errors(engine, codec) == 2
            assert not engine.upstreams and engine.clients_with_upstream == 0
            Flaky.failing = False
            assert error_type(await client.call("get", rid=9)) is None
            assert len(engine.upstreams) == 1
            assert engine.clients_with_upstream == (codec is FlakyDedicated)
            client.close()
        await up.close()
        assert errors == []
        assert len(up.received) == 1

    run(main())


def test_a_stream_whose_upstream_codec_fails_is_refused_with_its_id() -> None:
    async def main() -> None:
        errors = record_loop_errors()
        server = await StreamServer().start()
        text = mesh([(server.port, "v1")], codec=f"{__name__}:Flaky")
        async with engine_for(text) as engine:
            client = await StreamClient.connect(address(engine))
            Flaky.failing = True
            client.frame(STREAM_OPEN, 5, {"method": "chat"})
            (reply,) = await client.until(5, 1)
            assert error_type(reply) == "UpstreamConnectFailure"
            assert init_errors(engine) == 1 and not engine.upstreams
            client.close()
        await server.close()
        assert errors == [] and server.connections == []

    run(main())


def test_no_idle_connection_is_reclaimed_for_a_connection_whose_codec_fails() -> None:
    """A budget of one upstream connection, held idle by a first client: a second client's
    request may take its place (``reclaimed``), but only once the new connection's codec is
    built. Before, the idle connection was closed first and the request failed anyway: while
    the codec failed, every such request cost another client its connection."""
    closed = "metaprotocol_upstream_connections_closed_total"

    async def main() -> None:
        up = await Upstream("v1").start()
        text = mesh(
            [(up.port, "v1")],
            codec=f"{__name__}:FlakyDedicated",
            proxy="limits: {maxUpstreamConnections: 1}\n",
        )
        async with engine_for(text) as engine:
            first = await Client.connect(address(engine))
            assert error_type(await first.call("get")) is None  # its connection, idle now
            second = await Client.connect(address(engine))
            Flaky.failing = True
            reply = await second.call("get", rid=4)
            assert (reply.request_id, error_type(reply)) == (4, "UpstreamConnectFailure")
            assert engine.stats.total(closed, reason="reclaimed") == 0
            assert len(engine.upstreams) == 1  # the first client's, kept
            Flaky.failing = False
            assert error_type(await second.call("get")) is None  # now it takes its place
            assert engine.stats.total(closed, reason="reclaimed") == 1
            first.close()
            second.close()
        await up.close()

    run(main())
