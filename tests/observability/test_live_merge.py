"""The supervisor's live data (``merge_live``): the workers' counts summed, and quantiles from
the summed histograms, not averaged from the workers' own quantiles."""

from __future__ import annotations

from typing import Any

from metaprotocol_sdk.proxy.admin_page import DURATION, merge_live
from metaprotocol_sdk.proxy.stats import DURATION_BUCKETS_MS, Histogram


def worker(values: list[float], errors: int, history: list[int]) -> dict[str, Any]:
    """One worker's live data with one route and destination that saw ``values`` (ms)."""
    histogram = Histogram(DURATION, (), DURATION_BUCKETS_MS)
    for v in values:
        histogram.observe(v)
    n = len(values)
    dest = {
        "destination": "svc|v1",
        "weight": 100.0,
        "requests": n,
        "errors": errors,
        "statuses": {"Ok": n - errors, "Timeout": errors},
        "buckets": list(histogram.counts),
    }
    return {
        "totals": {"requests": n, "errors": errors, "local_replies": errors},
        "routes": [{"listener": "l", "route": "r", "destinations": [dest]}],
        "local_replies": {"Timeout": errors},
        "connections": 2,
        "pending": 1,
        "upstream_connect_errors": 0,
        "history": [
            {"time": float(i), "requests": c, "errors": 0, "local_replies": 0}
            for i, c in enumerate(history)
        ],
    }


def test_counts_are_summed_and_quantiles_are_those_of_every_request() -> None:
    fast = [1.0] * 90  # one worker answered quickly ...
    slow = [900.0] * 10  # ... the other slowly
    merged = merge_live([worker(fast, 0, [5, 6]), worker(slow, 3, [7]), {"broken": True}])
    assert merged["workers"] == 2
    assert merged["totals"] == {"requests": 100, "errors": 3, "local_replies": 3}
    (route,) = merged["routes"]
    (dest,) = route["destinations"]
    assert (route["requests"], route["errors"]) == (100, 3)
    assert dest["statuses"] == {"Ok": 97, "Timeout": 3} and dest["share"] == 100
    everything = Histogram(DURATION, (), DURATION_BUCKETS_MS)
    for v in fast + slow:
        everything.observe(v)
    assert dest["buckets"] == everything.counts
    assert dest["p50"] == round(everything.quantile(0.5) or 0, 3)
    assert dest["p99"] == round(everything.quantile(0.99) or 0, 3)
    assert dest["p99"] > 500  # an average of the workers' p99s would also be; the p50 is not
    assert dest["p50"] < 5
    assert (merged["connections"], merged["pending"]) == (4, 2)
    assert merged["local_replies"] == {"Timeout": 3}
    # Histories added newest with newest: [5, 6] and [7] give [5, 13].
    assert [p["requests"] for p in merged["history"]] == [5, 13]


def test_a_worker_without_buckets_adds_counts_but_no_quantiles() -> None:
    part = worker([2.0, 3.0], 0, [])
    part["routes"][0]["destinations"][0]["buckets"] = ["x"]
    merged = merge_live([part])
    dest = merged["routes"][0]["destinations"][0]
    assert dest["requests"] == 2 and dest["p50"] is None and dest["buckets"] is None
