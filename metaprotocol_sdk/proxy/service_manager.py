"""What the engine tells a service manager, and how it starts its own successor.

* :func:`notify`: systemd's notification protocol (``sd_notify``): a datagram of
  ``KEY=value`` lines to the Unix socket named by ``$NOTIFY_SOCKET`` (``@`` first: the
  abstract namespace). The engine sends ``READY=1`` and ``MAINPID=`` once it serves (a hot
  restart's successor thereby becomes the unit's main process: ``NotifyAccess=all``), and
  ``STOPPING=1`` when it drains on ``SIGTERM``. Without ``$NOTIFY_SOCKET`` nothing is sent.
* :class:`Successor`: on ``SIGUSR2``, ``metaprotocol proxy --hot-restart PATH`` starts the same
  command again (a fresh interpreter: the code installed now), which takes over through
  ``PATH``; the running process drains once it has. Only one at a time.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading

log = logging.getLogger("metaprotocol.proxy.hot_restart")


def notify(state: str) -> bool:
    """Send ``state`` (``KEY=value`` lines) to systemd; ``False``: not run by it, or the
    socket refused (a service manager that went away must not stop the engine)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            sock.sendto(state.encode(), target)
    except OSError as exc:
        log.debug("NOTIFY_SOCKET %s: %s", address, exc)
        return False
    return True


def command() -> list[str]:
    """This process's own command, run by the interpreter that runs it."""
    return [sys.executable, "-m", "metaprotocol_sdk", *sys.argv[1:]]


class Successor:
    """Starts the engine's successor on request (``SIGUSR2``), one at a time, and says how
    it ended when it ends before taking over."""

    def __init__(self) -> None:
        #: Set by the caller once a successor has taken over (then nothing more is said).
        self.taken_over = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> int | None:
        """Start it (same arguments, environment and working directory; standard output
        and error shared); ``None``: one is already starting, or it cannot start (said)."""
        if self._process is not None and self._process.poll() is None:
            log.warning(
                "hot restart: pid %d is already starting; SIGUSR2 ignored", self._process.pid
            )
            return None
        try:
            process = subprocess.Popen(command(), stdin=subprocess.DEVNULL)
        except OSError as exc:
            log.error("hot restart: cannot start the successor: %s", exc)
            return None
        self._process = process
        log.info("hot restart: started pid %d (SIGUSR2)", process.pid)
        threading.Thread(target=self._watch, args=(process,), daemon=True).start()
        return process.pid

    def _watch(self, process: subprocess.Popen[bytes]) -> None:
        code = process.wait()  # reaps it (it is this process's child until this one exits)
        if not self.taken_over.is_set():
            log.error(
                "hot restart: pid %d exited with status %d before taking over; serving on",
                process.pid,
                code,
            )
