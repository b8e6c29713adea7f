"""A test Rate Limit Service: Envoy's RLS API (the official ``rls_pb2_grpc`` servicer) on
grpcio, counting in a real ``redis-server`` the way envoyproxy/ratelimit does.

envoyproxy/ratelimit (Go) cannot be installed here, so this is ours. Counting follows its
fixed window: per descriptor, ``INCRBY <domain>_<key>_<value>_<window start> <hits>`` and
``EXPIRE`` for the window's length, then ``OVER_LIMIT`` once a count passes the descriptor's
limit (``overall_code`` is ``OVER_LIMIT`` when any descriptor is). Windows start when the
service starts (not at Unix-time multiples) so a test never straddles a window boundary.

Modes for the failure tests: ``hang`` (never answers; the call's cancellation is recorded),
``error`` (a gRPC ``INTERNAL`` error), ``huge`` (a reply of 1 MiB).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

WAIT = 5.0
#: No persistence: a test server keeps nothing on disk.
REDIS_ARGS = ("--save", "", "--appendonly", "no")


class Redis:
    """A ``redis-server`` on a random loopback port, without persistence."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.dir = tempfile.mkdtemp(prefix="rls-redis-")
        for _ in range(3):  # a port picked free may be taken before redis binds it
            self.port = _free_port()
            self.proc = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    self.dir,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + WAIT
            while self.proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError), Resp(self.port) as r:
                    if r.call("PING") == "PONG":
                        return
                time.sleep(0.02)
            self.stop()
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Resp:
    """The few commands of the Redis protocol (RESP2) the service needs, over one socket."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.file = self.sock.makefile("rb")

    def __enter__(self) -> Resp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        self.sock.close()

    def pipeline(self, *commands: tuple[str, ...]) -> list[Any]:
        out = bytearray()
        for command in commands:
            out += b"*%d\r\n" % len(command)
            for arg in command:
                data = arg.encode()
                out += b"$%d\r\n%s\r\n" % (len(data), data)
        self.sock.sendall(out)
        return [self._read() for _ in commands]

    def call(self, *command: str) -> Any:
        return self.pipeline(command)[0]

    def _read(self) -> Any:
        line = self.file.readline().rstrip(b"\r\n")
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b":":
            return int(rest)
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.file.read(n + 2)[:-2].decode()
        raise RuntimeError(f"unexpected reply {line!r}")


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):
    """``ShouldRateLimit`` with fixed-window counters in Redis.

    ``limits`` maps a descriptor entry ``(key, value)`` (value ``None``: any value) to the
    requests allowed per window of ``unit`` seconds.
    """

    def __init__(self, redis_port: int, limits: dict[tuple[str, str | None], int]) -> None:
        self.redis_port = redis_port
        self.limits = limits
        self.unit = 3600
        self.started = time.time()
        self.mode = "count"
        self.calls = 0
        self.cancelled = 0
        self.requests: list[rls_pb2.RateLimitRequest] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._server: grpc.Server | None = None
        self.port = 0

    def start(self, workers: int = 32) -> RateLimitService:
        self._server = grpc.server(futures.ThreadPoolExecutor(workers))
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(WAIT)

    def _redis(self) -> Resp:
        conn: Resp | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = Resp(self.redis_port)
        return conn

    def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        with self._lock:
            self.calls += 1
            self.requests.append(request)
        if self.mode == "hang":
            gone = threading.Event()
            context.add_callback(gone.set)
            gone.wait(30)
            with self._lock:
                self.cancelled += 1
            context.abort(grpc.StatusCode.CANCELLED, "gone")
        if self.mode == "error":
            context.abort(grpc.StatusCode.INTERNAL, "broken rate limit service")
        if self.mode == "huge":
            return rls_pb2.RateLimitResponse(overall_code=1, raw_body=bytes(1 << 20))
        code = rls_pb2.RateLimitResponse.Code
        window = int((time.time() - self.started) // self.unit)
        hits = request.hits_addend or 1
        overall = code.OK
        statuses = []
        for descriptor in request.descriptors:
            entries = [(e.key, e.value) for e in descriptor.entries]
            limit = None
            for key, value in entries:
                limit = self.limits.get((key, value), self.limits.get((key, None), limit))
            if limit is None:
                statuses.append(rls_pb2.RateLimitResponse.DescriptorStatus(code=code.OK))
                continue
            name = "_".join([request.domain, *(f"{k}_{v}" for k, v in entries), str(window)])
            count, _ = self._redis().pipeline(
                ("INCRBY", name, str(hits)), ("EXPIRE", name, str(self.unit))
            )
            over = count > limit
            statuses.append(
                rls_pb2.RateLimitResponse.DescriptorStatus(
                    code=code.OVER_LIMIT if over else code.OK,
                    limit_remaining=max(0, limit - count),
                )
            )
            if over:
                overall = code.OVER_LIMIT
        return rls_pb2.RateLimitResponse(overall_code=overall, statuses=statuses)


@contextlib.contextmanager
def rate_limit_service(
    redis: Redis, limits: dict[tuple[str, str | None], int]
) -> Iterator[RateLimitService]:
    """A started service on a random loopback port, stopped on exit."""
    service = RateLimitService(redis.port, limits).start()
    try:
        yield service
    finally:
        service.stop()


class GarbageService:
    """A gRPC server whose ``ShouldRateLimit`` answers bytes that are no protobuf message."""

    def __init__(self) -> None:
        handler = grpc.method_handlers_generic_handler(
            "envoy.service.ratelimit.v3.RateLimitService",
            {
                "ShouldRateLimit": grpc.unary_unary_rpc_method_handler(
                    lambda request, context: b"\xff\xff\xff\xff\x0f garbage",
                    request_deserializer=None,
                    response_serializer=None,
                )
            },
        )
        self._server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[handler])
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def stop(self) -> None:
        self._server.stop(grace=None).wait(WAIT)
