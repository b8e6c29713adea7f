"""``metaprotocol new``: scaffold a codec (or, with ``--filter``, a filter) package.

The templates (``codec_template/`` and ``filter_template/`` next to this module, shipped in the
SDK's wheel) are cookiecutter templates. The codec package passes the conformance kit and
routes traffic in the engine on first run; the filter package passes its own tests on the
filter harness and runs in the engine by its entry-point name.
Their hooks validate the answers; a rejected answer leaves no output behind.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from ._output import fail
from .scaffold_answers import EMAIL_RE, NAME_RE

#: Environment variable naming another codec template (a path or a git URL).
TEMPLATE_ENV = "METAPROTOCOL_TEMPLATE"
#: Environment variable naming another filter template (a path or a git URL).
FILTER_TEMPLATE_ENV = "METAPROTOCOL_FILTER_TEMPLATE"
LICENSES = ("Apache-2.0", "MIT", "BSD-3-Clause", "Proprietary")


def default_template(filter: bool = False) -> Path:
    """``$METAPROTOCOL_TEMPLATE`` (``$METAPROTOCOL_FILTER_TEMPLATE`` for a filter) if set,
    else the template shipped inside the SDK."""
    configured = os.environ.get(FILTER_TEMPLATE_ENV if filter else TEMPLATE_ENV)
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parent / ("filter_template" if filter else "codec_template")


def git_identity() -> dict[str, str]:
    """``author`` and ``author_email`` from ``git config user.name`` / ``user.email``, where
    set and usable as answers (one line, no quote or backslash, an e-mail address)."""
    found: dict[str, str] = {}
    for key, option in (("author", "user.name"), ("author_email", "user.email")):
        try:
            proc = subprocess.run(
                ["git", "config", "--get", option],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
        except (OSError, subprocess.SubprocessError, UnicodeDecodeError):
            return found  # no git, or it hangs: the template's own defaults
        value = proc.stdout.strip()
        usable = value and "\n" not in value and '"' not in value and "\\" not in value
        if proc.returncode == 0 and usable and (key == "author" or EMAIL_RE.match(value)):
            found[key] = value
    return found


def _extra(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="-x/--set")
        out[key] = value
    return out


#: Why a protocol name has no '-' (as the template's hook says it).
_NO_DASH = (
    " (no '-': ServiceEntry port names tcp-metaprotocol-<protocol>-<name> use it as the separator)"
)


def _suggested(name: str) -> str:
    """A valid name close to ``name`` ('Acme-RPC' -> 'acme_rpc')."""
    cleaned = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")
    return cleaned if NAME_RE.match(cleaned) else f"p_{cleaned}".rstrip("_")


@click.command("new")
@click.argument("name", metavar="[NAME]", required=False)
@click.option(
    "--filter",
    "is_filter",
    is_flag=True,
    help="Scaffold a filter package (NAME is the filter's name) instead of a codec.",
)
@click.option("--author", help="Author name (default: git config user.name).")
@click.option("--email", "author_email", help="Author e-mail (default: git config user.email).")
@click.option("--license", "licence", type=click.Choice(LICENSES), help="Licence.")
@click.option(
    "--package",
    "package_name",
    metavar="PACKAGE",
    help="Python package (default: metaprotocol_<NAME>, or metaprotocol_filter_<NAME>).",
)
@click.option(
    "--heartbeat/--no-heartbeat",
    default=None,
    help="Codec: declare heartbeats (ping/pong frames).",
)
@click.option("--oneway/--no-oneway", default=None, help="Codec: declare one-way requests.")
@click.option(
    "--rewrite-request-id/--no-rewrite-request-id",
    default=None,
    help="Codec: declare request-id rewriting (the engine multiplexes upstream connections).",
)
@click.option(
    "--streaming/--no-streaming",
    default=None,
    help=(
        "Codec: declare streams (stream open, data, half-close and close frames; the example "
        "client and server open and echo one); default: off."
    ),
)
@click.option(
    "-x",
    "--set",
    "extra",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any template variable (a question's name: project_slug, description, version, ...), "
    "e.g. -x project_slug=acme-codec.",
)
@click.option("--no-input", is_flag=True, help="Do not prompt; use the given values and defaults.")
@click.option(
    "-o",
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    metavar="DIR",
    help="Where to create the package directory.",
)
@click.option(
    "--template",
    metavar="PATH",
    help=(
        f"Template path or git URL (default: ${TEMPLATE_ENV}, or ${FILTER_TEMPLATE_ENV} with "
        "--filter, else the SDK's own template)."
    ),
)
def command(
    name: str | None,
    is_filter: bool,
    author: str | None,
    author_email: str | None,
    licence: str | None,
    package_name: str | None,
    heartbeat: bool | None,
    oneway: bool | None,
    rewrite_request_id: bool | None,
    streaming: bool | None,
    extra: tuple[str, ...],
    no_input: bool,
    output_dir: Path,
    template: str | None,
) -> None:
    """Scaffold a codec package, or with --filter a filter package.

    NAME is the codec's protocol or the filter's name (prompted for when not given).
    Without --no-input every answer is prompted for, with the given options as defaults.
    A codec package passes the conformance kit and runs in the engine as generated; a filter
    package passes its tests on the filter harness and runs in the engine by its entry-point
    name. Its README says what to change first.
    """
    if name is not None and template is None and not NAME_RE.match(name):
        # Before the questions and before cookiecutter's check of the directory (which a
        # name like 'acme-rpc' would otherwise meet first, as that of an earlier 'acme_rpc').
        kind, why = ("filter", "") if is_filter else ("protocol", _NO_DASH)
        problem = (
            f"{kind}_name: {name!r} is not a valid {kind} name; use lowercase letters, digits "
            f"and '_', starting with a letter{why}, e.g. {_suggested(name)!r}"
        )
        # As the template's hook words a refused answer.
        if is_filter:
            click.echo(f"error: {problem}", err=True)
        else:
            click.echo(f"error: cannot generate the codec package:\n  - {problem}", err=True)
        fail("the answers were rejected; nothing was generated", 2)
    if is_filter:
        for option, flag in (
            ("--heartbeat/--no-heartbeat", heartbeat),
            ("--oneway/--no-oneway", oneway),
            ("--rewrite-request-id/--no-rewrite-request-id", rewrite_request_id),
            ("--streaming/--no-streaming", streaming),
        ):
            if flag is not None:
                fail(f"{option} declares a codec capability; a filter package has none", 2)
    # cookiecutter ships no type information (and is imported only when this command runs).
    from cookiecutter.config import get_user_config  # type: ignore[import-untyped]
    from cookiecutter.exceptions import (  # type: ignore[import-untyped]
        CookiecutterException,
        FailedHookException,
        OutputDirExistsException,
    )
    from cookiecutter.main import cookiecutter  # type: ignore[import-untyped]

    # cookiecutter's log records (a traceback when a hook rejects the answers) are not
    # written: see _logging._SILENT.

    # The author defaults to git's identity, unless the user's cookiecutter defaults name one.
    try:
        preset = get_user_config().get("default_context") or {}
    except CookiecutterException:
        preset = {}  # cookiecutter reports the broken configuration itself, below
    context: dict[str, Any] = {k: v for k, v in git_identity().items() if k not in preset}
    for key, value in (
        ("filter_name" if is_filter else "protocol_name", name),
        ("author", author),
        ("author_email", author_email),
        ("license", licence),
        ("package_name", package_name),
        ("heartbeat", heartbeat),
        ("oneway", oneway),
        ("rewrite_request_id", rewrite_request_id),
        ("streaming", streaming),
    ):
        if value is not None:
            context[key] = value
    context.update(_extra(extra))
    source = template or str(default_template(is_filter))
    remote = "://" in source or source.startswith(("git@", "gh:", "gl:", "bb:"))
    local_dir = not remote and not source.endswith(".zip")
    if local_dir and not (Path(source) / "cookiecutter.json").is_file():
        fail(f"--template {source}: not a template directory (no cookiecutter.json in it)", 2)
    try:
        created = cookiecutter(
            str(source),
            no_input=no_input,
            extra_context=context,
            output_dir=str(output_dir),
        )
    except FailedHookException:
        # The hook already printed every problem with the answers.
        fail("the answers were rejected; nothing was generated", 2)
    except OutputDirExistsException as exc:
        # cookiecutter words it 'Error: "DIR" directory already exists'.
        found = re.search(r'"(.+)"', str(exc))
        fail(
            f"{found.group(1) if found else 'the package directory'} already exists; nothing "
            "was generated: remove it, or choose another place (-o DIR) or directory name "
            "(-x project_slug=NAME)",
            2,
        )
    except EOFError:
        if no_input or sys.stdin.isatty():
            raise  # Ctrl-D at a question: the user stopped ("aborted")
        click.echo()  # end the unanswered question's line
        fail(
            "a question got no answer: standard input is not a terminal; pass --no-input to "
            "take the defaults and the values given as options",
            2,
        )
    except (CookiecutterException, ValueError) as exc:
        fail(f"{type(exc).__name__}: {exc}", 2)
    click.echo(f"created {created}")
