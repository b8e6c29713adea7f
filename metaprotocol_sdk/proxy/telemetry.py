"""Istio's standard metrics from the engine, with every label Kiali reads.

Aeraki's MetaProtocol proxy emits ``istio_requests_total`` and friends but leaves
``request_protocol``, ``response_flags``, ``connection_security_policy`` and
``source_principal`` unset and uses response codes ``0``/``1``; Kiali then drops those series
from its graph. Here every label has a value:

* the source side is this proxy's workload (``ProxyConfig.spec.telemetry.workload``, by
  default from the variables an Istio sidecar has: ``ISTIO_META_WORKLOAD_NAME``,
  ``POD_NAMESPACE``, ``ISTIO_META_CLUSTER_ID`` and the pod labels in ``ISTIO_METAJSON_LABELS``);
* the destination side comes from the ServiceEntry (host, namespace) and the labels of the
  endpoint that served the request (``app``, ``version``, the canonical-service labels);
* ``request_protocol`` is the ApplicationProtocol's name (``dubbo``); ``response_code`` maps
  the outcome to the HTTP code Kiali and Istio dashboards read (table :data:`RESPONSE_CODES`);
  ``response_flags`` uses Envoy's short flags (table :data:`RESPONSE_FLAGS`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from metaprotocol_sdk.enums import ErrorType, ResponseStatus

from .config.models import Workload
from .stats import (
    DURATION_BUCKETS_MS,
    SIZE_BUCKETS,
    Counter,
    Histogram,
    Stats,
    duration_slot,
    size_slot,
)

#: ``response_code`` by outcome: the reply's status, or the local reply's error type.
RESPONSE_CODES: dict[str, str] = {
    ResponseStatus.Ok.name: "200",
    ResponseStatus.Error.name: "500",
    ResponseStatus.Unknown.name: "200",
    ErrorType.RouteNotFound.name: "404",
    ErrorType.ClusterNotFound.name: "503",
    ErrorType.NoHealthyUpstream.name: "503",
    ErrorType.BadResponse.name: "502",
    ErrorType.Unspecified.name: "500",
    ErrorType.OverLimit.name: "429",
    ErrorType.Timeout.name: "504",
    ErrorType.UpstreamConnectFailure.name: "503",
    ErrorType.UpstreamReset.name: "503",
    ErrorType.BadRequest.name: "400",
    ErrorType.ShuttingDown.name: "503",
    ErrorType.PermissionDenied.name: "403",
    "DownstreamClosed": "0",
}

#: ``response_flags`` by outcome: Envoy's short names ("-" for none).
RESPONSE_FLAGS: dict[str, str] = {
    ErrorType.RouteNotFound.name: "NR",
    ErrorType.ClusterNotFound.name: "NC",
    ErrorType.NoHealthyUpstream.name: "UH",
    ErrorType.BadResponse.name: "UPE",
    ErrorType.Unspecified.name: "-",
    ErrorType.OverLimit.name: "UO",
    ErrorType.Timeout.name: "UT",
    ErrorType.UpstreamConnectFailure.name: "UF",
    ErrorType.UpstreamReset.name: "UR",
    ErrorType.BadRequest.name: "DPE",
    ErrorType.ShuttingDown.name: "LR",
    ErrorType.PermissionDenied.name: "-",  # (Envoy's RBAC filters set no flag)
    "DownstreamClosed": "DC",
    # Local replies of the built-in policies, by filter name:
    "local_rate_limit": "RL",
    "global_rate_limit": "RL",
    "fault.abort": "FI",
}


def workload_from_environment(env: Mapping[str, str] | None = None) -> Workload:
    """This proxy's workload as an Istio sidecar would see it (``unknown`` where unset)."""
    env = os.environ if env is None else env
    try:
        labels = json.loads(env.get("ISTIO_METAJSON_LABELS", "") or "{}")
    except ValueError:
        labels = {}
    if not isinstance(labels, dict):
        labels = {}
    name = env.get("ISTIO_META_WORKLOAD_NAME") or "unknown"
    app = str(labels.get("app") or "unknown")
    version = str(labels.get("version") or "unknown")
    return Workload(
        name=name,
        namespace=env.get("POD_NAMESPACE") or "unknown",
        app=app,
        version=version,
        canonical_service=str(
            labels.get("service.istio.io/canonical-name") or (app if app != "unknown" else name)
        ),
        canonical_revision=str(
            labels.get("service.istio.io/canonical-revision")
            or (version if version != "unknown" else "latest")
        ),
        cluster=env.get("ISTIO_META_CLUSTER_ID") or "Kubernetes",
        principal="unknown",
    )


class IstioSeries:
    """The series of one label set: the request counter and three histograms."""

    __slots__ = ("duration", "request_bytes", "requests", "response_bytes")

    def __init__(self, stats: Stats, labels: dict[str, str]) -> None:
        self.requests: Counter = stats.counter("istio_requests_total", **labels)
        self.duration: Histogram = stats.histogram(
            "istio_request_duration_milliseconds", DURATION_BUCKETS_MS, **labels
        )
        self.request_bytes = stats.histogram("istio_request_bytes", SIZE_BUCKETS, **labels)
        self.response_bytes = stats.histogram("istio_response_bytes", SIZE_BUCKETS, **labels)

    def record(self, duration_ms: float, request_bytes: int, response_bytes: int) -> None:
        """Count one request."""
        self.record_at(duration_slot(duration_ms), duration_ms, request_bytes, response_bytes)

    def record_at(
        self, slot: int, duration_ms: float, request_bytes: int, response_bytes: int
    ) -> None:
        """Count one request whose duration falls in bucket ``slot`` (the hot path computes
        it once for this and the engine's own duration histogram)."""
        self.requests.value += 1
        duration = self.duration
        duration.counts[slot] += 1
        duration.sum += duration_ms
        sizes = self.request_bytes
        sizes.counts[size_slot(request_bytes)] += 1
        sizes.sum += request_bytes
        sizes = self.response_bytes
        sizes.counts[size_slot(response_bytes)] += 1
        sizes.sum += response_bytes


class TcpSeries:
    """Istio's TCP series of one upstream endpoint: connections and bytes."""

    __slots__ = ("closed", "opened", "received", "sent")

    def __init__(self, stats: Stats, labels: dict[str, str]) -> None:
        self.opened = stats.counter("istio_tcp_connections_opened_total", **labels)
        self.closed = stats.counter("istio_tcp_connections_closed_total", **labels)
        self.sent = stats.counter("istio_tcp_sent_bytes_total", **labels)
        self.received = stats.counter("istio_tcp_received_bytes_total", **labels)


class IstioTelemetry:
    """Builds and caches the Istio series of an engine (one label set per destination
    endpoint, response code and flags)."""

    def __init__(self, stats: Stats, workload: Workload, reporter: str) -> None:
        self._stats = stats
        self._series: dict[tuple[object, ...], IstioSeries] = {}
        self._tcp: dict[tuple[object, ...], TcpSeries] = {}
        self._source = {
            "reporter": reporter,
            "source_workload": workload.name,
            "source_workload_namespace": workload.namespace,
            "source_principal": workload.principal,
            "source_app": workload.app,
            "source_version": workload.version,
            "source_canonical_service": workload.canonical_service,
            "source_canonical_revision": workload.canonical_revision,
            "source_cluster": workload.cluster,
        }

    def forget_series(self) -> None:
        """Forget the series found so far (after the stats dropped some of them)."""
        self._series.clear()
        self._tcp.clear()

    def series(
        self,
        protocol: str,
        service: str,
        namespace: str,
        endpoint: Mapping[str, str] | None,
        outcome: str,
        flags: str | None = None,
    ) -> IstioSeries:
        """The series for a request to ``service`` (``endpoint``: the serving endpoint's
        labels, ``None`` when no endpoint was chosen) that ended in ``outcome`` (a status or
        an error type name; ``flags`` overrides the flags the outcome maps to)."""
        flag = flags if flags is not None else RESPONSE_FLAGS.get(outcome, "-")
        labels_key = tuple(sorted(endpoint.items())) if endpoint else ()
        key = (protocol, service, namespace, labels_key, outcome, flag)
        found = self._series.get(key)
        if found is not None:
            return found
        found = self._series[key] = IstioSeries(
            self._stats,
            {
                **self._peers(service, namespace, endpoint),
                "request_protocol": protocol,
                "response_code": RESPONSE_CODES.get(outcome, "500"),
                "grpc_response_status": "",
                "response_flags": flag,
                "connection_security_policy": "none",
            },
        )
        return found

    def tcp(self, service: str, namespace: str, endpoint: Mapping[str, str]) -> TcpSeries:
        """The TCP series of upstream connections to an endpoint of ``service``."""
        key = (service, namespace, tuple(sorted(endpoint.items())))
        found = self._tcp.get(key)
        if found is None:
            found = self._tcp[key] = TcpSeries(
                self._stats,
                {
                    **self._peers(service, namespace, endpoint),
                    "request_protocol": "tcp",
                    "response_flags": "-",
                    "connection_security_policy": "none",
                },
            )
        return found

    def _peers(
        self, service: str, namespace: str, endpoint: Mapping[str, str] | None
    ) -> dict[str, str]:
        """The source and destination labels."""
        labels = endpoint or {}
        app = labels.get("app", "unknown")
        version = labels.get("version", "unknown")
        return {
            **self._source,
            "destination_workload": labels.get("workload", app),
            "destination_workload_namespace": namespace,
            "destination_principal": "unknown",
            "destination_app": app,
            "destination_version": version,
            "destination_service": service,
            "destination_service_name": service.split(".", 1)[0] or "unknown",
            "destination_service_namespace": namespace,
            "destination_canonical_service": labels.get("service.istio.io/canonical-name", app),
            "destination_canonical_revision": labels.get(
                "service.istio.io/canonical-revision",
                version if version != "unknown" else "latest",
            ),
            "destination_cluster": self._source["source_cluster"],
        }


class TargetTelemetry:
    """A route destination's Istio series, the common case (an ``Ok`` reply from a given
    endpoint) cached per endpoint."""

    __slots__ = ("_telemetry", "namespace", "ok", "protocol", "service")

    def __init__(
        self, telemetry: IstioTelemetry, protocol: str, service: str, namespace: str
    ) -> None:
        self._telemetry = telemetry
        self.protocol = protocol
        self.service = service
        self.namespace = namespace
        #: ``Ok`` series by endpoint (the hot path's lookup).
        self.ok: dict[object, IstioSeries] = {}

    def series(
        self,
        endpoint: object,
        labels: Mapping[str, str] | None,
        outcome: str,
        flags: str | None = None,
    ) -> IstioSeries:
        """The series for a request served by ``endpoint`` (its ``labels``; ``None`` when
        none was chosen) that ended in ``outcome``."""
        if outcome == "Ok" and flags is None:
            found = self.ok.get(endpoint)
            if found is None:
                found = self.ok[endpoint] = self._telemetry.series(
                    self.protocol, self.service, self.namespace, labels, outcome
                )
            return found
        return self._telemetry.series(
            self.protocol, self.service, self.namespace, labels, outcome, flags
        )
