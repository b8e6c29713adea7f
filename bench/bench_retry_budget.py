"""What a retry budget's decision costs, by the cluster's number of endpoints.

A budget is checked only when a request fails and its route would retry it: the decision
adds up the requests in flight of the cluster's endpoints (one pass; no count is kept per
request, so a cluster without a budget pays nothing for it). The table gives that decision
with real ``UpstreamHost`` objects, beside the per-request price of the alternative (a
cluster-wide count raised at each send and lowered at each answer, on every cluster).

Run: ``./dev bench retry_budget`` or ``.venv/bin/python bench/bench_retry_budget.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import per_call_us, print_table

from metaprotocol_sdk.proxy.config.models import RetryBudget
from metaprotocol_sdk.proxy.upstream import UpstreamHost


class _Cluster:
    """What the decision reads of a cluster (a plain class, as ``Cluster``)."""

    def __init__(self, hosts: list[UpstreamHost]) -> None:
        self.hosts = hosts
        self.retrying = 2
        self.retry_budget = RetryBudget()
        self.in_flight = 0


def main() -> None:
    """Print the decision's cost for 1 to 1000 endpoints, and the per-request count's."""
    rows: list[list[object]] = []
    for n in (1, 10, 100, 1000):
        hosts = [UpstreamHost("127.0.0.1", 1000 + i, {}, 1, 0) for i in range(n)]
        for i, host in enumerate(hosts):
            host.active = i % 7
        cluster = _Cluster(hosts)
        budget = cluster.retry_budget

        def decide(c: _Cluster = cluster, b: RetryBudget = budget) -> bool:
            return c.retrying >= b.allowed(sum(h.active for h in c.hosts) - 1)

        rows.append([n, per_call_us(decide) * 1000])
    print_table("retryBudget decision (per retry decided)", ["endpoints", "ns"], rows)
    cluster = _Cluster([])

    def count(c: _Cluster = cluster) -> None:
        c.in_flight += 1
        c.in_flight -= 1

    print_table(
        "the alternative: a cluster-wide count kept on every request",
        ["", "ns per request"],
        [["+1 at send, -1 at the answer", per_call_us(count) * 1000]],
    )


if __name__ == "__main__":
    main()
