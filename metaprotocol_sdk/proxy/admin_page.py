"""The admin endpoint's live page (``/``) and the JSON it polls (``/stats/live``).

The page (``admin_page.html``, shipped with the package) is self-contained: no external script,
style or font, so it works on an air-gapped host. It fetches :func:`live_data` every second.

:func:`live_data` reads the engine's stats only when asked, so the data path pays nothing for
it. The recent history (requests, errors and local replies per interval) is a ring of
:data:`HISTORY_SIZE` totals sampled every :data:`HISTORY_INTERVAL` seconds by a timer on the
event loop: bounded memory (the ring holds three integers per sample), and a sample costs one
walk over three counter families, whatever the traffic.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from importlib import resources
from itertools import pairwise
from typing import TYPE_CHECKING, Any, NamedTuple

from .stats import DURATION_BUCKETS_MS, Histogram, Stats

if TYPE_CHECKING:
    from .engine import Engine
    from .listening import ServerGroup

#: Seconds between two samples of the history ring.
HISTORY_INTERVAL = 5.0
#: Samples kept: five minutes at the default interval.
HISTORY_SIZE = 60
#: The percentiles shown per destination and per route.
QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
DURATION = "metaprotocol_request_duration_milliseconds"


def page_html() -> bytes:
    """The page's HTML (read once from the package; cached by the caller)."""
    return (
        resources.files(__package__ or "metaprotocol_sdk.proxy")
        .joinpath("admin_page.html")
        .read_bytes()
    )


class Totals(NamedTuple):
    """Engine-wide counts at one instant."""

    requests: int
    errors: int
    local_replies: int


def totals(stats: Stats) -> Totals:
    """Requests (every status), errors (status other than ``Ok``) and local replies so far."""
    requests = errors = 0
    for series in stats.counters("metaprotocol_requests_total"):
        requests += series.value
        if ("status", "Ok") not in series.labels:
            errors += series.value
    local = sum(s.value for s in stats.counters("metaprotocol_local_replies_total"))
    return Totals(requests, errors, local)


class History:
    """A bounded ring of :class:`Totals` samples with their times."""

    def __init__(self, size: int = HISTORY_SIZE) -> None:
        self.samples: deque[tuple[float, Totals]] = deque(maxlen=size)

    def sample(self, now: float, values: Totals) -> None:
        """Record ``values`` as of ``now`` (the oldest sample goes once the ring is full)."""
        self.samples.append((now, values))

    def points(self) -> list[dict[str, float]]:
        """Per interval between consecutive samples: its end time and the counts in it."""
        out: list[dict[str, float]] = []
        for (_, before), (t, after) in pairwise(self.samples):
            out.append(
                {
                    "time": round(t, 3),
                    "requests": after.requests - before.requests,
                    "errors": after.errors - before.errors,
                    "local_replies": after.local_replies - before.local_replies,
                }
            )
        return out


class Sampler:
    """Samples ``stats`` into ``history`` every ``interval`` s while ``server`` serves.

    A timer on the event loop (the engine's admin side), not the data path: each tick costs one
    walk over the request and local-reply counters. The first tick, the baseline, runs at once.
    """

    def __init__(
        self,
        server: asyncio.Server | ServerGroup,
        stats: Stats,
        history: History,
        interval: float = HISTORY_INTERVAL,
    ) -> None:
        self.server = server
        self.stats = stats
        self.history = history
        self.interval = interval
        #: The next tick (``None`` once the server stopped serving).
        self.handle: asyncio.TimerHandle | None = None
        self.tick()

    def tick(self) -> None:
        """Take one sample and schedule the next; stop once the server no longer serves."""
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        if not self.server.is_serving():  # the engine closed its admin endpoint
            return
        self.history.sample(time.time(), totals(self.stats))
        self.handle = asyncio.get_running_loop().call_later(self.interval, self.tick)


def _quantiles(histogram: Histogram | None) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, q in QUANTILES:
        value = None if histogram is None else histogram.quantile(q)
        out[name] = None if value is None else round(value, 3)
    return out


def _merged(histograms: list[Histogram]) -> Histogram | None:
    """One histogram counting every observation of ``histograms`` (same bounds)."""
    if not histograms:
        return None
    merged = Histogram(DURATION, (), DURATION_BUCKETS_MS)
    for h in histograms:
        if h.bounds == merged.bounds:
            merged.counts = [a + b for a, b in zip(merged.counts, h.counts, strict=True)]
            merged.sum += h.sum
    return merged


def _weights(engine: Engine) -> dict[tuple[str, str, str], int]:
    """The configured weight of every (listener, route, destination)."""
    out: dict[tuple[str, str, str], int] = {}
    for runtime in engine.listeners.values():
        for route in runtime.table.routes:
            for target in route.targets:
                out[(runtime.name, route.name, target.name)] = target.weight
    return out


def live_data(engine: Engine, history: History) -> dict[str, Any]:
    """What the page shows, as JSON-ready data.

    ``routes``: per listener and route, the requests and per destination the requests, their
    split (``share``: percent of the route's requests; ``weight``: percent configured), the
    errors and the p50/p95/p99 of ``metaprotocol_request_duration_milliseconds`` (estimated
    from the histogram's buckets, as Prometheus's ``histogram_quantile``). ``local_replies``:
    totals by error type (the types seen). ``history``: the counts per sampled interval, oldest
    first.
    """
    stats = engine.stats
    weights = _weights(engine)
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}

    def row(listener: str, route: str, destination: str) -> dict[str, Any]:
        key = (listener, route, destination)
        found = rows.get(key)
        if found is None:
            found = rows[key] = {
                "destination": destination,
                "weight": weights.get(key),
                "requests": 0,
                "errors": 0,
                "statuses": {},
                "histogram": None,
            }
        return found

    for key in weights:
        row(*key)
    for series in stats.counters("metaprotocol_requests_total"):
        labels = dict(series.labels)
        r = row(labels["listener"], labels["route"], labels["destination"])
        status = labels.get("status", "")
        r["requests"] += series.value
        r["statuses"][status] = r["statuses"].get(status, 0) + series.value
        if status != "Ok":
            r["errors"] += series.value
    for histogram in stats.histograms(DURATION):
        labels = dict(histogram.labels)
        row(labels["listener"], labels["route"], labels["destination"])["histogram"] = histogram

    routes: dict[tuple[str, str], dict[str, Any]] = {}
    for (listener, route, _), r in rows.items():  # configured order, then the rest
        group = routes.setdefault(
            (listener, route),
            {"listener": listener, "route": route, "requests": 0, "errors": 0, "destinations": []},
        )
        group["requests"] += r["requests"]
        group["errors"] += r["errors"]
        group["destinations"].append(r)
    out_routes = []
    for group in routes.values():
        dests = group["destinations"]
        configured = sum(d["weight"] or 0 for d in dests)
        histograms = []
        for d in dests:
            histogram = d.pop("histogram")
            if histogram is not None:
                histograms.append(histogram)
            # Per bucket of DURATION_BUCKETS_MS (and +Inf): what a supervisor of several
            # workers adds up to give the quantiles of them all (merge_live).
            d["buckets"] = list(histogram.counts) if histogram is not None else None
            d.update(_quantiles(histogram))
            d["share"] = (
                round(100 * d["requests"] / group["requests"], 1) if group["requests"] else 0
            )
            weight = d["weight"]
            d["weight"] = round(100 * weight / configured, 1) if weight and configured else None
        group.update(_quantiles(_merged(histograms)))
        out_routes.append(group)

    local: dict[str, int] = {}
    for series in stats.counters("metaprotocol_local_replies_total"):
        kind = dict(series.labels).get("type", "")
        local[kind] = local.get(kind, 0) + series.value
    now = totals(stats)
    local = {kind: n for kind, n in local.items() if n}  # every type's series starts at 0
    return {
        "time": round(time.time(), 3),
        "totals": now._asdict(),
        "routes": out_routes,
        "local_replies": dict(sorted(local.items())),
        "upstream_connect_errors": sum(
            s.value for s in stats.counters("metaprotocol_upstream_connect_errors_total")
        ),
        "connections": sum(
            s.value for s in stats.counters("metaprotocol_downstream_connections_active")
        ),
        "pending": stats.get("metaprotocol_requests_pending"),
        "streams": sum(s.value for s in stats.counters("metaprotocol_streams_active")),
        "history_interval": HISTORY_INTERVAL,
        "history": history.points(),
    }


def _histogram(counts: Any) -> Histogram | None:
    """A duration histogram from a worker's ``buckets`` (``None`` if absent or malformed)."""
    if not isinstance(counts, list) or len(counts) != len(DURATION_BUCKETS_MS) + 1:
        return None
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        return None
    histogram = Histogram(DURATION, (), DURATION_BUCKETS_MS)
    histogram.counts = list(counts)
    return histogram


def merge_live(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """The live data of several workers (each :func:`live_data`) as one engine's.

    Counts are summed; the quantiles come from the summed histograms (``buckets``), so they
    are those of every request, not an average of the workers'; shares are recomputed and the
    configured weights taken from the first worker. Each worker samples its history on its
    own timer: intervals are added newest with newest. An answer without ``routes`` and
    ``totals`` (a worker that failed to answer in full) is left out; ``workers`` says how
    many were merged.
    """
    totals = {"requests": 0, "errors": 0, "local_replies": 0}
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    dests: dict[tuple[str, str, str], dict[str, Any]] = {}
    histograms: dict[tuple[str, str, str], list[Histogram]] = {}
    local: dict[str, int] = {}
    extra = {"upstream_connect_errors": 0, "connections": 0, "pending": 0, "streams": 0}
    histories: list[list[dict[str, Any]]] = []
    merged_from = 0
    for answer in answers:
        try:
            routes = list(answer["routes"])
            part_totals = {k: int(answer["totals"][k]) for k in totals}
        except (KeyError, TypeError, ValueError):
            continue
        merged_from += 1
        for k, v in part_totals.items():
            totals[k] += v
        for group in routes:
            if not isinstance(group, dict):
                continue
            gkey = (str(group.get("listener")), str(group.get("route")))
            g = groups.setdefault(
                gkey,
                {"listener": gkey[0], "route": gkey[1], "requests": 0, "errors": 0, "dests": []},
            )
            for d in group.get("destinations") or ():
                if not isinstance(d, dict):
                    continue
                dkey = (*gkey, str(d.get("destination")))
                mine = dests.get(dkey)
                if mine is None:
                    mine = dests[dkey] = {
                        "destination": dkey[2],
                        "weight": d.get("weight"),
                        "requests": 0,
                        "errors": 0,
                        "statuses": {},
                    }
                    g["dests"].append(dkey)
                    histograms[dkey] = []
                requests, errors = int(d.get("requests") or 0), int(d.get("errors") or 0)
                mine["requests"] += requests
                mine["errors"] += errors
                g["requests"] += requests
                g["errors"] += errors
                for status, n in (d.get("statuses") or {}).items():
                    mine["statuses"][str(status)] = mine["statuses"].get(str(status), 0) + int(n)
                histogram = _histogram(d.get("buckets"))
                if histogram is not None:
                    histograms[dkey].append(histogram)
        for kind, n in (answer.get("local_replies") or {}).items():
            local[str(kind)] = local.get(str(kind), 0) + int(n)
        for k in extra:
            extra[k] += int(answer.get(k) or 0)
        history = answer.get("history")
        if isinstance(history, list):
            histories.append(history)
    out_routes = []
    for g in groups.values():
        route_histograms = []
        destinations = []
        for dkey in g.pop("dests"):
            d = dests[dkey]
            histogram = _merged(histograms[dkey])
            if histogram is not None:
                route_histograms.append(histogram)
            d["buckets"] = list(histogram.counts) if histogram is not None else None
            d.update(_quantiles(histogram))
            d["share"] = round(100 * d["requests"] / g["requests"], 1) if g["requests"] else 0
            destinations.append(d)
        g["destinations"] = destinations
        g.update(_quantiles(_merged(route_histograms)))
        out_routes.append(g)
    return {
        "time": round(time.time(), 3),
        "totals": totals,
        "routes": out_routes,
        "local_replies": dict(sorted(local.items())),
        **extra,
        "history_interval": HISTORY_INTERVAL,
        "history": _merge_histories(histories),
        "workers": merged_from,
    }


def _merge_histories(histories: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Interval counts added newest with newest; the times are the first history's."""
    longest = max((len(h) for h in histories), default=0)
    out: list[dict[str, Any]] = []
    for back in range(longest, 0, -1):
        point: dict[str, Any] = {"time": None, "requests": 0, "errors": 0, "local_replies": 0}
        for history in histories:
            if back > len(history) or not isinstance(history[-back], dict):
                continue
            item = history[-back]
            if point["time"] is None:
                point["time"] = item.get("time")
            for k in ("requests", "errors", "local_replies"):
                point[k] += int(item.get(k) or 0)
        out.append(point)
    return out
