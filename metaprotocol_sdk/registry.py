"""Find codecs and filters by name through the ``metaprotocol.codecs`` and
``metaprotocol.filters`` entry-point groups.

A codec distribution registers its class under the name Aeraki's ``ApplicationProtocol.codec``
uses and a short alias::

    [project.entry-points."metaprotocol.codecs"]
    "aeraki.meta_protocol.codec.dubbo" = "metaprotocol_dubbo:DubboCodec"
    dubbo = "metaprotocol_dubbo:DubboCodec"

Entry points that point at the same object are one codec with several names. A
``module:Class`` reference is accepted too, for codecs that are not installed as a
distribution yet. Filters register the same way, under Aeraki-style names::

    [project.entry-points."metaprotocol.filters"]
    "aeraki.meta_protocol.filters.audit" = "acme_audit:AuditFilter"
    audit = "acme_audit:AuditFilter"
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, cast

from .codec import Codec
from .errors import CodecLoadError, UnknownCodecError
from .filters import Filter

GROUP = "metaprotocol.codecs"
AERAKI_PREFIX = "aeraki.meta_protocol.codec."
FILTER_GROUP = "metaprotocol.filters"
AERAKI_FILTER_PREFIX = "aeraki.meta_protocol.filters."


@dataclass(frozen=True)
class CodecInfo:
    """One installed codec: its names, where it lives and which distribution ships it."""

    name: str
    aliases: tuple[str, ...]
    target: str
    distribution: str
    version: str

    @property
    def names(self) -> tuple[str, ...]:
        """The primary name followed by the aliases."""
        return (self.name, *self.aliases)

    def load(self) -> type[Codec]:
        """Import the codec class, with an error naming the distribution on failure."""
        return _load_target(self.target, self.distribution)

    def create(self, options: Mapping[str, Any] | None = None) -> Codec:
        """A new codec instance configured from ``options``."""
        return self.load().from_options(options)


def _load_target(target: str, distribution: str) -> type[Codec]:
    return cast("type[Codec]", _load_plugin(target, distribution, Codec, "codec"))


def _load_plugin(target: str, distribution: str, base: type, kind: str) -> Any:
    # A 'module:Class' reference given by hand comes from no distribution (distribution "").
    origin = f" from distribution {distribution!r}" if distribution else ""
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split(".") if attr else ():
            obj = getattr(obj, part)
    except Exception as exc:
        raise CodecLoadError(
            f"{kind} {target!r}{origin} failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise CodecLoadError(
            f"{target!r}{origin} is not a metaprotocol_sdk.{base.__name__} subclass (got {obj!r})"
        )
    return obj


def _entry_points() -> list[EntryPoint]:
    return list(entry_points(group=GROUP))


def _by_target(eps: list[EntryPoint], prefix: str) -> list[tuple[list[str], str, EntryPoint]]:
    """Entry points grouped by what they point at: (names, Aeraki-style name first; target;
    one of the entry points, for its distribution)."""
    by_target: dict[str, list[EntryPoint]] = {}
    for ep in eps:
        by_target.setdefault(ep.value, []).append(ep)
    return [
        (
            sorted({ep.name for ep in group}, key=lambda n: (not n.startswith(prefix), n)),
            t,
            group[0],
        )
        for t, group in by_target.items()
    ]


def available() -> list[CodecInfo]:
    """Every installed codec, one entry per target, sorted by primary name."""
    infos = []
    for names, target, ep in _by_target(_entry_points(), AERAKI_PREFIX):
        dist = ep.dist
        infos.append(
            CodecInfo(
                name=names[0],
                aliases=tuple(names[1:]),
                target=target,
                distribution=dist.name if dist is not None else "unknown",
                version=dist.version if dist is not None else "unknown",
            )
        )
    return sorted(infos, key=lambda info: info.name)


def resolve(name: str) -> CodecInfo:
    """The codec registered under ``name`` (primary name, alias or ``module:Class``)."""
    return _find_codec(name, available())


def _find_codec(name: str, infos: list[CodecInfo]) -> CodecInfo:
    for info in infos:
        if name in info.names:
            return info
    if ":" in name:
        return CodecInfo(name=name, aliases=(), target=name, distribution="", version="")
    names = [n for info in infos for n in info.names]
    # 'acme-rpc' for 'acme_rpc', 'Dubbo' for 'dubbo': the likeliest slips.
    close = difflib.get_close_matches(name.replace("-", "_").lower(), names, n=1, cutoff=0.8)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    installed = ", ".join(names) or "none"
    raise UnknownCodecError(
        f"no codec named {name!r} is installed{hint}; installed codecs: {installed}. "
        f"A codec registers itself in the {GROUP!r} entry-point group when its package is "
        "installed (pip install -e . in a package made by metaprotocol new); a "
        "'module:Class' reference also works."
    )


def load_codec(name: str) -> type[Codec]:
    """The codec class registered under ``name``."""
    return resolve(name).load()


def create_codec(name: str, options: Mapping[str, Any] | None = None) -> Codec:
    """A new instance of the codec registered under ``name``."""
    return resolve(name).create(options)


# -- filters -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FilterInfo:
    """One installed filter: its names and where it lives."""

    name: str
    aliases: tuple[str, ...]
    target: str
    distribution: str

    @property
    def names(self) -> tuple[str, ...]:
        """The primary name followed by the aliases."""
        return (self.name, *self.aliases)

    def load(self) -> type[Filter]:
        """Import the filter class, with an error naming the distribution on failure."""
        return cast("type[Filter]", _load_plugin(self.target, self.distribution, Filter, "filter"))


def available_filters() -> list[FilterInfo]:
    """Every installed filter, one entry per target, sorted by primary name."""
    infos = [
        FilterInfo(names[0], tuple(names[1:]), target, ep.dist.name if ep.dist else "unknown")
        for names, target, ep in _by_target(
            list(entry_points(group=FILTER_GROUP)), AERAKI_FILTER_PREFIX
        )
    ]
    return sorted(infos, key=lambda info: info.name)


def resolve_filter(name: str) -> FilterInfo:
    """The filter registered under ``name`` (primary name, alias or ``module:Class``)."""
    return _find_filter(name, available_filters())


def _find_filter(name: str, infos: list[FilterInfo]) -> FilterInfo:
    for info in infos:
        if name in info.names:
            return info
    if ":" in name:
        return FilterInfo(name=name, aliases=(), target=name, distribution="")
    installed = ", ".join(n for info in infos for n in info.names) or "none"
    raise UnknownCodecError(
        f"no filter named {name!r} is installed; installed filters: {installed}. "
        f"A filter registers itself in the {FILTER_GROUP!r} entry-point group; a "
        "'module:Class' reference also works."
    )


class Plugins:
    """The installed codecs and filters as :func:`resolve` and :func:`resolve_filter` find
    them, each group's entry points read once, on first use. Reading them takes 5-7 ms (every
    installed distribution's metadata): a configuration names a codec or filter for each
    protocol and listener filter, and resolved each against a fresh reading."""

    def __init__(self) -> None:
        self._codecs: list[CodecInfo] | None = None
        self._filters: list[FilterInfo] | None = None

    def codec(self, name: str) -> CodecInfo:
        """The codec registered under ``name`` (as :func:`resolve`)."""
        if self._codecs is None:
            self._codecs = available()
        return _find_codec(name, self._codecs)

    def filter(self, name: str) -> FilterInfo:
        """The filter registered under ``name`` (as :func:`resolve_filter`)."""
        if self._filters is None:
            self._filters = available_filters()
        return _find_filter(name, self._filters)
