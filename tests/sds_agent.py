"""istio-agent's SDS server, as the tests play it, on grpcio and Envoy's official protos.

No istio-agent can run here (it needs istiod's CA), so this serves what its SDS server
(``security/pkg/nodeagent/sds``) serves on its Unix socket: the secret ``default`` (a
``TlsCertificate`` of the workload certificate chain and key, inline bytes) and ``ROOTCA``
(a ``CertificateValidationContext`` of the mesh root as ``trusted_ca``), all the names a
request asks for in one response (version ``<RFC 3339 time>/<n>``, a new nonce), nothing in
answer to an ACK or a NACK, and one secret pushed on every stream that asked for it when it
rotates (:meth:`SdsAgent.push`). Every request is recorded, so a test sees ACKs (the version
and nonce echoed) and NACKs (``error_detail``). Envoy reads the same server
(``tests/xds/test_sds_envoy.py``), which shows its secrets are valid SDS.
"""

from __future__ import annotations

import datetime
import itertools
import queue
import threading
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def certificate_secret(name: str, chain: bytes, key: bytes) -> secret_pb2.Secret:
    """istio-agent's workload secret (``toEnvoySecret``): chain and key as inline bytes."""
    secret = secret_pb2.Secret(name=name)
    secret.tls_certificate.certificate_chain.inline_bytes = chain
    secret.tls_certificate.private_key.inline_bytes = key
    return secret


def root_secret(name: str, root: bytes) -> secret_pb2.Secret:
    """istio-agent's root secret: the mesh root as ``trusted_ca``, inline bytes."""
    secret = secret_pb2.Secret(name=name)
    secret.validation_context.trusted_ca.inline_bytes = root
    return secret


@dataclass
class Request:
    """A request received: its stream, version, nonce, names and NACK message."""

    stream: int
    version: str
    nonce: str
    names: tuple[str, ...]
    error: str | None
    node_id: str


#: Put on a stream's queue: the stream is reset (see :meth:`SdsAgent.drop_streams`).
_RESET: Any = object()


class _Stream:
    def __init__(self, ident: int) -> None:
        self.ident = ident
        self.names: tuple[str, ...] = ()
        self.out: queue.Queue[discovery_pb2.DiscoveryResponse | None] = queue.Queue()


class SdsAgent(sds_pb2_grpc.SecretDiscoveryServiceServicer):
    """An SDS server on ``unix:<path>`` (or TCP) serving the secrets it holds
    (:attr:`secrets`)."""

    def __init__(self, path: str) -> None:
        """``path``: of the Unix socket, or ``127.0.0.1:0`` (TCP, :attr:`address` once
        started)."""
        self.address = path if path.startswith("127.0.0.1:") else f"unix:{path}"
        self.secrets: dict[str, Any] = {}
        self.requests: list[Request] = []
        self._streams: dict[int, _Stream] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._versions = itertools.count(1)
        self._changed = threading.Condition(self._lock)
        #: Responses sent, in order: (stream, version, names).
        self.sent: list[tuple[int, str, tuple[str, ...]]] = []
        self._server: grpc.Server | None = None

    def start(self) -> SdsAgent:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(self, server)
        port = server.add_insecure_port(self.address)
        if not self.address.startswith("unix:"):
            self.address = f"127.0.0.1:{port}"
        server.start()
        self._server = server
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None

    def set(self, *secrets: Any) -> None:
        """Hold ``secrets`` (replacing those of the same names), pushing nothing."""
        with self._lock:
            for secret in secrets:
                self.secrets[secret.name] = secret

    def push(self, *secrets: Any, raw: list[any_pb2.Any] | None = None) -> None:
        """Hold ``secrets`` and send each to every stream that asked for it, one response
        per secret as istio-agent does at a rotation (``raw``: these resources, as they are,
        in one response to every stream)."""
        with self._lock:
            for secret in secrets:
                self.secrets[secret.name] = secret
            for stream in self._streams.values():
                for secret in secrets:
                    if secret.name in stream.names:
                        stream.out.put(self._response(stream, [secret]))
                if raw is not None:
                    stream.out.put(self._response(stream, [], raw))

    def drop_streams(self, error: bool = False) -> None:
        """End every open stream (istio-agent restarting): closed, or reset with
        ``UNAVAILABLE`` (``error``: as a client sees a server that went away)."""
        with self._lock:
            for stream in self._streams.values():
                stream.out.put(_RESET if error else None)

    def wait(self, predicate: Any, timeout: float = 10.0) -> None:
        """Wait until ``predicate(self.requests)`` holds."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self.requests), timeout):
                raise TimeoutError(f"SDS agent: condition not met; requests: {self.requests}")

    @property
    def streams(self) -> int:
        with self._lock:
            return len(self._streams)

    def _response(
        self, stream: _Stream, secrets: list[Any], raw: list[any_pb2.Any] | None = None
    ) -> discovery_pb2.DiscoveryResponse:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        version = f"{now}/{next(self._versions)}"
        response = discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=SECRET_TYPE, nonce=str(uuid.uuid4())
        )
        for secret in secrets:
            packed = response.resources.add()
            packed.Pack(secret)
        for packed in raw or ():
            response.resources.add().CopyFrom(packed)
        self.sent.append((stream.ident, version, tuple(s.name for s in secrets)))
        return response

    def StreamSecrets(
        self, request_iterator: Iterator[discovery_pb2.DiscoveryRequest], context: Any
    ) -> Iterator[discovery_pb2.DiscoveryResponse]:
        stream = _Stream(next(self._ids))
        with self._lock:
            self._streams[stream.ident] = stream

        def read() -> None:
            try:
                for req in request_iterator:
                    self._received(stream, req)
            except grpc.RpcError:
                pass
            stream.out.put(None)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            while True:
                response = stream.out.get()
                if response is _RESET:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "the agent went away")
                if response is None or not context.is_active():
                    return
                yield response
        finally:
            with self._lock:
                self._streams.pop(stream.ident, None)

    def _received(self, stream: _Stream, req: discovery_pb2.DiscoveryRequest) -> None:
        with self._changed:
            error = req.error_detail.message if req.HasField("error_detail") else None
            self.requests.append(
                Request(
                    stream.ident,
                    req.version_info,
                    req.response_nonce,
                    tuple(req.resource_names),
                    error,
                    req.node.id,
                )
            )
            self._changed.notify_all()
            first = not stream.names
            names = tuple(req.resource_names)
            # istio-agent answers a new stream, and a request naming other secrets; an ACK or
            # a NACK (the same names, a nonce) gets nothing.
            if first or set(names) != set(stream.names):
                stream.names = names
                held = [self.secrets[n] for n in names if n in self.secrets]
                stream.out.put(self._response(stream, held))
