"""Tracing with OpenTelemetry: a span per request, the W3C trace context carried upstream.

A built-in filter, first in every route's chain when ``ProxyConfig.spec.tracing`` is set (and
absent otherwise: no cost at all). As in Aeraki's MetaProtocol proxy:

* the span is named ``<ingress|egress> <operation>`` (the request's operation name);
* the trace context comes from the request's ``traceparent`` / ``tracestate`` attributes
  (case-insensitive, W3C Trace Context); the child context goes upstream as a
  ``traceparent`` mutation, so it works for every codec that carries mutations (Dubbo
  attachments, THeader headers, ...); ``tracestate`` travels upstream untouched;
* sampling is Aeraki's ``random_sampling`` percentage for requests that start a trace; a
  request with a valid ``traceparent`` follows its sampled flag, so a trace is kept or dropped
  whole along the chain of proxies.

Unsampled requests never touch OpenTelemetry: with an incoming context they cost a parse, and
without one the filter writes a fresh unsampled ``traceparent`` (so the proxies after this one
make the same decision). Spans leave through a :class:`CountedSpanProcessor` (bounded queue,
export in its own thread: never on the event loop) to an OTLP/gRPC collector, and each is
counted as exported or dropped, by reason, in ``metaprotocol_tracing_spans_total{result}``.

Needs the ``tracing`` extra (``opentelemetry-sdk``, ``opentelemetry-exporter-otlp-proto-grpc``);
this module is imported only when tracing is configured.
"""

from __future__ import annotations

import random
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from metaprotocol_sdk.enums import MessageType, ResponseStatus
from metaprotocol_sdk.errors import ConfigError
from metaprotocol_sdk.filters import Filter, RequestContext, ResponseContext
from metaprotocol_sdk.metadata import Attributes

from .config.models import Tracing
from .stats import Counter

try:
    from opentelemetry.context import Context
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON
    from opentelemetry.trace import (
        NonRecordingSpan,
        Span,
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
        Tracer,
        TraceState,
        set_span_in_context,
    )
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ConfigError(
        "spec.tracing needs OpenTelemetry: pip install 'metaprotocol-sdk[tracing]'"
    ) from exc

if TYPE_CHECKING:
    from .engine import Engine

__all__ = [
    "TracingFilter",
    "exporter_factory",
    "parse_traceparent",
    "parse_tracestate",
    "shutdown",
    "tracing_filter",
]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: The longest ``tracestate`` read into a span (W3C: 32 members; 512 characters is the size
#: every vendor must propagate). A longer one still goes upstream untouched, as bytes.
MAX_TRACESTATE = 512
#: The most of a request's operation name that goes into its span's name: an ended span waits
#: in the exporter's queue, outside the engine's buffer budget, and the name comes from the
#: client (a method name may be as long as a frame).
MAX_OPERATION = 256
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
#: A ``tracestate`` list member (W3C grammar, as OpenTelemetry checks it).
_MEMBER = re.compile(
    r"([a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
    r"=([\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e])"
)
#: Where the span waits for the answer, in the request's ``values``.
_SPAN = "metaprotocol.tracing.span"
#: An empty context: a new trace never picks up whatever span the event loop's context holds.
_ROOT = Context()


def parse_traceparent(value: str) -> tuple[int, int, int] | None:
    """``(trace id, parent span id, flags)`` of a W3C ``traceparent``; ``None`` if invalid.

    Version ``00`` is exactly 55 characters; a later version may append ``-...`` (ignored);
    version ``ff`` and all-zero ids are invalid. Reads at most the first 56 characters.
    """
    if len(value) < 55 or (len(value) > 55 and value[55] != "-"):
        return None
    match = _TRACEPARENT.fullmatch(value, 0, 55)
    if match is None:
        return None
    version, trace, span, flags = match.groups()
    if version == "ff" or (version == "00" and len(value) != 55):
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, int(flags, 16)


def parse_tracestate(value: str) -> TraceState | None:
    """The ``tracestate`` members, or ``None`` when the value is too long or not valid W3C
    (checked here, quietly: OpenTelemetry's own parser logs a warning per bad value, which a
    hostile client could turn into a flood of log lines)."""
    if len(value) > MAX_TRACESTATE:
        return None
    pairs: dict[str, str] = {}
    for member in value.split(","):
        member = member.strip(" \t")
        if not member:
            continue
        match = _MEMBER.fullmatch(member)
        if match is None or match[1] in pairs or len(pairs) == 32:
            return None
        pairs[match[1]] = match[2]
    return TraceState(list(pairs.items()))


def _key(attributes: Attributes, folded: str) -> str:
    """The request's own spelling of a key, so a mutation replaces it instead of adding a
    second one that differs only in case."""
    item = attributes.folded_items.get(folded)
    return folded if item is None else item[0]


class TracingFilter(Filter):
    """Starts a span per request, carries its context upstream, ends it with the answer."""

    name = "tracing"

    def __init__(
        self,
        tracer: Tracer,
        settings: Tracing,
        rand: Callable[[], float] = random.random,
        bits: Callable[[int], int] = random.getrandbits,
    ) -> None:
        self.tracer = tracer
        self.percent = settings.random_sampling
        self.operation = settings.operation
        self.kind = SpanKind.CLIENT if settings.operation == "egress" else SpanKind.SERVER
        self._rand = rand
        self._bits = bits

    def on_request(self, context: RequestContext) -> None:
        request = context.request
        attributes = request.attributes
        raw = attributes.folded_items.get(TRACEPARENT)
        parent = None if raw is None else parse_traceparent(raw[1])
        if parent is not None:
            sampled = bool(parent[2] & 1)
        else:
            sampled = self.percent > 0 and self._rand() * 100 < self.percent
        if not sampled:
            if parent is None:  # decide for the proxies after this one too
                trace_id = self._bits(128) or 1
                span_id = self._bits(64) or 1
                context.add_mutation(
                    _key(attributes, TRACEPARENT), f"00-{trace_id:032x}-{span_id:016x}-00"
                )
            return None
        if parent is None:
            parent_context = _ROOT
        else:
            state = attributes.get_folded(TRACESTATE)
            remote = SpanContext(
                parent[0],
                parent[1],
                is_remote=True,
                trace_flags=TraceFlags(parent[2]),
                trace_state=parse_tracestate(state) if state else None,
            )
            parent_context = set_span_in_context(NonRecordingSpan(remote), _ROOT)
        operation = request.operation_name[:MAX_OPERATION]
        # The attributes are set once, at the end: each call validates every value again.
        span = self.tracer.start_span(
            f"{self.operation} {operation}" if operation else self.operation,
            parent_context,
            self.kind,
        )
        mine = span.get_span_context()
        context.add_mutation(
            _key(attributes, TRACEPARENT), f"00-{mine.trace_id:032x}-{mine.span_id:016x}-01"
        )
        if request.message_type is MessageType.Oneway:  # no answer will come to end it
            span.set_attributes(
                {
                    "metaprotocol.listener": context.listener,
                    "metaprotocol.route": context.route,
                    "metaprotocol.oneway": True,
                    "request_size": request.header_size + request.body_size,
                }
            )
            span.end()
            return None
        # A new dict: a codec may share one ``values`` between the messages it decodes.
        request.values = {**(request.values or {}), _SPAN: span}
        return None

    def on_response(self, context: ResponseContext) -> None:
        values = context.request.values
        span: Span | None = values.pop(_SPAN, None) if values else None
        if span is None:
            return
        request = context.request
        attributes: dict[str, Any] = {
            "metaprotocol.listener": context.listener,
            "metaprotocol.route": context.route,
            "request_size": request.header_size + request.body_size,
            "metaprotocol.status": context.status.name,
            "upstream_cluster": context.destination,
            "upstream_address": context.upstream,
        }
        error = context.local_error
        if error is not None:
            attributes["error.type"] = error.name
        if error is not None or context.status is ResponseStatus.Error:
            attributes["error"] = True
            span.set_status(Status(StatusCode.ERROR, error.name if error else "Error"))
        span.set_attributes(attributes)
        span.end()


#: Spans in one export call (OpenTelemetry's ``BatchSpanProcessor`` default), and the longest
#: wait before a partial batch goes.
BATCH_SPANS = 512
BATCH_DELAY = 5.0
#: Longest wait for the spans still queued when the engine stops (the engine waits
#: ``engine.TRACING_FLUSH``: this leaves it time to cancel the export under way and count it).
SHUTDOWN_WAIT = 1.5
CUT_WAIT = 0.3
#: A failed export that lasted at least this share of the exporter's timeout timed out.
TIMED_OUT = 0.9
#: The outcomes of an ended span in ``metaprotocol_tracing_spans_total{result}``.
RESULTS = ("exported", "queue_full", "export_failed", "timeout", "shutdown")
SPANS_TOTAL = "metaprotocol_tracing_spans_total"


class CountedSpanProcessor(SpanProcessor):
    """Exports ended spans in batches from a thread of its own, and counts what becomes of
    each: exported, or dropped because the queue was full, the export failed or timed out,
    or the engine stopped first.

    OpenTelemetry's ``BatchSpanProcessor`` drops silently (one log line now and then) and
    ignores the exporter's result. This one keeps its bounded queue (``maxQueueSize``) and
    its thread (the event loop never waits on the collector), and counts every span in
    ``counters[result]`` (:data:`RESULTS`). A failed export whose call lasted the exporter's
    whole ``timeout`` is a ``timeout``; one that failed sooner (the collector answered an
    error, or refused the connection) is ``export_failed``.
    """

    def __init__(
        self,
        exporter: SpanExporter,
        counters: dict[str, Counter],
        max_queue: int,
        timeout: float,
        batch: int = BATCH_SPANS,
        delay: float = BATCH_DELAY,
    ) -> None:
        self.exporter = exporter
        self.counters = counters
        self.max_queue = max_queue
        self.timeout = timeout
        self.batch = min(batch, max_queue)
        self.delay = delay
        self._queue: deque[ReadableSpan] = deque()
        self._wake = threading.Event()
        self._export_lock = threading.Lock()  # one export at a time (thread, force_flush)
        self._count_lock = threading.Lock()  # the loop's thread and the exporter's count
        self._closed = False  # no more spans taken (the engine stops)
        self._cut = False  # the deadline of the shutdown passed: what is left is dropped
        self._thread = threading.Thread(
            target=self._run, name="metaprotocol-tracing-export", daemon=True
        )
        self._thread.start()

    def _count(self, result: str, n: int) -> None:
        with self._count_lock:
            self.counters[result].value += n

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Nothing: spans are taken when they end."""

    def on_end(self, span: ReadableSpan) -> None:
        """Queue the ended span, or count it dropped (queue full, engine stopped)."""
        queue = self._queue
        if self._closed:
            self._count("shutdown", 1)
        elif len(queue) >= self.max_queue:
            self._count("queue_full", 1)
        else:
            queue.append(span)
            if len(queue) >= self.batch and not self._wake.is_set():
                self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.delay)
            self._wake.clear()
            self._export(everything=False)
        self._export(everything=True)  # the engine stops: what is queued, until the deadline

    def _export(self, everything: bool) -> None:
        """Export a batch (with ``everything``, until the queue is empty), counting each
        span; once the shutdown's deadline has passed, count the rest as dropped."""
        with self._export_lock:
            queue = self._queue
            while queue:
                if self._cut:
                    rest = len(queue)
                    queue.clear()
                    self._count("shutdown", rest)
                    return
                batch = [queue.popleft() for _ in range(min(self.batch, len(queue)))]
                start = time.monotonic()
                try:
                    ok = self.exporter.export(batch) is SpanExportResult.SUCCESS
                except Exception:  # an exporter's bug: the batch is lost, not the thread
                    ok = False
                if ok:
                    result = "exported"
                elif self._cut:
                    result = "shutdown"  # cancelled at the shutdown's deadline
                elif time.monotonic() - start >= self.timeout * TIMED_OUT:
                    result = "timeout"
                else:
                    result = "export_failed"
                self._count(result, len(batch))
                if not everything and len(queue) < self.batch:
                    return

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export every queued span now (blocking; the exporter bounds each call)."""
        if self._closed:
            return False
        self._export(everything=True)
        return True

    def shutdown(self, timeout: float = SHUTDOWN_WAIT) -> None:
        """Export what is queued for at most ``timeout`` seconds; then cancel the export
        under way and count what is left as dropped (``shutdown``), as every span that ends
        later. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join(timeout)
        self._cut = self._thread.is_alive()
        self.exporter.shutdown()  # closes the channel: an export under way ends now
        self._thread.join(CUT_WAIT)  # it counts that batch and the rest before it ends


def _otlp_exporter(settings: Tracing) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(
        endpoint=settings.endpoint, insecure=True, timeout=settings.export_timeout
    )


#: Builds the span exporter of an engine (replace it to export elsewhere, e.g. in benchmarks).
exporter_factory: Callable[[Tracing], SpanExporter] = _otlp_exporter

_FILTERS: weakref.WeakKeyDictionary[Engine, tuple[TracingFilter, TracerProvider]] = (
    weakref.WeakKeyDictionary()
)


def tracing_filter(engine: Engine) -> TracingFilter:
    """The engine's tracing filter (one per engine, with its own tracer provider)."""
    found = _FILTERS.get(engine)
    if found is None:
        settings = engine.config.proxy.tracing
        assert settings is not None
        provider = TracerProvider(
            sampler=ALWAYS_ON,  # the filter has decided already
            resource=Resource.create({"service.name": settings.service_name}),
            shutdown_on_exit=True,
        )
        counters = {r: engine.stats.counter(SPANS_TOTAL, result=r) for r in RESULTS}
        processor = CountedSpanProcessor(
            exporter_factory(settings), counters, settings.max_queue_size, settings.export_timeout
        )
        provider.add_span_processor(processor)
        tracer = provider.get_tracer("metaprotocol_sdk.proxy")
        found = _FILTERS[engine] = (TracingFilter(tracer, settings), provider)
    return found[0]


def provider_of(engine: Engine) -> TracerProvider | None:
    """The engine's tracer provider (``None`` without tracing)."""
    found = _FILTERS.get(engine)
    return None if found is None else found[1]


def shutdown(engine: Engine) -> None:
    """Export what is queued and stop the exporter thread (blocking: call off the loop)."""
    found = _FILTERS.pop(engine, None)
    if found is not None:
        found[1].shutdown()
