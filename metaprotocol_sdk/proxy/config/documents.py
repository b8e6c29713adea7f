"""Configuration files to YAML documents, with every cost bounded before it is paid.

A file is read up to :data:`MAX_CONFIG_BYTES` (more is refused without reading it), must be
UTF-8 text, and is composed by a loader that refuses nesting deeper than
:data:`MAX_CONFIG_DEPTH` (PyYAML's composer recurses: 5000 nested ``[`` would end in a
``RecursionError``), recursive aliases, and aliases that would expand the file by more than
:data:`MAX_ALIAS_NODES` nodes (a 1 KB "billion laughs" expands to billions). PyYAML keeps an
alias as a shared reference, so loading is cheap; the bound protects everything that walks the
result later (validation, codec options, ``/config_dump``). Every problem is a
:class:`~metaprotocol_sdk.errors.ConfigError` naming the file.
"""

from __future__ import annotations

import os
from typing import Any

import yaml
from yaml.constructor import ConstructorError

from metaprotocol_sdk.errors import ConfigError
from metaprotocol_sdk.textfiles import decode_text, read_bytes

#: Largest configuration file (a mesh's resources are kilobytes; Kubernetes caps an object
#: at about 1.5 MiB in etcd).
MAX_CONFIG_BYTES = 4 * 1024 * 1024
#: Deepest nesting of YAML collections (the resources themselves need about 8).
MAX_CONFIG_DEPTH = 64
#: Nodes that aliases may add to a document when expanded (anchors used for sharing a few
#: labels or policies add dozens).
MAX_ALIAS_NODES = 100_000


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, counting depth and expanded size while it composes."""

    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self.source = source
        self._depth = 0
        self._real = 0  # nodes composed so far in this document (aliases excluded)
        self._sizes: dict[int, int] = {}  # id(node) -> its size with aliases expanded

    def _fail(self, reason: str, mark: Any) -> ConfigError:
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return ConfigError(f"{reason}{where}", source=self.source)

    def compose_document(self) -> yaml.Node | None:
        self._real = 0
        self._sizes = {}
        return super().compose_document()

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor or "")
            if target is not None and id(target) not in self._sizes:  # still being composed
                raise self._fail(
                    f"recursive alias *{event.anchor}: a node cannot contain itself",
                    event.start_mark,
                )
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_CONFIG_DEPTH:
            raise self._fail(f"nested deeper than {MAX_CONFIG_DEPTH} levels", event.start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        assert node is not None
        self._real += 1
        sizes = self._sizes
        size = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                size += sizes[id(child)]
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                size += sizes[id(key)] + sizes[id(value)]
        sizes[id(node)] = size
        # size - (real nodes inside it) <= what aliases add to the whole document, and the
        # real nodes inside it are at most those composed so far: never refuses a valid file.
        if size > self._real + MAX_ALIAS_NODES:
            raise self._fail(
                f"YAML aliases expand this node to {size} nodes, more than {MAX_ALIAS_NODES} "
                "beyond the file's own: write the values out or share less",
                node.start_mark,
            )
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:  # e.g. 2001-13-01, a 5000-digit integer
            raise ConstructorError(
                None,
                None,
                f"cannot read this {node.tag.rsplit(':', 1)[-1]}: {exc}",
                node.start_mark,
            ) from None


def parse_documents(text: str, source: str) -> list[Any]:
    """Every YAML document of ``text`` (``None`` for an empty one), within the bounds above."""
    if len(text) > MAX_CONFIG_BYTES:  # characters: a cheap bound, never below the bytes'
        raise ConfigError(f"larger than the limit of {MAX_CONFIG_BYTES} bytes", source=source)
    loader = _BoundedLoader(text, source)
    try:
        bodies = []
        while loader.check_data():  # type: ignore[no-untyped-call]
            bodies.append(loader.get_data())
        return bodies
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError(f"invalid YAML{where}: {problem}", source=source) from None
    except RecursionError:  # a last resort: the depth bound keeps far below the limit
        raise ConfigError("nested too deeply", source=source) from None
    finally:
        loader.dispose()


def read_documents(path: str | os.PathLike[str]) -> list[Any]:
    """The YAML documents of the file ``path``: read, decoded and parsed within bounds."""
    source = os.fspath(path)
    return parse_documents(
        decode_text(read_bytes(source, max_bytes=MAX_CONFIG_BYTES), source=source), source
    )
