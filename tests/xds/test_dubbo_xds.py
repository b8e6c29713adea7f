"""A real Dubbo client under a control plane: sofa-rpc-node through the engine, routes from xDS.

Three sofa-rpc-node providers serve Aeraki's Dubbo sample (subset v1: ``v1a``, ``v1b``;
subset v2: ``v2``). The routes come in Aeraki's MetaRDS encoding for a Dubbo service: header
matchers on the ``interface`` and ``method`` attributes, and a request mutation that reaches
the provider as a Dubbo attachment. One sofa-rpc-node consumer keeps calling on its one
connection while the control plane changes the route, splits it by weight and removes an
endpoint: every call is answered, by the servers the current version names, and the
connection is never dropped.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from control_plane import ControlPlane
from snapshots import (
    CLUSTER_TYPE,
    DUBBO_HOST,
    DUBBO_INTERFACE,
    DUBBO_PORT,
    ENDPOINT_TYPE,
    ROUTE_TYPE,
    dubbo_snapshots,
)
from test_engine_xds import NODE, Harness, acked

from metaprotocol_sdk.demo.procs import Child, ChildError, node_child

WAIT = 20.0
CONNECTIONS_TOTAL = "metaprotocol_downstream_connections_total"


def config_yaml(xds_port: int) -> str:
    return f"""
kind: ServiceEntry
metadata: {{name: demoservice}}
spec:
  hosts: [{DUBBO_HOST}]
  ports: [{{number: {DUBBO_PORT}, name: tcp-metaprotocol-dubbo-demo}}]
---
kind: ProxyConfig
metadata: {{name: proxy}}
spec:
  listeners: [{{host: {DUBBO_HOST}, port: {DUBBO_PORT}, bind: "127.0.0.1:0"}}]
  xds:
    address: "127.0.0.1:{xds_port}"
    node: {{id: "{NODE}"}}
    backoff: {{initial: 20ms, max: 200ms}}
"""


class DubboCaller:
    """A sofa-rpc-node consumer calling through the engine without pause, from a thread.

    Calls alternate between ``sayHello`` (whose answering provider each update changes) and
    ``attachments`` (routed to v2 by a route with a request mutation in every version).
    """

    def __init__(self, port: int) -> None:
        self.child = node_child("dubbo-consumer", "consumer", f"127.0.0.1:{port}")
        self.child.wait_ready()
        #: The provider that answered each sayHello, in order.
        self.replies: list[str] = []
        #: What the provider saw of each ``attachments`` call: its name and the attachments.
        self.attachments: list[dict[str, Any]] = []
        self.errors: list[Any] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _call(self, call_id: int, method: str, args: list[str]) -> dict[str, Any]:
        call = {"id": call_id, "method": method, "args": args, "props": {}, "timeout": 5000}
        self.child.send(json.dumps(call))
        reply: dict[str, Any] = json.loads(self.child.readline(WAIT))
        if not reply.get("ok") or reply.get("id") != call_id:
            raise AssertionError(f"{method} failed: {reply}")
        return reply

    def _run(self) -> None:
        call_id = 0
        while not self._stop.is_set():
            call_id += 1
            try:
                if call_id % 2:
                    result = self._call(call_id, "sayHello", ["xds"])["result"]
                    with self._cond:
                        self.replies.append(str(result).split(":")[0])
                        self._cond.notify_all()
                else:
                    seen = json.loads(self._call(call_id, "attachments", [])["result"])
                    with self._cond:
                        self.attachments.append(seen)
            except (AssertionError, ChildError, ValueError) as exc:  # what the test looks for
                with self._cond:
                    self.errors.append(exc)
                    self._cond.notify_all()
                return

    def next(self, count: int) -> Counter[str]:
        """The providers that answered the next ``count`` sayHello calls (after the one in
        flight now, which may have been routed before the last update and keeps its route)."""
        with self._cond:
            start = len(self.replies) + 1
            assert self._cond.wait_for(
                lambda: len(self.replies) >= start + count or self.errors, WAIT
            ), "calls stalled"
            assert not self.errors, self.errors
            return Counter(self.replies[start : start + count])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        self.child.stop()


@pytest.fixture
def providers() -> Iterator[dict[str, int]]:
    """sofa-rpc-node providers by name (their replies start with it), with their ports."""
    children: dict[str, Child] = {}
    try:
        for name in ("v1a", "v1b", "v2"):
            children[name] = node_child(f"provider-{name}", "provider", name)
        yield {name: child.wait_ready() for name, child in children.items()}
    finally:
        for child in children.values():
            child.stop()


def total(harness: Harness, name: str) -> float:
    """The engine's series of ``name``, summed over their labels."""

    async def stats() -> dict[str, float]:
        return harness.engine.stats_snapshot()

    snapshot = harness.call(stats())
    return sum(v for k, v in snapshot.items() if k == name or k.startswith(name + "{"))


def test_a_dubbo_client_through_route_changes_and_an_endpoint_removal(
    control_plane: ControlPlane, providers: dict[str, int]
) -> None:
    v1 = [("127.0.0.1", providers["v1a"]), ("127.0.0.1", providers["v1b"])]
    versions = dubbo_snapshots(v1, [("127.0.0.1", providers["v2"])])
    control_plane.set_snapshot(*versions[0])
    harness = Harness(config_yaml(control_plane.port))
    try:
        harness.wait(acked("1"))
        caller = DubboCaller(harness.engine.listener_addresses[DUBBO_HOST, DUBBO_PORT][1])
        try:
            assert set(caller.next(20)) == {"v1a", "v1b"}  # 1: sayHello to subset v1
            connections = total(harness, CONNECTIONS_TOTAL)
            control_plane.set_snapshot(*versions[1])
            harness.wait(acked("2"))
            assert caller.next(20) == {"v2": 20}  # 2: the route changed to v2
            control_plane.set_snapshot(*versions[2])
            harness.wait(acked("3"))
            assert set(caller.next(60)) == {"v1a", "v1b", "v2"}  # 3: 50/50 between subsets
            control_plane.set_snapshot(*versions[3])
            harness.wait(acked("4"))
            assert set(caller.next(60)) == {"v1b", "v2"}  # 4: v1a is gone from EDS
            assert total(harness, CONNECTIONS_TOTAL) == connections  # it never reconnected
            assert total(harness, "metaprotocol_downstream_connections_active") == connections
        finally:
            caller.close()
        assert not caller.errors
        # The MetaRoute's request mutation reached the provider as an attachment, each time.
        assert caller.attachments
        for seen in caller.attachments:
            assert seen["version"] == "v2"
            assert seen["props"]["x-mesh"] == "xds"
            assert seen["props"]["path"] == DUBBO_INTERFACE
        routes = harness.dump()["listeners"][0]["routes"]
        assert [r["name"] for r in routes] == ["hello", "mutated", "rest"]
        assert {"attribute": "interface", "exact": DUBBO_INTERFACE} in routes[0]["match"]
    finally:
        harness.close()
    for type_url in (CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE):
        assert control_plane.acked(type_url, "4", NODE)
        assert not control_plane.nacks(type_url)
