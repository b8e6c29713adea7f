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
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
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


@dataclass
class ReceivedLog:
    """One log record as the collector decoded it."""

    resource: dict[str, Any]
    scope: str
    time_unix_nano: int
    severity: int
    body: Any
    attributes: dict[str, Any] = field(default_factory=dict)


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


class _Logs(logs_service_pb2_grpc.LogsServiceServicer):
    """OTLP's ``LogsService.Export``, behaving as the collector's ``mode`` says."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def Export(
        self, request: logs_service_pb2.ExportLogsServiceRequest, context: Any
    ) -> logs_service_pb2.ExportLogsServiceResponse:
        collector = self.collector
        collector.hold(context)
        received = []
        for rl in request.resource_logs:
            resource = {a.key: _value(a.value) for a in rl.resource.attributes}
            for sl in rl.scope_logs:
                for r in sl.log_records:
                    received.append(
                        ReceivedLog(
                            resource=resource,
                            scope=sl.scope.name,
                            time_unix_nano=r.time_unix_nano,
                            severity=r.severity_number,
                            body=_value(r.body),
                            attributes={a.key: _value(a.value) for a in r.attributes},
                        )
                    )
        response = logs_service_pb2.ExportLogsServiceResponse()
        rejected = min(collector.reject_records, len(received))
        if rejected:
            response.partial_success.rejected_log_records = rejected
            response.partial_success.error_message = "rejected by the test"
        with collector._lock:
            collector.logs.extend(received[rejected:])
            collector.log_exports += 1
        return response


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
        #: Access log records (OTLP logs) received, exports of them, and how many records
        #: of each export to reject (``partial_success``).
        self.logs: list[ReceivedLog] = []
        self.log_exports = 0
        self.reject_records = 0
        self.mode = mode
        self.called = threading.Event()
        self.gate = threading.Event()
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_Logs(self), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        self.server.start()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.hold(context)
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

    def hold(self, context: Any) -> None:
        """What every export meets first, as :attr:`mode` says."""
        self.called.set()
        if self.mode == "error":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refused by the test")
        if self.mode in ("hang", "gate"):
            self.gate.wait(60)
            if self.mode == "hang":
                context.abort(grpc.StatusCode.UNAVAILABLE, "stopped")

    def stop(self) -> None:
        self.gate.set()
        self.server.stop(grace=None).wait(5)
