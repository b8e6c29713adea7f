"""Optional hooks a codec's conformance package may ship besides vectors and messages.

* ``unusual_messages``: a hypothesis strategy (or a function returning one) of valid frames
  with unusual but legal content: reserved bits set, duplicate keys, non-canonical encodings,
  anything a codec that re-serialises instead of copying would change. The kit requires
  ``encode`` with no or an empty mutation to return them byte for byte.
* ``grown(n)``: a function returning ``{dimension: frame}``, valid frames whose size grows in
  proportion to ``n`` along each dimension the protocol has (a bigger body, more attachments,
  deeper nesting, more references, ...). The kit compares the cost of ``grown(n)`` and
  ``grown(4 * n)`` to prove decode and encode are linear.

Both are looked up in the conformance package itself, then in its ``strategies`` module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from hypothesis import strategies as st

from metaprotocol_sdk.codec import Codec
from metaprotocol_sdk.errors import ConfigError

from .discovery import conformance_module
from .golden import Sample

#: ``grown(n)``: named valid frames (``bytes`` or :class:`Sample`) whose size grows with ``n``.
Grown = Callable[[int], Mapping[str, Any]]


@dataclass(frozen=True)
class Hooks:
    """The optional hooks found in a codec's conformance package."""

    unusual: st.SearchStrategy[Any] | None = None
    grown: Grown | None = None


def _lookup(module: ModuleType, name: str) -> Any:
    found = getattr(module, name, None)
    if found is None and hasattr(module, "__path__"):
        try:
            sub = importlib.import_module(f"{module.__name__}.strategies")
        except ModuleNotFoundError as exc:
            if exc.name != f"{module.__name__}.strategies":
                raise
            return None
        found = getattr(sub, name, None)
    return found


def find_hooks(codec: type[Codec], explicit: str | None = None) -> Hooks:
    """Load ``unusual_messages`` and ``grown`` from the codec's conformance package."""
    module = conformance_module(codec, explicit)
    if module is None:
        return Hooks()
    unusual = _lookup(module, "unusual_messages")
    if callable(unusual) and not isinstance(unusual, st.SearchStrategy):
        unusual = unusual()
    if unusual is not None and not isinstance(unusual, st.SearchStrategy):
        raise ConfigError(
            f"{module.__name__}.unusual_messages must be a hypothesis strategy or return one, "
            f"got {type(unusual).__name__}"
        )
    grown = _lookup(module, "grown")
    if grown is not None and not callable(grown):
        raise ConfigError(f"{module.__name__}.grown must be a function of an integer")
    return Hooks(unusual=unusual, grown=grown)


def grown_samples(grown: Grown, n: int) -> dict[str, Sample]:
    """Call ``grown(n)`` and normalise its frames to samples."""
    frames = grown(n)
    if not isinstance(frames, Mapping):
        raise ConfigError(f"grown({n}) must return a mapping of name to frame")
    out: dict[str, Sample] = {}
    for name, value in frames.items():
        if isinstance(value, Sample):
            out[str(name)] = value
        elif isinstance(value, bytes | bytearray | memoryview):
            out[str(name)] = Sample(frame=bytes(value))
        else:
            raise ConfigError(f"grown({n})[{name!r}] must be bytes or Sample")
    return out


__all__ = ["Grown", "Hooks", "find_hooks", "grown_samples"]
