"""The admin endpoint's live page: its JSON (/stats/live), its history ring, and the page as
headless Chromium renders it against an engine under KV traffic."""

from __future__ import annotations

import asyncio
import html.parser
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1] / "proxy"))  # proxy_kit, as tests/proxy does

from peer_check import missing
from proxy_kit import Client, Upstream, engine_for, http_get, mesh, run

from metaprotocol_sdk.proxy.admin_page import History, Sampler, Totals
from metaprotocol_sdk.proxy.stats import Stats

ROUTER = """\
- name: main
  match: {attributes: {method: {exact: get}}}
  route:
    - {destination: {host: svc.test, subset: v1}, weight: 80}
    - {destination: {host: svc.test, subset: v2}, weight: 20}
- name: broken
  match: {attributes: {method: {exact: fail}}}
  route: [{destination: {host: svc.test, subset: v1}}]
- name: "<b class=injected>x</b>"
  match: {attributes: {method: {exact: never}}}
  route: [{destination: {host: svc.test, subset: v2}}]
"""
#: A route name that would be markup if the page used innerHTML: shown as text.
MARKUP = "<b class=injected>x</b>"
V1 = "outbound|9000|v1|svc.test"
V2 = "outbound|9000|v2|svc.test"
LISTENER = "svc.test:9000"


async def _traffic(address: tuple[str, int]) -> None:
    """50 ``get`` (split 40/10), 3 ``fail`` (upstream errors), 2 unrouted (local replies)."""
    c = await Client.connect(address)
    for _ in range(50):
        await c.call("get")
    for _ in range(3):
        await c.call("fail")
    for _ in range(2):
        await c.call("nothing")
    c.close()
    await c.closed


def _requests(stats: dict[str, float], route: str, destination: str) -> int:
    """Requests of every status of one route and destination, from /stats?format=json."""
    prefix = (
        f'metaprotocol_requests_total{{listener="{LISTENER}",route="{route}",'
        f'destination="{destination}",'
    )
    return int(sum(v for k, v in stats.items() if k.startswith(prefix)))


def test_live_data_split_percentiles_errors_and_local_replies() -> None:
    async def main() -> None:
        a, b = await Upstream("a").start(), await Upstream("b").start()
        async with engine_for(mesh([(a.port, "v1"), (b.port, "v2")], router=ROUTER)) as engine:
            admin = engine.admin_address
            assert admin is not None
            await _traffic(engine.listener_addresses[("svc.test", 9000)])
            status, body = await http_get(admin, "/stats/live")
            assert status == 200
            data = json.loads(body)
            _, text = await http_get(admin, "/stats?format=json")
            stats = json.loads(text)
            routes = {(r["listener"], r["route"]): r for r in data["routes"]}
            main_route = routes[(LISTENER, "main")]
            dests = {d["destination"]: d for d in main_route["destinations"]}
            assert main_route["requests"] == 50 and main_route["errors"] == 0
            assert dests[V1]["requests"] == _requests(stats, "main", V1) == 40
            assert dests[V2]["requests"] == _requests(stats, "main", V2) == 10
            assert (dests[V1]["share"], dests[V1]["weight"]) == (80.0, 80.0)
            assert (dests[V2]["share"], dests[V2]["weight"]) == (20.0, 20.0)
            histogram = next(
                h
                for h in engine.stats.histograms("metaprotocol_request_duration_milliseconds")
                if ("destination", V1) in h.labels
            )
            for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
                expected = histogram.quantile(q)
                assert expected is not None
                assert dests[V1][name] == round(expected, 3)
                assert main_route[name] is not None
            broken = routes[(LISTENER, "broken")]
            assert (broken["requests"], broken["errors"]) == (3, 3)
            assert data["local_replies"] == {"RouteNotFound": 2}
            assert data["totals"] == {"requests": 55, "errors": 5, "local_replies": 2}
            assert data["history_interval"] > 0
            # The page and the path list.
            status, page = await http_get(admin, "/")
            assert status == 200 and "/stats/live" in page and "<script" in page
            assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "external resource"
            status, paths = await http_get(admin, "/paths")
            assert status == 200 and "/stats/live" in paths.split() and "/ready" in paths.split()
        await a.close()
        await b.close()

    run(main())


def test_history_is_a_bounded_ring_of_interval_counts() -> None:
    ring = History(size=4)
    for i in range(10):  # requests grow by 10 per sample, errors by 1, local replies by 2
        ring.sample(100.0 + 5 * i, Totals(10 * i, i, 2 * i))
    points = ring.points()
    assert len(ring.samples) == 4 and len(points) == 3
    assert [p["time"] for p in points] == [135.0, 140.0, 145.0]
    assert all((p["requests"], p["errors"], p["local_replies"]) == (10, 1, 2) for p in points)
    assert History().points() == []


def test_history_is_sampled_by_a_timer_while_admin_serves() -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        stats = Stats()
        ring = History(size=3)
        sampler = Sampler(server, stats, ring, interval=3600.0)
        assert len(ring.samples) == 1 and ring.samples[0][1] == Totals(0, 0, 0)  # a baseline
        assert sampler.handle is not None and not sampler.handle.cancelled()  # the next tick
        stats.counter("metaprotocol_requests_total", status="Ok").value += 7
        stats.counter("metaprotocol_requests_total", status="Error").value += 2
        stats.counter("metaprotocol_local_replies_total", type="Timeout").value += 1
        first = sampler.handle
        sampler.tick()  # what the timer runs
        assert first.cancelled() and sampler.handle is not first  # one timer at a time
        assert ring.samples[-1][1] == Totals(9, 2, 1)
        assert ring.points()[-1]["requests"] == 9
        server.close()
        await server.wait_closed()
        sampler.tick()  # the engine closed the admin endpoint: no sample, no next tick
        assert len(ring.samples) == 2 and sampler.handle is None

    run(main())


# -- the page in headless Chromium ------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1200,900",
    # Virtual time runs the page's timers fast and waits for its fetches to finish.
    "--virtual-time-budget=4000",
)


async def _chromium(url: str, *extra: str) -> str:
    """Run headless Chromium once on ``url`` with a fresh profile; its stdout."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        proc = await asyncio.create_subprocess_exec(
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={profile}",
            *extra,
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 40)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}"
    return out.decode()


class _Cells(html.parser.HTMLParser):
    """The text of every cell of the rows carrying ``data-route``, keyed by row and class."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[tuple[str, str | None], dict[str, str]] = {}
        self.local: dict[str, str] = {}
        self.ids: dict[str, str] = {}
        self.body: dict[str, str | None] = {}
        self._row: dict[str, str] | None = None
        self._cell: str | None = None
        self._cell_tag = ""
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if tag == "tr" and "data-route" in a:
            key = (str(a["data-route"]), a.get("data-destination"))
            self._row = self.rows.setdefault(key, {})
        elif tag == "tr" and "data-type" in a:
            self._row = self.local.setdefault(str(a["data-type"]), {})  # type: ignore[arg-type]
        elif tag == "tr":
            self._row = None
        if self._cell is None and tag in ("td", "div") and (a.get("class") or a.get("id")):
            self._cell = (a.get("class") or "").split()[0] if tag == "td" else a.get("id")
            self._cell_tag = tag
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if self._cell is not None and tag == self._cell_tag:
            text = "".join(self._text).strip()
            if tag == "td" and self._row is not None:
                self._row[self._cell] = text
            elif tag != "td":
                self.ids[self._cell] = text
            self._cell = None


def test_page_in_headless_chromium_shows_the_engine_numbers(tmp_path: Path) -> None:
    if CHROMIUM is None:
        missing("chromium", "./dev's setup installs Debian's chromium")
    shot = tmp_path / "admin-page.png"

    async def main() -> tuple[str, dict[str, Any], dict[str, float]]:
        a, b = await Upstream("a").start(), await Upstream("b").start()
        async with engine_for(mesh([(a.port, "v1"), (b.port, "v2")], router=ROUTER)) as engine:
            admin = engine.admin_address
            assert admin is not None
            await _traffic(engine.listener_addresses[("svc.test", 9000)])
            url = f"http://{admin[0]}:{admin[1]}/"
            dom = await _chromium(url, "--dump-dom")
            await _chromium(url, f"--screenshot={shot}")
            _, live = await http_get(admin, "/stats/live")
            _, text = await http_get(admin, "/stats?format=json")
        await a.close()
        await b.close()
        return dom, json.loads(live), json.loads(text)

    dom, live, stats = run(main(), timeout=90)
    page = _Cells()
    page.feed(dom)
    assert int(page.body.get("data-updates") or 0) >= 1, "the page never rendered /stats/live"
    rows = page.rows
    for route, dest in (("main", V1), ("main", V2), ("broken", V1)):
        assert rows[(route, dest)]["requests"] == str(_requests(stats, route, dest))
    assert rows[("main", V1)]["requests"] == "40" and rows[("main", V2)]["requests"] == "10"
    assert rows[("main", None)]["requests"] == "50"
    assert rows[("main", V1)]["share"] == "80.0 %" and rows[("main", V2)]["share"] == "20.0 %"
    assert rows[("main", V2)]["weight"] == "20.0 %"
    assert rows[("broken", V1)]["errors"] == "3"
    dests = {(r["route"], d["destination"]): d for r in live["routes"] for d in r["destinations"]}
    for q in ("p50", "p95", "p99"):
        assert float(rows[("main", V1)][q]) == float(dests[("main", V1)][q]) > 0
    assert page.local["RouteNotFound"]["count"] == "2"
    assert page.ids["total-requests"] == "55" and page.ids["total-errors"] == "5"
    assert page.ids["total-local"] == "2"
    assert rows[(MARKUP, V2)]["requests"] == "0"  # the name is text, not an element
    assert "<b class=" not in dom and "&lt;b class=injected&gt;" in dom
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
