"""Reading the text files users hand us (golden vectors, known failures, captures in hex).

Every problem is a :class:`~metaprotocol_sdk.errors.ConfigError` naming the file and what is
wrong with it: missing or unreadable, a directory, larger than a bound, binary, not UTF-8, not
valid YAML, or nested deeper than a bound. Reading is linear in the file's size and never reads
more than the bound (plus one byte), so a huge or endless file (``/dev/zero``) costs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

#: Largest file read by default (golden vectors and similar files are kilobytes).
MAX_TEXT_BYTES = 16 * 1024 * 1024
#: Deepest nesting of YAML collections accepted. PyYAML builds documents recursively, so a
#: few thousand nested ``[`` would otherwise end in a ``RecursionError``.
MAX_YAML_DEPTH = 64


def read_bytes(path: str | os.PathLike[str], *, max_bytes: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of ``path``, at most ``max_bytes`` of them (more is an error)."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as file:
            data = file.read(max_bytes + 1)
    except IsADirectoryError:
        raise ConfigError("is a directory, not a file", source=source) from None
    except FileNotFoundError:
        raise ConfigError("no such file", source=source) from None
    except PermissionError:
        raise ConfigError("cannot be read: permission denied", source=source) from None
    except OSError as exc:
        raise ConfigError(f"cannot be read: {exc.strerror or exc}", source=source) from None
    if len(data) > max_bytes:
        raise ConfigError(f"larger than the limit of {max_bytes} bytes", source=source)
    return data


def decode_text(data: bytes, *, source: str) -> str:
    """``data`` as UTF-8 text; binary data or another encoding is an error with its offset."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise ConfigError(f"binary data (a NUL byte at offset {nul}), not text", source=source)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = data[exc.start]
        raise ConfigError(
            f"not UTF-8 text (byte 0x{byte:02x} at offset {exc.start}); save it as UTF-8",
            source=source,
        ) from None


def read_text(path: str | os.PathLike[str], *, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of ``path`` (see :func:`read_bytes` and :func:`decode_text`)."""
    return decode_text(read_bytes(path, max_bytes=max_bytes), source=os.fspath(path))


def check_yaml_depth(text: str, *, source: str, max_depth: int = MAX_YAML_DEPTH) -> None:
    """Refuse YAML nested deeper than ``max_depth`` before it is composed.

    PyYAML's parser is iterative (only its composer recurses), so walking the events is
    linear and safe on any input.
    """
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > max_depth:
                    line = event.start_mark.line + 1 if event.start_mark else 0
                    raise ConfigError(
                        f"nested deeper than {max_depth} levels (line {line})", source=source
                    )
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {_one_line(exc)}", source=source) from None


def load_yaml(text: str, *, source: str, max_depth: int = MAX_YAML_DEPTH) -> Any:
    """One YAML document from ``text`` (``None`` when empty), nesting bounded."""
    check_yaml_depth(text, source=source, max_depth=max_depth)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {_one_line(exc)}", source=source) from None


def load_yaml_file(path: str | Path, *, max_bytes: int = MAX_TEXT_BYTES) -> Any:
    """One YAML document from the file ``path`` (see :func:`read_text` and :func:`load_yaml`)."""
    return load_yaml(read_text(path, max_bytes=max_bytes), source=os.fspath(path))


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def parse_hex_text(text: str) -> bytes:
    """Bytes from hex text: whitespace and a ``0x`` before any token are ignored.

    Raises :class:`ValueError` saying what is wrong: the first character that is not a hex
    digit (with its position in ``text``), or an odd number of digits.
    """
    tokens = text.split()
    joined = "".join(t[2:] if t[:2] in ("0x", "0X") else t for t in tokens)
    try:
        if len(joined) % 2 == 0:
            return bytes.fromhex(joined)
    except ValueError:
        pass
    # Slow path, only for bad input: find the first offending character for the message.
    position = 0
    for token in tokens:
        start = text.index(token, position)
        position = start + len(token)
        skip = 2 if token[:2] in ("0x", "0X") else 0
        for offset in range(start + skip, position):
            if text[offset] not in _HEX_DIGITS:
                raise ValueError(f"not hex: {text[offset]!r} at character {offset}")
    raise ValueError(
        f"odd number of hex digits ({len(joined)}): every byte is two digits, "
        "so a digit is missing or extra"
    )


def _one_line(exc: yaml.YAMLError) -> str:
    """PyYAML's message without its multi-line source excerpt."""
    if isinstance(exc, yaml.MarkedYAMLError):
        problem = exc.problem or exc.context or "invalid"
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return f"{problem}{where}"
    return " ".join(str(exc).split())
