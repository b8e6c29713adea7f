"""``metaprotocol proxy --workers 2`` under a control plane: real processes, real sockets.

Each worker holds its own ADS stream (the same node, as istiod and Aeraki's server expect of
the processes of one proxy) and applies every update itself. Many thriftpy2 connections, kept
open and calling in rounds through every update, land on both workers; a route change and an
endpoint removal reach every connection of both, with no failed call and no new connection,
and the supervisor's ``/config_dump`` shows each worker's xDS versions.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from control_plane import ControlPlane
from snapshots import CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE
from test_engine_xds import NODE, config_yaml, snapshots

from metaprotocol_sdk.demo.idl import hello, untyped
from metaprotocol_sdk.demo.thrift_server import HelloServer

TYPES = (CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE)
#: Connections kept open through the test: P(all on one of two workers) = 2**-31.
CONNECTIONS = 32
WAIT = 30.0
CONNECTIONS_TOTAL = "metaprotocol_downstream_connections_total"
V2 = "outbound|9090|v2|hello.svc"


class Supervisor:
    """``metaprotocol proxy --workers 2`` with ``spec.xds`` and an admin endpoint."""

    def __init__(self, tmp_path: Path, xds_port: int) -> None:
        config = tmp_path / "sidecar.yaml"
        config.write_text(config_yaml(xds_port, '\n  admin: {bind: "127.0.0.1:0"}'))
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "metaprotocol_sdk"),
                "proxy",
                "-c",
                str(config),
                "--workers=2",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        self.config = config
        #: Standard error so far (the supervisor's and its workers' lines).
        self.errors: list[str] = []
        self._errors_changed = threading.Condition()
        self._error_reader = threading.Thread(target=self._read_errors, daemon=True)
        self._error_reader.start()
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(lines,), daemon=True).start()
        #: What it printed before serving, up to its admin line.
        self.lines: list[str] = []
        while not self.lines or not self.lines[-1].startswith("admin on "):
            try:
                self.lines.append(lines.get(timeout=WAIT).strip())
            except queue.Empty:
                raise AssertionError(
                    f"no admin line; printed {self.lines}, {self.stop()}"
                ) from None
        listening = next(line for line in self.lines if line.startswith("listening "))
        self.port = int(listening.rsplit(":", 1)[1])
        self.admin = self.lines[-1].split()[-1]

    def _read(self, lines: queue.Queue[str]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            lines.put(line)
        lines.put("(end of output)")

    def _read_errors(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._errors_changed:
                self.errors.append(line)
                self._errors_changed.notify_all()

    def wait_errors(self, text: str, count: int) -> None:
        """Wait until ``count`` lines of standard error contain ``text``."""
        with self._errors_changed:
            assert self._errors_changed.wait_for(
                lambda: sum(text in line for line in self.errors) >= count, WAIT
            ), self.errors

    def get(self, path: str, admin: str | None = None) -> Any:
        url = f"http://{admin or self.admin}{path}"
        with urllib.request.urlopen(url, timeout=WAIT) as reply:
            return json.load(reply)

    def worker_stats(self, worker: dict[str, Any]) -> dict[str, float]:
        """One worker's own stats, from its private admin endpoint (``/config_dump``)."""
        return dict(self.get("/stats?format=json", worker["admin"]))

    def stop(self) -> tuple[int, str]:
        """SIGTERM, then the exit status and standard error."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._error_reader.join(WAIT)
        return self.proc.returncode, "".join(self.errors)


class Rounds:
    """``CONNECTIONS`` thriftpy2 connections; a thread calls sayHello on each in turn, round
    after round, until stopped, recording which server answered each call of each round."""

    def __init__(self, port: int) -> None:
        rpc, tt = untyped("thriftpy2.rpc"), untyped("thriftpy2.transport")
        self.clients = [
            rpc.make_client(
                hello().Hello,
                "127.0.0.1",
                port,
                trans_factory=tt.TFramedTransportFactory(),
                timeout=10_000,
            )
            for _ in range(CONNECTIONS)
        ]
        self.rounds: list[list[str]] = []
        self.errors: list[BaseException] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            replies = []
            for client in self.clients:
                try:
                    replies.append(client.sayHello("workers").split(":")[0])
                except Exception as exc:  # a failed call is what the test looks for
                    with self._cond:
                        self.errors.append(exc)
                        self._cond.notify_all()
                    return
            with self._cond:
                self.rounds.append(replies)
                self._cond.notify_all()

    def next(self) -> list[str]:
        """The servers that answered each connection in the next round that starts after
        now (the round in progress may have been routed before the last update)."""
        with self._cond:
            wanted = len(self.rounds) + 1
            assert self._cond.wait_for(lambda: len(self.rounds) > wanted or self.errors, WAIT), (
                "calls stalled"
            )
            assert not self.errors, self.errors
            return self.rounds[wanted]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        for client in self.clients:
            client.close()


def acked_by_both(cp: ControlPlane, version: str) -> None:
    """Wait until two streams (one per worker) ACKed ``version`` of every type."""

    def done(requests: list[Any]) -> bool:
        return all(
            len(
                {
                    r.stream
                    for r in requests
                    if r.type_url == t and r.version == version and r.nonce and r.error is None
                }
            )
            == 2
            for t in TYPES
        )

    cp.wait(done, WAIT)


def total(stats: dict[str, float], name: str) -> float:
    """The sum of every series of ``name``."""
    return sum(v for k, v in stats.items() if k == name or k.startswith(name + "{"))


def by_destination(stats: dict[str, float]) -> Counter[str]:
    """A worker's requests by destination (``host|port|subset``)."""
    out: Counter[str] = Counter()
    for key, value in stats.items():
        if key.startswith("metaprotocol_requests_total{"):
            out[key.split('destination="', 1)[1].split('"', 1)[0]] += int(value)
    return out


def test_xds_updates_reach_every_worker(
    tmp_path: Path, control_plane: ControlPlane, servers: dict[str, HelloServer]
) -> None:
    versions = snapshots(servers)
    control_plane.set_snapshot(*versions[0])  # sayHello to subset v1
    sup = Supervisor(tmp_path, control_plane.port)
    try:
        # The supervisor prints what a single engine prints, the control plane line first.
        assert sup.lines[0] == f"xds from 127.0.0.1:{control_plane.port} as {NODE}"
        acked_by_both(control_plane, "1")
        nodes = [n for n in control_plane.nodes if n["id"] == NODE]
        assert sorted(n["metadata"]["METAPROTOCOL_WORKER"] for n in nodes) == ["0", "1"]
        rounds = Rounds(sup.port)
        try:
            assert set(rounds.next()) == {"v1a", "v1b"}
            workers = sup.get("/config_dump")["workers"]
            before = [sup.worker_stats(w) for w in workers]
            accepted = [total(s, CONNECTIONS_TOTAL) for s in before]
            assert all(n > 0 for n in accepted) and sum(accepted) == CONNECTIONS, accepted

            control_plane.set_snapshot(*versions[1])  # a route change: sayHello to v2
            acked_by_both(control_plane, "2")
            assert rounds.next() == ["v2"] * CONNECTIONS  # every connection, both workers
            dump = sup.get("/config_dump")
            for worker in dump["workers"]:
                assert worker["version"] == "cds:2 eds:2 rds:2"
                xds = worker["xds"]
                assert xds["connected"] and xds["node"]["id"] == NODE
                assert [xds[t]["version"] for t in ("cds", "eds", "rds")] == ["2", "2", "2"]
                assert "config" not in worker, worker  # both serve the same configuration
                # This worker's own calls went to v2 once it had the update.
                after = by_destination(sup.worker_stats(worker))
                old = by_destination(before[worker["worker"]])
                assert after[V2] > old[V2] == 0, (old, after)

            # SIGHUP: each worker reloads its files; the routes received stay, and so do the
            # shared listener ports (a worker that rebound its own would take no connection).
            sup.proc.send_signal(signal.SIGHUP)
            sup.wait_errors("reload ok (sighup): version cds:2 eds:2 rds:2", 2)
            assert rounds.next() == ["v2"] * CONNECTIONS

            control_plane.set_snapshot(*versions[3])  # 50/50, and v1a removed from EDS
            acked_by_both(control_plane, "4")
            seen = rounds.next() + rounds.next()
            assert set(seen) == {"v1b", "v2"}, Counter(seen)
            now = [total(sup.worker_stats(w), CONNECTIONS_TOTAL) for w in dump["workers"]]
            assert now == accepted  # no connection dropped and reopened
        finally:
            rounds.close()
        # New connections still reach both workers on the shared port, after every update
        # and the reload.
        fresh = Rounds(sup.port)
        try:
            assert set(fresh.next()) == {"v1b", "v2"}
        finally:
            fresh.close()
        later = [total(sup.worker_stats(w), CONNECTIONS_TOTAL) for w in dump["workers"]]
        assert all(b > a for a, b in zip(accepted, later, strict=True)), (accepted, later)
        assert not rounds.errors
    finally:
        code, err = sup.stop()
    assert code == 0, err
    assert "Traceback" not in err, err
    assert not control_plane.nacks(ROUTE_TYPE)
