"""Work done in steps on the event loop: in one piece before serving, in slices while serving.

A step function is a generator that ``yield``\\ s where the event loop may serve meanwhile and
returns its result. :func:`finish` runs it in one piece; :func:`paced` lets the loop serve each
:data:`SLICE`. A reload's build (12 000 routes: 0.9 s) run in one piece answered no request
meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator
from typing import TypeVar

T = TypeVar("T")
#: Work in steps: each ``yield`` is a point where the event loop may serve meanwhile.
Steps = Generator[None, None, T]
#: Longest a paced piece of work runs before the event loop serves again (the watchdog's
#: ``missTimeout`` is 200 ms by default).
SLICE = 0.005


def finish(steps: Steps[T]) -> T:
    """Run ``steps`` to their end, in one piece."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


async def paced(steps: Steps[T]) -> T:
    """Run ``steps`` to their end, letting the event loop serve each :data:`SLICE`."""
    clock = time.monotonic
    until = clock() + SLICE
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        if clock() >= until:
            await asyncio.sleep(0)
            until = clock() + SLICE
