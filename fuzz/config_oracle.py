"""Oracle for the configuration loader: any text gives a ``Config`` or a ``ConfigError``."""

from __future__ import annotations

import logging

from metaprotocol_sdk.errors import ConfigError
from metaprotocol_sdk.proxy.config import loads_config

from .oracle import crash

#: The loader warns about fields it accepts and ignores; thousands of inputs a second would
#: flood the fuzzer's output, so the check mutes it while it runs (and only then).
_LOG = logging.getLogger("metaprotocol.config")


def check_config(data: bytes) -> None:
    """Load ``data`` (as UTF-8, bad bytes replaced, as a text editor would show them)."""
    text = data.decode("utf-8", "replace")
    was = _LOG.disabled
    _LOG.disabled = True
    try:
        loads_config(text, "fuzz.yaml")
    except ConfigError:
        pass
    except Exception as exc:
        raise crash("loads_config", exc) from None
    finally:
        _LOG.disabled = was
