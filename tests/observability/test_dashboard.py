"""The Grafana dashboard: a valid dashboard model, and every panel's PromQL answers with data
when a real Prometheus (Debian's ``prometheus``) scrapes a running engine under traffic."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# The KV servers, clients and config builders of the engine tests (pytest runs in importlib
# mode, and a conftest here would be shared with the other tests of this folder).
sys.path.insert(0, str(Path(__file__).parents[1] / "proxy"))

from peer_check import missing
from proxy_kit import Client, Upstream, error_type, mesh, refusing_port, run

from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.config.models import Telemetry
from metaprotocol_sdk.proxy.stats import HELP

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "metaprotocol-dashboard.json"
#: What Grafana puts for ``$__rate_interval`` with a 1 s scrape (at least 4 scrape intervals).
RATE_INTERVAL = "15s"
#: Scrapes that must exist (all up) before the panels are evaluated: enough for every rate().
SCRAPES = 6
INSTANCE = 'instance=~"$instance"'
QUERY_LABELS = "metaprotocol_requests_total"  # the series the engine variable lists
DEADLINE = 40.0  # bound on waiting for Prometheus (start, scrapes)

ROUTER = """\
- name: split
  match: {attributes: {method: {exact: get}}}
  route:
    - {destination: {host: svc.test, subset: v1}, weight: 80}
    - {destination: {host: svc.test, subset: v2}, weight: 20}
- name: failing
  match: {attributes: {method: {exact: fail}}}
  route: [{destination: {host: svc.test, subset: v1}}]
- name: broken
  match: {attributes: {method: {exact: broken}}}
  route: [{destination: {host: svc.test, subset: empty}}]
"""


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def targets(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """``(panel title, expr)`` of every target of every panel."""
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def test_dashboard_is_a_valid_datasource_independent_grafana_dashboard() -> None:
    dashboard = load_dashboard()
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    # Every panel and target reads the chosen Prometheus, never a uid of one installation.
    portable = {"type": "prometheus", "uid": "${datasource}"}
    engines = variables["instance"]
    assert engines["datasource"] == portable and engines["includeAll"] and engines["multi"]
    assert engines["allValue"] == ".*"
    assert engines["query"]["query"] == "label_values(metaprotocol_requests_total, instance)"
    panels = dashboard["panels"]
    assert len(panels) >= 5
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["title"].strip(), panel
        assert panel["datasource"] == portable, panel["title"]
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        for target in panel["targets"]:
            assert target.get("datasource", portable) == portable, panel["title"]
            assert target["expr"].strip(), panel["title"]
    # Every series a panel reads is one the engine exports (renames break panels silently).
    names = set(HELP)
    for title, expr in targets(dashboard):
        for metric in re.findall(r"\b((?:metaprotocol|istio)_[a-z_]+)", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", metric)
            assert base in names, (title, metric)
    # ... and every selector keeps to the engines chosen in the dashboard.
    for title, expr in targets(dashboard):
        selectors = re.findall(r"\b(?:metaprotocol|istio)_[a-z_]+(\{[^}]*\})?", expr)
        assert selectors and all(INSTANCE in sel for sel in selectors), (title, expr)
    # What issue 16 asks the dashboard to show.
    exprs = " ".join(expr for _, expr in targets(dashboard))
    for needed in (
        "metaprotocol_requests_total",
        "destination_version",
        'status="Ok"',
        "histogram_quantile(0.5,",
        "histogram_quantile(0.95,",
        "histogram_quantile(0.99,",
        "metaprotocol_local_replies_total",
        "metaprotocol_upstream_connect_errors_total",
    ):
        assert needed in exprs, needed


# -- a real Prometheus ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def api(base: str, path: str, **params: str) -> Any:
    """GET a Prometheus API path; the ``data`` of a successful answer."""
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=5) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return body["data"]


@contextlib.contextmanager
def prometheus(target: tuple[str, int], workdir: Path) -> Iterator[str]:
    """A Prometheus scraping ``target``'s ``/stats`` every second; yields its base URL."""
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: engine\n"
        "    metrics_path: /stats\n"
        f"    static_configs: [{{targets: ['{target[0]}:{target[1]}']}}]\n",
        encoding="utf-8",
    )
    log = (workdir / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def wait_for_scrapes(base: str, workdir: Path) -> None:
    """Poll until Prometheus has ``SCRAPES`` successful scrapes of the engine (bounded)."""
    end = time.monotonic() + DEADLINE
    seen: object = None
    while time.monotonic() < end:
        try:
            seen = api(
                base,
                "/api/v1/query",
                query=f'count_over_time(up{{job="engine"}}[1m]) >= {SCRAPES} '
                'and min_over_time(up{job="engine"}[1m]) == 1',
            )["result"]
            if seen:
                return
        except OSError as exc:  # not listening yet
            seen = exc
        time.sleep(0.2)  # polling interval, not a synchronisation
    log = (workdir / "prometheus.log").read_text(errors="replace")[-2000:]
    pytest.fail(f"no {SCRAPES} successful scrapes within {DEADLINE}s ({seen!r}); log:\n{log}")


def with_istio(text: str) -> Engine:
    config = loads_config(text)
    proxy = dataclasses.replace(config.proxy, telemetry=Telemetry(istio_metrics=True))
    return Engine(dataclasses.replace(config, proxy=proxy))


async def drive(client: Client, stop: asyncio.Event) -> dict[str | None, int]:
    """Mixed traffic until ``stop``: a split route, application errors, refused connects and
    requests no route matches; returns the replies by error type."""
    seen: dict[str | None, int] = {}
    methods = ["get"] * 8 + ["fail", "broken", "nothing"]
    while not stop.is_set():
        for reply in await asyncio.gather(*(client.call(m) for m in methods)):
            kind = error_type(reply)
            seen[kind] = seen.get(kind, 0) + 1
        await asyncio.sleep(0.01)  # pacing: a steady rate, not a synchronisation
    return seen


def test_every_panel_query_returns_data_from_a_real_prometheus(tmp_path: Path) -> None:
    if shutil.which("prometheus") is None:
        missing("Debian's prometheus", "./dev setup installs it")
    dashboard = load_dashboard()

    async def main() -> dict[str, list[Any]]:
        v1, v2 = await Upstream("v1").start(), await Upstream("v2").start()
        text = mesh([(v1.port, "v1"), (v2.port, "v2"), (refusing_port(), "none")], router=ROUTER)
        engine = with_istio(text)
        await engine.start()
        stop = asyncio.Event()
        try:
            assert engine.admin_address is not None
            client = await Client.connect(engine.listener_addresses[("svc.test", 9000)])
            traffic = asyncio.create_task(drive(client, stop))
            with prometheus(engine.admin_address, tmp_path) as base:
                await asyncio.to_thread(wait_for_scrapes, base, tmp_path)
                # The engine variable's choices (Grafana's label_values) include this engine.
                instance = "{}:{}".format(*engine.admin_address)
                choices = await asyncio.to_thread(
                    api, base, "/api/v1/label/instance/values", **{"match[]": QUERY_LABELS}
                )
                assert choices == [instance], choices
                results, elsewhere = {}, {}
                for title, expr in targets(dashboard):
                    query = expr.replace("$__rate_interval", RATE_INTERVAL)
                    for chosen, out in ((instance, results), ("elsewhere:1", elsewhere)):
                        q = query.replace("$instance", chosen)
                        data = await asyncio.to_thread(api, base, "/api/v1/query", query=q)
                        out[f"{title}: {expr}"] = data["result"]
                # Another engine chosen: nothing of this one shows.
                assert not any(elsewhere.values()), elsewhere
            stop.set()
            seen = await asyncio.wait_for(traffic, 5)
            # The traffic had every outcome the panels show.
            assert seen.keys() >= {None, "UpstreamConnectFailure", "RouteNotFound"}, seen
            client.close()
            return results
        finally:
            stop.set()
            await engine.stop(drain=0.5)
            await v1.close()
            await v2.close()

    results = run(main(), timeout=60.0)
    for query, series in results.items():
        assert series, f"empty result: {query}"
        values = [float(s["value"][1]) for s in series]
        # A NaN or all-zero panel is an empty chart: rates, ratios and quantiles all move.
        assert any(math.isfinite(v) and v > 0 for v in values), (query, series)
