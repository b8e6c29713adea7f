"""How ``metaprotocol`` writes log records: ``level:`` lines or JSON, ``--log-level``, the
worker index under ``--workers``; and the SDK embedded in a program leaves logging to it.

Real processes; every wait is bounded (a reader thread and a queue, or a subprocess timeout).
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from proxy_kit import mesh

WAIT = 30.0  # bound on every single wait (a process start included)
PROXY = [sys.executable, "-m", "metaprotocol_sdk", "proxy"]
#: A route to a host no ServiceEntry defines: accepted, with a configuration warning.
TYPO = "- name: r\n  route: [{destination: {host: nowhere.test}}]\n"
WARNING = "no ServiceEntry defines host 'nowhere.test'"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(mesh([(1, "v1")], router=TYPO))
    return path


def check(config: Path, *options: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*PROXY, "--check", "-c", str(config), *options],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("configuration OK: "), done.stdout
    return done


def test_a_configuration_warning_says_its_level(config: Path) -> None:
    (line,) = check(config).stderr.splitlines()
    assert line.startswith(f"warning: {config} (document 4, MetaRouter/svc): "), line
    assert WARNING in line, line


def test_log_level_error_hides_warnings(config: Path) -> None:
    assert check(config, "--log-level", "error").stderr == ""


def test_log_level_debug_shows_debug_records(config: Path) -> None:
    lines = check(config, "-l", "debug").stderr.splitlines()
    assert any(line.startswith(f"debug: loaded {config}: version ") for line in lines), lines
    assert sum(line.startswith("warning: ") for line in lines) == 1, lines


def test_json_format_is_one_object_per_line(config: Path) -> None:
    lines = check(config, "--log-format", "json", "--log-level", "debug").stderr.splitlines()
    records = [json.loads(line) for line in lines]  # every line parses on its own
    for record in records:
        assert set(record) == {"time", "level", "logger", "message"}, record
        assert record["time"].endswith("Z") and "T" in record["time"], record
    levels = {record["level"]: record for record in records}
    assert WARNING in levels["warning"]["message"]
    assert levels["warning"]["logger"] == "metaprotocol.config"
    assert levels["debug"]["message"].startswith(f"loaded {config}: version ")


def test_later_lines_of_a_record_are_indented_under_its_first() -> None:
    from metaprotocol_sdk.cli._logging import JsonFormatter, TextFormatter

    stack = ("  f\n    g",)
    record = logging.LogRecord("w", logging.WARNING, __file__, 1, "stuck in:\n%s", stack, None)
    assert TextFormatter().format(record) == "warning: stuck in:\n    f\n      g"
    assert TextFormatter(worker=1).format(record).split("\n")[0] == "warning: worker 1: stuck in:"
    entry = json.loads(JsonFormatter(worker=1).format(record))
    assert entry["message"] == "stuck in:\n  f\n    g" and entry["worker"] == 1


class Lines:
    """A process's lines on one stream, collected by a thread."""

    def __init__(self, stream: object) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.queue.put(line.rstrip("\n"))

    def until(self, wanted: int, match: str) -> None:
        """Wait until ``wanted`` lines seen so far contain ``match``."""
        while sum(match in line for line in self.seen) < wanted:
            self.seen.append(self.queue.get(timeout=WAIT))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="--workers needs Linux")
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_each_worker_names_itself_once(config: Path, fmt: str) -> None:
    proc = subprocess.Popen(
        [*PROXY, "-c", str(config), "--workers", "2", "--log-format", fmt],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    try:
        out.until(1, "admin on ")
        err.until(1, "2 workers (pids ")
        proc.send_signal(signal.SIGHUP)  # each worker reloads, and says so
        err.until(2, "reload ok (sighup)")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT)
    assert proc.returncode == 0
    err.until(3, "draining")  # the supervisor's and each worker's
    lines = err.seen
    assert not any("Traceback" in line for line in lines), lines
    if fmt == "json":
        records = [json.loads(line) for line in lines]
        reloads = [r for r in records if "reload ok" in r["message"]]
        assert sorted(r["worker"] for r in reloads) == [0, 1], records
        assert all(r["level"] == "info" and "worker" not in r["message"] for r in reloads)
        drains = [r.get("worker") for r in records if r["message"] == "draining"]
        assert sorted(drains, key=str) == [0, 1, None], records
        # The start's warning once (the supervisor's: the workers read the same files), then
        # once for the reload (worker 0's: the others loaded the same files).
        warned = [r.get("worker") for r in records if WARNING in r["message"]]
        assert warned == [None, 0], records
        return
    for index in (0, 1):
        (reload,) = [line for line in lines if f"worker {index}: reload ok" in line]
        assert reload.startswith(f"info: worker {index}: reload ok (sighup): version ")
        assert reload.count("worker") == 1, reload
    assert "info: draining" in lines and "info: worker 1: draining" in lines, lines
    warned = [line for line in lines if WARNING in line]
    assert warned[0].startswith(f"warning: {config}"), warned
    assert [line.split(": ")[1] for line in warned[1:]] == ["worker 0"], warned


EMBEDDED = """\
import asyncio, logging, sys

logging.basicConfig(
    level=logging.DEBUG, stream=sys.stdout, format="USER %(levelname)s %(name)s: %(message)s"
)
from click.testing import CliRunner

from metaprotocol_sdk.cli import main
from metaprotocol_sdk.proxy import Engine, load_config

config = load_config([sys.argv[1]])


async def serve() -> None:
    engine = Engine(config)
    await engine.start()
    await engine.apply(config, source="embedded")
    await engine.stop(drain=0.1)


asyncio.run(serve())
before = logging.getLogger().handlers[:], logging.getLogger().level
result = CliRunner().invoke(main, ["proxy", "--check", "-c", sys.argv[1], "-l", "error"])
assert result.exit_code == 0, result.output
after = logging.getLogger().handlers[:], logging.getLogger().level
print("RESTORED" if after == before else f"CHANGED {before} {after}")
"""


def test_an_embedded_engine_logs_through_the_programs_own_configuration(
    config: Path, tmp_path: Path
) -> None:
    """The SDK configures no logging: the program's format and level apply (here, DEBUG to
    stdout); running the CLI in-process leaves the program's configuration as it was."""
    script = tmp_path / "embed.py"
    script.write_text(EMBEDDED)
    done = subprocess.run(
        [sys.executable, str(script), str(config)],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(
        line.startswith("USER WARNING metaprotocol.config: ") and WARNING in line for line in lines
    ), lines
    assert any(
        line.startswith("USER DEBUG metaprotocol.proxy: reload ok (embedded)") for line in lines
    ), lines
    assert lines[-1] == "RESTORED", lines
    assert done.stderr == "", done.stderr  # nothing written past the program's handler


@pytest.mark.parametrize("forge", ["\r", "\x0b", "\x0c", "\x1e", "\x85", "\u2028", "\u2029"])
def test_a_line_break_in_a_logged_value_cannot_forge_a_record(forge: str) -> None:
    from metaprotocol_sdk.cli._logging import JsonFormatter, TextFormatter

    # A peer's address, a codec's error text, a configuration value: any of them may carry one.
    hostile = f"x{forge}error: forged"
    record = logging.LogRecord("w", logging.WARNING, __file__, 1, "bad host %s", (hostile,), None)
    text = TextFormatter().format(record)
    first, *rest = text.splitlines()  # every boundary some reader splits on
    assert first == "warning: bad host x" and rest, text
    assert all(line.startswith("  ") for line in rest), text
    line = JsonFormatter().format(record)
    assert line.splitlines() == [line], line  # one object on one line, however it is split
    assert json.loads(line)["message"] == f"bad host {hostile}"
