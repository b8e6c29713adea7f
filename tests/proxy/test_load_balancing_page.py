"""docs/load-balancing.md cannot drift: its opening example is a whole configuration that
loads, and what its comments say is in force."""

from __future__ import annotations

import re
from pathlib import Path

from metaprotocol_sdk.proxy import loads_config
from metaprotocol_sdk.proxy.locality import failover_priorities

PAGE = Path(__file__).resolve().parents[2] / "docs" / "load-balancing.md"
BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.S | re.M)


def test_the_opening_example_loads_and_sets_what_it_says() -> None:
    example = BLOCK.findall(PAGE.read_text(encoding="utf-8"))[0]
    config = loads_config(example, source="docs/load-balancing.md")
    rule = config.destination_rules["greeter.example"]
    top = rule.policy.load_balancer
    assert top is not None and top.policy == "LEAST_REQUEST"
    assert top.warmup is not None and top.warmup.duration == 120.0
    assert top.locality is not None and top.locality.failover == (("us-east1", "europe-west1"),)
    assert rule.policy.outlier_detection is not None
    # v2's loadBalancer replaces the rule's whole: a Maglev hash, no warm-up, no failover rule.
    v2 = rule.subsets["v2"].policy.load_balancer
    assert v2 is not None and v2.policy == "CONSISTENT_HASH"
    assert (v2.hash_attribute, v2.maglev_table_size, v2.warmup) == ("user", 65537, None)
    # v1 keeps the rule's, and its endpoints fail over by locality from the engine's.
    assert rule.subsets["v1"].policy.load_balancer == top
    own = config.proxy.telemetry.workload.locality
    assert own == "us-east1/us-east1-b"
    localities = ["us-east1/us-east1-b", "us-east1/us-east1-c", "europe-west1/europe-west1-b"]
    assert failover_priorities(own, localities, top.locality) == [0, 1, 2]
