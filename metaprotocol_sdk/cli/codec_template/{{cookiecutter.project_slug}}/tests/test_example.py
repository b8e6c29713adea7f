"""The example server and client talk to each other (no proxy in between)."""

from __future__ import annotations

import asyncio

from {{ cookiecutter.package_name }}.example_client import Reply, exchange
from {{ cookiecutter.package_name }}.example_server import SERVED_BY, serve
from {{ cookiecutter.package_name }}.protocol import Kind, build_frame


def roundtrip(frames: list[bytes], replies: int, served_by: str = SERVED_BY) -> list[Reply]:
    async def scenario() -> list[Reply]:
        server = await serve("127.0.0.1", 0, served_by)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await exchange("127.0.0.1", port, frames, replies, timeout=5.0)

    return asyncio.run(scenario())


def test_server_echoes_key_values_and_body() -> None:
    frame = build_frame(Kind.REQUEST, 1, {"method": "sayHello", "tenant": "blue"}, b"hi")
    (reply,) = roundtrip([frame], replies=1)
    assert reply.ok
    assert reply.metadata.request_id == 1
    assert reply.metadata.attributes.to_dict() == {
        "method": "sayHello",
        "tenant": "blue",
        "served-by": SERVED_BY,
    }
    assert bytes(reply.metadata.body) == b"hi"


def test_server_name_tells_two_servers_apart() -> None:
    frame = build_frame(Kind.REQUEST, 1, {"method": "sayHello"})
    (reply,) = roundtrip([frame], replies=1, served_by="v2")
    assert reply.metadata.attributes["served-by"] == "v2"
{%- if cookiecutter.heartbeat %}


def test_server_answers_heartbeats() -> None:
    (reply,) = roundtrip([build_frame(Kind.PING, 3)], replies=1)
    assert reply.ok
    assert reply.to_dict()["message_type"] == "Heartbeat"
    assert reply.metadata.request_id == 3
{%- endif %}
