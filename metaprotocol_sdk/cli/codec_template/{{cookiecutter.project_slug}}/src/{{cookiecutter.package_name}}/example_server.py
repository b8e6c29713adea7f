"""Example {{ cookiecutter.protocol_name }} server (asyncio) that echoes what it receives.

    python -m {{ cookiecutter.package_name }}.example_server --port 9100

It prints ``listening on HOST:PORT`` once bound (``--port 0`` picks a free port), then one
JSON line per request with the key-values it received, so a proxy's mutation is visible here.
Each response carries the request's key-values back, plus ``served-by`` (``--name``, to tell
two servers apart behind the proxy), and echoes the body.
{%- if cookiecutter.streaming %}

On a stream it echoes each STREAM_OPEN and STREAM_DATA frame as a STREAM_DATA frame (the
key-values plus ``served-by``, and the body), and answers the client's STREAM_HALF_CLOSE with
its own, which ends the stream.
{%- endif %}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import signal
import sys
from collections.abc import Sequence

from metaprotocol_sdk import (
    CodecError,
    ErrorType,
    LocalError,
    MessageType,
    Metadata,
    NeedData,
)

from .codec import {{ cookiecutter.__codec_class }}
from .protocol import Kind, build_frame

SERVED_BY = "example_server"


def respond(
    codec: {{ cookiecutter.__codec_class }},
    message: Metadata,
    served_by: str = SERVED_BY,
) -> bytes | None:
    """The reply to one decoded message (``None``: no reply)."""
    if message.message_type is MessageType.Request:
        pairs = {**message.attributes.to_dict(), "served-by": served_by}
        return build_frame(Kind.RESPONSE, message.request_id, pairs, bytes(message.body))
{%- if cookiecutter.heartbeat %}
    if message.message_type is MessageType.Heartbeat:
        return codec.heartbeat_reply(message)
{%- endif %}
{%- if cookiecutter.streaming %}
    if message.message_type in (MessageType.Stream_Init, MessageType.Stream_Data):
        pairs = {**message.attributes.to_dict(), "served-by": served_by}
        return build_frame(Kind.STREAM_DATA, message.stream_id, pairs, bytes(message.body))
    if message.message_type is MessageType.Stream_Close_One_Way:
        # The client sends no more on the stream: this side ends too, so the stream is over.
        return build_frame(Kind.STREAM_HALF_CLOSE, message.stream_id)
{%- endif %}
    return None


async def handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, served_by: str = SERVED_BY
) -> None:
    """Serve one connection until the peer closes it or sends bytes that are not a frame."""
    codec = {{ cookiecutter.__codec_class }}()
    buffer = bytearray()
    try:
        while data := await reader.read(65536):
            buffer += data
            while True:
                try:
                    message = codec.decode(buffer)
                except CodecError as exc:
                    if exc.metadata is not None:
                        error = LocalError(ErrorType.BadRequest, str(exc))
                        writer.write(codec.on_error(exc.metadata, error))
                    await writer.drain()
                    return
                if isinstance(message, NeedData):
                    break
                if message.message_type.is_request_side:
                    record = {
                        "request_id": message.request_id,
                        "message_type": message.message_type.name,
                        "method": message.operation_name,
                        "attributes": message.attributes.to_dict(),
                    }
                    print(json.dumps(record, ensure_ascii=False), flush=True)
                reply = respond(codec, message, served_by)
                if reply is not None:
                    writer.write(reply)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def serve(host: str, port: int, served_by: str = SERVED_BY) -> asyncio.Server:
    """Start the server; the caller owns it (``server.close()``)."""
    return await asyncio.start_server(functools.partial(handle, served_by=served_by), host, port)


async def run(host: str, port: int, served_by: str = SERVED_BY) -> None:
    """Serve until SIGTERM or SIGINT."""
    server = await serve(host, port, served_by)
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
    parser.add_argument(
        "--name",
        default=SERVED_BY,
        help="the served-by key-value of its replies (tell two servers apart, say v1 and v2)",
    )
    args = parser.parse_args(argv)
    try:
        asyncio.run(run(args.host, args.port, args.name))
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
