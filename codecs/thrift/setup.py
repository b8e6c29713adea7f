"""Build hook: ``METAPROTOCOL_MYPYC=1`` compiles the codec with mypyc.

Everything else is in pyproject.toml; without the variable the wheel is pure Python. The
compiled build's requirements are ``setup_requires``, which setuptools hands to the build
front end (pip, ``python -m build``) as build requirements of that build only.
"""

from __future__ import annotations

import os
import sys
import tomllib

from setuptools import Extension, setup

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
#: mypyc ships with mypy; the pin is the SDK's dev extra's (tests/core/test_compiled.py).
MYPYC_REQUIRES = ["mypy==2.4.1"]
WANTED = os.environ.get("METAPROTOCOL_MYPYC", "") not in ("", "0")


def build_requires() -> list[str]:
    """mypy, and the SDK the compiled code imports (mypyc type-checks it first)."""
    with open("pyproject.toml", "rb") as file:
        dependencies: list[str] = tomllib.load(file)["project"]["dependencies"]
    return [*MYPYC_REQUIRES, *dependencies]


def ext_modules() -> list[Extension]:
    try:
        from mypyc.build import mypycify
    except ModuleNotFoundError:
        if "egg_info" in sys.argv:  # the front end asks for the build requirements first
            return []
        raise SystemExit(f"METAPROTOCOL_MYPYC=1 needs {MYPYC_REQUIRES[0]} to build") from None
    return mypycify(COMPILED, opt_level="3")


setup(
    setup_requires=build_requires() if WANTED else [],
    ext_modules=ext_modules() if WANTED else [],
)
