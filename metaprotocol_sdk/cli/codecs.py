"""``metaprotocol codecs``: list installed codecs."""

from __future__ import annotations

import json

import click

from metaprotocol_sdk.errors import RegistryError
from metaprotocol_sdk.registry import available

from ._output import table


@click.command("codecs")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def command(as_json: bool) -> None:
    """List installed codecs: names, aliases, distribution, version and capabilities."""
    rows = []
    for info in available():
        try:
            capabilities: list[str] | str = info.load().capabilities.names()
        except RegistryError as exc:
            capabilities = f"error: {exc}"
        rows.append(
            {
                "name": info.name,
                "aliases": list(info.aliases),
                "distribution": info.distribution,
                "version": info.version,
                "target": info.target,
                "capabilities": capabilities,
            }
        )
    if as_json:
        click.echo(json.dumps({"codecs": rows}, indent=2))
        return
    if not rows:
        click.echo("no codecs installed (entry-point group 'metaprotocol.codecs')")
        return
    click.echo(
        table(
            ["NAME", "ALIASES", "DISTRIBUTION", "VERSION", "CAPABILITIES"],
            [
                [
                    r["name"],
                    ", ".join(r["aliases"]),
                    r["distribution"],
                    r["version"],
                    r["capabilities"]
                    if isinstance(r["capabilities"], str)
                    else ", ".join(r["capabilities"]),
                ]
                for r in rows
            ],
        )
    )
