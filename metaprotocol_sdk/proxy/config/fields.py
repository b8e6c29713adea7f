"""What the engine does with every field of the documents it reads.

Each mapping the loader reads has a :class:`Fields` table: the keys it honours, the keys it
refuses (they would change traffic in Istio or Aeraki, and this engine does not implement
them), the keys it accepts with a logged warning (they cannot change this engine's
traffic), and the keys the Kubernetes API server writes (in ``kubectl get -o yaml``
output; nobody types them), accepted silently. Any other key is refused as unknown, so a
typo or a field from a newer API never passes unnoticed. ``docs/proxy.md`` carries the same
tables for users.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

#: Why Kubernetes secrets are refused: no API server is read here.
_SECRETS = (
    "a Kubernetes secret, read by istiod over SDS; this engine reads no secrets: give the "
    "PEM files' paths instead"
)
_NOT_HTTP = "an HTTP setting (MetaProtocol upstream connections are not HTTP)"
_NAMESPACES = "namespace visibility: this engine has no namespaces and applies every document"
_IDENTITY = (
    "an endpoint's identity; the service's subjectAltNames (or a DestinationRule's "
    "tls.subjectAltNames) say which identities its servers may have"
)
K8S = "Kubernetes object metadata: it does not change traffic"


#: Keys starting with it hold YAML anchors to share (as in Compose files): no API uses it.
EXTENSION_PREFIX = "x-"
EXTENSION = "an x- key is a place for YAML anchors; nothing reads it"


@dataclass(frozen=True)
class Fields:
    """The treatment of each key of one mapping: honoured, refused (why) or warned (why)."""

    honoured: frozenset[str]
    #: Refused with "not supported by this engine: <why>".
    refused: Mapping[str, str] = field(default_factory=dict)
    #: Accepted, and logged once per document as ignored, with why it cannot change traffic.
    warned: Mapping[str, str] = field(default_factory=dict)
    #: Written by the Kubernetes API server, not by users: accepted, a debug line at most.
    written: frozenset[str] = frozenset()


def fields(
    *honoured: str,
    refused: Mapping[str, str] | None = None,
    written: tuple[str, ...] = (),
    **warned: str,
) -> Fields:
    """A :class:`Fields` table (``warned`` as keyword arguments: field=why)."""
    return Fields(frozenset(honoured), dict(refused or {}), warned, frozenset(written))


# -- every document ----------------------------------------------------------------------------

#: Object fields the Kubernetes API server writes (``kubectl get -o yaml`` shows them).
SERVER_WRITTEN = (
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)
#: Annotations tools write, not users: ``kubectl apply`` keeps the applied object in one.
TOOL_ANNOTATIONS = frozenset({"kubectl.kubernetes.io/last-applied-configuration"})
DOCUMENT = fields("apiVersion", "kind", "metadata", "spec", written=("status",))
#: ``annotations``: read by the loader (see ``_annotations``): those of :data:`TOOL_ANNOTATIONS`
#: and those a kind reads (an AuthorizationPolicy's ``istio.io/dry-run``) silently, the
#: others with one warning.
METADATA = fields(
    "name",
    "annotations",
    written=SERVER_WRITTEN,
    namespace="this engine matches hosts as written (fully qualified), not relative to a namespace",
    labels=K8S,
    ownerReferences=K8S,
    finalizers=K8S,
)
#: ``metadata`` of a kind whose namespace is read.
NAMESPACED_METADATA = Fields(
    METADATA.honoured | {"namespace"},
    METADATA.refused,
    {k: v for k, v in METADATA.warned.items() if k != "namespace"},
    METADATA.written,
)
#: A ServiceEntry's namespace is Istio's ``destination_service_namespace`` (telemetry).
SERVICE_ENTRY_METADATA = NAMESPACED_METADATA
#: A PeerAuthentication's namespace: its level in Istio (the root namespace's is the mesh's),
#: and which workloads it may apply to.
PEER_AUTHENTICATION_METADATA = NAMESPACED_METADATA
#: Why a PeerAuthentication's namespace is not read when the workload's is not known.
PEER_NO_NAMESPACE = (
    "this workload's namespace is not known (set spec.telemetry.workload.namespace or "
    "POD_NAMESPACE), so the engine has no namespaces: a PeerAuthentication without a "
    "selector applies to it from any namespace (the mesh's root namespace's and its own "
    "namespace's are one level here)"
)
#: An AuthorizationPolicy's namespace: its scope in Istio; here part of its name.
AUTHORIZATION_POLICY_METADATA = NAMESPACED_METADATA
#: The annotation of an AuthorizationPolicy in dry run (judged, not enforced).
DRY_RUN = "istio.io/dry-run"
#: The annotations each kind reads.
ANNOTATIONS_BY_KIND = {"AuthorizationPolicy": frozenset({DRY_RUN})}
METADATA_BY_KIND = {
    "ServiceEntry": SERVICE_ENTRY_METADATA,
    "PeerAuthentication": PEER_AUTHENTICATION_METADATA,
    "AuthorizationPolicy": AUTHORIZATION_POLICY_METADATA,
}
#: The API groups each kind is published in (``apiVersion`` is optional; when set, checked).
API_VERSIONS = {
    "ApplicationProtocol": ("metaprotocol.aeraki.io/v1alpha1",),
    "MetaRouter": ("metaprotocol.aeraki.io/v1alpha1",),
    "ServiceEntry": (
        "networking.istio.io/v1",
        "networking.istio.io/v1beta1",
        "networking.istio.io/v1alpha3",
    ),
    "DestinationRule": (
        "networking.istio.io/v1",
        "networking.istio.io/v1beta1",
        "networking.istio.io/v1alpha3",
    ),
    "ProxyConfig": ("proxy.metaprotocol.io/v1alpha1",),
    "PeerAuthentication": ("security.istio.io/v1", "security.istio.io/v1beta1"),
    "AuthorizationPolicy": ("security.istio.io/v1", "security.istio.io/v1beta1"),
}

# -- ApplicationProtocol (Aeraki) --------------------------------------------------------------

APPLICATION_PROTOCOL = fields("protocol", "codec")

# -- ServiceEntry (Istio) ----------------------------------------------------------------------

SERVICE_ENTRY = fields(
    "hosts",
    "ports",
    "resolution",
    "endpoints",
    "subjectAltNames",
    "location",
    refused={
        "workloadSelector": "it selects Kubernetes pods or WorkloadEntries as endpoints; "
        "list them in spec.endpoints",
    },
    addresses="virtual IPs a sidecar captures traffic for; this engine serves the addresses "
    "its ProxyConfig listeners bind",
    exportTo=_NAMESPACES,
)
SERVICE_PORT = fields("number", "name", "protocol", "targetPort")
ENDPOINT = fields(
    "address",
    "ports",
    "labels",
    "weight",
    "locality",
    refused={
        "network": "an endpoint on another network is reached through that network's gateway "
        "in Istio; this engine connects to every address directly",
    },
    serviceAccount=_IDENTITY,
)
#: ``resolution`` values and ``location`` values the engine accepts.
RESOLUTIONS = ("STATIC", "DNS")
LOCATIONS = ("MESH_EXTERNAL", "MESH_INTERNAL")

# -- DestinationRule (Istio) -------------------------------------------------------------------

DESTINATION_RULE = fields(
    "host",
    "trafficPolicy",
    "subsets",
    refused={
        "workloadSelector": "it limits the rule to the selected workloads' proxies, and this "
        "engine would apply it to all of its traffic",
    },
    exportTo=_NAMESPACES,
)
SUBSET = fields("name", "labels", "trafficPolicy")
TRAFFIC_POLICY = fields(
    "loadBalancer",
    "connectionPool",
    "outlierDetection",
    "tls",
    "portLevelSettings",
    "retryBudget",
    "proxyProtocol",
    "tunnel",
)
#: ``trafficPolicy.tunnel`` (Istio's ``TrafficPolicy.TunnelSettings``).
TUNNEL = fields(
    "targetHost",
    "targetPort",
    "protocol",
)
#: ``tunnel.protocol`` values the engine opens (Istio's: ``CONNECT``, the default, or
#: ``POST``; see :data:`TUNNEL_POST_REFUSED`).
TUNNEL_PROTOCOLS = ("CONNECT",)
#: Why ``tunnel.protocol: POST`` is refused.
TUNNEL_POST_REFUSED = (
    "POST tunnels are not supported: over HTTP/1.1 a POST's body has a length or is "
    "chunked, so the stream would have to be framed as chunks (Envoy's HTTP/1 codec does "
    "so); use CONNECT"
)
#: ``trafficPolicy.proxyProtocol`` (Istio's ``TrafficPolicy.ProxyProtocol``).
PROXY_PROTOCOL = fields("version")
#: ``proxyProtocol.version`` values (Istio's ``VERSION``; ``V1`` when unset).
PROXY_PROTOCOL_VERSIONS = ("V1", "V2")
#: ``trafficPolicy.retryBudget`` (Istio's ``TrafficPolicy.RetryBudget``).
RETRY_BUDGET = fields(
    "percent",
    "minRetryConcurrency",
    refused={
        "budgetInterval": "a budget over the requests of a past interval (the budget counts "
        "the requests in flight only, as Envoy without budget_interval)",
    },
)
#: A ``portLevelSettings`` entry (Istio's ``PortTrafficPolicy``).
PORT_TRAFFIC_POLICY = fields("port", "loadBalancer", "connectionPool", "outlierDetection", "tls")
#: A ``portLevelSettings`` entry translated from xDS: :data:`~.models.PORT_RETRY_BUDGET` and
#: :data:`~.models.PORT_PROXY_PROTOCOL` too.
PORT_TRAFFIC_POLICY_XDS = Fields(
    PORT_TRAFFIC_POLICY.honoured
    | {"xds.metaprotocol.io/retryBudget", "xds.metaprotocol.io/proxyProtocol"},
    {},
)
TLS = fields(
    "mode",
    "clientCertificate",
    "privateKey",
    "caCertificates",
    "subjectAltNames",
    "sni",
    "insecureSkipVerify",
    "caCrl",
    refused={"credentialName": _SECRETS},
)
#: A ``tls`` block translated from xDS: :data:`~.models.AUTO_MTLS_KEY` and
#: :data:`~.models.PEER_EXCHANGE_KEY` too.
TLS_XDS = Fields(
    TLS.honoured | {"xds.metaprotocol.io/autoMtls", "xds.metaprotocol.io/peerExchange"},
    TLS.refused,
)
#: What ``ISTIO_MUTUAL`` needs: the ProxyConfig's workload identity.
NO_MESH_IDENTITY = (
    "ISTIO_MUTUAL uses the workload's Istio identity, and the ProxyConfig sets none: set "
    "spec.meshIdentity (the files istio-agent writes: certificateChain, privateKey, "
    "rootCertificates; by default /etc/certs/cert-chain.pem, key.pem and root-cert.pem), or "
    "use MUTUAL with certificate files"
)
#: ``tls`` fields ``ISTIO_MUTUAL`` takes from the workload identity instead.
ISTIO_MUTUAL_FILES = (
    "the workload identity (spec.meshIdentity) gives ISTIO_MUTUAL its certificate and CAs; "
    "use MUTUAL to give files"
)
LOAD_BALANCER = fields(
    "simple",
    "consistentHash",
    "localityLbSetting",
    "warmupDurationSecs",
    "warmup",
    refused={
        "zoneAwareLbSetting": "zone-aware load balancing",
    },
)
WARMUP = fields("duration", "minimumPercent", "aggression")
LOCALITY_LB = fields("enabled", "failover", "failoverPriority", "distribute")
LOCALITY_FAILOVER = fields("from", "to")
LOCALITY_DISTRIBUTE = fields("from", "to")
_NO_HTTP_HASH = (
    "MetaProtocol requests have no {what}; hash on a metadata attribute with httpHeaderName "
    "(or on the client's address with useSourceIp)"
)
CONSISTENT_HASH = fields(
    "httpHeaderName",
    "useSourceIp",
    "ringHash",
    "maglev",
    "minimumRingSize",
    refused={
        "httpCookie": _NO_HTTP_HASH.format(what="cookies"),
        "httpQueryParameterName": _NO_HTTP_HASH.format(what="query parameters"),
    },
)
RING_HASH = fields("minimumRingSize")
#: A ``ringHash`` block translated from xDS: :data:`~.models.MAXIMUM_RING_SIZE` too.
RING_HASH_XDS = Fields(RING_HASH.honoured | {"xds.metaprotocol.io/maximumRingSize"}, {})
MAGLEV = fields("tableSize")
CONNECTION_POOL = fields("tcp", "http")
TCP_POOL = fields(
    "maxConnections",
    "connectTimeout",
    "tcpKeepalive",
    "maxConnectionDuration",
    "idleTimeout",
)
TCP_KEEPALIVE = fields("probes", "time", "interval")
HTTP_POOL = fields(
    "http1MaxPendingRequests",
    "http2MaxRequests",
    "maxRequestsPerConnection",
    "idleTimeout",
    "maxRetries",
    "maxConcurrentStreams",
    refused={
        "h2UpgradePolicy": _NOT_HTTP,
        "useClientProtocol": _NOT_HTTP,
        "http2KeepAlive": _NOT_HTTP + " (tcp.tcpKeepalive keeps connections alive)",
    },
)
OUTLIER_DETECTION = fields(
    "consecutiveGatewayErrors",
    "consecutive5xxErrors",
    "interval",
    "baseEjectionTime",
    "maxEjectionPercent",
    "minHealthPercent",
    "splitExternalLocalOriginErrors",
    "consecutiveLocalOriginFailures",
    refused={
        "consecutiveErrors": "deprecated in Istio; use consecutive5xxErrors",
        "outlierDetectionHttpErrorCodes": "HTTP status codes (MetaProtocol replies have none; "
        "consecutive5xxErrors counts upstream Error replies)",
    },
)

# -- PeerAuthentication (Istio) ----------------------------------------------------------------

PEER_AUTHENTICATION = fields("selector", "mtls", "portLevelMtls")
#: Istio's ``WorkloadSelector``: its labels are not matched (see the loader).
PEER_SELECTOR = fields("matchLabels")
PEER_MTLS = fields("mode")
#: ``mtls.mode`` values (``UNSET``: the parent's).
PEER_MODES = ("STRICT", "PERMISSIVE", "DISABLE", "UNSET")
#: What STRICT and PERMISSIVE need: the ProxyConfig's workload identity.
PEER_NO_MESH_IDENTITY = (
    "mutual TLS on the listeners uses the workload's Istio identity, and the ProxyConfig sets "
    "none: set spec.meshIdentity (the files istio-agent writes: certificateChain, privateKey, "
    "rootCertificates; by default /etc/certs/cert-chain.pem, key.pem and root-cert.pem), or "
    "use mode DISABLE (plain text, as without a PeerAuthentication)"
)

# -- AuthorizationPolicy (Istio) ---------------------------------------------------------------

_TARGETS = (
    "it binds the policy to a Gateway or a waypoint (a Service), not to a workload; give "
    "the workload's namespace (spec.telemetry.workload.namespace or POD_NAMESPACE) to have "
    "such a policy skipped, or use no selector (or a selector) instead"
)
AUTHORIZATION_POLICY = fields(
    "selector",
    "action",
    "rules",
    refused={
        "provider": "a CUSTOM action's external authorization provider (ext-authz)",
        "targetRef": _TARGETS,
        "targetRefs": _TARGETS,
    },
)
AUTHORIZATION_RULE = fields("from", "to", "when")
AUTHORIZATION_FROM = fields("source")
AUTHORIZATION_TO = fields("operation")
AUTHORIZATION_SOURCE = fields(
    "principals",
    "notPrincipals",
    "namespaces",
    "notNamespaces",
    "serviceAccounts",
    "notServiceAccounts",
    "ipBlocks",
    "notIpBlocks",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
    "requestPrincipals",
    "notRequestPrincipals",
)
AUTHORIZATION_OPERATION = fields(
    "ports", "notPorts", "methods", "notMethods", "paths", "notPaths", "hosts", "notHosts"
)
AUTHORIZATION_CONDITION = fields("key", "values", "notValues")

# -- MetaRouter (Aeraki, with this engine's timeout, fault and retries) ------------------------

META_ROUTER = fields(
    "hosts",
    "routes",
    "localRateLimit",
    "globalRateLimit",
    "gateways",
    exportTo=_NAMESPACES,
)
#: The one ``gateways`` entry that means "this engine": Istio's name for the sidecars.
MESH_GATEWAY = "mesh"
ROUTE = fields(
    "name",
    "match",
    "route",
    "requestMutation",
    "responseMutation",
    "mirror",
    "mirrorPercentage",
    "timeout",
    "fault",
    "retries",
    refused={
        "localRateLimit": "a rate limit per route (set localRateLimit at spec level, as in Aeraki)",
        "globalRateLimit": "a global rate limit per route (set globalRateLimit at spec level, "
        "as in Aeraki)",
    },
)
ROUTE_DESTINATION = fields("destination", "weight")
DESTINATION = fields("host", "subset", "port")
PORT_SELECTOR = fields("number")
MATCH = fields("attributes")
KEY_VALUE = fields("key", "value")
PERCENT = fields("value")
FAULT = fields("delay", "abort")
DELAY = fields("percentage", "fixedDelay")
ABORT = fields("percentage", "errorType")
RETRIES = fields("attempts", "perTryTimeout", "retryOn")
LOCAL_RATE_LIMIT = fields("tokenBucket", "conditions")
RATE_LIMIT_CONDITION = fields("match", "tokenBucket")
TOKEN_BUCKET = fields("maxTokens", "tokensPerFill", "fillInterval")
GLOBAL_RATE_LIMIT = fields(
    "match", "domain", "requestTimeout", "denyOnFail", "rateLimitService", "descriptors"
)
RATE_LIMIT_DESCRIPTOR = fields("property", "descriptorKey")

# -- ProxyConfig (this engine) -----------------------------------------------------------------

PROXY_CONFIG = fields(
    "listeners",
    "admin",
    "codecOptions",
    "limits",
    "overload",
    "timeouts",
    "watchdog",
    "accessLog",
    "upstream",
    "telemetry",
    "tracing",
    "xds",
    "meshIdentity",
    "mesh",
    "tlsFiles",
)
#: ``spec.tlsFiles``: following the listeners' and DestinationRules' TLS files.
TLS_FILES = fields("follow", "checkInterval")
#: ``spec.mesh``: what the engine needs of Istio's mesh configuration (``meshConfig``).
MESH = fields("rootNamespace")
#: ``spec.meshIdentity``: the workload identity's files, as istio-agent names them.
MESH_IDENTITY = fields(
    "directory",
    "certificateChain",
    "privateKey",
    "rootCertificates",
    "checkInterval",
    "autoMtls",
    "sds",
)
#: ``spec.meshIdentity.sds``: the identity from an SDS server (istio-agent's socket).
MESH_IDENTITY_SDS = fields("address", "certificate", "root", "initialFetchTimeout", "keepalive")
XDS = fields(
    "address",
    "rdsAddress",
    "node",
    "maxMessageBytes",
    "maxResourceBytes",
    "backoff",
    "keepalive",
    "initialFetchTimeout",
    "inboundListener",
)
XDS_NODE = fields("id", "cluster", "metadata")
XDS_BACKOFF = fields("initial", "max")
XDS_KEEPALIVE = fields("time", "timeout")
#: Kinds a file may not hold when ``spec.xds`` is set: the control plane sends them.
XDS_KINDS = ("MetaRouter", "DestinationRule")
#: Kinds a file may not hold when ``spec.xds.inboundListener`` is set: istiod sends them.
XDS_INBOUND_KINDS = ("PeerAuthentication", "AuthorizationPolicy")
TRACING = fields(
    "endpoint", "randomSampling", "serviceName", "operation", "maxQueueSize", "exportTimeout"
)
TELEMETRY = fields("istioMetrics", "reporter", "workload")
WORKLOAD = fields(
    "name",
    "namespace",
    "app",
    "version",
    "canonicalService",
    "canonicalRevision",
    "cluster",
    "principal",
    "labels",
    "locality",
)
LISTENER = fields(
    "host", "port", "bind", "filters", "tls", "connectionRateLimit", "maxConnectionDuration"
)
#: A listener's ``connectionRateLimit``: Envoy's listener filter ``local_ratelimit``.
CONNECTION_RATE_LIMIT = fields("tokenBucket")
#: A listener's ``tls``: Istio Gateway ``ServerTLSSettings`` field names.
LISTENER_TLS = fields(
    "mode",
    "serverCertificate",
    "privateKey",
    "caCertificates",
    "minProtocolVersion",
    "maxProtocolVersion",
    "cipherSuites",
    "subjectAltNames",
    "verifyCertificateSpki",
    "verifyCertificateHash",
    "caCrl",
    refused={
        "credentialName": _SECRETS,
        "credentialNames": _SECRETS,
        "tlsCertificates": "several certificates per listener (one serverCertificate and "
        "privateKey pair is served)",
        "httpsRedirect": "an HTTP setting",
    },
)
#: Listener ``tls.mode`` values refused, with why.
LISTENER_TLS_MODES_REFUSED = {
    "PASSTHROUGH": "forwarding TLS unterminated (the engine reads every frame)",
    "AUTO_PASSTHROUGH": "forwarding TLS unterminated (the engine reads every frame)",
    "OPTIONAL_SIMPLE": "serving TLS and plain text on one port",
}
FILTER = fields("name", "config")
ADMIN = fields("bind", "allowRemote", "maxConnections", "requestTimeout")
OVERLOAD = fields("maxBufferedBytes", "maxRssBytes")
TIMEOUTS = fields(
    "connect",
    "route",
    "drain",
    "idle",
    "frame",
    "write",
    "upstreamWrite",
    "handshake",
    "streamIdle",
    "upstreamDrain",
)
WATCHDOG = fields(
    "missTimeout",
    "megamissTimeout",
    "killTimeout",
    refused={
        "multikillTimeout": "one event loop per process: killTimeout is its only kill",
        "multikillThreshold": "one event loop per process: killTimeout is its only kill",
        "maxKillTimeoutJitter": "killTimeout is exact here",
        "actions": "watchdog actions (extensions run on a stall)",
    },
)
ACCESS_LOG = fields("path", "attributes", "maxValueLength", "filter", "otlp")
#: ``spec.accessLog.otlp``: the collector the access log is exported to.
ACCESS_LOG_OTLP = fields("endpoint", "serviceName", "exportTimeout")
ACCESS_LOG_FILTER = fields("failures", "slowerThan")
UPSTREAM = fields("connectionsPerEndpoint", "heartbeat")
#: ``spec.upstream.heartbeat``: pings on upstream connections (codecs with heartbeat requests).
HEARTBEAT = fields("interval", "timeout")
