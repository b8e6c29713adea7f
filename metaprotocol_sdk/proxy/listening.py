"""Listening on sockets the engine did not bind itself (a hot restart's predecessor passed
them): a server per socket, shown to the engine as one."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any


class ServerGroup:
    """Servers on several inherited sockets as one (a bind whose name gave several addresses):
    what the engine does with an ``asyncio.Server``, done to each."""

    def __init__(self, servers: list[asyncio.Server]) -> None:
        self.servers = servers

    @property
    def sockets(self) -> tuple[Any, ...]:
        """Every server's sockets."""
        return tuple(sock for server in self.servers for sock in server.sockets)

    def close(self) -> None:
        """Stop accepting on every socket."""
        for server in self.servers:
            server.close()

    async def wait_closed(self) -> None:
        """Wait for every server to close."""
        for server in self.servers:
            await server.wait_closed()

    def is_serving(self) -> bool:
        """Whether any of the servers accepts."""
        return any(server.is_serving() for server in self.servers)

    async def start_serving(self) -> None:
        """Start accepting on every socket."""
        for server in self.servers:
            await server.start_serving()


async def serve_on(
    sockets: list[socket.socket], make: Callable[[socket.socket], Awaitable[asyncio.Server]]
) -> asyncio.Server | ServerGroup:
    """A server for each of ``sockets`` (made by ``make``), as one; on failure none stays."""
    servers: list[asyncio.Server] = []
    try:
        for sock in sockets:
            servers.append(await make(sock))
    except BaseException:
        for server in servers:
            server.close()
        raise
    return servers[0] if len(servers) == 1 else ServerGroup(servers)
