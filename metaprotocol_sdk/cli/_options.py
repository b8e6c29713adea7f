"""Parsing of repeated ``-o KEY=VALUE`` codec options, shared by every subcommand."""

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
