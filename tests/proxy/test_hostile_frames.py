"""Red team: hostile frames of the reference codecs through a whole engine, over real sockets
on 127.0.0.1: each gets the protocol's own error reply with its request id, and what one
frame costs stays within the codec's and the engine's settings."""

from __future__ import annotations

import asyncio
import socket

from metaprotocol_dubbo import DubboCodec
from metaprotocol_dubbo.frames import build_request
from proxy_kit import address, engine_for, mesh, run, until

from metaprotocol_sdk import Metadata
from metaprotocol_sdk.enums import MessageType

DUBBO = {"protocol": "dubbo", "codec": "aeraki.meta_protocol.codec.dubbo"}


class _Sink(asyncio.Protocol):
    """An upstream that reads everything and answers nothing."""


def test_requests_of_many_tiny_string_attachments_are_refused_not_held() -> None:
    """Three 6 MB Dubbo requests of 900 000 empty string attachments each, to an upstream
    that answers nothing: the codec's inline reader built every entry (about 230 MiB of
    objects per request, 0.7 s of the event loop each), past its ``max_hessian_items``; the
    engine counted them, went over its 512 MiB budget (677 MiB) and refused every other
    client for a route timeout. Now each gets Dubbo's BAD_REQUEST with its id."""
    attachments = {f"{i:x}": "" for i in range(900_000)}
    frames = [build_request("a.B", "m", attachments=attachments, request_id=i) for i in (1, 2, 3)]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Sink, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        text = mesh([(port, "v1")], proxy="timeouts: {route: 60s}\n", **DUBBO)
        async with engine_for(text) as engine:
            client = socket.socket()
            client.setblocking(False)
            await loop.sock_connect(client, address(engine))
            peak = 0

            async def send() -> None:
                for frame in frames:
                    await loop.sock_sendall(client, frame)

            sending = loop.create_task(send())
            codec, buffer, replies = DubboCodec(), bytearray(), list[Metadata]()

            async def answered() -> bool:
                nonlocal peak
                peak = max(peak, engine.buffered)
                data = await asyncio.wait_for(loop.sock_recv(client, 1 << 20), 10)
                assert data, "closed before the replies"
                buffer.extend(data)
                while isinstance(reply := codec.decode(buffer), Metadata):
                    replies.append(reply)
                return len(replies) == 3

            await until(answered, "the three replies", 30)
            await sending
            assert [r.request_id for r in replies] == [1, 2, 3]
            for reply in replies:
                assert reply.message_type is MessageType.Error
                assert reply.values["status"] == 40  # BAD_REQUEST
                assert "max_items=65536" in reply.values["error_message"]
            assert engine.pending == 0 and not engine.overloaded()
            assert peak < 64 << 20, f"{peak} bytes counted"
            client.close()
        server.close()
        await server.wait_closed()

    run(main(), timeout=60)
