"""Counters and gauges as plain ints behind precomputed label tuples; Prometheus text output.

Names follow one scheme: ``metaprotocol_<what>_total`` for counters and
``metaprotocol_<what>_active`` (or ``_pending``) for gauges, labelled by ``listener``,
``route``, ``destination``, ``cluster``, ``status`` or ``type``.
"""

from __future__ import annotations

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
    "metaprotocol_requests_pending": "Requests waiting for an upstream response.",
    "metaprotocol_mutations_skipped_total": "Replies forwarded without a response mutation "
    "they cannot carry, by listener and route.",
    "metaprotocol_admin_requests_total": "Admin endpoint replies, by HTTP status code.",
    "metaprotocol_admin_connections_rejected_total": "Admin connections over the limit (503).",
    "metaprotocol_buffered_bytes": "Bytes held in buffers (the overload budget's measure).",
    "metaprotocol_overloaded": "1 while new requests and connections are refused for overload.",
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

    def counter(self, name: str, **labels: str) -> Counter:
        """The series for ``name`` and ``labels``, created at zero on first use."""
        key = (name, tuple(labels.items()))
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = Counter(name, key[1])
        return series

    gauge = counter

    def get(self, name: str, **labels: str) -> int:
        """Current value (0 when the series does not exist)."""
        series = self._series.get((name, tuple(labels.items())))
        return 0 if series is None else series.value

    def total(self, name: str, **labels: str) -> int:
        """Sum over every series of ``name`` whose labels include ``labels``."""
        want = labels.items()
        series = self._series.items()
        return sum(s.value for (n, lab), s in series if n == name and want <= dict(lab).items())

    def snapshot(self) -> dict[str, int]:
        """``{'name{labels}': value}`` for every series."""
        return {series_name(n, lab): s.value for (n, lab), s in self._series.items()}

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
        return "\n".join(lines) + "\n"
