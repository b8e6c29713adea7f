"""Compiled routes: first matching route wins, then a weighted destination is chosen.

Weighted splits use smooth weighted round robin (nginx's algorithm): deterministic, and over
any window of ``sum(weights)`` requests each destination gets exactly its share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from metaprotocol_sdk.enums import ResponseStatus
from metaprotocol_sdk.filters import Filter
from metaprotocol_sdk.metadata import Attributes

from .config.models import Retries
from .matcher import Matcher
from .stats import DURATION_BUCKETS_MS, Counter, Histogram, Stats
from .telemetry import TargetTelemetry

if TYPE_CHECKING:
    from .upstream import Cluster

#: Longest weighted-round-robin cycle precomputed (weights 20/80 cycle every 5 picks).
SCHEDULE_LIMIT = 1000


class Target:
    """One weighted destination of a route, with its stats series."""

    __slots__ = (
        "_by_status",
        "_labels",
        "_stats",
        "cluster",
        "duration",
        "name",
        "responses",
        "telemetry",
        "weight",
    )

    def __init__(
        self,
        name: str,
        cluster: Cluster | None,
        weight: int,
        stats: Stats,
        listener: str,
        route: str,
    ) -> None:
        self.name = name
        self.cluster = cluster
        self.weight = weight
        self._stats = stats
        self._labels = {"listener": listener, "route": route, "destination": name}
        self._by_status: dict[str, Counter] = {}
        #: Counters of answered requests by ``ResponseStatus`` value, made on first use
        #: (:meth:`response_counter`): the hot path indexes this list.
        self.responses: list[Counter | None] = [None] * len(ResponseStatus)
        #: ``metaprotocol_request_duration_milliseconds`` of this destination.
        self.duration: Histogram = stats.histogram(
            "metaprotocol_request_duration_milliseconds", DURATION_BUCKETS_MS, **self._labels
        )
        #: Istio's standard series of this destination (``None``: Istio metrics are off).
        self.telemetry: TargetTelemetry | None = None

    def observe(self, milliseconds: float) -> None:
        """Count one request's duration."""
        self.duration.observe(milliseconds)

    @property
    def labels(self) -> dict[str, str]:
        """The target's stats labels: listener, route, destination."""
        return self._labels

    def response_counter(self, status: ResponseStatus) -> Counter:
        """The counter of requests answered by the upstream with ``status``."""
        counter = self.responses[status]
        if counter is None:
            counter = self.responses[status] = self._counter(status.name)
        return counter

    def _counter(self, status: str) -> Counter:
        counter = self._by_status.get(status)
        if counter is None:
            counter = self._by_status[status] = self._stats.counter(
                "metaprotocol_requests_total", **self._labels, status=status
            )
        return counter

    def count(self, status: str) -> None:
        """Count one finished request with ``status``."""
        self._counter(status).value += 1

    def count_stream(self, outcome: str) -> None:
        """Count one stream that ended with ``outcome`` (see ``streams``)."""
        key = "stream|" + outcome
        counter = self._by_status.get(key)
        if counter is None:
            counter = self._by_status[key] = self._stats.counter(
                "metaprotocol_streams_total", **self._labels, outcome=outcome
            )
        counter.value += 1

    def count_oneway(self, status: str) -> None:
        """Count one one-way request with ``status`` (``Forwarded`` or why it was dropped)."""
        key = "oneway|" + status
        counter = self._by_status.get(key)
        if counter is None:
            counter = self._by_status[key] = self._stats.counter(
                "metaprotocol_oneway_total", **self._labels, status=status
            )
        counter.value += 1


class MirrorTarget:
    """Where a route mirrors its requests: the destination and the share of requests."""

    __slots__ = ("percent", "target")

    def __init__(self, target: Target, percent: float) -> None:
        self.target = target
        self.percent = percent


class CompiledRoute:
    """A route ready for the hot path.

    ``request_filters`` and ``response_filters`` are the route's chain (empty when nothing is
    configured: the hot path then tests one attribute); ``decode_replies`` is true when a reply
    must be decoded on its way back (a response mutation, or a response filter that reads the
    reply's attributes), false when a peeked reply can go out untouched.
    """

    __slots__ = (
        "_current",
        "_next",
        "_schedule",
        "_total",
        "decode_replies",
        "local",
        "match",
        "mirror",
        "name",
        "request_filters",
        "request_mutation",
        "response_filters",
        "response_mutation",
        "retries",
        "single",
        "targets",
        "timeout",
    )

    def __init__(
        self,
        name: str,
        match: Matcher,
        targets: Sequence[Target],
        request_mutation: dict[str, str] | None,
        response_mutation: dict[str, str] | None,
        timeout: float,
        *,
        request_filters: Sequence[Filter] = (),
        response_filters: Sequence[Filter] = (),
        mirror: MirrorTarget | None = None,
        retries: Retries | None = None,
    ) -> None:
        self.name = name
        self.match = match
        #: Counts this route's requests answered before a destination was chosen (a filter's
        #: local reply, say); the engine replaces it with a counting target.
        self.local = Target("", None, 0, Stats(), "", name)
        self.request_filters = tuple(request_filters)
        self.response_filters = tuple(response_filters)
        self.mirror = mirror
        self.retries = retries if retries is not None and retries.attempts > 0 else None
        self.targets = [t for t in targets if t.weight > 0] or list(targets[:1])
        self.single = self.targets[0] if len(self.targets) == 1 else None
        self.request_mutation = request_mutation or None
        self.response_mutation = response_mutation or None
        self.decode_replies = self.response_mutation is not None or any(
            f.response_attributes for f in self.response_filters
        )
        self.timeout = timeout
        self._current = [0] * len(self.targets)
        self._total = sum(t.weight for t in self.targets)
        # The smooth weighted round robin repeats every sum(weights) / gcd(weights) picks:
        # when that cycle is short, it is computed once and the hot path only walks it.
        self._schedule: tuple[Target, ...] = ()
        self._next = 0
        if self.single is None:
            cycle = self._total // math.gcd(*(t.weight for t in self.targets))
            if cycle <= SCHEDULE_LIMIT:
                self._schedule = tuple(self._smooth_pick() for _ in range(cycle))

    def pick(self) -> Target:
        """The next destination (smooth weighted round robin)."""
        single = self.single
        if single is not None:
            return single
        schedule = self._schedule
        if schedule:
            i = self._next
            self._next = i + 1 if i + 1 < len(schedule) else 0
            return schedule[i]
        return self._smooth_pick()

    def _smooth_pick(self) -> Target:
        current = self._current
        targets = self.targets
        best = 0
        for i, target in enumerate(targets):
            current[i] += target.weight
            if current[i] > current[best]:
                best = i
        current[best] -= self._total
        return targets[best]


class RouteTable:
    """The ordered routes of one listener."""

    __slots__ = ("routes",)

    def __init__(self, routes: Sequence[CompiledRoute]) -> None:
        self.routes = tuple(routes)

    def match(self, attributes: Attributes) -> CompiledRoute | None:
        """The first route whose conditions hold, or ``None``."""
        for route in self.routes:
            if route.match(attributes):
                return route
        return None
