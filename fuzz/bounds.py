"""Time and memory bounds per input: a hang or a blow-up is a find like a crash.

Time is CPU time of this process (``time.process_time``), so other work on a shared machine
does not count. A soft limit is checked when the input returns; a hard limit (a virtual-time
timer, ``SIGVTALRM``) interrupts a loop that would not return. Memory is the peak of Python
allocations while the input runs (``tracemalloc``, when the caller started it).
"""

from __future__ import annotations

import signal
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from .oracle import Violation

#: The hard limit, as a multiple of the soft one.
HARD_FACTOR = 5


@dataclass(frozen=True)
class Bounds:
    """What one input may cost: a fixed allowance plus an allowance per input byte.

    Both are generous (seeds use well under 1 % of them): they catch hangs, super-linear
    work on large inputs and memory out of proportion to the input, not slow machines.
    """

    seconds: float = 1.0
    seconds_per_byte: float = 20e-6
    memory: int = 2 * 1024 * 1024
    memory_per_byte: int = 64

    def time_limit(self, size: int) -> float:
        """CPU seconds allowed for an input of ``size`` bytes."""
        return self.seconds + self.seconds_per_byte * size

    def memory_limit(self, size: int) -> int:
        """Peak bytes of allocation allowed for an input of ``size`` bytes."""
        return self.memory + self.memory_per_byte * size


class _Hang(BaseException):
    """Raised by the hard timer; a BaseException so that no ``except Exception`` eats it."""


def _on_timer(signum: int, frame: FrameType | None) -> None:
    raise _Hang


def bounded(check: Callable[[bytes], None], data: bytes, bounds: Bounds) -> None:
    """Run ``check(data)``; raise :class:`Violation` if it breaks a rule or a bound."""
    limit = bounds.time_limit(len(data))
    timer = threading.current_thread() is threading.main_thread()
    tracing = tracemalloc.is_tracing()
    if tracing:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
    if timer:
        previous = signal.signal(signal.SIGVTALRM, _on_timer)
        signal.setitimer(signal.ITIMER_VIRTUAL, limit * HARD_FACTOR)
    start = time.process_time()
    try:
        check(data)
    except _Hang:
        raise Violation(
            "hang", f"still running after {limit * HARD_FACTOR:.1f} s of CPU on {len(data)} bytes"
        ) from None
    finally:
        if timer:
            signal.setitimer(signal.ITIMER_VIRTUAL, 0)
            signal.signal(signal.SIGVTALRM, previous)
    elapsed = time.process_time() - start
    if elapsed > limit:
        raise Violation("slow", f"{elapsed:.2f} s of CPU on {len(data)} bytes (limit {limit:.2f})")
    if tracing:
        peak = tracemalloc.get_traced_memory()[1] - base
        allowed = bounds.memory_limit(len(data))
        if peak > allowed:
            raise Violation(
                "memory", f"{peak} bytes allocated at peak for {len(data)} bytes (limit {allowed})"
            )
