"""Find codecs by name through the ``metaprotocol.codecs`` entry-point group.

A codec distribution registers its class under the name Aeraki's ``ApplicationProtocol.codec``
uses and a short alias::

    [project.entry-points."metaprotocol.codecs"]
    "aeraki.meta_protocol.codec.dubbo" = "metaprotocol_dubbo:DubboCodec"
    dubbo = "metaprotocol_dubbo:DubboCodec"

Entry points that point at the same object are one codec with several names. A
``module:Class`` reference is accepted too, for codecs that are not installed as a
distribution yet.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .codec import Codec
from .errors import CodecLoadError, UnknownCodecError

GROUP = "metaprotocol.codecs"
AERAKI_PREFIX = "aeraki.meta_protocol.codec."


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
    # A 'module:Class' reference given by hand comes from no distribution (distribution "").
    origin = f" from distribution {distribution!r}" if distribution else ""
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split(".") if attr else ():
            obj = getattr(obj, part)
    except Exception as exc:
        raise CodecLoadError(
            f"codec {target!r}{origin} failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    if not (isinstance(obj, type) and issubclass(obj, Codec)):
        raise CodecLoadError(
            f"{target!r}{origin} is not a metaprotocol_sdk.Codec subclass (got {obj!r})"
        )
    return obj


def _entry_points() -> list[EntryPoint]:
    return list(entry_points(group=GROUP))


def available() -> list[CodecInfo]:
    """Every installed codec, one entry per target, sorted by primary name."""
    by_target: dict[str, list[EntryPoint]] = {}
    for ep in _entry_points():
        by_target.setdefault(ep.value, []).append(ep)
    infos = []
    for target, eps in by_target.items():
        names = sorted({ep.name for ep in eps}, key=lambda n: (not n.startswith(AERAKI_PREFIX), n))
        dist = eps[0].dist
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
    infos = available()
    for info in infos:
        if name in info.names:
            return info
    if ":" in name:
        return CodecInfo(name=name, aliases=(), target=name, distribution="", version="")
    installed = ", ".join(n for info in infos for n in info.names) or "none"
    raise UnknownCodecError(
        f"no codec named {name!r} is installed; installed codecs: {installed}. "
        f"A codec registers itself in the {GROUP!r} entry-point group; a 'module:Class' "
        "reference also works."
    )


def load_codec(name: str) -> type[Codec]:
    """The codec class registered under ``name``."""
    return resolve(name).load()


def create_codec(name: str, options: Mapping[str, Any] | None = None) -> Codec:
    """A new instance of the codec registered under ``name``."""
    return resolve(name).create(options)
