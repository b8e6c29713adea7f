"""``metaprotocol decode``: the "tshark for codecs"."""

from __future__ import annotations

import json
import sys

import click

from metaprotocol_sdk.codec import Codec, NeedData
from metaprotocol_sdk.errors import CodecError, ConfigError, RegistryError
from metaprotocol_sdk.metadata import Metadata
from metaprotocol_sdk.registry import create_codec
from metaprotocol_sdk.textfiles import decode_text, parse_hex_text, read_bytes

from ._options import codec_option, codec_options
from ._output import codec_bug, fail, table

#: Largest input read (a capture of many messages is still far below this).
MAX_INPUT_BYTES = 64 * 1024 * 1024


def read_input(source: str, as_hex: bool) -> bytes:
    """The bytes to decode from the file ``source`` (``-``: stdin), bounded in size."""
    if source == "-":
        data = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
        if len(data) > MAX_INPUT_BYTES:
            raise ConfigError(f"larger than the limit of {MAX_INPUT_BYTES} bytes", source="stdin")
    else:
        data = read_bytes(source, max_bytes=MAX_INPUT_BYTES)
    name = "stdin" if source == "-" else source
    if not (data.strip() if as_hex else data):
        raise ConfigError("empty input: nothing to decode", source=name)
    if not as_hex:
        return data
    try:
        return parse_hex_text(decode_text(data, source=name))
    except ValueError as exc:
        raise ConfigError(f"not valid hex: {exc}", source=name) from None


def decode_stream(codec: Codec, data: bytes) -> tuple[list[tuple[int, Metadata]], int]:
    """Decode every message in ``data``; returns (offset, metadata) pairs and leftover bytes.

    Raises :class:`CodecError` with the offset made absolute within ``data``.
    """
    buffer = bytearray(data)
    messages: list[tuple[int, Metadata]] = []
    position = 0
    while buffer:
        try:
            result = codec.decode(buffer)
        except CodecError as exc:
            exc.offset = position + (exc.offset or 0)
            exc.args = (f"{exc.reason} at byte {exc.offset} (message {len(messages) + 1})",)
            raise
        if isinstance(result, NeedData):
            break
        messages.append((position, result))
        position += result.size
    return messages, len(buffer)


@click.command("decode")
@click.argument("codec_name", metavar="CODEC")
@click.argument("source", metavar="[FILE]", default="-")
@click.option("--hex", "as_hex", is_flag=True, help="Input is hex text (whitespace ignored).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message.")
@codec_option
def command(
    codec_name: str,
    source: str,
    as_hex: bool,
    as_json: bool,
    option_pairs: tuple[str, ...],
) -> None:
    """Decode messages of one direction from FILE (or stdin) with CODEC and print metadata.

    CODEC is an installed codec's name or alias (see `metaprotocol codecs`) or a
    `module:Class` reference. Exits non-zero on malformed input or a truncated last message.
    """
    try:
        codec = create_codec(codec_name, codec_options(option_pairs))
        data = read_input(source, as_hex)
    except (RegistryError, ConfigError) as exc:
        fail(exc, 2)
    except Exception as exc:  # its constructor failed
        codec_bug(codec_name, "building it", exc, 2, "its own code failed, not the SDK")
    error: CodecError | None = None
    try:
        messages, leftover = decode_stream(codec, data)
    except CodecError as exc:
        error = exc
        messages, leftover = [], 0
    except Exception as exc:  # the contract allows decode only CodecError
        codec_bug(
            codec_name, "decode", exc, 1, "a bug in the codec: decode may raise only CodecError"
        )
    _print(messages, as_json)
    if error is not None:
        hint = ""
        if not as_hex and not messages and _looks_like_hex(data):
            hint = " (the input looks like hex text: pass --hex)"
        fail(f"malformed input: {error}{hint}")
    if leftover:
        fail(
            f"incomplete message: {leftover} trailing bytes at offset {len(data) - leftover} "
            "do not form a complete message"
        )
    if not messages:
        fail("no messages in input")


def _looks_like_hex(data: bytes) -> bool:
    """True when raw input is only hex digits and whitespace (a capture saved as hex text)."""
    text = data[:4096].translate(None, b" \t\r\n")
    return bool(text) and not text.translate(None, b"0123456789abcdefABCDEF")


def _print(messages: list[tuple[int, Metadata]], as_json: bool) -> None:
    if as_json:
        for offset, md in messages:
            click.echo(json.dumps({"offset": offset, **md.to_dict()}, ensure_ascii=False))
        return
    # A STREAM column (each frame's stream id, "-" for none) when any message has one.
    streams = any(md.stream_id for _, md in messages)
    rows = [
        [
            n,
            offset,
            md.message_type.name,
            md.request_id,
            *([md.stream_id or "-"] if streams else []),
            md.operation_name or "-",
            md.header_size,
            md.body_size,
            " ".join(f"{k}={v}" for k, v in md.attributes.items()) or "-",
        ]
        for n, (offset, md) in enumerate(messages, 1)
    ]
    if rows:
        headers = ["#", "OFFSET", "TYPE", "ID", *(["STREAM"] if streams else [])]
        headers += ["OPERATION", "HDR", "BODY", "ATTRIBUTES"]
        click.echo(table(headers, rows))
    sys.stdout.flush()
