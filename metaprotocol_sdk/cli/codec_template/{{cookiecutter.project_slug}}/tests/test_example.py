"""The example server and client talk to each other (no proxy in between)."""

from __future__ import annotations

import asyncio

{% if cookiecutter.streaming -%}
from {{ cookiecutter.package_name }}.example_client import (
    Reply,
    exchange,
    stream_exchange,
    stream_frames,
)
{% else -%}
from {{ cookiecutter.package_name }}.example_client import Reply, exchange
{% endif -%}
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
{%- if cookiecutter.streaming %}


def test_server_echoes_a_stream_and_closes_its_side() -> None:
    frames = stream_frames(5, {"method": "chat"}, [b"one", b"two"])

    async def scenario() -> list[Reply]:
        server = await serve("127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await stream_exchange("127.0.0.1", port, frames, 5, timeout=5.0)

    replies = asyncio.run(scenario())
    assert [r.metadata.message_type.name for r in replies] == [
        "Stream_Data",
        "Stream_Data",
        "Stream_Data",
        "Stream_Close_One_Way",
    ]
    assert all(r.ok and r.metadata.stream_id == 5 for r in replies)
    assert replies[0].metadata.attributes.to_dict() == {"method": "chat", "served-by": SERVED_BY}
    assert [bytes(r.metadata.body) for r in replies[1:3]] == [b"one", b"two"]
{%- endif %}
