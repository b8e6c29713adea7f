"""Helpers for the packaging tests: what we ship, and where the built files are."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: (distribution file prefix, source directory) of everything we ship.
PROJECTS = {
    "metaprotocol_sdk": REPO,
    "metaprotocol_codec_dubbo": REPO / "codecs" / "dubbo",
    "metaprotocol_codec_thrift": REPO / "codecs" / "thrift",
}
#: Set by ``./dev test``: the folder ``./dev dist`` built the files into.
DIST_ENV = "METAPROTOCOL_DIST"


def complete(folder: Path) -> bool:
    """Whether ``folder`` holds a wheel and an sdist of every project."""
    return all(
        any(folder.glob(f"{name}-*.whl")) and any(folder.glob(f"{name}-*.tar.gz"))
        for name in PROJECTS
    )


def artifact(dist: Path, name: str, suffix: str) -> Path:
    """The one file of ``dist`` for project ``name`` ending in ``suffix``."""
    (path,) = dist.glob(f"{name}-*{suffix}")
    return path
