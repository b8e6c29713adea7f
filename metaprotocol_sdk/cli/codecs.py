"""``metaprotocol codecs``: list installed codecs."""

from __future__ import annotations

import json

import click

from metaprotocol_sdk import compilation
from metaprotocol_sdk.errors import RegistryError
from metaprotocol_sdk.registry import available

from ._output import table


@click.command("codecs")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def command(as_json: bool) -> None:
    """List installed codecs: names, aliases, distribution, version and capabilities.

    With --json, also the modules of each codec and of the SDK that run compiled (mypyc).
    """
    rows = []
    for info in available():
        compiled: list[str] = []
        try:
            codec = info.load()
            capabilities: list[str] | str = codec.capabilities.names()
            compiled = list(compilation.compiled(codec.__module__.partition(".")[0]))
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
                "compiled": compiled,
            }
        )
    if as_json:
        sdk = list(compilation.compiled())
        click.echo(json.dumps({"codecs": rows, "sdk": {"compiled": sdk}}, indent=2))
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
