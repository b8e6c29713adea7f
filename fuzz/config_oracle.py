"""Oracle for the configuration loader: any text gives a ``Config`` or a ``ConfigError``."""

from __future__ import annotations

from metaprotocol_sdk.errors import ConfigError
from metaprotocol_sdk.proxy.config import loads_config

from .oracle import crash


def check_config(data: bytes) -> None:
    """Load ``data`` (as UTF-8, bad bytes replaced, as a text editor would show them)."""
    text = data.decode("utf-8", "replace")
    try:
        loads_config(text, "fuzz.yaml")
    except ConfigError:
        pass
    except Exception as exc:
        raise crash("loads_config", exc) from None
