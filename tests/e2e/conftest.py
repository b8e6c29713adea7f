"""Shared harness for the end-to-end tests: the engine in a background event loop, Apache
Thrift code generated from the demo IDL, and port helpers. Everything binds 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest

from metaprotocol_sdk.demo.idl import HELLO_THRIFT
from metaprotocol_sdk.proxy import Engine, loads_config

T = TypeVar("T")

# The shared helpers beside this file (dubbo_kit) are importable by the tests (pytest runs in
# importlib mode).
sys.path.insert(0, str(Path(__file__).parent))


class RunningEngine:
    """An :class:`Engine` on its own event loop thread, driven from synchronous tests."""

    def __init__(self, yaml_text: str) -> None:
        import uvloop  # the loop `metaprotocol proxy` runs on

        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="engine", daemon=True)
        self.thread.start()
        self.engine = Engine(loads_config(yaml_text))
        self.call(self.engine.start())

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        """Run ``coro`` on the engine's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def port(self, host: str, port: int) -> int:
        """The loopback port bound for the listener of service ``host:port``."""
        return self.engine.listener_addresses[host, port][1]

    def stat(self, prefix: str) -> int:
        """Sum of every stats series whose ``name{labels}`` starts with ``prefix``."""
        snapshot = self.loop_call(self.engine.stats_snapshot)
        return sum(v for k, v in snapshot.items() if k.startswith(prefix))

    def loop_call(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` on the engine's loop (its state is not thread-safe)."""

        async def run() -> T:
            return fn()

        return self.call(run())

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Poll ``predicate`` (a condition on engine state) until true; fail on timeout."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached within the time bound")
            time.sleep(0.01)

    def close(self) -> list[str]:
        """Stop the engine and the loop; returns the names of tasks left behind."""
        self.call(self.engine.stop(drain=0.5))

        async def leftovers() -> list[str]:
            me = asyncio.current_task()
            return [repr(t) for t in asyncio.all_tasks() if t is not me and not t.done()]

        left = self.call(leftovers())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()
        return left


@pytest.fixture(scope="module")
def start_engine() -> Iterator[Callable[[str], RunningEngine]]:
    """Start engines for a module; each is stopped (and checked for leaked tasks) at the end."""
    engines: list[RunningEngine] = []

    def start(yaml_text: str) -> RunningEngine:
        engine = RunningEngine(yaml_text)
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        if engine.thread.is_alive():
            engine.close()


#: Sockets held bound (never listening) for the whole session by :func:`closed_port`.
_HELD: list[socket.socket] = []


def closed_port() -> int:
    """A loopback port that refuses connections, and that nothing else can take.

    The socket stays bound without listening until the session ends: connecting gets
    ECONNREFUSED. (Binding and releasing it would let a later bind to port 0 - an engine's own
    listener, say - get the same port, and the "dead" endpoint would answer.)
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _HELD.append(sock)
    port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="session")
def apache_hello(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """Apache Thrift code for the demo IDL, generated with the Debian ``thrift`` compiler."""
    compiler = shutil.which("thrift")
    if compiler is None:
        pytest.fail("the Apache Thrift compiler is missing: run ./dev setup (thrift-compiler)")
    out = tmp_path_factory.mktemp("gen-py")
    idl = out / "hello.thrift"
    idl.write_text(HELLO_THRIFT.replace("namespace py hello", "namespace py e2e_apache_hello"))
    subprocess.run([compiler, "--gen", "py", "-out", str(out), str(idl)], check=True)
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("e2e_apache_hello.Hello")
    finally:
        sys.path.remove(str(out))


def service_yaml(
    name: str,
    protocol: str,
    host: str,
    port: int,
    endpoints: dict[str, int],
    *,
    subsets: tuple[str, ...] = ("v1", "v2"),
    hash_header: str | None = None,
    traffic_policy: str = "",
) -> str:
    """ServiceEntry + DestinationRule for a service whose endpoints are labelled by version;
    ``traffic_policy`` is YAML flow mapping text for the rule's ``trafficPolicy``."""
    port_name = f"tcp-metaprotocol-{protocol}-{name}"
    eps = "".join(
        f"""
    - address: 127.0.0.1
      ports: {{{port_name}: {p}}}
      labels: {{version: {v}}}"""
        for v, p in endpoints.items()
    )
    subs = "".join(
        f"""
    - name: {s}
      labels: {{version: {s}}}"""
        for s in subsets
    )
    policy = (
        f"""
  trafficPolicy:
    loadBalancer:
      consistentHash: {{httpHeaderName: {hash_header}}}"""
        if hash_header
        else (f"\n  trafficPolicy: {traffic_policy}" if traffic_policy else "")
    )
    return f"""
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
  hosts: [{host}]
  ports: [{{number: {port}, name: {port_name}, protocol: TCP}}]
  resolution: STATIC
  endpoints:{eps}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: {name}}}
spec:
  host: {host}{policy}
  subsets:{subs}
---"""


def application_protocol_yaml(protocol: str) -> str:
    """The ``ApplicationProtocol`` for one of the reference codecs."""
    return f"""
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: ApplicationProtocol
metadata: {{name: {protocol}}}
spec: {{protocol: {protocol}, codec: aeraki.meta_protocol.codec.{protocol}}}
---"""


def proxy_yaml(listeners: list[tuple[str, int]], *, route_timeout: str = "5s") -> str:
    """The ``ProxyConfig``: one loopback listener per service, short timeouts for tests."""
    items = "".join(
        f"""
    - {{host: {h}, port: {p}, bind: "127.0.0.1:0"}}"""
        for h, p in listeners
    )
    return f"""
apiVersion: proxy.metaprotocol.io/v1alpha1
kind: ProxyConfig
metadata: {{name: e2e}}
spec:
  listeners:{items}
  admin: {{bind: "127.0.0.1:0"}}
  timeouts: {{connect: 1s, route: {route_timeout}, drain: 1s}}
"""


@pytest.fixture(scope="session")
def harness() -> ModuleType:
    """This module, so tests can use its helpers (test modules cannot import a conftest)."""
    return sys.modules[__name__]


class ApacheHeaderServer:
    """An Apache Thrift server speaking THeader (and framed binary) on 127.0.0.1.

    ``headers()`` answers with the info headers of the request being served, as JSON, so a
    test can see what the proxy wrote into the request.
    """

    def __init__(self, gen: ModuleType, version: str) -> None:
        from thrift.protocol.THeaderProtocol import THeaderProtocol
        from thrift.transport.THeaderTransport import THeaderClientType

        self.version = version
        self._current = threading.local()
        self._make_protocol = lambda trans: THeaderProtocol(
            trans, allowed_client_types=(THeaderClientType.HEADERS, THeaderClientType.FRAMED_BINARY)
        )
        self._processor = gen.Processor(self)
        #: The info headers of every request served, in order (a mirror test reads them).
        self.seen: list[dict[str, str]] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    # --- the Hello service -------------------------------------------------------------
    def sayHello(self, name: str) -> str:
        return f"{self.version}: hello {name}"

    def ping(self) -> str:
        return f"{self.version}: pong"

    def headers(self) -> str:
        import json

        read = self._current.protocol.trans.get_headers()
        return json.dumps(
            {"version": self.version, **{k.decode(): v.decode() for k, v in read.items()}}
        )

    # --- plumbing ----------------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        from thrift.transport.TSocket import TSocket

        trans = TSocket()
        trans.handle = conn
        protocol = self._make_protocol(trans)
        self._current.protocol = protocol
        try:
            while True:
                self._processor.process(protocol, protocol)
                read = protocol.trans.get_headers()
                self.seen.append({k.decode(): v.decode() for k, v in read.items()})
        except Exception:  # the client went away
            pass
        finally:
            conn.close()

    def close(self) -> None:
        """Stop accepting and drop the connections."""
        self._listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
