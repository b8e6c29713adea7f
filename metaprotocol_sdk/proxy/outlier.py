"""Outlier detection: endpoints that fail in a row are ejected from their cluster for a while.

Istio's ``outlierDetection`` (consecutive-error detection, as Envoy's ``consecutive_5xx`` and
``consecutive_gateway_failure``): an upstream ``Error`` reply counts as an error, a connect
failure, a reset, an unreadable reply or a timeout as a gateway error (and an error); any other
answer resets both counts. With ``splitExternalLocalOriginErrors`` (Envoy's split mode) the
latter, local-origin failures, are counted apart instead (``consecutiveLocalOriginFailures``),
and any answer, an ``Error`` reply too, resets that count. An endpoint reaching a threshold is
ejected at once, for ``baseEjectionTime`` times the number of times it has been ejected (at
most ``MAX_EJECTION_TIME``), and readmitted at the first tick of the detection ``interval``
after that (as Envoy's interval timer does); at most ``maxEjectionPercent`` of the cluster, and
always at least one endpoint, can be out at once. Ejected endpoints are skipped by every load
balancer: the cluster rebuilds its balancer over the healthy ones. With none healthy, or fewer
than ``minHealthPercent``, it balances over all of them (Envoy's panic mode). A cluster with
failover priorities balances by Envoy's priority load instead, panic judged per level (see
priority.py).
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING

from metaprotocol_sdk.enums import ResponseStatus

from .config.models import OutlierDetection
from .stats import Counter, Stats

if TYPE_CHECKING:
    from .upstream import Cluster, UpstreamHost

#: Longest ejection, as Envoy's ``max_ejection_time`` default.
MAX_EJECTION_TIME = 300.0


class OutlierDetector:
    """The consecutive-error detector of one cluster."""

    def __init__(
        self,
        cluster: Cluster,
        spec: OutlierDetection,
        loop: asyncio.AbstractEventLoop,
        stats: Stats,
    ) -> None:
        self.cluster = cluster
        self.spec = spec
        self._loop = loop
        self._errors = spec.consecutive_errors or 0
        self._gateway = spec.consecutive_gateway_errors or 0
        self._split = spec.split_local_origin
        self._local = spec.consecutive_local_origin_failures or 0
        self.ejected = 0
        self._ejections: Counter = stats.counter(
            "metaprotocol_outlier_ejections_total", cluster=cluster.name
        )
        self._out: Counter = stats.gauge(
            "metaprotocol_outlier_ejections_active", cluster=cluster.name
        )

    def observe(self, host: UpstreamHost, status: ResponseStatus) -> None:
        """An answer from ``host``."""
        host.local_errors = 0  # an answer: the connection worked
        if status is ResponseStatus.Error:
            host.gateway_errors = 0
            host.errors += 1
            if self._errors and host.errors >= self._errors:
                self.eject(host)
        else:
            host.errors = host.gateway_errors = 0

    def gateway_error(self, host: UpstreamHost) -> None:
        """A connect failure, reset or timeout with ``host`` (a local-origin failure)."""
        if self._split:
            host.local_errors += 1
            if self._local and host.local_errors >= self._local:
                self.eject(host)
            return
        host.errors += 1
        host.gateway_errors += 1
        if (self._gateway and host.gateway_errors >= self._gateway) or (
            self._errors and host.errors >= self._errors
        ):
            self.eject(host)

    def eject(self, host: UpstreamHost) -> None:
        """Take ``host`` out of the cluster's balancing for a while (within the limits)."""
        if host.ejected:
            return
        total = len(self.cluster.hosts)
        if self.ejected >= max(1, total * self.spec.max_ejection_percent // 100):
            return
        host.ejected = True
        host.ejections += 1
        self.ejected += 1
        self._ejections.value += 1
        self._out.value = self.ejected
        duration = min(MAX_EJECTION_TIME, self.spec.base_ejection_time * host.ejections)
        interval = self.spec.interval
        ticks = math.ceil(duration / interval - 1e-9)  # readmission waits for an interval tick
        self._loop.call_later(ticks * interval, self.readmit, host)
        self.cluster.rebalance()

    def readmit(self, host: UpstreamHost) -> None:
        """Bring ``host`` back after its ejection time."""
        if not host.ejected:
            return
        host.ejected = False
        host.errors = host.gateway_errors = host.local_errors = 0
        self.ejected -= 1
        self._out.value = self.ejected
        self.cluster.rebalance()

    def balanced_hosts(self) -> list[UpstreamHost]:
        """The endpoints to balance over: the healthy ones, or all of them in panic mode."""
        hosts = self.cluster.hosts
        healthy = [h for h in hosts if not h.ejected]
        if not healthy or len(healthy) * 100 < self.spec.min_health_percent * len(hosts):
            return list(hosts)
        return healthy
