"""Counters, gauges and histograms behind precomputed label tuples; Prometheus text output.

Names follow one scheme: ``metaprotocol_<what>_total`` for counters and
``metaprotocol_<what>_active`` (or ``_pending``) for gauges, labelled by ``listener``,
``route``, ``destination``, ``cluster``, ``status`` or ``type``.

A series whose labels name something of the configuration (:data:`SCOPE_LABELS`: a listener,
route, destination, cluster or destination service) belongs to it, like the stats of an
Envoy cluster to that cluster's scope: :meth:`Stats.prune` drops it once the engine says that
nothing serving or in flight uses the name any more, and folds a counter's or histogram's
counts into the ``stats="removed"`` series of its name, so sums over a metric never go back.
At most ``max_series`` series exist: past it, a new series with configuration names is the
``stats="overflow"`` series of its name instead (counted).
"""

from __future__ import annotations

import functools
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import TypeAlias, TypeVar

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
#: Series per piece of the Prometheus text (:meth:`Stats.prometheus_parts`): a few
#: milliseconds of work with Istio's labels, after which the event loop runs.
PART_SERIES = 200


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
    "metaprotocol_streams_total": "Streams ended, by listener, route, destination and outcome.",
    "metaprotocol_streams_active": "Open streams, by listener.",
    "metaprotocol_stream_frames_total": "Stream frames passed, by listener and the side sending.",
    "metaprotocol_stream_frames_dropped_total": "Client frames of ended streams, dropped.",
    "metaprotocol_local_replies_total": "Replies built by the engine, by listener and error type.",
    "metaprotocol_heartbeats_total": "Heartbeats answered locally, by listener/cluster and side.",
    "metaprotocol_upstream_pings_total": "Heartbeat requests (pings) sent to upstreams, by "
    "cluster.",
    "metaprotocol_drain_notices_total": "Drain notices (the codec's: a connection is closing) "
    "sent to clients (side=downstream, by listener) and received from upstreams "
    "(side=upstream, by cluster).",
    "metaprotocol_decode_errors_total": "Frames the codec refused, by listener/cluster and side.",
    "metaprotocol_codec_errors_total": "Exceptions a codec raised against the contract (bugs).",
    "metaprotocol_downstream_connections_total": "Downstream connections accepted.",
    "metaprotocol_downstream_connections_rejected_total": "Connections refused, by reason.",
    "metaprotocol_downstream_connections_closed_total": "Connections closed by a limit, by reason.",
    "metaprotocol_downstream_connections_active": "Open downstream connections.",
    "metaprotocol_upstream_connections_total": "Upstream connections opened, by cluster.",
    "metaprotocol_upstream_connections_active": "Open upstream connections, by cluster.",
    "metaprotocol_upstream_requests_queued_total": "Requests that waited for room on an "
    "upstream connection (connectionPool.http.maxConcurrentStreams), by cluster.",
    "metaprotocol_upstream_requests_queued_active": "Requests waiting for room on an "
    "upstream connection now, by cluster.",
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
    "metaprotocol_access_log_export_failures_total": "Access log exports to the OpenTelemetry "
    "collector that failed (spec.accessLog.otlp; the records they carried were dropped).",
    "metaprotocol_access_log_dropped_records_total": "Access log lines the OpenTelemetry "
    "collector never took: exports too far behind, failed, or records it rejected.",
    "metaprotocol_buffered_bytes": "Bytes held in buffers (the overload budget's measure).",
    "metaprotocol_overloaded": "1 while new requests and connections are refused for overload.",
    "metaprotocol_request_duration_milliseconds": "Time from a request's arrival to its answer, "
    "by listener, route and destination.",
    "metaprotocol_stats_series": "Stats series held (counters, gauges and histograms).",
    "metaprotocol_hot_restart_generation": "Hot restarts that led to this process (0: started "
    "afresh; each successor's is its predecessor's plus one).",
    "metaprotocol_stats_overflow_total": "New series refused by limits.maxStatsSeries (their "
    'counts went to the stats="overflow" series of their name).',
    "metaprotocol_stats_removed_total": "Series dropped because what they named left the "
    'configuration (counts kept in the stats="removed" series of their name).',
    "metaprotocol_upstream_unmatched_replies_total": "Replies that answered no waiting request "
    "(late, repeated or unknown ids), and other messages that are not replies nor heartbeats "
    "(requests, one-way messages), dropped.",
    "metaprotocol_watchdog_miss_total": "Event loop stalls longer than watchdog.missTimeout "
    "(each stall once).",
    "metaprotocol_watchdog_megamiss_total": "Event loop stalls longer than "
    "watchdog.megamissTimeout (each stall once; the stuck stack is logged).",
    "metaprotocol_global_ratelimit_total": "Requests checked with a rate limit service "
    "(globalRateLimit), by listener and result (ok, over_limit, failure_allowed, "
    "failure_denied, skipped, cancelled).",
    "metaprotocol_global_ratelimit_failures_total": "Failed calls to a rate limit service, "
    "by listener and reason (unavailable, error, timeout, overflow: never made).",
    "metaprotocol_global_ratelimit_calls_active": "Calls to rate limit services outstanding.",
    "metaprotocol_tls_handshakes_total": "TLS handshakes completed, by listener or cluster.",
    "metaprotocol_tls_handshake_errors_total": "TLS handshakes that failed, by listener or "
    "cluster and reason (timeout, not_tls, protocol_version, no_shared_cipher, "
    "no_client_certificate, bad_certificate, peer_rejected, closed, error).",
    "metaprotocol_tls_certificate_expiry_seconds": "When a certificate file in use expires "
    "(its notAfter, in Unix seconds), by listener, cluster or identity (mesh: "
    "spec.meshIdentity) and certificate path.",
    "metaprotocol_tls_identity_rotations_total": "Changes of the workload identity's files "
    "(spec.meshIdentity), by result (ok: in force for new connections; failed: unusable, "
    "the identity in force kept).",
    "metaprotocol_tracing_spans_total": "Trace spans by what became of them: exported, or "
    "dropped (queue_full, export_failed, timeout, shutdown).",
    "metaprotocol_downstream_connections_detected_total": "How PERMISSIVE or DISABLE "
    "listeners served their connections, by listener and result (mtls, plain, timeout, "
    "closed, tls_refused).",
    "metaprotocol_rbac_total": "AuthorizationPolicy decisions, by listener, policy, action "
    "and result.",
    "metaprotocol_retries_total": "Requests sent again (route retries), by listener, route "
    "and reason.",
    "metaprotocol_mirror_total": "Mirrored copies of requests, by listener, route, "
    "destination and status.",
    "metaprotocol_ratelimit_total": "Requests checked with a local rate limit bucket, by "
    "listener, bucket and result.",
    "metaprotocol_faults_total": "Faults injected by routes, by listener, route and type.",
    "metaprotocol_filter_errors_total": "Exceptions a filter raised, by listener and filter.",
    "metaprotocol_upstream_overflow_total": "Requests (and retries) refused by a circuit "
    "breaker (connectionPool, retryBudget) or the upstream connection limit, by cluster and "
    "limit.",
    "metaprotocol_outlier_ejections_total": "Endpoints ejected by outlier detection, by cluster.",
    "metaprotocol_outlier_ejections_active": "Endpoints ejected now, by cluster.",
    "metaprotocol_output_dropped_bytes_total": "Bytes of standard output or error dropped "
    "because their reader did not keep up.",
    "metaprotocol_worker_output_dropped_bytes_total": "Bytes of the workers' output the "
    "supervisor dropped because its reader did not keep up.",
    "istio_requests_total": "Requests (Istio's standard metric).",
    "istio_request_duration_milliseconds": "Request durations (Istio's standard metric).",
    "istio_request_bytes": "Request sizes (Istio's standard metric).",
    "istio_response_bytes": "Response sizes (Istio's standard metric).",
    "istio_tcp_connections_opened_total": "Upstream connections opened (Istio's standard metric).",
    "istio_tcp_connections_closed_total": "Upstream connections closed (Istio's standard metric).",
    "istio_tcp_sent_bytes_total": "Bytes sent upstream (Istio's standard metric).",
    "istio_tcp_received_bytes_total": "Bytes received from upstream (Istio's standard metric).",
}
GAUGES = frozenset(
    n
    for n in HELP
    if n.endswith(("_active", "_pending", "_bytes", "_overloaded", "_series"))
    or n in ("metaprotocol_tls_certificate_expiry_seconds", "metaprotocol_hot_restart_generation")
)

Labels = tuple[tuple[str, str], ...]

#: Labels whose values are names from the configuration. A series with one of them belongs to
#: what it names (its *scope*: these labels and their values, see :func:`scope`).
SCOPE_LABELS = ("listener", "route", "destination", "cluster", "destination_service")
#: ``limits.maxStatsSeries`` by default: above what a large mesh needs (a few series per
#: route destination and status, about 10 per cluster, 30 per listener, 4 per Istio label
#: set), and at about 0.6 KiB per counter and 0.75 KiB per histogram at most about 40 MiB.
DEFAULT_MAX_SERIES = 50_000
#: The ``stats`` label of the series that fold others (no configuration name has it).
OVERFLOW = "overflow"
REMOVED = "removed"
_SCOPE_ORDER = {label: i for i, label in enumerate(SCOPE_LABELS)}


def scope(labels: Labels) -> Labels:
    """The labels of ``labels`` that name configuration (empty: a process-wide series), in
    :data:`SCOPE_LABELS` order."""
    found = [(k, v) for k, v in labels if k in _SCOPE_ORDER]
    if len(found) > 1:
        found.sort(key=lambda kv: _SCOPE_ORDER[kv[0]])
    return tuple(found)


#: Other labels whose values come from the configuration (a rate limit's bucket, a filter's
#: name): a folded series replaces them too.
_NAMED = frozenset((*SCOPE_LABELS, "bucket", "filter", "certificate", "policy"))


def _folded(labels: Labels, kind: str) -> Labels:
    """``labels`` with every configuration name (and what comes from endpoints and peers:
    Istio's ``destination_*`` and ``source_*``, whose principals come from certificates)
    replaced by ``kind``, plus ``stats=kind``: a bounded set (by metric and the values of
    labels such as ``status`` that the engine's code fixes)."""
    out = tuple(
        (k, kind if k in _NAMED or k.startswith(("destination_", "source_")) else v)
        for k, v in labels
        if k != "stats"
    )
    return (*out, ("stats", kind))


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


def _label_text(labels: Labels) -> str:
    """``a="1",b="2"``: the labels, escaped, without braces."""
    return ",".join(f'{k}="{_escape(v)}"' for k, v in labels)


@functools.lru_cache(maxsize=16)
def _le_texts(bounds: tuple[float, ...]) -> tuple[str, ...]:
    """The ``le`` label values of a histogram's buckets, ``+Inf`` last."""
    return (*(f"{bound:g}" for bound in bounds), "+Inf")


T = TypeVar("T")
#: A series' value as shown: a count (``int``) or a gauge's or a sum's (``float``). Not
#: ``float`` alone: a compiled build converts what it holds, and every count read "3.0".
Value: TypeAlias = int | float


def _histogram_pairs(histogram: Histogram) -> list[tuple[str, Value]]:
    """A histogram's Prometheus series and values: ``_bucket`` (cumulative, ``+Inf`` last),
    ``_sum`` and ``_count``; its labels escaped once."""
    name = histogram.name
    inner = _label_text(histogram.labels)
    braced = f"{{{inner}}}" if inner else ""
    bucket = f"{name}_bucket{{{inner}{',' if inner else ''}le="
    pairs: list[tuple[str, Value]] = []
    total = 0
    for le, n in zip(_le_texts(histogram.bounds), histogram.counts, strict=True):
        total += n
        pairs.append((f'{bucket}"{le}"}}', total))
    pairs.append((f"{name}_sum{braced}", histogram.sum))
    pairs.append((f"{name}_count{braced}", total))
    return pairs


def _parts(series: Iterator[list[T]]) -> Iterator[list[list[T]]]:
    """``series`` (the items of one series each) in lists of :data:`PART_SERIES` series."""
    part: list[list[T]] = []
    for items in series:
        part.append(items)
        if len(part) == PART_SERIES:
            yield part
            part = []
    if part:
        yield part


def _text_parts(series: Iterator[list[str]]) -> Iterator[str]:
    """The lines of ``series`` as text, a piece per :data:`PART_SERIES` series."""
    for part in _parts(series):
        yield "\n".join(line for lines in part for line in lines) + "\n"


def series_name(name: str, labels: Labels) -> str:
    """``name{a="1",b="2"}`` (just ``name`` without labels)."""
    if not labels:
        return name
    return f"{name}{{{_label_text(labels)}}}"


class Stats:
    """Every counter and gauge of an engine, at most ``max_series`` of them (see the module's
    docstring for what happens past it)."""

    def __init__(self, max_series: int = DEFAULT_MAX_SERIES) -> None:
        self._series: dict[tuple[str, Labels], Counter] = {}
        self._histograms: dict[tuple[str, Labels], Histogram] = {}
        #: The :func:`scope` of every series that has one (and is not a fold), by key: what
        #: :meth:`prune` reads (computed once, when the series is made).
        self._scopes: dict[tuple[str, Labels], Labels] = {}
        self._histogram_scopes: dict[tuple[str, Labels], Labels] = {}
        self.max_series = max_series
        self._overflow = self._new_counter("metaprotocol_stats_overflow_total", (), ())
        self._removed = self._new_counter("metaprotocol_stats_removed_total", (), ())
        self._count = self._new_counter("metaprotocol_stats_series", (), ())

    @property
    def series_count(self) -> int:
        """How many series exist (a histogram is one, whatever its buckets)."""
        return len(self._series) + len(self._histograms)

    def _full(self, found: Labels) -> bool:
        """A new series of scope ``found`` must fold into the overflow series (counted).

        Process-wide series (no configuration name: a fixed set) are always made.
        """
        if len(self._series) + len(self._histograms) < self.max_series or not found:
            return False
        self._overflow.value += 1
        return True

    def _new_counter(self, name: str, labels: Labels, found: Labels) -> Counter:
        key = (name, labels)
        series = self._series[key] = Counter(name, labels)
        if found:
            self._scopes[key] = found
        return series

    def _fold_counter(self, name: str, labels: Labels, kind: str) -> Counter:
        key = (name, _folded(labels, kind))
        series = self._series.get(key)
        if series is None:
            series = self._new_counter(name, key[1], ())  # a fold is never dropped
        return series

    def _fold_histogram(
        self, name: str, labels: Labels, bounds: Sequence[float], kind: str
    ) -> Histogram:
        key = (name, _folded(labels, kind))
        series = self._histograms.get(key)
        if series is None:
            series = self._histograms[key] = Histogram(name, key[1], bounds)
        return series

    def histogram(self, name: str, bounds: Sequence[float], **labels: str) -> Histogram:
        """The histogram series for ``name`` and ``labels``, created empty on first use."""
        key = (name, tuple(labels.items()))
        series = self._histograms.get(key)
        if series is None:
            found = scope(key[1])
            if self._full(found):
                return self._fold_histogram(name, key[1], bounds, OVERFLOW)
            series = self._histograms[key] = Histogram(name, key[1], bounds)
            if found:
                self._histogram_scopes[key] = found
        return series

    def histograms(self, name: str) -> list[Histogram]:
        """Every series of the histogram ``name``."""
        return [h for (n, _), h in self._histograms.items() if n == name]

    def counter(self, name: str, **labels: str) -> Counter:
        """The series for ``name`` and ``labels``, created at zero on first use."""
        key = (name, tuple(labels.items()))
        series = self._series.get(key)
        if series is None:
            found = scope(key[1])
            if self._full(found):
                return self._fold_counter(name, key[1], OVERFLOW)
            series = self._new_counter(name, key[1], found)
        return series

    def gauge(self, name: str, **labels: str) -> Counter:
        """The gauge series for ``name`` and ``labels`` (a counter that is set, not added to)."""
        return self.counter(name, **labels)

    def replace_gauges(self, name: str, values: dict[Labels, int]) -> None:
        """Make the series of the gauge ``name`` exactly ``values`` (by their labels): the
        others are dropped (counted in ``metaprotocol_stats_removed_total``)."""
        gone = [key for key in self._series if key[0] == name and key[1] not in values]
        for key in gone:
            del self._series[key]
            self._scopes.pop(key, None)
        self._removed.value += len(gone)
        for labels, value in values.items():
            self.gauge(name, **dict(labels)).value = value

    def all_counters(self) -> list[Counter]:
        """Every counter and gauge series now (a list: the caller may let the loop run)."""
        return list(self._series.values())

    def all_histograms(self) -> list[Histogram]:
        """Every histogram series now (a list: the caller may let the loop run)."""
        return list(self._histograms.values())

    def counters(self, name: str) -> list[Counter]:
        """Every series of the counter or gauge ``name``."""
        return [s for (n, _), s in self._series.items() if n == name]

    def prune(self, live: set[Labels]) -> int:
        """Drop every series whose :func:`scope` is not empty and not in ``live``; return how
        many. A counter's value and a histogram's counts are added to the ``stats="removed"``
        series of its name first (a gauge's value means nothing once its object is gone).

        The caller guarantees that nothing holds a series it drops: an object that still
        counts into one (a route of a request in flight) must have its scope in ``live``.
        """
        scopes = self._scopes
        gone = [key for key, found in scopes.items() if found not in live]
        for key in gone:
            del scopes[key]
            series = self._series.pop(key)
            if key[0] not in GAUGES and series.value:
                self._fold_counter(key[0], key[1], REMOVED).value += series.value
        scopes = self._histogram_scopes
        gone_histograms = [key for key, found in scopes.items() if found not in live]
        for key in gone_histograms:
            del scopes[key]
            histogram = self._histograms.pop(key)
            if histogram.sum or any(histogram.counts):
                into = self._fold_histogram(key[0], key[1], histogram.bounds, REMOVED)
                if into.bounds == histogram.bounds:
                    for i, n in enumerate(histogram.counts):
                        into.counts[i] += n
                    into.sum += histogram.sum
        count = len(gone) + len(gone_histograms)
        self._removed.value += count
        return count

    def get(self, name: str, **labels: str) -> int:
        """Current value (0 when the series does not exist)."""
        series = self._series.get((name, tuple(labels.items())))
        return 0 if series is None else series.value

    def total(self, name: str, **labels: str) -> int:
        """Sum over every series of ``name`` whose labels include ``labels``."""
        want = labels.items()
        series = self._series.items()
        return sum(s.value for (n, lab), s in series if n == name and want <= dict(lab).items())

    def snapshot(self) -> dict[str, Value]:
        """``{'name{labels}': value}`` for every series (histograms as their ``_bucket``,
        ``_sum`` and ``_count`` series)."""
        return {key: value for part in self.snapshot_parts() for key, value in part}

    def snapshot_parts(self) -> Iterator[list[tuple[str, Value]]]:
        """:meth:`snapshot`'s pairs in pieces of at most :data:`PART_SERIES` series, as
        :meth:`prometheus_parts` makes its text (the same reasons, the same rules)."""
        counters, histograms = self._families()

        def series() -> Iterator[list[tuple[str, Value]]]:
            for name, family in counters:
                for counter in family:
                    yield [(series_name(name, counter.labels), counter.value)]
            for _, hists in histograms:
                yield from map(_histogram_pairs, hists)

        for part in _parts(series()):
            yield [pair for pairs in part for pair in pairs]

    def prometheus(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        return "".join(self.prometheus_parts())

    def worker_parts(self) -> Iterator[str]:
        """The series for the supervisor of ``--workers N`` (:mod:`.stats_merge`), in pieces
        of at most :data:`PART_SERIES` series: a line ``# name kind help`` before each
        family's, then a line per series, its labels written once (a histogram's
        Prometheus text repeats them on each of its 21 lines): ``labels<TAB>value``, or for
        a histogram ``labels<TAB>le,le,...<TAB>count count ...<TAB>sum`` (per bucket, not
        cumulative). ``labels`` is the escaped text inside the braces, empty for none."""
        counters, histograms = self._families()

        def series() -> Iterator[list[str]]:
            for name, family in counters:
                kind = "gauge" if name in GAUGES else "counter"
                head = [f"# {name} {kind} {HELP.get(name, name)}"]
                for counter in family:
                    yield [*head, f"{_label_text(counter.labels)}\t{counter.value!r}"]
                    head = []
            for name, hists in histograms:
                head = [f"# {name} histogram {HELP.get(name, name)}"]
                for h in hists:
                    les = ",".join(_le_texts(h.bounds))
                    counts = " ".join(map(str, h.counts))
                    yield [*head, f"{_label_text(h.labels)}\t{les}\t{counts}\t{h.sum!r}"]
                    head = []

        return _text_parts(series())

    def prometheus_parts(self) -> Iterator[str]:
        """:meth:`prometheus`'s text in pieces of at most :data:`PART_SERIES` series, so that
        the caller can let the event loop run between them: at ``maxStatsSeries`` series of
        Istio's labels the text is hundreds of MB, and made in one go it held every request
        for seconds. The series are those that exist when the iteration starts; each piece
        reads their values as it is made. Each series' labels are escaped once, not once per
        line (a histogram has a line per bucket)."""
        counters, histograms = self._families()

        def series() -> Iterator[list[str]]:
            for name, family in counters:
                kind = "gauge" if name in GAUGES else "counter"
                head = [f"# HELP {name} {HELP.get(name, name)}", f"# TYPE {name} {kind}"]
                for counter in family:
                    yield [*head, f"{series_name(name, counter.labels)} {counter.value}"]
                    head = []
            for name, hists in histograms:
                head = [f"# HELP {name} {HELP.get(name, name)}", f"# TYPE {name} histogram"]
                for h in hists:
                    # In full (``!r``): six significant digits (``:g``) wrote 1 234 567 as
                    # 1.23457e+06.
                    yield [*head, *(f"{key} {value!r}" for key, value in _histogram_pairs(h))]
                    head = []

        return _text_parts(series())

    def _families(
        self,
    ) -> tuple[list[tuple[str, list[Counter]]], list[tuple[str, list[Histogram]]]]:
        """The counters and the histograms that exist now, grouped by name, names sorted
        (the series count refreshed first: it is one of them)."""
        self._count.value = self.series_count
        counters: dict[str, list[Counter]] = {}
        for (name, _), series in self._series.items():
            counters.setdefault(name, []).append(series)
        histograms: dict[str, list[Histogram]] = {}
        for (name, _), histogram in self._histograms.items():
            histograms.setdefault(name, []).append(histogram)
        return sorted(counters.items()), sorted(histograms.items())
