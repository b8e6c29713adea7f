"""A small ADS server for the tests, on grpcio and the official Envoy protos (xds-protos).

No Aeraki or istiod can run here (no Kubernetes API server), so this plays their part: it
holds one snapshot (a version and resources per type), sends it over every open stream in
the order the xDS protocol asks for (CDS, then EDS, then RDS), answers new subscriptions, and
records every request so a test can see ACKs (the version and nonce echoed) and NACKs
(``error_detail``). It runs in its own thread with its own event loop, so the engine under
test, a real Envoy, or both can be its clients.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.route.v3 import rds_pb2_grpc
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from snapshots import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE

#: The order a new snapshot is pushed in, the xDS protocol's (secrets on the streams that
#: asked for them: SDS).
ORDER = (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE)


@dataclass
class Snapshot:
    """A version and the resources of each type, by name."""

    version: str
    resources: dict[str, dict[str, Message]] = field(default_factory=dict)
    #: Per node id, the resources of some types that node is served in place of
    #: ``resources``' (istiod builds each proxy's listeners for it).
    by_node: dict[str, dict[str, dict[str, Message]]] = field(default_factory=dict)


@dataclass
class Request:
    """A request received, with the stream it came on."""

    stream: int
    node_id: str
    type_url: str
    version: str
    nonce: str
    names: tuple[str, ...]
    error: str | None


class _Stream:
    def __init__(self, ident: int, server: ControlPlane) -> None:
        self.ident = ident
        self.server = server
        self.node_id = ""
        self.subscribed: dict[str, tuple[str, ...]] = {}
        self.sent: dict[str, str] = {}  # type -> version last sent
        self.out: asyncio.Queue[discovery_pb2.DiscoveryResponse | None] = asyncio.Queue()

    def push(self, type_url: str, force: bool = False) -> None:
        snap = self.server.snapshot
        if type_url not in self.subscribed:
            return
        if not force and self.sent.get(type_url) == snap.version:
            return
        names = self.subscribed[type_url]
        mine = snap.by_node.get(self.node_id, {})
        resources = mine[type_url] if type_url in mine else snap.resources.get(type_url, {})
        chosen = [r for n, r in sorted(resources.items()) if not names or n in names]
        packed = []
        for r in chosen:
            a = any_pb2.Any()
            a.Pack(r)
            packed.append(a)
        self.sent[type_url] = snap.version
        self.out.put_nowait(
            discovery_pb2.DiscoveryResponse(
                version_info=snap.version,
                resources=packed,
                type_url=type_url,
                nonce=str(next(self.server.nonces)),
            )
        )


class _Servicer(
    ads_pb2_grpc.AggregatedDiscoveryServiceServicer,
    rds_pb2_grpc.RouteDiscoveryServiceServicer,
    sds_pb2_grpc.SecretDiscoveryServiceServicer,
):
    def __init__(self, server: ControlPlane) -> None:
        self.server = server

    async def StreamSecrets(self, request_iterator: Any, context: Any) -> Any:
        """istio-agent's part: SDS secrets (``file-cert:``, ``file-root:``) for Envoy."""
        async for response in self.StreamAggregatedResources(request_iterator, context):
            yield response

    async def StreamRoutes(self, request_iterator: Any, context: Any) -> Any:
        """Aeraki's service: RDS alone, the same protocol as the aggregated stream."""
        async for response in self.StreamAggregatedResources(request_iterator, context):
            yield response

    async def StreamAggregatedResources(self, request_iterator: Any, context: Any) -> Any:
        server = self.server
        stream = _Stream(next(server.stream_ids), server)
        server.streams.add(stream)

        async def reader() -> None:
            async for req in request_iterator:
                if req.node.id:
                    stream.node_id = req.node.id
                    server.nodes.append(MessageToDict(req.node))
                names = tuple(req.resource_names)
                error = req.error_detail.message if req.HasField("error_detail") else None
                server.record(
                    Request(
                        stream.ident,
                        stream.node_id,
                        req.type_url,
                        req.version_info,
                        req.response_nonce,
                        names,
                        error,
                    )
                )
                changed = stream.subscribed.get(req.type_url) != names
                fresh = req.type_url not in stream.subscribed
                stream.subscribed[req.type_url] = names
                if fresh or changed:
                    stream.push(req.type_url, force=True)
            stream.out.put_nowait(None)

        task = asyncio.get_running_loop().create_task(reader())
        try:
            while True:
                item = await stream.out.get()
                if item is None:
                    return
                yield item
        finally:
            task.cancel()
            server.streams.discard(stream)


class ControlPlane:
    """The ADS server, started on 127.0.0.1 in a background thread."""

    def __init__(self, port: int = 0, *, service: str = "ads", unix: str | None = None) -> None:
        #: ``ads`` (istiod's AggregatedDiscoveryService) or ``rds`` (Aeraki's
        #: RouteDiscoveryService, the only one Aeraki registers).
        self.service = service
        self.snapshot = Snapshot("")
        self.requests: list[Request] = []
        #: The ``Node`` of each stream's first request, as JSON-like data.
        self.nodes: list[dict[str, Any]] = []
        self.streams: set[_Stream] = set()
        self.nonces = itertools.count(1)
        self.stream_ids = itertools.count(1)
        self._cond = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: grpc.aio.Server | None = None
        self._port = port
        self.port = 0
        #: A Unix socket to serve on instead of a port (as istio-agent's xDS proxy).
        self.unix = unix

    def start(self) -> ControlPlane:
        """Bind and serve (``port`` 0: an ephemeral port; the same port again on restart)."""
        if not self._thread.is_alive():
            self._thread.start()
        self._call(self._start()).result(10)
        return self

    async def _start(self) -> None:
        # Pings as often as the keepalive tests send them (istiod allows one per 15 s, gRPC's
        # default one per 5 minutes; the engine's default interval is above both).
        self._server = grpc.aio.server(
            options=[
                ("grpc.http2.min_ping_interval_without_data_ms", 100),
                ("grpc.http2.max_ping_strikes", 0),
            ]
        )
        if self.service == "ads":
            ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(
                _Servicer(self), self._server
            )
            # Envoy asks istio-agent for the secrets istiod's clusters name (``sds-grpc``);
            # the same server plays that part (the engine reads the files itself).
            sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(_Servicer(self), self._server)
        else:
            rds_pb2_grpc.add_RouteDiscoveryServiceServicer_to_server(_Servicer(self), self._server)
        if self.unix is not None:
            self._server.add_insecure_port(f"unix:{self.unix}")
        else:
            self.port = self._server.add_insecure_port(f"127.0.0.1:{self.port or self._port}")
        await self._server.start()

    def stop(self) -> None:
        """Stop serving (streams are cut); ``start()`` again serves on the same port."""
        if self._server is not None:
            server, self._server = self._server, None
            self._call(server.stop(0)).result(10)

    def close(self) -> None:
        """Stop and end the thread."""
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _call(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def set_snapshot(
        self,
        version: str,
        resources: dict[str, Sequence[Message]],
        by_node: dict[str, dict[str, Sequence[Message]]] | None = None,
    ) -> None:
        """Serve ``resources`` (by type) as ``version``, pushed to every stream now;
        ``by_node``: the resources of some types served to one node (by id) instead."""

        def named(resources: dict[str, Sequence[Message]]) -> dict[str, dict[str, Message]]:
            return {
                url: {getattr(r, "cluster_name", "") or r.name: r for r in items}
                for url, items in resources.items()
            }

        nodes = {node: named(own) for node, own in (by_node or {}).items()}

        def apply() -> None:
            self.snapshot = Snapshot(version, named(resources), nodes)
            for stream in self.streams:
                for url in ORDER:
                    stream.push(url)

        self._loop.call_soon_threadsafe(apply)

    def send(self, response: discovery_pb2.DiscoveryResponse) -> None:
        """Send ``response`` as it is on every open stream, asked for or not (a hostile
        server)."""

        def send() -> None:
            for stream in self.streams:
                stream.out.put_nowait(response)

        self._loop.call_soon_threadsafe(send)

    def record(self, request: Request) -> None:
        with self._cond:
            self.requests.append(request)
            self._cond.notify_all()

    def wait(self, predicate: Callable[[list[Request]], bool], timeout: float = 20) -> None:
        """Wait until ``predicate(requests)`` holds."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.requests), timeout):
                raise TimeoutError(f"control plane: condition not met; requests: {self.requests}")

    def acked(self, type_url: str, version: str, node: str | None = None) -> bool:
        """A client ACKed ``version`` of ``type_url`` (its request echoes it, no error)."""
        return any(
            r.type_url == type_url
            and r.version == version
            and r.nonce
            and r.error is None
            and (node is None or r.node_id == node)
            for r in self.requests
        )

    def nacks(self, type_url: str) -> list[Request]:
        """Requests of ``type_url`` that carried an ``error_detail``."""
        return [r for r in self.requests if r.type_url == type_url and r.error is not None]


class BlackHole:
    """A TCP relay to ``port`` on 127.0.0.1 that can go silent without closing anything, as a
    control plane does when its node vanishes or a NAT entry expires: :meth:`swallow` makes
    every connection open now drop what it carries in both directions while staying open;
    connections made afterwards are relayed as usual."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._live: list[list[bool]] = []  # per connection: [swallowing]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def swallow(self) -> None:
        """Silence every connection open now."""
        with self._lock:
            for flag in self._live:
                flag[0] = True

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.target))
            flag = [False]
            with self._lock:
                self._live.append(flag)
                self._sockets += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b, flag), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, flag: list[bool]) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            if not flag[0]:
                try:
                    dst.sendall(data)
                except OSError:
                    return
