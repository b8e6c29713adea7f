"""Building a plugin (a codec, a filter) from configuration key-values.

Both extension points take their YAML settings as the keyword-only arguments of ``__init__``;
this is the one place that checks the keys against the signature and turns a bad one into a
:class:`~metaprotocol_sdk.errors.ConfigError` naming it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def from_keywords(
    cls: type[T],
    options: Mapping[str, Any] | None,
    kind: str,
    name: str,
    setting: str,
    declared: tuple[str, ...] = (),
) -> T:
    """``cls(**options)``, refusing keys ``__init__`` does not take. ``kind``, ``name`` and
    ``setting`` word the errors: ``unknown option for codec dubbo``, ``invalid filter
    settings: ...``. ``declared``: the keys ``__init__`` takes, for a class compiled with mypyc
    (it has no signature to read them from)."""
    options = dict(options or {})
    try:
        params = inspect.signature(cls).parameters
    except ValueError:  # a class compiled with mypyc has none
        params = None
    known: list[str] | None
    if params is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        known = list(declared) if declared else None  # else ``__init__`` checks the keys
    else:
        known = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    if known is not None:
        for key in options:
            if key not in known:
                raise ConfigError(
                    f"unknown {setting} for {kind} {name}; "
                    f"accepted: {', '.join(sorted(known)) or 'none'}",
                    field=key,
                )
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {kind} {setting}s: {exc}") from exc
