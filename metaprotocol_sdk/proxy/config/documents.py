"""Configuration files to YAML documents, with every cost bounded before it is paid.

A file is read up to :data:`MAX_CONFIG_BYTES` (more is refused without reading it) and must be
UTF-8 text. One pass over its parser events (iterative, no recursion) then refuses nesting
deeper than :data:`MAX_CONFIG_DEPTH` (PyYAML's composer recurses: 5000 nested ``[`` ended in a
``RecursionError``), recursive aliases, and aliases that would expand a document by more than
:data:`MAX_ALIAS_NODES` nodes (a 1 KB "billion laughs" expands to billions). Only then is the
text loaded. PyYAML keeps an alias as a shared reference, so loading is cheap; the bound
protects whatever walks the result later (validation, codec options, ``/config_dump``).
Every problem is a :class:`~metaprotocol_sdk.errors.ConfigError` naming the file.
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

# libyaml's parser when PyYAML was built with it: 3-6x faster than the pure-Python one on
# large files (a long flow sequence: 45 us a byte in Python). Its composer recurses in C, which
# the depth check below keeps shallow.
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


_MERGE = "tag:yaml.org,2002:merge"


class _Loader(_SafeLoader):  # type: ignore[misc,valid-type]
    """The safe loader, naming the line of a scalar its constructors cannot convert."""

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """PyYAML's merge keys (``<<``), at most one per mapping (a mapping's keys are
        unique; several mappings merge as a list). PyYAML deletes each merge key from the
        mapping's list where it stands: a mapping of many merge keys was quadratic (a 4 MiB
        file of ``<<: {}`` lines loaded in 35 s instead of 8)."""
        merges = [key for key, _ in node.value if key.tag == _MERGE]
        if len(merges) > 1:
            raise ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                "a second merge key '<<' in one mapping: merge a list of mappings "
                "(<<: [*a, *b]) with one",
                merges[1].start_mark,
            )
        self._refuse_duplicate_keys(node)
        super().flatten_mapping(node)

    def _refuse_duplicate_keys(self, node: yaml.MappingNode) -> None:
        """A key written twice in one mapping (PyYAML keeps the last silently, so a reader
        of the file sees a value the engine does not use: ``action: DENY`` above, ``action:
        ALLOW`` below). Kubernetes refuses such a resource too. A key merged in with ``<<``
        and written again is an override, not a duplicate."""
        seen: dict[tuple[type, Any], yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE or not isinstance(key_node, yaml.ScalarNode):
                continue  # a collection as a key: the constructor refuses it
            key = self.construct_object(key_node)
            first = seen.setdefault((type(key), key), key_node)
            if first is not key_node:
                shown = repr(key) if len(repr(key)) <= 80 else f"{repr(key)[:77]}..."
                raise ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"mapping key {shown} already defined at line {first.start_mark.line + 1}, "
                    f"column {first.start_mark.column + 1}: keep one",
                    key_node.start_mark,
                )

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:  # e.g. 2001-13-01, a 5000-digit integer
            kind = node.tag.rsplit(":", 1)[-1]
            raise ConstructorError(
                None, None, f"cannot read this {kind}: {exc}", node.start_mark
            ) from None


def _fail(reason: str, mark: Any, source: str) -> ConfigError:
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    return ConfigError(f"{reason}{where}", source=source)


def check_shape(text: str, source: str) -> None:
    """Refuse deep nesting, recursive aliases and alias expansion over the bounds.

    Walks the parser's events once, keeping for each open collection its size with aliases
    expanded; an alias adds its anchor's size. A node's expanded size minus the real nodes in
    it is at most what aliases add to the document, and the real nodes in it are at most those
    seen so far: comparing against that never refuses a document within the bound.
    """
    open_sizes: list[int] = []  # expanded size of each open collection, innermost last
    open_anchors: list[str | None] = []
    anchors: dict[str, int] = {}  # closed anchors: their expanded size
    real = 0  # nodes seen in this document, aliases excluded
    for event in yaml.parse(text, Loader=_SafeLoader):
        if isinstance(event, yaml.ScalarEvent):
            size = 1
            real += 1
            if event.anchor:
                anchors[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            name = event.anchor or ""
            if name in open_anchors:
                raise _fail(
                    f"recursive alias *{name}: a node cannot contain itself",
                    event.start_mark,
                    source,
                )
            size = anchors.get(name, 1)  # an undefined alias is the loader's error to report
        elif isinstance(event, yaml.CollectionStartEvent):
            if len(open_sizes) >= MAX_CONFIG_DEPTH:
                raise _fail(
                    f"nested deeper than {MAX_CONFIG_DEPTH} levels", event.start_mark, source
                )
            open_sizes.append(1)
            open_anchors.append(event.anchor)
            continue
        elif isinstance(event, yaml.CollectionEndEvent):
            size = open_sizes.pop()
            anchor = open_anchors.pop()
            real += 1
            if size > real + MAX_ALIAS_NODES:
                raise _fail(
                    f"YAML aliases expand this node to {size} nodes, more than "
                    f"{MAX_ALIAS_NODES} beyond the file's own: write the values out or share less",
                    event.start_mark,
                    source,
                )
            if anchor:
                anchors[anchor] = size
        else:
            if isinstance(event, yaml.DocumentStartEvent):
                anchors.clear()  # anchors do not cross documents
                real = 0
            continue
        if open_sizes:
            open_sizes[-1] += size


def parse_documents(text: str, source: str) -> list[Any]:
    """Every YAML document of ``text`` (``None`` for an empty one), within the bounds above."""
    if len(text) > MAX_CONFIG_BYTES:  # characters: a cheap bound, never below the bytes'
        raise ConfigError(f"larger than the limit of {MAX_CONFIG_BYTES} bytes", source=source)
    try:
        check_shape(text, source)
        loader = _Loader(text)
        try:
            bodies = []
            while loader.check_data():
                bodies.append(loader.get_data())
            return bodies
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        if problem == "exceeded maximum nesting depth":  # libyaml's own bound (1000), met
            # first when its scanner reads ahead on one long line
            raise ConfigError(
                f"nested deeper than {MAX_CONFIG_DEPTH} levels{where}", source=source
            ) from None
        raise ConfigError(f"invalid YAML{where}: {problem}", source=source) from None
    except RecursionError:  # a last resort: the depth bound keeps far below the limit
        raise ConfigError("nested too deeply", source=source) from None


def read_documents(path: str | os.PathLike[str]) -> list[Any]:
    """The YAML documents of the file ``path``: read, decoded and parsed within bounds."""
    source = os.fspath(path)
    return parse_documents(
        decode_text(read_bytes(source, max_bytes=MAX_CONFIG_BYTES), source=source), source
    )
