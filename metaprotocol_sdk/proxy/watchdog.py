"""A thread that sees the event loop stop making progress: Envoy's guard dog, per process.

Codecs and filters run on the event loop. One that loops forever, goes quadratic on some
input or makes a blocking call stops every connection of the process, silently. The loop
runs a heartbeat (a timer callback, four per ``watchdog.missTimeout``: nothing on the request
path); a daemon thread wakes when a miss could begin (about once per ``missTimeout``, more
often during a stall) and measures how overdue the heartbeat is. Each stall
counts once as a miss and once as a mega-miss, logs the loop thread's Python stack once at the
mega-miss (which codec or filter function is stuck), and past ``killTimeout`` ends the process
with :data:`KILL_STATUS` so that a supervisor starts a fresh one.

The thread cannot interrupt the stuck code: Python has no way to preempt it. It runs when the
interpreter lets it (every ``sys.getswitchinterval()`` under a busy Python loop, at once
under a blocking call); code stuck in C that holds the GIL holds the watchdog too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType

from .config.models import Watchdog
from .output import flush_before_exit
from .stats import Stats

log = logging.getLogger("metaprotocol.proxy.watchdog")

#: Exit status of a process the watchdog ended (``killTimeout``); ``EX_SOFTWARE`` of
#: ``sysexits.h``. The supervisor of ``--workers`` says so when a worker exits with it.
KILL_STATUS = 70
#: Heartbeats (and checks by the thread) per ``missTimeout``.
BEATS_PER_MISS = 4
#: Innermost frames of the stuck loop's stack that are logged (two lines each: where, what).
STACK_FRAMES = 24
#: Longest logged line of that stack, in characters.
STACK_LINE = 240
#: How long a process the watchdog ends waits for its last output (the stack) to be written.
KILL_FLUSH = 1.0


def format_stack(frame: FrameType | None, limit: int = STACK_FRAMES) -> list[str]:
    """The ``limit`` innermost frames from ``frame`` outwards, printed outermost first like a
    traceback, each line at most :data:`STACK_LINE` characters; a first line says how many
    outer frames were left out."""
    if frame is None:
        return ["(no stack: the loop's thread is gone)"]
    depth = 0
    walker: FrameType | None = frame
    while walker is not None:
        depth += 1
        walker = walker.f_back
    summary = traceback.StackSummary.extract(traceback.walk_stack(frame), limit=limit)
    summary.reverse()
    lines = [f"... {depth - len(summary)} outer frames left out"] if depth > len(summary) else []
    for text in summary.format():
        for line in text.rstrip("\n").split("\n"):
            lines.append(line if len(line) <= STACK_LINE else line[: STACK_LINE - 3] + "...")
    return lines


class GuardDog:
    """The watchdog of one engine's event loop: :meth:`start` on the loop, :meth:`stop`.

    ``exit`` ends the process on a kill (``os._exit``; a program embedding the engine may
    pass its own).
    """

    def __init__(
        self, settings: Watchdog, stats: Stats, exit: Callable[[int], object] = os._exit
    ) -> None:
        self.settings = settings
        self.interval = settings.miss_timeout / BEATS_PER_MISS
        self.misses = stats.counter("metaprotocol_watchdog_miss_total")
        self.megamisses = stats.counter("metaprotocol_watchdog_megamiss_total")
        self._exit = exit
        #: ``time.monotonic()`` of the last heartbeat (written by the loop, read by the thread).
        self._beat_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the heartbeat on the running loop and the watching thread."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._beat()
        self._thread = threading.Thread(target=self._watch, name="metaprotocol watchdog")
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        """Stop the heartbeat and the thread (on the loop's thread)."""
        self._stopping.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._thread is not None:
            self._thread.join(1.0)  # it waits on _stopping: at once, unless it is logging
            self._thread = None

    def _beat(self) -> None:
        self._beat_at = time.monotonic()
        assert self._loop is not None
        self._timer = self._loop.call_later(self.interval, self._beat)

    def _watch(self) -> None:
        settings = self.settings
        kill = settings.kill_timeout
        loop = self._loop
        assert loop is not None
        stalled_since = 0.0  # the overdue heartbeat's due time, while a stall lasts
        paused_at = 0.0  # when the loop was last seen not running
        missed = megamissed = False
        wait = settings.miss_timeout
        # A wait past TIMEOUT_MAX raises OverflowError (a missTimeout of years): capped.
        while not self._stopping.wait(min(wait, threading.TIMEOUT_MAX)):
            if not loop.is_running():
                # Not stuck: not running at all (a program between two run_until_complete,
                # or one whose loop ended without stop()). A closed loop never beats again.
                if loop.is_closed():
                    return
                paused_at = time.monotonic()
                missed = megamissed = False
                wait = self.interval
                continue
            # A stall is measured from the later of the last heartbeat and the last pause.
            due = max(self._beat_at, paused_at) + self.interval
            stalled = time.monotonic() - due
            if stalled < settings.miss_timeout:
                if megamissed:
                    log.warning(
                        "event loop ran again after a stall of at least %.2f s",
                        self._beat_at - stalled_since,
                    )
                missed = megamissed = False
                # Asleep until a miss could begin: about once per missTimeout while the
                # heartbeat keeps coming.
                wait = max(settings.miss_timeout - stalled, self.interval)
                continue
            stalled_since = due
            wait = self.interval  # to see the stall end (or grow) soon
            if not missed:
                missed = True
                self.misses.value += 1
            if not megamissed:
                if stalled < settings.megamiss_timeout:
                    wait = max(settings.megamiss_timeout - stalled, 0.001)
                    continue
                megamissed = True
                self.megamisses.value += 1
                log.warning(
                    "event loop stuck for %.2f s (watchdog.megamissTimeout %g s); every "
                    "connection of this process waits. Its thread is in:\n%s",
                    stalled,
                    settings.megamiss_timeout,
                    self._stack(),
                )
            if kill is None:
                continue
            if stalled < kill:
                wait = min(self.interval, max(kill - stalled, 0.001))
                continue
            if self._stopping.is_set():
                return
            log.error(
                "event loop stuck for %.2f s (watchdog.killTimeout %g s): ending the "
                "process with exit status %d. Its thread is in:\n%s",
                stalled,
                kill,
                KILL_STATUS,
                self._stack(),
            )
            flush_before_exit(KILL_FLUSH)
            self._exit(KILL_STATUS)
            return

    def _stack(self) -> str:
        frame = sys._current_frames().get(self._loop_thread)
        return "\n".join(format_stack(frame))
