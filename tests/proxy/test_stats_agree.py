"""Red team: what the stats and the access log say of a request is what its client saw, over
real sockets on 127.0.0.1, including when a limit ends the client's connection."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

from proxy_kit import REQUEST, Upstream, address, build_frame, engine_for, mesh, run, until

from metaprotocol_sdk.proxy import Engine

MiB = 1024 * 1024


def _requests(engine: Engine, status: str) -> int:
    return engine.stats.total("metaprotocol_requests_total", status=status)


def test_a_reply_dropped_by_closing_its_client_is_not_counted_as_delivered(tmp_path: Path) -> None:
    """A reply that would take a client that reads nothing past ``connectionBufferMaxBytes``
    resets the client instead of being queued: it was counted with the upstream's status
    (``Ok``) and logged with its size as sent, though it was never written, while the
    connection's other requests counted as ``DownstreamClosed``. Now it is one of them."""
    log = tmp_path / "access.log"
    proxy = (
        "limits: {connectionBufferBytes: 65536, connectionBufferMaxBytes: 1048576}\n"
        f"accessLog: {{path: {log}}}\n"
    )

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")], proxy=proxy)) as engine:
            deaf = socket.socket()
            deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            deaf.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(deaf, address(engine))
            # The first reply (6 MiB) fills the kernel's buffers and leaves the client behind;
            # the second (held by the upstream until then) cannot fit and closes the client.
            first = build_frame(REQUEST, 1, {"method": "big", "size": str(6 * MiB)})
            second = build_frame(REQUEST, 2, {"method": "slow"}, b"x" * (2 * MiB))
            await loop.sock_sendall(deaf, first + second)
            await up.wait_received(2)
            await until(
                lambda: any(d.write_paused for d in engine.downstreams), "the client behind"
            )
            up.release.set()
            closed = "metaprotocol_downstream_connections_closed_total"
            await until(lambda: engine.stats.total(closed, reason="write_overflow"), "the reset")
            await until(lambda: engine.pending == 0, "both requests settled")
            # The first reply was queued for the client (Envoy counts a response when it
            # starts to send it); the second never was.
            assert _requests(engine, "Ok") == 1
            assert _requests(engine, "DownstreamClosed") == 1
            deaf.close()
            engine.access_log.flush()  # type: ignore[union-attr]
        await up.close()
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        by_id = {line["request_id"]: line for line in lines}
        assert by_id[1]["status"] == "Ok"
        assert by_id[2]["status"] == "DownstreamClosed" and by_id[2]["bytes_sent"] == 0

    run(main())
