"""The red-team attack on the connection budget, as measured in ``docs/limits.md``.

Run: ``.venv/bin/python tests/proxy/redteam_fanout.py [RUNS] [--idle]``. ``metaprotocol proxy``
runs in a child process with ``RLIMIT_NOFILE`` 160, over 5 endpoints with a codec without id
rewriting (each client gets upstream connections of its own, round robin). 40 clients connect
and at once each sends 5 requests; then a new client sends 3. With ``--idle`` the 40 first
have been seen by the engine, have reached every endpoint and sit idle when the new client
comes (the budget is spent by idle connections). Each run prints how the 200 requests were
answered, what the new client got, whether a client was reset, whether the admin endpoint
answered, and the upstream connections closed for another client (``reclaimed``).

The engine is the one of the tree this script is in (it runs from the tree's root).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_kit import REQUEST, Client, Upstream, build_frame, error_type, http_get, mesh

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

NOFILE = 160


async def one_run(idle: bool) -> str:
    ups = [await Upstream(f"u{i}").start() for i in range(5)]
    text = mesh(
        [(up.port, "v1") for up in ups],
        protocol="kvnr",
        codec="proxy_kit:NoRewriteKVCodec",
        traffic_policy="{loadBalancer: {simple: ROUND_ROBIN}}",
    )
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "mesh.yaml"
        config.write_text(text)
        proc = subprocess.Popen(
            [sys.executable, "-m", "metaprotocol_sdk", "proxy", "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}"},
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE)),
        )
        clients: list[Client] = []
        try:
            assert proc.stdout is not None
            host, port = proc.stdout.readline().split()[-1].rsplit(":", 1)
            ahost, aport = proc.stdout.readline().split()[-1].rsplit(":", 1)
            address, admin = (host, int(port)), (ahost, int(aport))
            clients = [await Client.connect(address) for _ in range(40)]
            if idle:  # each reaches every endpoint, one request at a time, then sits idle
                for c in clients:
                    for _ in range(5):
                        await asyncio.wait_for(c.call(), 5)
            sent = [(c, c.new_id()) for c in clients for _ in range(5)]
            waits = [c.expect(rid) for c, rid in sent]
            for c, rid in sent:
                c.send(build_frame(REQUEST, rid, {"method": "get"}))
            replies = await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), 15)
            outcome = Counter(
                "reset" if isinstance(r, BaseException) else error_type(r) or "answered"
                for r in replies
            )
            late = await Client.connect(address)
            late_replies = await asyncio.wait_for(
                asyncio.gather(*(late.start() for _ in range(3)), return_exceptions=True), 5
            )
            late_outcome = Counter(
                "reset" if isinstance(r, BaseException) else error_type(r) or "answered"
                for r in late_replies
            )
            reset = sum(c.closed.done() for c in [*clients, late])
            try:
                status, body = await http_get(admin, "/stats?format=json")
            except (OSError, TimeoutError, ValueError, IndexError) as exc:
                status, body = 0, "{}"  # reset, or nothing answered
                print(f"admin: {exc!r}")
            stats = dict(json.loads(body)) if status == 200 else {}
            reclaimed = sum(
                v
                for k, v in stats.items()
                if k.startswith("metaprotocol_upstream_connections_closed")
                and 'reason="reclaimed"' in k
            )
            return (
                f"{dict(outcome)} of 200; new client {dict(late_outcome)}; clients reset "
                f"{reset}; admin {status}; reclaimed {reclaimed}"
            )
        finally:
            for c in clients:
                c.close()
            proc.terminate()
            _, err = proc.communicate(timeout=15)
            assert "Traceback" not in err, err
            for up in ups:
                await up.close()


async def main(runs: int, idle: bool) -> None:
    for i in range(runs):
        print(f"run {i + 1}: {await one_run(idle)}", flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    asyncio.run(main(int(args[0]) if args else 4, "--idle" in sys.argv[1:]))
