"""Every conformance check, registered by name in :data:`REGISTRY` (in run order)."""

from __future__ import annotations

from . import (
    bad_input,
    combined,
    drain,
    framing,
    linear,
    perf,
    pings,
    replies,
    roundtrip,
    state,
)
from .base import REGISTRY, Check, CheckContext, CheckFailed, CheckSkipped

__all__ = [
    "REGISTRY",
    "Check",
    "CheckContext",
    "CheckFailed",
    "CheckSkipped",
    "bad_input",
    "combined",
    "drain",
    "framing",
    "linear",
    "perf",
    "pings",
    "replies",
    "roundtrip",
    "state",
]
