"""Example {{ cookiecutter.protocol_name }} client (asyncio): sends requests, prints replies.

    python -m {{ cookiecutter.package_name }}.example_client --port 9000 --header a=b
    python -m {{ cookiecutter.package_name }}.example_client --golden  # golden vectors
{%- if cookiecutter.streaming %}
    python -m {{ cookiecutter.package_name }}.example_client --port 9000 --stream --count 2
{%- endif %}

Each reply is printed as one JSON line (request id, message type, key-values, body). The
exit status is 0 when every request got a successful response, 1 otherwise.
{%- if cookiecutter.streaming %}

``--stream`` opens stream 1 instead (a STREAM_OPEN with the method and headers), sends
``--count`` STREAM_DATA frames with the body and a STREAM_HALF_CLOSE, and prints every frame
it gets until the stream ends: exit status 0 when the server closed its side too, 1 when the
stream ended with an ERROR.
{%- endif %}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
{%- if cookiecutter.streaming %}
from collections.abc import Iterable, Mapping, Sequence
{%- else %}
from collections.abc import Mapping, Sequence
{%- endif %}
from dataclasses import dataclass, field
from typing import Any

import yaml
from metaprotocol_sdk import CodecError, MessageType, Metadata, NeedData, ResponseStatus

from .codec import {{ cookiecutter.__codec_class }}
from .protocol import MAGIC, Kind, build_frame

PROTOCOL = "{{ cookiecutter.protocol_name }}"
{%- if cookiecutter.streaming %}
#: Message type names (as golden ``expect`` spells them) of the stream frames.
STREAM_TYPES = {
    Kind.STREAM_OPEN: "Stream_Init",
    Kind.STREAM_DATA: "Stream_Data",
    Kind.STREAM_HALF_CLOSE: "Stream_Close_One_Way",
    Kind.STREAM_CLOSE: "Stream_Close_Two_Way",
}
{%- endif %}
GOLDEN_HEADER = """\
# Golden vectors: real frames and the metadata the codec must decode from each of them.
# These are the example client's frames (`python -m <package>.example_client --golden`);
# replace them with frames captured from real peers of your protocol.
"""


@dataclass(frozen=True)
class Example:
    """One frame this client sends, and what a codec must decode from it."""

    name: str
    frame: bytes
    expect: Mapping[str, Any] = field(default_factory=dict)


def request(
    request_id: int,
    method: str,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    *,
    kind: Kind = Kind.REQUEST,
) -> Example:
    """A request frame and the metadata it must decode to."""
    pairs = {"method": method, **(headers or {})}
    message_type = "Request"
{%- if cookiecutter.oneway %}
    if kind == Kind.ONEWAY:
        message_type = "Oneway"
{%- endif %}
    return Example(
        name=f"{message_type.lower()} {method}",
        frame=build_frame(kind, request_id, pairs, body),
        expect={
            "message_type": message_type,
            "request_id": request_id,
            "operation_name": method,
            "body_size": len(body),
            "attributes": pairs,
        },
    )


{% if cookiecutter.streaming -%}
def stream_frame(
    kind: Kind, stream_id: int, pairs: Mapping[str, str] | None = None, body: bytes = b""
) -> Example:
    """A frame of a stream (its id field is the stream id) and the metadata it must decode to."""
    pairs = dict(pairs or {})
    return Example(
        name=f"{kind.name.lower().replace('_', ' ')} {pairs.get('method', '')}".rstrip(),
        frame=build_frame(kind, stream_id, pairs, body),
        expect={
            "message_type": STREAM_TYPES[kind],
            "request_id": stream_id,
            "stream_id": stream_id,
            "stream_type": "BidiStream",
            "operation_name": pairs.get("method", ""),
            "body_size": len(body),
            "attributes": pairs,
        },
    )


def stream_frames(stream_id: int, pairs: Mapping[str, str], bodies: Iterable[bytes]) -> list[bytes]:
    """What a client sends on a stream: the open (routed by ``pairs``), a data frame for each
    of ``bodies``, and its half-close."""
    frames = [build_frame(Kind.STREAM_OPEN, stream_id, pairs)]
    frames += [build_frame(Kind.STREAM_DATA, stream_id, {}, body) for body in bodies]
    frames.append(build_frame(Kind.STREAM_HALF_CLOSE, stream_id))
    return frames


{% endif -%}
def examples() -> list[Example]:
    """The frames of the golden vectors: what this client sends, one of each kind."""
    found = [
        request(1, "sayHello", {"tenant": "blue"}, b"hello"),
        request(2, "getUser", {"user": "Zoë", "trace-id": "4bf92f35"}, b'{"id": 7}'),
        Example(
            name="request without key-values",
            frame=build_frame(Kind.REQUEST, 3),
            expect={"message_type": "Request", "request_id": 3, "operation_name": ""},
        ),
{%- if cookiecutter.oneway %}
        request(4, "notify", {"event": "login"}, b"", kind=Kind.ONEWAY),
{%- endif %}
{%- if cookiecutter.heartbeat %}
        Example(
            name="heartbeat ping",
            frame=build_frame(Kind.PING, 5),
            expect={"message_type": "Heartbeat", "request_id": 5},
        ),
{%- endif %}
{%- if cookiecutter.streaming %}
        stream_frame(Kind.STREAM_OPEN, 6, {"method": "chat", "tenant": "blue"}),
        stream_frame(Kind.STREAM_DATA, 6, body=b"tick"),
        stream_frame(Kind.STREAM_HALF_CLOSE, 6),
        stream_frame(Kind.STREAM_CLOSE, 6),
{%- endif %}
    ]
    first = found[0].frame
    found.append(
        Example(
            name="bad magic",
            frame=bytes(b ^ 0xFF for b in MAGIC) + first[len(MAGIC) :],
            expect={"error": "FramingError"},
        )
    )
    return found


def golden_document() -> str:
    """The golden-vector YAML for :func:`examples` (what ``--golden`` prints)."""
    document = {
        "codec": PROTOCOL,
        "options": {},
        "vectors": [
            {"name": e.name, "source": "example_client", "hex": e.frame.hex(), "expect": e.expect}
            for e in examples()
        ],
    }
    text: str = yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)
    return GOLDEN_HEADER + text


@dataclass
class Reply:
    """A decoded reply, as printed."""

    metadata: Metadata

    @property
    def ok(self) -> bool:
{%- if cookiecutter.streaming %}
        """True for a successful response, a heartbeat reply or a stream frame."""
        md = self.metadata
        return (
            md.message_type is MessageType.Heartbeat
            or md.stream_id != 0  # an ERROR is no stream frame (its stream id is 0)
            or (md.message_type is MessageType.Response and md.response_status is ResponseStatus.Ok)
        )
{%- else %}
        """True for a successful response or a heartbeat reply."""
        md = self.metadata
        return md.message_type is MessageType.Heartbeat or (
            md.message_type is MessageType.Response and md.response_status is ResponseStatus.Ok
        )
{%- endif %}

    def to_dict(self) -> dict[str, Any]:
        """What the client prints."""
        md = self.metadata
        return {
            "request_id": md.request_id,
{%- if cookiecutter.streaming %}
            "stream_id": md.stream_id,
{%- endif %}
            "message_type": md.message_type.name,
            "status": md.response_status.name,
            "attributes": md.attributes.to_dict(),
            "body": bytes(md.body).decode("utf-8", "replace"),
        }


async def connect(
    host: str, port: int, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection, or raise ``TimeoutError`` saying where after ``timeout`` s."""
    try:
        return await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError:
        raise TimeoutError(f"no connection to {host}:{port} within {timeout:g} s") from None
    except ConnectionRefusedError:
        raise ConnectionRefusedError(
            f"nothing listens on {host}:{port}: start the engine (or the example server, for"
            " its own port) first"
        ) from None


async def exchange(
    host: str, port: int, frames: Sequence[bytes], replies: int, timeout: float = 5.0
) -> list[Reply]:
    """Send ``frames`` on one connection and wait (at most ``timeout`` s) for ``replies``."""
    reader, writer = await connect(host, port, timeout)
    codec = {{ cookiecutter.__codec_class }}()
    received: list[Reply] = []
    buffer = bytearray()
    try:
        writer.write(b"".join(frames))
        await writer.drain()
        async with asyncio.timeout(timeout):
            while len(received) < replies:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError(
                        f"connection closed after {len(received)} of {replies} replies"
                    )
                buffer += data
                while True:
                    message = codec.decode(buffer)
                    if isinstance(message, NeedData):
                        break
                    received.append(Reply(message))
    except TimeoutError:
        raise TimeoutError(
            f"{len(received)} of {replies} replies from {host}:{port} within {timeout:g} s"
        ) from None
    finally:
        writer.close()
        await writer.wait_closed()
    return received


{% if cookiecutter.streaming -%}
async def stream_exchange(
    host: str, port: int, frames: Sequence[bytes], stream_id: int, timeout: float = 5.0
) -> list[Reply]:
    """Send ``frames`` (a stream's, maybe after a heartbeat) on one connection and wait (at
    most ``timeout`` s) until the stream ends: the server's half-close or close, or an ERROR
    with the stream's id (what the proxy sends when it cannot open or keep the stream)."""
    reader, writer = await connect(host, port, timeout)
    codec = {{ cookiecutter.__codec_class }}()
    received: list[Reply] = []
    buffer = bytearray()
    ends = (MessageType.Stream_Close_One_Way, MessageType.Stream_Close_Two_Way)
    try:
        writer.write(b"".join(frames))
        await writer.drain()
        async with asyncio.timeout(timeout):
            while True:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError(f"connection closed before stream {stream_id} ended")
                buffer += data
                while not isinstance(message := codec.decode(buffer), NeedData):
                    received.append(Reply(message))
                    if (message.stream_id == stream_id and message.message_type in ends) or (
                        message.message_type is MessageType.Error
                        and message.request_id == stream_id
                    ):
                        return received
    except TimeoutError:
        raise TimeoutError(
            f"stream {stream_id} did not end within {timeout:g} s"
            f" ({len(received)} frames from {host}:{port})"
        ) from None
    finally:
        writer.close()
        await writer.wait_closed()


{% endif -%}
def _pairs(values: Sequence[str]) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --header expects KEY=VALUE, got {value!r}")
        pairs[key] = item
    return pairs


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog=f"python -m {__package__}.example_client")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="server or proxy listener port")
    parser.add_argument("--method", default="sayHello")
    parser.add_argument("--header", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--body", default="hello")
    parser.add_argument("--count", type=int, default=1, help="requests to send (ids 1..N)")
{%- if cookiecutter.oneway %}
    parser.add_argument("--oneway", action="store_true", help="send one-way requests")
{%- endif %}
{%- if cookiecutter.heartbeat %}
    parser.add_argument("--ping", action="store_true", help="send a heartbeat first")
{%- endif %}
{%- if cookiecutter.streaming %}
    parser.add_argument(
        "--stream",
        action="store_true",
        help="open stream 1 instead: --count data frames, then a half-close",
    )
{%- endif %}
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds")
    parser.add_argument("--golden", action="store_true", help="print golden vectors and exit")
    args = parser.parse_args(argv)
    if args.golden:
        sys.stdout.write(golden_document())
        return 0
    if args.port is None:
        parser.error("--port is required")
    headers = _pairs(args.header)
    kind = Kind.REQUEST
    replies = args.count
{%- if cookiecutter.oneway %}
    if args.oneway:
        kind, replies = Kind.ONEWAY, 0
{%- endif %}
    frames = [
        build_frame(kind, n, {"method": args.method, **headers}, args.body.encode())
        for n in range(1, args.count + 1)
    ]
{%- if cookiecutter.streaming %}
    if args.stream:
        pairs = {"method": args.method, **headers}
        frames = stream_frames(1, pairs, [args.body.encode()] * args.count)
{%- endif %}
{%- if cookiecutter.heartbeat %}
    if args.ping:
        frames.insert(0, build_frame(Kind.PING, 0))
        replies += 1
{%- endif %}
    try:
{%- if cookiecutter.streaming %}
        if args.stream:
            exchanged = stream_exchange(args.host, args.port, frames, 1, args.timeout)
        else:
            exchanged = exchange(args.host, args.port, frames, replies, args.timeout)
        received = asyncio.run(exchanged)
{%- else %}
        received = asyncio.run(exchange(args.host, args.port, frames, replies, args.timeout))
{%- endif %}
    except (OSError, TimeoutError, CodecError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for reply in received:
        print(json.dumps(reply.to_dict(), ensure_ascii=False), flush=True)
    return 0 if all(reply.ok for reply in received) else 1


if __name__ == "__main__":
    sys.exit(main())
