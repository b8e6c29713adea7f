"""Time of one ``Balancer.pick()`` per policy, for four endpoints of equal weights (the
unweighted balancers) or, with ``--weighted``, of weights 1, 2, 3, 4.

Run: ``.venv/bin/python tests/proxy/bench_balancers.py [--weighted]``. Best of 7 runs of
200 000 picks each; compare a checkout before and after a change to the balancers.
"""

from __future__ import annotations

import sys
import timeit
from functools import partial

from metaprotocol_sdk import Attributes, MessageType, Metadata
from metaprotocol_sdk.proxy.balancer import make_balancer
from metaprotocol_sdk.proxy.config import LoadBalancer
from metaprotocol_sdk.proxy.upstream import UpstreamHost

POLICIES = {
    "ROUND_ROBIN": LoadBalancer(),
    "RANDOM": LoadBalancer("RANDOM"),
    "LEAST_REQUEST": LoadBalancer("LEAST_REQUEST"),
    "CONSISTENT_HASH": LoadBalancer("CONSISTENT_HASH", "user"),
}


def main(weighted: bool, picks: int = 200_000) -> None:
    request = Metadata(MessageType.Request, attributes=Attributes({"user": "alice"}))
    for name, policy in POLICIES.items():
        hosts = [UpstreamHost(f"10.0.0.{i}", 9000) for i in range(4)]
        if weighted:
            for i, host in enumerate(hosts):
                host.weight = i + 1
        balancer = make_balancer(policy, hosts)
        best = min(timeit.repeat(partial(balancer.pick, request), number=picks, repeat=7))
        kind = type(balancer).__name__
        print(f"{name:16} {kind:22} {best / picks * 1e9:7.1f} ns per pick")


if __name__ == "__main__":
    main("--weighted" in sys.argv[1:])
