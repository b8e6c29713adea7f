"""The ``metaprotocol`` command line: codecs, decode, check, proxy, new, demo."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

import click

from ._logging import installed

# Subcommands live in their own modules and are imported only when used, so that
# ``metaprotocol --help`` stays fast and one broken subcommand cannot break the others.
_COMMANDS: dict[str, tuple[str, str]] = {
    "codecs": ("metaprotocol_sdk.cli.codecs", "List the installed codecs."),
    "decode": ("metaprotocol_sdk.cli.decode", "Decode a captured byte stream and print metadata."),
    "check": ("metaprotocol_sdk.cli.check", "Run the conformance kit against a codec."),
    "proxy": ("metaprotocol_sdk.cli.proxy", "Run the proxy engine."),
    "new": ("metaprotocol_sdk.cli.new", "Scaffold a new codec (or --filter) package."),
    "demo": ("metaprotocol_sdk.cli.demo", "Run the demo: real servers, clients and the engine."),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name, (module, _) in _COMMANDS.items() if _exists(module))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = _COMMANDS.get(cmd_name)
        if entry is None or not _exists(entry[0]):
            return None
        command: click.Command = importlib.import_module(entry[0]).command
        return command

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Run, turning every usage error into one ``error:`` line and exit status 2.

        A user's mistake never shows a traceback. Anything else that escapes a command is a
        bug: it is reported in one line too, with the way to see the traceback.
        """
        kwargs["standalone_mode"] = False
        try:
            with installed():  # log records as the CLI writes them (see _logging)
                result = super().main(*args, **kwargs)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            sys.exit(_usage_error(exc))
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:
            if os.environ.get(TRACEBACK_ENV):
                raise
            click.echo(
                f"error: internal error ({type(exc).__name__}: {_one_line(str(exc))}); "
                f"this is a bug, please report it ({TRACEBACK_ENV}=1 shows the traceback)",
                err=True,
            )
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


#: Set to show the traceback of an internal error.
TRACEBACK_ENV = "METAPROTOCOL_TRACEBACK"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _usage_error(exc: click.ClickException) -> int:
    """Print a click usage error as one line; the exit status is 2 for every one of them."""
    message = _one_line(exc.format_message())
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        message = f"{ctx.command_path}: {message} (see '{ctx.command_path} --help')"
    click.echo(f"error: {message}", err=True)
    return 2


def _exists(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="metaprotocol-sdk", prog_name="metaprotocol")
def main() -> None:
    """MetaProtocol codec SDK: decode, check and proxy any layer-7 protocol with a codec."""


def run(*args: Any) -> None:
    """Entry point wrapper used by ``python -m metaprotocol_sdk``."""
    main(*args)
