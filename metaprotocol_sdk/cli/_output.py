"""Small helpers for CLI output: aligned text tables and friendly errors."""

from __future__ import annotations

import os
import traceback
from collections.abc import Sequence

import click

from metaprotocol_sdk.errors import MetaProtocolError, _shortened


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Render rows as a plain aligned text table."""
    cells = [[str(h) for h in headers], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fail(error: MetaProtocolError | str, code: int = 1) -> None:
    """Print an error on stderr and exit with ``code`` (no traceback)."""
    click.echo(f"error: {error}", err=True)
    raise SystemExit(code)


def codec_bug(codec_name: str, what: str, exc: Exception, code: int, why: str) -> None:
    """Exit with ``code`` on an exception of ``codec_name``'s own code (``what`` raised it;
    ``why``: why that is the codec's failure): said so with the line that raised it, not as
    the SDK's internal error. ``METAPROTOCOL_TRACEBACK=1`` prints the traceback too."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    if os.environ.get("METAPROTOCOL_TRACEBACK"):
        traceback.print_exception(exc)
    # One line, and short: a codec's message may quote the (hostile) bytes it was given.
    text = _shortened(" ".join(f"{type(exc).__name__}: {exc}".split()))
    fail(
        f"codec {codec_name}: {what} raised {text}{where}; {why} "
        "(METAPROTOCOL_TRACEBACK=1 shows the traceback)",
        code,
    )
