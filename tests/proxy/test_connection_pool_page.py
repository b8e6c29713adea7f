"""docs/connection-pool.md cannot drift: its opening example is a whole configuration that
loads, and what its comments say is in force in the clusters the engine builds from it; its
other YAML blocks load over it, and it names every field of the loader's tables it covers."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import yaml
from proxy_kit import engine_for

from metaprotocol_sdk.examples.kv import KVCodec
from metaprotocol_sdk.proxy import loads_config
from metaprotocol_sdk.proxy.config import fields
from metaprotocol_sdk.proxy.config.models import ConnectionPool, RetryBudget

PAGE = Path(__file__).resolve().parents[2] / "docs" / "connection-pool.md"
BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.S | re.M)


def blocks() -> list[str]:
    return BLOCK.findall(PAGE.read_text(encoding="utf-8"))


def example() -> str:
    return blocks()[0]


#: The example's documents a block of its own replaces.
KINDS = ("DestinationRule", "MetaRouter")


def test_the_opening_example_loads_and_sets_what_it_says() -> None:
    config = loads_config(example(), source="docs/connection-pool.md")
    assert KVCodec.capabilities.rewrite_request_id  # "rewrites request ids"
    rule = config.destination_rules["greeter.example"]
    pool = rule.policy.connection_pool
    assert pool is not None
    assert (pool.max_connections, pool.connect_timeout, pool.max_connection_duration) == (
        100,
        2.0,
        3600.0,
    )
    assert pool.keepalive is not None
    assert (pool.keepalive.time, pool.keepalive.interval) == (60.0, 10.0)
    assert (pool.max_requests, pool.max_pending_requests, pool.max_concurrent_streams) == (
        1000,
        64,
        32,
    )
    assert (pool.max_requests_per_connection, pool.idle_timeout, pool.max_retries) == (
        10000,
        300.0,
        3,
    )
    assert rule.policy.retry_budget is None and rule.policy.proxy_protocol is None
    # v1 keeps the rule's policy; v2's connectionPool replaces the rule's whole.
    assert rule.subsets["v1"].policy == rule.policy
    v2 = rule.subsets["v2"].policy
    assert v2.connection_pool == ConnectionPool(max_requests=100)
    assert v2.retry_budget == RetryBudget(percent=20.0, min_retry_concurrency=3)
    assert v2.proxy_protocol is not None and v2.proxy_protocol.name == "V2"
    (route,) = config.routers["greeter.example"].routes
    assert route.timeout == 3.0 and route.retries is not None
    assert route.retries.retry_on == {"connect-failure", "reset", "unavailable"}
    assert config.proxy.connections_per_endpoint == 2


def test_the_clusters_built_from_it_pool_as_its_comments_say() -> None:
    """v1's connections are shared and checked against the rule's limits; v2's are each
    client's own (its PROXY protocol header), with a retry budget and no maxRetries."""
    text = example().replace('bind: "127.0.0.1:9000"', 'bind: "127.0.0.1:0"')
    assert text != example()

    async def main() -> None:
        async with engine_for(text) as engine:
            v1 = engine.clusters["outbound|9000|v1|greeter.example"]
            v2 = engine.clusters["outbound|9000|v2|greeter.example"]
            assert v1.shared and not v2.shared
            assert (v1.stream_cap, v1.connect_timeout, v1.idle_timeout) == (32, 2.0, 300.0)
            assert v1.max_retries == 3 and v1.retry_budget is None
            assert v2.retry_budget is not None and v2.max_retries == 0 and v2.limits_retries
            assert v2.request_limits and v2.stream_cap == 0
            assert engine.connections_per_endpoint == 2

    asyncio.run(main())


@pytest.mark.parametrize("block", blocks()[1:])
def test_each_other_block_loads_over_the_example_and_is_in_force(block: str) -> None:
    own = [d for d in yaml.safe_load_all(block) if d]
    assert [d["kind"] for d in own] == ["DestinationRule"], "each is a whole DestinationRule"
    # The example without its rule, nor its routes (to subsets the block may not have).
    base = [d for d in yaml.safe_load_all(example()) if d["kind"] not in KINDS]
    config = loads_config(yaml.safe_dump_all(base + own, sort_keys=False), source=str(PAGE))
    policy = config.destination_rules["greeter.example"].policy
    assert policy.connection_pool or policy.retry_budget or policy.proxy_protocol or policy.tunnel


def test_the_page_names_every_field_the_loader_knows() -> None:
    # A field added to (or refused by) the loader's tables must be described on the page.
    text = PAGE.read_text("utf-8")
    tables = (
        fields.CONNECTION_POOL,
        fields.TCP_POOL,
        fields.HTTP_POOL,
        fields.TCP_KEEPALIVE,
        fields.RETRY_BUDGET,
        fields.PROXY_PROTOCOL,
        fields.TUNNEL,
    )
    missing = [
        key
        for table in tables
        for key in sorted(table.honoured | set(table.refused))
        if f"`{key}" not in text and f".{key}`" not in text and f"{key}:" not in text
    ]
    assert not missing, f"docs/connection-pool.md does not mention: {missing}"
    assert all(f"`{v}`" in text for v in fields.PROXY_PROTOCOL_VERSIONS)
