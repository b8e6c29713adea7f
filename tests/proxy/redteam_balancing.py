"""The red-team measurements of load balancing (helper-101), as quoted in
``docs/load-balancing.md``, ``docs/limits.md`` and the commit messages.

Run: ``.venv/bin/python tests/proxy/redteam_balancing.py WHAT`` from the tree's root, WHAT:

- ``subsets K RING``: an engine started over one service whose K endpoints are K subsets,
  each routed to, with ``ringHash.minimumRingSize: RING`` (``maglev`` instead of a number: a
  Maglev table of 131 071): the start's time and the process's peak RSS;
- ``ejection``: a hash ring's build, and the ring of the healthy endpoints after one ejection
  built again or taken from the whole ring (3, 1000 and 20 000 endpoints);
- ``maglev``: 100 endpoints of 1000 ejected one by one, a Maglev table built at each;
- ``dump K M``: ``/config_dump``'s build for K subsets of M endpoints;
- ``warmup N``: one warm-up step (weights and rebuild) of a cluster of N endpoints.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from dataclasses import dataclass

from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.balancer import make_balancer
from metaprotocol_sdk.proxy.config.models import LoadBalancer, Warmup
from metaprotocol_sdk.proxy.slow_start import warming_weights


@dataclass(eq=False)
class Host:
    key: str
    weight: int = 1
    active: int = 0


def hosts(n: int) -> list[Host]:
    return [Host(f"10.{i // 60000}.{(i // 250) % 240}.{i % 250}:9000") for i in range(n)]


def mesh(subsets: int, per: int, balancer: str) -> str:
    """One service of ``subsets * per`` endpoints spread over ``subsets`` subsets."""
    n = subsets * per
    eps = "\n".join(
        f"    - {{address: 10.{i // 60000}.{(i // 250) % 240}.{i % 250}, "
        f"ports: {{tcp-metaprotocol-kv-svc: {9001 + i % 50000}}}, labels: {{v: s{i % subsets}}}}}"
        for i in range(n)
    )
    names = "\n".join(f"    - {{name: s{i}, labels: {{v: s{i}}}}}" for i in range(subsets))
    routes = "\n".join(
        f"    - {{name: r{i}, match: {{attributes: {{to: {{exact: s{i}}}}}}}, "
        f"route: [{{destination: {{host: svc.test, subset: s{i}}}}}]}}"
        for i in range(subsets)
    )
    return f"""\
kind: ApplicationProtocol
metadata: {{name: kv}}
spec: {{protocol: kv, codec: "metaprotocol_sdk.examples.kv:KVCodec"}}
---
kind: ServiceEntry
metadata: {{name: svc}}
spec:
  hosts: [svc.test]
  ports: [{{number: 9000, name: tcp-metaprotocol-kv-svc, protocol: TCP}}]
  resolution: STATIC
  endpoints:
{eps}
---
kind: DestinationRule
metadata: {{name: svc}}
spec:
  host: svc.test
  trafficPolicy: {{loadBalancer: {balancer}}}
  subsets:
{names}
---
kind: MetaRouter
metadata: {{name: svc}}
spec:
  hosts: [svc.test]
  routes:
{routes}
---
kind: ProxyConfig
metadata: {{name: engine}}
spec:
  listeners: [{{host: svc.test, port: 9000, bind: '127.0.0.1:0'}}]
  watchdog: {{missTimeout: 100s, megamissTimeout: 100s}}
"""


def subsets(count: int, ring: str) -> None:
    algorithm = (
        "maglev: {tableSize: 131071}"
        if ring == "maglev"
        else f"ringHash: {{minimumRingSize: {ring}}}"
    )
    config = loads_config(mesh(count, 1, f"{{consistentHash: {{useSourceIp: true, {algorithm}}}}}"))

    async def main() -> None:
        engine = Engine(config)
        start = time.perf_counter()
        try:
            await engine.start()
            print(
                f"started in {time.perf_counter() - start:.2f} s, {len(engine.clusters)} clusters"
            )
            await engine.stop()
        except Exception as exc:  # what the engine said is the result
            print(f"refused after {time.perf_counter() - start:.2f} s: {str(exc)[:200]}")

    asyncio.run(main())
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")


def ejection() -> None:
    for n, minimum in ((3, 131072), (1000, 131072), (20000, 1024)):
        all_of = hosts(n)
        policy = LoadBalancer("CONSISTENT_HASH", "user", ring_size=minimum)
        start = time.perf_counter()
        whole = make_balancer(policy, all_of, all_of)
        built = time.perf_counter() - start
        start = time.perf_counter()
        make_balancer(policy, all_of[1:], all_of)
        again = time.perf_counter() - start
        start = time.perf_counter()
        make_balancer(policy, all_of[1:], all_of, whole)  # type: ignore[arg-type]
        taken = time.perf_counter() - start
        print(
            f"{n} endpoints: build {built:.3f} s, after an ejection "
            f"{again:.3f} s built again, {taken:.4f} s taken from the whole ring"
        )


def maglev() -> None:
    for size in (65537, 131071):
        all_of = hosts(1000)
        policy = LoadBalancer("CONSISTENT_HASH", "user", maglev_table_size=size)
        start = time.perf_counter()
        for k in range(1, 101):
            make_balancer(policy, all_of[k:], all_of)
        print(
            f"table {size}, 100 of 1000 endpoints ejected one by one: "
            f"{time.perf_counter() - start:.2f} s"
        )


def dump(count: int, per: int) -> None:
    config = loads_config(mesh(count, per, "{simple: ROUND_ROBIN}"))

    async def main() -> None:
        engine = Engine(config)
        await engine.start()
        start = time.perf_counter()
        text = json.dumps(engine.config_dump(), indent=2, default=str)
        print(
            f"{count * per} endpoints: {len(text) / 1e6:.1f} MB "
            f"in {time.perf_counter() - start:.3f} s"
        )
        await engine.stop()

    asyncio.run(main())


def warmup(n: int) -> None:
    all_of = hosts(n)
    starts = [0.0] * (n - 1) + [9.0]
    start = time.perf_counter()
    weights = warming_weights([1] * n, starts, 10.0, Warmup(20.0))
    assert weights is not None
    for host, weight in zip(all_of, weights, strict=True):
        host.weight = weight
    make_balancer(LoadBalancer(), all_of, all_of)
    print(f"{n} endpoints: one warm-up step {time.perf_counter() - start:.3f} s")


if __name__ == "__main__":
    what, args = sys.argv[1], sys.argv[2:]
    if what == "subsets":
        subsets(int(args[0]), args[1])
    elif what == "ejection":
        ejection()
    elif what == "maglev":
        maglev()
    elif what == "dump":
        dump(int(args[0]), int(args[1]))
    elif what == "warmup":
        warmup(int(args[0]))
    else:
        sys.exit(__doc__)
