"""Find the conformance material a codec distribution ships next to its codec.

Convention: a package named ``conformance`` next to the codec's module (for
``metaprotocol_dubbo.codec:DubboCodec``: ``metaprotocol_dubbo.conformance``) or a sibling
module ``<codec module>_conformance``, or whatever the codec class names in a
``conformance = "package.name"`` class attribute (``None`` means "ships none"). It may hold:

* ``golden.yaml`` (and any ``golden*.yaml``): golden vectors,
* ``messages``: a hypothesis strategy of frame ``bytes`` or :class:`Sample`, or a function
  returning one, in the package itself or its ``strategies`` module,
* ``known_failures.yaml``: checks that do not pass yet, with reasons,
* ``MUTATION``: the ``{key: value}`` mutation the round-trip checks write,
* ``payload(metadata)``: the bytes a mutation must leave unchanged (default: the body), for
  codecs whose mutable attachments live inside the body.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from importlib.resources.abc import Traversable
from types import ModuleType
from typing import Any

from hypothesis import strategies as st

from metaprotocol_sdk.codec import Codec
from metaprotocol_sdk.errors import ConfigError
from metaprotocol_sdk.metadata import Metadata
from metaprotocol_sdk.textfiles import MAX_TEXT_BYTES, decode_text, load_yaml

from .golden import Sample, load_golden_text
from .known_failures import parse_known_failures

_MISSING = object()


@dataclass
class Shipped:
    """What a codec's conformance package provides."""

    module: str = ""
    vectors: tuple[Sample, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    messages: st.SearchStrategy[Any] | None = None
    known_failures: Mapping[str, str] = field(default_factory=dict)
    mutation: Mapping[str, str] | None = None
    payload: Callable[[Metadata], bytes | memoryview] | None = None
    notes: list[str] = field(default_factory=list)


def candidate_modules(codec: type[Codec]) -> list[str]:
    """Module names searched for a codec's conformance material, in order."""
    parts = codec.__module__.split(".")
    names = [f"{codec.__module__}_conformance"]
    names += [".".join([*parts[:i], "conformance"]) for i in range(len(parts), 0, -1)]
    return names


def _import(name: str) -> ModuleType | None:
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except (ImportError, ValueError):
        return None
    return importlib.import_module(name)


def conformance_module(codec: type[Codec], explicit: str | None = None) -> ModuleType | None:
    """The codec's conformance module, or ``None`` when it ships none."""
    name = explicit if explicit is not None else getattr(codec, "conformance", _MISSING)
    if name is None:
        return None
    if isinstance(name, str):
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"conformance package {name!r} cannot be imported: {exc}") from exc
    for candidate in candidate_modules(codec):
        module = _import(candidate)
        if module is not None:
            return module
    return None


def _strategy(module: ModuleType) -> st.SearchStrategy[Any] | None:
    found = getattr(module, "messages", None)
    if found is None and hasattr(module, "__path__"):
        sub = _import(f"{module.__name__}.strategies")
        found = getattr(sub, "messages", None) if sub is not None else None
    if found is None:
        return None
    if callable(found) and not isinstance(found, st.SearchStrategy):
        found = found()
    if not isinstance(found, st.SearchStrategy):
        raise ConfigError(
            f"{module.__name__}.messages must be a hypothesis strategy or return one, "
            f"got {type(found).__name__}"
        )
    return found


def _text(entry: Traversable, source: str) -> str:
    """A shipped file's text, bounded and checked like a user's file."""
    with entry.open("rb") as file:
        data = file.read(MAX_TEXT_BYTES + 1)
    if len(data) > MAX_TEXT_BYTES:
        raise ConfigError(f"larger than the limit of {MAX_TEXT_BYTES} bytes", source=source)
    return decode_text(data, source=source)


def find_shipped(codec: type[Codec], explicit: str | None = None) -> Shipped:
    """Load everything the codec's conformance package ships."""
    module = conformance_module(codec, explicit)
    if module is None:
        searched = ", ".join(candidate_modules(codec))
        return Shipped(notes=[f"codec ships no conformance package (searched {searched})"])
    shipped = Shipped(module=module.__name__)
    if hasattr(module, "__path__"):
        root = files(module)
        vectors: list[Sample] = []
        for entry in sorted(root.iterdir(), key=lambda e: e.name):
            if entry.name.startswith("golden") and entry.name.endswith((".yaml", ".yml")):
                source = f"{module.__name__}/{entry.name}"
                golden = load_golden_text(_text(entry, source), source=source)
                vectors += golden.vectors
                shipped.options = {**golden.options, **shipped.options}
        shipped.vectors = tuple(vectors)
        known = root / "known_failures.yaml"
        if known.is_file():
            source = f"{module.__name__}/known_failures.yaml"
            shipped.known_failures = parse_known_failures(
                load_yaml(_text(known, source), source=source), source=source
            )
    shipped.messages = _strategy(module)
    payload = getattr(module, "payload", None)
    if payload is not None:
        if not callable(payload):
            raise ConfigError(f"{module.__name__}.payload must be a function of Metadata")
        shipped.payload = payload
    mutation = getattr(module, "MUTATION", None)
    if mutation is not None:
        shipped.mutation = dict(mutation)
    return shipped
