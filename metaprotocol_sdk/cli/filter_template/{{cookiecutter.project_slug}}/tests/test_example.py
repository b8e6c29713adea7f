"""The example server and client talk to each other (no proxy in between)."""

from __future__ import annotations

import asyncio

from metaprotocol_sdk import Metadata

from {{ cookiecutter.package_name }}.example_client import call
from {{ cookiecutter.package_name }}.example_server import SERVED_BY, serve


def test_server_echoes_key_values() -> None:
    async def scenario() -> Metadata:
        server = await serve("127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await call("127.0.0.1", port, {"tenant": "blue"})

    reply = asyncio.run(scenario())
    assert reply.response_status.name == "Ok"
    assert reply.attributes.to_dict() == {
        "method": "sayHello",
        "tenant": "blue",
        "served-by": SERVED_BY,
    }
