"""How the ``metaprotocol`` command writes log records: the one place logging is configured.

The SDK's modules only log (``logging.getLogger("metaprotocol....")``); they never add a
handler or set a level, so a program that embeds the :class:`~metaprotocol_sdk.proxy.Engine`
keeps its own logging configuration. The command line is a program of its own: while a
command runs (:func:`installed`), one handler on the root logger writes every record, the
engine's and those of the codecs and filters it loads, to standard error:

* ``text`` (the default): ``LEVEL: message``, the level in lower case, the way the CLI's own
  ``error:`` lines read; a worker of ``--workers N`` adds ``worker N: `` after the level; the
  lines after a record's first (the watchdog's stack, a traceback) are indented by two spaces,
  so that a reader (or a log shipper's multi-line rule) sees where the next record starts.
  No timestamp: journald, Kubernetes and Docker time-stamp every line they collect, and
  ``--log-format json`` has one.
* ``json``: one JSON object per record and line (``time``, ``level``, ``logger``,
  ``message``, with ``worker`` and ``exception`` when there are), for log shippers.

The handler looks ``sys.stderr`` up for each record: while ``metaprotocol proxy`` serves, that
is the background-writer stream of :mod:`metaprotocol_sdk.proxy.output`, so a log reader
that stalls never blocks the event loop.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import sys
from collections.abc import Iterator

#: ``--log-level`` choices, by the name the option takes.
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
#: ``--log-format`` choices.
FORMATS = ("text", "json")
#: The level when none is chosen: the engine's lifecycle lines (``reload ok``, ``draining``)
#: are ``info``.
DEFAULT_LEVEL = "info"
#: Loggers of libraries the CLI uses that say at ``info`` what the engine says itself
#: (``watchfiles``: "1 change detected"); they show from ``debug`` only.
_CHATTY = ("watchfiles",)
#: Loggers whose records the CLI never writes: ``cookiecutter`` logs a traceback when a hook
#: rejects the answers of ``metaprotocol new``, whose own lines say everything.
_SILENT = ("cookiecutter",)
#: How lines after a record's first are indented in the text format.
INDENT = "  "


#: Line boundaries beyond the ASCII controls that ``json.dumps`` leaves as they are, escaped.
_JSON_LINE_BREAKS = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"})


def _level_name(record: logging.LogRecord) -> str:
    return record.levelname.lower()


class TextFormatter(logging.Formatter):
    """``level: [worker N: ]message``, later lines indented (see the module's docstring)."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}"
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}"
        # Every line boundary, not only "\n": a reader splitting on "\r" (a terminal, Python's
        # universal newlines) or U+2028 must not see a forged record in a peer's bytes.
        first, *rest = text.rstrip("\r\n").splitlines() or [""]
        tag = "" if self.worker is None else f"worker {self.worker}: "
        return "\n".join([f"{_level_name(record)}: {tag}{first}", *(INDENT + r for r in rest)])


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, RFC 3339, milliseconds), ``level``,
    ``logger``, ``message``; ``worker`` under ``--workers N``; ``exception`` (its
    traceback) when the record carries one."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, object] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": _level_name(record),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # json.dumps leaves these unescaped; readers that split lines as str.splitlines does
        # would cut the object at them.
        return json.dumps(entry, ensure_ascii=False).translate(_JSON_LINE_BREAKS)


class StderrHandler(logging.Handler):
    """Writes each record, whole, to the ``sys.stderr`` of the moment (one ``write``)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + "\n"
            stream = sys.stderr
            stream.write(text)
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


#: The handler of the command that runs (``None`` outside :func:`installed`).
_handler: StderrHandler | None = None


def configure(level: str = DEFAULT_LEVEL, fmt: str = "text", worker: int | None = None) -> None:
    """Set the level and format of the records written (inside :func:`installed`)."""
    if _handler is None:
        return
    formatter: logging.Formatter = JsonFormatter(worker) if fmt == "json" else TextFormatter(worker)
    _handler.setFormatter(formatter)
    number = LEVELS[level]
    logging.getLogger().setLevel(number)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.NOTSET if number <= logging.DEBUG else "WARNING")


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Write log records as :func:`configure` says while the block runs (at
    :data:`DEFAULT_LEVEL`, in text, until it is called); then put the logging configuration
    back as it was (a program that runs the CLI in-process keeps its own)."""
    global _handler
    root = logging.getLogger()
    saved_level = root.level
    saved_chatty = {name: logging.getLogger(name).level for name in _CHATTY}
    saved_silent = {name: logging.getLogger(name).propagate for name in _SILENT}
    nowhere = logging.NullHandler()  # a handler: Python's "last resort" does not write them
    for name in _SILENT:
        logging.getLogger(name).propagate = False
        logging.getLogger(name).addHandler(nowhere)
    previous, _handler = _handler, StderrHandler()
    root.addHandler(_handler)
    configure()
    try:
        yield
    finally:
        root.removeHandler(_handler)
        _handler = previous
        root.setLevel(saved_level)
        for name, level in saved_chatty.items():
            logging.getLogger(name).setLevel(level)
        for name, propagate in saved_silent.items():
            logging.getLogger(name).propagate = propagate
            logging.getLogger(name).removeHandler(nowhere)
