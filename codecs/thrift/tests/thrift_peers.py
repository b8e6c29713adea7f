"""Real Thrift peers for the tests: thriftpy2 and Apache thrift servers and clients, and a
tiny loopback relay that forwards through OUR codec (decode + encode). Loopback only; every
socket operation is bounded by a timeout."""

from __future__ import annotations

import contextlib
import importlib
import queue
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import thriftpy2
from metaprotocol_thrift import ThriftCodec
from thriftpy2.protocol import (
    TBinaryProtocolFactory,
    TCompactProtocolFactory,
    TMultiplexedProtocolFactory,
)
from thriftpy2.rpc import make_client
from thriftpy2.thrift import TMultiplexedProcessor, TProcessor
from thriftpy2.transport import TBufferedTransportFactory, TFramedTransportFactory
from thriftpy2.transport import TSocket as TpSocket

from metaprotocol_sdk import LocalError, Metadata, NeedData, join_encoded

TIMEOUT = 10.0
HERE = Path(__file__).parent
IDL = HERE / "idl" / "calc.thrift"

calc_tp: Any = thriftpy2.load(str(IDL), module_name="calc_thrift")


def generate_apache(out_dir: Path) -> Any:
    """Generate Apache thrift Python code for the IDL with the installed compiler; import it."""
    compiler = shutil.which("thrift")
    if compiler is None:
        raise RuntimeError(
            "the Apache thrift compiler is missing: apt-get install thrift-compiler (0.17)"
        )
    subprocess.run(
        [compiler, "--gen", "py", "-out", str(out_dir), str(IDL)],
        check=True,
        timeout=60,
        capture_output=True,
    )
    sys.path.insert(0, str(out_dir))
    return importlib.import_module("calc_gen.Calculator"), importlib.import_module(
        "calc_gen.ttypes"
    )


class Handler:
    """The service implementation shared by every server."""

    def __init__(self, error_cls: Any) -> None:
        self.error_cls = error_cls
        self.events: queue.Queue[str] = queue.Queue()
        #: THeader servers: the info headers of every request, recorded while handling it
        #: (so before the reply is written and the client can go on).
        self.seen_headers: list[dict[bytes, bytes]] = []
        self.current = threading.local()

    def __getattribute__(self, name: str) -> Any:
        if name in {"add", "echo", "roundtrip", "divide", "notify", "ping"}:
            protocol = getattr(object.__getattribute__(self, "current"), "protocol", None)
            if protocol is not None:
                object.__getattribute__(self, "seen_headers").append(dict(protocol.get_headers()))
        return object.__getattribute__(self, name)

    def add(self, a: int, b: int) -> int:
        return a + b

    def echo(self, text: str) -> str:
        return text

    def roundtrip(self, item: Any) -> Any:
        return item

    def divide(self, a: int, b: int) -> int:
        if b == 0:
            raise self.error_cls(code=7, reason="division by zero")
        return a // b

    def notify(self, event: str) -> None:
        self.events.put(event)

    def ping(self) -> None:
        return None


# -- servers ---------------------------------------------------------------------------------


class Server:
    """Accepts on 127.0.0.1:0 and runs ``serve(conn)`` per connection in a thread."""

    def __init__(self, serve: Callable[[socket.socket], None]) -> None:
        self._serve = serve
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(TIMEOUT)
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self._serve(conn)
        except Exception as exc:  # the peer closed, or a real failure the test will see
            self.errors.append(exc)
        finally:
            conn.close()

    def close(self) -> None:
        _shut(self.sock)
        self.sock.close()
        for conn in self.conns:
            _shut(conn)
        self._thread.join(TIMEOUT)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def thriftpy2_server(kind: str, handler: Handler, multiplexed: str | None = None) -> Server:
    """A thriftpy2 server; ``kind`` is ``{binary,nonstrict,compact}-{buffered,framed}``."""
    proto_name, trans_name = kind.split("-")
    proto = _tp_proto(proto_name)
    trans = TFramedTransportFactory() if trans_name == "framed" else TBufferedTransportFactory()
    processor: Any = TProcessor(calc_tp.Calculator, handler)
    if multiplexed:
        mux = TMultiplexedProcessor()
        mux.register_processor(multiplexed, processor)
        processor = mux

    def serve(conn: socket.socket) -> None:
        transport = trans.get_transport(TpSocket(sock=conn))
        protocol = proto.get_protocol(transport)
        while True:
            processor.process(protocol, protocol)

    return Server(serve)


def _tp_proto(name: str) -> Any:
    if name == "compact":
        return TCompactProtocolFactory()
    if name == "nonstrict":
        return TBinaryProtocolFactory(strict_read=False, strict_write=False)
    return TBinaryProtocolFactory()


def thriftpy2_client(kind: str, port: int, multiplexed: str | None = None) -> Any:
    """A thriftpy2 client (same ``kind`` names as :func:`thriftpy2_server`)."""
    proto_name, trans_name = kind.split("-")
    proto = _tp_proto(proto_name)
    if multiplexed:
        proto = TMultiplexedProtocolFactory(proto, multiplexed)
    trans = TFramedTransportFactory() if trans_name == "framed" else TBufferedTransportFactory()
    return make_client(
        calc_tp.Calculator,
        "127.0.0.1",
        port,
        proto_factory=proto,
        trans_factory=trans,
        timeout=int(TIMEOUT * 1000),
    )


@dataclass
class Apache:
    """Apache thrift 0.25 pieces plus the generated ``calc_gen`` modules."""

    service: Any
    ttypes: Any

    def server(
        self,
        kind: str,
        handler: Handler,
        multiplexed: str | None = None,
    ) -> Server:
        """``kind``: ``{binary,compact}-{buffered,framed}`` or ``header-any`` (THeader server
        that also accepts framed/unframed binary and compact clients)."""
        from thrift.protocol import TMultiplexedProtocol as _  # noqa: F401 - import check
        from thrift.protocol.THeaderProtocol import THeaderProtocol
        from thrift.TMultiplexedProcessor import TMultiplexedProcessor as ApMux
        from thrift.transport import TSocket, TTransport
        from thrift.transport.THeaderTransport import THeaderClientType

        processor: Any = self.service.Processor(handler)
        if multiplexed:
            mux = ApMux()
            mux.registerProcessor(multiplexed, processor)
            processor = mux

        def serve(conn: socket.socket) -> None:
            sock = TSocket.TSocket()
            sock.setHandle(conn)
            if kind == "header-any":
                allowed = [
                    THeaderClientType.HEADERS,
                    THeaderClientType.FRAMED_BINARY,
                    THeaderClientType.UNFRAMED_BINARY,
                    THeaderClientType.FRAMED_COMPACT,
                    THeaderClientType.UNFRAMED_COMPACT,
                ]
                protocol: Any = THeaderProtocol(sock, allowed)
                handler.current.protocol = protocol
            else:
                protocol = self._protocol(kind, sock, TTransport)
            while True:
                processor.process(protocol, protocol)

        return Server(serve)

    @staticmethod
    def _protocol(kind: str, sock: Any, ttransport: Any) -> Any:
        from thrift.protocol.TBinaryProtocol import TBinaryProtocolAccelerated
        from thrift.protocol.TCompactProtocol import TCompactProtocolAccelerated

        proto_name, trans_name = kind.split("-")
        if trans_name == "framed":
            trans = ttransport.TFramedTransport(sock)
        else:
            trans = ttransport.TBufferedTransport(sock)
        if proto_name == "compact":
            return TCompactProtocolAccelerated(trans)
        return TBinaryProtocolAccelerated(trans)

    def client(self, kind: str, port: int, multiplexed: str | None = None) -> tuple[Any, Any]:
        """``(client, protocol)``; ``kind``: ``{binary,compact}-{buffered,framed}`` or
        ``header-{binary,compact}``."""
        from thrift.protocol.THeaderProtocol import THeaderProtocol
        from thrift.protocol.TMultiplexedProtocol import TMultiplexedProtocol
        from thrift.transport import TSocket, TTransport
        from thrift.transport.THeaderTransport import THeaderClientType, THeaderSubprotocolID

        sock = TSocket.TSocket("127.0.0.1", port)
        sock.setTimeout(TIMEOUT * 1000)
        if kind.startswith("header-"):
            sub = (
                THeaderSubprotocolID.COMPACT
                if kind.endswith("compact")
                else THeaderSubprotocolID.BINARY
            )
            protocol: Any = THeaderProtocol(sock, [THeaderClientType.HEADERS], sub)
            sock.open()
        else:
            protocol = self._protocol(kind, sock, TTransport)
            protocol.trans.open()
        outer = TMultiplexedProtocol(protocol, multiplexed) if multiplexed else protocol
        return self.service.Client(outer), protocol


# -- the relay -------------------------------------------------------------------------------


@dataclass
class Relay:
    """client -> relay -> server over loopback, forwarding every message through our codec.

    ``options`` configures the codecs; ``mutation``/``response_mutation`` are passed to
    ``encode``; ``rewrite_ids`` shifts request ids upstream and restores them downstream;
    ``reject(metadata)`` may return a ``LocalError``, and then the relay answers with
    ``on_error`` instead of forwarding.
    """

    upstream_port: int
    options: Mapping[str, Any] = field(default_factory=dict)
    mutation: Mapping[str, str] | None = None
    response_mutation: Mapping[str, str] | None = None
    rewrite_ids: bool = False
    reject: Callable[[Metadata], LocalError | None] | None = None
    requests: list[Metadata] = field(default_factory=list)
    responses: list[Metadata] = field(default_factory=list)
    codecs: list[ThriftCodec] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._ids: dict[int, int] = {}
        self._socks: list[socket.socket] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.sock.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=TIMEOUT)
            down.settimeout(TIMEOUT)
            self._socks += [down, up]
            lock = threading.Lock()
            requests = ThriftCodec.from_options(self.options)
            responses = ThriftCodec.from_options(self.options)
            self.codecs += [requests, responses]
            threading.Thread(
                target=self._pump, args=(down, up, requests, True, lock), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(up, down, responses, False, lock), daemon=True
            ).start()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        codec: ThriftCodec,
        is_request: bool,
        down_lock: threading.Lock,
    ) -> None:
        buffer = bytearray()
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    _shut(dst)
                    return
                buffer += data
                while True:
                    message = codec.decode(buffer)
                    if isinstance(message, NeedData):
                        break
                    self._forward(message, src, dst, codec, is_request, down_lock)
        except Exception as exc:
            self.errors.append(exc)
            _shut(src)
            _shut(dst)

    def _forward(
        self,
        message: Metadata,
        src: socket.socket,
        dst: socket.socket,
        codec: ThriftCodec,
        is_request: bool,
        down_lock: threading.Lock,
    ) -> None:
        if is_request:
            self.requests.append(message)
            error = self.reject(message) if self.reject else None
            if error is not None:
                with down_lock:
                    src.sendall(codec.on_error(message, error))
                return
            new_id = None
            if self.rewrite_ids:
                new_id = message.request_id + 1000
                self._ids[new_id] = message.request_id
            out = codec.encode(message, self.mutation, request_id=new_id)
            dst.sendall(join_encoded(out))
            return
        self.responses.append(message)
        original = self._ids.pop(message.request_id, None) if self.rewrite_ids else None
        out = codec.encode(message, self.response_mutation, request_id=original)
        with down_lock:
            dst.sendall(join_encoded(out))

    def close(self) -> None:
        _shut(self.sock)
        self.sock.close()
        for sock in self._socks:
            _shut(sock)
            sock.close()
        self._thread.join(TIMEOUT)


# -- pytest fixtures (imported by the test modules; no conftest, see __init__.py) -------------


@pytest.fixture(scope="session", name="apache")
def apache_fixture(tmp_path_factory: pytest.TempPathFactory) -> Apache:
    """Apache thrift with code generated by the installed compiler (never committed)."""
    try:
        service, ttypes = generate_apache(tmp_path_factory.mktemp("gen"))
    except Exception as exc:  # a missing peer is a failure, never a skip
        pytest.fail(f"Apache thrift peer unavailable: {exc}")
    return Apache(service, ttypes)


@pytest.fixture(name="closing")
def closing_fixture() -> Iterator[list[Any]]:
    """Things with ``close()`` to shut down after the test (servers, relays, clients)."""
    items: list[Any] = []
    yield items
    for item in reversed(items):
        with contextlib.suppress(Exception):
            item.close()
