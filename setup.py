"""Build hook: ``METAPROTOCOL_MYPYC=1`` compiles the engine's request path with mypyc.

Everything else is in pyproject.toml; without the variable the wheel is pure Python. The
compiled build's requirements are ``setup_requires``, which setuptools hands to the build
front end (pip, ``python -m build``) as build requirements of that build only.
"""

from __future__ import annotations

import os
import sys
import tomllib

from setuptools import Extension, setup

#: The engine's request path (docs/compiled.md says why these modules and not the others).
COMPILED = [
    "metaprotocol_sdk/enums.py",
    "metaprotocol_sdk/metadata.py",
    "metaprotocol_sdk/proxy/balancer.py",
    "metaprotocol_sdk/proxy/deadlines.py",
    "metaprotocol_sdk/proxy/downstream.py",
    "metaprotocol_sdk/proxy/matcher.py",
    "metaprotocol_sdk/proxy/router.py",
    "metaprotocol_sdk/proxy/stats.py",
    # Its connection classes subclass downstream's and upstream's: a compiled class can only
    # be the base of another compiled one (the loop's TLS layer is subclassed in handshake.py,
    # which stays interpreted).
    "metaprotocol_sdk/proxy/tls.py",
    "metaprotocol_sdk/proxy/upstream.py",
]
#: mypyc ships with mypy; the pins are the dev extra's (tests/core/test_compiled.py).
MYPYC_REQUIRES = ["mypy==2.4.1", "types-PyYAML==6.0.12.20261113"]
WANTED = os.environ.get("METAPROTOCOL_MYPYC", "") not in ("", "0")


def build_requires() -> list[str]:
    """mypy, and the packages the compiled code imports (mypyc type-checks it first)."""
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
