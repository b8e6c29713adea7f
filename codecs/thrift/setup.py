"""Build hook: with METAPROTOCOL_MYPYC=1 the codec is compiled with mypyc.

Everything else lives in pyproject.toml. Without the variable the wheel is pure Python.
"""

from __future__ import annotations

import os

from setuptools import setup

#: The decode/encode path (``conformance/`` holds tests and stays interpreted).
COMPILED = [
    "src/metaprotocol_thrift/binary.py",
    "src/metaprotocol_thrift/codec.py",
    "src/metaprotocol_thrift/compact.py",
    "src/metaprotocol_thrift/detect.py",
    "src/metaprotocol_thrift/options.py",
    "src/metaprotocol_thrift/replies.py",
    "src/metaprotocol_thrift/resumable.py",
    "src/metaprotocol_thrift/skip.py",
    "src/metaprotocol_thrift/state.py",
    "src/metaprotocol_thrift/theader.py",
    "src/metaprotocol_thrift/wire.py",
]


def ext_modules() -> list[object]:
    if os.environ.get("METAPROTOCOL_MYPYC", "") in ("", "0"):
        return []
    from mypyc.build import mypycify

    return list(mypycify(COMPILED, opt_level="3"))


setup(ext_modules=ext_modules())
