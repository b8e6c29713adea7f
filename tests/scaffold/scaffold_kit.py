"""Helpers for the scaffold tests: render the template, make a fresh venv, run processes."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "metaprotocol_sdk" / "cli" / "codec_template"
#: The interpreter running the tests: the checkout's venv, where the SDK is installed.
PYTHON = sys.executable
BIN = Path(PYTHON).parent


def isolated_env(tmp: Path) -> dict[str, str]:
    """The environment for cookiecutter runs: its replay files go to ``tmp``, not ``$HOME``.

    ``PYTHONPATH`` is this checkout alone: commands run its SDK (and its templates) even where
    the venv's editable install is another checkout's (a git worktree of it).
    """
    config = tmp / "cookiecutter-config.yaml"
    config.write_text(
        f"cookiecutters_dir: {tmp / 'cookiecutters'}\nreplay_dir: {tmp / 'replay'}\n",
        encoding="utf-8",
    )
    env = dict(os.environ)
    env["COOKIECUTTER_CONFIG"] = str(config)
    env["PYTHONPATH"] = str(REPO)
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


def run_in_engine(
    python: Path, project: Path, package: str, tmp_path: Path, env: dict[str, str]
) -> dict[str, str]:
    """Route a request from the example client through the engine to the example server.

    The example configs are used as generated except for addresses: the server and the
    engine bind port 0 (a free port) and the ServiceEntry endpoint points at the server.
    """
    services: list[Service] = []
    try:
        server = Service(
            [python, "-m", f"{package}.example_server", "--port", "0"], cwd=project, env=env
        )
        services.append(server)
        server_port = int(server.wait_for(r"^listening on 127\.0\.0\.1:(\d+)$").group(1))
        mesh, proxy_yaml, entry = deploy_files(project, tmp_path, server_port)

        engine = Service(
            [*metaprotocol_command(python), "proxy", "-c", mesh, "-c", proxy_yaml],
            cwd=project,
            env=env,
        )
        services.append(engine)
        listening = engine.wait_for(r"^listening (\S+):9000 on 127\.0\.0\.1:(\d+)$")
        assert listening.group(1) == entry["spec"]["hosts"][0]
        proxy_port = listening.group(2)

        admin = engine.wait_for(r"^admin on 127\.0\.0\.1:(\d+)$").group(1)
        check_admin_paths(project, int(admin))
        # First exactly the tutorial's client command (its output is compared with the page).
        first = run(
            [
                *(python, "-m", f"{package}.example_client", "--port", proxy_port),
                *("--header", "tenant=blue"),
            ],
            cwd=project,
            timeout=30,
        )
        outputs = {
            "server": server.lines[0],
            "server-received": server.wait_for(r'^\{"request_id"').string,
            "engine": "\n".join(engine.lines),
            "client": first.stdout,
            "ports": f"{server_port} {proxy_port} {admin}",
        }
        client = run(
            [
                *(python, "-m", f"{package}.example_client", "--port", proxy_port),
                *("--header", "tenant=blue", "--ping", "--count", "2"),
            ],
            cwd=project,
            timeout=30,
        )
        replies = [json.loads(line) for line in client.stdout.splitlines()]
        beats = [r for r in replies if r["message_type"] == "Heartbeat"]
        responses = sorted(
            (r for r in replies if r["message_type"] == "Response"), key=lambda r: r["request_id"]
        )
        assert len(beats) == 1, replies  # answered by the engine itself
        assert [r["request_id"] for r in responses] == [1, 2], replies
        for reply in responses:
            assert reply["status"] == "Ok"
            assert reply["body"] == "hello"
            # Echoed by the server: the request arrived with the route's request mutation.
            assert reply["attributes"]["x-routed-by"] == "metaprotocol-engine"
            assert reply["attributes"]["tenant"] == "blue"
            assert reply["attributes"]["served-by"] == "example_server"
            # Added by the engine to the response.
            assert reply["attributes"]["x-route"] == "say-hello"

        # The server saw the mutation itself (it prints what it received).
        for _ in range(2):
            seen = json.loads(server.wait_for(r'^\{"request_id"').string)
            assert seen["method"] == "sayHello"
            assert seen["attributes"]["x-routed-by"] == "metaprotocol-engine"
    finally:
        for service in reversed(services):
            service.stop()
    return outputs


def deploy_files(
    project: Path, tmp_path: Path, server_port: int
) -> tuple[Path, Path, dict[str, Any]]:
    """The package's ``deploy/`` files with only the addresses changed: the engine binds free
    ports, the ServiceEntry endpoint is the server's port. Also the ServiceEntry itself."""
    docs = list(yaml.safe_load_all((project / "deploy" / "mesh.yaml").read_text("utf-8")))
    (entry,) = [d for d in docs if d["kind"] == "ServiceEntry"]
    (endpoint,) = entry["spec"]["endpoints"]
    (port_name,) = endpoint["ports"]
    endpoint["ports"][port_name] = server_port
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(yaml.safe_dump_all(docs), encoding="utf-8")
    settings = yaml.safe_load((project / "deploy" / "proxy.yaml").read_text("utf-8"))
    for listener in settings["spec"]["listeners"]:
        listener["bind"] = "127.0.0.1:0"
    settings["spec"]["admin"]["bind"] = "127.0.0.1:0"
    proxy_yaml = tmp_path / "proxy.yaml"
    proxy_yaml.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return mesh, proxy_yaml, entry


def metaprotocol_command(python: Path) -> list[str | Path]:
    """The venv's ``metaprotocol`` console script where pip installed one, else ``-m``."""
    script = python.parent / "metaprotocol"
    return [script] if script.is_file() else [python, "-m", "metaprotocol_sdk"]


def check_admin_paths(project: Path, admin_port: int) -> None:
    """Every admin path that ``deploy/proxy.yaml``'s comment names answers 200."""
    text = (project / "deploy" / "proxy.yaml").read_text("utf-8")
    comment = " ".join(line for line in text.splitlines() if line.startswith("#"))
    paths = re.findall(r"(?<![\w.])(/[a-z_]+)", comment)
    assert paths, comment
    for path in paths:
        url = f"http://127.0.0.1:{admin_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200, (path, response.status)
