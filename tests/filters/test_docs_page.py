"""docs/filters.md cannot drift: every YAML block loads with a small mesh around it, and the
Python test shown on the page runs and passes."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from metaprotocol_sdk.proxy import loads_config
from metaprotocol_sdk.testing import FilterConformance

PAGE = Path(__file__).resolve().parents[2] / "docs" / "filters.md"
BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.S | re.M)
PYTHON = re.compile(r"^ *```python\n(.*?)^ *```", re.S | re.M)

# What the page's snippets refer to: greeter.example (subsets v1, v2) speaking the KV example
# protocol on port 9000, with a listener. A snippet's document replaces the one of the same
# kind and name.
MESH = textwrap.dedent(
    """\
    apiVersion: metaprotocol.aeraki.io/v1alpha1
    kind: ApplicationProtocol
    metadata: {name: kv}
    spec: {protocol: kv, codec: "metaprotocol_sdk.examples.kv:KVCodec"}
    ---
    apiVersion: networking.istio.io/v1beta1
    kind: ServiceEntry
    metadata: {name: greeter}
    spec:
      hosts: [greeter.example]
      ports: [{number: 9000, name: tcp-metaprotocol-kv-greeter, protocol: TCP}]
      resolution: STATIC
      endpoints:
        - {address: 127.0.0.1, ports: {tcp-metaprotocol-kv-greeter: 19001}, labels: {version: v1}}
        - {address: 127.0.0.1, ports: {tcp-metaprotocol-kv-greeter: 19002}, labels: {version: v2}}
    ---
    apiVersion: networking.istio.io/v1beta1
    kind: DestinationRule
    metadata: {name: greeter}
    spec:
      host: greeter.example
      subsets:
        - {name: v1, labels: {version: v1}}
        - {name: v2, labels: {version: v2}}
    ---
    apiVersion: proxy.metaprotocol.io/v1alpha1
    kind: ProxyConfig
    metadata: {name: engine}
    spec:
      listeners: [{host: greeter.example, port: 9000, bind: "127.0.0.1:0"}]
    """
)


def _key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def blocks() -> list[str]:
    return BLOCK.findall(PAGE.read_text(encoding="utf-8"))


def test_the_page_has_its_yaml_blocks() -> None:
    # Configure it, local and global rate limit, fault, mirror, retries, outlier detection
    # (the connection pool's are on docs/connection-pool.md).
    assert len(blocks()) >= 7


@pytest.mark.parametrize("block", blocks(), ids=lambda b: b.splitlines()[1][6:] + "…")
def test_block_loads_with_a_mesh(block: str) -> None:
    own = [d for d in yaml.safe_load_all(block) if d]
    assert own and all("kind" in d for d in own), "each snippet is whole documents"
    replaced = {_key(d) for d in own}
    base = [d for d in yaml.safe_load_all(MESH) if _key(d) not in replaced]
    text = yaml.safe_dump_all(base + own, sort_keys=False)
    config = loads_config(text, source="docs/filters.md")
    # Something of the snippet is in force, not dropped on the way.
    kinds = {d["kind"] for d in own}
    if "MetaRouter" in kinds:
        router = config.routers["greeter.example"]
        assert (
            router.local_rate_limit
            or router.global_rate_limit
            or any(r.fault or r.mirror or r.retries for r in router.routes)
        )
    if "DestinationRule" in kinds:
        policy = config.destination_rules["greeter.example"].policy
        assert (
            policy.connection_pool
            or policy.outlier_detection
            or policy.retry_budget
            or policy.proxy_protocol
            or policy.tunnel
        )
    if "ProxyConfig" in kinds:
        assert config.proxy.listeners[0].filters


def test_the_python_examples_on_the_page_pass() -> None:
    # The "Write a filter" block is the example module itself (a snippet include).
    codes = [textwrap.dedent(b) for b in PYTHON.findall(PAGE.read_text("utf-8"))]
    codes = [c for c in codes if "--8<--" not in c]
    assert len(codes) == 2
    ran = 0
    for code in codes:
        namespace: dict[str, Any] = {}
        exec(compile(code, "docs/filters.md", "exec"), namespace)
        for name, value in namespace.items():
            if name.startswith("test_"):
                value()
                ran += 1
            elif name.startswith("Test") and issubclass(value, FilterConformance):
                suite = value()
                suite.test_refuses_unknown_config()
                suite.test_ordinary_traffic()
                ran += 2
    assert ran == 4


def test_the_page_names_every_policy_field_the_loader_knows() -> None:
    # A field added to (or refused by) the loader's tables must be described on the page
    # (connectionPool's on docs/connection-pool.md: tests/proxy/test_connection_pool_page.py).
    from metaprotocol_sdk.proxy.config import fields as f

    text = PAGE.read_text("utf-8")
    tables = {
        "localRateLimit": (f.LOCAL_RATE_LIMIT, f.RATE_LIMIT_CONDITION, f.TOKEN_BUCKET),
        "globalRateLimit": (f.GLOBAL_RATE_LIMIT, f.RATE_LIMIT_DESCRIPTOR),
        "fault": (f.FAULT, f.DELAY, f.ABORT),
        "retries": (f.RETRIES,),
        "outlierDetection": (f.OUTLIER_DETECTION,),
        "listener": (f.LISTENER, f.FILTER),
    }
    missing = [
        f"{where}: {key}"
        for where, group in tables.items()
        for table in group
        for key in sorted(table.honoured | set(table.refused))
        if f"`{key}" not in text and f".{key}`" not in text and f"{key}:" not in text
    ]
    assert not missing, f"docs/filters.md does not mention: {missing}"
    assert "mirrorPercentage" in text and "mirror:" in text
