"""Golden vectors: captured frames with the metadata a codec must decode from them.

File format (YAML)::

    codec: dubbo
    options: {}            # codec options for every vector (a vector may add its own)
    vectors:
      - name: consumer sayHello
        source: where the bytes come from (client library and version)
        hex: "dabbc2..."   # exactly one message; whitespace ignored
        options: {}        # optional, merged over the file's options
        expect:            # every key optional; attributes is a subset match
          message_type: Request
          request_id: 1
          operation_name: sayHello
          attributes: {interface: com.example.DemoService}
      - name: bad magic
        hex: "0000..."
        expect: {error: FramingError}   # a bad-input vector: decode must raise this

``expect`` keys: ``message_type``, ``response_status``, ``stream_type`` (enum names),
``request_id``, ``stream_id``, ``header_size``, ``body_size``, ``size`` (integers),
``operation_name`` (string), ``attributes`` (subset match, case-insensitive keys),
``drain_notice`` (true for the peer's drain notice, :meth:`Codec.is_drain_notice`; a message
without it must not be one) and ``error`` (a :class:`~metaprotocol_sdk.errors.CodecError`
class name).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaprotocol_sdk.enums import MessageType, ResponseStatus, StreamType
from metaprotocol_sdk.errors import ConfigError
from metaprotocol_sdk.metadata import Metadata
from metaprotocol_sdk.textfiles import load_yaml, parse_hex_text, read_text

_ENUMS: dict[str, Any] = {
    "message_type": MessageType,
    "response_status": ResponseStatus,
    "stream_type": StreamType,
}
_INTS = ("request_id", "stream_id", "header_size", "body_size", "size")
EXPECT_KEYS = frozenset({*_ENUMS, *_INTS, "operation_name", "attributes", "drain_notice", "error"})


@dataclass(frozen=True)
class Sample:
    """One message the kit drives a codec with: a golden vector or a generated message.

    ``expect`` uses the golden ``expect`` keys; ``options`` are codec options for this message.
    """

    frame: bytes
    expect: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""
    source: str = ""
    #: The golden file the vector was read from ("" for a generated message).
    file: str = ""

    @property
    def is_bad_input(self) -> bool:
        """True for vectors that expect a decode error rather than a message."""
        return "error" in self.expect

    @property
    def label(self) -> str:
        """How failure messages name this sample."""
        return f"golden vector {self.name!r}" if self.name else "generated message"


@dataclass(frozen=True)
class GoldenFile:
    """A parsed golden-vector file."""

    codec: str
    options: Mapping[str, Any]
    vectors: tuple[Sample, ...]
    path: str = ""


def _parse_hex(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise ConfigError("hex must be a string", source=where, field="hex")
    try:
        return parse_hex_text(text)
    except ValueError as exc:
        raise ConfigError(f"not valid hex: {exc}", source=where, field="hex") from None


def parse_golden(document: Any, *, source: str = "<golden>") -> GoldenFile:
    """Validate a loaded YAML document and return its vectors."""
    if not isinstance(document, Mapping):
        raise ConfigError(
            "a golden file is a mapping with codec, options and vectors", source=source
        )
    unknown = set(document) - {"codec", "options", "vectors"}
    if unknown:
        raise ConfigError(f"unknown keys {sorted(unknown)}", source=source)
    options = document.get("options") or {}
    if not isinstance(options, Mapping):
        raise ConfigError("options must be a mapping", source=source, field="options")
    raw_vectors = document.get("vectors") or []
    if not isinstance(raw_vectors, list):
        raise ConfigError("vectors must be a list", source=source, field="vectors")
    vectors = []
    for index, raw in enumerate(raw_vectors):
        where = f"{source}: vectors[{index}]"
        if not isinstance(raw, Mapping):
            raise ConfigError("a vector is a mapping", source=where)
        bad = set(raw) - {"name", "source", "hex", "expect", "options"}
        if bad:
            raise ConfigError(f"unknown keys {sorted(bad)}", source=where)
        if "hex" not in raw:
            raise ConfigError("missing", source=where, field="hex")
        expect = raw.get("expect") or {}
        if not isinstance(expect, Mapping):
            raise ConfigError("expect must be a mapping", source=where, field="expect")
        bad = set(expect) - EXPECT_KEYS
        if bad:
            raise ConfigError(
                f"unknown keys {sorted(bad)}; known: {sorted(EXPECT_KEYS)}",
                source=where,
                field="expect",
            )
        for key, enum in _ENUMS.items():
            if key in expect and expect[key] not in enum.__members__:
                raise ConfigError(
                    f"{expect[key]!r} is not one of {list(enum.__members__)}",
                    source=where,
                    field=f"expect.{key}",
                )
        if not isinstance(expect.get("drain_notice", False), bool):
            raise ConfigError(
                f"must be true or false, got {expect['drain_notice']!r}",
                source=where,
                field="expect.drain_notice",
            )
        vector_options = raw.get("options") or {}
        vectors.append(
            Sample(
                frame=_parse_hex(raw["hex"], where),
                expect=dict(expect),
                options={**options, **vector_options},
                name=str(raw.get("name") or f"vector {index}"),
                source=str(raw.get("source") or ""),
                file=source,
            )
        )
    return GoldenFile(
        codec=str(document.get("codec") or ""),
        options=dict(options),
        vectors=tuple(vectors),
        path=source,
    )


def load_golden(path: str | Path) -> GoldenFile:
    """Load and validate a golden-vector YAML file (size, encoding and nesting bounded)."""
    return load_golden_text(read_text(path), source=str(path))


def load_golden_text(text: str, *, source: str = "<golden>") -> GoldenFile:
    """Load and validate golden vectors from YAML text."""
    return parse_golden(load_yaml(text, source=source), source=source)


def mismatches(metadata: Metadata, expect: Mapping[str, Any]) -> list[str]:
    """Every way ``metadata`` differs from ``expect`` (empty when it matches)."""
    problems = []
    for key, enum in _ENUMS.items():
        if key in expect:
            actual = getattr(metadata, key)
            if actual != enum[expect[key]]:
                problems.append(f"{key}: expected {expect[key]}, got {actual.name}")
    for key in _INTS:
        if key in expect:
            actual = getattr(metadata, key)
            if actual != expect[key]:
                problems.append(f"{key}: expected {expect[key]!r}, got {actual!r}")
    if "operation_name" in expect and metadata.operation_name != expect["operation_name"]:
        problems.append(
            f"operation_name: expected {expect['operation_name']!r}, "
            f"got {metadata.operation_name!r}"
        )
    for key, value in (expect.get("attributes") or {}).items():
        actual_value = metadata.attributes.get(str(key))
        if actual_value != str(value):
            problems.append(f"attributes[{key!r}]: expected {str(value)!r}, got {actual_value!r}")
    return problems
