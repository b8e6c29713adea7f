"""What a test does when a real peer it talks to is not installed.

Outside the project's test command a missing peer (Envoy, redis-server, prometheus, chromium,
the ``xds`` extra) skips its tests, with how to install it. ``./dev test`` installs every peer
and sets ``METAPROTOCOL_REQUIRE_PEERS=1``: there, a missing peer is a broken setup, and its
tests fail instead of passing by being skipped.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def missing(what: str, install: str) -> NoReturn:
    """Skip the test for want of ``what`` (or fail it under ``./dev test``)."""
    message = f"{what} is not installed ({install})"
    if os.environ.get("METAPROTOCOL_REQUIRE_PEERS") == "1":
        pytest.fail(f"{message}; ./dev test installs every peer", pytrace=False)
    pytest.skip(message, allow_module_level=True)
