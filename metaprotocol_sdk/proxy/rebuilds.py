"""Balancer rebuilds after a change of health, within a share of the event loop's time.

An ejection or a readmission (outlier detection) and a slow-start step rebuild the balancer
of the cluster concerned. Most builds take microseconds; a Maglev table of Istio's 65 537
slots takes tens of milliseconds in Python, on the engine's only thread, and a hash ring of
a hundred thousand points about as long. One flapping endpoint is nothing, but a burst of
separate ejections (a zone going bad: a hundred endpoints of one cluster, one after the
other, each a rebuild) held the loop for seconds, and every client with it.

So the rebuilds of all clusters together take at most :data:`SHARE` of the loop's time: after
a build that took ``t`` seconds, the next one starts no sooner than ``t * (1 / SHARE - 1)``
later. A cluster that must wait keeps its balancer, wrapped so that a pick of an endpoint
ejected since picks again (as a retry's does, a few times), and is rebuilt once its turn
comes, oldest request first, with every change made meanwhile: a burst of a hundred
ejections costs a few builds, not a hundred. An endpoint readmitted meanwhile gets its
traffic back at that build.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .upstream import Cluster

#: The share of the loop's time balancer rebuilds may take, at most (Envoy rebuilds on its
#: main thread, away from the workers; here the same thread serves requests).
SHARE = 0.2
#: The wait after a build, in multiples of its duration: ``1 / SHARE - 1``.
SPACING = 1 / SHARE - 1


class Rebuilds:
    """The engine's queue of balancer rebuilds (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiting: OrderedDict[Cluster, None] = OrderedDict()
        #: Loop time before which no rebuild starts.
        self._next = 0.0
        self._timer: asyncio.TimerHandle | None = None
        #: Rebuilds done and those that waited for their turn (for tests and the docs).
        self.built = 0
        self.deferred = 0

    @property
    def idle(self) -> bool:
        """Whether no rebuild waits for its turn."""
        return not self._waiting

    def waiting(self, cluster: Cluster) -> bool:
        """Whether ``cluster``'s rebuild waits for its turn."""
        return cluster in self._waiting

    def request(self, cluster: Cluster) -> None:
        """Rebuild ``cluster``'s balancer now if the budget allows, else at its turn."""
        if not self._waiting and self._loop.time() >= self._next:
            self._build(cluster)
            return
        if cluster not in self._waiting:
            self.deferred += 1
            cluster.avoid_ejected()
            self._waiting[cluster] = None
        if self._timer is None:
            self._timer = self._loop.call_at(self._next, self._run)

    def _build(self, cluster: Cluster) -> None:
        started = time.perf_counter()
        cluster.build_balancer()
        spent = time.perf_counter() - started
        self.built += 1
        self._next = self._loop.time() + spent * SPACING

    def _run(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        cluster = self._waiting.popitem(last=False)[0]
        self._build(cluster)
        if self._waiting:
            self._timer = self._loop.call_at(self._next, self._run)

    def close(self) -> None:
        """Stop (the engine stops): nothing more is built."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiting.clear()
