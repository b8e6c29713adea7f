"""The admin endpoint: a tiny HTTP/1.1 server (GET only) for readiness, config and stats.

* ``/ready``: ``200 LIVE`` while serving, ``503 DRAINING`` during shutdown.
* ``/config_dump``: the configuration and the runtime built from it, as JSON.
* ``/stats``: Prometheus text; ``/stats?format=json``: ``{"name{labels}": value}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Engine

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def _response(status: int, body: str, content_type: str = "text/plain; charset=utf-8") -> bytes:
    data = body.encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + data


def handle(engine: Engine, method: str, target: str) -> bytes:
    """The full HTTP response for one request line."""
    if method != "GET":
        return _response(405, "only GET is supported\n")
    path, _, query = target.partition("?")
    if path == "/ready":
        return _response(200, "LIVE\n") if engine.ready else _response(503, "DRAINING\n")
    if path == "/config_dump":
        body = json.dumps(engine.config_dump(), indent=2, default=str)
        return _response(200, body + "\n", "application/json")
    if path == "/stats":
        if "format=json" in query:
            body = json.dumps(engine.stats_snapshot(), indent=2, sort_keys=True)
            return _response(200, body + "\n", "application/json")
        return _response(200, engine.prometheus(), "text/plain; version=0.0.4; charset=utf-8")
    if path == "/":
        return _response(200, "/ready\n/config_dump\n/stats\n/stats?format=json\n")
    return _response(404, f"unknown path {path}\n")


async def start_admin(engine: Engine, host: str, port: int) -> asyncio.Server:
    """Start the admin server."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            while True:  # skip the headers
                header = await asyncio.wait_for(reader.readline(), 5.0)
                if header in (b"\r\n", b"\n", b""):
                    break
            parts = line.decode("latin-1").split()
            if len(parts) < 2:
                writer.write(_response(405, "bad request line\n"))
            else:
                writer.write(handle(engine, parts[0], parts[1]))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    return await asyncio.start_server(serve, host, port)
