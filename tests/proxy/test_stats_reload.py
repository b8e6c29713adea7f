"""Stats series of what a reload removed: dropped once nothing in flight uses them, capped.

A control plane that renames its routes and clusters on every push must not make the stats
(memory, ``/stats``, the Prometheus scrape) grow without end; requests in flight across a
reload are still counted in the series they started in, and the totals agree with what the
clients saw.
"""

from __future__ import annotations

import asyncio
import functools
import json
import textwrap
from pathlib import Path

import pytest
from proxy_kit import Client, Upstream, error_type, http_get, run, until

from metaprotocol_sdk import ConfigError
from metaprotocol_sdk.proxy import Engine, load_config, loads_config

LISTENER = "svc.test:9000"
REQUESTS = "metaprotocol_requests_total"


def renamed(i: int, port: int, proxy: str = "", routes: int = 1, rule: str = "") -> str:
    """A mesh whose route, destination service and cluster are all named after ``i``
    (``rule``: more lines for every route)."""
    rules = "".join(
        f"    - name: r{i}-{k}\n"
        + (f"      match: {{attributes: {{method: {{exact: m{k}}}}}}}\n" if k else "")
        + f"      route: [{{destination: {{host: s{i}.test}}}}]\n"
        + (f"      {rule}\n" if rule else "")
        for k in [*range(1, routes), 0]  # r{i}-0 takes what the others do not match
    )
    return (
        textwrap.dedent(
            f"""\
        apiVersion: metaprotocol.aeraki.io/v1alpha1
        kind: ApplicationProtocol
        metadata: {{name: kv}}
        spec: {{protocol: kv, codec: "metaprotocol_sdk.examples.kv:KVCodec"}}
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {{name: front}}
        spec:
          hosts: [svc.test]
          ports: [{{number: 9000, name: tcp-metaprotocol-kv-svc, protocol: TCP}}]
          resolution: STATIC
          endpoints: []
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {{name: s{i}}}
        spec:
          hosts: [s{i}.test]
          ports: [{{number: 9000, name: tcp-metaprotocol-kv-svc, protocol: TCP}}]
          resolution: STATIC
          endpoints:
            - {{address: 127.0.0.1, ports: {{tcp-metaprotocol-kv-svc: {port}}}}}
        ---
        apiVersion: metaprotocol.aeraki.io/v1alpha1
        kind: MetaRouter
        metadata: {{name: svc}}
        spec:
          hosts: [svc.test]
          routes:
        """
        )
        + rules
        + textwrap.dedent(
            """\
        ---
        apiVersion: proxy.metaprotocol.io/v1alpha1
        kind: ProxyConfig
        metadata: {name: engine}
        spec:
          listeners: [{host: svc.test, port: 9000, bind: '127.0.0.1:0'}]
          admin: {bind: '127.0.0.1:0'}
          telemetry: {istioMetrics: true}
        """
        )
        + textwrap.indent(textwrap.dedent(proxy), "  ")
    )


def front(engine: Engine) -> tuple[str, int]:
    return engine.listener_addresses[("svc.test", 9000)]


async def scrape(engine: Engine) -> tuple[dict[str, float], str]:
    """``/stats?format=json`` and ``/stats/prometheus``, as a scraper gets them."""
    assert engine.admin_address is not None
    status, body = await http_get(engine.admin_address, "/stats?format=json")
    assert status == 200
    status, text = await http_get(engine.admin_address, "/stats/prometheus")
    assert status == 200
    return dict(json.loads(body)), text


def samples(text: str) -> int:
    """The samples (lines that are not comments) of a Prometheus exposition."""
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def test_renaming_reloads_keep_the_series_bounded() -> None:
    """Every reload renames the route, the destination service and its cluster; one request
    goes through each. The series of the names gone are dropped: the count, the JSON and the
    Prometheus text stop growing after the first reloads."""

    async def main() -> None:
        up = await Upstream("a").start()
        engine = Engine(loads_config(renamed(0, up.port), "t0.yaml"))
        await engine.start()
        try:
            c = await Client.connect(front(engine))
            counts: list[tuple[int, int]] = []
            for i in range(1, 41):
                await engine.apply(loads_config(renamed(i, up.port), f"t{i}.yaml"))
                assert error_type(await c.call()) is None
                snapshot, text = await scrape(engine)
                counts.append((len(snapshot), samples(text)))
            print("json keys, prometheus samples per reload:", counts[::8], counts[-1])
            assert counts[-1] == counts[9], (counts[9], counts[-1])
            # The previous names' upstream connection closes after the swap (it drains);
            # the next housekeeping sweep drops their series.
            await until(
                lambda: not [k for k in engine.stats_snapshot() if "r39-" in k or "s39" in k],
                "the series of the previous names dropped",
            )
            snapshot, text = await scrape(engine)
            assert not [k for k in snapshot if "r39-" in k or "s39." in k]
            assert "r40-0" in text and "s40.test" in text
            # What the clients saw is still there, in the totals of the names gone.
            requests = engine.stats.total("metaprotocol_requests_total")
            istio = engine.stats.total("istio_requests_total")
            assert requests == istio == 40
            c.close()
        finally:
            await engine.stop(drain=1.0)
            await up.close()

    run(main(), timeout=60)


def dest(i: int) -> str:
    return f"outbound|9000||s{i}.test"


def folded(kind: str, status: str) -> dict[str, str]:
    """The labels of the series that folds others (``removed``, ``overflow``)."""
    return {"listener": kind, "route": kind, "destination": kind, "status": status, "stats": kind}


def test_sighup_reloads_of_a_renaming_file_keep_the_series_bounded(tmp_path: Path) -> None:
    """The same through the CLI's reloader (what ``SIGHUP`` and ``--watch`` call): the file is
    rewritten with new names each time."""
    from metaprotocol_sdk.cli.proxy import Reloader

    async def main() -> None:
        up = await Upstream("a").start()
        path = tmp_path / "mesh.yaml"
        path.write_text(renamed(0, up.port))
        engine = Engine(load_config([str(path)]))
        await engine.start()
        reloader = Reloader(engine, (str(path),))
        task = asyncio.get_running_loop().create_task(reloader.run())
        try:
            c = await Client.connect(front(engine))
            sizes = []

            def reloaded(n: int) -> bool:
                ok = engine.stats.get("metaprotocol_reloads_total", source="sighup", result="ok")
                return ok == n

            for i in range(1, 21):
                path.write_text(renamed(i, up.port))
                reloader.request("sighup")
                await until(functools.partial(reloaded, i), f"reload {i} done")
                assert error_type(await c.call()) is None
                sizes.append(len(engine.stats_snapshot()))
            assert max(sizes[10:]) <= max(sizes[:10]), sizes
            assert engine.stats.total(REQUESTS) == 20
            c.close()
        finally:
            task.cancel()
            await engine.stop(drain=1.0)
            await up.close()

    run(main(), timeout=60)


def test_a_request_in_flight_across_a_reload_is_counted_in_its_series() -> None:
    """Two requests are in flight on the old route when the reload renames everything: the
    old series stay while they are (a sweep keeps them), each is counted in them when it
    ends, and the totals agree with what the client got, before and after the old series
    are dropped."""

    async def main() -> None:
        up = await Upstream("a").start()
        proxy = "timeouts: {route: 1s}\n"
        engine = Engine(loads_config(renamed(0, up.port, proxy), "t0.yaml"))
        await engine.start()
        try:
            c = await Client.connect(front(engine))
            for _ in range(3):
                assert error_type(await c.call()) is None
            slow = c.start("slow")
            hang = c.start("hang")  # never answered: its route's timeout ends it
            await up.wait_received(5)
            await engine.apply(loads_config(renamed(1, up.port, proxy), "t1.yaml"))
            for _ in range(2):
                assert error_type(await c.call()) is None
            old = {"listener": LISTENER, "route": "r0-0", "destination": dest(0)}
            new = {"listener": LISTENER, "route": "r1-0", "destination": dest(1)}
            engine.prune_stats()  # what every housekeeping sweep does: they are in flight
            assert engine.stats.get(REQUESTS, **old, status="Ok") == 3
            assert engine.stats.get(REQUESTS, **new, status="Ok") == 2
            up.release.set()
            assert error_type(await asyncio.wait_for(slow, 5)) is None
            # ``hang`` still holds the old route: the series is there, with the reply counted.
            engine.prune_stats()
            assert engine.stats.get(REQUESTS, **old, status="Ok") == 4
            assert error_type(await asyncio.wait_for(hang, 5)) == "Timeout"
            await until(
                lambda: not [k for k in engine.stats_snapshot() if '"r0-0"' in k or "s0." in k],
                "the old names' series dropped once nothing is in flight",
            )
            # The clients got 6 Ok and 1 Timeout: so say the totals, old names folded.
            assert engine.stats.total(REQUESTS, status="Ok") == 6
            assert engine.stats.total(REQUESTS, status="Timeout") == 1
            assert engine.stats.get(REQUESTS, **folded("removed", "Ok")) == 4
            assert engine.stats.get(REQUESTS, **folded("removed", "Timeout")) == 1
            assert engine.stats.get(REQUESTS, **new, status="Ok") == 2
            assert engine.stats.total("istio_requests_total") == 7
            assert engine.stats.get("metaprotocol_stats_removed_total") > 0
            c.close()
        finally:
            await engine.stop(drain=1.0)
            await up.close()

    run(main(), timeout=30)


def test_a_request_a_filter_holds_across_a_reload_is_counted_in_its_series() -> None:
    """A fault delay holds two requests of the old route while the reload renames
    everything; once let go they go to the old destination and are counted there."""

    async def main() -> None:
        up = await Upstream("a").start()
        proxy = "timeouts: {route: 1s}\n"
        delay = "fault: {delay: {fixedDelay: 200ms, percentage: {value: 100}}}"
        engine = Engine(loads_config(renamed(0, up.port, proxy, rule=delay), "t0.yaml"))
        await engine.start()
        try:
            c = await Client.connect(front(engine))
            held = c.start()
            hang = c.start("hang")  # after its delay, never answered: it times out
            await until(lambda: engine.pending == 2, "both requests held by the delay")
            await engine.apply(loads_config(renamed(1, up.port, proxy), "t1.yaml"))
            assert error_type(await c.call()) is None  # the new route: no delay
            engine.prune_stats()
            old = {"listener": LISTENER, "route": "r0-0", "destination": dest(0)}
            durations = stats_of(engine, "metaprotocol_request_duration_milliseconds")
            assert tuple(old.items()) in durations  # kept: held requests will use it
            assert error_type(await asyncio.wait_for(held, 5)) is None
            engine.prune_stats()  # ``hang`` is in flight on the old route still
            assert engine.stats.get(REQUESTS, **old, status="Ok") == 1
            assert error_type(await asyncio.wait_for(hang, 5)) == "Timeout"
            await until(
                lambda: not [k for k in engine.stats_snapshot() if '"r0-0"' in k],
                "the old route's series dropped",
            )
            assert engine.stats.total(REQUESTS, status="Ok") == 2
            assert engine.stats.total(REQUESTS, status="Timeout") == 1
            assert engine.stats.total("metaprotocol_faults_total", type="delay") == 2
            c.close()
        finally:
            await engine.stop(drain=1.0)
            await up.close()

    run(main(), timeout=30)


def stats_of(engine: Engine, histogram: str) -> set[tuple[tuple[str, str], ...]]:
    """The label sets of ``histogram``'s series."""
    return {h.labels for h in engine.stats.histograms(histogram)}


def test_the_series_cap_folds_new_names_into_an_overflow_series() -> None:
    """With ``limits.maxStatsSeries: 100``, a configuration of 60 routes (and then one of
    1000) holds at most 100 series plus the process-wide ones and the bounded folds; what
    did not fit is
    counted in ``metaprotocol_stats_overflow_total`` and its requests in the
    ``stats="overflow"`` series."""

    async def main() -> None:
        up = await Upstream("a").start()
        proxy = "limits: {maxStatsSeries: 100}\n"
        engine = Engine(loads_config(renamed(0, up.port, proxy, routes=60), "t0.yaml"))
        await engine.start()
        try:
            stats = engine.stats
            # 100 series, plus the process-wide ones (made whatever the cap) and the folds.
            capped = stats.series_count
            assert capped <= 100 + 10 + 10, capped
            # The listener's own series are made before its routes' (and not folded).
            assert stats.get("metaprotocol_downstream_connections_total", listener=LISTENER) == 0
            assert ("metaprotocol_downstream_connections_total", ((("listener", LISTENER),))) in {
                (c.name, c.labels)
                for c in stats.counters("metaprotocol_downstream_connections_total")
            }
            overflow = stats.get("metaprotocol_stats_overflow_total")
            assert overflow > 0
            c = await Client.connect(front(engine))
            assert error_type(await c.call("m59")) is None  # a route past the cap
            assert error_type(await c.call("m1")) is None  # r0-1: its histogram made in time
            # A status's counter is made at its first request: past the cap, both fold.
            assert stats.get(REQUESTS, **folded("overflow", "Ok")) == 2
            assert stats.total(REQUESTS) == 2
            durations = {
                dict(h.labels)["route"]: h.count
                for h in stats.histograms("metaprotocol_request_duration_milliseconds")
                if dict(h.labels)["destination"]  # not the routes' local replies
            }
            assert durations["r0-1"] == 1 and durations["overflow"] == 1
            assert "r0-59" not in durations
            await engine.apply(loads_config(renamed(1, up.port, proxy, routes=1000), "t1.yaml"))
            assert stats.get("metaprotocol_stats_overflow_total") > overflow
            # Past the cap only the folds grow, and they are bounded by metric and status.
            assert stats.series_count <= capped + 20, (capped, stats.series_count)
            snapshot, text = await scrape(engine)
            assert snapshot["metaprotocol_stats_overflow_total"] > overflow
            assert f"\nmetaprotocol_stats_series {stats.series_count}\n" in text
            assert 'stats="overflow"' in text
            c.close()
        finally:
            await engine.stop(drain=1.0)
            await up.close()

    run(main(), timeout=60)


def test_a_series_cap_too_low_is_a_readable_config_error() -> None:
    with pytest.raises(ConfigError, match=r"spec\.limits\.maxStatsSeries.*\[100, "):
        loads_config(renamed(0, 9, "limits: {maxStatsSeries: 10}\n"), "low.yaml")
    with pytest.raises(ConfigError, match=r"spec\.limits\.maxStatsSeries"):
        loads_config(renamed(0, 9, "limits: {maxStatsSeries: lots}\n"), "word.yaml")


def test_a_scope_does_not_depend_on_label_order() -> None:
    """The engine names a destination's scope by its labels as given (listener, route,
    destination); a series made with the same names in another order has the same scope."""
    from metaprotocol_sdk.proxy.router import Target
    from metaprotocol_sdk.proxy.stats import Stats, scope

    labels = (("status", "Ok"), ("route", "r"), ("destination", "d"), ("listener", "l"))
    target = Target("d", None, 1, Stats(), "l", "r")
    assert scope(labels) == tuple(target.labels.items()) == scope(tuple(target.labels.items()))
    stats = Stats()
    stats.counter("metaprotocol_requests_total", status="Ok", route="r", listener="l").value = 3
    assert stats.prune({(("listener", "l"), ("route", "r"))}) == 0
    assert stats.prune(set()) == 1
    assert stats.total("metaprotocol_requests_total") == 3  # in the stats="removed" series
