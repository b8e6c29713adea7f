"""Tiny asyncio KV servers and clients, plus config builders, for the engine tests."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import os
import signal
import socket
import struct
import sys
import textwrap
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import uvloop

from metaprotocol_sdk import CodecError, MessageType, Metadata, MutationError
from metaprotocol_sdk.examples.kv import (
    ERROR,
    HEADER,
    HEADER_SIZE,
    ONEWAY,
    PING,
    PONG,
    REQUEST,
    RESPONSE,
    KVCodec,
    _decode_headers,
    build_frame,
)
from metaprotocol_sdk.proxy import Engine, loads_config

T = TypeVar("T")
WAIT = 5.0  # bound on every single wait in the tests
PROCESS_WAIT = 15.0  # the same for a ``metaprotocol proxy`` process (ProxyProcess)

__all__ = ["ERROR", "ONEWAY", "PING", "REQUEST", "RESPONSE", "build_frame"]


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0, loop: str = "uvloop") -> T:
    """Run a test coroutine with a hard bound, on uvloop (as the CLI does) or ``asyncio``."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    factory = uvloop.new_event_loop if loop == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(bounded())


class LenientKVCodec(KVCodec):
    """KV codec that reports a bad headers block with ``frame_size`` and partial metadata.

    The example codec consumes the frame before parsing headers; this one validates first, so
    the engine can drop exactly that frame and keep the connection.
    """

    def decode(self, buffer: bytearray) -> Metadata | Any:
        fields = HEADER.unpack(buffer)
        if fields is not None:
            _, _, _, rid, hlen, _, blen = fields
            size = HEADER_SIZE + hlen + blen
            if len(buffer) >= size and size <= self.max_frame_size:
                try:
                    _decode_headers(bytes(buffer[:size]), HEADER_SIZE, HEADER_SIZE + hlen)
                except CodecError as exc:
                    raise CodecError(
                        exc.reason,
                        offset=exc.offset,
                        metadata=Metadata(MessageType.Request, request_id=rid),
                        frame_size=size,
                    ) from exc
        return super().decode(buffer)


class NamelessErrorKVCodec(KVCodec):
    """KV codec whose header-block errors say where the frame ends but not whose it is (no
    ``metadata``, the request id left out): a codec the engine cannot answer."""

    protocol = "kvne"

    def decode(self, buffer: bytearray) -> Any:
        try:
            return super().decode(buffer)
        except CodecError as exc:
            exc.metadata = None
            raise


class NoRewriteKVCodec(KVCodec):
    """KV codec that does not declare id rewriting: the engine pairs connections instead."""

    protocol = "kvnr"
    capabilities = KVCodec.capabilities.__class__(
        heartbeat=True, oneway=True, mutation=True, response_mutation=True
    )


class FewIdsKVCodec(KVCodec):
    """The KV codec with three request ids (``max_request_id`` 3): shared connections carry
    two requests at once (the last id is left to one-way messages)."""

    protocol = "kvf"
    max_request_id = 3


class PickyKVCodec(KVCodec):
    """KV codec that refuses to write the mutation key ``x-bad`` (a MutationError)."""

    def encode(
        self, message: Metadata, mutation: Any = None, *, request_id: int | None = None
    ) -> Any:
        if mutation and "x-bad" in mutation:
            raise MutationError("no room for x-bad")
        return super().encode(message, mutation, request_id=request_id)


class CountingKVCodec(KVCodec):
    """KV codec counting the replies it decodes (``peek_reply`` lets the engine skip that)."""

    protocol = "kvc"
    reply_decodes = 0

    def decode(self, buffer: bytearray) -> Metadata | Any:
        message = super().decode(buffer)
        if isinstance(message, Metadata) and message.message_type in (
            MessageType.Response,
            MessageType.Error,
        ):
            CountingKVCodec.reply_decodes += 1
        return message


class CountingDedicatedKVCodec(CountingKVCodec):
    """The counting codec without id rewriting: peeked replies pair by arrival order."""

    protocol = "kvcd"
    capabilities = KVCodec.capabilities.__class__(
        heartbeat=True, oneway=True, mutation=True, response_mutation=True, peek_reply=True
    )


class PrintingKVCodec(KVCodec):
    """A chatty codec: prints a 1 KiB line on standard output for every message it decodes."""

    protocol = "kvp"
    stream = "stdout"

    def decode(self, buffer: bytearray) -> Metadata | Any:
        message = super().decode(buffer)
        if isinstance(message, Metadata):
            print("x" * 1023, file=getattr(sys, self.stream), flush=True)
        return message


class StderrPrintingKVCodec(PrintingKVCodec):
    """The chatty codec on standard error."""

    stream = "stderr"


def stall_the_loop(seconds: float, sleep: bool = False) -> None:
    """The fault the watchdog tests inject: a codec holding the event loop, busy (a
    pathological input) or in a blocking call."""
    if sleep:
        time.sleep(seconds)
        return
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


class StallingKVCodec(KVCodec):
    """KV codec that holds the event loop for ``stall-ms`` milliseconds when it decodes a
    ``stall`` request (in ``time.sleep`` with the header ``how: sleep``, else busy)."""

    protocol = "kvs"

    def decode(self, buffer: bytearray) -> Metadata | Any:
        message = super().decode(buffer)
        if isinstance(message, Metadata) and message.operation_name == "stall":
            seconds = int(message.attributes.get("stall-ms") or 0) / 1000
            stall_the_loop(seconds, message.attributes.get("how") == "sleep")
        return message


class NoticeKVCodec(KVCodec):
    """The KV codec with a drain notice: a PONG frame with the header ``drain: 1``."""

    protocol = "kvd"
    capabilities = dataclasses.replace(KVCodec.capabilities, drain_notice=True)

    def drain_notice(self) -> bytes:
        return build_frame(PONG, 0, {"drain": "1"})

    def is_drain_notice(self, metadata: Metadata) -> bool:
        return metadata.codec_state == PONG and metadata.attributes.get("drain") == "1"


class PingKVCodec(KVCodec):
    """The KV codec with heartbeat requests (a PING frame with the id)."""

    protocol = "kvp"
    capabilities = dataclasses.replace(KVCodec.capabilities, heartbeat_request=True)

    def heartbeat_request(self, request_id: int) -> bytes:
        return build_frame(PING, request_id)


class BrokenPingKVCodec(PingKVCodec):
    """:class:`PingKVCodec` whose ``heartbeat_request`` breaks the contract: it raises a
    ``CodecError`` (every id in ``1..max_request_id`` must have a ping)."""

    protocol = "kvbp"

    def heartbeat_request(self, request_id: int) -> bytes:
        raise CodecError(f"no ping for id {request_id}")


class EmptyPingKVCodec(PingKVCodec):
    """:class:`PingKVCodec` whose ``heartbeat_request`` returns ``b""`` (a bug)."""

    protocol = "kvep"

    def heartbeat_request(self, request_id: int) -> bytes:
        return b""


class PingDedicatedKVCodec(PingKVCodec):
    """:class:`PingKVCodec` without id rewriting: each client has its own connections."""

    protocol = "kvpd"
    capabilities = dataclasses.replace(PingKVCodec.capabilities, rewrite_request_id=False)


class NoticeDedicatedKVCodec(NoticeKVCodec):
    """:class:`NoticeKVCodec` without id rewriting: each client has its own connections."""

    protocol = "kvdd"
    capabilities = dataclasses.replace(NoticeKVCodec.capabilities, rewrite_request_id=False)


_mod = types.ModuleType("proxy_test_codecs")
_mod.CountingKVCodec = CountingKVCodec  # type: ignore[attr-defined]
_mod.CountingDedicatedKVCodec = CountingDedicatedKVCodec  # type: ignore[attr-defined]
_mod.PickyKVCodec = PickyKVCodec  # type: ignore[attr-defined]
_mod.LenientKVCodec = LenientKVCodec  # type: ignore[attr-defined]
_mod.NoRewriteKVCodec = NoRewriteKVCodec  # type: ignore[attr-defined]
_mod.FewIdsKVCodec = FewIdsKVCodec  # type: ignore[attr-defined]
_mod.NoticeKVCodec = NoticeKVCodec  # type: ignore[attr-defined]
_mod.PingKVCodec = PingKVCodec  # type: ignore[attr-defined]
_mod.PingDedicatedKVCodec = PingDedicatedKVCodec  # type: ignore[attr-defined]
_mod.BrokenPingKVCodec = BrokenPingKVCodec  # type: ignore[attr-defined]
_mod.EmptyPingKVCodec = EmptyPingKVCodec  # type: ignore[attr-defined]
_mod.NoticeDedicatedKVCodec = NoticeDedicatedKVCodec  # type: ignore[attr-defined]
sys.modules["proxy_test_codecs"] = _mod


class KVServer(asyncio.Protocol):
    """One connection of a KV test server."""

    def __init__(self, owner: Upstream) -> None:
        self.owner = owner
        self.codec = KVCodec()
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        #: The client's metadata exchange header is still to be read (see Upstream.exchange).
        self.exchanging = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not inherit from asyncio.Transport: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        self.owner.connections.add(self)
        self.owner.accepted += 1
        ssl_object = transport.get_extra_info("ssl_object")
        if (
            self.owner.exchange is not None
            and ssl_object is not None
            and ssl_object.selected_alpn_protocol() == "istio-peer-exchange"
        ):
            self.exchanging = True
        if self.owner.refusing:  # a server that announced its drain: new connections closed
            self.transport.close()
            return
        if self.owner.greeting:
            self.transport.write(self.owner.greeting)
        if self.owner.reading_paused:  # uvloop starts reading after connection_made returns
            asyncio.get_running_loop().call_soon(self.transport.pause_reading)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.exchanging:  # a sidecar server: the client's header first, then its own
            from mesh_pki import read_exchange  # tests/ (TLS tests only)

            peer = read_exchange(self.buffer)
            if peer is None:
                return
            self.exchanging = False
            self.owner.peers.append(peer)
            assert self.transport is not None and self.owner.exchange is not None
            if self.owner.exchange:
                self.transport.write(self.owner.exchange)
        while True:
            msg = self.codec.decode(self.buffer)
            if not isinstance(msg, Metadata):
                return
            self.owner.on_message(self, msg)


class Upstream:
    """A KV server: answers requests with ``server`` and ``req-*`` headers echoing the request.

    Methods with special behaviour: ``hang`` (never answer), ``close`` (drop the connection),
    ``slow`` (answer when ``release`` is set), ``fail`` (answer with an ERROR frame),
    ``renumber`` (answer with the request id plus 1000), ``big`` (a body of ``size`` bytes).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.received: list[Metadata] = []
        self.connections: set[KVServer] = set()
        self.accepted = 0
        self.release = asyncio.Event()
        self.pongs: list[Metadata] = []
        self.reading_paused = False
        #: New connections are closed at once (a server shutting down, as Dubbo's does).
        self.refusing = False
        #: Sent on each new connection as it is accepted (``b""``: nothing).
        self.greeting = b""
        #: Istio's metadata exchange, as a sidecar server speaks it when a TLS client selects
        #: ALPN istio-peer-exchange: the header it writes once it read the client's (``b""``:
        #: none, its replies come first; ``None``: it speaks no exchange), and the clients'
        #: workloads it read (mesh_pki.read_exchange's dicts).
        self.exchange: bytes | None = None
        self.peers: list[dict[str, Any]] = []
        #: Pings received, and whether they go unanswered (as every request, with ``hang``:
        #: a peer that is gone).
        self.pings = 0
        self.mute = False
        self.pong = asyncio.Event()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, ssl: Any = None, rcvbuf: int | None = None) -> Upstream:
        """Listen on 127.0.0.1 (with TLS when given an ``ssl.SSLContext``; with ``rcvbuf``,
        the connections' ``SO_RCVBUF``, so that the kernel holds little of what they are
        sent)."""
        loop = asyncio.get_running_loop()
        if rcvbuf is None:
            self.server = await loop.create_server(lambda: KVServer(self), "127.0.0.1", 0, ssl=ssl)
        else:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # inherited
            sock.bind(("127.0.0.1", 0))
            self.server = await loop.create_server(lambda: KVServer(self), sock=sock, ssl=ssl)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for conn in list(self.connections):
                assert conn.transport is not None
                conn.transport.abort()
            await asyncio.wait_for(self.server.wait_closed(), WAIT)

    def on_message(self, conn: KVServer, msg: Metadata) -> None:
        assert conn.transport is not None
        if msg.message_type is MessageType.Heartbeat:
            reply = conn.codec.heartbeat_reply(msg)
            if reply:
                self.pings += 1
                if not self.mute:
                    conn.transport.write(reply)
            else:
                self.pongs.append(msg)
                self.pong.set()
            return
        self.received.append(msg)
        for n, fut in list(self._waiters):
            if len(self.received) >= n and not fut.done():
                fut.set_result(None)
        if msg.message_type is not MessageType.Request:
            return
        method = msg.operation_name
        if method == "hang":
            return
        if method == "close":
            conn.transport.close()
            return
        if method == "garbage":
            conn.transport.write(b"XX" + bytes(30))
            return
        headers = {"server": self.name}
        headers.update({f"req-{k}": v for k, v in msg.attributes.to_dict().items()})
        rid = msg.request_id + 1000 if method == "renumber" else msg.request_id
        body = bytes(msg.body)
        if method == "big":  # a reply body of the requested size
            body = bytes(int(msg.attributes.get("size") or 0))
        frame = build_frame(ERROR if method == "fail" else RESPONSE, rid, headers, body)
        if method == "slow":
            transport = conn.transport

            async def later() -> None:
                await self.release.wait()
                transport.write(frame)

            asyncio.get_running_loop().create_task(later())
            return
        conn.transport.write(frame)

    async def wait_received(self, n: int) -> None:
        """Wait until ``n`` messages (requests or oneway) have arrived."""
        if len(self.received) >= n:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        await asyncio.wait_for(fut, WAIT)

    def resume_reading(self) -> None:
        """Start reading after ``reading_paused`` was set before connections came."""
        self.reading_paused = False
        for conn in self.connections:
            assert conn.transport is not None
            conn.transport.resume_reading()

    def send_all(self, frame: bytes) -> None:
        """Send ``frame`` from the server side on every connection (a drain notice, say)."""
        for conn in self.connections:
            assert conn.transport is not None
            conn.transport.write(frame)

    def close_connections(self) -> None:
        """Close every connection (a server that finished its drain)."""
        for conn in list(self.connections):
            assert conn.transport is not None
            conn.transport.close()

    def ping_all(self) -> None:
        """Send a PING from the server side on every connection."""
        for conn in self.connections:
            assert conn.transport is not None
            conn.transport.write(build_frame(PING, 777))


class Client(asyncio.Protocol):
    """A KV client: pipelines requests and matches replies by id."""

    def __init__(self, metadata: dict[str, Any] | None = None) -> None:
        self.codec = KVCodec()
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiting: dict[int, asyncio.Future[Metadata]] = {}
        self.unmatched: list[Metadata] = []
        self.closed = asyncio.get_running_loop().create_future()
        self.write_paused = asyncio.Event()
        self.next_id = 0
        #: Istio's metadata exchange (over TLS with ALPN istio-peer-exchange): what this
        #: client says of itself, whether the server's header is still to come, and it.
        self.metadata = metadata  # None: mesh_pki.SIDECAR_METADATA
        self.exchanging = False
        self.peer_metadata: dict[str, Any] | None = None

    @classmethod
    async def connect(
        cls,
        address: tuple[str, int],
        ssl: Any = None,
        server_hostname: str | None = None,
        local_host: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Client:
        """Connect (over TLS when given an ``ssl.SSLContext``; from ``local_host``, such as
        another loopback address, when given; ``metadata``: what it says of itself in Istio's
        metadata exchange, when the server selects it)."""
        local = None if local_host is None else (local_host, 0)
        _, proto = await asyncio.wait_for(
            asyncio.get_running_loop().create_connection(
                lambda: cls(metadata),
                *address,
                ssl=ssl,
                server_hostname=server_hostname,
                local_addr=local,
            ),
            WAIT,
        )
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not inherit from asyncio.Transport: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() == "istio-peer-exchange":
            # A sidecar client: Istio's metadata exchange before its first request, and the
            # server's before its first reply.
            from mesh_pki import SIDECAR_METADATA, exchange_header  # tests/ (TLS tests only)

            self.exchanging = True
            self.transport.write(exchange_header(self.metadata or SIDECAR_METADATA))

    def pause_writing(self) -> None:
        self.write_paused.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionResetError("closed"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.exchanging and not self.exchanged():
            return
        while True:
            msg = self.codec.decode(self.buffer)
            if not isinstance(msg, Metadata):
                return
            fut = self.waiting.pop(msg.request_id, None)
            if fut is None or fut.done():
                self.unmatched.append(msg)
            else:
                fut.set_result(msg)

    def exchanged(self) -> bool:
        """Whether the server's metadata exchange header is read (taken off the buffer)."""
        from mesh_pki import read_exchange

        peer = read_exchange(self.buffer)
        if peer is None:
            return False
        self.exchanging = False
        self.peer_metadata = peer
        return True

    def expect(self, rid: int) -> asyncio.Future[Metadata]:
        fut: asyncio.Future[Metadata] = asyncio.get_running_loop().create_future()
        self.waiting[rid] = fut
        return fut

    def send(self, frame: bytes) -> None:
        assert self.transport is not None
        self.transport.write(frame)

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def start(
        self,
        method: str = "get",
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        rid: int | None = None,
    ) -> asyncio.Future[Metadata]:
        """Send a request; the future resolves to the reply."""
        rid = self.new_id() if rid is None else rid
        fut = self.expect(rid)
        self.send(build_frame(REQUEST, rid, {"method": method, **(headers or {})}, body))
        return fut

    async def call(
        self,
        method: str = "get",
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        rid: int | None = None,
    ) -> Metadata:
        return await asyncio.wait_for(self.start(method, headers, body, rid), WAIT)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def reset(self) -> None:
        """Close with a TCP reset (``SO_LINGER`` 0), as a crashing client does."""
        if self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()


_HELD: list[socket.socket] = []


def refusing_port() -> int:
    """A port that refuses connections: bound (never listening) until the tests end, so no
    later bind to port 0 - the engine's own listener, say - can get it and answer."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _HELD.append(s)
    return int(s.getsockname()[1])


def error_type(msg: Metadata) -> str | None:
    """The ``error-type`` of a KV error reply, ``None`` for a normal response."""
    if msg.codec_state != ERROR:
        return None
    return msg.attributes.get("error-type")


_GATE = """\
import os, pathlib, sys, time
from {module} import {name} as Codec
here = pathlib.Path(__file__).parent
if ("--worker" in sys.argv) == ({process!r} == "worker") and not (here / "go").exists():
    (here / "waiting").write_text(str(os.getpid()))
    deadline = time.monotonic() + 15
    while not (here / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
"""


def start_gate(directory: Path, codec: str, process: str) -> dict[str, str]:
    """Write the codec module ``start_gate`` (its ``Codec`` is ``codec``, "module:Class") in
    ``directory``: imported by a ``process`` ("main", or a ``--worker``) that loads the
    configuration, it writes the file ``waiting`` and holds that process's start until the
    file ``go`` exists (at most 15 s). The environment whose Python finds it is returned."""
    module, name = codec.split(":")
    text = _GATE.format(module=module, name=name, process=process)
    (directory / "start_gate.py").write_text(text)
    path = [str(directory), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1"}


def sighup_at_the_gate(pid: int, directory: Path) -> None:
    """Once a process is held by :func:`start_gate` (bounded wait), send ``pid`` a SIGHUP,
    then let the process go on."""
    deadline = time.monotonic() + 30
    while not (directory / "waiting").exists():
        assert time.monotonic() < deadline, "the gate was never reached"
        time.sleep(0.01)
    os.kill(pid, signal.SIGHUP)
    (directory / "go").write_text("")


# -- configuration ----------------------------------------------------------------------------


def mesh(
    endpoints: list[tuple[int, str]],
    router: str | None = None,
    traffic_policy: str = "{}",
    proxy: str = "",
    protocol: str = "kv",
    codec: str = "metaprotocol_sdk.examples.kv:KVCodec",
    extra: str = "",
    listener_tls: str = "",
    listener: str = "",
) -> str:
    """The YAML of a one-service mesh: ``endpoints`` are ``(port, version)`` pairs;
    ``listener_tls`` a flow mapping for the listener's ``tls``; ``listener`` more of the
    listener's fields (``key: value, ...``)."""
    eps = "\n".join(
        f"    - {{address: 127.0.0.1, ports: {{tcp-metaprotocol-{protocol}-svc: {port}}}, "
        f"labels: {{version: {version}}}}}"
        for port, version in endpoints
    )
    parts = [
        textwrap.dedent(
            f"""\
            apiVersion: metaprotocol.aeraki.io/v1alpha1
            kind: ApplicationProtocol
            metadata: {{name: {protocol}}}
            spec: {{protocol: {protocol}, codec: "{codec}"}}
            ---
            apiVersion: networking.istio.io/v1beta1
            kind: ServiceEntry
            metadata: {{name: svc}}
            spec:
              hosts: [svc.test]
              ports: [{{number: 9000, name: tcp-metaprotocol-{protocol}-svc, protocol: TCP}}]
              resolution: STATIC
              endpoints:
            """
        )
        + (eps or "    []"),
        textwrap.dedent(
            f"""\
            apiVersion: networking.istio.io/v1beta1
            kind: DestinationRule
            metadata: {{name: svc}}
            spec:
              host: svc.test
              trafficPolicy: {traffic_policy}
              subsets:
                - {{name: v1, labels: {{version: v1}}}}
                - {{name: v2, labels: {{version: v2}}}}
                - {{name: empty, labels: {{version: none}}}}
            """
        ),
    ]
    if router is not None:
        parts.append(
            "apiVersion: metaprotocol.aeraki.io/v1alpha1\nkind: MetaRouter\n"
            "metadata: {name: svc}\nspec:\n  hosts: [svc.test]\n  routes:\n"
            + textwrap.indent(textwrap.dedent(router), "    ")
        )
    parts.append(
        "apiVersion: proxy.metaprotocol.io/v1alpha1\nkind: ProxyConfig\nmetadata: {name: engine}\n"
        "spec:\n  listeners: [{host: svc.test, port: 9000, bind: '127.0.0.1:0'"
        + (f", tls: {listener_tls}" if listener_tls else "")
        + (f", {listener}" if listener else "")
        + "}]\n"
        "  admin: {bind: '127.0.0.1:0'}\n" + textwrap.indent(textwrap.dedent(proxy), "  ")
    )
    if extra:
        parts.append(textwrap.dedent(extra))
    return "\n---\n".join(parts) + "\n"


@contextlib.asynccontextmanager
async def engine_for(text: str) -> AsyncIterator[Engine]:
    """A started engine for ``text``; stopped (briefly drained) on exit."""
    engine = Engine(loads_config(text, "test.yaml"))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop(drain=1.0)
        assert not engine.downstreams and not engine.upstreams and engine.pending == 0
        me = asyncio.current_task()
        left = [
            t
            for t in asyncio.all_tasks()
            if t is not me and not t.done() and "bounded" not in repr(t.get_coro())
        ]
        assert left == [], left


def address(engine: Engine) -> tuple[str, int]:
    """The bound address of the only listener."""
    return engine.listener_addresses[("svc.test", 9000)]


async def http_get(addr: tuple[str, int], path: str) -> tuple[int, str]:
    """GET ``path`` from the admin endpoint: ``(status, body)``."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr), WAIT)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), WAIT)
    writer.close()
    await writer.wait_closed()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def stats_json(body: str) -> dict[str, int]:
    return dict(json.loads(body))


async def until(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Poll ``check`` (a function or a coroutine function) until it gives a true value; fail
    with ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def rebuilt(engine: Engine) -> None:
    """Wait until the balancer rebuilds that health changes asked for are done (they wait
    their turn within the engine's budget: see ``rebuilds.py``)."""
    await until(lambda: engine.rebuilds.idle, "balancers rebuilt")


async def loop_stood_during(action: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    """Await ``action()`` while a task notes each turn of the event loop: the longest the loop
    stood without one, and how long the action took. The collector is off meanwhile (its
    full passes stall the loop whatever the engine does)."""
    import gc
    import itertools

    loop = asyncio.get_running_loop()
    ticks: list[float] = []
    done = False

    async def tick() -> None:
        while not done:
            ticks.append(loop.time())
            await asyncio.sleep(0)

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0)
    gc.disable()
    try:
        start = loop.time()
        await action()
        end = loop.time()
    finally:
        gc.enable()
        done = True
        await ticker
    stamps = [start, *(t for t in ticks if start < t < end), end]
    return max(b - a for a, b in itertools.pairwise(stamps)), end - start


async def gather(*aws: Awaitable[T]) -> list[T]:
    return list(await asyncio.wait_for(asyncio.gather(*aws), WAIT))


Factory = Callable[[], Awaitable[Upstream]]


class FakeTransport:
    """Stands in for a socket transport: records what the engine hands it, call by call."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []

    def write(self, data: Any) -> None:
        self.calls.append([data])

    def writelines(self, data: Any) -> None:
        self.calls.append(list(data))

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def wire_fakes(engine: Engine) -> tuple[Any, FakeTransport, Any, FakeTransport]:
    """A downstream connection and one shared upstream connection on fake transports.

    For a started engine with one listener and one cluster; returns ``(downstream, its
    transport, upstream connection, its transport)``. Nothing touches a socket, so the engine's
    Python work can be driven (and timed) call by call.
    """
    from metaprotocol_sdk.proxy.downstream import Downstream
    from metaprotocol_sdk.proxy.upstream import UpstreamConnection

    listener = next(iter(engine.listeners.values()))
    cluster = next(iter(engine.clusters.values()))
    host = cluster.hosts[0]
    up = UpstreamConnection(cluster, host, None)
    up_t = FakeTransport()
    up.connection_made(up_t)  # type: ignore[arg-type]
    host.conns.append(up)
    down = Downstream(listener)
    down_t = FakeTransport()
    down.connection_made(down_t)  # type: ignore[arg-type]
    return down, down_t, up, up_t


def count_calls(monkeypatch: Any, name: str) -> list[object]:
    """Record each call of ``metaprotocol_sdk.proxy.balancer.<name>`` (``monkeypatch``:
    pytest's fixture; the list is the caller's to clear): a rebuild that must hash nothing
    is checked by what it calls, not by how long it takes. Skips the test where the balancer
    module is compiled (mypyc): its callers there do not see the patch, and the test could
    not fail."""
    from metaprotocol_sdk.compilation import compiled
    from metaprotocol_sdk.proxy import balancer

    if balancer.__name__ in compiled():
        pytest.skip("counts calls by monkeypatching, which compiled callers do not see")
    calls: list[object] = []
    original = getattr(balancer, name)

    def counted(*args: object) -> object:
        calls.append(args[:1])
        return original(*args)

    monkeypatch.setattr(balancer, name, counted)
    return calls


class ProxyProcess:
    """A ``metaprotocol proxy -c CONFIG ARGS...`` process of the ``hello.test:9090`` listener
    (with an admin endpoint): its stderr lines collected by a thread (``lines``), its
    listening port and admin address read from its first two lines (unless ``serving`` is
    false). ``starting``: called with its pid before those are read."""

    def __init__(
        self,
        config: Path,
        *args: str,
        env: dict[str, str] | None = None,
        starting: Callable[[int], None] | None = None,
        serving: bool = True,
    ) -> None:
        import queue
        import subprocess
        import threading

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "metaprotocol_sdk", "proxy", "-c", str(config), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env or {**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        if starting is not None:
            starting(self.proc.pid)
        self.lines: queue.Queue[str] = queue.Queue()
        #: Reads stderr until every process writing it (a successor started by this one
        #: shares it) has closed it.
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if not serving:
            return
        assert self.proc.stdout is not None
        listening = self.proc.stdout.readline()
        admin = self.proc.stdout.readline()
        assert listening.startswith("listening hello.test:9090 on 127.0.0.1:"), listening
        self.port = int(listening.rsplit(":", 1)[1])
        self.admin = admin.split()[-1]

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))

    def wait_line(self, text: str) -> str:
        """The next stderr line containing ``text`` (waits for it)."""
        while True:
            line = self.lines.get(timeout=PROCESS_WAIT)
            if text in line:
                return line

    def get(self, path: str) -> Any:
        """GET ``path`` from its admin endpoint, as JSON."""
        import urllib.request

        with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=PROCESS_WAIT) as reply:
            return json.loads(reply.read())

    def stop(self) -> None:
        """SIGTERM, and a kill if it does not exit in time."""
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=PROCESS_WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
