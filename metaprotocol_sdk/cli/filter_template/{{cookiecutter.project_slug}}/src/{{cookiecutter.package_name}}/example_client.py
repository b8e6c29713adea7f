"""An example client of the SDK's example KV protocol: sends one request, prints the reply.

    python -m {{ cookiecutter.package_name }}.example_client --header tenant=blue

It connects to port 9000 unless told otherwise (``--port``) and prints the reply as one JSON
line: ``status`` (``Ok``, or ``Error`` for an error reply, with the engine's ``error-type``
and ``error-message`` among the ``attributes``). The exit status is 0 for a successful
response, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping, Sequence

from metaprotocol_sdk import Metadata, NeedData
from metaprotocol_sdk.examples.kv import REQUEST, KVCodec, build_frame


async def call(host: str, port: int, headers: Mapping[str, str], timeout: float = 5.0) -> Metadata:
    """Send one ``sayHello`` request with ``headers`` and return the decoded reply."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(build_frame(REQUEST, 1, {"method": "sayHello", **headers}))
        codec = KVCodec()
        buffer = bytearray()
        async with asyncio.timeout(timeout):
            while True:
                reply = codec.decode(buffer)
                if not isinstance(reply, NeedData):
                    return reply
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("the connection closed before a reply")
                buffer += data
    finally:
        writer.close()


def _header(pair: str) -> tuple[str, str]:
    key, sep, value = pair.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {pair!r}")
    return key, value


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog=f"python -m {__package__}.example_client")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--header", type=_header, action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        reply = asyncio.run(call(args.host, args.port, dict(args.header)))
    except ConnectionRefusedError:
        where = f"{args.host}:{args.port}"
        print(f"error: nothing listens on {where}: start the engine first", file=sys.stderr)
        return 1
    except (OSError, TimeoutError) as exc:
        print(f"error: {args.host}:{args.port}: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    status = reply.response_status.name
    record = {"request_id": reply.request_id, "status": status}
    print(json.dumps({**record, "attributes": reply.attributes.to_dict()}, ensure_ascii=False))
    return 0 if status == "Ok" else 1


if __name__ == "__main__":
    sys.exit(main())
