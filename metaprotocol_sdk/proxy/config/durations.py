"""Istio-style durations (``5s``, ``250ms``, ``1m30s``) parsed to seconds."""

from __future__ import annotations

import re

_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?(?:h|ms|m|s|us|µs|ns))+")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
#: The longest duration a ``google.protobuf.Duration`` holds (10 000 years), in seconds: a
#: longer one cannot be written in Istio's API, and a number of hundreds of digits would
#: otherwise be infinity (not JSON in ``/config_dump``, an ``OverflowError`` in a timer).
MAX_DURATION = 315_576_000_000.0


def parse_duration(value: object) -> float:
    """Seconds in ``value`` (a string such as ``2s`` or ``1m30s``); ``ValueError`` if invalid
    or longer than :data:`MAX_DURATION`."""
    if not isinstance(value, str) or not _WHOLE.fullmatch(value.strip()):
        raise ValueError(
            f"invalid duration {value!r}: expected a number with a unit (h, m, s, ms, us, ns), "
            "e.g. '5s' or '250ms'"
        )
    seconds = sum(float(n) * _UNIT[u] for n, u in _PART.findall(value.strip()))
    if not seconds <= MAX_DURATION:
        raise ValueError(f"invalid duration {value[:40]!r}: longer than 10000 years")
    return seconds
