"""Counters, gauges and histograms behind precomputed label tuples; Prometheus text output.

Names follow one scheme: ``metaprotocol_<what>_total`` for counters and
``metaprotocol_<what>_active`` (or ``_pending``) for gauges, labelled by ``listener``,
``route``, ``destination``, ``cluster``, ``status`` or ``type``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

#: Istio's default buckets for request durations, in milliseconds.
DURATION_BUCKETS_MS = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
    600000, 1800000, 3600000,
)  # fmt: skip
#: Istio's default buckets for request and response sizes, in bytes.
SIZE_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000, 1000000000)
# The size bucket of n from n's bit length: a table guess, then one comparison (the powers of
# ten fall inside bit lengths, so the guess is the bucket or the one below it).
_SIZE_GUESS = tuple(bisect_left(SIZE_BUCKETS, 1 << (b - 1)) if b else 0 for b in range(65))


def size_slot(n: int) -> int:
    """The index of ``n``'s bucket in :data:`SIZE_BUCKETS` (without a search)."""
    if n > SIZE_BUCKETS[-1]:
        return len(SIZE_BUCKETS)
    slot = _SIZE_GUESS[n.bit_length()]
    return slot if n <= SIZE_BUCKETS[slot] else slot + 1


def duration_slot(milliseconds: float) -> int:
    """The index of a duration's bucket in :data:`DURATION_BUCKETS_MS`."""
    return bisect_left(DURATION_BUCKETS_MS, milliseconds)


HELP = {
    "metaprotocol_requests_total": "Requests by listener, route, destination and final status.",
    "metaprotocol_oneway_total": "One-way requests forwarded, by listener, route, destination.",
    "metaprotocol_local_replies_total": "Replies built by the engine, by listener and error type.",
    "metaprotocol_heartbeats_total": "Heartbeats answered locally, by listener/cluster and side.",
    "metaprotocol_decode_errors_total": "Frames the codec refused, by listener/cluster and side.",
    "metaprotocol_downstream_connections_total": "Downstream connections accepted.",
    "metaprotocol_downstream_connections_rejected_total": "Connections refused, by reason.",
    "metaprotocol_downstream_connections_closed_total": "Connections closed by a limit, by reason.",
    "metaprotocol_downstream_connections_active": "Open downstream connections.",
    "metaprotocol_upstream_connections_total": "Upstream connections opened, by cluster.",
    "metaprotocol_upstream_connections_active": "Open upstream connections, by cluster.",
    "metaprotocol_upstream_connect_errors_total": "Failed upstream connects, by cluster.",
    "metaprotocol_upstream_resets_total": "Upstream connections lost with requests in flight.",
    "metaprotocol_upstream_connections_closed_total": "Upstream connections the engine closed "
    "for a limit, by cluster and reason.",
    "metaprotocol_requests_pending": "Requests waiting for an upstream response.",
    "metaprotocol_mutations_skipped_total": "Replies forwarded without a response mutation "
    "they cannot carry, by listener and route.",
    "metaprotocol_admin_requests_total": "Admin endpoint replies, by HTTP status code.",
    "metaprotocol_admin_connections_rejected_total": "Admin connections over the limit (503).",
    "metaprotocol_access_log_write_failures_total": "Access log writes that failed (the "
    "lines they carried were dropped).",
    "metaprotocol_access_log_dropped_lines_total": "Access log lines lost to failed writes.",
    "metaprotocol_buffered_bytes": "Bytes held in buffers (the overload budget's measure).",
    "metaprotocol_overloaded": "1 while new requests and connections are refused for overload.",
    "metaprotocol_request_duration_milliseconds": "Time from a request's arrival to its answer, "
    "by listener, route and destination.",
    "istio_requests_total": "Requests (Istio's standard metric).",
    "istio_request_duration_milliseconds": "Request durations (Istio's standard metric).",
    "istio_request_bytes": "Request sizes (Istio's standard metric).",
    "istio_response_bytes": "Response sizes (Istio's standard metric).",
    "istio_tcp_connections_opened_total": "Upstream connections opened (Istio's standard metric).",
    "istio_tcp_connections_closed_total": "Upstream connections closed (Istio's standard metric).",
    "istio_tcp_sent_bytes_total": "Bytes sent upstream (Istio's standard metric).",
    "istio_tcp_received_bytes_total": "Bytes received from upstream (Istio's standard metric).",
}
GAUGES = frozenset(n for n in HELP if n.endswith(("_active", "_pending", "_bytes", "_overloaded")))

Labels = tuple[tuple[str, str], ...]


class Counter:
    """One time series: an int the hot path increments directly (``counter.value += 1``)."""

    __slots__ = ("labels", "name", "value")

    def __init__(self, name: str, labels: Labels) -> None:
        self.name = name
        self.labels = labels
        self.value = 0


class Histogram:
    """One histogram series: ``observe`` counts a value in its bucket (one bisect)."""

    __slots__ = ("bounds", "counts", "labels", "name", "sum")

    def __init__(self, name: str, labels: Labels, bounds: Sequence[float]) -> None:
        self.name = name
        self.labels = labels
        self.bounds = tuple(bounds)
        #: Per bucket (not cumulative); the last one is ``+Inf``.
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one value."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        """How many values were counted."""
        return sum(self.counts)

    def quantile(self, q: float) -> float | None:
        """An estimate of the ``q`` quantile (linear within a bucket, as Prometheus's
        ``histogram_quantile``); ``None`` without observations."""
        count = self.count
        if not count:
            return None
        rank = q * count
        seen = 0
        lower = 0.0
        for i, n in enumerate(self.counts):
            upper = self.bounds[i] if i < len(self.bounds) else self.bounds[-1]
            if n and seen + n >= rank:
                return lower + (upper - lower) * (rank - seen) / n
            seen += n
            lower = upper
        return self.bounds[-1]

    def series(self) -> list[tuple[str, Labels, float]]:
        """The Prometheus series: cumulative ``_bucket`` per bound and ``+Inf``, ``_sum``,
        ``_count``."""
        out: list[tuple[str, Labels, float]] = []
        total = 0
        for bound, n in zip((*self.bounds, "+Inf"), self.counts, strict=True):
            total += n
            le = bound if isinstance(bound, str) else f"{bound:g}"
            out.append((f"{self.name}_bucket", (*self.labels, ("le", le)), total))
        out.append((f"{self.name}_sum", self.labels, self.sum))
        out.append((f"{self.name}_count", self.labels, self.count))
        return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def series_name(name: str, labels: Labels) -> str:
    """``name{a="1",b="2"}`` (just ``name`` without labels)."""
    if not labels:
        return name
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return f"{name}{{{inner}}}"


class Stats:
    """Every counter and gauge of an engine."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, Labels], Counter] = {}
        self._histograms: dict[tuple[str, Labels], Histogram] = {}

    def histogram(self, name: str, bounds: Sequence[float], **labels: str) -> Histogram:
        """The histogram series for ``name`` and ``labels``, created empty on first use."""
        key = (name, tuple(labels.items()))
        series = self._histograms.get(key)
        if series is None:
            series = self._histograms[key] = Histogram(name, key[1], bounds)
        return series

    def histograms(self, name: str) -> list[Histogram]:
        """Every series of the histogram ``name``."""
        return [h for (n, _), h in self._histograms.items() if n == name]

    def counter(self, name: str, **labels: str) -> Counter:
        """The series for ``name`` and ``labels``, created at zero on first use."""
        key = (name, tuple(labels.items()))
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = Counter(name, key[1])
        return series

    def gauge(self, name: str, **labels: str) -> Counter:
        """The gauge series for ``name`` and ``labels`` (a counter that is set, not added to)."""
        return self.counter(name, **labels)

    def counters(self, name: str) -> list[Counter]:
        """Every series of the counter or gauge ``name``."""
        return [s for (n, _), s in self._series.items() if n == name]

    def get(self, name: str, **labels: str) -> int:
        """Current value (0 when the series does not exist)."""
        series = self._series.get((name, tuple(labels.items())))
        return 0 if series is None else series.value

    def total(self, name: str, **labels: str) -> int:
        """Sum over every series of ``name`` whose labels include ``labels``."""
        want = labels.items()
        series = self._series.items()
        return sum(s.value for (n, lab), s in series if n == name and want <= dict(lab).items())

    def snapshot(self) -> dict[str, float]:
        """``{'name{labels}': value}`` for every series (histograms as their ``_bucket``,
        ``_sum`` and ``_count`` series)."""
        out: dict[str, float] = {
            series_name(n, lab): s.value for (n, lab), s in self._series.items()
        }
        for histogram in self._histograms.values():
            for name, labels, value in histogram.series():
                out[series_name(name, labels)] = value
        return out

    def prometheus(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        by_name: dict[str, list[Counter]] = {}
        for (name, _), series in self._series.items():
            by_name.setdefault(name, []).append(series)
        lines = []
        for name in sorted(by_name):
            lines.append(f"# HELP {name} {HELP.get(name, name)}")
            lines.append(f"# TYPE {name} {'gauge' if name in GAUGES else 'counter'}")
            for series in by_name[name]:
                lines.append(f"{series_name(name, series.labels)} {series.value}")
        histograms: dict[str, list[Histogram]] = {}
        for (name, _), histogram in self._histograms.items():
            histograms.setdefault(name, []).append(histogram)
        for name in sorted(histograms):
            lines.append(f"# HELP {name} {HELP.get(name, name)}")
            lines.append(f"# TYPE {name} histogram")
            for histogram in histograms[name]:
                for line_name, labels, value in histogram.series():
                    lines.append(f"{series_name(line_name, labels)} {value:g}")
        return "\n".join(lines) + "\n"
