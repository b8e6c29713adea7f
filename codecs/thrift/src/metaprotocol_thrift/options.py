"""Parsing codec options given as configuration values (strings, ints or booleans)."""

from __future__ import annotations

from metaprotocol_sdk.errors import ConfigError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def choice(field: str, value: object, allowed: tuple[str, ...]) -> str:
    """``value`` as one of ``allowed`` (case-insensitive), else ``ConfigError``."""
    text = str(value).strip().lower()
    if text not in allowed:
        raise ConfigError(f"must be one of {', '.join(allowed)}; got {value!r}", field=field)
    return text


def flag(field: str, value: object) -> bool:
    """``value`` as a boolean (``true``/``false``, ``1``/``0``, ``yes``/``no``, ``on``/``off``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"must be a boolean (true/false); got {value!r}", field=field)


def positive(field: str, value: object) -> int:
    """``value`` as a positive integer (an int or a numeric string)."""
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ConfigError(f"must be an integer; got {value!r}", field=field) from None
    if isinstance(number, bool) or number <= 0:
        raise ConfigError(f"must be a positive integer; got {value!r}", field=field)
    return number
