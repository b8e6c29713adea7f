"""``metaprotocol demo``: real Thrift and Dubbo servers and clients, routed by the engine."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import click

from metaprotocol_sdk.demo.procs import ChildError, stop_all

from ._output import fail


def _runner() -> asyncio.Runner:
    # The in-process engine runs on uvloop, as `metaprotocol proxy` does;
    # METAPROTOCOL_DEMO_LOOP=asyncio selects the standard loop instead.
    if os.environ.get("METAPROTOCOL_DEMO_LOOP") == "asyncio":
        return asyncio.Runner()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.Runner()

    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


@click.command("demo")
@click.option(
    "--duration",
    type=click.FloatRange(min=0.5),
    default=None,
    metavar="SECONDS",
    help="Run unattended for SECONDS, then print a summary (default: until Ctrl-C).",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=1),
    default=100.0,
    show_default=True,
    metavar="N",
    help="Requests per second per protocol.",
)
@click.option(
    "--protocol",
    "protocols",
    type=click.Choice(["thrift", "dubbo"]),
    multiple=True,
    help="Run only these protocols (repeatable; default: all).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="DIR",
    help="Write the demo's configuration here (default: a new temporary folder, kept).",
)
def command(
    duration: float | None,
    rate: float,
    protocols: tuple[str, ...],
    as_json: bool,
    workdir: Path | None,
) -> None:
    """Run two versions of a Thrift and a Dubbo service behind the engine, with Aeraki's
    two classic MetaRouters (method sayHello -> v2; the rest split 20/80 between v1 and v2),
    and show live counts per protocol, route and version.

    Ctrl-C stops everything cleanly; --duration runs unattended and ends with a summary of
    the observed split against the configured one.
    """
    from metaprotocol_sdk.demo.run import PROTOCOLS, print_summary, run_demo

    out = sys.stderr if as_json else sys.stdout
    coro = run_demo(
        duration=duration,
        out=out,
        tty=out.isatty(),
        rate=rate,
        protocols=protocols or PROTOCOLS,
        workdir=workdir,
    )
    try:
        with _runner() as runner:
            task_result = runner.run(coro)
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        stop_all()
        raise SystemExit(130) from None
    except ChildError as exc:
        stop_all()
        fail(str(exc))
    if task_result.interrupted:
        click.echo(
            "\nstopped (Ctrl-C); every server and client is shut down", err=out is sys.stderr
        )
    if as_json:
        click.echo(task_result.to_json())
    else:
        print_summary(task_result, out)
    if not task_result.interrupted and (
        task_result.errors or not all(r.total for r in task_result.rows)
    ):
        raise SystemExit(1)
