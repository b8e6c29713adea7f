"""An OTLP/gRPC trace receiver for the tests, on opentelemetry-proto's service definitions.

No real collector is available here; this one implements ``TraceService.Export`` from the
official ``opentelemetry-proto`` package with ``grpcio`` on 127.0.0.1, so the engine's spans go
through the real OTLP exporter, gRPC and protobuf encoding.
"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass
class ReceivedSpan:
    """One span as the collector decoded it."""

    service: str
    name: str
    trace_id: int
    span_id: int
    parent_span_id: int  # 0 for a root span
    kind: int
    attributes: dict[str, Any] = field(default_factory=dict)
    status_code: int = 0


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Receives spans; ``address`` is ``127.0.0.1:port``.

    A hostile one: ``mode="hang"`` holds every call until :meth:`stop` (never answers),
    ``"error"`` answers each with ``INVALID_ARGUMENT``, ``"gate"`` holds each call until
    ``gate`` is set, then takes its spans (a slow collector). ``called`` is set at the
    first call.
    """

    def __init__(self, mode: str = "ok") -> None:
        self.spans: list[ReceivedSpan] = []
        self.exports = 0
        self.mode = mode
        self.called = threading.Event()
        self.gate = threading.Event()
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        self.server.start()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.called.set()
        if self.mode == "error":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refused by the test")
        if self.mode in ("hang", "gate"):
            self.gate.wait(60)
            if self.mode == "hang":
                context.abort(grpc.StatusCode.UNAVAILABLE, "stopped")
        received = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    received.append(
                        ReceivedSpan(
                            service=str(resource.get("service.name", "")),
                            name=s.name,
                            trace_id=int.from_bytes(s.trace_id, "big"),
                            span_id=int.from_bytes(s.span_id, "big"),
                            parent_span_id=int.from_bytes(s.parent_span_id, "big"),
                            kind=s.kind,
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            status_code=s.status.code,
                        )
                    )
        with self._lock:
            self.spans.extend(received)
            self.exports += 1
        return trace_service_pb2.ExportTraceServiceResponse()

    def stop(self) -> None:
        self.gate.set()
        self.server.stop(grace=None).wait(5)
