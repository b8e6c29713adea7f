"""``DestinationRule.trafficPolicy.retryBudget`` (Envoy's circuit-breaker ``retry_budget``), over
real sockets: the retries in flight to a cluster are at most ``percent`` of its requests in
flight, never fewer than ``minRetryConcurrency``, and ``maxRetries`` is not checked then."""

from __future__ import annotations

import asyncio
import json
import logging
import textwrap
from pathlib import Path
from typing import Any

import pytest
from proxy_kit import (
    ERROR,
    Client,
    KVServer,
    Upstream,
    address,
    build_frame,
    engine_for,
    error_type,
    http_get,
    mesh,
    refusing_port,
    run,
    until,
)
from test_streams import StreamClient
from test_streams_retry import silent_tls
from test_tls import Pki

from metaprotocol_sdk import ConfigError, Metadata
from metaprotocol_sdk.examples.kv import STREAM_OPEN
from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.config.models import RetryBudget

OVERFLOWS = "metaprotocol_upstream_overflow_total"
RETRIED = """\
- name: retried
  route: [{destination: {host: svc.test}}]
  timeout: 30s
  retries: {attempts: 1, retryOn: error}
"""


class FailsFirst(Upstream):
    """Answers a request's first try with an Error reply and never answers its retry (a retry
    stays in flight); never answers ``hang``."""

    def on_message(self, conn: KVServer, msg: Metadata) -> None:
        assert conn.transport is not None
        self.received.append(msg)
        key = msg.attributes.get("k")
        tries = sum(m.attributes.get("k") == key for m in self.received)
        if msg.operation_name == "hang" or tries > 1:
            return
        conn.transport.write(build_frame(ERROR, msg.request_id, {"server": self.name}))


def _seen(reply: asyncio.Future[Metadata]) -> None:
    """Take the outcome of a request left in flight (reset when the client closes)."""
    if not reply.cancelled():
        reply.exception()


async def retries_allowed(engine: Engine, up: FailsFirst, hanging: int, most: int) -> int:
    """Hold ``hanging`` requests in flight, then send failing requests one at a time (each
    waits for its retry to arrive, or for its answer) until one is not retried, or ``most``
    were; how many were retried."""
    c = await Client.connect(address(engine))
    for _ in range(hanging):
        c.start("hang").add_done_callback(_seen)
    await until(lambda: len(up.received) == hanging, "the requests held in flight")
    retried = 0
    for n in range(most + 1):
        answer = c.start("get", {"k": str(n)})
        answer.add_done_callback(_seen)
        want = len(up.received) + 2
        await until(
            lambda a=answer, w=want: a.done() or len(up.received) == w,
            "a retry or an answer",
        )
        if answer.done():
            assert answer.result().attributes["server"] == "a"  # the upstream's Error reply
            break
        retried += 1
    c.close()
    return retried


def admin(engine: Engine) -> tuple[str, int]:
    assert engine.admin_address is not None
    return engine.admin_address


def budget_mesh(up: Upstream, policy: str) -> str:
    return mesh([(up.port, "v1")], router=RETRIED, traffic_policy=policy)


@pytest.mark.parametrize("pool", ["", "connectionPool: {http: {maxRetries: 1}}, "])
def test_a_budget_allows_its_floor_of_retries_in_flight_and_refuses_the_next(pool: str) -> None:
    """``{percent: 0, minRetryConcurrency: 2}``: two retries in flight, the third request's
    retry is refused and counted as overflow ``retryBudget``; the client gets the upstream's
    Error reply. ``maxRetries: 1`` beside it is not checked (Envoy ignores ``max_retries``
    with a budget): still two. The budget was refused when loaded."""

    async def main() -> None:
        up = await FailsFirst("a").start()
        policy = "{" + pool + "retryBudget: {percent: 0, minRetryConcurrency: 2}}"
        async with engine_for(budget_mesh(up, policy)) as engine:
            assert await retries_allowed(engine, up, 0, 5) == 2
            stats = engine.stats
            assert stats.total(OVERFLOWS, limit="retryBudget") == 1
            assert stats.total(OVERFLOWS, limit="maxRetries") == 0
            assert stats.total("metaprotocol_retries_total", reason="error") == 2
            (cluster,) = engine.clusters.values()
            assert cluster.retrying == 2
        await up.close()

    run(main())


@pytest.mark.parametrize(("hanging", "allowed"), [(0, 1), (12, 3), (28, 9)])
def test_a_budget_scales_with_the_requests_in_flight(hanging: int, allowed: int) -> None:
    """``{percent: 25, minRetryConcurrency: 1}``: with ``hanging`` requests in flight, the
    k-th retry is allowed while k < max(25 % of (hanging + k), 1) rounded down, its retries
    in flight counted among the requests (and the try that failed not, as it is over): 1
    retry with none hanging, 3 with 12, 9 with 28."""

    async def main() -> None:
        up = await FailsFirst("a").start()
        policy = "{retryBudget: {percent: 25, minRetryConcurrency: 1}}"
        async with engine_for(budget_mesh(up, policy)) as engine:
            assert await retries_allowed(engine, up, hanging, allowed + 3) == allowed
            assert engine.stats.total(OVERFLOWS, limit="retryBudget") == 1
        await up.close()

    run(main())


def test_an_empty_budget_is_istios_defaults_and_config_dump_shows_it() -> None:
    """``retryBudget: {}``: 20 %, at least 3 (three retries with nothing else in flight); the
    cluster's budget is in ``/config_dump``, and ``null`` for a cluster without one."""

    async def main() -> None:
        up = await FailsFirst("a").start()
        async with engine_for(budget_mesh(up, "{retryBudget: {}}")) as engine:
            assert await retries_allowed(engine, up, 0, 6) == 3
            status, body = await http_get(admin(engine), "/config_dump")
            assert status == 200
            clusters = {c["name"]: c for c in json.loads(body)["clusters"]}
            dumped = clusters["outbound|9000||svc.test"]["retryBudget"]
            assert dumped == {"percent": 20.0, "min_retry_concurrency": 3}
        async with engine_for(budget_mesh(up, "{}")) as engine:
            status, body = await http_get(admin(engine), "/config_dump")
            assert [c["retryBudget"] for c in json.loads(body)["clusters"]] == [None]
        await up.close()

    run(main())


def test_the_allowed_retries_are_envoys_product_rounded_down() -> None:
    # Envoy: max(budget_percent / 100 * (active + pending), min_retry_concurrency), truncated.
    assert RetryBudget(20.0, 3).allowed(25) == 5
    assert RetryBudget(20.0, 3).allowed(24) == 4
    assert RetryBudget(20.0, 3).allowed(2) == 3
    assert RetryBudget(0.0, 0).allowed(1000) == 0
    assert RetryBudget(100.0, 0).allowed(7) == 7


def three_ports(policy: str, v1: str) -> str:
    """A host with ports 9000-9002 and subsets v1 (``trafficPolicy`` ``v1``) and any (none)."""
    ports = ", ".join(
        f"{{number: {p}, name: tcp-metaprotocol-kv-{p}, protocol: TCP}}" for p in (9000, 9001, 9002)
    )
    return textwrap.dedent(
        f"""\
        kind: ApplicationProtocol
        metadata: {{name: kv}}
        spec: {{protocol: kv, codec: "metaprotocol_sdk.examples.kv:KVCodec"}}
        ---
        kind: ServiceEntry
        metadata: {{name: svc}}
        spec:
          hosts: [svc.test]
          ports: [{ports}]
          resolution: STATIC
          endpoints: [{{address: 127.0.0.1, labels: {{version: v1}}}}]
        ---
        kind: DestinationRule
        metadata: {{name: svc}}
        spec:
          host: svc.test
          trafficPolicy: {policy}
          subsets:
            - {{name: v1, labels: {{version: v1}}, trafficPolicy: {v1}}}
            - {{name: any, labels: {{version: v1}}}}
        ---
        kind: ProxyConfig
        metadata: {{name: engine}}
        spec:
          listeners: [{{host: svc.test, port: 9000, bind: '127.0.0.1:0'}}]
        """
    )


def test_port_settings_and_subsets_merge_the_budget_as_istiod(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """istiod's merge: port settings have no ``retryBudget``, so the rule's port settings drop
    the rule's budget (9001); a subset's budget overrides the rule's (v1, 9000), even over the
    rule's port settings (v1, 9001); a subset's port settings take the rule's budget for the
    port, not the subset's (v1, 9002): each with a caution. A subset without one has the
    rule's (any)."""
    rule_budget, v1_budget = RetryBudget(30.0, 4), RetryBudget(60.0, 2)
    text = three_ports(
        "{retryBudget: {percent: 30, minRetryConcurrency: 4}, portLevelSettings: "
        "[{port: {number: 9001}, loadBalancer: {simple: RANDOM}}]}",
        "{retryBudget: {percent: 60, minRetryConcurrency: 2}, portLevelSettings: "
        "[{port: {number: 9002}, loadBalancer: {simple: RANDOM}}]}",
    )
    with caplog.at_level(logging.WARNING, "metaprotocol.config"):
        rule = loads_config(text, "t.yaml").destination_rules["svc.test"]
    budgets = {
        (subset, port): rule.policy_for(port, subset).retry_budget
        for subset in (None, "v1", "any")
        for port in (9000, 9001, 9002)
    }
    assert budgets == {
        (None, 9000): rule_budget,
        (None, 9001): None,
        (None, 9002): rule_budget,
        ("v1", 9000): v1_budget,
        ("v1", 9001): v1_budget,
        ("v1", 9002): rule_budget,
        ("any", 9000): rule_budget,
        ("any", 9001): None,
        ("any", 9002): rule_budget,
    }
    cautions = [r.getMessage() for r in caplog.records if "retryBudget" in r.getMessage()]
    assert len(cautions) == 2
    assert "traffic to port 9001 has no retryBudget" in cautions[0]
    assert "traffic to port 9002 has the rule's retryBudget" in cautions[1]


def rule_with(budget: Any) -> str:
    return mesh([(1, "v1")], traffic_policy=json.dumps({"retryBudget": budget}))


@pytest.mark.parametrize(
    ("budget", "field", "words"),
    [
        ({"percent": 101}, "retryBudget.percent", "must be a number in [0, 100], got 101"),
        ({"percent": -0.5}, "retryBudget.percent", "must be a number in [0, 100]"),
        ({"percent": "20"}, "retryBudget.percent", "must be a number in [0, 100], got '20'"),
        ({"percent": True}, "retryBudget.percent", "must be a number in [0, 100]"),
        ({"minRetryConcurrency": -1}, "minRetryConcurrency", "integer in [0, 4294967295]"),
        ({"minRetryConcurrency": 2**32}, "minRetryConcurrency", "integer in [0, 4294967295]"),
        ({"minRetryConcurrency": 1.5}, "minRetryConcurrency", "integer in [0, 4294967295]"),
        ({"budgetInterval": "10s"}, "retryBudget.budgetInterval", "not supported by this engine"),
        ({"percents": 20}, "retryBudget.percents", "unknown field"),
        ("20%", "spec.trafficPolicy.retryBudget", "must be a mapping"),
    ],
)
def test_a_bad_budget_is_refused_naming_the_field(budget: Any, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        loads_config(rule_with(budget))
    assert field in str(caught.value) and words in str(caught.value), str(caught.value)


def test_a_budget_in_port_settings_is_an_unknown_field_as_in_istio() -> None:
    """Istio's ``PortTrafficPolicy`` has no ``retryBudget``."""
    policy = "{portLevelSettings: [{port: {number: 9000}, retryBudget: {percent: 20}}]}"
    with pytest.raises(ConfigError, match=r"portLevelSettings\[0\]\.retryBudget: unknown field"):
        loads_config(mesh([(1, "v1")], traffic_policy=policy))


def test_the_budgets_values_and_defaults_load(caplog: pytest.LogCaptureFixture) -> None:
    """Absent keys are Istio's defaults (20 %, 3); ``minRetryConcurrency: 0`` is istiod's
    default too (3), with a caution; 0 % and 100 % are in range."""

    def budget(raw: Any) -> RetryBudget | None:
        return loads_config(rule_with(raw)).destination_rules["svc.test"].policy.retry_budget

    assert budget({}) == RetryBudget(20.0, 3)
    assert budget({"percent": 0}) == RetryBudget(0.0, 3)
    assert budget({"percent": 100, "minRetryConcurrency": 7}) == RetryBudget(100.0, 7)
    assert budget({"percent": 12.5}) == RetryBudget(12.5, 3)
    with caplog.at_level(logging.WARNING, "metaprotocol.config"):
        assert budget({"minRetryConcurrency": 0}) == RetryBudget(20.0, 3)
    assert "0 is istiod's default, 3" in caplog.text
    assert loads_config(rule_with(None)).destination_rules["svc.test"].policy.retry_budget is None


def test_a_reload_changing_only_the_budget_rebuilds_the_cluster() -> None:
    """The budget is part of what a cluster is built from: a reload changing it replaces the
    cluster (with the new budget); one keeping it keeps the cluster."""

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(budget_mesh(up, "{retryBudget: {percent: 10}}")) as engine:
            (first,) = engine.clusters.values()
            assert first.retry_budget == RetryBudget(10.0, 3)
            await engine.apply(loads_config(budget_mesh(up, "{retryBudget: {percent: 10}}")))
            assert list(engine.clusters.values()) == [first]
            await engine.apply(loads_config(budget_mesh(up, "{retryBudget: {percent: 40}}")))
            (second,) = engine.clusters.values()
            assert second is not first and second.retry_budget == RetryBudget(40.0, 3)
        await up.close()

    run(main())


def test_a_streams_retry_is_bounded_by_the_budget(tmp_path: Path) -> None:
    """Round robin over a port whose TLS handshake never ends and a refusing one (a retry's
    pick takes a turn too), retries on ``connect-failure``, ``{percent: 75,
    minRetryConcurrency: 1}``: stream 1 hangs connecting; stream 3 is refused and retried
    (the floor), its retry hanging connecting; stream 5 is refused and not retried: 75 % of
    the two streams in flight besides it (its own try is over) is 1.5, so 1, and one retry
    is in flight. Counting its failed try too (three) would have allowed two."""
    pki = Pki(tmp_path)

    async def main() -> None:
        async with silent_tls() as (port, accepted):
            tls = json.dumps({"mode": "SIMPLE", "caCertificates": pki.ca_file})
            policy = f"{{tls: {tls}, retryBudget: {{percent: 75, minRetryConcurrency: 1}}}}"
            router = "- name: chat\n  route: [{destination: {host: svc.test}}]\n"
            router += "  retries: {attempts: 1, retryOn: connect-failure}\n"
            text = mesh([(port, "v1"), (refusing_port(), "v1")], router, policy)
            async with engine_for(text) as engine:
                client = await StreamClient.connect(address(engine))
                client.frame(STREAM_OPEN, 1, {"method": "echo"})
                await until(lambda: len(accepted) == 1, "stream 1 connecting")
                client.frame(STREAM_OPEN, 3, {"method": "echo"})
                await until(lambda: len(accepted) == 2, "stream 3's retry connecting")
                assert stream_retries(engine) == 1
                client.frame(STREAM_OPEN, 5, {"method": "echo"})
                (reply,) = await client.until(5, 1)
                assert (reply.request_id, error_type(reply)) == (5, "UpstreamConnectFailure")
                assert engine.stats.total(OVERFLOWS, limit="retryBudget") == 1
                assert stream_retries(engine) == 1
                (cluster,) = engine.clusters.values()
                assert cluster.retrying == 1
                client.reset()

    run(main())


def stream_retries(engine: Engine) -> int:
    return engine.stats.total("metaprotocol_retries_total", reason="connect-failure")


class FailsWhenTold(Upstream):
    """Holds the first try of a ``fail`` request until :meth:`fail`, then answers it with an
    Error reply; answers nothing else (a retry, ``hang``)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.held: dict[str, tuple[KVServer, Metadata]] = {}

    def on_message(self, conn: KVServer, msg: Metadata) -> None:
        key = msg.attributes.get("k") or ""
        first = not any(m.attributes.get("k") == key for m in self.received)
        self.received.append(msg)
        if msg.operation_name == "fail" and first:
            self.held[key] = (conn, msg)

    def fail(self, key: str) -> None:
        conn, msg = self.held.pop(key)
        assert conn.transport is not None
        conn.transport.write(build_frame(ERROR, msg.request_id, {"server": self.name}))


def test_a_budget_counts_the_requests_waiting_for_room_on_a_connection() -> None:
    """``{percent: 50, minRetryConcurrency: 1}``, one request per connection, three
    connections: a retry in flight, a request held and a failing one fill them, and four
    more wait for room. The failing one's retry is allowed: 50 % of the two others in flight
    and the four waiting (Envoy's active and pending requests) is 3, above the one retry in
    flight. Without the four, 50 % of two is one, and the retry would be refused."""

    async def main() -> None:
        up = await FailsWhenTold("a").start()
        policy = (
            "{connectionPool: {http: {maxConcurrentStreams: 1}, tcp: {maxConnections: 3}}, "
            "retryBudget: {percent: 50, minRetryConcurrency: 1}}"
        )
        async with engine_for(budget_mesh(up, policy)) as engine:
            c = await Client.connect(address(engine))
            first = c.start("fail", {"k": "1"})
            first.add_done_callback(_seen)
            await until(lambda: len(up.held) == 1, "the first try")
            up.fail("1")
            await until(lambda: len(up.received) == 2, "its retry, in flight")
            c.start("hang", {"k": "h"}).add_done_callback(_seen)
            second = c.start("fail", {"k": "2"})
            second.add_done_callback(_seen)
            await until(lambda: len(up.held) == 1 and len(up.received) == 4, "three in flight")
            for i in range(4):
                c.start("hang", {"k": f"w{i}"}).add_done_callback(_seen)
            waiting = "metaprotocol_upstream_requests_queued_active"
            await until(lambda: engine.stats.total(waiting) == 4, "four waiting")
            up.fail("2")
            # The reply made room: the oldest waiting request takes it, and the retry waits.
            await until(lambda: len(up.received) == 5, "the oldest waiting request sent")
            assert engine.stats.total(OVERFLOWS, limit="retryBudget") == 0
            assert engine.stats.total("metaprotocol_retries_total", reason="error") == 2
            c.close()
        await up.close()

    run(main())


def test_a_retry_waiting_for_room_counts_among_the_retries_in_flight() -> None:
    """``maxRetries: 1``, one request per connection, two connections, both busy and a
    request waiting. The second connection's request fails: its retry finds the first
    connection full and waits (the request that waited longer takes the room made). It is
    the one retry in flight, so the first connection's request, failing next, is not
    retried (``maxRetries`` overflow). Once the client is gone, no retry is counted in flight
    (the count drifted with a retry that waited, up or down)."""

    async def main() -> None:
        up = await FailsWhenTold("a").start()
        policy = (
            "{connectionPool: {http: {maxConcurrentStreams: 1, maxRetries: 1}, "
            "tcp: {maxConnections: 2}}}"
        )
        async with engine_for(budget_mesh(up, policy)) as engine:
            (cluster,) = engine.clusters.values()
            c = await Client.connect(address(engine))
            first = c.start("fail", {"k": "1"})
            first.add_done_callback(_seen)
            second = c.start("fail", {"k": "2"})
            second.add_done_callback(_seen)
            await until(lambda: len(up.held) == 2, "both in flight")
            c.start("hang", {"k": "h"}).add_done_callback(_seen)
            waiting = "metaprotocol_upstream_requests_queued_active"
            await until(lambda: engine.stats.total(waiting) == 1, "one waiting")
            up.fail("2")  # its retry waits; the hanging request takes the room
            await until(lambda: len(up.received) == 3, "the hanging request sent")
            assert (engine.stats.total(waiting), cluster.retrying) == (1, 1)
            up.fail("1")
            answer = await asyncio.wait_for(first, 5)
            assert answer.attributes["server"] == "a"  # the upstream's Error: not retried
            assert engine.stats.total(OVERFLOWS, limit="maxRetries") == 1
            await until(lambda: len(up.received) == 4, "the waiting retry sent")
            assert (engine.stats.total(waiting), cluster.retrying) == (0, 1)
            c.reset()  # the client leaves: its requests in flight are given up
            await until(lambda: engine.pending == 0, "nothing in flight")
            assert (cluster.retrying, cluster.queued) == (0, 0)
        await up.close()

    run(main())
