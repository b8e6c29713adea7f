"""Child processes that cannot outlive the demo.

Each child runs in its own session (so its whole process group can be signalled), reads a
stdin pipe it exits on when the pipe closes (so even a parent killed with SIGKILL leaves
nothing behind), and is stopped by :func:`stop_all` from ``finally`` blocks and ``atexit``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

_LIVE: set[Child] = set()
_LIVE_LOCK = threading.Lock()


class ChildError(RuntimeError):
    """A child process failed to start or died early; the message carries its stderr."""


class Child:
    """A child process in its own process group, with its stdout read line by line."""

    def __init__(
        self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.last_line = ""
        self._stderr: list[str] = []
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        with _LIVE_LOCK:
            _LIVE.add(self)
        self._reader = threading.Thread(target=self._read_stdout, name=f"{name}-out", daemon=True)
        self._reader.start()
        threading.Thread(target=self._read_stderr, name=f"{name}-err", daemon=True).start()

    @property
    def pid(self) -> int:
        """The child's process id (also its process group id)."""
        return self.proc.pid

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.last_line = line.rstrip("\n")
            self.lines.put(self.last_line)
        self.lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)
            del self._stderr[:-40]

    def stderr_tail(self) -> str:
        """The last lines the child wrote on stderr."""
        return "".join(self._stderr).strip()

    def readline(self, timeout: float) -> str:
        """The next stdout line; :class:`ChildError` on timeout or exit."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise ChildError(f"{self.name}: no output within {timeout:g}s") from None
        if line is None:
            self.proc.wait(timeout=5)
            raise ChildError(
                f"{self.name} exited with status {self.proc.returncode}: "
                f"{self.stderr_tail() or '(no stderr)'}"
            )
        return line

    def wait_ready(self, timeout: float = 20.0) -> int:
        """Wait for the ``READY <port>`` line and return the port."""
        while True:
            line = self.readline(timeout)
            if line.startswith("READY "):
                return int(line.split()[1])

    def send(self, line: str) -> None:
        """Write one line to the child's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 3.0) -> None:
        """Close stdin, then SIGTERM and finally SIGKILL the child's process group."""
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=min(timeout, 1.0))
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, sig)
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # Reap anything the child left in its group (it is gone if this raises).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._reader.join(timeout=2)
        with _LIVE_LOCK:
            _LIVE.discard(self)


def stop_all() -> None:
    """Stop every child still running (safe to call more than once)."""
    with _LIVE_LOCK:
        children = list(_LIVE)
    for child in children:
        child.stop()


atexit.register(stop_all)


def live_children() -> list[Child]:
    """The children started and not stopped yet."""
    with _LIVE_LOCK:
        return list(_LIVE)


def python_child(name: str, module: str, *args: str) -> Child:
    """Run ``python -m module args`` with this interpreter."""
    return Child(name, [sys.executable, "-m", module, *args])


def node_modules_dir() -> Path:
    """Where the pinned npm peers live: ``$METAPROTOCOL_NODE_MODULES``, else the repository's
    ``peers/node/node_modules`` found by walking up from this package."""
    env = os.environ.get("METAPROTOCOL_NODE_MODULES")
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "peers" / "node" / "node_modules"
        if candidate.is_dir():
            return candidate
    raise ChildError(
        "the npm peers (sofa-rpc-node, dubbo-remoting) were not found: run `./dev setup` in the "
        "repository, or point METAPROTOCOL_NODE_MODULES at a node_modules directory holding them"
    )


def node_child(name: str, *args: str) -> Child:
    """Run the demo's Dubbo peer script (``node/dubbo_peer.js``) with the npm peers."""
    node = shutil.which("node")
    if node is None:
        raise ChildError("node is not installed: run `./dev setup` (Debian package nodejs)")
    script = Path(__file__).with_name("node") / "dubbo_peer.js"
    modules = node_modules_dir()
    if not (modules / "sofa-rpc-node").is_dir():
        raise ChildError(f"sofa-rpc-node is missing from {modules}: run `./dev setup`")
    return Child(name, [node, str(script), *args], env={"NODE_PATH": str(modules)})
