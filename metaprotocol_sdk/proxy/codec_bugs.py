"""Codecs that break the contract: an exception other than ``CodecError`` out of a codec.

The contract lets a codec raise only :class:`~metaprotocol_sdk.errors.CodecError` (and
``MutationError`` from ``encode``), and the kit checks it; but a codec run in production may
still have a bug that some input reaches (an ``IndexError`` on a short field, a
``UnicodeDecodeError``, a ``RecursionError`` on nested data). The engine catches it where it
calls the codec and treats it as bytes the codec cannot read: it costs that connection at
most (see the callers), never the process or another client's requests.

Each such exception is counted in ``metaprotocol_codec_errors_total{codec, method}`` and
logged as one line (the codec, its method, the exception's type and the start of its message,
never a traceback), at most one line per :data:`LOG_INTERVAL` per process, with how many were
left out since the last: a client that reaches the bug with every frame cannot flood the log.
"""

from __future__ import annotations

import logging
from time import monotonic

from metaprotocol_sdk.errors import CodecError

from .stats import Counter, Stats

log = logging.getLogger("metaprotocol.proxy")

#: Longest part of an exception's message that is logged (it may quote wire bytes).
MESSAGE_CHARS = 200
#: Shortest time between two logged lines, in seconds.
LOG_INTERVAL = 1.0


def codec_name(codec: object) -> str:
    """The codec's class as an ``ApplicationProtocol`` names it (``module:Class``)."""
    cls = type(codec)
    return f"{cls.__module__}:{cls.__qualname__}"


def describe(exc: BaseException) -> str:
    """``exc``'s type and the start of its message, on one line (``repr`` escapes what the
    message quotes: line breaks, control bytes)."""
    try:
        text = str(exc)
    except Exception:  # a broken __str__: the type says enough
        text = "(no message)"
    if len(text) > MESSAGE_CHARS:
        text = text[:MESSAGE_CHARS] + "..."
    return f"{type(exc).__name__}: {text!r}"


class CodecBugs:
    """The engine's count and log of exceptions codecs raise against the contract."""

    __slots__ = ("_counters", "_logged", "_quiet", "_stats")

    def __init__(self, stats: Stats) -> None:
        self._stats = stats
        self._counters: dict[tuple[type, str], Counter] = {}
        self._logged = float("-inf")
        self._quiet = 0

    def report(self, codec: object, method: str, exc: BaseException, outcome: str) -> str:
        """Count ``exc``, raised by ``codec``'s ``method``, and log it (rate-limited) with
        ``outcome``: what the engine did about it. A ``CodecError`` (the contract's) is not
        a bug: not counted, for callers that catch every exception at once. Returns what an
        error reply may say of it (a bug's message is left out: it may quote wire bytes)."""
        if isinstance(exc, CodecError):
            return str(exc)
        key = (type(codec), method)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self._stats.counter(
                "metaprotocol_codec_errors_total", codec=codec_name(codec), method=method
            )
        counter.value += 1
        reason = f"the codec failed ({method} raised {type(exc).__name__})"
        now = monotonic()
        if now - self._logged < LOG_INTERVAL:
            self._quiet += 1
            return reason
        more = f" ({self._quiet} more since the last)" if self._quiet else ""
        self._logged, self._quiet = now, 0
        log.error(
            "codec %s: %s raised %s, a bug in the codec (it may raise only CodecError): %s%s",
            codec_name(codec),
            method,
            describe(exc),
            outcome,
            more,
        )
        return reason
