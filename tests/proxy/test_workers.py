"""``metaprotocol proxy --workers 2``: real processes, real sockets, KV clients and upstream.

Each test runs the supervisor as a child process; the KV upstream and the clients run in the
test's event loop. Waits poll the supervisor's admin endpoint with a deadline, never sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import types
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from proxy_kit import (
    WAIT,
    Client,
    Upstream,
    http_get,
    mesh,
    run,
    sighup_at_the_gate,
    start_gate,
)

from metaprotocol_sdk.proxy import Stats, loads_config, stats_merge, workers
from metaprotocol_sdk.proxy.config.models import Admin
from metaprotocol_sdk.proxy.stats_merge import MergedStats

CONNECTIONS = 64  # P(all on one of two workers) = 2**-63 with SO_REUSEPORT's hash


class Supervisor:
    """``metaprotocol proxy --workers N`` in a child process."""

    def __init__(
        self,
        tmp_path: Path,
        text: str,
        count: int = 2,
        *extra: str,
        env: dict[str, str] | None = None,
        starting: Callable[[int], None] | None = None,
    ) -> None:
        """``env``: the child's environment; ``starting``: called with its pid before its
        addresses are read."""
        config = tmp_path / "mesh.yaml"
        config.write_text(text)
        if env is None:
            path = [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "metaprotocol_sdk", "proxy", "-c", str(config)),
                *("--workers", str(count), *extra),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        if starting is not None:
            starting(self.proc.pid)
        assert self.proc.stdout is not None
        listening = self.proc.stdout.readline().split()
        admin = self.proc.stdout.readline().split()
        assert listening[:2] == ["listening", "svc.test:9000"], (listening, self.stop())
        host, port = listening[-1].rsplit(":", 1)
        self.address = (host, int(port))
        assert admin[:2] == ["admin", "on"], admin
        host, port = admin[-1].rsplit(":", 1)
        self.admin = (host, int(port))

    async def get(self, path: str, admin: tuple[str, int] | None = None) -> Any:
        status, body = await http_get(admin or self.admin, path)
        assert status == 200, (path, status, body)
        return json.loads(body)

    async def stats(self) -> dict[str, float]:
        return dict(await self.get("/stats?format=json"))

    async def workers(self) -> list[dict[str, Any]]:
        return list((await self.get("/config_dump"))["workers"])

    async def worker_stats(self, worker: dict[str, Any]) -> dict[str, float]:
        host, port = worker["admin"].rsplit(":", 1)
        return dict(await self.get("/stats?format=json", (host, int(port))))

    def stop(self) -> tuple[int, str]:
        """SIGTERM, then the exit status and stderr (which must hold no traceback)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=5)
        assert "Traceback" not in err, err
        return self.proc.returncode, err


def total(stats: dict[str, float], name: str, *parts: str) -> float:
    """Sum of the series of ``name`` whose labels contain every one of ``parts``."""
    return sum(
        v
        for k, v in stats.items()
        if (k == name or k.startswith(name + "{")) and all(p in k for p in parts)
    )


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 15.0) -> Any:
    """Poll ``check`` until it returns a true value (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def one_request_each(address: tuple[str, int], n: int, method: str = "get") -> None:
    """``n`` connections, one request each, all answered by the upstream."""

    async def one() -> None:
        client = await Client.connect(address)
        try:
            reply = await client.call(method)
            assert reply.attributes.get("server") == "up"
        finally:
            client.close()

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), 4 * WAIT)


async def served_by_every_worker(sup: Supervisor, workers: list[dict[str, Any]]) -> None:
    """Connections spread over the workers again: one request each, and every worker in
    ``workers`` (as listed by the supervisor) accepted some."""
    await one_request_each(sup.address, CONNECTIONS)
    accepted = [
        total(await sup.worker_stats(w), "metaprotocol_downstream_connections_total")
        for w in workers
    ]
    assert all(n > 0 for n in accepted), accepted


def test_connections_spread_over_both_workers_and_stats_are_summed(tmp_path: Path) -> None:
    async def main() -> None:
        up = await Upstream("up").start()
        sup = Supervisor(tmp_path, mesh([(up.port, "v1")]))
        try:
            await one_request_each(sup.address, CONNECTIONS)

            async def counted() -> dict[str, float] | None:
                stats = await sup.stats()
                done = total(stats, "metaprotocol_requests_total") == CONNECTIONS
                return stats if done else None

            stats = await until(counted, "the supervisor to count every request")
            assert total(stats, "metaprotocol_requests_total", 'status="Ok"') == CONNECTIONS
            assert total(stats, "metaprotocol_downstream_connections_total") == CONNECTIONS
            duration = "metaprotocol_request_duration_milliseconds_count"
            assert total(stats, duration, 'route="default"') == CONNECTIONS  # histograms merged
            assert stats['metaprotocol_worker_up{worker="0"}'] == 1
            assert stats['metaprotocol_worker_up{worker="1"}'] == 1
            assert 'metaprotocol_requests_pending{worker="1"}' in stats  # gauges per worker
            assert "metaprotocol_requests_pending" in stats  # and summed
            accepted = []
            for worker in await sup.workers():
                assert "config" not in worker  # same configuration, same shared port
                own = await sup.worker_stats(worker)
                accepted.append(total(own, "metaprotocol_downstream_connections_total"))
                host, port = worker["admin"].rsplit(":", 1)
                status, text = await http_get((host, int(port)), "/stats/prometheus")
                assert status == 200 and "# TYPE metaprotocol_requests_total counter" in text
            assert all(n > 0 for n in accepted), accepted  # both workers served
            assert sum(accepted) == CONNECTIONS
            prometheus = (await http_get(sup.admin, "/stats/prometheus"))[1]
            assert "# TYPE metaprotocol_requests_pending gauge" in prometheus
            assert 'metaprotocol_requests_total{listener="svc.test:9000"' in prometheus
            # The live page and its data, for both workers at once.
            live = await sup.get("/stats/live")
            assert live["workers"] == 2 and live["totals"]["requests"] == CONNECTIONS
            (route,) = [r for r in live["routes"] if r["route"] == "default"]
            (dest,) = [d for d in route["destinations"] if d["destination"]]
            assert route["requests"] == dest["requests"] == CONNECTIONS and dest["share"] == 100
            assert sum(dest["buckets"]) == CONNECTIONS and route["p50"] is not None
            status, page = await http_get(sup.admin, "/")
            assert status == 200 and "<html" in page.lower()
            status, text = await http_get(sup.admin, "/nope")
            assert status == 404 and "/paths lists the paths" in text, text
        finally:
            code, _ = sup.stop()
            await up.close()
        assert code == 0

    run(main(), timeout=90)


def test_sigterm_drains_every_worker(tmp_path: Path) -> None:
    async def main() -> None:
        up = await Upstream("up").start()
        sup = Supervisor(tmp_path, mesh([(up.port, "v1")]))
        clients: list[Client] = []
        try:
            for _ in range(16):
                clients.append(await Client.connect(sup.address))
            replies = [c.start("slow") for c in clients]
            await up.wait_received(len(clients))

            async def both_pending() -> bool:
                s = await sup.stats()
                return all(s[f'metaprotocol_requests_pending{{worker="{i}"}}'] > 0 for i in (0, 1))

            await until(both_pending, "requests in flight on both workers")
            admins = [w["admin"] for w in await sup.workers()]
            sup.proc.send_signal(signal.SIGTERM)

            async def draining() -> bool:
                for admin in admins:
                    host, port = admin.rsplit(":", 1)
                    status, _ = await http_get((host, int(port)), "/ready")
                    if status != 503:
                        return False
                return True

            await until(draining, "both workers to drain")
            # A SIGHUP now reaches the draining workers: each refuses it and drains on (its
            # default action, once the handler was removed, ended them mid-drain).
            sup.proc.send_signal(signal.SIGHUP)

            async def refused() -> bool:
                for admin in admins:
                    host, port = admin.rsplit(":", 1)
                    status, body = await http_get((host, int(port)), "/config_dump")
                    last = json.loads(body)["lastReload"] if status == 200 else None
                    if not last or last["result"] != "refused" or "draining" not in last["error"]:
                        return False
                return True

            await until(refused, "both workers to refuse the reload")
            up.release.set()  # the in-flight requests complete during the drain
            for reply in await asyncio.wait_for(asyncio.gather(*replies), WAIT):
                assert reply.attributes.get("server") == "up"
            assert await asyncio.to_thread(sup.proc.wait, 30) == 0
        finally:
            for c in clients:
                c.close()
            code, err = sup.stop()
            await up.close()
        assert code == 0
        # The supervisor and each worker, once each.
        drained = ["info: draining", "info: worker 0: draining", "info: worker 1: draining"]
        drains = sorted(line for line in err.splitlines() if line.endswith(": draining"))
        assert drains == drained, err
        assert err.count("reload refused (sighup): the engine is draining") == 2, err

    run(main(), timeout=90)


def test_a_killed_worker_is_restarted_and_counted(tmp_path: Path) -> None:
    async def main() -> None:
        up = await Upstream("up").start()
        sup = Supervisor(tmp_path, mesh([(up.port, "v1")]))
        try:
            first = await sup.workers()
            os.kill(first[0]["pid"], signal.SIGKILL)

            async def restarted() -> list[dict[str, Any]] | None:
                now = await sup.workers()
                w = now[0]
                fresh = w["up"] and w["pid"] not in (None, first[0]["pid"])
                return now if fresh and w["restarts"] == 1 else None

            now = await until(restarted, "worker 0 to be started again")
            assert now[1]["pid"] == first[1]["pid"] and now[1]["restarts"] == 0
            stats = await sup.stats()
            assert stats['metaprotocol_worker_restarts_total{worker="0"}'] == 1
            assert stats['metaprotocol_worker_restarts_total{worker="1"}'] == 0
            await served_by_every_worker(sup, now)  # service continues on both
        finally:
            code, err = sup.stop()
            await up.close()
        assert code == 0
        assert "worker 0 (pid" in err and "killed by SIGKILL" in err, err

    run(main(), timeout=90)


def test_a_worker_started_again_keeps_the_counts_of_the_one_that_crashed(tmp_path: Path) -> None:
    """The counts of a worker that crashed were gone with it: the summed counters went down
    (64 requests counted, then 36 once worker 0 was started again), which Prometheus takes
    for a counter reset (an increase as large as the whole new sum). They stay now, and go
    on from there."""

    async def main() -> None:
        up = await Upstream("up").start()
        sup = Supervisor(tmp_path, mesh([(up.port, "v1")]))
        try:
            first = await sup.workers()
            await served_by_every_worker(sup, first)
            name = "metaprotocol_requests_total"
            assert total(await sup.stats(), name) == CONNECTIONS
            os.kill(first[0]["pid"], signal.SIGKILL)

            async def restarted() -> list[dict[str, Any]] | None:
                now = await sup.workers()
                return now if now[0]["up"] and now[0]["pid"] != first[0]["pid"] else None

            now = await until(restarted, "worker 0 to be started again")
            assert total(await sup.stats(), name) == CONNECTIONS
            await served_by_every_worker(sup, now)
            assert total(await sup.stats(), name) == 2 * CONNECTIONS
            duration = "metaprotocol_request_duration_milliseconds_count"
            assert total(await sup.stats(), duration) == 2 * CONNECTIONS
        finally:
            sup.stop()
            await up.close()

    run(main(), timeout=90)


def test_a_worker_its_watchdog_ended_is_replaced_and_the_other_serves(tmp_path: Path) -> None:
    watchdog = "watchdog: {missTimeout: 50ms, megamissTimeout: 200ms, killTimeout: 500ms}\n"

    async def main() -> None:
        up = await Upstream("up").start()
        text = mesh(
            [(up.port, "v1")], proxy=watchdog, protocol="kvs", codec="proxy_kit:StallingKVCodec"
        )
        sup = Supervisor(tmp_path, text)
        try:
            first = await sup.workers()
            client = await Client.connect(sup.address)
            client.start("stall", {"stall-ms": "30000", "how": "sleep"})  # a stuck codec
            await asyncio.wait_for(client.closed, 3 * WAIT)  # its worker was ended

            async def replaced() -> list[dict[str, Any]] | None:
                now = await sup.workers()
                fresh = [w for w, old in zip(now, first, strict=True) if w["pid"] != old["pid"]]
                done = len(fresh) == 1 and fresh[0]["up"] and fresh[0]["restarts"] == 1
                return now if done else None

            now = await until(replaced, "the stuck worker to be replaced")
            (index,) = [
                w["worker"] for w, o in zip(now, first, strict=True) if w["pid"] != o["pid"]
            ]
            other = 1 - index
            assert now[other]["pid"] == first[other]["pid"] and now[other]["restarts"] == 0
            stats = await sup.stats()
            assert stats[f'metaprotocol_worker_restarts_total{{worker="{index}"}}'] == 1
            await served_by_every_worker(sup, now)  # served on both again
        finally:
            code, err = sup.stop()
            await up.close()
        assert code == 0
        assert f"worker {index} (pid {first[index]['pid']}) stopped (exit status 70: its " in err
        assert "watchdog.killTimeout 0.5 s" in err and "stall_the_loop" in err, err

    run(main(), timeout=90)


def test_a_stuck_worker_does_not_hang_the_admin_endpoint(tmp_path: Path) -> None:
    """A stuck worker does not answer: the scrape comes in time without it, and its counts
    are published as they were (the sums fell by them, which Prometheus takes for a counter
    reset: an increase as large as the whole sum), then go on once it answers again."""

    async def main() -> None:
        up = await Upstream("up").start()
        sup = Supervisor(tmp_path, mesh([(up.port, "v1")]))
        await served_by_every_worker(sup, await sup.workers())
        before = total(await sup.stats(), "metaprotocol_requests_total")
        assert before == CONNECTIONS
        stuck = (await sup.workers())[1]["pid"]
        os.kill(stuck, signal.SIGSTOP)
        try:
            stats = await sup.stats()  # within http_get's WAIT despite the stopped worker
            assert stats['metaprotocol_worker_up{worker="0"}'] == 1
            assert stats['metaprotocol_worker_up{worker="1"}'] == 0
            assert total(stats, "metaprotocol_requests_total") == before
            entry = (await sup.workers())[1]
            assert not entry["up"] and "no answer within" in entry["error"]
            os.kill(stuck, signal.SIGCONT)
            await served_by_every_worker(sup, await sup.workers())
            stats = await sup.stats()
            assert total(stats, "metaprotocol_requests_total") == 2 * CONNECTIONS
        finally:
            os.kill(stuck, signal.SIGCONT)
            code, _ = sup.stop()
            await up.close()
        assert code == 0

    run(main(), timeout=90)


def test_a_configuration_refused_at_start_is_reported_once(tmp_path: Path) -> None:
    # The endpoint is the listener itself (a fixed port): every worker's engine refuses it at
    # start; the supervisor starts one worker first, so the error shows once.
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    holder.close()
    text = mesh([(port, "v1")]).replace("bind: '127.0.0.1:0'}]", f"bind: '127.0.0.1:{port}'}}]")
    config = tmp_path / "loop.yaml"
    config.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "metaprotocol_sdk", "proxy", "-c", str(config), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("this engine's own listener") == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_workers_are_refused_without_reuse_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(workers.socket, "SO_REUSEPORT")
    assert workers.reuse_port_unavailable() == "this platform has no SO_REUSEPORT"


def test_restart_delay_grows_and_is_capped() -> None:
    assert workers.restart_delay(-1) == workers.RESTART_MIN  # never below the minimum
    delays = [workers.restart_delay(n) for n in range(40)]
    assert delays[0] == workers.RESTART_MIN
    assert delays == sorted(delays) and delays[-1] == workers.RESTART_MAX
    assert delays[1] == 2 * delays[0]


def test_merged_stats_sum_counters_and_histograms_and_label_gauges() -> None:
    one = (
        '# HELP c_total C.\n# TYPE c_total counter\nc_total{a="x"} 2\n'
        "# HELP g_active G.\n# TYPE g_active gauge\ng_active 3\n"
        '# HELP h H.\n# TYPE h histogram\nh_bucket{le="1"} 1\nh_bucket{le="+Inf"} 2\n'
        "h_sum 2.5\nh_count 2\n"
    )
    two = one.replace("} 2\n# HELP g", "} 5\n# HELP g").replace("g_active 3", "g_active 4")
    merged = MergedStats()
    merged.add(one, "0")
    merged.add(two, "1")
    snap = merged.snapshot()
    assert snap['c_total{a="x"}'] == 7
    assert snap["g_active"] == 7
    assert snap['g_active{worker="0"}'] == 3 and snap['g_active{worker="1"}'] == 4
    assert snap['h_bucket{le="+Inf"}'] == 4 and snap["h_sum"] == 5.0 and snap["h_count"] == 4
    text = merged.prometheus()
    assert "# TYPE h histogram" in text and 'g_active{worker="1"} 4' in text


def test_a_worker_serves_the_shared_ports_a_private_admin_and_its_own_access_log() -> None:
    text = mesh([(1, "v1")], proxy="accessLog: {path: /var/log/mp.log}\n")
    config = workers.WorkerSpec(1, {"svc.test:9000": 41000}).apply(loads_config(text, "t.yaml"))
    assert [(lsn.bind_host, lsn.bind_port) for lsn in config.proxy.listeners] == [
        ("127.0.0.1", 41000)
    ]
    assert config.proxy.admin is not None and config.proxy.admin.bind == ("127.0.0.1", 0)
    assert config.proxy.access_log is not None
    assert config.proxy.access_log.path == "/var/log/mp.log.worker1"
    on_stderr = loads_config(mesh([(1, "v1")], proxy="accessLog: {path: '-'}\n"), "t.yaml")
    kept = workers.WorkerSpec(0, {}).apply(on_stderr).proxy.access_log
    assert kept is not None and kept.path == "-"


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_workers_do_not_outlive_a_killed_supervisor(tmp_path: Path) -> None:
    async def main() -> None:
        up = await Upstream("up").start()
        sup = Supervisor(tmp_path, mesh([(up.port, "v1")]))
        pids = [w["pid"] for w in await sup.workers()]
        try:
            sup.proc.kill()  # no drain, no forwarding: the workers see their stdin close

            async def gone() -> bool:
                return not any(_alive(pid) for pid in pids)

            await until(gone, "the workers to exit after the supervisor")
        finally:
            for pid in pids:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
            sup.proc.wait(timeout=10)
            await up.close()

    run(main(), timeout=60)


def _to(subset: str) -> str:
    return f"- name: all\n  route: [{{destination: {{host: svc.test, subset: {subset}}}}}]\n"


def test_sighup_reaches_every_worker_and_each_reloads(tmp_path: Path) -> None:
    async def main() -> None:
        one, two = await Upstream("one").start(), await Upstream("two").start()
        endpoints = [(one.port, "v1"), (two.port, "v2")]
        sup = Supervisor(tmp_path, mesh(endpoints, router=_to("v1")))
        try:
            (tmp_path / "mesh.yaml").write_text(mesh(endpoints, router=_to("v2")))
            sup.proc.send_signal(signal.SIGHUP)

            async def reloaded() -> bool:
                stats = await sup.stats()
                ok = total(stats, "metaprotocol_reloads_total", 'source="sighup"', 'result="ok"')
                return ok == 2  # one reload per worker

            await until(reloaded, "both workers to reload")
            states = await sup.workers()
            assert [w["restarts"] for w in states] == [0, 0]  # reloaded, not restarted
            assert all("config" not in w for w in states)  # both serve the same version

            async def served_by_two() -> None:
                client = await Client.connect(sup.address)
                try:
                    assert (await client.call()).attributes.get("server") == "two"
                finally:
                    client.close()

            await asyncio.wait_for(
                asyncio.gather(*(served_by_two() for _ in range(CONNECTIONS))), 4 * WAIT
            )
            accepted = [
                total(await sup.worker_stats(w), "metaprotocol_downstream_connections_total")
                for w in states
            ]
            assert all(n > 0 for n in accepted), accepted  # both workers took the new route
        finally:
            code, _ = sup.stop()
            await one.close()
            await two.close()
        assert code == 0

    run(main(), timeout=90)


def test_a_sighup_while_the_workers_start_reloads_each_once_it_serves(tmp_path: Path) -> None:
    """A SIGHUP that comes while the supervisor starts its workers (the first one held at
    its configuration's load) ends nothing: each worker reloads once it serves. Before, it
    ended the supervisor (status -1, SIGHUP's default action: its handler was set only after
    every worker had started, a second or more), and the proxy with it."""

    async def main() -> None:
        up = await Upstream("up").start()
        codec = "metaprotocol_sdk.examples.kv:KVCodec"
        env = start_gate(tmp_path, codec, "worker")
        text = mesh([(up.port, "v1")], codec="start_gate:Codec")
        sup = Supervisor(
            tmp_path, text, env=env, starting=lambda pid: sighup_at_the_gate(pid, tmp_path)
        )
        try:

            async def reloaded() -> bool:
                stats = await sup.stats()
                ok = total(stats, "metaprotocol_reloads_total", 'source="sighup"', 'result="ok"')
                return ok == 2  # one reload per worker

            await until(reloaded, "both workers to reload")
            assert [w["restarts"] for w in await sup.workers()] == [0, 0]
            await one_request_each(sup.address, 4)
        finally:
            code, _ = sup.stop()
            await up.close()
        assert code == 0

    run(main(), timeout=90)


def test_a_crash_loop_backs_off_and_the_other_worker_serves(tmp_path: Path) -> None:
    async def main() -> None:
        up = await Upstream("up").start()
        text = mesh([(up.port, "v1")])
        sup = Supervisor(tmp_path, text)
        try:
            first = await sup.workers()
            (tmp_path / "mesh.yaml").write_text("kind: [\n")  # a restarted worker cannot start
            os.kill(first[0]["pid"], signal.SIGKILL)

            async def looping() -> bool:
                return bool((await sup.workers())[0]["restarts"] >= 4)

            await until(looping, "worker 0 to fail to start a few times")
            await one_request_each(sup.address, 16)  # worker 1 serves every connection
            (tmp_path / "mesh.yaml").write_text(text)

            async def back() -> bool:
                w = (await sup.workers())[0]
                return bool(w["up"] and w["pid"] != first[0]["pid"])

            await until(back, "worker 0 to serve again once its file is valid")
        finally:
            code, err = sup.stop()
            await up.close()
        assert code == 0
        delays = [line.rsplit(" in ", 1)[1] for line in err.splitlines() if "again in" in line]
        assert delays[:4] == ["0.1 s", "0.2 s", "0.4 s", "0.8 s"], err  # doubling, not spinning

    run(main(), timeout=90)


def test_worker_output_nobody_reads_costs_output_not_requests(tmp_path: Path) -> None:
    """Every worker prints 1 KiB per request (a chatty codec) and nobody reads the supervisor's
    standard output (this test reads only its first lines): every request is still answered,
    and the output beyond the supervisor's backlog is dropped and counted. (The supervisor used
    to write it on its event loop: once the pipe was full it stopped reading the workers' output,
    their prints blocked, and no request was answered again.)"""

    async def main() -> None:
        up = await Upstream("up").start()
        text = mesh([(up.port, "v1")], protocol="kvp", codec="proxy_kit:PrintingKVCodec")
        sup = Supervisor(tmp_path, text)
        try:
            client = await Client.connect(sup.address)
            for _ in range(3000):  # 3 MB printed: the pipes and the 1 MiB backlog all fill
                reply = await asyncio.wait_for(client.call(), WAIT)
                assert reply.attributes.get("server") == "up"
            client.close()

            async def dropped() -> float:
                return total(await sup.stats(), "metaprotocol_worker_output_dropped_bytes_total")

            assert await until(dropped, "dropped output to be counted") >= 1 << 20
        finally:
            sup.stop()
            await up.close()

    run(main(), timeout=120)


STALLING_WATCHDOG = "watchdog: {missTimeout: 50ms, megamissTimeout: 200ms, killTimeout: 500ms}\n"


async def _drain_with_a_request_held(
    sup: Supervisor, up: Upstream
) -> tuple[Client, asyncio.Future[Any], dict[str, Any]]:
    """One connection with a request in flight that is never answered (its worker keeps the
    connection through the drain), then ``SIGTERM``; returns once that worker is draining."""
    client = await Client.connect(sup.address)
    held = client.start("hang")
    await up.wait_received(1)

    async def holder() -> dict[str, Any] | None:
        for worker in await sup.workers():
            if total(await sup.worker_stats(worker), "metaprotocol_requests_pending") == 1:
                return worker
        return None

    worker = await until(holder, "the worker holding the request")
    sup.proc.send_signal(signal.SIGTERM)
    host, port = worker["admin"].rsplit(":", 1)

    async def draining() -> bool:
        return (await http_get((host, int(port)), "/ready"))[0] == 503

    await until(draining, "the worker to drain")
    return client, held, worker


async def _reset(client: Client, *requests: asyncio.Future[Any]) -> None:
    """The worker's end reset the connection: its requests failed with it."""
    await asyncio.wait_for(client.closed, WAIT)
    for request in requests:
        with pytest.raises(ConnectionResetError):
            await request


def test_a_worker_its_watchdog_ends_during_the_drain_makes_the_supervisor_exit_70(
    tmp_path: Path,
) -> None:
    async def main() -> tuple[int, str, dict[str, Any]]:
        up = await Upstream("up").start()
        text = mesh(
            [(up.port, "v1")],
            proxy=STALLING_WATCHDOG,
            protocol="kvs",
            codec="proxy_kit:StallingKVCodec",
        )
        sup = Supervisor(tmp_path, text, 2, "--drain", "30")
        client = None
        try:
            client, held, worker = await _drain_with_a_request_held(sup, up)
            # Decoded during the drain: its worker's loop is stuck until the watchdog ends it.
            stalled = client.start("stall", {"stall-ms": "30000", "how": "sleep"})
            await asyncio.to_thread(sup.proc.wait, 30)  # the other worker drains cleanly
            await _reset(client, held, stalled)
        finally:
            if client is not None:
                client.close()
            code, err = sup.stop()
            await up.close()
        return code, err, worker

    code, err, worker = run(main(), timeout=90)
    assert code == 70, err
    index, pid = worker["worker"], worker["pid"]
    assert (
        f"worker {index} (pid {pid}) did not stop cleanly (exit status 70: its watchdog" in err
    ), err
    assert "exit status 70: a worker did not stop cleanly" in err, err
    assert err.count("did not stop cleanly (") == 1, err  # the other worker drained


def test_workers_killed_by_a_second_signal_make_the_supervisor_exit_137(tmp_path: Path) -> None:
    async def main() -> tuple[int, str, dict[str, Any]]:
        up = await Upstream("up").start()
        text = mesh([(up.port, "v1")], protocol="kvs", codec="proxy_kit:StallingKVCodec")
        sup = Supervisor(tmp_path, text, 2, "--drain", "30")
        client = None
        try:
            client, held, worker = await _drain_with_a_request_held(sup, up)
            stalled = client.start("stall", {"stall-ms": "30000", "how": "sleep"})  # no kill
            host, port = worker["admin"].rsplit(":", 1)

            async def stuck() -> bool:
                try:
                    await asyncio.wait_for(http_get((host, int(port)), "/ready"), 0.5)
                except TimeoutError:
                    return True
                return False

            await until(stuck, "the worker's loop to be stuck")
            sup.proc.send_signal(signal.SIGTERM)  # the second: kill, no more waiting
            await asyncio.to_thread(sup.proc.wait, 30)
            await _reset(client, held, stalled)
        finally:
            if client is not None:
                client.close()
            code, err = sup.stop()
            await up.close()
        return code, err, worker

    code, err, worker = run(main(), timeout=90)
    assert code == 128 + signal.SIGKILL, err
    index, pid = worker["worker"], worker["pid"]
    assert f"worker {index} (pid {pid}) did not stop cleanly (killed by SIGKILL)" in err, err
    assert "exit status 137: a worker did not stop cleanly" in err, err


def test_a_configuration_warning_is_logged_once_per_load_not_once_per_worker(
    tmp_path: Path,
) -> None:
    typo = "- name: r\n  route: [{destination: {host: nowhere.test}}]\n"
    warning = "no ServiceEntry defines host 'nowhere.test'"

    async def main() -> tuple[int, str]:
        up = await Upstream("up").start()
        sup = Supervisor(tmp_path, mesh([(up.port, "v1")], router=typo))
        try:
            sup.proc.send_signal(signal.SIGHUP)  # both workers reload the same files

            async def reloaded() -> bool:
                stats = await sup.stats()
                return total(stats, "metaprotocol_reloads_total", 'result="ok"') == 2

            await until(reloaded, "both workers to reload")
            for index in (1, 0):  # each started again: a fresh load of the files
                old = (await sup.workers())[index]["pid"]
                os.kill(old, signal.SIGKILL)

                async def back(index: int = index, old: int = old) -> bool:
                    w = (await sup.workers())[index]
                    return bool(w["up"] and w["pid"] != old)

                await until(back, f"worker {index} to serve again")
        finally:
            code, err = sup.stop()
            await up.close()
        return code, err

    code, err = run(main(), timeout=90)
    assert code == 0, err
    warned = [line for line in err.splitlines() if warning in line]
    # The supervisor's at start; worker 0's for the reload and for its restart; none of
    # worker 1's (at start, reload or restart: the same files, already reported).
    assert [line.split(": ", 2)[1] for line in warned] == [
        str(tmp_path / "mesh.yaml") + " (document 4, MetaRouter/svc)",
        "worker 0",
        "worker 0",
    ], err


def _many_routes(n: int) -> str:
    """``n`` routes with long names (each makes a duration histogram when it is built: its
    Prometheus text is 21 lines of its labels, 15 KiB), then ``main`` for every other call."""
    pad = "x" * 230
    rules = "".join(
        f"- name: r{k}-{pad}\n  match: {{attributes: {{method: {{exact: m{k}}}}}}}\n"
        "  route: [{destination: {host: svc.test, subset: v1}}]\n"
        for k in range(n)
    )
    return rules + "- name: main\n  route: [{destination: {host: svc.test, subset: v1}}]\n"


def test_a_scrape_of_many_series_is_complete_and_summed(tmp_path: Path) -> None:
    """5 000 routes: each worker's Prometheus text is 75 MiB, over the 64 MiB the supervisor
    read from a worker, so both showed as not answering and the scrape had no series. The
    workers now send each series' labels once (4 MiB), merged line by line."""
    routes = 5000
    duration = "metaprotocol_request_duration_milliseconds"

    async def main() -> None:
        up = await Upstream("up").start()
        sup = Supervisor(tmp_path, mesh([(up.port, "v1")], router=_many_routes(routes)))
        try:
            await one_request_each(sup.address, CONNECTIONS)
            await one_request_each(sup.address, CONNECTIONS, "m7")
            status, text = await http_get(sup.admin, "/stats")
            assert status == 200
            assert 'metaprotocol_worker_up{worker="0"} 1\n' in text
            assert 'metaprotocol_worker_up{worker="1"} 1\n' in text
            assert 'metaprotocol_worker_stats_truncated{worker="1"} 0\n' in text
            counts = {}
            for line in text.splitlines():
                if line.startswith(f"{duration}_count{{"):
                    series, _, value = line.rpartition(" ")
                    counts[series] = float(value)
            # Per route, with its destination and for local replies; one for the listener.
            assert len(counts) == 2 * (routes + 1) + 1
            assert sum(counts.values()) == 2 * CONNECTIONS
            main_route = next(v for k, v in counts.items() if 'route="main",destination="o' in k)
            assert main_route == CONNECTIONS
            # Each series is the sum of the workers' own.
            own = [await sup.worker_stats(w) for w in await sup.workers()]
            stats = await sup.stats()
            for key, value in stats.items():
                if key.startswith(duration) and ('route="r7-' in key or 'route="main"' in key):
                    assert value == sum(s[key] for s in own), key
            assert total(stats, "metaprotocol_requests_total") == 2 * CONNECTIONS
        finally:
            code, _ = sup.stop()
            await up.close()
        assert code == 0

    run(main(), timeout=120)


def test_a_worker_answer_over_the_series_bound_or_line_bound_is_cut() -> None:
    """A worker's answer (here a fake worker's, on a real socket) without end: the
    supervisor reads at most the series bound, each line at most ``STATS_LINE_BYTES``."""

    async def main() -> None:
        async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\n\r\n# c_total counter C.\n")
            path = writer.get_extra_info("sockname")[1] == long_port
            with contextlib.suppress(ConnectionError):
                for i in range(10**6):
                    writer.write(b"x" * 65536 if path else f'a="{i}"\t1\n'.encode())
                    await writer.drain()
            writer.close()

        server = await asyncio.start_server(endless, "127.0.0.1", 0)
        other = await asyncio.start_server(endless, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        long_port = other.sockets[0].getsockname()[1]
        merged = MergedStats()
        feed = workers.WorkerFeed(merged, "0")
        with pytest.raises(workers.StatsTruncated):
            await workers.read_stats(("127.0.0.1", port), feed, WAIT, 6 * WAIT, 1000)
        assert len(merged.families["c_total"].samples) == 1000  # and its family line
        feed = workers.WorkerFeed(merged, "1")
        with pytest.raises(ValueError, match="limit"):
            await workers.read_stats(("127.0.0.1", long_port), feed, WAIT, 6 * WAIT, 1000)
        server.close()
        other.close()

    run(main())


def test_a_worker_answer_of_endless_families_or_an_endless_head_is_cut() -> None:
    """Family lines without series counted nothing: a fake worker sending them held 884 000
    families (530 MB) in the supervisor in 5 s under a bound of 1 000 series. A head without
    its end raised ``LimitOverrunError``, which the scrape did not catch."""

    async def main() -> None:
        async def families(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
            with contextlib.suppress(ConnectionError):
                for i in range(10**5):
                    writer.write(f"# f{i}_total counter F.\n".encode())
                    await writer.drain()
            writer.close()

        async def head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nX: " + b"y" * (workers.STATS_LINE_BYTES + 1))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()

        servers = [await asyncio.start_server(f, "127.0.0.1", 0) for f in (families, head)]
        merged = MergedStats()
        feed = workers.WorkerFeed(merged, "0")
        with pytest.raises(workers.StatsTruncated):
            await workers.read_stats(servers[0].sockets[0].getsockname(), feed, WAIT, WAIT, 1000)
        assert len(merged.families) == 1001
        feed = workers.WorkerFeed(merged, "1")
        with pytest.raises(ValueError, match="head over"):
            await workers.read_stats(servers[1].sockets[0].getsockname(), feed, WAIT, WAIT, 1000)
        for server in servers:
            server.close()

    run(main())


def test_merged_worker_stats_equal_one_engine_that_counted_everything() -> None:
    """Two workers' series in the workers' form, merged: the Prometheus text of one engine
    that saw both workers' observations (histograms, counters, a gauge per worker)."""
    one, two, both = Stats(), Stats(), Stats()
    for stats, values in ((one, (1, 7, 300)), (two, (2, 5000))):
        for target in (stats, both):
            for v in values:
                target.histogram("h_ms", (5, 100), route='a"b').observe(v)
                target.counter("c_total", status="Ok").value += 1
    one.gauge("metaprotocol_requests_pending").value = 3
    two.gauge("metaprotocol_requests_pending").value = 4
    merged = MergedStats()
    for index, stats in enumerate((one, two)):
        feed = workers.WorkerFeed(merged, str(index))
        for line in "".join(stats.worker_parts()).splitlines():
            feed.line(line)

    def values(text: str) -> dict[str, float]:
        pairs = (line.rpartition(" ") for line in text.splitlines() if line[:1] != "#")
        return {k: float(v) for k, _, v in pairs if k.startswith(("h_ms", "c_total"))}

    assert values(merged.prometheus()) == values(both.prometheus())
    snap = merged.snapshot()
    assert snap["metaprotocol_requests_pending"] == 7
    assert snap['metaprotocol_requests_pending{worker="1"}'] == 4
    assert snap['h_ms_count{route="a\\"b"}'] == 5


def test_summed_counters_and_histograms_never_go_down_and_gone_series_go() -> None:
    """:class:`CounterFloor` over four scrapes of two workers: one misses a scrape (its
    counts are published as before, then its own again), one crashed and starts again from
    0 (what it had counted stays, added to its new counts), and a series no worker sends any
    more in a scrape they all answered goes, floor and all."""

    def scrape(*workers_stats: Stats | None) -> MergedStats:
        merged = MergedStats()
        for index, stats in enumerate(workers_stats):
            if stats is not None:
                feed = workers.WorkerFeed(merged, str(index))
                for line in "".join(stats.worker_parts()).splitlines():
                    feed.line(line)
        return merged

    def served(stats: Stats, n: int, route: str = "r") -> None:
        for _ in range(n):
            stats.counter("c_total", route=route).value += 1
            stats.histogram("h_ms", (5, 100), route=route).observe(7)

    floor = stats_merge.CounterFloor()

    def published(merged: MergedStats, complete: bool, restarts: int) -> dict[str, float]:
        floor.apply(merged, complete, restarts)
        snap = merged.snapshot()
        return {k: snap[k] for k in ('c_total{route="r"}', 'h_ms_count{route="r"}') if k in snap}

    one, two = Stats(), Stats()
    served(one, 3)
    served(two, 4)
    served(two, 1, "old")
    assert published(scrape(one, two), True, 0) == {
        'c_total{route="r"}': 7,
        'h_ms_count{route="r"}': 7,
    }
    served(one, 1)
    assert published(scrape(one, None), False, 0) == {  # two is stuck
        'c_total{route="r"}': 7,
        'h_ms_count{route="r"}': 7,
    }
    snap = scrape(one, two)
    assert published(snap, True, 0)['c_total{route="r"}'] == 8  # two answers again
    assert snap.snapshot()['c_total{route="old"}'] == 1
    two = Stats()  # two crashed, started again: it counts from 0, without route "old"
    served(two, 2)
    assert published(scrape(one, two), True, 1) == {
        'c_total{route="r"}': 8,
        'h_ms_count{route="r"}': 8,
    }
    served(one, 5)
    snap = scrape(one, two)
    assert published(snap, True, 1) == {'c_total{route="r"}': 13, 'h_ms_count{route="r"}': 13}
    assert 'c_total{route="old"}' not in snap.snapshot()  # gone from every worker


def test_scrapes_at_once_share_one_merge_and_one_answer_from_each_worker() -> None:
    """Each ``/stats`` of the supervisor asked every worker for its series and merged its own
    copy: ``admin.maxConnections`` (16) scrapes at once held 16 copies (about 69 MiB each for
    two workers of 50 000 series: over 1 GiB) and made each worker write its series 16
    times. Scrapes that come while one is merged share it. The workers here are fake ones on
    real sockets, holding their answer until every scrape has asked."""

    async def main() -> None:
        asked = 0
        answer = asyncio.Event()
        both = asyncio.Event()  # each worker was asked

        async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal asked
            await reader.readuntil(b"\r\n\r\n")
            asked += 1
            if asked == 2:
                both.set()
            await answer.wait()
            writer.write(b"HTTP/1.1 200 OK\r\n\r\n# c_total counter C.\n\t1\n")
            await writer.drain()
            writer.close()

        servers = [await asyncio.start_server(worker, "127.0.0.1", 0) for _ in range(2)]
        config = loads_config(mesh([(1, "v1")]), "test.yaml")
        supervisor = workers.Supervisor(config, [], 2, None)
        for slot, server in zip(supervisor.workers, servers, strict=True):
            slot.admin = server.sockets[0].getsockname()[:2]
            slot.process = types.SimpleNamespace(returncode=None)  # type: ignore[assignment]
        scrapes = [asyncio.ensure_future(supervisor.merged_stats(WAIT, 2 * WAIT)) for _ in range(8)]
        await asyncio.wait_for(both.wait(), WAIT)  # every scrape has asked by then
        scrapes[0].cancel()  # a scrape that leaves does not stop the others' merge
        answer.set()
        merged = await asyncio.wait_for(asyncio.gather(*scrapes[1:]), WAIT)
        assert asked == 2  # one answer from each worker, not one per scrape
        assert all(m is merged[0] for m in merged)
        assert merged[0].families["c_total"].samples == {"c_total": 2.0}
        again = await asyncio.wait_for(supervisor.merged_stats(WAIT, 2 * WAIT), WAIT)
        assert again is not merged[0] and asked == 4  # a later scrape merges anew
        for server in servers:
            server.close()

    run(main())


LIVE = b'{"routes": [], "totals": {"requests": 3, "errors": 0, "local_replies": 0}}'


@pytest.mark.parametrize(
    ("path", "answer"),
    [("/config_dump", b'{"version": "v7"}'), ("/stats/live", LIVE)],
)
def test_admin_requests_at_once_share_one_answer_from_each_worker(path: str, answer: bytes) -> None:
    """Each ``/config_dump`` and ``/stats/live`` of the supervisor asked every worker and held
    every answer (up to 64 MiB each), parsed, combined and written: 16 requests at once
    (``admin.maxConnections``) held 16 copies and had each worker answer 16 times. Requests
    that come while one is being made now share it, as ``/stats`` scrapes do. The workers
    here are fake ones on real sockets, holding their answer until every request has asked."""

    async def main() -> None:
        asked = 0
        release = asyncio.Event()
        both = asyncio.Event()  # each worker was asked

        async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal asked
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(f"GET {path} ".encode()), head
            asked += 1
            if asked == 2:
                both.set()
            await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
            await writer.drain()
            writer.close()

        servers = [await asyncio.start_server(worker, "127.0.0.1", 0) for _ in range(2)]
        config = loads_config(mesh([(1, "v1")]), "test.yaml")
        supervisor = workers.Supervisor(config, [], 2, None)
        for slot, server in zip(supervisor.workers, servers, strict=True):
            slot.admin = server.sockets[0].getsockname()[:2]
            slot.process = types.SimpleNamespace(returncode=None, pid=1)  # type: ignore[assignment]
        admin = workers.WorkersAdmin(supervisor, Admin(("127.0.0.1", 0)))
        requests = [asyncio.ensure_future(admin.respond("GET", path)) for _ in range(8)]
        await asyncio.wait_for(both.wait(), WAIT)  # every request has asked by then
        requests[0].cancel()  # a request that leaves does not stop the others' answer
        release.set()
        answers = await asyncio.wait_for(asyncio.gather(*requests[1:]), WAIT)
        assert asked == 2  # one answer from each worker, not one per request
        assert all(a is answers[0] for a in answers)  # made and written once
        assert isinstance(answers[0], bytes) and answers[0].startswith(b"HTTP/1.1 200 ")
        body = json.loads(answers[0].partition(b"\r\n\r\n")[2])
        if path == "/config_dump":
            assert body["version"] == "v7" and [w["up"] for w in body["workers"]] == [True] * 2
        else:
            assert body["totals"]["requests"] == 6 and body["workers"] == 2
        again = await asyncio.wait_for(admin.respond("GET", path), WAIT)
        assert again is not answers[0] and asked == 4  # a later request asks anew
        for server in servers:
            server.close()

    run(main())


def test_a_request_joins_only_an_answer_asked_with_its_own_bounds() -> None:
    """A request that joined one made with a shorter bound could get workers cut off that
    its own bound would have waited for; with a longer one, it could wait past its own."""

    async def main() -> None:
        config = loads_config(mesh([(1, "v1")]), "test.yaml")
        supervisor = workers.Supervisor(config, [], 2, None)
        made: list[float] = []
        release = asyncio.Event()

        async def make(bound: float) -> float:
            made.append(bound)
            await release.wait()
            return bound

        first = [
            asyncio.ensure_future(supervisor.shared(("/p", b), lambda b=b: make(b)))
            for b in (1.0, 0.5, 1.0, 0.5)
        ]
        release.set()  # each runs (starts or joins) before any is made
        assert await asyncio.wait_for(asyncio.gather(*first), WAIT) == [1.0, 0.5, 1.0, 0.5]
        assert made == [1.0, 0.5]

    run(main())


def test_the_supervisor_alone_speaks_to_systemd(tmp_path: Path) -> None:
    """With ``NOTIFY_SOCKET`` (``Type=notify``), the supervisor says it is ready (and the
    unit's main process) once every worker serves, and that it stops on ``SIGTERM``; the
    workers, which have the same environment, say nothing."""

    async def main() -> None:
        up = await Upstream("up").start()
        notes = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notes.bind(str(tmp_path / "notify"))
        notes.setblocking(False)
        path = [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(path),
            "NOTIFY_SOCKET": str(tmp_path / "notify"),
        }
        sup = Supervisor(tmp_path, mesh([(up.port, "v1")]), env=env)
        loop = asyncio.get_running_loop()
        try:
            ready = await asyncio.wait_for(loop.sock_recv(notes, 4096), WAIT)
            assert ready.decode() == f"READY=1\nMAINPID={sup.proc.pid}\nSTATUS=serving (2 workers)"
            client = await Client.connect(sup.address)
            assert (await client.call("hi")).attributes.get("server") == "up"
            client.close()
            sup.proc.send_signal(signal.SIGTERM)
            stopping = await asyncio.wait_for(loop.sock_recv(notes, 4096), WAIT)
            assert stopping.decode() == "STOPPING=1"
            assert await asyncio.to_thread(sup.proc.wait, 30) == 0
            with pytest.raises(BlockingIOError):  # nothing from the workers
                notes.recv(4096)
        finally:
            notes.close()
            code, err = sup.stop()
            await up.close()
        assert code == 0, err

    run(main(), timeout=60)


def test_sigusr2_replaces_every_worker_under_load_refusing_no_connection(tmp_path: Path) -> None:
    """``SIGUSR2`` to the supervisor: each worker in turn is replaced by a successor that takes
    its listening sockets (its place in the ``SO_REUSEPORT`` group, with the connections in
    its queue) and its counters; clients opening a connection per request all the while see
    no failure, and the summed counters agree with them."""

    async def main() -> None:
        up = await Upstream("up").start()
        sup = Supervisor(tmp_path, mesh([(up.port, "v1")]))
        stop = asyncio.Event()
        answered = [0]
        failures: list[str] = []

        async def load() -> None:
            while not stop.is_set():
                try:
                    client = await Client.connect(sup.address)
                    try:
                        reply = await asyncio.wait_for(client.call("get"), WAIT)
                        assert reply.attributes.get("server") == "up"
                    finally:
                        client.close()
                    answered[0] += 1
                except Exception as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")

        try:
            before = [w["pid"] for w in await sup.workers()]
            tasks = [asyncio.ensure_future(load()) for _ in range(4)]

            async def at_least(n: int) -> bool:
                return answered[0] >= n

            await until(lambda: at_least(100), "requests before the hot restart")
            sup.proc.send_signal(signal.SIGUSR2)

            async def replaced() -> bool:
                now = [w["pid"] for w in await sup.workers()]
                return all(p not in before for p in now)

            await until(replaced, "both workers to be replaced", timeout=WAIT * 2)

            async def done() -> Any:
                return (await sup.get("/config_dump"))["hotRestart"] == {
                    "state": "done",
                    "replaced": 2,
                    "error": None,
                }

            await until(done, "the hot restart to be done")
            seen = answered[0]
            await until(lambda: at_least(seen + 100), "requests after the hot restart")

            async def drained() -> bool:  # the replaced workers have exited
                return not any(
                    os.path.exists(f"/proc/{pid}/status") and _alive(pid) for pid in before
                )

            await until(drained, "the replaced workers to exit", timeout=WAIT * 2)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
            assert failures == []
            stats = await sup.stats()
            assert total(stats, "metaprotocol_requests_total", 'status="Ok"') == answered[0]
            assert total(stats, "metaprotocol_worker_hot_restarts_total") == 2
            assert total(stats, "metaprotocol_worker_restarts_total") == 0
        finally:
            stop.set()
            code, err = sup.stop()
            await up.close()
        assert code == 0, err
        assert "hot restart of the workers done" in err, err
        assert err.count("has drained; its counts are in") == 2, err

    run(main(), timeout=120)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return not any(line.startswith("State:\tZ") for line in status)
    except OSError:
        return False


def test_a_successor_that_cannot_start_ends_the_hot_restart_and_the_workers_serve_on(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        up = await Upstream("up").start()
        sup = Supervisor(tmp_path, mesh([(up.port, "v1")]))
        try:
            before = [w["pid"] for w in await sup.workers()]
            (tmp_path / "mesh.yaml").write_text("kind: Nonsense\n")  # the next load fails
            sup.proc.send_signal(signal.SIGUSR2)

            async def refused() -> Any:
                return (await sup.get("/config_dump"))["hotRestart"]["state"] == "failed"

            await until(refused, "the hot restart to stop")
            state = (await sup.get("/config_dump"))["hotRestart"]
            assert state == {
                "state": "failed",
                "replaced": 0,
                "error": "the successor of worker 0 did not start",
            }
            assert [w["pid"] for w in await sup.workers()] == before
            await one_request_each(sup.address, 8)
            stats = await sup.stats()
            assert total(stats, "metaprotocol_worker_hot_restarts_total") == 0
            assert total(stats, "metaprotocol_worker_restarts_total") == 0
        finally:
            code, err = sup.stop()
            await up.close()
        assert code == 0, err
        assert "hot restart of the workers stopped at worker 0" in err, err

    run(main(), timeout=60)


def test_a_stop_during_the_hot_restart_is_no_failed_successor(tmp_path: Path) -> None:
    """``SIGTERM`` to the supervisor while a worker's successor starts: the successor gives
    up (or, taken over, drains with the others) and the stop is clean; the roll is not said
    to have failed for a successor that did not start."""

    async def main() -> None:
        up = await Upstream("up").start()
        sup = Supervisor(tmp_path, mesh([(up.port, "v1")]))
        try:
            sup.proc.send_signal(signal.SIGUSR2)

            async def rolling() -> Any:
                state = (await sup.get("/config_dump"))["hotRestart"]
                return state is not None and state["state"] == "running"

            await until(rolling, "the hot restart to begin")
        finally:
            code, err = sup.stop()
            await up.close()
        assert code == 0, err
        assert "did not start" not in err, err

    run(main(), timeout=60)


def _hot_restart_socket(pid: int) -> str:
    """Where worker ``pid`` listens for its successor (its ``--hot-restart PATH``)."""
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        args = cmdline.read().decode().split("\0")
    return args[args.index("--hot-restart") + 1]


def _connected_to(name: str) -> bool:
    """Whether a connection to the Unix socket bound at ``name`` waits in its accept queue
    (listed with the listener's name, not listening: flags 0)."""
    with open("/proc/net/unix") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return any(len(row) == 8 and row[-1] == name and row[3] == "00000000" for row in rows)


def test_a_sighup_while_a_successor_starts_reaches_it(tmp_path: Path) -> None:
    """A reload (``SIGHUP``) that comes while a worker's successor starts, once it has read
    the files: the successor is sent it once it serves (as a worker starting again is), so
    that slot does not serve the files as they were before, for good."""

    async def main() -> None:
        up = await Upstream("up").start()
        sup = Supervisor(tmp_path, mesh([(up.port, "v1")]))
        stopped: int | None = None
        try:
            first = await sup.workers()
            old_version = first[0]["version"]
            stopped = first[0]["pid"]
            bound = f"{_hot_restart_socket(stopped)}.{stopped}"  # (then renamed)
            os.kill(stopped, signal.SIGSTOP)  # its successor waits for the sockets
            sup.proc.send_signal(signal.SIGUSR2)

            async def connected() -> bool:  # (the successor has read the files)
                return _connected_to(bound)

            await until(connected, "the successor to say hello")
            (tmp_path / "mesh.yaml").write_text(mesh([(up.port, "v2")]))
            sup.proc.send_signal(signal.SIGHUP)
            os.kill(stopped, signal.SIGCONT)
            stopped = None

            async def done() -> Any:
                state = (await sup.get("/config_dump"))["hotRestart"]
                return state is not None and state["state"] != "running"

            await until(done, "the hot restart to end", timeout=WAIT * 2)
            assert (await sup.get("/config_dump"))["hotRestart"]["state"] == "done"

            async def reloaded() -> Any:
                versions = [w["version"] for w in await sup.workers()]
                return old_version not in versions and len(set(versions)) == 1

            await until(reloaded, "every worker to serve the files as they are now")
        finally:
            if stopped is not None:
                os.kill(stopped, signal.SIGCONT)
            code, err = sup.stop()
            await up.close()
        assert code == 0, err

    run(main(), timeout=90)


def test_sigusr2_to_a_worker_is_ignored(tmp_path: Path) -> None:
    """``SIGUSR2`` sent to every process of the unit (``systemctl kill -s USR2`` without
    ``--kill-whom=main``) reaches the workers too: each says to send it to the supervisor
    and serves on, rather than die of it (its connections reset, counted as a crash)."""

    async def main() -> None:
        up = await Upstream("up").start()
        sup = Supervisor(tmp_path, mesh([(up.port, "v1")]))
        try:
            before = await sup.workers()
            os.kill(before[0]["pid"], signal.SIGUSR2)
            await one_request_each(sup.address, 8)
            after = await sup.workers()
            assert [w["pid"] for w in after] == [w["pid"] for w in before]
            assert total(await sup.stats(), "metaprotocol_worker_restarts_total") == 0
        finally:
            code, err = sup.stop()
            await up.close()
        assert code == 0, err
        assert "worker 0: SIGUSR2 to a worker is ignored" in err, err

    run(main(), timeout=60)


def test_a_long_tmpdir_still_serves_and_hot_restarts(tmp_path: Path) -> None:
    """The workers' hot restart sockets go under ``$TMPDIR``; one so long that a socket's path
    would not fit a Unix socket's name falls back to ``/tmp`` (the workers refused to start)."""

    async def main() -> None:
        up = await Upstream("up").start()
        long = tmp_path / ("d" * 100)
        long.mkdir()
        path = [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "TMPDIR": str(long)}
        sup = Supervisor(tmp_path, mesh([(up.port, "v1")]), env=env)
        try:
            before = [w["pid"] for w in await sup.workers()]
            sup.proc.send_signal(signal.SIGUSR2)

            async def done() -> Any:
                state = (await sup.get("/config_dump"))["hotRestart"]
                return state is not None and state["state"] == "done"

            await until(done, "the hot restart to be done", timeout=WAIT * 2)
            after = [w["pid"] for w in await sup.workers()]
            assert not set(before) & set(after)
            await one_request_each(sup.address, 8)
        finally:
            code, err = sup.stop()
            await up.close()
        assert code == 0, err

    run(main(), timeout=60)


def test_a_hot_restart_reports_the_configuration_warnings_once(tmp_path: Path) -> None:
    """The files a hot restart's successors load may have changed with the code: worker 0's
    successor says their warnings (as a worker started again does), worker 1's does not."""
    typo = "- name: r\n  route: [{destination: {host: nowhere.test}}]\n"
    warning = "no ServiceEntry defines host 'nowhere.test'"

    async def main() -> tuple[int, str]:
        up = await Upstream("up").start()
        sup = Supervisor(tmp_path, mesh([(up.port, "v1")]))
        try:
            (tmp_path / "mesh.yaml").write_text(mesh([(up.port, "v1")], router=typo))
            sup.proc.send_signal(signal.SIGUSR2)

            async def done() -> Any:
                state = (await sup.get("/config_dump"))["hotRestart"]
                return state is not None and state["state"] == "done"

            await until(done, "the hot restart to be done", timeout=WAIT * 2)
        finally:
            code, err = sup.stop()
            await up.close()
        return code, err

    code, err = run(main(), timeout=90)
    assert code == 0, err
    warned = [line for line in err.splitlines() if warning in line]
    assert [line.split(": ", 2)[1] for line in warned] == ["worker 0"], err
