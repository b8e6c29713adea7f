"""Which modules of an installed package run compiled (mypyc), not interpreted.

The SDK and the reference codecs install as pure Python or, built with ``METAPROTOCOL_MYPYC=1``,
with their hot-path modules compiled (docs/compiled.md). Both behave the same; this tells
which one is installed. A module that exists as an extension module is the one Python imports.
"""

from __future__ import annotations

import os
from importlib.machinery import EXTENSION_SUFFIXES
from importlib.util import find_spec

_SUFFIXES = tuple(EXTENSION_SUFFIXES)


def compiled(package: str = "metaprotocol_sdk") -> tuple[str, ...]:
    """The modules of ``package`` installed as extension modules, sorted (``()``: pure)."""
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return ()
    names: list[str] = []
    for location in spec.submodule_search_locations:
        for folder, _, files in os.walk(location):
            relative = os.path.relpath(folder, location)
            parts = [package] if relative == "." else [package, *relative.split(os.sep)]
            names += [
                ".".join([*parts, file.split(".", 1)[0]])
                for file in files
                if file.endswith(_SUFFIXES)
            ]
    return tuple(sorted(names))
