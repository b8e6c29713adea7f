"""Locality failover for the files' endpoints, as istiod computes it for a sidecar: the
priorities from the engine's locality and each endpoint's, ``localityLbSetting`` (``enabled``,
``failover``), and traffic through the engine over real sockets staying in the nearest
locality until outlier detection ejects it."""

from __future__ import annotations

from collections import Counter

import pytest
from proxy_kit import Client, Upstream, address, engine_for, error_type, mesh, refusing_port, run

from metaprotocol_sdk import ConfigError
from metaprotocol_sdk.proxy import loads_config
from metaprotocol_sdk.proxy.config.models import LocalityLbSetting
from metaprotocol_sdk.proxy.locality import failover_priorities, locality_of_labels

R1 = LocalityLbSetting()


@pytest.mark.parametrize(
    ("own", "localities", "setting", "expected"),
    [
        # istiod's LbPriority: subzone, zone, region, elsewhere; then numbered without gaps.
        ("r1/z1/s1", ["r1/z1/s1", "r1/z1/s2", "r1/z2/s1", "r2/z1/s1"], R1, [0, 1, 2, 3]),
        ("r1/z1/s1", ["r2/z1", "r1/z1/s1", "r1/z2"], None, [2, 0, 1]),
        ("r1/z1", ["r1/z1", "r1/z1/s9", "r1"], None, [0, 1, 2]),
        ("r1/z1/s1", ["r1/z9", ""], None, [0, 1]),  # no locality: another region
        # failover from r1 to r3: r3 comes before the other regions.
        ("r1/z1", ["r2", "r3", "r1/z1"], LocalityLbSetting(True, (("r1", "r3"),)), [2, 1, 0]),
        # a rule of another region changes nothing here.
        ("r1/z1", ["r2", "r3", "r1/z1"], LocalityLbSetting(True, (("r2", "r3"),)), [1, 1, 0]),
        # all in one level: one priority.
        ("r1/z1", ["r1/z1", "r1/z1"], None, [0, 0]),
    ],
)
def test_failover_priorities_as_istiod_computes_them(
    own: str, localities: list[str], setting: LocalityLbSetting | None, expected: list[int]
) -> None:
    assert failover_priorities(own, localities, setting) == expected


def test_no_failover_without_a_locality_or_when_disabled() -> None:
    assert failover_priorities("", ["r1", "r2"], None) is None
    assert failover_priorities("r1", ["", ""], None) is None
    assert failover_priorities("r1", ["r1", "r2"], LocalityLbSetting(enabled=False)) is None


def test_the_engines_locality_from_its_pod_labels_as_istiod_reads_them() -> None:
    assert locality_of_labels({"istio-locality": "r1.z1.s1"}) == "r1/z1/s1"
    assert locality_of_labels({"topology.istio.io/locality": "r2/z2", "istio-locality": "r1"}) == (
        "r2/z2"
    )
    assert locality_of_labels({"istio-locality": "r1.z1.s1.extra"}) == "r1/z1/s1"
    assert locality_of_labels({"istio-locality": ".z1"}) == ""
    assert locality_of_labels({}) == ""


def located_mesh(
    endpoints: list[tuple[int, str]], policy: str, own: str = "r1/z1/s1", outlier: bool = True
) -> str:
    """:func:`mesh` with each ``(port, locality)`` endpoint's ``locality``, the engine's own
    (``spec.telemetry.workload.locality``), outlier detection (ejecting at the first connect
    failure) and ``policy`` (more of the ``trafficPolicy``)."""
    detection = "outlierDetection: {consecutiveGatewayErrors: 1, baseEjectionTime: 1h, "
    detection += "maxEjectionPercent: 100}"
    groups = ", ".join(g for g in (detection if outlier else "", policy) if g)
    text = mesh(
        [(port, "v1") for port, _ in endpoints],
        "- name: all\n  route: [{destination: {host: svc.test}}]\n",
        f"{{{groups}}}",
        proxy=f"telemetry: {{workload: {{locality: {own}}}}}\n",
    )
    for port, locality in endpoints:
        text = text.replace(
            f": {port}}}, labels: {{version: v1}}}}",
            f": {port}}}, labels: {{version: v1}}, locality: {locality}}}",
        )
    return text


async def answered_by(client: Client, n: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(n):
        reply = await client.call()
        assert error_type(reply) is None
        seen[reply.attributes["server"]] += 1
    return seen


def test_traffic_stays_in_the_nearest_locality_and_fails_over_to_the_next() -> None:
    """The engine in r1/z1/s1: its subzone's endpoint (dead) takes the first request, is
    ejected, and then every request goes to the next nearest (same zone), none to the same
    region's or another region's. Without outlier detection, or with locality failover
    disabled, every endpoint takes its turn, as before."""

    async def main() -> None:
        zone, region, far = [await Upstream(n).start() for n in ("zone", "region", "far")]
        dead = refusing_port()
        endpoints = [
            (far.port, "r2/z1/s1"),
            (dead, "r1/z1/s1"),
            (region.port, "r1/z2/s1"),
            (zone.port, "r1/z1/s2"),
        ]
        async with engine_for(located_mesh(endpoints, "")) as engine:
            (cluster,) = engine.clusters.values()
            assert [h.priority for h in cluster.hosts] == [3, 0, 2, 1]
            client = await Client.connect(address(engine))
            assert error_type(await client.call()) == "UpstreamConnectFailure"
            assert cluster.priority_load == {0: 0, 1: 100, 2: 0, 3: 0}
            assert await answered_by(client, 20) == {"zone": 20}
            client.close()
        for policy, outlier in (
            ("", False),
            ("loadBalancer: {localityLbSetting: {enabled: false}}", True),
        ):
            async with engine_for(located_mesh(endpoints, policy, outlier=outlier)) as engine:
                (cluster,) = engine.clusters.values()
                assert not cluster.prioritised
                assert {h.priority for h in cluster.hosts} == {0}
                client = await Client.connect(address(engine))
                outcomes = Counter()
                for _ in range(8):
                    reply = await client.call()
                    outcomes[error_type(reply) or reply.attributes["server"]] += 1
                assert {"zone", "region", "far"} <= set(outcomes), outcomes
                client.close()
        for up in (zone, region, far):
            await up.close()

    run(main())


def test_a_failover_rule_sends_a_region_next_to_the_one_it_names() -> None:
    """``failover: [{from: r1, to: r3}]``: once r1's endpoint is ejected, r3's takes the
    traffic, not r2's (which comes before it without the rule, by the list's order)."""

    async def main() -> None:
        r2, r3 = await Upstream("r2").start(), await Upstream("r3").start()
        endpoints = [(refusing_port(), "r1/z1"), (r2.port, "r2/z1"), (r3.port, "r3/z1")]
        rule = "loadBalancer: {localityLbSetting: {failover: [{from: r1, to: r3}]}}"
        async with engine_for(located_mesh(endpoints, rule, own="r1/z1")) as engine:
            (cluster,) = engine.clusters.values()
            assert [h.priority for h in cluster.hosts] == [0, 2, 1]
            client = await Client.connect(address(engine))
            assert error_type(await client.call()) == "UpstreamConnectFailure"
            assert await answered_by(client, 10) == {"r3": 10}
            client.close()
        await r2.close()
        await r3.close()

    run(main())


@pytest.mark.parametrize(
    ("policy", "field", "words"),
    [
        (
            "loadBalancer: {localityLbSetting: {failover: [{from: r1, to: r1}]}}",
            "localityLbSetting.failover[0]",
            "from and to are both 'r1'",
        ),
        (
            "loadBalancer: {localityLbSetting: {failover: [{from: r1/z1, to: r2}]}}",
            "localityLbSetting.failover[0].from",
            "must be a region (no '/')",
        ),
        (
            "loadBalancer: {localityLbSetting: {enabled: 'no'}}",
            "localityLbSetting.enabled",
            "must be true or false",
        ),
    ],
)
def test_locality_settings_istio_refuses_are_refused(policy: str, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        loads_config(located_mesh([(1, "r1")], policy), "t.yaml")
    assert caught.value.field is not None and caught.value.field.endswith(field)
    assert words in str(caught.value)


def test_an_endpoint_locality_of_four_parts_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        loads_config(located_mesh([(1, "r1/z1/s1/x")], ""), "t.yaml")
    assert caught.value.field == "spec.endpoints[0].locality"
    assert "must be region, region/zone or region/zone/subzone" in str(caught.value)


def test_outlier_detection_ejecting_nothing_keeps_traffic_in_the_nearest_locality() -> None:
    """``outlierDetection`` with both counts off: istiod sets the priorities all the same
    (it asks only whether the rule has ``outlierDetection``), and Envoy, ejecting nothing,
    sends every request to the nearest locality. It spread them over every locality."""

    async def main() -> None:
        near, far = await Upstream("near").start(), await Upstream("far").start()
        endpoints = [(far.port, "r2/z1"), (near.port, "r1/z1/s1")]
        detection = "outlierDetection: {consecutive5xxErrors: 0}"
        text = located_mesh(endpoints, detection, outlier=False)
        async with engine_for(text) as engine:
            (cluster,) = engine.clusters.values()
            assert [h.priority for h in cluster.hosts] == [1, 0]
            client = await Client.connect(address(engine))
            assert await answered_by(client, 10) == {"near": 10}
            client.close()
        await near.close()
        await far.close()

    run(main())


# -- failoverPriority ------------------------------------------------------------------------

GOLD = {"tier": "gold", "rack": "a"}
BY_LABELS = LocalityLbSetting(failover_priority=(("tier", None), ("rack", None)))


@pytest.mark.parametrize(
    ("own", "own_labels", "localities", "labels", "setting", "expected"),
    [
        # 0: every label as the engine's; then the labels from the first that differs.
        ("", GOLD, ["", "", ""], [GOLD, {"tier": "gold"}, {"rack": "a"}], BY_LABELS, [0, 1, 2]),
        # 'label=value': compared with the value, not the engine's label.
        (
            "",
            GOLD,
            ["", ""],
            [{"tier": "gold"}, {"tier": "silver"}],
            LocalityLbSetting(failover_priority=(("tier", "silver"),)),
            [1, 0],
        ),
        # the topology labels come from the localities (istiod's AugmentLabels).
        (
            "r1/z1",
            {"app": "x"},
            ["r1/z1", "r1/z2", "r2/z1"],
            [{}, {}, {}],
            LocalityLbSetting(
                failover_priority=(
                    ("topology.kubernetes.io/region", None),
                    ("topology.kubernetes.io/zone", None),
                )
            ),
            [0, 1, 2],
        ),
        # without failover rules the localities add nothing: same labels, one level.
        ("r1/z1", GOLD, ["r1/z1", "r2/z9"], [GOLD, GOLD], BY_LABELS, [0, 0]),
        # with them, the locality's priority under the labels' (label * 5 + locality).
        (
            "r1/z1",
            GOLD,
            ["r2", "r1/z1", "r3", "r1/z1"],
            [GOLD, GOLD, GOLD, {"tier": "silver"}],
            LocalityLbSetting(True, (("r1", "r3"),), (("tier", None),)),
            [2, 0, 1, 3],
        ),
        # no labels of its own: istiod sets no label priorities; failover rules still apply.
        (
            "r1/z1",
            {},
            ["r2", "r3", "r1/z1"],
            [GOLD, GOLD, GOLD],
            LocalityLbSetting(True, (("r1", "r3"),), (("tier", None),)),
            [2, 1, 0],
        ),
    ],
)
def test_failover_priority_by_labels_as_istiod_computes_it(
    own: str,
    own_labels: dict[str, str],
    localities: list[str],
    labels: list[dict[str, str]],
    setting: LocalityLbSetting,
    expected: list[int],
) -> None:
    assert failover_priorities(own, localities, setting, own_labels, labels) == expected


def test_no_failover_priority_without_labels_or_when_disabled() -> None:
    assert failover_priorities("r1", ["r1", "r2"], BY_LABELS, {}, [GOLD, {}]) is None
    disabled = LocalityLbSetting(enabled=False, failover_priority=BY_LABELS.failover_priority)
    assert failover_priorities("r1", ["r1", "r2"], disabled, GOLD, [GOLD, {}]) is None


def labelled_mesh(endpoints: list[tuple[int, str]], setting: str) -> str:
    """:func:`located_mesh` with each ``(port, labels)`` endpoint's ``labels`` (a flow
    mapping's inside, ``tier: gold, rack: a``), the engine's own ``tier: gold, rack: a`` and
    ``localityLbSetting`` ``setting``."""
    policy = f"loadBalancer: {{localityLbSetting: {setting}}}"
    text = located_mesh([(port, "r1/z1") for port, _ in endpoints], policy)
    text = text.replace(
        "telemetry: {workload: {locality: r1/z1/s1}}",
        "telemetry: {workload: {locality: r1/z1/s1, labels: {tier: gold, rack: a}}}",
    )
    for port, labels in endpoints:
        text = text.replace(
            f": {port}}}, labels: {{version: v1}}",
            f": {port}}}, labels: {{version: v1, {labels}}}",
        )
    return text


def test_traffic_stays_on_the_endpoints_with_the_engines_labels_and_fails_over_by_them() -> None:
    """``failoverPriority: [tier, rack]``, the engine a ``gold`` workload on rack ``a``: the
    endpoint with both (dead) takes the first request, is ejected, and every request then
    goes to the ``gold`` one of another rack, none to ``silver``; with ``tier=silver`` the
    ``silver`` endpoint comes first. It was refused."""

    async def main() -> None:
        gold, silver = [await Upstream(n).start() for n in ("gold", "silver")]
        dead = refusing_port()
        endpoints = [
            (silver.port, "tier: silver, rack: a"),
            (dead, "tier: gold, rack: a"),
            (gold.port, "tier: gold, rack: b"),
        ]
        text = labelled_mesh(endpoints, "{failoverPriority: [tier, rack]}")
        async with engine_for(text) as engine:
            (cluster,) = engine.clusters.values()
            assert [h.priority for h in cluster.hosts] == [2, 0, 1]
            client = await Client.connect(address(engine))
            assert error_type(await client.call()) == "UpstreamConnectFailure"
            assert cluster.priority_load == {0: 0, 1: 100, 2: 0}
            assert await answered_by(client, 10) == {"gold": 10}
            client.close()
        text = labelled_mesh(endpoints, "{failoverPriority: [tier=silver]}")
        async with engine_for(text) as engine:
            (cluster,) = engine.clusters.values()
            assert [h.priority for h in cluster.hosts] == [0, 1, 1]
            client = await Client.connect(address(engine))
            assert await answered_by(client, 10) == {"silver": 10}
            client.close()
        for up in (gold, silver):
            await up.close()

    run(main())


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ("{failoverPriority: [tier, tier]}", "label 'tier' is listed twice"),
        ("{failoverPriority: ['a=b=c']}", "must be a label name or name=value"),
        ("{failoverPriority: ['tier=']}", "must be a label name or name=value"),
        ("{failoverPriority: [{tier: gold}]}", "must be a label name (or name=value)"),
        ("{failoverPriority: [" + ", ".join(f"l{i}" for i in range(17)) + "]}", "at most 16"),
    ],
)
def test_a_bad_failover_priority_is_refused(setting: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        loads_config(labelled_mesh([(1, "tier: gold")], setting), "t.yaml")
    assert caught.value.field is not None and "failoverPriority" in caught.value.field
    assert words in str(caught.value)
