"""The repeated ``-o KEY=VALUE`` codec option and its parsing, shared by every subcommand."""

from __future__ import annotations

import click


def codec_options(pairs: tuple[str, ...]) -> dict[str, str | int]:
    """``{"KEY": VALUE}`` from ``KEY=VALUE`` strings; all-digit values become ``int``."""
    options: dict[str, str | int] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--option")
        options[key] = int(value) if value.isdigit() else value
    return options


#: ``-o/--option KEY=VALUE`` (repeatable), into the command's ``option_pairs``.
codec_option = click.option(
    "-o",
    "--option",
    "option_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Codec option (repeatable).",
)
