"""Load clients: a paced stream of real RPCs, tallied by protocol, route and version.

Every server answers ``"<version>: ..."``, so a client learns which version served each call
from the reply itself; the route follows from the method (:data:`configs.METHOD_ROUTE`).
Every fifth call is ``sayHello``, the rest are ``ping``.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from .configs import METHOD_ROUTE
from .idl import hello, untyped
from .procs import Child, node_child


@dataclass
class Tally:
    """Counts by (route, version), errors and the last error message of one protocol."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    errors: int = 0
    last_error: str = ""

    def record(self, method: str, reply: str) -> None:
        """Count one successful reply."""
        self.counts[METHOD_ROUTE[method], reply.split(":", 1)[0]] += 1

    @property
    def total(self) -> int:
        """Successful calls."""
        return sum(self.counts.values())


def method_for(n: int) -> str:
    """The method of the ``n``-th call."""
    return "sayHello" if n % 5 == 0 else "ping"


class ThriftLoad:
    """Threads running thriftpy2 clients (framed, binary) at a steady total rate."""

    protocol = "thrift"

    def __init__(self, port: int, rate: float, connections: int = 2) -> None:
        self.port = port
        self.interval = connections / rate
        self.tally = Tally()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"thrift-load-{i}", daemon=True)
            for i in range(connections)
        ]

    def start(self) -> None:
        """Start the client threads."""
        for thread in self._threads:
            thread.start()

    def snapshot(self) -> Tally:
        """A copy of the tally."""
        with self._lock:
            return Tally(Counter(self.tally.counts), self.tally.errors, self.tally.last_error)

    def _run(self) -> None:
        rpc = untyped("thriftpy2.rpc")
        framed = untyped("thriftpy2.transport").TFramedTransportFactory()
        client = None
        n = 0
        deadline = time.monotonic()
        while not self._stop.is_set():
            method = method_for(n)
            n += 1
            try:
                if client is None:
                    client = rpc.make_client(
                        hello().Hello, "127.0.0.1", self.port, trans_factory=framed, timeout=3000
                    )
                reply = client.sayHello("mesh") if method == "sayHello" else client.ping()
                with self._lock:
                    self.tally.record(method, reply)
            except Exception as exc:  # every failure is counted and shown, never fatal
                with self._lock:
                    self.tally.errors += 1
                    self.tally.last_error = f"{type(exc).__name__}: {exc}"
                if client is not None:
                    client.close()
                    client = None
            deadline = max(deadline + self.interval, time.monotonic() - 1.0)
            self._stop.wait(max(0.0, deadline - time.monotonic()))
        if client is not None:
            client.close()

    def stop(self) -> None:
        """Stop and join the client threads."""
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=5)


class DubboLoad:
    """A sofa-rpc-node consumer (``node/dubbo_peer.js load``) at a steady rate."""

    protocol = "dubbo"

    def __init__(self, port: int, rate: float) -> None:
        self.port = port
        self.rate = rate
        self.child: Child | None = None

    def start(self) -> None:
        """Start the consumer process and wait until it is connected."""
        self.child = node_child("dubbo-consumer", "load", f"127.0.0.1:{self.port}", str(self.rate))
        self.child.wait_ready()

    def snapshot(self) -> Tally:
        """The counts from the consumer's latest report."""
        tally = Tally()
        line = self.child.last_line if self.child is not None else ""
        if not line.startswith("{"):
            return tally
        report = json.loads(line)
        for method, by_version in report["counts"].items():
            for version, count in by_version.items():
                tally.counts[METHOD_ROUTE[method], version] += count
        tally.errors = report["errors"]
        tally.last_error = report["lastError"]
        return tally

    def stop(self) -> None:
        """Stop the consumer process."""
        if self.child is not None:
            self.child.stop()
