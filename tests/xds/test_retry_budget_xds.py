"""A cluster's circuit-breaker ``retry_budget`` (istiod's ``trafficPolicy.retryBudget``) over
xDS: translated into the rule, each cluster keeping its own, as the engine applies it."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import duration_pb2
from snapshots import ALL, CLUSTER_TYPE, HOST
from test_translate import (
    Policy,
    base,
    front,
    policy_cluster,
    ports_resources,
    refusal,
    resources,
    rule_doc,
    snapshot,
)

from metaprotocol_sdk.proxy.config.models import PORT_RETRY_BUDGET, RetryBudget
from metaprotocol_sdk.proxy.xds.translate import translate


def all_cluster(snap: dict[str, list[Any]]) -> Any:
    return next(c for c in snap[CLUSTER_TYPE] if c.name == ALL)


def budget_of(snap: dict[str, list[Any]]) -> RetryBudget | None:
    return translate(base(), resources(snap)).destination_rules[HOST].policy.retry_budget


def test_a_thresholds_retry_budget_is_the_rules_retry_budget() -> None:
    """istiod writes ``retryBudget`` as ``circuit_breakers.thresholds[0].retry_budget`` (beside
    ``max_retries``): it was refused as an unsupported field, NACKing the cluster. Envoy's
    defaults fill what it leaves out (20 %, 3); an explicit 0 floor stays 0, as in Envoy. The
    engine builds the cluster with the budget."""
    snap = snapshot(3)
    th = all_cluster(snap).circuit_breakers.thresholds[0]
    th.retry_budget.budget_percent.value = 25.0
    th.retry_budget.min_retry_concurrency.value = 4
    config = translate(base(), resources(snap))
    assert rule_doc(config)["spec"]["trafficPolicy"]["retryBudget"] == {
        "percent": 25.0,
        "minRetryConcurrency": 4,
    }
    # What the engine builds the cluster from (Engine._cluster).
    applied = config.destination_rules[HOST].policy_for(9090).applied()
    assert applied.retry_budget == RetryBudget(25.0, 4)
    th.retry_budget.ClearField("budget_percent")
    th.retry_budget.min_retry_concurrency.value = 0
    assert budget_of(snap) == RetryBudget(20.0, 0)
    th.retry_budget.ClearField("min_retry_concurrency")
    assert budget_of(snap) == RetryBudget(20.0, 3)  # retry_budget: {}
    th.ClearField("retry_budget")
    assert budget_of(snap) is None


def test_a_budget_interval_is_refused_unless_zero() -> None:
    """Istio's newer ``budgetInterval`` is Envoy's ``budget_interval`` (field 3), which the
    engine's protos do not know: a non-zero one is refused, naming it (it was silently
    dropped as an unknown field); 0s (Envoy's default) is fine. A percent over 100 is
    refused."""
    snap = snapshot(3)
    budget = all_cluster(snap).circuit_breakers.thresholds[0].retry_budget
    interval = duration_pb2.Duration(seconds=10).SerializeToString()
    budget.MergeFromString(bytes([3 << 3 | 2, len(interval)]) + interval)
    assert "retry_budget.budget_interval" in refusal(resources(snap))
    budget.Clear()
    budget.MergeFromString(bytes([3 << 3 | 2, 0]))  # a Duration of 0s
    assert budget_of(snap) == RetryBudget(20.0, 3)
    budget.budget_percent.value = 101
    assert "retryBudget.percent" in refusal(resources(snap))


def budgeted(budget: tuple[float, int] | None, lb: int = cluster_pb2.Cluster.ROUND_ROBIN) -> Any:
    return (budget, Policy(lb=lb))


@pytest.mark.parametrize("same_lb", [True, False])
def test_clusters_of_different_budgets_each_keep_their_own(same_lb: bool) -> None:
    """Clusters of one host with different retry budgets, per port and subset (and with or
    without other differences): each keeps exactly its own, although Istio's port settings
    have none (the entries carry it under the engine's key)."""
    rr, rnd = cluster_pb2.Cluster.ROUND_ROBIN, cluster_pb2.Cluster.RANDOM
    other = rr if same_lb else rnd
    wanted: dict[tuple[int, str | None], tuple[tuple[float, int] | None, Policy]] = {
        (9090, None): budgeted((25.0, 4)),
        (9091, None): budgeted(None, other),
        (9092, None): budgeted((25.0, 4)),
        (9090, "v1"): budgeted(None),
        (9091, "v1"): budgeted((50.0, 0), other),
        (9092, "v1"): budgeted((25.0, 4), other),
        (9091, "v2"): budgeted((10.0, 1)),
    }
    res = ports_resources({key: p for key, (_, p) in wanted.items()})
    for (port, subset), (budget, p) in wanted.items():
        name = f"outbound|{port}|{subset or ''}|{HOST}"
        c = policy_cluster(name, p)
        if budget is not None:
            rb = c.circuit_breakers.thresholds[0].retry_budget
            rb.budget_percent.value, rb.min_retry_concurrency.value = budget
        res.clusters[name] = c  # type: ignore[index]
    config = translate(front(), res)
    rule = config.destination_rules[HOST]
    for (port, subset), (budget, _) in wanted.items():
        want = None if budget is None else RetryBudget(*budget)
        assert rule.policy_for(port, subset).retry_budget == want, (port, subset)
    entries = [
        e
        for sub in [rule_doc(config)["spec"]["trafficPolicy"]]
        + [s["trafficPolicy"] for s in rule_doc(config)["spec"]["subsets"]]
        for e in sub.get("portLevelSettings", [])
    ]
    assert any(PORT_RETRY_BUDGET in e for e in entries)
