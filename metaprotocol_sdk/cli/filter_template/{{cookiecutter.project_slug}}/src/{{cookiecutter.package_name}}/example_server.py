"""An example upstream that speaks the SDK's example KV protocol and echoes what it receives.

    python -m {{ cookiecutter.package_name }}.example_server --port 9100

It prints ``listening on HOST:PORT`` once bound (``--port 0`` picks a free port), then one
JSON line per request with the key-values it received, so the filter's mark is visible here.
Each response carries the request's key-values back, plus ``served-by``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Sequence

from metaprotocol_sdk import CodecError, MessageType, NeedData
from metaprotocol_sdk.examples.kv import RESPONSE, KVCodec, build_frame

SERVED_BY = "example_server"


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serve one connection until the peer closes it or sends bytes that are not a frame."""
    codec = KVCodec()
    buffer = bytearray()
    try:
        while data := await reader.read(65536):
            buffer += data
            while True:
                try:
                    message = codec.decode(buffer)
                except CodecError:
                    return  # not the example protocol: drop the connection
                if isinstance(message, NeedData):
                    break
                if message.message_type is MessageType.Request:
                    received = message.attributes.to_dict()
                    record = {"request_id": message.request_id, "attributes": received}
                    print(json.dumps(record, ensure_ascii=False), flush=True)
                    echoed = {**received, "served-by": SERVED_BY}
                    writer.write(build_frame(RESPONSE, message.request_id, echoed))
                elif message.message_type is MessageType.Heartbeat:
                    pong = codec.heartbeat_reply(message)
                    if pong is not None:
                        writer.write(pong)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def serve(host: str, port: int) -> asyncio.Server:
    """Start the server; the caller owns it (``server.close()``)."""
    return await asyncio.start_server(handle, host, port)


async def run(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    server = await serve(host, port)
    bound = server.sockets[0].getsockname()
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog=f"python -m {__package__}.example_server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100, help="0 picks a free port")
    args = parser.parse_args(argv)
    try:
        asyncio.run(run(args.host, args.port))
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
