"""Build hook: with METAPROTOCOL_MYPYC=1 the codec and Hessian 2.0 are compiled with mypyc.

Everything else lives in pyproject.toml. Without the variable the wheel is pure Python.
"""

from __future__ import annotations

import os

from setuptools import setup

#: The decode/encode path. Not compiled: ``hessian2/types.py`` (its values subclass ``int``,
#: ``float``, ``list`` and ``dict``, which mypyc cannot compile) and ``conformance/`` (tests).
COMPILED = [
    "src/metaprotocol_dubbo/body.py",
    "src/metaprotocol_dubbo/codec.py",
    "src/metaprotocol_dubbo/frames.py",
    "src/metaprotocol_dubbo/header.py",
    "src/metaprotocol_dubbo/status.py",
    "src/metaprotocol_dubbo/hessian2/decoder.py",
    "src/metaprotocol_dubbo/hessian2/encoder.py",
    "src/metaprotocol_dubbo/hessian2/skip.py",
    "src/metaprotocol_dubbo/hessian2/strings.py",
    "src/metaprotocol_dubbo/hessian2/tags.py",
]


def ext_modules() -> list[object]:
    if os.environ.get("METAPROTOCOL_MYPYC", "") in ("", "0"):
        return []
    from mypyc.build import mypycify

    return list(mypycify(COMPILED, opt_level="3"))


setup(ext_modules=ext_modules())
