"""Slow start over xDS, end to end: istiod's ``slow_start_config`` warms the endpoint an
EDS update adds, and the endpoints that stay keep their start (real sockets)."""

from __future__ import annotations

from typing import Any

from control_plane import ControlPlane
from snapshots import CLUSTER_TYPE, ENDPOINT_TYPE, HOST, PORT, hello_snapshots, load_assignment
from test_engine_xds import Caller, Harness, acked, config_yaml

from metaprotocol_sdk.demo.thrift_server import HelloServer

SUB1 = f"outbound|{PORT}|v1|{HOST}"


def with_slow_start(snapshot: dict[str, list[Any]], v1: list[tuple[str, int]]) -> None:
    """Subset v1's cluster with istiod's warmup (60s) and ``v1`` as its endpoints."""
    (c,) = [c for c in snapshot[CLUSTER_TYPE] if c.name == SUB1]
    ss = c.round_robin_lb_config.slow_start_config
    ss.slow_start_window.seconds = 60
    ss.aggression.default_value = 1.0
    ss.aggression.runtime_key = "("
    ss.min_weight_percent.value = 10
    snapshot[ENDPOINT_TYPE] = [
        load_assignment(SUB1, v1) if e.cluster_name == SUB1 else e for e in snapshot[ENDPOINT_TYPE]
    ]


def test_an_endpoint_eds_adds_warms_and_the_others_keep_their_start(
    control_plane: ControlPlane, servers: dict[str, HelloServer]
) -> None:
    v1 = [("127.0.0.1", servers["v1a"].port), ("127.0.0.1", servers["v1b"].port)]
    (_, first), *_ = hello_snapshots(v1, [("127.0.0.1", servers["v2"].port)])
    with_slow_start(first, v1)
    control_plane.set_snapshot("1", first)
    harness = Harness(config_yaml(control_plane.port))
    try:
        harness.wait(acked("1"))
        before = harness.engine.clusters[SUB1].slow_start
        assert before is not None and len(set(before.starts.values())) == 1

        async def age() -> None:  # as if the engine had served them for an hour
            for key in before.starts:
                before.starts[key] -= 3600

        harness.call(age())
        (_, second), *_ = hello_snapshots(v1, [("127.0.0.1", servers["v2"].port)])
        added = [*v1, ("127.0.0.1", servers["v2"].port)]
        with_slow_start(second, added)
        control_plane.set_snapshot("2", second)
        harness.wait(acked("2"))
        after = harness.engine.clusters[SUB1].slow_start
        assert after is not None and after is not before
        kept = [f"{h}:{p}" for h, p in v1]
        assert [after.starts[k] for k in kept] == [before.starts[k] for k in kept]
        assert after.warming == {f"127.0.0.1:{servers['v2'].port}": 10.0}
        caller = Caller(harness.port)
        try:
            # Round robin at 100, 100 and 10: a cycle of 21 picks (its full share: 14 of 42).
            assert caller.next(42) == {"v1a": 20, "v1b": 20, "v2": 2}
        finally:
            caller.close()
        assert not caller.errors
    finally:
        harness.close()
