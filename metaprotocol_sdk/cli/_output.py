"""Small helpers for CLI output: aligned text tables and friendly errors."""

from __future__ import annotations

from collections.abc import Sequence

import click

from metaprotocol_sdk.errors import MetaProtocolError


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
