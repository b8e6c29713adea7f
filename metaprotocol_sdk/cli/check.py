"""``metaprotocol check``: run the conformance kit against an installed codec."""

from __future__ import annotations

import click

from metaprotocol_sdk.errors import ConfigError, RegistryError

from ._options import codec_option, codec_options
from ._output import codec_bug, fail


@click.command("check")
@click.argument("codec_name", metavar="CODEC")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON report.")
@click.option(
    "--golden",
    type=click.Path(exists=True, dir_okay=False),
    help="Golden YAML file, in place of the golden*.yaml the codec ships.",
)
@click.option(
    "--known-failures",
    type=click.Path(exists=True, dir_okay=False),
    help="Known-failures YAML file (default: the one the codec ships).",
)
@click.option("--only", "only", multiple=True, metavar="CHECK", help="Run only CHECK (repeatable).")
@codec_option
@click.option("-v", "--verbose", is_flag=True, help="Show every reason in full.")
def command(
    codec_name: str,
    as_json: bool,
    golden: str | None,
    known_failures: str | None,
    only: tuple[str, ...],
    option_pairs: tuple[str, ...],
    verbose: bool,
) -> None:
    """Run every conformance check against CODEC and print a report.

    CODEC is an installed codec's name or alias or a `module:Class` reference. The codec's
    shipped conformance package (golden vectors, message strategy, known failures) is used;
    a codec that ships none gets the generic checks and a note of what was not covered.
    Exits 1 when any check fails, 2 when the codec cannot be loaded.
    """
    try:
        from metaprotocol_sdk.testing import CodecTarget, check_names, load_known_failures, run_kit
    except ImportError as exc:  # hypothesis is a test-time dependency
        fail(f"the conformance kit needs hypothesis ({exc}); pip install hypothesis", 2)
    unknown = sorted(set(only) - set(check_names()))
    if unknown:
        raise click.BadParameter(
            f"unknown checks {unknown}; known: {', '.join(check_names())}", param_hint="--only"
        )
    try:
        target = CodecTarget.discover(
            codec_name,
            options=(codec_options(option_pairs) or None),
            golden=golden,
            known_failures=load_known_failures(known_failures) if known_failures else None,
        )
        target.new_codec()  # bad -o options: one message now, not one failure per check
    except (RegistryError, ConfigError) as exc:
        fail(exc, 2)
    except Exception as exc:  # its constructor failed: the codec cannot be checked at all
        codec_bug(codec_name, "building it", exc, 2, "its own code failed, not the kit")
    report = run_kit(target, only or None)
    click.echo(report.to_json() if as_json else report.format_text(verbose=verbose))
    if not report.passed:
        raise SystemExit(1)
