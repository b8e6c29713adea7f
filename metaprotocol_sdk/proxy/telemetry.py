"""Istio's standard metrics from the engine, with every label Kiali reads.

Aeraki's MetaProtocol proxy emits ``istio_requests_total`` and friends but leaves
``request_protocol``, ``response_flags``, ``connection_security_policy`` and
``source_principal`` unset and uses response codes ``0``/``1``; Kiali then drops those series
from its graph. Here every label has a value:

* the source side is this proxy's workload (``ProxyConfig.spec.telemetry.workload``, by
  default from the variables an Istio sidecar has: ``ISTIO_META_WORKLOAD_NAME``,
  ``POD_NAMESPACE``, ``ISTIO_META_CLUSTER_ID`` and the pod labels in ``ISTIO_METAJSON_LABELS``);
* the destination side comes from the ServiceEntry (host, namespace) and, with ``reporter:
  source``, the workload the server said in Istio's metadata exchange (peer_exchange.py),
  else the labels of the endpoint that served the request (``app``, ``version``, the
  canonical-service labels); with ``reporter: destination`` the destination workload is this
  one, as an Istio inbound sidecar reports its own;
* ``request_protocol`` is the ApplicationProtocol's name (``dubbo``); ``response_code`` maps
  the outcome to the HTTP code Kiali and Istio dashboards read (table :data:`RESPONSE_CODES`);
  ``response_flags`` uses Envoy's short flags (table :data:`RESPONSE_FLAGS`);
* the TLS identities as Istio's stats filter reports them (istio/proxy ``istio_stats``):
  each connection's :class:`Identities`, found once when it is made (its handshake done),
  are one more part of the key of its series; nothing is computed per request.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from metaprotocol_sdk.enums import ErrorType, ResponseStatus

from .config.models import Workload

if TYPE_CHECKING:
    from .peer_exchange import PeerWorkload
from .stats import (
    DURATION_BUCKETS_MS,
    OVERFLOW,
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


def workload_from_environment(
    env: Mapping[str, str] | None = None, labels: Mapping[str, str] | None = None
) -> Workload:
    """This proxy's workload as an Istio sidecar would see it (``unknown`` where unset);
    ``labels``: the pod's, instead of ``ISTIO_METAJSON_LABELS``'."""
    env = os.environ if env is None else env
    if labels is None:
        labels, _ = environment_labels(env)
    name = bounded_label(env.get("ISTIO_META_WORKLOAD_NAME") or "unknown")
    app = bounded_label(str(labels.get("app") or "unknown"))
    version = bounded_label(str(labels.get("version") or "unknown"))
    return Workload(
        name=name,
        namespace=bounded_label(env.get("POD_NAMESPACE") or "unknown"),
        app=app,
        version=version,
        canonical_service=bounded_label(
            str(
                labels.get("service.istio.io/canonical-name") or (app if app != "unknown" else name)
            )
        ),
        canonical_revision=bounded_label(
            str(
                labels.get("service.istio.io/canonical-revision")
                or (version if version != "unknown" else "latest")
            )
        ),
        cluster=env.get("ISTIO_META_CLUSTER_ID") or "Kubernetes",
        principal="unknown",
        labels=dict(labels),
    )


def environment_labels(env: Mapping[str, str]) -> tuple[dict[str, str], str | None]:
    """The pod's labels of ``ISTIO_METAJSON_LABELS`` (a JSON object of strings), and why
    they are not known (``None``: they are, or the variable is not set); unreadable, none."""
    text = env.get("ISTIO_METAJSON_LABELS", "")
    if not text:
        return {}, None
    try:
        raw = json.loads(text)
    except ValueError as error:
        return {}, f"ISTIO_METAJSON_LABELS is not JSON ({str(error)[:80]})"
    except RecursionError:  # not a ValueError: "[[[...": a traceback at start before
        return {}, "ISTIO_METAJSON_LABELS is nested too deep"
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        return {}, "ISTIO_METAJSON_LABELS is not a JSON object of strings"
    return raw, None


#: The longest principal reported: a longer URI SAN counts as an identity past the bound.
MAX_PRINCIPAL = 255
#: The longest workload label value reported (``app``, ``version``, the canonical name and
#: revision, ``workload``; Kubernetes allows 63): a longer one is reported as ``overflow``.
MAX_LABEL_VALUE = 255


def bounded_label(value: str) -> str:
    """``value`` as the label of a series: itself, or ``overflow`` past
    :data:`MAX_LABEL_VALUE` characters. Every series of an endpoint repeats its labels, and
    every scrape each series: an endpoint labelled ``version`` with 1 MB of text (a 1 MB
    configuration file) made each ``/stats`` scrape 106 MB."""
    return value if len(value) <= MAX_LABEL_VALUE else OVERFLOW


def namespace_in(principal: str) -> str:
    """Istio's namespace of a principal: what follows its first ``/ns/``, up to the next
    ``/`` (``""``: none)."""
    at = principal.find("/ns/")
    if at < 0:
        return ""
    return principal[at + 4 :].split("/", 1)[0]


class Identities:
    """What a connection's TLS says, as Istio's stats filter reports it: the principal of
    the peer's certificate and of this side's (``""``: none), the peer's namespace (from its
    principal) and ``connection_security_policy``. Shared by every connection with the same
    ones (see :meth:`IstioTelemetry.identities`), so that it keys the series caches."""

    __slots__ = ("local", "namespace", "peer", "policy", "workload")

    def __init__(
        self, peer: str, local: str, policy: str, workload: PeerWorkload | None = None
    ) -> None:
        self.peer = peer
        self.local = local
        self.namespace = namespace_in(peer)
        self.policy = policy
        #: The peer's workload, as its Istio metadata exchange said (``None``: it said none).
        self.workload = workload


def _first(uris: Sequence[str], spiffe: bool) -> str:
    for uri in uris:
        if not spiffe or uri.startswith("spiffe://"):
            return uri
    return ""


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

    @classmethod
    def unlisted(cls) -> TcpSeries:
        """Counters in no registry: a connection's while its labels are not yet known
        (its server's workload, said by Istio's metadata exchange), moved by :meth:`take`."""
        series = cls.__new__(cls)
        for slot, name in (
            ("opened", "istio_tcp_connections_opened_total"),
            ("closed", "istio_tcp_connections_closed_total"),
            ("sent", "istio_tcp_sent_bytes_total"),
            ("received", "istio_tcp_received_bytes_total"),
        ):
            setattr(series, slot, Counter(name, ()))
        return series

    def take(self, other: TcpSeries) -> None:
        """Add what ``other`` (:meth:`unlisted`) counted."""
        self.opened.value += other.opened.value
        self.closed.value += other.closed.value
        self.sent.value += other.sent.value
        self.received.value += other.received.value


class IstioTelemetry:
    """Builds and caches the Istio series of an engine (one label set per destination
    endpoint, response code and flags)."""

    def __init__(self, stats: Stats, workload: Workload, reporter: str) -> None:
        self._stats = stats
        self._series: dict[tuple[object, ...], IstioSeries] = {}
        self._tcp: dict[tuple[object, ...], TcpSeries] = {}
        #: The engine is the server side (``reporter: destination``): the identities that
        #: matter are the clients' connections', else its upstream connections'.
        self.inbound = reporter == "destination"
        self._principal = workload.principal
        self._cluster = workload.cluster
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
        #: At the server side the destination workload is this one, as an Istio inbound
        #: sidecar reports its own node's (not the upstream endpoint's labels).
        self._local = {
            "destination_workload": workload.name,
            "destination_workload_namespace": workload.namespace,
            "destination_app": workload.app,
            "destination_version": workload.version,
            "destination_canonical_service": workload.canonical_service,
            "destination_canonical_revision": workload.canonical_revision,
        }
        #: Identities by (peer, local) principal, at most :attr:`max_identities` of them.
        self._identities: dict[tuple[str, str], Identities] = {}
        self.max_identities = max(1, stats.max_series // 4)
        #: Identities with the peer's workload (its metadata exchange), as many at most.
        self._workloads: dict[tuple[str, str, PeerWorkload], Identities] = {}
        #: Of a plain-text connection (and of a TLS one without URI SANs).
        self.plain = Identities("", "", "none" if self.inbound else "unknown")
        self._overflow: dict[str, Identities] = {}

    def forget_series(self) -> None:
        """Forget the series found so far (after the stats dropped some of them)."""
        self._series.clear()
        self._tcp.clear()

    def identities(self, peer_uris: Sequence[str], local_uris: Sequence[str]) -> Identities:
        """The shared :class:`Identities` of a TLS connection whose peer's certificate has
        ``peer_uris`` and its own ``local_uris``, as Istio reports them: the first
        ``spiffe://`` URI SAN of each (its ``istio_authn`` filter), or when neither has one
        the first URI SAN (its stats filter's fallback). At the server side the policy is
        ``mutual_tls`` when both exist, else ``none``; at the client side ``unknown``.

        Principals come from peers: past :attr:`max_identities` different pairs, or once
        the stats hold ``maxStatsSeries`` series, or for a principal longer than
        :data:`MAX_PRINCIPAL`, a new pair is reported as ``overflow`` (so a client with
        many certificates grows neither the series nor their caches)."""
        peer, local = _first(peer_uris, True), _first(local_uris, True)
        if not peer and not local:
            peer, local = _first(peer_uris, False), _first(local_uris, False)
            if not peer and not local:
                return self.plain
        key = (peer, local)
        found = self._identities.get(key)
        if found is None:
            policy = ("mutual_tls" if peer and local else "none") if self.inbound else "unknown"
            stats = self._stats
            if (
                len(self._identities) >= self.max_identities
                or stats.series_count >= stats.max_series
                or len(peer) > MAX_PRINCIPAL
                or len(local) > MAX_PRINCIPAL
            ):
                found = self._overflow.get(policy)
                if found is None:
                    found = self._overflow[policy] = Identities(OVERFLOW, OVERFLOW, policy)
                    found.namespace = OVERFLOW
                return found
            found = self._identities[key] = Identities(peer, local, policy)
        return found

    def with_workload(self, ids: Identities | None, workload: PeerWorkload) -> Identities:
        """The shared :class:`Identities` of ``ids`` (a TLS connection's) whose peer's
        metadata exchange said ``workload`` (peer_exchange.py). Bounded as
        :meth:`identities` is: past :attr:`max_identities`, or once the stats are full, the
        workload is not reported (a client saying a new one at each connection grows
        neither the series nor their caches)."""
        base = self.plain if ids is None else ids
        key = (base.peer, base.local, workload)
        found = self._workloads.get(key)
        if found is None:
            stats = self._stats
            if (
                len(self._workloads) >= self.max_identities
                or stats.series_count >= stats.max_series
            ):
                return base
            found = self._workloads[key] = Identities(base.peer, base.local, base.policy, workload)
            found.namespace = base.namespace
        return found

    def series(
        self,
        protocol: str,
        service: str,
        namespace: str,
        endpoint: Mapping[str, str] | None,
        outcome: str,
        flags: str | None = None,
        identities: Identities | None = None,
    ) -> IstioSeries:
        """The series for a request to ``service`` (``endpoint``: the serving endpoint's
        labels, ``None`` when no endpoint was chosen) that ended in ``outcome`` (a status or
        an error type name; ``flags`` overrides the flags the outcome maps to) on a
        connection of ``identities`` (default: plain text)."""
        flag = flags if flags is not None else RESPONSE_FLAGS.get(outcome, "-")
        ids = self.plain if identities is None else identities
        labels_key = tuple(sorted(endpoint.items())) if endpoint and not self.inbound else ()
        key = (protocol, service, namespace, labels_key, outcome, flag, ids)
        found = self._series.get(key)
        if found is not None:
            return found
        found = self._series[key] = IstioSeries(
            self._stats,
            {
                **self._peers(service, namespace, endpoint, ids),
                "request_protocol": protocol,
                "response_code": RESPONSE_CODES.get(outcome, "500"),
                "grpc_response_status": "",
                "response_flags": flag,
                "connection_security_policy": ids.policy,
            },
        )
        return found

    def tcp(
        self,
        service: str,
        namespace: str,
        endpoint: Mapping[str, str],
        identities: Identities | None = None,
    ) -> TcpSeries:
        """The TCP series of upstream connections to an endpoint of ``service`` of
        ``identities`` (default: plain text; at the server side always: an upstream
        connection carries many clients' requests)."""
        ids = self.plain if identities is None else identities
        key = (service, namespace, () if self.inbound else tuple(sorted(endpoint.items())), ids)
        found = self._tcp.get(key)
        if found is None:
            found = self._tcp[key] = TcpSeries(
                self._stats,
                {
                    **self._peers(service, namespace, endpoint, ids),
                    "request_protocol": "tcp",
                    "response_flags": "-",
                    "connection_security_policy": ids.policy,
                },
            )
        return found

    def _peers(
        self,
        service: str,
        namespace: str,
        endpoint: Mapping[str, str] | None,
        ids: Identities,
    ) -> dict[str, str]:
        """The source and destination labels. At the server side the source is the client,
        known by its certificate alone (no metadata exchange): Istio's fallbacks then,
        ``unknown`` but for its principal and its principal's namespace; the destination
        workload is this one. At the client side the destination workload is the server's
        as its metadata exchange said it, where it said it, else the serving endpoint's
        labels; its namespace its principal's, as in Istio, else the exchange's, else the
        ServiceEntry's."""
        if self.inbound:
            peer = ids.workload
            if peer is None:
                source = {
                    "reporter": self._source["reporter"],
                    "source_workload": "unknown",
                    "source_workload_namespace": ids.namespace or "unknown",
                    "source_principal": ids.peer or "unknown",
                    "source_app": "unknown",
                    "source_version": "unknown",
                    "source_canonical_service": "unknown",
                    "source_canonical_revision": "latest",
                    "source_cluster": "unknown",
                }
            else:  # as Istio's stats filter reads a peer's exchanged metadata
                source = {
                    "reporter": self._source["reporter"],
                    "source_workload": peer.workload or "unknown",
                    # The certificate's namespace first, then what the client says.
                    "source_workload_namespace": ids.namespace or peer.namespace or "unknown",
                    "source_principal": ids.peer or "unknown",
                    "source_app": peer.app or "unknown",
                    "source_version": peer.version or "unknown",
                    "source_canonical_service": peer.canonical_service or "unknown",
                    "source_canonical_revision": peer.canonical_revision or "latest",
                    "source_cluster": peer.cluster or "unknown",
                }
            return {
                **source,
                **self._local,
                "destination_principal": ids.local or "unknown",
                "destination_service": service,
                "destination_service_name": service.split(".", 1)[0] or "unknown",
                "destination_service_namespace": namespace,
                "destination_cluster": self._cluster,
            }
        labels = endpoint or {}
        server = ids.workload
        if server is not None:  # its own word first, as Istio's: the endpoint's labels after
            labels = {**labels, **_said(server)}
        app = bounded_label(labels.get("app", "unknown"))
        version = bounded_label(labels.get("version", "unknown"))
        source = self._source
        if ids.local:
            source = {**source, "source_principal": ids.local}
        namespace = ids.namespace or namespace
        workload_namespace = namespace
        if server is not None and not ids.namespace and server.namespace:
            workload_namespace = server.namespace
        return {
            **source,
            "destination_workload": bounded_label(labels.get("workload", app)),
            "destination_workload_namespace": workload_namespace,
            "destination_principal": ids.peer or "unknown",
            "destination_app": app,
            "destination_version": version,
            "destination_service": service,
            "destination_service_name": service.split(".", 1)[0] or "unknown",
            "destination_service_namespace": namespace,
            "destination_canonical_service": bounded_label(
                labels.get("service.istio.io/canonical-name", app)
            ),
            "destination_canonical_revision": bounded_label(
                labels.get(
                    "service.istio.io/canonical-revision",
                    version if version != "unknown" else "latest",
                )
            ),
            "destination_cluster": server.cluster
            if server is not None and server.cluster
            else self._cluster,
        }


def _said(peer: PeerWorkload) -> dict[str, str]:
    """What a server's metadata exchange said of its workload, as endpoint labels (only
    what it said)."""
    said = {
        "workload": peer.workload,
        "app": peer.app,
        "version": peer.version,
        "service.istio.io/canonical-name": peer.canonical_service,
        "service.istio.io/canonical-revision": peer.canonical_revision,
    }
    return {k: v for k, v in said.items() if v}


class TargetTelemetry:
    """A route destination's Istio series, the common case (an ``Ok`` reply from a given
    endpoint) cached per endpoint."""

    __slots__ = ("_telemetry", "inbound", "namespace", "ok", "protocol", "service")

    def __init__(
        self, telemetry: IstioTelemetry, protocol: str, service: str, namespace: str
    ) -> None:
        self._telemetry = telemetry
        self.protocol = protocol
        self.service = service
        self.namespace = namespace
        #: Whose connection's identities key the series: the client's (else the upstream's).
        self.inbound = telemetry.inbound
        #: ``Ok`` series by endpoint and identities (the hot path's lookup).
        self.ok: dict[tuple[object, Identities | None], IstioSeries] = {}

    def series(
        self,
        endpoint: object,
        labels: Mapping[str, str] | None,
        outcome: str,
        flags: str | None,
        identities: Identities | None,
    ) -> IstioSeries:
        """The series for a request served by ``endpoint`` (its ``labels``; ``None`` when
        none was chosen) that ended in ``outcome``, on a connection of ``identities``."""
        if outcome == "Ok" and flags is None:
            key = (endpoint, identities)
            found = self.ok.get(key)
            if found is None:
                found = self.ok[key] = self._telemetry.series(
                    self.protocol, self.service, self.namespace, labels, outcome, None, identities
                )
            return found
        return self._telemetry.series(
            self.protocol, self.service, self.namespace, labels, outcome, flags, identities
        )
