"""Codecs that break the contract: an exception other than ``CodecError`` out of a codec.

The contract lets a codec raise only :class:`~metaprotocol_sdk.errors.CodecError` (and
``MutationError`` from ``encode``), and the kit checks it; but a codec run in production may
still have a bug that some input reaches (an ``IndexError`` on a short field, a
``UnicodeDecodeError``, a ``RecursionError`` on nested data). The engine catches it where it
calls the codec and treats it as bytes the codec cannot read: it costs that connection at most
(see the callers), never the process or another client's requests.

Each such exception, and each breach the engine sees in what a codec returned (a reply to a
request whose new id its ``encode`` did not write: :meth:`CodecBugs.misbehaved`), is counted in
``metaprotocol_codec_errors_total{codec, method}`` and logged as one line (the codec, its
method, the exception's type and the start of its message, and the codec's line that raised it,
never a traceback), at most one line
per :data:`LOG_INTERVAL` per process, with how many were left out since the last: a client that
reaches the bug with every frame cannot flood the log.

A codec whose ``encode`` did not write the request id the engine gave a request on a shared
upstream connection (:meth:`CodecBugs.ids_not_written`) could deliver one client's reply to
another: its class is served without id rewriting from then on in this process (each client
its own upstream connections, see upstream.py), which is logged once, whatever the rate.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from time import monotonic

from metaprotocol_sdk.codec import Codec
from metaprotocol_sdk.errors import CodecError

from .stats import Counter, Stats

log = logging.getLogger("metaprotocol.proxy")

#: Longest part of an exception's message that is logged (it may quote wire bytes).
MESSAGE_CHARS = 200
#: Shortest time between two logged lines, in seconds.
LOG_INTERVAL = 1.0


def codec_name(codec: object) -> str:
    """The codec's class (``codec``, or its class) as an ``ApplicationProtocol`` names it
    (``module:Class``)."""
    cls = codec if isinstance(codec, type) else type(codec)
    return f"{cls.__module__}:{cls.__qualname__}"


class CodecUnavailable(Exception):
    """A connection's codec could not be built (its constructor raised): the connection is
    not made. Its message is what an error reply may say of it."""


def guarded_maker(
    make: Callable[[], Codec], cls: type[Codec], bugs: CodecBugs, outcome: str
) -> Callable[[], Codec]:
    """``make``, each failure of which is counted and logged as ``cls``'s ``__init__`` bug
    (with ``outcome``) and raised as :class:`CodecUnavailable`. The options were checked
    when they loaded (the codec was built once then): this is a constructor that fails only
    sometimes (a file, a resource it needs per connection)."""

    def new_codec() -> Codec:
        try:
            return make()
        except Exception as exc:
            raise CodecUnavailable(bugs.report(cls, "__init__", exc, outcome)) from None

    return new_codec


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


def raised_at(exc: BaseException, codec: object) -> str:
    """`` (at FILE:LINE in FUNCTION)`` for the deepest frame of ``exc``'s traceback in the
    codec's own package (the line its author changes), else the deepest frame; empty
    without one (C code). Only for a logged line: it walks the traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    cls = codec if isinstance(codec, type) else type(codec)
    parts = cls.__module__.split(".")
    file = getattr(sys.modules.get(cls.__module__), "__file__", None)
    if file is not None:
        path = os.path.abspath(file)
        # The top-level package's directory (a lone module: its file).
        root = os.path.dirname(path) if path.endswith("__init__.py") else path[:-3]
        for _ in parts[1:]:
            root = os.path.dirname(root)
        if len(parts) == 1 and not path.endswith("__init__.py"):
            root = path
        own = [f for f in frames if f.filename == root or f.filename.startswith(root + os.sep)]
        if own:
            frame = own[-1]
            where = os.path.relpath(frame.filename, os.path.dirname(root))
            return f" (at {where}:{frame.lineno} in {frame.name})"
    frame = frames[-1]
    return f" (at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name})"


class CodecBugs:
    """The engine's count and log of exceptions codecs raise against the contract."""

    __slots__ = ("_counters", "_logged", "_quiet", "_stats", "unshared")

    def __init__(self, stats: Stats) -> None:
        self._stats = stats
        self._counters: dict[tuple[type, str], Counter] = {}
        self._logged = float("-inf")
        self._quiet = 0
        #: Codec classes whose ``encode`` did not write the request id it was given: their
        #: clusters pool connections per client from then on (see upstream.py).
        self.unshared: set[type] = set()

    def ids_not_written(self, codec: Codec, what: str) -> bool:
        """Count ``codec``'s ``encode`` that did not write the request id it was given
        (``what``: one line on what was seen) and, the first time for its class, mark the
        class :attr:`unshared` and log it (a line whatever the rate: it changes how the
        class is served). ``True``: the first time; later ones are logged as
        :meth:`misbehaved` is."""
        cls = type(codec)
        if cls in self.unshared:
            self.misbehaved(codec, "encode", what)
            return False
        self.unshared.add(cls)
        self._count(codec, "encode")
        log.error(
            "codec %s: encode: %s, a bug in the codec: it may deliver one client's reply to "
            "another on a shared upstream connection, so from now on each client connection "
            "gets its own upstream connections for this codec, as for a codec without "
            "rewrite_request_id (the kit's mutation_with_request_id check finds the bug)",
            codec_name(codec),
            what,
        )
        return True

    def misbehaved(self, codec: object, method: str, what: str, outcome: str = "") -> None:
        """Count and log (rate-limited, as :meth:`report`) a breach of the contract seen in
        what ``codec``'s ``method`` did, without an exception: ``what``, one line, and
        ``outcome``, what the engine did about it."""
        self._count(codec, method)
        if self._may_log():
            log.error(
                "codec %s: %s: %s, a bug in the codec%s%s",
                codec_name(codec),
                method,
                what,
                f": {outcome}" if outcome else "",
                self._more(),
            )

    def _count(self, codec: object, method: str) -> None:
        key = (codec if isinstance(codec, type) else type(codec), method)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self._stats.counter(
                "metaprotocol_codec_errors_total", codec=codec_name(codec), method=method
            )
        counter.value += 1

    def _may_log(self) -> bool:
        """Whether a line may be logged now (else it is counted among the left out)."""
        now = monotonic()
        if now - self._logged < LOG_INTERVAL:
            self._quiet += 1
            return False
        return True

    def _more(self) -> str:
        """How many lines were left out since the last, for the line logged now."""
        more = f" ({self._quiet} more since the last)" if self._quiet else ""
        self._logged, self._quiet = monotonic(), 0
        return more

    def report(
        self, codec: object, method: str, exc: BaseException, outcome: str, strict: bool = False
    ) -> str:
        """Count ``exc``, raised by ``codec``'s ``method`` (``codec`` a class for its
        ``__init__``), and log it (rate-limited) with
        ``outcome``: what the engine did about it. A ``CodecError`` (the contract's) is not
        a bug: not counted, for callers that catch every exception at once; unless
        ``strict``: ``method`` may raise nothing (it builds a message, or answers a question,
        that every input has: ``heartbeat_request``, ``drain_notice``, ``is_drain_notice``).
        Returns what an error reply may say of it (a bug's message is left out: it may quote
        wire bytes)."""
        if isinstance(exc, CodecError) and not strict:
            return str(exc)
        self._count(codec, method)
        reason = f"the codec failed ({method} raised {type(exc).__name__})"
        if not self._may_log():
            return reason
        more = self._more()
        log.error(
            "codec %s: %s raised %s%s, a bug in the codec (it may raise %s): %s%s",
            codec_name(codec),
            method,
            describe(exc),
            raised_at(exc, codec),
            "nothing" if strict else "only CodecError",
            outcome,
            more,
        )
        return reason
