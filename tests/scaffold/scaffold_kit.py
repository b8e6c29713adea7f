"""Helpers for the scaffold tests: render the template, make a fresh venv, run processes."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "metaprotocol_sdk" / "cli" / "codec_template"
#: The interpreter running the tests: the checkout's venv, where the SDK is installed.
PYTHON = sys.executable
BIN = Path(PYTHON).parent


def isolated_env(tmp: Path) -> dict[str, str]:
    """The environment for cookiecutter runs: its replay files go to ``tmp``, not ``$HOME``."""
    config = tmp / "cookiecutter-config.yaml"
    config.write_text(
        f"cookiecutters_dir: {tmp / 'cookiecutters'}\nreplay_dir: {tmp / 'replay'}\n",
        encoding="utf-8",
    )
    env = dict(os.environ)
    env["COOKIECUTTER_CONFIG"] = str(config)
    env.pop("PYTHONPATH", None)
    return env


def run(
    args: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    expect: int | None = 0,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; fail with its output when the exit status is not ``expect``."""
    proc = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )
    if expect is not None and proc.returncode != expect:
        raise AssertionError(
            f"{' '.join(str(a) for a in args)} exited {proc.returncode} (expected {expect})\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


def fresh_venv(where: Path) -> Path:
    """A new virtual environment that sees the checkout's SDK and its installed dependencies.

    The venv is created empty (``--without-pip``); one ``.pth`` file runs
    ``site.addsitedir(<the checkout venv's site-packages>)``, which puts the SDK from this
    checkout (editable) and the libraries it needs (construct, click, PyYAML, cookiecutter,
    pytest, hypothesis, ruff, mypy) behind the venv's own site-packages, without a download.
    Whatever is installed into the new venv is invisible to the checkout's venv.
    """
    run([PYTHON, "-m", "venv", "--without-pip", where])
    python = where / "bin" / "python"
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    shared = sysconfig.get_paths()["purelib"]
    pth = Path(purelib.stdout.strip()) / "_metaprotocol_checkout.pth"
    pth.write_text(f"import site; site.addsitedir({shared!r})\n", encoding="utf-8")
    return python


def pip_install(python: Path, project: Path, env: dict[str, str]) -> None:
    """``pip install -e project`` into the venv of ``python`` (the checkout's pip drives it).

    ``--no-deps``: the dependencies are already visible through the ``.pth`` file. The build
    itself is isolated as usual, so pip fetches the build backend from the configured index.
    """
    run(
        [PYTHON, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "-e", project],
        env=env,
        timeout=300,
    )


class Service:
    """A background process whose output lines (stdout and stderr) are read by a thread."""

    def __init__(self, args: Sequence[str | Path], *, cwd: Path, env: dict[str, str]) -> None:
        self.args = [str(a) for a in args]
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            self.args,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, so stop() reaches children too
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """The first output line (from now on) matching ``pattern``; fails on exit or timeout."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(self._report(f"no line matching {pattern!r} in {timeout}s"))
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self._queue.put(None)
                raise AssertionError(self._report(f"exited before printing {pattern!r}"))
            self.lines.append(line)
            match = regex.search(line)
            if match:
                return match

    def _report(self, what: str) -> str:
        output = "\n".join(self.lines)
        return f"{' '.join(self.args)}: {what}\n--- output so far\n{output}"

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL if it has not exited within 10 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
