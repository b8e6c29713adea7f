"""A real thriftpy2 server for the ``Hello`` service, tagged with a version.

Run as a process (what the demo does)::

    python -m metaprotocol_sdk.demo.thrift_server v1 [--transport framed|buffered]
        [--protocol binary|compact]

It binds 127.0.0.1 on an ephemeral port, prints ``READY <port>`` and serves until its stdin
closes (so it never outlives a parent that died without cleaning up). Tests can also run it in
a thread with :class:`HelloServer`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import threading
import time
from typing import Any

from .idl import hello, untyped


class HelloHandler:
    """The service implementation: every answer says which version served it."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.requests = 0
        self.events: list[str] = []
        self._notified = threading.Condition()
        #: Set when a ``sleep`` call starts (tests act on a request in flight with it).
        self.sleeping = threading.Event()

    def sayHello(self, name: str) -> str:
        self.requests += 1
        return f"{self.version}: hello {name}"

    def ping(self) -> str:
        self.requests += 1
        return f"{self.version}: pong"

    def sleep(self, ms: int) -> str:
        self.requests += 1
        self.sleeping.set()
        time.sleep(ms / 1000)
        return f"{self.version}: slept {ms}"

    def headers(self) -> str:
        self.requests += 1
        return "{}"

    def notify(self, event: str) -> None:
        with self._notified:
            self.events.append(event)
            self._notified.notify_all()

    def notified(self) -> int:
        return len(self.events)

    def wait_events(self, count: int, timeout: float) -> bool:
        """Block until ``count`` oneway events arrived (tests use this, not sleeps)."""
        with self._notified:
            return self._notified.wait_for(lambda: len(self.events) >= count, timeout)

    def fail(self, message: str) -> str:
        raise hello().HelloError(message=f"{self.version}: {message}")


def _factories(transport: str, protocol: str) -> tuple[Any, Any]:
    tt, tp = untyped("thriftpy2.transport"), untyped("thriftpy2.protocol")
    framed = transport == "framed"
    trans = tt.TFramedTransportFactory() if framed else tt.TBufferedTransportFactory()
    proto = tp.TCompactProtocolFactory() if protocol == "compact" else tp.TBinaryProtocolFactory()
    return trans, proto


class HelloServer:
    """A threaded thriftpy2 server on 127.0.0.1 with an ephemeral port."""

    def __init__(
        self, version: str, *, transport: str = "framed", protocol: str = "binary"
    ) -> None:
        from thriftpy2.thrift import TProcessor

        self.handler = HelloHandler(version)
        self._processor = TProcessor(hello().Hello, self.handler)
        self._trans_factory, self._proto_factory = _factories(transport, protocol)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._clients: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name=f"thrift-{version}", daemon=True)

    def start(self) -> HelloServer:
        """Start accepting in a daemon thread."""
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._clients.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        sock = untyped("thriftpy2.transport").TSocket()
        sock.set_handle(conn)
        trans = self._trans_factory.get_transport(sock)
        proto = self._proto_factory.get_protocol(trans)
        try:
            while not self._closed:
                self._processor.process(proto, proto)
        except Exception:  # a closed or broken client ends its thread
            pass
        finally:
            with self._lock:
                self._clients.discard(conn)
            conn.close()

    def close(self) -> None:
        """Stop accepting and drop every client connection."""
        self._closed = True
        self._listener.close()
        with self._lock:
            clients = list(self._clients)
        for conn in clients:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def main(argv: list[str] | None = None) -> None:
    """Serve until stdin closes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version")
    parser.add_argument("--transport", choices=["framed", "buffered"], default="framed")
    parser.add_argument("--protocol", choices=["binary", "compact"], default="binary")
    args = parser.parse_args(argv)
    server = HelloServer(args.version, transport=args.transport, protocol=args.protocol).start()
    print(f"READY {server.port}", flush=True)
    for _ in sys.stdin:  # exit when the parent closes our stdin (or dies)
        pass
    server.close()
    os._exit(0)


if __name__ == "__main__":
    main()
