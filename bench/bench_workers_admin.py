"""What ``admin.maxConnections`` concurrent ``/config_dump`` (or ``/stats/live``) requests cost
the supervisor of ``metaprotocol proxy --workers 2``.

Each row is a fresh supervisor (real processes, loopback sockets) with a large configuration
(the endpoints of a 4 MiB file, the largest the engine reads: a 1.8 MiB dump): its peak memory
(``VmHWM``) above its memory before the requests, its CPU time and the workers' during the
requests, the wall time, and the answers (distinct bodies; workers ``up`` in each dump).
``--fake-mib N``: fake workers (a child process) answer a dump of N MiB each (as a control
plane's configuration can be, up to the supervisor's 64 MiB per answer) to the supervisor's
admin code running in this process.

Run: ``./dev bench workers_admin`` or ``.venv/bin/python bench/bench_workers_admin.py
[--endpoints N] [--requests N] [--path P] [--fake-mib N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "proxy"))

from proxy_kit import mesh

from metaprotocol_sdk.proxy import loads_config, workers
from metaprotocol_sdk.proxy.config.models import Admin

#: A long label on each endpoint: a large dump without a slow configuration load.
PAD = "n" * 250


def config(endpoints: int) -> str:
    """A mesh of ``endpoints`` endpoints (each in the dump), admin time raised for big dumps."""
    one = "    - {address: 127.0.0.1, ports: {tcp-metaprotocol-kv-svc: 1}, labels: {version: v1}}\n"
    eps = "".join(
        f"    - {{address: 10.{k >> 16 & 255}.{k >> 8 & 255}.{k & 255}, "
        f"ports: {{tcp-metaprotocol-kv-svc: 9000}}, "
        f"labels: {{version: v1, zone: z{k % 7}, note: {PAD}}}}}\n"
        for k in range(endpoints)
    )
    text = mesh([(1, "v1")])
    assert one in text, "mesh() changed"
    return text.replace(one, eps).replace(
        "admin: {bind: '127.0.0.1:0'}", "admin: {bind: '127.0.0.1:0', requestTimeout: 30s}"
    )


def status(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/PID/status``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def cpu(pid: int) -> float:
    """The process's user + system CPU seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


async def get(admin: tuple[str, int], path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(*admin)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 60)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def measure(admin: tuple[str, int], pid: int, path: str, requests: int) -> str:
    workers = children(pid)
    await get(admin, path)  # warm: the workers build their cached dump once
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM from here
    rss = status(pid, "VmRSS")
    cpu0, wcpu0, t0 = cpu(pid), sum(cpu(w) for w in workers), time.perf_counter()
    answers = await asyncio.gather(*(get(admin, path) for _ in range(requests)))
    wall = time.perf_counter() - t0
    used, wused = cpu(pid) - cpu0, sum(cpu(w) for w in workers) - wcpu0
    peak = status(pid, "VmHWM") - rss
    codes = sorted({code for code, _ in answers})
    ups = ""
    if path == "/config_dump":
        up = sorted(
            {sum(w["up"] for w in json.loads(b)["workers"]) for c, b in answers if c == 200}
        )
        ups = f" up={up}"
    size = max(len(b) for _, b in answers) / 2**20
    return (
        f"{requests:3d} x {path}: supervisor +{peak / 2**20:7.1f} MiB peak, "
        f"CPU {used:5.2f} s, workers CPU {wused:5.2f} s, wall {wall:5.2f} s, "
        f"answer {size:.1f} MiB, status {codes}, distinct bodies "
        f"{len({b for _, b in answers})}{ups}"
    )


def run(text: str, path: str, requests: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "mesh.yaml"
        file.write_text(text)
        command = [sys.executable, "-m", "metaprotocol_sdk", "proxy", "-c", str(file)]
        proc = subprocess.Popen([*command, "--workers", "2"], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            while not (line := proc.stdout.readline()).startswith("admin on"):
                assert line, "the supervisor did not start"
            host, port = line.split()[-1].rsplit(":", 1)
            return asyncio.run(measure((host, int(port)), proc.pid, path, requests))
        finally:
            proc.terminate()
            proc.wait(60)


#: A fake worker (a child process): answers any GET with a ``/config_dump`` of argv[1] MiB.
FAKE_WORKER = """
import asyncio, json, sys
entry = {"address": "10.0.0.1:9000", "labels": {"version": "v1", "note": "n" * 200}}
body = json.dumps({"version": "v", "documents": [entry] * (int(sys.argv[1]) * 2**20 // 260)})
answer = f"HTTP/1.1 200 OK\\r\\nContent-Length: {len(body)}\\r\\n\\r\\n{body}".encode()
async def serve(reader, writer):
    try:
        await reader.readuntil(b"\\r\\n\\r\\n")
        writer.write(answer)
        await writer.drain()
    except ConnectionError:  # the supervisor stopped waiting
        pass
    writer.close()
async def main():
    servers = [await asyncio.start_server(serve, "127.0.0.1", 0) for _ in range(2)]
    print(*(s.sockets[0].getsockname()[1] for s in servers), flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def measure_fake(ports: list[int], requests: int) -> str:
    """The supervisor's admin answering ``requests`` ``/config_dump`` at once, in this process,
    from fake workers (a child process) each answering a dump of the given size."""
    supervisor = workers.Supervisor(loads_config(mesh([(1, "v1")]), "t.yaml"), [], 2, None)
    for slot, port in zip(supervisor.workers, ports, strict=True):
        slot.admin = ("127.0.0.1", port)
        slot.process = types.SimpleNamespace(returncode=None, pid=0)  # type: ignore[assignment]
    admin = workers.WorkersAdmin(supervisor, Admin(("127.0.0.1", 0), request_timeout=30.0))
    await admin.respond("GET", "/config_dump")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
    rss = status(os.getpid(), "VmRSS")
    cpu0, t0 = time.process_time(), time.perf_counter()
    answers = await asyncio.gather(*(admin.respond("GET", "/config_dump") for _ in range(requests)))
    wall, used = time.perf_counter() - t0, time.process_time() - cpu0
    peak = status(os.getpid(), "VmHWM") - rss
    bodies = [bytes(a).partition(b"\r\n\r\n")[2] for a in answers]  # type: ignore[arg-type]
    up = sorted({sum(w["up"] for w in json.loads(b)["workers"]) for b in bodies})
    return (
        f"{requests:3d} x /config_dump: supervisor +{peak / 2**20:7.1f} MiB peak, "
        f"CPU {used:5.2f} s, wall {wall:5.2f} s, answer {max(map(len, bodies)) / 2**20:.1f} MiB, "
        f"workers up {up}"
    )


def run_fake(mib: int, requests: int) -> str:
    proc = subprocess.Popen(
        [sys.executable, "-c", FAKE_WORKER, str(mib)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        ports = [int(p) for p in proc.stdout.readline().split()]
        return asyncio.run(measure_fake(ports, requests))
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--path", default="/config_dump")
    parser.add_argument(
        "--fake-mib", type=int, default=0, help="fake workers answering a dump this large"
    )
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fake_mib and args.one:
        print(run_fake(args.fake_mib, args.requests), flush=True)
        return
    if args.fake_mib:  # each row in a fresh process: its heap grows with the row before
        print(f"fake workers, a {args.fake_mib} MiB /config_dump each, 2 workers", flush=True)
        for requests in (1, args.requests):
            row = ["--fake-mib", str(args.fake_mib), "--requests", str(requests), "--one"]
            subprocess.run([sys.executable, __file__, *row], check=True)
        return
    text = config(args.endpoints)
    print(f"{args.endpoints} endpoints, 2 workers")
    for requests in (1, args.requests):
        print(run(text, args.path, requests), flush=True)


if __name__ == "__main__":
    main()
