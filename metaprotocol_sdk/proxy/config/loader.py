"""Read multi-document YAML into a validated :class:`Config`, or fail with a precise error.

Every error is a :class:`~metaprotocol_sdk.errors.ConfigError` whose ``source`` names the file,
the document number and ``kind/name``, and whose ``field`` is the path inside the document
(``spec.routes[1].match.attributes.method.regex``).

Every key of every mapping read is honoured, refused, or (when it cannot change this engine's
traffic) accepted with one warning per field and document on the ``metaprotocol.config``
logger: see :mod:`.fields`.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import ipaddress
import logging
import math
import os
import re
import socket
from collections.abc import Mapping, Sequence
from itertools import islice
from os import PathLike
from typing import Any, NoReturn, cast

from metaprotocol_sdk.enums import ErrorType
from metaprotocol_sdk.errors import ConfigError, RegistryError, UnknownCodecError
from metaprotocol_sdk.registry import Plugins

from ..addresses import is_loopback, port_number
from ..authorization import DENY_UNTIL_RECEIVED
from ..balancer import MAX_MAGLEV_TABLE_SIZE, MAX_RING_SIZE, is_prime
from ..identity import (
    DEFAULT_SERVER,
    IdentityChanging,
    IdentityMaterial,
    load_identity,
)
from ..locality import locality_of_labels, ordered_overlap, pattern_problem, unordered_overlap
from ..matcher import compile_regex
from ..telemetry import environment_labels, workload_from_environment
from ..tls import (
    PROTOCOL_VERSIONS,
    TlsSettingError,
    client_context,
    server_context,
    server_name_error,
)
from . import fields as schema
from .authorization import authorization_policies
from .documents import parse_documents, read_documents
from .durations import parse_duration
from .models import (
    AUTO_MTLS_KEY,
    MAXIMUM_RING_SIZE,
    PEER_EXCHANGE_KEY,
    PORT_PROXY_PROTOCOL,
    PORT_RETRY_BUDGET,
    RETRY_ON,
    TLS_MODE_LABEL,
    AccessLogSettings,
    Admin,
    AttributeMatch,
    Config,
    ConnectionPool,
    Destination,
    DestinationRule,
    Endpoint,
    Fault,
    FilterSpec,
    GlobalRateLimit,
    LbPolicy,
    Limits,
    Listener,
    ListenerTls,
    ListenerTlsMode,
    LoadBalancer,
    LocalityDistribute,
    LocalityLbSetting,
    LocalRateLimit,
    MeshIdentity,
    MetaRouter,
    Mirror,
    OtlpLogs,
    OutlierDetection,
    Overload,
    PeerAuthentication,
    PeerMode,
    PolicyScope,
    Protocol,
    ProxyProtocol,
    ProxySettings,
    RateLimitCondition,
    RateLimitDescriptor,
    Retries,
    RetryBudget,
    Route,
    SdsSource,
    Service,
    ServicePort,
    Subset,
    TcpKeepalive,
    Telemetry,
    Timeouts,
    TokenBucket,
    Tracing,
    TrafficPolicy,
    Tunnel,
    UpstreamHeartbeat,
    UpstreamTls,
    UpstreamTlsMode,
    Warmup,
    Watchdog,
    Xds,
    XdsNode,
)
from .selection import label_map, namespace_error, namespace_of, select

KINDS = (
    "ApplicationProtocol",
    "ServiceEntry",
    "DestinationRule",
    "MetaRouter",
    "ProxyConfig",
    "PeerAuthentication",
    "AuthorizationPolicy",
)
#: Istio kinds an operator may give the engine with the others, and what to write instead.
_OTHER_KINDS = {
    "VirtualService": "a MetaProtocol service's routes are a MetaRouter",
    "Telemetry": "set metrics, access log and tracing in the ProxyConfig's spec.telemetry, "
    "spec.accessLog and spec.tracing",
    "WorkloadEntry": "list the workload's address in a ServiceEntry's spec.endpoints",
}
PORT_PREFIX = "tcp-metaprotocol-"
#: ``ISTIO_VERSION`` in the node metadata sent to the control plane (istiod reads it to pick
#: features; this is the Istio release whose xDS output the tests' snapshots follow).
XDS_ISTIO_VERSION = "1.24.0"
_LB_SIMPLE: dict[str, LbPolicy] = {
    "ROUND_ROBIN": "ROUND_ROBIN",
    "RANDOM": "RANDOM",
    "LEAST_REQUEST": "LEAST_REQUEST",
    "LEAST_CONN": "LEAST_REQUEST",
}
#: Longest host, subset or route name: they label stats series, so each scrape of ``/stats``
#: repeats them in many lines (a route named with a megabyte of text made 45 MB of it). A DNS
#: name has at most 253 characters; Istio's subset names are DNS labels (63).
MAX_NAME_LENGTH = 253
#: ``spec.meshIdentity.checkInterval`` bounds (the files are looked at that often).
MIN_IDENTITY_CHECK, MAX_IDENTITY_CHECK = 0.1, 3600.0
_log = logging.getLogger("metaprotocol.config")
_INDEX = re.compile(r"\[\d+\]")


class _Doc:
    """One YAML document plus what is needed to report errors inside it."""

    def __init__(
        self, body: dict[str, Any], file: str, index: int, item: int | None = None
    ) -> None:
        self.body = body
        self.kind = str(body.get("kind", ""))
        meta = body.get("metadata")
        self.name = str(meta.get("name", "")) if isinstance(meta, dict) else ""
        label = f"{self.kind}/{self.name}" if self.name else self.kind or "document"
        if len(label) > 2 * MAX_NAME_LENGTH:  # the kind and name are checked later, if at all
            label = f"{label[: 2 * MAX_NAME_LENGTH]}..."
        at = f"document {index + 1}" if item is None else f"document {index + 1}, item {item + 1}"
        self.source = f"{file} ({at}, {label})"
        self._warned: set[str] = set()
        #: The document came with an xDS update: names may refer to resources not sent yet.
        self.from_control_plane = False

    def fail(self, path: str, reason: str) -> NoReturn:
        raise ConfigError(reason, source=self.source, field=path or None)

    def check(self, obj: Mapping[str, Any], path: str, table: schema.Fields) -> None:
        """Refuse the unknown and unsupported keys of ``obj``; log the ignored ones once."""
        for key in obj:
            where = f"{path}.{key}" if path else str(key)
            if key in table.honoured:
                continue
            if key in table.refused:
                if obj[key] is not None:  # `key:` with no value sets nothing
                    self.fail(where, f"not supported by this engine: {table.refused[key]}")
            elif key in table.warned:
                if obj[key] is not None:
                    self.warn(where, table.warned[key])
            elif key in table.written:
                _log.debug(
                    "%s: %s: written by the Kubernetes API server; not read", self.source, where
                )
            elif isinstance(key, str) and key.startswith(schema.EXTENSION_PREFIX):
                self.warn(where, schema.EXTENSION)
            else:
                expected = ", ".join(sorted(table.honoured))
                self.fail(where, f"unknown field; expected one of {expected}")

    def warn(self, path: str, why: str) -> None:
        """Log that ``path`` is ignored, once per field (list indices aside) of this document."""
        key = _INDEX.sub("[]", path)
        if key not in self._warned:
            self._warned.add(key)
            _log.warning("%s: %s: accepted and ignored: %s", self.source, path, why)

    def caution(self, path: str, what: str) -> None:
        """Log ``what`` about ``path``: valid, but likely a mistake (a typo in a host name)."""
        if self.from_control_plane:
            return
        key = _INDEX.sub("[]", path) + what
        if key not in self._warned:
            self._warned.add(key)
            _log.warning("%s: %s: %s", self.source, path, what)

    def skip(self, why: str) -> None:
        """Log that the document is valid but not applied, and ``why`` (once; not again
        at each control plane update)."""
        if not self.from_control_plane and why not in self._warned:
            self._warned.add(why)
            _log.info("%s: not applied to this workload: %s", self.source, why)

    def spec(self) -> dict[str, Any]:
        return self.mapping(self.body, "spec", "spec")

    # -- typed getters: each names the field path on failure ----------------------------------

    def get(self, obj: Mapping[str, Any], key: str, path: str, required: bool = False) -> Any:
        if key not in obj or obj[key] is None:
            if required:
                self.fail(path, "required field is missing")
            return None
        return obj[key]

    def mapping(
        self, obj: Mapping[str, Any], key: str, path: str, required: bool = True
    ) -> dict[str, Any]:
        value = self.get(obj, key, path, required)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path, f"must be a mapping, got {type(value).__name__}")
        return value

    def sequence(
        self, obj: Mapping[str, Any], key: str, path: str, required: bool = True
    ) -> list[Any]:
        value = self.get(obj, key, path, required)
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(path, f"must be a list, got {type(value).__name__}")
        if required and not value:
            self.fail(path, "must not be empty")
        return value

    def string(
        self, obj: Mapping[str, Any], key: str, path: str, required: bool = True
    ) -> str | None:
        value = self.get(obj, key, path, required)
        if value is None:
            return None
        if not isinstance(value, str) or (required and not value):
            self.fail(path, f"must be a non-empty string, got {value!r}")
        return value

    def name_string(
        self, obj: Mapping[str, Any], key: str, path: str, required: bool = True
    ) -> str | None:
        """A string that names a host, subset or route: at most :data:`MAX_NAME_LENGTH`."""
        value = self.string(obj, key, path, required)
        if value is not None:
            self.bounded(value, path)
        return value

    def bounded(self, value: str, path: str) -> None:
        """Refuse a name longer than :data:`MAX_NAME_LENGTH` (it would label stats series)."""
        if len(value) > MAX_NAME_LENGTH:
            self.fail(
                path,
                f"{value[:40]!r}... is {len(value)} characters long; a host, subset or route "
                f"name has at most {MAX_NAME_LENGTH} (names label the stats series)",
            )

    def integer(
        self,
        obj: Mapping[str, Any],
        key: str,
        path: str,
        required: bool = True,
        low: int = 0,
        high: int = 2**63,
    ) -> int | None:
        value = self.get(obj, key, path, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(path, f"must be an integer in [{low}, {high}], got {value!r}")
        return value

    def duration(self, obj: Mapping[str, Any], key: str, path: str) -> float | None:
        value = self.get(obj, key, path)
        if value is None:
            return None
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.fail(path, str(exc))
        if seconds <= 0:
            self.fail(path, f"duration must be positive, got {value!r}")
        return seconds

    def labels(self, obj: Mapping[str, Any], key: str, path: str) -> dict[str, str]:
        raw = self.mapping(obj, key, path, required=False)
        out = {}
        for k, v in raw.items():
            if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                self.fail(f"{path}.{k}", f"label value must be a string, got {v!r}")
            out[str(k)] = str(v)
        return out


def load_config(paths: Sequence[str | PathLike[str]] | str | PathLike[str]) -> Config:
    """Load and validate configuration from one or more multi-document YAML files."""
    if isinstance(paths, (str, PathLike)):
        paths = [paths]
    docs: list[_Doc] = []
    sources: list[str] = []
    for path in paths:
        name = str(path)
        docs.extend(_docs(read_documents(path), name))
        sources.append(name)
    return _build(docs, tuple(sources))


def loads_config(text: str, source: str = "<string>") -> Config:
    """Load and validate configuration from YAML text (handy in tests)."""
    return _build(_docs(parse_documents(text, source), source), (source,))


def _listed(bodies: list[Any], file: str) -> list[tuple[Any, int, int | None]]:
    """Each document with its index, a Kubernetes ``List`` (what ``kubectl get -o yaml``
    writes for several resources) replaced by its ``items``, each with its item index."""
    out: list[tuple[Any, int, int | None]] = []
    for index, body in enumerate(bodies):
        if isinstance(body, dict) and body.get("kind") == "List" and body.get("apiVersion") == "v1":
            items = body.get("items")
            if not isinstance(items, list):
                raise ConfigError(
                    "a List's items must be a sequence of documents",
                    source=f"{file} (document {index + 1}, List)",
                    field="items",
                )
            out.extend((item, index, n) for n, item in enumerate(items))
        else:
            out.append((body, index, None))
    return out


def _annotations(doc: _Doc) -> None:
    """Check ``metadata.annotations``: those tools write and those the kind reads are
    accepted silently, any other is named in one warning."""
    annotations = doc.mapping(doc.body["metadata"], "annotations", "metadata.annotations", False)
    read = schema.ANNOTATIONS_BY_KIND.get(doc.kind, frozenset())
    ignored = [
        str(key)[:80]
        for key in annotations
        if key not in read and key not in schema.TOOL_ANNOTATIONS
    ]
    if ignored:
        more = f" and {len(ignored) - 3} more" if len(ignored) > 3 else ""
        doc.warn("metadata.annotations", f"{schema.K8S} ({', '.join(ignored[:3])}{more})")


def _docs(bodies: list[Any], file: str) -> list[_Doc]:
    docs = []
    for body, index, item in _listed(bodies, file):
        if body is None:
            continue
        if not isinstance(body, dict):
            at = (
                f"document {index + 1}"
                if item is None
                else f"document {index + 1}, item {item + 1}"
            )
            raise ConfigError(
                f"a document must be a mapping, got {type(body).__name__}",
                source=f"{file} ({at})",
            )
        doc = _Doc(body, file, index, item)
        if not doc.kind:
            doc.fail("kind", "required field is missing")
        if doc.kind not in KINDS:
            hint = _OTHER_KINDS.get(doc.kind, "")
            doc.fail(
                "kind",
                f"unknown kind {doc.kind!r}; expected one of {', '.join(KINDS)}"
                + (f" ({doc.kind} is not read by this engine: {hint})" if hint else ""),
            )
        if not doc.name:
            doc.fail("metadata.name", "required field is missing")
        doc.check(body, "", schema.DOCUMENT)
        meta = body["metadata"]
        doc.check(meta, "metadata", schema.METADATA_BY_KIND.get(doc.kind, schema.METADATA))
        for key in ("name", "namespace"):  # names, wherever they are read (or not)
            value = meta.get(key)
            if isinstance(value, bool):  # YAML 1.1: a bare on, off, yes, no, true...
                doc.fail(f"metadata.{key}", f"must be a string, got {value} (quote it)")
            if value is not None and not isinstance(value, (str, int)):
                doc.fail(f"metadata.{key}", f"must be a string, got {type(value).__name__}")
        _annotations(doc)
        version = body.get("apiVersion")
        if version is not None and version not in schema.API_VERSIONS[doc.kind]:
            doc.fail(
                "apiVersion",
                f"{doc.kind} is published as {' or '.join(schema.API_VERSIONS[doc.kind])}, "
                f"not {version!r}",
            )
        docs.append(doc)
    return docs


def build_config(
    groups: Sequence[tuple[str, Sequence[Any]]],
    *,
    control_plane: bool = False,
    mesh_identity: MeshIdentity | None = None,
) -> Config:
    """Validate parsed documents, ``(source, bodies)`` per group, into a :class:`Config`.

    ``control_plane``: the MetaRouters and DestinationRules came from the control plane
    (``spec.xds``), so a ProxyConfig with ``spec.xds`` does not refuse them.
    ``mesh_identity``: the ProxyConfig's workload identity as loaded already (its files are
    not read again: a control plane update during a rotation must not fail on them).
    """
    docs: list[_Doc] = []
    for source, bodies in groups:
        docs.extend(_docs(list(bodies), source))
    return _build(docs, tuple(source for source, _ in groups), control_plane, mesh_identity)


def _build(
    docs: list[_Doc],
    sources: tuple[str, ...],
    control_plane: bool = False,
    mesh_identity: MeshIdentity | None = None,
) -> Config:
    by_kind: dict[str, list[_Doc]] = {k: [] for k in KINDS}
    for doc in docs:
        by_kind[doc.kind].append(doc)
        doc.from_control_plane = control_plane
    if len(by_kind["ProxyConfig"]) > 1:
        by_kind["ProxyConfig"][1].fail("kind", "only one ProxyConfig document is allowed")
    proxy_doc = by_kind["ProxyConfig"][0] if by_kind["ProxyConfig"] else None
    if proxy_doc is not None and not control_plane and "xds" in proxy_doc.spec():
        for kind in schema.XDS_KINDS:
            if by_kind[kind]:
                by_kind[kind][0].fail(
                    "kind",
                    f"a {kind} cannot be given in a file when the ProxyConfig sets spec.xds: "
                    "routes and clusters come from the control plane",
                )
        if "inboundListener" in (proxy_doc.spec().get("xds") or {}):
            for kind in schema.XDS_INBOUND_KINDS:
                if by_kind[kind]:
                    by_kind[kind][0].fail(
                        "kind",
                        f"a {kind} cannot be given in a file when the ProxyConfig sets "
                        "spec.xds.inboundListener: the control plane's inbound listener "
                        "carries the mutual TLS mode and the authorization policies",
                    )
    codec_options = _codec_options(proxy_doc)
    # Codec options are the ProxyConfig's; a codec refusing one is reported there.
    options_source = proxy_doc.source if proxy_doc is not None else "ProxyConfig"
    plugins = Plugins()  # the installed codecs and filters, read once for the whole load
    protocols = _protocols(by_kind["ApplicationProtocol"], codec_options, options_source, plugins)
    services = _services(by_kind["ServiceEntry"], protocols, codec_options, options_source, plugins)
    # Protocols named only by a port (no ApplicationProtocol): resolve through the registry.
    if proxy_doc is not None:
        for proto in codec_options:
            if proto not in protocols:
                proxy_doc.fail(
                    f"spec.codecOptions.{proto}",
                    f"no ApplicationProtocol or ServiceEntry port uses protocol {proto!r}",
                )
    identity = mesh_identity
    if identity is None and proxy_doc is not None:
        identity = _mesh_identity(proxy_doc)
    rules = _destination_rules(by_kind["DestinationRule"], services, identity)
    if identity is not None and identity.auto_mtls:
        _unnamed_auto_servers(by_kind["ServiceEntry"], services, rules)
    routers = _routers(by_kind["MetaRouter"], services, rules, protocols)
    telemetry = _telemetry(proxy_doc, proxy_doc.spec()) if proxy_doc is not None else Telemetry()
    scope = _policy_scope(proxy_doc, telemetry)
    not_applied: list[str] = []
    peer = _peer_authentication(
        select(by_kind["PeerAuthentication"], scope, not_applied), identity, scope
    )
    proxy = _proxy(proxy_doc, services, codec_options, plugins, identity, peer, telemetry)
    policies = authorization_policies(
        select(by_kind["AuthorizationPolicy"], scope, not_applied), scoped=scope is not None
    )
    proxy = dataclasses.replace(
        proxy,
        authorization=policies,
        policy_scope=scope,
        policies_not_applied=tuple(not_applied),
    )
    if proxy.xds is not None and proxy.xds.inbound_listener is not None:
        # Nothing is allowed until the control plane's inbound listener says what is.
        proxy = dataclasses.replace(
            proxy,
            listeners=tuple(awaiting_inbound(li, proxy.mesh_identity) for li in proxy.listeners),
        )
    for listener in proxy.listeners:
        _check_router_ports(routers.get(listener.host), listener, services, proxy_doc)
    return Config(
        protocols=protocols,
        services=services,
        destination_rules=rules,
        routers=routers,
        proxy=proxy,
        documents=tuple(doc.body for doc in docs),
        sources=sources,
    )


def awaiting_inbound(listener: Listener, identity: MeshIdentity | None) -> Listener:
    """``listener`` until the control plane's inbound listener (``spec.xds.inboundListener``)
    says what it accepts: every request denied and, when the mesh governs its mode, STRICT
    for clients of the workload's own trust domain (which istiod's list holds). A sidecar
    has no inbound listener then; a connection accepted meanwhile is judged by the policies
    that arrive, not by their mode and trust domains (open connections keep those): a plain
    one, or one of another trust domain, was served once a STRICT listener arrived."""
    if listener.peer_mode is None:  # its own tls
        return dataclasses.replace(listener, authorization=DENY_UNTIL_RECEIVED, inbound_chains=())
    tls = listener.tls
    if tls is not None and not tls.subject_alt_name_prefixes and identity is not None:
        own = identity.material.uris if identity.material is not None else ()
        prefixes = tuple(
            dict.fromkeys(
                "spiffe://" + uri[len("spiffe://") :].partition("/")[0] + "/"
                for uri in own
                if uri.startswith("spiffe://")
            )
        )
        tls = dataclasses.replace(tls, subject_alt_name_prefixes=prefixes)
    return dataclasses.replace(
        listener,
        authorization=DENY_UNTIL_RECEIVED,
        peer_mode="STRICT",
        tls=tls,
        inbound_chains=(),
    )


# -- ApplicationProtocol -----------------------------------------------------------------------


def _make_protocol(
    name: str,
    codec_name: str,
    options: dict[str, Any],
    doc: _Doc | None,
    path: str,
    options_source: str,
    plugins: Plugins,
) -> Protocol:
    """The protocol ``name`` run by the codec ``codec_name`` with ``options``.

    A codec that cannot be resolved fails ``doc`` at ``path`` (without ``doc``, the
    :class:`RegistryError` propagates); options the codec refuses are an error of the
    ProxyConfig's ``spec.codecOptions``, reported at ``options_source``.
    """
    try:
        cls = plugins.codec(codec_name).load()
    except RegistryError as exc:
        if doc is None:
            raise
        doc.fail(path, str(exc))
    try:
        cls.from_options(options)
    except ConfigError as exc:
        where = f"spec.codecOptions.{name}" + (f".{exc.field}" if exc.field else "")
        raise ConfigError(exc.reason, source=exc.source or options_source, field=where) from exc
    except Exception as exc:  # its constructor failed (a bug, a file it needs): say whose
        raise ConfigError(
            _not_built("codec", codec_name, exc),
            source=options_source,
            field=f"spec.codecOptions.{name}",
        ) from exc
    return Protocol(name=name, codec_name=codec_name, codec_class=cls, options=options)


def _not_built(kind: str, name: str, exc: Exception) -> str:
    """Why a plugin's construction failed, when it raised something other than a
    ``ConfigError`` (a bug of its own, a file it needs): whose, and what it raised."""
    return f"{kind} {name} could not be built: {type(exc).__name__}: {exc}"


def _codec_options(doc: _Doc | None) -> dict[str, dict[str, Any]]:
    if doc is None:
        return {}
    raw = doc.mapping(doc.spec(), "codecOptions", "spec.codecOptions", required=False)
    out = {}
    for proto, options in raw.items():
        if options is None:
            options = {}
        if not isinstance(options, dict):
            doc.fail(f"spec.codecOptions.{proto}", "must be a mapping of codec options")
        out[str(proto)] = options
    return out


def _protocols(
    docs: list[_Doc],
    codec_options: dict[str, dict[str, Any]],
    options_source: str,
    plugins: Plugins,
) -> dict[str, Protocol]:
    protocols: dict[str, Protocol] = {}
    for doc in docs:
        spec = doc.spec()
        doc.check(spec, "spec", schema.APPLICATION_PROTOCOL)
        name = cast(str, doc.string(spec, "protocol", "spec.protocol"))
        codec = cast(str, doc.string(spec, "codec", "spec.codec"))
        if name in protocols:
            doc.fail("spec.protocol", f"protocol {name!r} is already defined")
        if "-" in name:
            doc.fail("spec.protocol", f"protocol {name!r} must not contain '-' (port names use it)")
        options = codec_options.get(name, {})
        protocols[name] = _make_protocol(
            name, codec, options, doc, "spec.codec", options_source, plugins
        )
    return protocols


# -- ServiceEntry ------------------------------------------------------------------------------


def _port_protocol(
    doc: _Doc,
    port_name: str,
    path: str,
    protocols: dict[str, Protocol],
    options: dict[str, Any],
    options_source: str,
    plugins: Plugins,
) -> str | None:
    if not port_name.startswith(PORT_PREFIX):
        return None
    proto = port_name[len(PORT_PREFIX) :].split("-", 1)[0]
    if not proto:
        doc.fail(
            path,
            f"port name {port_name!r} names no protocol; "
            "expected tcp-metaprotocol-<protocol>-<name>",
        )
    if proto not in protocols:
        # No ApplicationProtocol: accept an installed codec registered under the same name.
        # (Options the installed codec refuses are their own error, not "no codec".)
        try:
            protocols[proto] = _make_protocol(
                proto, proto, options.get(proto, {}), None, path, options_source, plugins
            )
        except UnknownCodecError:
            doc.fail(
                path,
                f"port name {port_name!r} selects protocol {proto!r}, but there is no "
                f"ApplicationProtocol for it and no installed codec named {proto!r}",
            )
        except RegistryError as exc:  # installed, but it does not load
            doc.fail(path, f"port name {port_name!r} selects protocol {proto!r}: {exc}")
    return proto


def _services(
    docs: list[_Doc],
    protocols: dict[str, Protocol],
    options: dict[str, dict[str, Any]],
    options_source: str,
    plugins: Plugins,
) -> dict[str, Service]:
    services: dict[str, Service] = {}
    for doc in docs:
        spec = doc.spec()
        doc.check(spec, "spec", schema.SERVICE_ENTRY)
        hosts = doc.sequence(spec, "hosts", "spec.hosts")
        for i, host in enumerate(hosts):
            if not isinstance(host, str) or not host:
                doc.fail(f"spec.hosts[{i}]", f"must be a non-empty string, got {host!r}")
            doc.bounded(host, f"spec.hosts[{i}]")
            if host in services:
                doc.fail(
                    f"spec.hosts[{i}]",
                    f"host {host!r} is already defined by {services[host].source}",
                )
        resolution = doc.get(spec, "resolution", "spec.resolution") or "STATIC"
        if resolution not in schema.RESOLUTIONS:
            doc.fail(
                "spec.resolution", f"resolution {resolution!r} is not supported; use STATIC or DNS"
            )
        location = doc.get(spec, "location", "spec.location")
        if location is not None and location not in schema.LOCATIONS:
            doc.fail("spec.location", f"expected MESH_EXTERNAL or MESH_INTERNAL, got {location!r}")
        ports: dict[int, ServicePort] = {}
        names: set[str] = set()
        for i, raw in enumerate(doc.sequence(spec, "ports", "spec.ports")):
            path = f"spec.ports[{i}]"
            if not isinstance(raw, dict):
                doc.fail(path, "must be a mapping")
            doc.check(raw, path, schema.SERVICE_PORT)
            number = cast(int, doc.integer(raw, "number", f"{path}.number", low=1, high=65535))
            pname = cast(str, doc.string(raw, "name", f"{path}.name"))
            target = doc.integer(raw, "targetPort", f"{path}.targetPort", False, 1, 65535)
            if number in ports:
                doc.fail(f"{path}.number", f"port {number} is listed twice")
            if pname in names:
                doc.fail(f"{path}.name", f"port name {pname!r} is listed twice")
            names.add(pname)
            proto = _port_protocol(
                doc, pname, f"{path}.name", protocols, options, options_source, plugins
            )
            transport = doc.string(raw, "protocol", f"{path}.protocol", required=False)
            if proto is not None and transport is not None and transport.upper() != "TCP":
                # Istio reads a port's protocol before its name: this port would not be TCP.
                doc.fail(
                    f"{path}.protocol",
                    f"a tcp-metaprotocol-* port carries TCP, got {transport!r}",
                )
            ports[number] = ServicePort(number, pname, proto, target)
        endpoints = []
        for i, raw in enumerate(doc.sequence(spec, "endpoints", "spec.endpoints", required=False)):
            path = f"spec.endpoints[{i}]"
            if not isinstance(raw, dict):
                doc.fail(path, "must be a mapping")
            doc.check(raw, path, schema.ENDPOINT)
            address = _endpoint_address(doc, raw, f"{path}.address")
            eports = {}
            for pname, pnum in doc.mapping(raw, "ports", f"{path}.ports", required=False).items():
                if pname not in names:
                    doc.fail(f"{path}.ports.{pname}", f"no service port is named {pname!r}")
                eports[pname] = cast(
                    int, doc.integer({"p": pnum}, "p", f"{path}.ports.{pname}", low=1, high=65535)
                )
            labels = doc.labels(raw, "labels", f"{path}.labels")
            locality = _locality(doc, raw, "locality", f"{path}.locality")
            endpoints.append(Endpoint(address, eports, labels, _weight(doc, raw, path), locality))
        if resolution == "DNS" and not endpoints:
            # Istio would resolve the hosts themselves; this engine takes addresses from
            # endpoints only, and would answer every request NoHealthyUpstream.
            doc.fail(
                "spec.endpoints",
                "resolution DNS without endpoints (resolving spec.hosts) is not supported by "
                "this engine; list the addresses in spec.endpoints",
            )
        namespace = doc.string(doc.body["metadata"], "namespace", "metadata.namespace", False)
        service = Service(
            doc.name,
            tuple(hosts),
            ports,
            tuple(endpoints),
            doc.source,
            namespace or "default",
            tuple(_subject_alt_names(doc, spec, "spec")),
            location == "MESH_INTERNAL",
        )
        for host in hosts:
            services[host] = service
    return services


#: A host name an endpoint may have: DNS labels of letters, digits, ``-`` and ``_``.
_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?:\.(?!-)[A-Za-z0-9_-]{1,63})*\.?")


def _endpoint_address(doc: _Doc, raw: Mapping[str, Any], path: str) -> str:
    """A ServiceEntry endpoint's ``address``: an IP address or a host name (resolved at each
    connect). Anything else would fail every connection, so it is refused here."""
    address = cast(str, doc.string(raw, "address", path))
    if address.startswith("unix://"):
        doc.fail(
            path,
            "not supported by this engine: a Unix domain socket endpoint (Istio's unix://); "
            "give an IP address or a host name",
        )
    try:
        ipaddress.ip_address(address)
    except ValueError:
        if len(address) > 253 or not _HOST_NAME.fullmatch(address):
            doc.fail(path, f"must be an IP address or a host name, got {address!r}")
    return address


def _locality(doc: _Doc, raw: Mapping[str, Any], key: str, path: str) -> str:
    """A locality, ``region[/zone[/subzone]]`` (``""`` when unset)."""
    value = doc.string(raw, key, path, required=False)
    if not value:
        return ""
    parts = value.split("/")
    if len(value) > MAX_NAME_LENGTH or len(parts) > 3 or not parts[0]:
        doc.fail(path, f"must be region, region/zone or region/zone/subzone, got {value[:80]!r}")
    return value


def _weight(doc: _Doc, raw: Mapping[str, Any], path: str) -> int:
    """An endpoint's ``weight``: 1 to 2^32 - 1 (Istio's uint32), 1 when unset."""
    value = raw.get("weight")
    if type(value) is int and value == 0:
        # Istio's proto cannot tell 0 from unset and gives weight 1; Envoy refuses 0. Neither
        # takes the endpoint out, which is what a 0 most likely means.
        doc.fail(
            f"{path}.weight",
            "must be at least 1: a weight of 0 does not take the endpoint out (Istio reads it "
            "as unset, weight 1); remove the endpoint instead",
        )
    weight = doc.integer(raw, "weight", f"{path}.weight", False, 1, 2**32 - 1)
    return 1 if weight is None else weight


# -- DestinationRule ---------------------------------------------------------------------------


def _group(doc: _Doc, policy: Mapping[str, Any], key: str, path: str) -> dict[str, Any] | None:
    """A ``trafficPolicy`` group: ``None`` when absent (unset: inherited, or the default),
    else its mapping. An empty one is set, as in Istio (a message, not nil): a subset's
    ``connectionPool: {}`` replaces the rule's, ``outlierDetection: {}`` turns detection on
    with the defaults."""
    if policy.get(key) is None:
        return None
    return doc.mapping(policy, key, f"{path}.{key}")


def _load_balancer(doc: _Doc, policy: dict[str, Any], path: str) -> LoadBalancer | None:
    lb = _group(doc, policy, "loadBalancer", path)
    if lb is None:
        return None
    doc.check(lb, f"{path}.loadBalancer", schema.LOAD_BALANCER)
    simple = doc.string(lb, "simple", f"{path}.loadBalancer.simple", required=False)
    hashing = doc.mapping(lb, "consistentHash", f"{path}.loadBalancer.consistentHash", False)
    consistent = lb.get("consistentHash") is not None  # {} too: refused, as it hashes nothing
    if simple is not None and consistent:
        doc.fail(f"{path}.loadBalancer", "set either simple or consistentHash, not both")
    locality = _locality_lb(doc, lb, f"{path}.loadBalancer.localityLbSetting")
    warmup = _warmup(doc, lb, f"{path}.loadBalancer", "consistentHash" if consistent else simple)
    if consistent:
        return _consistent_hash(doc, hashing, f"{path}.loadBalancer.consistentHash", locality)
    if simple is None:  # set, with the default policy (replaces a rule's)
        return LoadBalancer(locality=locality, warmup=warmup)
    if simple not in _LB_SIMPLE:
        doc.fail(
            f"{path}.loadBalancer.simple",
            f"unknown policy {simple!r}; expected ROUND_ROBIN, RANDOM or LEAST_REQUEST",
        )
    return LoadBalancer(_LB_SIMPLE[simple], locality=locality, warmup=warmup)


def _warmup(doc: _Doc, lb: Mapping[str, Any], path: str, simple: str | None) -> Warmup | None:
    """``loadBalancer.warmup`` (or the deprecated ``warmupDurationSecs``), validated as
    istiod does whatever the policy, and kept only where istiod sends Envoy slow start:
    ``ROUND_ROBIN`` and ``LEAST_REQUEST`` (``simple``: the policy's name, ``None`` for the
    default one, ``"consistentHash"`` for a hash ring)."""
    raw = doc.mapping(lb, "warmup", f"{path}.warmup", required=False)
    if lb.get("warmup") is not None:
        where = f"{path}.warmup"
        doc.check(raw, where, schema.WARMUP)
        duration = cast(float, _warmup_window(doc, raw, "duration", f"{where}.duration", True))
        minimum = _warmup_number(doc, raw, "minimumPercent", f"{where}.minimumPercent", 10.0)
        if not 0 <= minimum <= 100:
            doc.fail(f"{where}.minimumPercent", f"must be in [0, 100], got {minimum!r}")
        aggression = _warmup_number(doc, raw, "aggression", f"{where}.aggression", 1.0)
        if not aggression > 0:
            doc.fail(f"{where}.aggression", f"must be greater than 0, got {aggression!r}")
        if lb.get("warmupDurationSecs") is not None:
            doc.caution(f"{path}.warmupDurationSecs", "ignored: warmup is set (istiod uses it)")
        warmup = Warmup(duration, minimum, aggression)
    else:
        key = "warmupDurationSecs"
        seconds = _warmup_window(doc, lb, key, f"{path}.{key}", required=False)
        if seconds is None:
            return None
        warmup = Warmup(seconds)
    if simple in ("RANDOM", "consistentHash"):
        doc.caution(
            path,
            f"warmup has no effect with {simple}: istiod sends Envoy slow start only for "
            "ROUND_ROBIN and LEAST_REQUEST",
        )
        return None
    return warmup


def _warmup_window(
    doc: _Doc, raw: Mapping[str, Any], key: str, path: str, required: bool
) -> float | None:
    """A warm-up duration: at least 1ms, in whole milliseconds (Istio's check of
    ``warmup.duration``; Envoy counts the window in milliseconds)."""
    if required:
        doc.get(raw, key, path, required=True)
    seconds = doc.duration(raw, key, path)
    if seconds is None:
        return None
    millis = seconds * 1000
    if millis < 1 or abs(millis - round(millis)) > 1e-6 * max(1.0, millis):
        doc.fail(path, f"must be at least 1ms, in whole milliseconds, got {raw[key]!r:.40}")
    return seconds


def _warmup_number(doc: _Doc, raw: Mapping[str, Any], key: str, path: str, default: float) -> float:
    """A finite number (Istio's ``DoubleValue``), ``default`` when unset."""
    value = doc.get(raw, key, path)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        doc.fail(path, f"must be a number, got {value!r:.40}")
    return float(value)


def _consistent_hash(
    doc: _Doc, hashing: Mapping[str, Any], path: str, locality: LocalityLbSetting | None
) -> LoadBalancer:
    """``loadBalancer.consistentHash``: its key (``httpHeaderName``, a metadata attribute, or
    ``useSourceIp``) and its algorithm (``ringHash``, the default, or ``maglev``), validated
    as istiod validates them, within the engine's bounds."""
    doc.check(hashing, path, schema.CONSISTENT_HASH)
    attribute = doc.string(hashing, "httpHeaderName", f"{path}.httpHeaderName", required=False)
    if attribute is not None and not attribute.strip():  # hashed nothing: round robin
        doc.fail(f"{path}.httpHeaderName", f"must name a metadata attribute, got {attribute!r}")
    source = hashing.get("useSourceIp")
    if source is not None and not isinstance(source, bool):
        doc.fail(f"{path}.useSourceIp", f"must be true or false, got {source!r}")
    if attribute is not None and source is not None:
        doc.fail(path, "set one hash key: httpHeaderName or useSourceIp, not both")
    if attribute is None and not source:
        doc.fail(
            path,
            "set a hash key: httpHeaderName (a metadata attribute) or useSourceIp: true"
            if source is None
            else "useSourceIp: false hashes nothing; set httpHeaderName or useSourceIp: true",
        )
    deprecated = doc.integer(
        hashing, "minimumRingSize", f"{path}.minimumRingSize", False, 0, MAX_RING_SIZE
    )
    ring = doc.mapping(hashing, "ringHash", f"{path}.ringHash", False)
    maglev = doc.mapping(hashing, "maglev", f"{path}.maglev", False)
    algorithms = [key for key in ("ringHash", "maglev") if hashing.get(key) is not None]
    if len(algorithms) > 1:
        doc.fail(path, "set one hash algorithm: ringHash or maglev, not both")
    if deprecated and algorithms:  # 0 is unset, as in istiod
        doc.fail(
            f"{path}.minimumRingSize",
            f"set with {algorithms[0]} (Istio refuses it too); write ringHash.minimumRingSize",
        )
    size = deprecated or None
    maximum = None
    if hashing.get("ringHash") is not None:
        xds = doc.from_control_plane
        doc.check(ring, f"{path}.ringHash", schema.RING_HASH_XDS if xds else schema.RING_HASH)
        rpath = f"{path}.ringHash.minimumRingSize"
        size = doc.integer(ring, "minimumRingSize", rpath, False, 0, MAX_RING_SIZE) or None
        if xds:
            mpath = f"{path}.ringHash.{MAXIMUM_RING_SIZE}"
            maximum = doc.integer(ring, MAXIMUM_RING_SIZE, mpath, False, 1)
    table = None
    if hashing.get("maglev") is not None:
        doc.check(maglev, f"{path}.maglev", schema.MAGLEV)
        mpath = f"{path}.maglev.tableSize"
        table = doc.integer(maglev, "tableSize", mpath, False, 0, MAX_MAGLEV_TABLE_SIZE)
        if not table:
            doc.fail(mpath, "must be set for maglev (Istio refuses it too); 65537 is the usual")
        if not is_prime(table):
            doc.fail(mpath, f"must be a prime number (as Istio and Envoy require), got {table}")
    return LoadBalancer(
        "CONSISTENT_HASH",
        attribute,
        locality,
        ring_size=size,
        ring_maximum=maximum,
        maglev_table_size=table,
    )


def _locality_lb(doc: _Doc, lb: Mapping[str, Any], path: str) -> LocalityLbSetting | None:
    """``loadBalancer.localityLbSetting`` (``None``: unset): ``enabled``, ``failover``."""
    raw = doc.mapping(lb, "localityLbSetting", path, required=False)
    if lb.get("localityLbSetting") is None:
        return None
    doc.check(raw, path, schema.LOCALITY_LB)
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        doc.fail(f"{path}.enabled", f"must be true or false, got {enabled!r}")
    failover: dict[str, str] = {}
    for i, rule in enumerate(doc.sequence(raw, "failover", f"{path}.failover", required=False)):
        where = f"{path}.failover[{i}]"
        if not isinstance(rule, dict):
            doc.fail(where, "must be a mapping with from and to")
        doc.check(rule, where, schema.LOCALITY_FAILOVER)
        regions = []
        for key in ("from", "to"):
            region = cast(str, doc.string(rule, key, f"{where}.{key}"))
            if "/" in region or len(region) > MAX_NAME_LENGTH:
                doc.fail(f"{where}.{key}", f"must be a region (no '/'), got {region[:80]!r}")
            regions.append(region)
        if regions[0] == regions[1]:
            doc.fail(where, f"from and to are both {regions[0]!r} (Istio refuses it too)")
        if regions[0] in failover:
            doc.fail(f"{where}.from", f"region {regions[0]!r} has a failover rule already")
        failover[regions[0]] = regions[1]
    distribute = _distribute(doc, raw, path)
    if distribute and failover:
        doc.fail(f"{path}.distribute", "can not simultaneously specify 'distribute' and 'failover'")
    if distribute and lb.get("consistentHash") is not None:
        doc.fail(
            f"{path}.distribute",
            "not supported by this engine with consistentHash: Envoy sizes a hash ring by the "
            "locality weights, the engine's ring by the endpoints' weights only",
        )
    ranked = _failover_priority(doc, raw, path)
    return LocalityLbSetting(enabled, tuple(failover.items()), ranked, distribute)


def _distribute(doc: _Doc, raw: Mapping[str, Any], path: str) -> tuple[LocalityDistribute, ...]:
    """``localityLbSetting.distribute``, checked as istiod's ``validateLocalities`` does (each
    ``to`` adds up to 100; patterns with one trailing ``*`` at most; a ``from`` that an
    earlier one shadows is refused; ``to`` patterns may not overlap at all)."""
    where = f"{path}.distribute"
    out = []
    for i, rule in enumerate(doc.sequence(raw, "distribute", where, required=False)):
        rpath = f"{where}[{i}]"
        if not isinstance(rule, dict):
            doc.fail(rpath, "must be a mapping with from and to")
        doc.check(rule, rpath, schema.LOCALITY_DISTRIBUTE)
        origin = _locality_pattern(doc, rule.get("from"), f"{rpath}.from")
        to = []
        for pattern, weight in doc.mapping(rule, "to", f"{rpath}.to").items():
            _locality_pattern(doc, pattern, f"{rpath}.to")
            if type(weight) is not int or not 1 <= weight <= 100:
                doc.fail(f"{rpath}.to.{pattern}", "locality weight must be in range [1, 100]")
            to.append((pattern, weight))
        total = sum(weight for _, weight in to)
        if total != 100:
            doc.fail(f"{rpath}.to", f"total locality weight {total} != 100")
        both = unordered_overlap([pattern for pattern, _ in to])
        if both is not None:
            doc.fail(
                f"{rpath}.to",
                f"locality {both[1]} overlap with previous specified ones ({both[0]}): a "
                "locality would match both, and istiod picks either at random",
            )
        out.append(LocalityDistribute(origin, tuple(to)))
    shadowed = ordered_overlap([rule.origin for rule in out])
    if shadowed is not None:
        doc.fail(
            f"{where}[{shadowed}].from",
            f"locality {out[shadowed].origin} overlap with previous specified ones",
        )
    return tuple(out)


def _locality_pattern(doc: _Doc, value: Any, path: str) -> str:
    """A ``distribute`` locality pattern: ``region[/zone[/subzone]]``, ``*`` for the rest."""
    if not isinstance(value, str) or len(value) > MAX_NAME_LENGTH:
        doc.fail(path, f"must be a locality such as region/zone or region/*, got {value!r:.80}")
    problem = pattern_problem(value)
    if problem is not None:
        doc.fail(path, problem)
    return value


#: Most labels a ``failoverPriority`` lists (each is one more priority level; Kubernetes'
#: topology has five: network, region, zone, subzone, node).
MAX_FAILOVER_LABELS = 16


def _failover_priority(
    doc: _Doc, raw: Mapping[str, Any], path: str
) -> tuple[tuple[str, str | None], ...]:
    """``localityLbSetting.failoverPriority``: label names, each optionally ``label=value``
    (compared with ``value`` rather than the engine's own label, as istiod reads it)."""
    where = f"{path}.failoverPriority"
    items = doc.sequence(raw, "failoverPriority", where, required=False)
    if len(items) > MAX_FAILOVER_LABELS:
        doc.fail(where, f"at most {MAX_FAILOVER_LABELS} labels, got {len(items)}")
    out: list[tuple[str, str | None]] = []
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item or len(item) > MAX_NAME_LENGTH:
            doc.fail(f"{where}[{i}]", f"must be a label name (or name=value), got {item!r:.80}")
        label, sep, value = item.partition("=")
        if not label or (sep and ("=" in value or not value)):
            doc.fail(f"{where}[{i}]", f"must be a label name or name=value, got {item!r:.80}")
        if any(label == seen for seen, _ in out):
            doc.fail(f"{where}[{i}]", f"label {label!r} is listed twice")
        out.append((label, value if sep else None))
    return tuple(out)


def _traffic_policy(
    doc: _Doc,
    policy: Mapping[str, Any],
    path: str,
    identity: MeshIdentity | None,
    table: schema.Fields = schema.TRAFFIC_POLICY,
) -> TrafficPolicy:
    doc.check(policy, path, table)
    return TrafficPolicy(
        _load_balancer(doc, dict(policy), path),
        _connection_pool(doc, policy, path),
        _outlier_detection(doc, policy, path),
        _upstream_tls(doc, policy, path, identity),
        _retry_budget(doc, policy, path),
        _proxy_protocol(doc, policy, path),
        _tunnel(doc, policy, path),
    )


#: A DNS-1123 label, as istiod's ``ValidateFQDN`` checks each label of a tunnel's target.
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9]{0,61}[A-Za-z0-9])?")


def _tunnel(doc: _Doc, policy: Mapping[str, Any], path: str) -> Tunnel | None:
    """``tunnel``: ``targetHost`` (a domain name or an IP address) and ``targetPort``
    (1-65535) required, ``protocol`` ``CONNECT`` (the default); istiod's messages."""
    raw = _group(doc, policy, "tunnel", path)
    if raw is None:
        return None
    path = f"{path}.tunnel"
    doc.check(raw, path, schema.TUNNEL)
    protocol = raw.get("protocol") or "CONNECT"
    if protocol == "POST":
        doc.fail(f"{path}.protocol", schema.TUNNEL_POST_REFUSED)
    if protocol not in schema.TUNNEL_PROTOCOLS:
        doc.fail(
            f"{path}.protocol", f'tunnel protocol must be "CONNECT" or "POST", got {protocol!r:.80}'
        )
    host = raw.get("targetHost")
    if not isinstance(host, str) or not _tunnel_host(host):
        doc.fail(
            f"{path}.targetHost",
            f"tunnel target host must be a valid FQDN or IP address, got {host!r:.80}",
        )
    port = raw.get("targetPort")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        doc.fail(
            f"{path}.targetPort",
            f"tunnel target port is invalid: must be 1-65535, got {port!r:.80}",
        )
    return Tunnel(host.rstrip(".") if not _is_ip(host) else host, port, protocol)


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _tunnel_host(host: str) -> bool:
    """Whether ``host`` is an IP address or a domain name (at most 255 characters of
    DNS-1123 labels, a final dot allowed): nothing else may go in the CONNECT line."""
    if _is_ip(host):
        return True
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 255 and all(_DNS_LABEL.fullmatch(label) for label in name.split("."))


def _proxy_protocol(
    doc: _Doc, policy: Mapping[str, Any], path: str, key: str = "proxyProtocol"
) -> ProxyProtocol | None:
    """``proxyProtocol``: ``version`` ``V1`` (Istio's default, also when unset) or ``V2``."""
    raw = _group(doc, policy, key, path)
    if raw is None:
        return None
    path = f"{path}.{key}"
    doc.check(raw, path, schema.PROXY_PROTOCOL)
    version = raw.get("version")
    if version is None:
        return ProxyProtocol()
    if version not in schema.PROXY_PROTOCOL_VERSIONS:
        names = " or ".join(schema.PROXY_PROTOCOL_VERSIONS)
        doc.fail(f"{path}.version", f"must be {names}, got {version!r:.80}")
    return ProxyProtocol(int(version[1:]))


def _retry_budget(
    doc: _Doc, policy: Mapping[str, Any], path: str, key: str = "retryBudget"
) -> RetryBudget | None:
    """``retryBudget``: ``percent`` a number in [0, 100] (Istio's schema), default 20;
    ``minRetryConcurrency`` a uint32, whose ``0`` is istiod's default, 3. From xDS, the
    translation writes Envoy's values whole, and ``0`` is no floor, as in Envoy."""
    raw = _group(doc, policy, key, path)
    if raw is None:
        return None
    path = f"{path}.{key}"
    doc.check(raw, path, schema.RETRY_BUDGET)
    default = RetryBudget()
    ppath, fpath = f"{path}.percent", f"{path}.minRetryConcurrency"
    percent = doc.get(raw, "percent", ppath)
    if percent is None:
        percent = default.percent
    elif (
        isinstance(percent, bool)
        or not isinstance(percent, (int, float))
        or not 0 <= percent <= 100
    ):
        doc.fail(ppath, f"must be a number in [0, 100], got {percent!r:.80}")  # NaN too
    floor = doc.integer(raw, "minRetryConcurrency", fpath, False, 0, 2**32 - 1)
    if floor is None or (floor == 0 and not doc.from_control_plane):
        if floor == 0:
            doc.caution(fpath, f"0 is istiod's default, {default.min_retry_concurrency}")
        floor = default.min_retry_concurrency
    return RetryBudget(float(percent), floor)


_UPSTREAM_TLS_MODES = ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")


def _subject_alt_names(doc: _Doc, raw: Mapping[str, Any], path: str) -> list[str]:
    sans = doc.sequence(raw, "subjectAltNames", f"{path}.subjectAltNames", required=False)
    for i, name in enumerate(sans):
        if not isinstance(name, str) or not name:
            doc.fail(f"{path}.subjectAltNames[{i}]", f"must be a non-empty string, got {name!r}")
    return list(sans)


def _pins(doc: _Doc, raw: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    """``verifyCertificateSpki`` (base64 SHA-256 digests, kept in base64) or
    ``verifyCertificateHash`` (hex, with or without colons; kept lower case, without)."""
    pins = []
    for i, value in enumerate(doc.sequence(raw, key, f"{path}.{key}", required=False)):
        where = f"{path}.{key}[{i}]"
        if not isinstance(value, str):
            doc.fail(where, f"must be a string, got {value!r}")
        if key == "verifyCertificateSpki":
            try:
                digest = base64.b64decode(value, validate=True)
            except ValueError:
                digest = b""
            if len(digest) != 32:
                doc.fail(
                    where,
                    "must be the base64 of a SHA-256 digest (44 characters: openssl x509 "
                    f"-pubkey | openssl pkey -pubin -outform DER | openssl dgst -sha256 "
                    f"-binary | base64), got {value[:80]!r}",
                )
            pins.append(base64.b64encode(digest).decode())
        else:
            hexed = value.replace(":", "").lower()
            if len(hexed) != 64 or hexed.strip("0123456789abcdef"):
                doc.fail(
                    where,
                    "must be the hex SHA-256 digest of a certificate (64 hex digits, colons "
                    f"allowed: openssl x509 -noout -fingerprint -sha256), got {value[:100]!r}",
                )
            pins.append(hexed)
    return tuple(pins)


def _tls_path(doc: _Doc, raw: Mapping[str, Any], key: str, path: str) -> str | None:
    """A file path of a ``tls`` block, relative paths as given (to the working directory)."""
    return doc.string(raw, key, f"{path}.{key}", required=False)


def _upstream_tls(
    doc: _Doc, policy: Mapping[str, Any], path: str, identity: MeshIdentity | None
) -> UpstreamTls | None:
    """``trafficPolicy.tls`` (Istio's ``ClientTLSSettings``): its files are read and the
    context built now, so that a bad file is an error naming its field. ``ISTIO_MUTUAL``
    takes the workload ``identity`` (its files were read with the ProxyConfig)."""
    raw = _group(doc, policy, "tls", path)
    if raw is None:
        return None
    path = f"{path}.tls"
    # istiod's automatic mutual TLS, as the xDS translation writes it (never in a file).
    doc.check(raw, path, schema.TLS_XDS if doc.from_control_plane else schema.TLS)
    auto = bool(raw.get(AUTO_MTLS_KEY))
    mode = doc.get(raw, "mode", f"{path}.mode") or "DISABLE"
    if mode not in _UPSTREAM_TLS_MODES:
        doc.fail(
            f"{path}.mode",
            f"unknown TLS mode {mode!r}; expected DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL",
        )
    sans = _subject_alt_names(doc, raw, path)
    skip = doc.get(raw, "insecureSkipVerify", f"{path}.insecureSkipVerify")
    if skip is not None and not isinstance(skip, bool):
        doc.fail(f"{path}.insecureSkipVerify", f"must be true or false, got {skip!r}")
    files = {
        key: _tls_path(doc, raw, key, path)
        for key in ("caCertificates", "clientCertificate", "privateKey", "caCrl")
    }
    sni = doc.string(raw, "sni", f"{path}.sni", required=False)
    if sni is not None and (why := server_name_error(sni)) is not None:
        doc.fail(f"{path}.sni", why)
    if mode == "ISTIO_MUTUAL":
        if identity is None and not auto:  # automatic: plain TCP without an identity
            doc.fail(f"{path}.mode", schema.NO_MESH_IDENTITY)
        for key in (*files, "insecureSkipVerify"):
            if raw.get(key) is not None:
                doc.fail(
                    f"{path}.{key}", f"not with mode ISTIO_MUTUAL: {schema.ISTIO_MUTUAL_FILES}"
                )
        # The SNI (default outbound_.<port>_.<subset>_.<host>) and, without names here, the
        # ServiceEntry's are set per cluster by the engine.
        return UpstreamTls(
            "ISTIO_MUTUAL",
            sni=sni,
            subject_alt_names=tuple(sans),
            auto=auto,
            peer_exchange=raw.get(PEER_EXCHANGE_KEY) is not False,
        )
    if mode == "DISABLE":
        for key in ("sni", "subjectAltNames", "insecureSkipVerify", *files):
            if raw.get(key) is not None:
                doc.warn(f"{path}.{key}", "tls mode DISABLE: connections are plain TCP")
        return UpstreamTls("DISABLE")
    if mode == "SIMPLE":
        for key in ("clientCertificate", "privateKey"):
            if files[key] is not None:
                doc.warn(f"{path}.{key}", "a client certificate is sent with mode MUTUAL only")
                files[key] = None
    if skip:
        for key in ("caCertificates", "caCrl", "subjectAltNames"):
            if raw.get(key) is not None:
                doc.warn(f"{path}.{key}", "insecureSkipVerify: true verifies nothing")
        files["caCertificates"] = files["caCrl"] = None
        sans = []
    try:
        context, digest, expiry = client_context(
            mode,
            ca_certificates=files["caCertificates"],
            client_certificate=files["clientCertificate"],
            private_key=files["privateKey"],
            subject_alt_names=tuple(sans),
            insecure_skip_verify=bool(skip),
            ca_crl=files["caCrl"],
        )
    except TlsSettingError as exc:
        doc.fail(f"{path}.{exc.key}", str(exc))
    return UpstreamTls(
        mode=cast(UpstreamTlsMode, mode),
        ca_certificates=files["caCertificates"],
        client_certificate=files["clientCertificate"],
        private_key=files["privateKey"],
        sni=sni,
        subject_alt_names=tuple(sans),
        insecure_skip_verify=bool(skip),
        ca_crl=files["caCrl"],
        digest=digest,
        expiry=expiry,
        context=context,
    )


_LISTENER_TLS_MODES = ("SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL", "ISTIO_MUTUAL")


def _listener_tls(
    doc: _Doc, listener: Mapping[str, Any], path: str, identity: MeshIdentity | None
) -> ListenerTls | None:
    """A listener's ``tls`` (Istio Gateway ``ServerTLSSettings`` field names); with
    ``ISTIO_MUTUAL``, the workload ``identity``'s certificate and root."""
    raw = doc.mapping(listener, "tls", f"{path}.tls", required=False)
    if not raw:
        return None
    path = f"{path}.tls"
    doc.check(raw, path, schema.LISTENER_TLS)
    mode = doc.string(raw, "mode", f"{path}.mode", required=False) or "SIMPLE"
    if mode in schema.LISTENER_TLS_MODES_REFUSED:
        why = schema.LISTENER_TLS_MODES_REFUSED[mode]
        doc.fail(f"{path}.mode", f"not supported by this engine: {why}")
    if mode not in _LISTENER_TLS_MODES:
        doc.fail(
            f"{path}.mode",
            f"unknown TLS mode {mode!r}; expected SIMPLE, MUTUAL, OPTIONAL_MUTUAL or "
            "ISTIO_MUTUAL (omit tls for plain TCP)",
        )
    if mode == "ISTIO_MUTUAL":
        if identity is None:
            doc.fail(f"{path}.mode", schema.NO_MESH_IDENTITY)
        for field in ("serverCertificate", "privateKey", "caCertificates", "caCrl"):
            if raw.get(field) is not None:
                doc.fail(
                    f"{path}.{field}", f"not with mode ISTIO_MUTUAL: {schema.ISTIO_MUTUAL_FILES}"
                )
        cert, key = identity.certificate_chain, identity.private_key
        ca: str | None = identity.root_certificates
    else:
        cert = cast(str, _tls_path_required(doc, raw, "serverCertificate", path))
        key = cast(str, _tls_path_required(doc, raw, "privateKey", path))
        ca = _tls_path(doc, raw, "caCertificates", path)
    if mode == "SIMPLE" and ca is not None:
        doc.warn(f"{path}.caCertificates", "client certificates are asked for with MUTUAL only")
        ca = None
    # What a client's certificate must be beyond its chain (Envoy's validation context).
    sans = _subject_alt_names(doc, raw, path)
    spki = _pins(doc, raw, "verifyCertificateSpki", path)
    hashes = _pins(doc, raw, "verifyCertificateHash", path)
    crl = _tls_path(doc, raw, "caCrl", path)
    if mode == "SIMPLE":  # an access rule not enforced must not pass unnoticed
        for check in ("subjectAltNames", "verifyCertificateSpki", "verifyCertificateHash", "caCrl"):
            if raw.get(check):
                doc.fail(
                    f"{path}.{check}",
                    "checks client certificates, which are asked for with mode MUTUAL or "
                    "OPTIONAL_MUTUAL only (mode is SIMPLE)",
                )
    versions = {}
    for field in ("minProtocolVersion", "maxProtocolVersion"):
        value = doc.string(raw, field, f"{path}.{field}", required=False)
        if value in (None, "TLS_AUTO"):
            continue
        if value not in PROTOCOL_VERSIONS:
            older = value in ("TLSV1_0", "TLSV1_1")
            doc.fail(
                f"{path}.{field}",
                f"not supported by this engine: {value} (TLS 1.0 and 1.1 are deprecated, RFC "
                "8996); expected TLSV1_2, TLSV1_3 or TLS_AUTO"
                if older
                else f"unknown TLS version {value!r}; expected TLSV1_2, TLSV1_3 or TLS_AUTO",
            )
        versions[field] = value
    low = versions.get("minProtocolVersion", "TLSV1_2")
    high = versions.get("maxProtocolVersion")
    if high is not None and PROTOCOL_VERSIONS[high] < PROTOCOL_VERSIONS[low]:
        doc.fail(f"{path}.maxProtocolVersion", f"{high} is below minProtocolVersion {low}")
    suites = doc.sequence(raw, "cipherSuites", f"{path}.cipherSuites", required=False)
    for i, suite in enumerate(suites):
        if not isinstance(suite, str) or not suite or ":" in suite:
            doc.fail(f"{path}.cipherSuites[{i}]", f"must be one cipher suite name, got {suite!r}")
    try:
        if identity is not None and mode == "ISTIO_MUTUAL":
            material = cast(IdentityMaterial, identity.material)
            context = material.server((low, high, tuple(suites)))
            digest = material.digest
            expiry: tuple[tuple[str, float], ...] = ()  # shown as the identity's
        else:
            context, digest, expiry = server_context(
                mode,
                server_certificate=cert,
                private_key=key,
                ca_certificates=ca,
                min_version=low,
                max_version=high,
                cipher_suites=tuple(suites),
                ca_crl=crl,
            )
    except TlsSettingError as exc:
        doc.fail(f"{path}.{exc.key}", str(exc))
    return ListenerTls(
        mode=cast(ListenerTlsMode, mode),
        server_certificate=cert,
        private_key=key,
        ca_certificates=ca,
        min_protocol_version=low,
        max_protocol_version=high,
        cipher_suites=tuple(suites),
        subject_alt_names=tuple(sans),
        verify_certificate_spki=spki,
        verify_certificate_hash=hashes,
        ca_crl=crl,
        digest=digest,
        expiry=expiry,
        context=context,
    )


def _tls_path_required(doc: _Doc, raw: Mapping[str, Any], key: str, path: str) -> str | None:
    return doc.string(raw, key, f"{path}.{key}")


def _connection_pool(doc: _Doc, policy: Mapping[str, Any], path: str) -> ConnectionPool | None:
    raw = _group(doc, policy, "connectionPool", path)
    if raw is None:
        return None
    path = f"{path}.connectionPool"
    doc.check(raw, path, schema.CONNECTION_POOL)
    tcp = doc.mapping(raw, "tcp", f"{path}.tcp", required=False)
    doc.check(tcp, f"{path}.tcp", schema.TCP_POOL)
    http = doc.mapping(raw, "http", f"{path}.http", required=False)
    doc.check(http, f"{path}.http", schema.HTTP_POOL)
    keepalive = None
    alive = doc.mapping(tcp, "tcpKeepalive", f"{path}.tcp.tcpKeepalive", required=False)
    if tcp.get("tcpKeepalive") is not None:  # {}: on, with the system's settings (as Envoy)
        kpath = f"{path}.tcp.tcpKeepalive"
        doc.check(alive, kpath, schema.TCP_KEEPALIVE)
        keepalive = TcpKeepalive(
            doc.integer(alive, "probes", f"{kpath}.probes", False, 1, 127),
            doc.duration(alive, "time", f"{kpath}.time"),
            doc.duration(alive, "interval", f"{kpath}.interval"),
        )

    def count(obj: Mapping[str, Any], key: str, where: str) -> int | None:
        return doc.integer(obj, key, f"{path}.{where}.{key}", False, 1, 2**31)

    return ConnectionPool(
        max_connections=count(tcp, "maxConnections", "tcp"),
        connect_timeout=doc.duration(tcp, "connectTimeout", f"{path}.tcp.connectTimeout"),
        keepalive=keepalive,
        max_connection_duration=_tcp_limit(doc, tcp, "maxConnectionDuration", f"{path}.tcp"),
        tcp_idle_timeout=_tcp_limit(doc, tcp, "idleTimeout", f"{path}.tcp"),
        max_pending_requests=count(http, "http1MaxPendingRequests", "http"),
        max_requests=count(http, "http2MaxRequests", "http"),
        max_requests_per_connection=count(http, "maxRequestsPerConnection", "http"),
        idle_timeout=doc.duration(http, "idleTimeout", f"{path}.http.idleTimeout"),
        max_retries=count(http, "maxRetries", "http"),
        max_concurrent_streams=count(http, "maxConcurrentStreams", "http"),
    )


def _tcp_limit(doc: _Doc, tcp: Mapping[str, Any], key: str, path: str) -> float | None:
    """``tcp.maxConnectionDuration`` or ``tcp.idleTimeout`` (or a listener's
    ``maxConnectionDuration``) in seconds: ``0s`` (or absent) is off (``None``), as in Istio;
    otherwise at least 1 ms (Istio's minimum) and at most 10 000 years (as any duration)."""
    value = doc.get(tcp, key, f"{path}.{key}")
    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        doc.fail(f"{path}.{key}", str(exc))
    if seconds == 0:
        return None
    if seconds < 1e-3:
        doc.fail(f"{path}.{key}", f"duration must be at least 1ms (or 0s: off), got {value!r}")
    return seconds


def _outlier_detection(doc: _Doc, policy: Mapping[str, Any], path: str) -> OutlierDetection | None:
    raw = _group(doc, policy, "outlierDetection", path)
    if raw is None:
        return None
    path = f"{path}.outlierDetection"
    doc.check(raw, path, schema.OUTLIER_DETECTION)
    default = OutlierDetection()

    def errors(key: str) -> int | None:
        # Istio: 0 disables the check; absent keeps the default (5 for 5xx, off for gateway).
        value = doc.integer(raw, key, f"{path}.{key}", False, 0, 2**31)
        return None if value == 0 else value

    gateway = errors("consecutiveGatewayErrors")
    five = errors("consecutive5xxErrors") if "consecutive5xxErrors" in raw else 5
    split = raw.get("splitExternalLocalOriginErrors", False)
    if not isinstance(split, bool):
        doc.fail(f"{path}.splitExternalLocalOriginErrors", f"must be true or false, got {split!r}")
    lpath = f"{path}.consecutiveLocalOriginFailures"
    # Istio: 0 or absent is Envoy's default, 5 (istiod writes only a positive value).
    local = doc.integer(raw, "consecutiveLocalOriginFailures", lpath, False, 0, 2**31) or 5
    if not split and "consecutiveLocalOriginFailures" in raw:
        doc.warn(lpath, "counted only with splitExternalLocalOriginErrors: true, as in Istio")
    return OutlierDetection(
        split_local_origin=split,
        consecutive_local_origin_failures=local,
        consecutive_gateway_errors=gateway,
        consecutive_errors=five,
        interval=doc.duration(raw, "interval", f"{path}.interval") or default.interval,
        base_ejection_time=doc.duration(raw, "baseEjectionTime", f"{path}.baseEjectionTime")
        or default.base_ejection_time,
        max_ejection_percent=_int_or(
            doc.integer(raw, "maxEjectionPercent", f"{path}.maxEjectionPercent", False, 0, 100),
            default.max_ejection_percent,
        ),
        min_health_percent=_int_or(
            doc.integer(raw, "minHealthPercent", f"{path}.minHealthPercent", False, 0, 100),
            default.min_health_percent,
        ),
    )


def _int_or(value: int | None, default: int) -> int:
    return default if value is None else value


def _destination_rules(
    docs: list[_Doc], services: dict[str, Service], identity: MeshIdentity | None = None
) -> dict[str, DestinationRule]:
    rules: dict[str, DestinationRule] = {}
    for doc in docs:
        spec = doc.spec()
        doc.check(spec, "spec", schema.DESTINATION_RULE)
        host = cast(str, doc.string(spec, "host", "spec.host"))
        if host not in services:
            if host.startswith("*"):
                doc.fail(
                    "spec.host",
                    f"not supported by this engine: wildcard host {host!r} (Istio applies the "
                    "rule to each service it matches); write one DestinationRule per host",
                )
            namespace = doc.body["metadata"].get("namespace")
            if "." not in host and isinstance(namespace, str):
                full = f"{host}.{namespace}.svc.cluster.local"
                doc.fail(
                    "spec.host",
                    f"no ServiceEntry defines host {host!r}; Istio reads this short name in "
                    f"namespace {namespace!r} as {full!r}: write that (this engine matches "
                    "hosts as written)",
                )
            doc.fail("spec.host", f"no ServiceEntry defines host {host!r}")
        if host in rules:
            doc.fail("spec.host", f"host {host!r} already has DestinationRule {rules[host].name!r}")
        service = services[host]
        policy = doc.mapping(spec, "trafficPolicy", "spec.trafficPolicy", required=False)
        lb = _load_balancer(doc, policy, "spec.trafficPolicy") or LoadBalancer()
        top = _traffic_policy(doc, policy, "spec.trafficPolicy", identity)
        _tunnel_alone(doc, "spec.trafficPolicy", top)
        ports = _port_settings(doc, policy, "spec.trafficPolicy", host, service, top, identity)
        subsets: dict[str, Subset] = {}
        for i, raw in enumerate(doc.sequence(spec, "subsets", "spec.subsets", required=False)):
            path = f"spec.subsets[{i}]"
            if not isinstance(raw, dict):
                doc.fail(path, "must be a mapping")
            doc.check(raw, path, schema.SUBSET)
            name = cast(str, doc.name_string(raw, "name", f"{path}.name"))
            if name in subsets:
                doc.fail(f"{path}.name", f"subset {name!r} is defined twice")
            labels = doc.labels(raw, "labels", f"{path}.labels")
            sub_policy = doc.mapping(raw, "trafficPolicy", f"{path}.trafficPolicy", False)
            sub_lb = _load_balancer(doc, sub_policy, f"{path}.trafficPolicy")
            own = _traffic_policy(doc, sub_policy, f"{path}.trafficPolicy", identity)
            sub_ports = _port_settings(
                doc, sub_policy, f"{path}.trafficPolicy", host, service, top, identity, ports, own
            )
            subsets[name] = Subset(name, labels, sub_lb, own.over(top), own, sub_ports)
            _tunnel_alone(doc, f"{path}.trafficPolicy", subsets[name].policy)
            _unnamed_servers(doc, f"{path}.trafficPolicy", own, service)
        _unnamed_servers(doc, "spec.trafficPolicy", top, service)
        for number, port_policy in ports.items():
            _unnamed_servers(
                doc, f"spec.trafficPolicy.portLevelSettings[{number}]", port_policy, service
            )
        rules[host] = DestinationRule(doc.name, host, lb, subsets, top, ports)
    return rules


def _tunnel_alone(doc: _Doc, path: str, policy: TrafficPolicy) -> None:
    """Refuse a ``tunnel`` with a ``proxyProtocol`` (set here or merged from the rule's): the
    header could be meant for the tunnel's proxy or for its target, and the engine would have
    to guess."""
    if policy.tunnel is not None and policy.proxy_protocol is not None:
        doc.fail(
            f"{path}.tunnel",
            "tunnel and proxyProtocol cannot be combined (here or with the rule's "
            "trafficPolicy): whether the PROXY protocol header is for the tunnel's proxy or "
            "for its target is ambiguous; set one of them",
        )


def _unnamed_servers(doc: _Doc, path: str, policy: TrafficPolicy, service: Service) -> None:
    """Caution about ``ISTIO_MUTUAL`` with no server names to check, here or in the
    ServiceEntry: any workload of the mesh would be accepted as the server."""
    tls = policy.tls
    if (
        tls is not None
        and tls.mode == "ISTIO_MUTUAL"
        and not tls.subject_alt_names
        and not service.subject_alt_names
    ):
        doc.caution(
            f"{path}.tls.subjectAltNames",
            "ISTIO_MUTUAL with no names here nor in the ServiceEntry's subjectAltNames: any "
            "workload certificate of the mesh is accepted as the server's",
        )


def _unnamed_auto_servers(
    docs: Sequence[_Doc], services: Mapping[str, Service], rules: Mapping[str, DestinationRule]
) -> None:
    """Caution about automatic mutual TLS to a service with no server names to check: any
    workload of the mesh would be accepted as the server (a DestinationRule whose
    ``trafficPolicy`` sets ``tls`` turns it off for the service, unless a port or subset
    sets none again: not looked into here)."""
    for doc in docs:
        for host in doc.spec().get("hosts", ()):
            service = services[host]
            rule = rules.get(host)
            if (
                service.source == doc.source
                and service.mesh_internal
                and not service.subject_alt_names
                and (rule is None or rule.policy.tls is None)
                and any(ep.labels.get(TLS_MODE_LABEL) == "istio" for ep in service.endpoints)
            ):
                doc.caution(
                    "spec.subjectAltNames",
                    f"automatic mutual TLS to the endpoints of {host} labelled "
                    f"{TLS_MODE_LABEL}: istio, with no names here nor in a DestinationRule: "
                    "any workload certificate of the mesh is accepted as the server's",
                )


def _port_settings(
    doc: _Doc,
    policy: Mapping[str, Any],
    path: str,
    host: str,
    service: Service,
    top: TrafficPolicy,
    identity: MeshIdentity | None,
    rule_ports: Mapping[int, TrafficPolicy] | None = None,
    own: TrafficPolicy | None = None,
) -> dict[int, TrafficPolicy]:
    """A ``trafficPolicy``'s ``portLevelSettings``, by port number.

    ``top`` is the rule's ``trafficPolicy``; for a subset's, ``rule_ports`` are the rule's
    port settings and ``own`` the subset's ``trafficPolicy``. They make the policy a port's
    settings replace: the groups it sets and they leave out are logged.
    """
    path = f"{path}.portLevelSettings"
    out: dict[int, TrafficPolicy] = {}
    where: dict[int, str] = {}
    for i, raw in enumerate(doc.sequence(policy, "portLevelSettings", path, required=False)):
        entry = f"{path}[{i}]"
        if not isinstance(raw, dict):
            doc.fail(entry, "must be a mapping")
        xds = doc.from_control_plane
        table = schema.PORT_TRAFFIC_POLICY_XDS if xds else schema.PORT_TRAFFIC_POLICY
        doc.check(raw, entry, table)
        selector = doc.mapping(raw, "port", f"{entry}.port")
        doc.check(selector, f"{entry}.port", schema.PORT_SELECTOR)
        number = cast(int, doc.integer(selector, "number", f"{entry}.port.number", True, 1, 65535))
        if number in out:
            doc.fail(
                f"{entry}.port.number", f"port {number} already has settings in {where[number]}"
            )
        if all(raw.get(group) is None for group, _ in _GROUP_ATTRS):
            groups = ", ".join(group for group, _ in _GROUP_ATTRS)
            doc.fail(entry, f"sets nothing for port {number}: set one of {groups}")
        port_policy = _traffic_policy(doc, raw, entry, identity, table)
        # Port settings have no retryBudget in Istio: istiod's merge drops the rule's for the
        # rule's, and gives a subset's the rule's for the port (not the subset's own).
        # The same for proxyProtocol (Istio's GetPortLevelTrafficPolicy and mergeTrafficPolicy).
        merged = None if own is None else (rule_ports or {}).get(number, top)
        if xds:
            budget = _retry_budget(doc, raw, entry, PORT_RETRY_BUDGET)
            header = _proxy_protocol(doc, raw, entry, PORT_PROXY_PROTOCOL)
            tunnel = None  # refused over xDS (see docs/xds.md)
        else:
            budget = None if merged is None else merged.retry_budget
            header = None if merged is None else merged.proxy_protocol
            tunnel = None if merged is None else merged.tunnel
        out[number] = dataclasses.replace(
            port_policy, retry_budget=budget, proxy_protocol=header, tunnel=tunnel
        )
        where[number] = entry
        if number not in service.ports:
            doc.caution(
                f"{entry}.port.number",
                f"host {host!r} has no port {number} in its ServiceEntry "
                f"(ports: {_some_ports(service)}): these settings apply to no traffic",
            )
            continue
        # A group set to nothing (tls DISABLE, an empty pool) is the default already.
        base = (own or TrafficPolicy()).over((rule_ports or {}).get(number, top)).applied()
        dropped = [
            group
            for group, attr in _GROUP_ATTRS
            if raw.get(group) is None and getattr(base, attr) is not None
        ]
        if dropped:
            doc.caution(
                entry,
                f"sets no {', '.join(dropped)}: traffic to port {number} has the defaults, "
                "not the trafficPolicy's (a port's settings replace the policy whole, as in "
                "Istio; repeat a group here to keep it)",
            )
        # The fields Istio's port settings lack: the port's value replaces this policy's.
        policy_here = top if own is None else own
        for field, value, replaced in (
            ("retryBudget", budget, policy_here.retry_budget),
            ("proxyProtocol", header, policy_here.proxy_protocol),
            ("tunnel", tunnel, policy_here.tunnel),
        ):
            if replaced is not None and value != replaced:
                has = f"no {field}" if value is None else f"the rule's {field}"
                doc.caution(
                    entry,
                    f"traffic to port {number} has {has}, not this trafficPolicy's: port "
                    f"settings have no {field}, and replace it (as in Istio)",
                )
    return out


def _some_ports(service: Service) -> str:
    """The service's port numbers, up to :data:`HOSTS_SHOWN` of them (in the file's order
    beyond: no sort of them all for each warning), and how many more."""
    if len(service.ports) <= HOSTS_SHOWN:
        return ", ".join(map(str, sorted(service.ports)))
    shown = ", ".join(map(str, islice(service.ports, HOSTS_SHOWN)))
    return f"{shown} and {len(service.ports) - HOSTS_SHOWN} more"


#: ``trafficPolicy`` groups and their :class:`TrafficPolicy` attributes.
_GROUP_ATTRS = (
    ("loadBalancer", "load_balancer"),
    ("connectionPool", "connection_pool"),
    ("outlierDetection", "outlier_detection"),
    ("tls", "tls"),
)


# -- MetaRouter --------------------------------------------------------------------------------


def _matches(doc: _Doc, route: dict[str, Any], path: str) -> tuple[AttributeMatch, ...]:
    match = doc.mapping(route, "match", f"{path}.match", required=False)
    doc.check(match, f"{path}.match", schema.MATCH)
    attrs = doc.mapping(match, "attributes", f"{path}.match.attributes", required=False)
    out = []
    for name, cond in attrs.items():
        cpath = f"{path}.match.attributes.{name}"
        if cond is None:
            cond = {}
        if not isinstance(cond, dict):
            doc.fail(cpath, "must be a mapping such as {exact: value}")
        if not cond:
            out.append(AttributeMatch(str(name), "present"))
            continue
        if len(cond) != 1 or next(iter(cond)) not in ("exact", "prefix", "regex"):
            doc.fail(cpath, f"expected exactly one of exact, prefix, regex; got {sorted(cond)}")
        kind, value = next(iter(cond.items()))
        if not isinstance(value, str):
            doc.fail(f"{cpath}.{kind}", f"must be a string, got {value!r}")
        if kind == "exact" and not value:
            # Aeraki writes it as Envoy's exact_match, which reads an empty value as
            # "present" (its gateway example routes every request so).
            out.append(AttributeMatch(str(name), "present"))
            continue
        if kind == "regex":
            if not value:
                doc.fail(f"{cpath}.regex", "must not be empty (Aeraki's validation refuses it)")
            try:
                compile_regex(value)
            except ValueError as exc:
                doc.fail(f"{cpath}.regex", f"invalid regular expression {value!r}: {exc}")
        out.append(AttributeMatch(str(name), kind, value))
    return tuple(out)


#: ServiceEntry hosts named in an unknown-host warning, at most: it is logged for every
#: such route, and listing them all made output grow as routes times hosts.
HOSTS_SHOWN = 10


def _some_hosts(services: dict[str, Service]) -> str:
    """The hosts of ``services``: all, sorted, up to :data:`HOSTS_SHOWN`; else that many of
    them, in the files' order (no sort of them all for each warning), and how many more."""
    if len(services) <= HOSTS_SHOWN:
        return ", ".join(sorted(services)) or "none"
    shown = ", ".join(islice(services, HOSTS_SHOWN))
    return f"{shown} and {len(services) - HOSTS_SHOWN} more"


def _destination(
    doc: _Doc,
    dest: Mapping[str, Any],
    path: str,
    services: dict[str, Service],
    rules: dict[str, DestinationRule],
    weight: int,
) -> Destination:
    """A route or mirror ``destination``: ``host``, optional ``subset`` and ``port.number``."""
    doc.check(dest, path, schema.DESTINATION)
    host = cast(str, doc.name_string(dest, "host", f"{path}.host"))
    subset = doc.name_string(dest, "subset", f"{path}.subset", required=False)
    port_obj = doc.mapping(dest, "port", f"{path}.port", required=False)
    doc.check(port_obj, f"{path}.port", schema.PORT_SELECTOR)
    port = doc.integer(port_obj, "number", f"{path}.port.number", False, 1, 65535)
    service = services.get(host)
    if service is None:
        # An unknown host stays allowed (it may appear later in a mesh), but in a file it is
        # most often a typo that --check would otherwise call OK.
        doc.caution(
            f"{path}.host",
            f"no ServiceEntry defines host {host!r}: requests routed to it get a "
            f"ClusterNotFound reply until one does; ServiceEntry hosts: {_some_hosts(services)}",
        )
    else:
        port = _resolve_port(doc, service, port, None, f"{path}.port")
        if subset is not None:
            rule = rules.get(host)
            if rule is None or subset not in rule.subsets:
                known = sorted(rule.subsets) if rule else []
                doc.fail(
                    f"{path}.subset",
                    f"unknown subset {subset!r} of host {host!r}; DestinationRule "
                    f"subsets: {', '.join(known) or 'none'}",
                )
    return Destination(host, subset, port, weight)


def _percent(doc: _Doc, obj: Mapping[str, Any], key: str, path: str) -> float | None:
    """Istio's ``Percent``: ``{value: <double in 0-100>}``."""
    raw = doc.mapping(obj, key, path, required=False)
    if not raw:
        return None
    doc.check(raw, path, schema.PERCENT)
    value = doc.get(raw, "value", f"{path}.value", required=True)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        doc.fail(f"{path}.value", f"must be a number in [0, 100], got {value!r}")
    return float(value)


def _fault(doc: _Doc, route: Mapping[str, Any], path: str) -> Fault | None:
    raw = doc.mapping(route, "fault", f"{path}.fault", required=False)
    if not raw:
        return None
    path = f"{path}.fault"
    doc.check(raw, path, schema.FAULT)
    delay = doc.mapping(raw, "delay", f"{path}.delay", required=False)
    abort = doc.mapping(raw, "abort", f"{path}.abort", required=False)
    if not delay and not abort:
        doc.fail(path, "needs a delay, an abort or both")
    fault = Fault()
    if delay:
        doc.check(delay, f"{path}.delay", schema.DELAY)
        fixed = doc.duration(delay, "fixedDelay", f"{path}.delay.fixedDelay")
        if fixed is None:
            doc.fail(f"{path}.delay.fixedDelay", "required field is missing")
        share = _percent(doc, delay, "percentage", f"{path}.delay.percentage")
        fault = Fault(delay_percent=100.0 if share is None else share, delay=fixed)
    if abort:
        doc.check(abort, f"{path}.abort", schema.ABORT)
        name = cast(str, doc.string(abort, "errorType", f"{path}.abort.errorType"))
        if name not in ErrorType.__members__:
            doc.fail(
                f"{path}.abort.errorType",
                f"unknown error type {name!r}; expected one of {', '.join(ErrorType.__members__)}",
            )
        share = _percent(doc, abort, "percentage", f"{path}.abort.percentage")
        fault = Fault(
            fault.delay_percent,
            fault.delay,
            100.0 if share is None else share,
            ErrorType[name],
        )
    return fault


def _mirror(
    doc: _Doc,
    route: Mapping[str, Any],
    path: str,
    services: dict[str, Service],
    rules: dict[str, DestinationRule],
) -> Mirror | None:
    raw = doc.mapping(route, "mirror", f"{path}.mirror", required=False)
    share = _percent(doc, route, "mirrorPercentage", f"{path}.mirrorPercentage")
    if not raw:
        if share is not None:
            doc.fail(f"{path}.mirrorPercentage", "needs a mirror")
        return None
    dest = _destination(doc, raw, f"{path}.mirror", services, rules, 100)
    return Mirror(dest, 100.0 if share is None else share)


def _retries(doc: _Doc, route: Mapping[str, Any], path: str) -> Retries | None:
    raw = doc.mapping(route, "retries", f"{path}.retries", required=False)
    if not raw:
        return None
    path = f"{path}.retries"
    doc.check(raw, path, schema.RETRIES)
    attempts = cast(int, doc.integer(raw, "attempts", f"{path}.attempts", low=0, high=10))
    per_try = doc.duration(raw, "perTryTimeout", f"{path}.perTryTimeout")
    on = doc.string(raw, "retryOn", f"{path}.retryOn", required=False)
    conditions = Retries.retry_on
    if on is not None:
        conditions = frozenset(c.strip() for c in on.split(",") if c.strip())
        for c in sorted(conditions):
            if c not in RETRY_ON:
                doc.fail(
                    f"{path}.retryOn",
                    f"unknown retry condition {c!r}; expected some of {', '.join(RETRY_ON)}",
                )
    return Retries(attempts, per_try, conditions)


def _bucket(doc: _Doc, obj: Mapping[str, Any], path: str) -> TokenBucket | None:
    raw = doc.mapping(obj, "tokenBucket", path, required=False)
    if not raw:
        return None
    doc.check(raw, path, schema.TOKEN_BUCKET)
    most = cast(int, doc.integer(raw, "maxTokens", f"{path}.maxTokens", low=1))
    fill = doc.integer(raw, "tokensPerFill", f"{path}.tokensPerFill", False, 1)
    interval = doc.duration(raw, "fillInterval", f"{path}.fillInterval")
    if interval is None:
        doc.fail(f"{path}.fillInterval", "required field is missing")
    return TokenBucket(most, fill or 1, interval)


def _connection_rate_limit(doc: _Doc, listener: Mapping[str, Any], path: str) -> TokenBucket | None:
    """A listener's ``connectionRateLimit`` (Envoy's listener filter ``local_ratelimit``):
    its ``tokenBucket``, required."""
    raw = doc.mapping(listener, "connectionRateLimit", f"{path}.connectionRateLimit", False)
    if not raw:
        return None
    path = f"{path}.connectionRateLimit"
    doc.check(raw, path, schema.CONNECTION_RATE_LIMIT)
    bucket = _bucket(doc, raw, f"{path}.tokenBucket")
    if bucket is None:
        doc.fail(f"{path}.tokenBucket", "required field is missing")
    return bucket


def _local_rate_limit(doc: _Doc, spec: Mapping[str, Any]) -> LocalRateLimit | None:
    raw = doc.mapping(spec, "localRateLimit", "spec.localRateLimit", required=False)
    if not raw:
        return None
    path = "spec.localRateLimit"
    doc.check(raw, path, schema.LOCAL_RATE_LIMIT)
    conditions = []
    for i, cond in enumerate(doc.sequence(raw, "conditions", f"{path}.conditions", False)):
        cpath = f"{path}.conditions[{i}]"
        if not isinstance(cond, dict):
            doc.fail(cpath, "must be a mapping")
        doc.check(cond, cpath, schema.RATE_LIMIT_CONDITION)
        bucket = _bucket(doc, cond, f"{cpath}.tokenBucket")
        if bucket is None:
            doc.fail(f"{cpath}.tokenBucket", "required field is missing")
        conditions.append(RateLimitCondition(_matches(doc, cond, cpath), bucket))
    default = _bucket(doc, raw, f"{path}.tokenBucket")
    if default is None and not conditions:
        doc.fail(path, "needs a tokenBucket, conditions or both")
    return LocalRateLimit(default, tuple(conditions))


#: Aeraki's ``rateLimitService``: an Envoy cluster name, ``outbound|<port>|<subset>|<host>``.
_CLUSTER_NAME = re.compile(r"outbound\|(\d{1,5})\|([^|]*)\|([^|]+)")


def _global_rate_limit(
    doc: _Doc,
    spec: Mapping[str, Any],
    services: dict[str, Service],
    rules: dict[str, DestinationRule],
) -> GlobalRateLimit | None:
    """``spec.globalRateLimit`` (Aeraki): ``match``, ``domain``, ``rateLimitService`` (a
    cluster whose ServiceEntry endpoints serve Envoy's RLS API), ``descriptors``,
    ``requestTimeout`` (default 20ms), ``denyOnFail`` (default false)."""
    raw = doc.mapping(spec, "globalRateLimit", "spec.globalRateLimit", required=False)
    if not raw:
        return None
    path = "spec.globalRateLimit"
    doc.check(raw, path, schema.GLOBAL_RATE_LIMIT)
    from ..global_ratelimit import missing_extra  # tries gRPC only when configured

    why = missing_extra()
    if why is not None:
        doc.fail(path, why)
    domain = cast(str, doc.string(raw, "domain", f"{path}.domain"))
    name = cast(str, doc.string(raw, "rateLimitService", f"{path}.rateLimitService"))
    endpoints = _rate_limit_endpoints(doc, name, f"{path}.rateLimitService", services, rules)
    descriptors = []
    for i, item in enumerate(doc.sequence(raw, "descriptors", f"{path}.descriptors")):
        dpath = f"{path}.descriptors[{i}]"
        if not isinstance(item, dict):
            doc.fail(dpath, "must be a mapping {property: ..., descriptorKey: ...}")
        doc.check(item, dpath, schema.RATE_LIMIT_DESCRIPTOR)
        prop = cast(str, doc.string(item, "property", f"{dpath}.property"))
        key = cast(str, doc.string(item, "descriptorKey", f"{dpath}.descriptorKey"))
        descriptors.append(RateLimitDescriptor(prop, key))
    timeout = doc.duration(raw, "requestTimeout", f"{path}.requestTimeout")
    if timeout is not None and timeout > 3600:
        doc.fail(f"{path}.requestTimeout", "must be at most 1h")
    deny = doc.get(raw, "denyOnFail", f"{path}.denyOnFail")
    if deny is not None and not isinstance(deny, bool):
        doc.fail(f"{path}.denyOnFail", f"must be true or false, got {deny!r}")
    return GlobalRateLimit(
        match=_matches(doc, raw, path),
        domain=domain,
        service=name,
        endpoints=endpoints,
        descriptors=tuple(descriptors),
        request_timeout=GlobalRateLimit.request_timeout if timeout is None else timeout,
        deny_on_fail=bool(deny),
    )


def _rate_limit_endpoints(
    doc: _Doc,
    name: str,
    path: str,
    services: dict[str, Service],
    rules: dict[str, DestinationRule],
) -> tuple[tuple[str, int], ...]:
    """The ``(address, port)`` endpoints of the cluster ``name`` (Istio's naming)."""
    found = _CLUSTER_NAME.fullmatch(name)
    if found is None:
        doc.fail(
            path,
            f"must be a cluster name outbound|<port>|<subset>|<host> (as Aeraki's), got {name!r}",
        )
    number, subset, host = int(found[1]), found[2] or None, found[3]
    service = services.get(host)
    if service is None:
        doc.fail(path, f"no ServiceEntry defines host {host!r}")
    sport = service.ports.get(number)
    if sport is None:
        known = ", ".join(str(p) for p in sorted(service.ports))
        doc.fail(path, f"service {service.name!r} has no port {number}; its ports: {known}")
    labels: dict[str, str] = {}
    if subset is not None:
        rule = rules.get(host)
        if rule is None or subset not in rule.subsets:
            doc.fail(path, f"unknown subset {subset!r} of host {host!r}")
        labels = rule.subsets[subset].labels
    endpoints = tuple(
        (ep.address, ep.port_for(sport))
        for ep in service.endpoints
        if labels.items() <= ep.labels.items()
    )
    if not endpoints:
        doc.fail(path, f"cluster {name} has no endpoint (ServiceEntry {service.name!r})")
    if len(endpoints) > 1:
        versions = set()
        for address, _ in endpoints:
            try:
                versions.add(ipaddress.ip_address(address).version)
            except ValueError:
                doc.fail(
                    path,
                    f"endpoint {address!r} of {name} is a name: a rate limit service with "
                    "several endpoints takes IP addresses (or give it one endpoint name)",
                )
        if len(versions) > 1:
            doc.fail(path, f"the endpoints of {name} mix IPv4 and IPv6 addresses")
    return endpoints


def _filters(
    doc: _Doc, raw: Mapping[str, Any], path: str, plugins: Plugins
) -> tuple[FilterSpec, ...]:
    """A listener's ``filters``: ``[{name: <registry name or module:Class>, config: {...}}]``."""
    specs = []
    for i, item in enumerate(doc.sequence(raw, "filters", f"{path}.filters", required=False)):
        fpath = f"{path}.filters[{i}]"
        if not isinstance(item, dict):
            doc.fail(fpath, "must be a mapping such as {name: audit, config: {}}")
        doc.check(item, fpath, schema.FILTER)
        name = cast(str, doc.string(item, "name", f"{fpath}.name"))
        config = doc.mapping(item, "config", f"{fpath}.config", required=False)
        try:
            cls = plugins.filter(name).load()
        except RegistryError as exc:
            doc.fail(f"{fpath}.name", str(exc))
        spec = FilterSpec(name, cls, dict(config))
        try:
            spec.create()  # validate the settings now, not on the first request
        except ConfigError as exc:
            where = f"{fpath}.config.{exc.field}" if exc.field else f"{fpath}.config"
            doc.fail(where, exc.reason)
        except Exception as exc:  # its constructor failed (a bug, a file it needs): say whose
            doc.fail(fpath, _not_built("filter", name, exc))
        specs.append(spec)
    return tuple(specs)


def _mutation(doc: _Doc, route: dict[str, Any], key: str, path: str) -> dict[str, str]:
    out = {}
    for i, item in enumerate(doc.sequence(route, key, f"{path}.{key}", required=False)):
        ipath = f"{path}.{key}[{i}]"
        if not isinstance(item, dict):
            doc.fail(ipath, "must be a mapping {key: ..., value: ...}")
        doc.check(item, ipath, schema.KEY_VALUE)
        k = cast(str, doc.string(item, "key", f"{ipath}.key"))
        v = doc.get(item, "value", f"{ipath}.value", required=True)
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            doc.fail(f"{ipath}.value", f"must be a string (quote it in YAML), got {v!r}")
        out[k] = str(v)
    return out


def _resolve_port(
    doc: _Doc, service: Service, port: int | None, protocol: str | None, path: str
) -> int | None:
    """The service port a destination uses; ``None`` means "the listener's port" (decided later)."""
    if port is not None:
        if port not in service.ports:
            doc.fail(path, f"service {service.name!r} has no port {port}")
        if service.ports[port].protocol is None:
            doc.fail(path, f"port {port} of service {service.name!r} is not a metaprotocol port")
        return port
    meta = [p.number for p in service.ports.values() if p.protocol is not None]
    if not meta:
        doc.fail(path, f"service {service.name!r} has no tcp-metaprotocol-* port")
    return meta[0] if len(meta) == 1 else None


def _routers(
    docs: list[_Doc],
    services: dict[str, Service],
    rules: dict[str, DestinationRule],
    protocols: dict[str, Protocol],
) -> dict[str, MetaRouter]:
    routers: dict[str, MetaRouter] = {}
    for doc in docs:
        spec = doc.spec()
        doc.check(spec, "spec", schema.META_ROUTER)
        gateways = doc.sequence(spec, "gateways", "spec.gateways", required=False)
        for i, gateway in enumerate(gateways):
            if gateway != schema.MESH_GATEWAY:
                doc.fail(
                    f"spec.gateways[{i}]",
                    f"not supported by this engine: gateway {gateway!r} (the routes apply to "
                    f"this engine's traffic, Istio's {schema.MESH_GATEWAY!r}; omit gateways or "
                    f"list only {schema.MESH_GATEWAY!r})",
                )
        hosts = doc.sequence(spec, "hosts", "spec.hosts")
        for i, host in enumerate(hosts):
            if not isinstance(host, str) or not host:
                doc.fail(f"spec.hosts[{i}]", f"must be a non-empty string, got {host!r}")
            if host not in services:
                doc.fail(f"spec.hosts[{i}]", f"no ServiceEntry defines host {host!r}")
            if host in routers:
                doc.fail(
                    f"spec.hosts[{i}]",
                    f"host {host!r} already has MetaRouter {routers[host].name!r}",
                )
        routes = []
        seen: set[str] = set()
        # Without routes (Aeraki's rate limit examples) the host's traffic takes the default
        # route, to the host itself, as with no MetaRouter; the rate limits apply to it.
        for r, raw in enumerate(doc.sequence(spec, "routes", "spec.routes", required=False)):
            path = f"spec.routes[{r}]"
            if not isinstance(raw, dict):
                doc.fail(path, "must be a mapping")
            doc.check(raw, path, schema.ROUTE)
            name = doc.name_string(raw, "name", f"{path}.name", required=False) or f"route-{r}"
            if name in seen:
                doc.fail(f"{path}.name", f"route name {name!r} is used twice")
            seen.add(name)
            dests = []
            for d, draw in enumerate(doc.sequence(raw, "route", f"{path}.route")):
                dpath = f"{path}.route[{d}]"
                if not isinstance(draw, dict):
                    doc.fail(dpath, "must be a mapping")
                doc.check(draw, dpath, schema.ROUTE_DESTINATION)
                dest = doc.mapping(draw, "destination", f"{dpath}.destination")
                weight = doc.integer(draw, "weight", f"{dpath}.weight", required=False, high=100)
                dests.append(
                    _destination(doc, dest, f"{dpath}.destination", services, rules, weight or 0)
                )
            if len(dests) > 1:
                total = sum(dest.weight for dest in dests)
                if total != 100:
                    doc.fail(
                        f"{path}.route",
                        f"weights of a split must sum to 100, got {total} "
                        f"({' + '.join(str(dest.weight) for dest in dests)})",
                    )
            elif dests[0].weight not in (0, 100):
                doc.fail(f"{path}.route[0].weight", "a single destination takes weight 100 or none")
            timeout = doc.duration(raw, "timeout", f"{path}.timeout")
            routes.append(
                Route(
                    name=name,
                    match=_matches(doc, raw, path),
                    destinations=tuple(dests),
                    request_mutation=_mutation(doc, raw, "requestMutation", path),
                    response_mutation=_mutation(doc, raw, "responseMutation", path),
                    timeout=timeout,
                    fault=_fault(doc, raw, path),
                    mirror=_mirror(doc, raw, path, services, rules),
                    retries=_retries(doc, raw, path),
                )
            )
        for r, route in enumerate(routes[:-1]):
            if not route.match:
                doc.caution(
                    f"spec.routes[{r}].match",
                    f"route {route.name!r} matches every request: the routes after it are "
                    "never reached (only the last route may have no match)",
                )
                break
        router = MetaRouter(
            doc.name,
            tuple(hosts),
            tuple(routes),
            doc.source,
            _local_rate_limit(doc, spec),
            _global_rate_limit(doc, spec, services, rules),
            default_route=not routes and not doc.from_control_plane,
        )
        if router.default_route and not (router.local_rate_limit or router.global_rate_limit):
            doc.fail(
                "spec.routes",
                "a MetaRouter needs routes, localRateLimit or globalRateLimit (as Aeraki's "
                "validation says); without them, leave the MetaRouter out",
            )
        for host in hosts:
            _check_capabilities(doc, router, services[host], protocols)
            routers[host] = router
    return routers


def _check_capabilities(
    doc: _Doc, router: MetaRouter, service: Service, protocols: dict[str, Protocol]
) -> None:
    for port in service.ports.values():
        if port.protocol is None:
            continue
        # As configured: codec options may rule mutations out (a forced header-less transport).
        protocol = protocols[port.protocol]
        try:
            caps = protocol.create_codec().active_capabilities
        except Exception as exc:  # built once already: a constructor that fails sometimes
            doc.fail("spec", _not_built("codec", protocol.codec_name, exc))
        for r, route in enumerate(router.routes):
            if route.request_mutation and not caps.mutation:
                doc.fail(
                    f"spec.routes[{r}].requestMutation",
                    f"codec for protocol {port.protocol!r} cannot write request mutations"
                    " (as configured: see its capabilities and codecOptions)",
                )
            if route.response_mutation and not caps.response_mutation:
                doc.fail(
                    f"spec.routes[{r}].responseMutation",
                    f"codec for protocol {port.protocol!r} cannot write response mutations"
                    " (as configured: see its capabilities and codecOptions)",
                )


def _check_router_ports(
    router: MetaRouter | None,
    listener: Listener,
    services: dict[str, Service],
    proxy_doc: _Doc | None,
) -> None:
    """Destinations must speak the listener's protocol: the engine does not translate."""
    if router is None or proxy_doc is None:
        return
    proto = services[listener.host].ports[listener.port].protocol
    for route in router.routes:
        for dest in route.destinations:
            service = services.get(dest.host)
            if service is None:
                continue
            port = dest.port if dest.port is not None else listener.port
            if port not in service.ports:
                raise ConfigError(
                    f"destination {dest.host!r} of route {route.name!r} has no port "
                    f"{listener.port} (the listener's port); set destination.port.number",
                    source=router.source,
                    field=f"route {route.name}",
                )
            if service.ports[port].protocol != proto:
                raise ConfigError(
                    f"destination {dest.host}:{port} of route {route.name!r} speaks "
                    f"{service.ports[port].protocol!r}, the listener speaks {proto!r}",
                    source=router.source,
                    field=f"route {route.name}",
                )


# -- ProxyConfig -------------------------------------------------------------------------------


def _bind(doc: _Doc, value: Any, path: str) -> tuple[str, int]:
    if not isinstance(value, str) or ":" not in value:
        doc.fail(path, f"expected 'host:port', got {value!r}")
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    number = port_number(port)
    if not host or number is None or not 0 <= number <= 65535:
        doc.fail(path, f"expected 'host:port' with a port in 0-65535, got {value!r}")
    return host, number


def _proxy(
    doc: _Doc | None,
    services: dict[str, Service],
    codec_options: dict[str, dict[str, Any]],
    plugins: Plugins,
    identity: MeshIdentity | None = None,
    peer: PeerAuthentication | None = None,
    telemetry: Telemetry | None = None,
) -> ProxySettings:
    if doc is None:
        return ProxySettings(peer_authentication=peer)
    spec = doc.spec()
    doc.check(spec, "spec", schema.PROXY_CONFIG)
    listeners: list[Listener] = []
    for i, raw in enumerate(doc.sequence(spec, "listeners", "spec.listeners", required=False)):
        path = f"spec.listeners[{i}]"
        if not isinstance(raw, dict):
            doc.fail(path, "must be a mapping")
        doc.check(raw, path, schema.LISTENER)
        host = cast(str, doc.string(raw, "host", f"{path}.host"))
        port = cast(int, doc.integer(raw, "port", f"{path}.port", low=1, high=65535))
        bind = _bind(doc, doc.get(raw, "bind", f"{path}.bind", required=True), f"{path}.bind")
        service = services.get(host)
        if service is None:
            doc.fail(f"{path}.host", f"no ServiceEntry defines host {host!r}")
        if port not in service.ports:
            doc.fail(f"{path}.port", f"service {service.name!r} has no port {port}")
        if service.ports[port].protocol is None:
            doc.fail(
                f"{path}.port",
                f"port {port} ({service.ports[port].name!r}) is not named "
                "tcp-metaprotocol-<protocol>-<name>",
            )
        for other in listeners:
            if (other.host, other.port) == (host, port):
                doc.fail(path, f"duplicate listener for {host}:{port}")
            if bind[1] and (other.bind_host, other.bind_port) == bind:
                doc.fail(f"{path}.bind", f"address {bind[0]}:{bind[1]} is used by {other.name}")
        tls = _listener_tls(doc, raw, path, identity)
        mode: PeerMode | None = None
        if tls is None and identity is not None:  # Istio's sidecar inbound: PeerAuthentication
            mode = (peer or PeerAuthentication()).mode_for(bind[1])
            if mode != "DISABLE":
                tls = _listener_tls(doc, {"tls": {"mode": "ISTIO_MUTUAL"}}, path, identity)
        listeners.append(
            Listener(
                host,
                port,
                bind[0],
                bind[1],
                _filters(doc, raw, path, plugins),
                tls,
                _connection_rate_limit(doc, raw, path),
                mode,
                _tcp_limit(doc, raw, "maxConnectionDuration", path),  # 0s: off, as Envoy's
            )
        )
    if peer is not None and identity is not None:
        _unmatched_ports(doc, peer, listeners)
    admin = _admin(doc, spec)
    limits = _limits(doc, spec)
    overload = _overload(doc, spec)
    timeouts = _timeouts(doc, spec)
    watchdog = _watchdog(doc, spec)
    access_log = _access_log(doc, spec)
    up = doc.mapping(spec, "upstream", "spec.upstream", required=False)
    doc.check(up, "spec.upstream", schema.UPSTREAM)
    per_endpoint = doc.integer(
        up, "connectionsPerEndpoint", "spec.upstream.connectionsPerEndpoint", False, 1, 1024
    )
    heartbeat = _upstream_heartbeat(doc, up)
    telemetry = telemetry or _telemetry(doc, spec)
    return ProxySettings(
        listeners=tuple(listeners),
        admin=admin,
        codec_options=codec_options,
        limits=limits,
        overload=overload,
        timeouts=timeouts,
        watchdog=watchdog,
        access_log=access_log,
        connections_per_endpoint=per_endpoint or 1,
        upstream_heartbeat=heartbeat,
        telemetry=telemetry,
        tracing=_tracing(doc, spec),
        xds=_xds(doc, spec, telemetry.workload.locality),
        mesh_identity=identity,
        tls_files_check=_tls_files(doc, spec),
        peer_authentication=peer,
    )


def _tls_files(doc: _Doc, spec: Mapping[str, Any]) -> float | None:
    """``spec.tlsFiles``: ``follow`` (default true) and ``checkInterval`` (5s, 100ms-1h):
    how often ``metaprotocol proxy`` looks at the TLS files (``None``: never)."""
    raw = doc.mapping(spec, "tlsFiles", "spec.tlsFiles", required=False)
    doc.check(raw, "spec.tlsFiles", schema.TLS_FILES)
    follow = doc.get(raw, "follow", "spec.tlsFiles.follow")
    if follow is not None and not isinstance(follow, bool):
        doc.fail("spec.tlsFiles.follow", f"must be true or false, got {follow!r}")
    interval = doc.duration(raw, "checkInterval", "spec.tlsFiles.checkInterval")
    if interval is not None and not MIN_IDENTITY_CHECK <= interval <= MAX_IDENTITY_CHECK:
        doc.fail(
            "spec.tlsFiles.checkInterval",
            f"must be between {MIN_IDENTITY_CHECK * 1000:g}ms and {MAX_IDENTITY_CHECK / 60:g}m",
        )
    if follow is False:
        return None
    return 5.0 if interval is None else interval


#: Shortest heartbeat ``interval`` and ``timeout``: each is looked at by the housekeeping
#: sweep, which runs a quarter of the shortest timeout apart (at least 20 ms).
HEARTBEAT_MIN = 0.1


def _upstream_heartbeat(doc: _Doc, up: Mapping[str, Any]) -> UpstreamHeartbeat:
    """``spec.upstream.heartbeat``: ``interval`` (``0s``: no pings) and ``timeout``, each at
    least :data:`HEARTBEAT_MIN`."""
    raw = doc.mapping(up, "heartbeat", "spec.upstream.heartbeat", required=False)
    path = "spec.upstream.heartbeat"
    doc.check(raw, path, schema.HEARTBEAT)
    interval: float | None = UpstreamHeartbeat.interval
    value = doc.get(raw, "interval", f"{path}.interval")
    if value is not None:
        try:
            interval = parse_duration(value) or None  # 0s: off
        except ValueError as exc:
            doc.fail(f"{path}.interval", str(exc))
    timeout = doc.duration(raw, "timeout", f"{path}.timeout") or UpstreamHeartbeat.timeout
    for key, seconds in (("interval", interval), ("timeout", timeout)):
        if seconds is not None and seconds < HEARTBEAT_MIN:
            doc.fail(f"{path}.{key}", f"must be at least {HEARTBEAT_MIN * 1000:g}ms")
    return UpstreamHeartbeat(interval, timeout)


#: PeerAuthentication levels, lowest first (istiod's ``ComposePeerAuthentication``).
_PEER_LEVELS = ("mesh", "namespace", "workload")


def _peer_authentication(
    docs: list[_Doc], identity: MeshIdentity | None, scope: PolicyScope | None
) -> PeerAuthentication | None:
    """The PeerAuthentications that apply to this workload (``docs``, selected), composed as
    istiod does: the workload level (a ``selector``) over the namespace level (no selector,
    the workload's namespace) over the mesh level (no selector, the root namespace),
    ``UNSET`` inheriting, ``PERMISSIVE`` when none says. The workload's namespace unknown
    (``scope`` ``None``), one without a selector is the namespace-or-mesh level, and one
    with a selector is taken as selecting this engine. Of several of one level, the oldest
    applies (``metadata.creationTimestamp``, then the name), as istiod decides; without a
    creation time on both, or the namespace unknown, several are an error."""
    if not docs:
        return None
    levels: dict[str, tuple[_Doc, str, dict[int, str]]] = {}
    # Those not applied (a level of several: its oldest applies), with their level.
    ignored: list[tuple[str, _Doc]] = []
    for doc in docs:
        spec = doc.spec()
        doc.check(spec, "spec", schema.PEER_AUTHENTICATION)
        selector = doc.mapping(spec, "selector", "spec.selector", required=False)
        doc.check(selector, "spec.selector", schema.PEER_SELECTOR)
        labels = label_map(doc, selector, "matchLabels", "spec.selector.matchLabels")
        workload = bool(labels)  # Istio: an empty selector is no selector
        if scope is None:
            if doc.body["metadata"].get("namespace") is not None:
                doc.warn("metadata.namespace", schema.PEER_NO_NAMESPACE)
            if workload:
                doc.caution(
                    "spec.selector",
                    "its labels are not matched (this workload's namespace is not known: "
                    "set spec.telemetry.workload.namespace or POD_NAMESPACE): the "
                    "PeerAuthentication is taken as selecting this engine (workload level, "
                    "over one without a selector)",
                )
            level = "workload" if workload else "namespace"
        elif workload:
            level = "workload"
        else:
            mesh = namespace_of(doc, scope.namespace) == scope.root_namespace
            level = "mesh" if mesh else "namespace"
        mtls = doc.mapping(spec, "mtls", "spec.mtls", required=False)
        doc.check(mtls, "spec.mtls", schema.PEER_MTLS)
        mode = _peer_mode(doc, mtls, "spec.mtls.mode", identity)
        ports: dict[int, str] = {}
        raw_ports = doc.mapping(spec, "portLevelMtls", "spec.portLevelMtls", required=False)
        if raw_ports and not workload:
            doc.fail(
                "spec.portLevelMtls",
                "portLevelMtls requires selector (as Istio's validation says): port-level "
                "modes belong to a workload's PeerAuthentication",
            )
        for key, value in raw_ports.items():
            where = f"spec.portLevelMtls.{key}"
            digits = isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 5
            number = int(key) if digits else key  # (int() of 5000 digits raises ValueError)
            if isinstance(number, bool) or not isinstance(number, int) or not 0 < number < 65536:
                doc.fail(where, f"must be a port number (1-65535), got {key!r}")
            if not isinstance(value, dict):
                doc.fail(where, f"must be a mapping with mode, got {type(value).__name__}")
            doc.check(value, where, schema.PEER_MTLS)
            ports[number] = _peer_mode(doc, value, f"{where}.mode", identity)
        if level in levels:
            other = levels[level][0]
            if scope is None:
                what = "with a selector" if workload else "without a selector"
                why = (
                    f"a second PeerAuthentication {what} ({other.kind}/{other.name} is one): "
                    "this workload's namespace is not known, so one of each applies (Istio "
                    "would take the oldest); merge them, or set the workload's namespace"
                )
                doc.fail("kind", why)
            older = _older(other, doc, scope, level)
            ignored.append((level, other if older is doc else doc))
            if older is other:
                continue
        levels[level] = (doc, mode, ports)
    for level, doc in ignored:  # named once the oldest of its level is known
        assert scope is not None
        older = levels[level][0]
        doc.caution(
            "metadata.creationTimestamp",
            f"a second PeerAuthentication of this workload's {level} level: "
            f"{older.kind}/{namespace_of(older, scope.namespace)}/{older.name}, the "
            "oldest (or first by name of the oldest), applies, as istiod decides; this "
            "one is ignored",
        )
    effective: PeerMode = "PERMISSIVE"
    for level in _PEER_LEVELS:
        if level in levels and levels[level][1] != "UNSET":
            effective = cast(PeerMode, levels[level][1])
    ports = levels["workload"][2] if "workload" in levels else {}
    return PeerAuthentication(
        effective,
        {
            port: effective if mode == "UNSET" else cast(PeerMode, mode)
            for port, mode in ports.items()
        },
        tuple(
            f"{doc.kind}/{doc.name}"
            if scope is None
            else f"{doc.kind}/{namespace_of(doc, scope.namespace)}/{doc.name}"
            for level in _PEER_LEVELS
            if level in levels
            for doc in (levels[level][0],)
        ),
    )


def _older(first: _Doc, second: _Doc, scope: PolicyScope, level: str) -> _Doc:
    """Which of two PeerAuthentications of one level istiod applies: the one created first
    (``metadata.creationTimestamp``), then the first by name and namespace (istiod's
    ``sortConfigByCreationTime``). Both must say when they were created."""
    created = []
    for doc in (first, second):
        when = _creation_time(doc)
        if when is None:
            second.fail(
                "kind",
                f"a second PeerAuthentication of this workload's {level} level ({first.source} "
                "is one): istiod applies the oldest, and without metadata.creationTimestamp "
                f"on both ({doc.kind}/{doc.name} has none) which one is not known; give both "
                "their creationTimestamp (kubectl get -o yaml writes it), or merge them",
            )
        created.append((when, doc.name, namespace_of(doc, scope.namespace)))
    return first if created[0] <= created[1] else second


def _creation_time(doc: _Doc) -> datetime.datetime | None:
    """``metadata.creationTimestamp`` (RFC 3339, as the API server writes it; a YAML
    timestamp too), ``None`` when absent."""
    meta = doc.body.get("metadata")
    value = meta.get("creationTimestamp") if isinstance(meta, dict) else None
    if value is None:
        return None
    when = value
    if isinstance(value, str) and len(value) <= 64:
        with contextlib.suppress(ValueError):
            when = datetime.datetime.fromisoformat(value)
    if not isinstance(when, datetime.datetime):
        doc.fail(
            "metadata.creationTimestamp",
            f"must be a time such as 2025-01-31T12:00:00Z, got {str(value)[:40]!r}",
        )
    if when.tzinfo is None:  # a YAML timestamp without zone is UTC
        when = when.replace(tzinfo=datetime.UTC)
    return when


def _peer_mode(doc: _Doc, mtls: Mapping[str, Any], path: str, identity: MeshIdentity | None) -> str:
    """A PeerAuthentication ``mode`` (absent: ``UNSET``); STRICT and PERMISSIVE need the
    workload identity."""
    mode = doc.get(mtls, "mode", path)
    if mode is None:
        return "UNSET"
    if not isinstance(mode, str) or mode not in schema.PEER_MODES:  # (YAML reads OFF as false)
        doc.fail(path, f"unknown mode {mode!r}; expected one of {', '.join(schema.PEER_MODES)}")
    if identity is None and mode in ("STRICT", "PERMISSIVE"):
        doc.fail(path, f"{mode}: {schema.PEER_NO_MESH_IDENTITY}")
    return str(mode)


def _unmatched_ports(doc: _Doc, peer: PeerAuthentication, listeners: list[Listener]) -> None:
    """Caution about a ``portLevelMtls`` port no listener accepts on: Istio's keys are the
    workload's (container) ports, here the listeners' ``bind`` ports, not service ports."""
    binds = {listener.bind_port for listener in listeners}
    for port in peer.ports:
        if port in binds:
            continue
        served = [lst.name for lst in listeners if lst.port == port]
        hint = (
            f"; {served[0]} is a service port: the key is the port the listener binds"
            if served
            else ""
        )
        doc.caution(
            "spec.listeners",
            f"PeerAuthentication portLevelMtls port {port} matches no listener's bind port" + hint,
        )


def _mesh_identity(doc: _Doc) -> MeshIdentity | None:
    """``spec.meshIdentity``: the files istio-agent writes (``directory``, default
    ``/etc/certs``, with its names; or each path), read and checked now, like every TLS
    file: a missing or unusable one is an error naming its field."""
    spec = doc.spec()
    if spec.get("meshIdentity") is None:
        return None
    raw = doc.mapping(spec, "meshIdentity", "spec.meshIdentity")
    path = "spec.meshIdentity"
    doc.check(raw, path, schema.MESH_IDENTITY)
    auto = doc.get(raw, "autoMtls", f"{path}.autoMtls")
    if auto is not None and not isinstance(auto, bool):
        doc.fail(f"{path}.autoMtls", f"must be true or false, got {auto!r}")
    if raw.get("sds") is not None:
        return _sds_identity(doc, raw, MeshIdentity(auto_mtls=auto is not False))
    directory = doc.string(raw, "directory", f"{path}.directory", required=False) or "/etc/certs"
    paths = {
        key: doc.string(raw, key, f"{path}.{key}", required=False) or os.path.join(directory, name)
        for key, name in (
            ("certificateChain", "cert-chain.pem"),
            ("privateKey", "key.pem"),
            ("rootCertificates", "root-cert.pem"),
        )
    }
    interval = doc.duration(raw, "checkInterval", f"{path}.checkInterval")
    if interval is not None and not MIN_IDENTITY_CHECK <= interval <= MAX_IDENTITY_CHECK:
        doc.fail(
            f"{path}.checkInterval",
            f"must be between {MIN_IDENTITY_CHECK * 1000:g}ms and "
            f"{MAX_IDENTITY_CHECK / 60:g}m (istio-agent renews a certificate at about half "
            f"of its life, 12h by default), got {raw['checkInterval']!r}",
        )
    settings = MeshIdentity(
        paths["certificateChain"],
        paths["privateKey"],
        paths["rootCertificates"],
        5.0 if interval is None else interval,
        auto is not False,
    )
    for _ in range(3):  # istio-agent may be replacing them right now
        try:
            material = load_identity(settings, (DEFAULT_SERVER,))
        except TlsSettingError as exc:
            doc.fail(f"{path}.{exc.key}", str(exc))
        except (IdentityChanging, OSError):
            continue
        return dataclasses.replace(settings, material=material)
    doc.fail(path, "the files kept changing while they were read (three times)")


#: The longest path of a Unix socket (``sun_path`` on Linux, less its terminating zero).
MAX_UNIX_PATH = 107


def _grpc_address(doc: _Doc, value: str | None, path: str, local: str) -> None:
    """Refuse a gRPC server's address (``value``, at ``path``) that is neither ``host:port``
    (ASCII digits) nor ``unix:<path>`` (``local`` says whose) of a path a socket can have."""
    if value is None:
        return
    if value.startswith("unix:") and len(value) > len("unix:"):
        socket_path = value[len("unix:") :].encode("utf-8", "surrogateescape")
        if len(socket_path) > MAX_UNIX_PATH:
            doc.fail(
                path,
                f"a Unix socket's path is at most {MAX_UNIX_PATH} bytes, this one "
                f"{len(socket_path)}: it can never be reached",
            )
        return
    host, sep, port = value.rpartition(":")
    number = port_number(port)
    if not sep or not host or number is None or not 0 < number < 65536:
        doc.fail(path, f"must be host:port (gRPC) or unix:<path> ({local}), got {value!r}")


def _sds_identity(doc: _Doc, raw: Mapping[str, Any], base: MeshIdentity) -> MeshIdentity:
    """``spec.meshIdentity.sds``: the identity from an SDS server (``address``, default
    istio-agent's socket; the secrets ``certificate`` and ``root``, default ``default`` and
    ``ROOTCA``; ``initialFetchTimeout``), fetched now unless an engine's stream in this
    process follows that server (and keeps what it holds current), and checked as the files
    are."""
    path = "spec.meshIdentity.sds"
    for key in ("directory", "certificateChain", "privateKey", "rootCertificates", "checkInterval"):
        if key in raw:
            doc.fail(
                f"spec.meshIdentity.{key}",
                "not with spec.meshIdentity.sds: the identity comes from the SDS server, which "
                "pushes each rotation (one source; remove one of them)",
            )
    sds = doc.mapping(raw, "sds", path)
    doc.check(sds, path, schema.MESH_IDENTITY_SDS)
    address = doc.string(sds, "address", f"{path}.address", required=False)
    _grpc_address(doc, address, f"{path}.address", "istio-agent's socket")
    names = {}
    for key in ("certificate", "root"):
        name = doc.string(sds, key, f"{path}.{key}", required=False)
        if name is not None and not 0 < len(name) <= MAX_NAME_LENGTH:
            doc.fail(f"{path}.{key}", f"must be 1 to {MAX_NAME_LENGTH} characters")
        names[key] = name
    if names["certificate"] is not None and names["certificate"] == names["root"]:
        doc.fail(f"{path}.root", "must not be the certificate's secret")
    wait = doc.duration(sds, "initialFetchTimeout", f"{path}.initialFetchTimeout")
    if wait is not None and not 0.01 <= wait <= 600:
        doc.fail(f"{path}.initialFetchTimeout", "must be between 10ms and 10m")
    keepalive = doc.mapping(sds, "keepalive", f"{path}.keepalive", required=False)
    doc.check(keepalive, f"{path}.keepalive", schema.XDS_KEEPALIVE)
    every = doc.duration(keepalive, "time", f"{path}.keepalive.time")
    patience = doc.duration(keepalive, "timeout", f"{path}.keepalive.timeout")
    if every is not None and not 1 <= every <= 86400:
        doc.fail(f"{path}.keepalive.time", "must be between 1s and 24h")
    if patience is not None and not 1 <= patience <= 3600:
        doc.fail(f"{path}.keepalive.timeout", "must be between 1s and 1h")
    ip = os.environ.get("INSTANCE_IP", "127.0.0.1")
    pod = os.environ.get("POD_NAME") or socket.gethostname() or "metaprotocol-proxy"
    namespace = os.environ.get("POD_NAMESPACE", "default")
    source = SdsSource(
        address=address or SdsSource.address,
        certificate=names["certificate"] or SdsSource.certificate,
        root=names["root"] or SdsSource.root,
        initial_fetch_timeout=SdsSource.initial_fetch_timeout if wait is None else wait,
        node_id=f"sidecar~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local",
        keepalive_time=SdsSource.keepalive_time if every is None else every,
        keepalive_timeout=SdsSource.keepalive_timeout if patience is None else patience,
    )
    try:
        from ..sds import SecretRefused, store_for
    except ImportError as exc:
        doc.fail(
            path,
            f"needs gRPC and Envoy's API ({exc.name} is not installed): "
            "pip install 'metaprotocol-sdk[xds]'",
        )
    try:
        store = store_for(source)
    except SecretRefused as exc:
        doc.fail(path, str(exc))
    settings = store.identity(base)
    for _ in range(3):  # the engine's stream may be replacing them right now
        try:
            material = load_identity(settings, (DEFAULT_SERVER,))
        except TlsSettingError as exc:
            doc.fail(path, f"{exc.key}: {exc}")
        except (IdentityChanging, OSError):
            continue
        return dataclasses.replace(settings, material=material)
    doc.fail(path, "the secrets kept changing while they were read (three times)")


def _xds(doc: _Doc, spec: Mapping[str, Any], locality: str = "") -> Xds | None:
    """``spec.xds``: ``address`` (``host:port``, required), ``rdsAddress`` (Aeraki's RDS
    server, when not the ADS one), ``node`` (``id``, ``cluster``, ``metadata``; defaults
    like an Istio sidecar's, from ``INSTANCE_IP``, ``POD_NAME`` and ``POD_NAMESPACE``; its
    locality is the workload's, ``locality``, from which istiod computes failover priorities),
    ``maxMessageBytes``, ``maxResourceBytes``, ``backoff`` (``initial``, ``max``), ``keepalive``
    (``time``, ``timeout``), ``initialFetchTimeout``."""
    raw = doc.mapping(spec, "xds", "spec.xds", required=False)
    if "xds" not in spec:
        return None
    doc.check(raw, "spec.xds", schema.XDS)
    address = cast(str, doc.string(raw, "address", "spec.xds.address"))
    rds = doc.string(raw, "rdsAddress", "spec.xds.rdsAddress", required=False)
    for key, value in (("address", address), ("rdsAddress", rds)):
        _grpc_address(
            doc, value, f"spec.xds.{key}", "istio-agent's xDS proxy, /etc/istio/proxy/XDS"
        )
    node = doc.mapping(raw, "node", "spec.xds.node", required=False)
    doc.check(node, "spec.xds.node", schema.XDS_NODE)
    ip = os.environ.get("INSTANCE_IP", "127.0.0.1")
    pod = os.environ.get("POD_NAME") or socket.gethostname() or "metaprotocol-proxy"
    namespace = os.environ.get("POD_NAMESPACE", "default")
    metadata = {
        "CLUSTER_ID": "Kubernetes",
        "NAMESPACE": namespace,
        "NAME": pod,
        "INSTANCE_IPS": ip,
        "ISTIO_VERSION": XDS_ISTIO_VERSION,
    }
    metadata.update(doc.labels(node, "metadata", "spec.xds.node.metadata"))
    node_id = doc.string(node, "id", "spec.xds.node.id", required=False)
    cluster = doc.string(node, "cluster", "spec.xds.node.cluster", required=False)
    most = doc.integer(raw, "maxMessageBytes", "spec.xds.maxMessageBytes", False, 1024, 1 << 30)
    held = doc.integer(raw, "maxResourceBytes", "spec.xds.maxResourceBytes", False, 1024, 1 << 34)
    backoff = doc.mapping(raw, "backoff", "spec.xds.backoff", required=False)
    doc.check(backoff, "spec.xds.backoff", schema.XDS_BACKOFF)
    initial = doc.duration(backoff, "initial", "spec.xds.backoff.initial")
    cap = doc.duration(backoff, "max", "spec.xds.backoff.max")
    if initial is not None and initial <= 0:
        doc.fail("spec.xds.backoff.initial", "must be above zero")
    initial = 0.5 if initial is None else initial
    cap = max(30.0, initial) if cap is None else cap
    if cap < initial:
        doc.fail("spec.xds.backoff.max", f"must be at least backoff.initial ({initial} s)")
    keepalive = doc.mapping(raw, "keepalive", "spec.xds.keepalive", required=False)
    doc.check(keepalive, "spec.xds.keepalive", schema.XDS_KEEPALIVE)
    every = doc.duration(keepalive, "time", "spec.xds.keepalive.time")
    wait = doc.duration(keepalive, "timeout", "spec.xds.keepalive.timeout")
    if every is not None and not 1 <= every <= 86400:
        doc.fail("spec.xds.keepalive.time", "must be between 1s and 24h")
    if wait is not None and not 1 <= wait <= 3600:
        doc.fail("spec.xds.keepalive.timeout", "must be between 1s and 1h")
    fetch = doc.duration(raw, "initialFetchTimeout", "spec.xds.initialFetchTimeout")
    if fetch is not None and not 0.01 <= fetch <= 3600:
        doc.fail("spec.xds.initialFetchTimeout", "must be between 10ms and 1h")
    inbound = doc.string(raw, "inboundListener", "spec.xds.inboundListener", required=False)
    if inbound is not None and not 0 < len(inbound) <= MAX_NAME_LENGTH:
        doc.fail("spec.xds.inboundListener", f"must be 1 to {MAX_NAME_LENGTH} characters")
    if inbound is not None and "meshIdentity" not in spec:
        doc.fail(
            "spec.xds.inboundListener",
            "needs spec.meshIdentity: the inbound listener's chains accept mutual TLS with "
            "the workload's identity (Istio's PERMISSIVE and STRICT modes)",
        )
    return Xds(
        address=address,
        rds_address=rds,
        node=XdsNode(
            id=node_id or f"sidecar~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local",
            cluster=cluster or f"{pod}.{namespace}",
            metadata=metadata,
            locality=locality,
        ),
        max_message_bytes=most or Xds.max_message_bytes,
        max_resource_bytes=held or Xds.max_resource_bytes,
        backoff_initial=initial,
        backoff_max=cap,
        keepalive_time=Xds.keepalive_time if every is None else every,
        keepalive_timeout=Xds.keepalive_timeout if wait is None else wait,
        initial_fetch_timeout=Xds.initial_fetch_timeout if fetch is None else fetch,
        inbound_listener=inbound,
    )


def _tracing(doc: _Doc, spec: Mapping[str, Any]) -> Tracing | None:
    """``spec.tracing``: ``endpoint`` (required), ``randomSampling`` (a percentage, as a
    number or Aeraki's ``{value: N}``; default 100), ``serviceName``, ``operation``,
    ``maxQueueSize``, ``exportTimeout``."""
    raw = doc.mapping(spec, "tracing", "spec.tracing", required=False)
    if not raw:
        return None
    doc.check(raw, "spec.tracing", schema.TRACING)
    endpoint = cast(str, doc.string(raw, "endpoint", "spec.tracing.endpoint"))
    host, sep, port = endpoint.rpartition(":")
    number = port_number(port)
    if not sep or not host or number is None or not 0 < number < 65536:
        doc.fail("spec.tracing.endpoint", f"must be host:port (OTLP over gRPC), got {endpoint!r}")
    path = "spec.tracing.randomSampling"
    sampling = doc.get(raw, "randomSampling", path)
    if isinstance(sampling, dict):
        sampling = _percent(doc, raw, "randomSampling", path)
    elif sampling is not None and (
        isinstance(sampling, bool)
        or not isinstance(sampling, (int, float))
        or not 0 <= sampling <= 100
    ):
        doc.fail(path, f"must be a percentage in [0, 100], got {sampling!r}")
    name = doc.string(raw, "serviceName", "spec.tracing.serviceName", required=False)
    if name is not None and not name:
        doc.fail("spec.tracing.serviceName", "must not be empty")
    operation = doc.string(raw, "operation", "spec.tracing.operation", required=False)
    if operation is not None and operation not in ("ingress", "egress"):
        doc.fail("spec.tracing.operation", f"must be ingress or egress, got {operation!r}")
    queue = doc.integer(raw, "maxQueueSize", "spec.tracing.maxQueueSize", False, 1, 1_000_000)
    timeout = doc.duration(raw, "exportTimeout", "spec.tracing.exportTimeout")
    return Tracing(
        endpoint=endpoint,
        random_sampling=100.0 if sampling is None else float(sampling),
        service_name=name or "metaprotocol-proxy",
        operation=operation or "egress",
        max_queue_size=Tracing.max_queue_size if queue is None else queue,
        export_timeout=Tracing.export_timeout if timeout is None else timeout,
    )


_WORKLOAD_FIELDS = {
    "name": "name",
    "namespace": "namespace",
    "app": "app",
    "version": "version",
    "canonicalService": "canonical_service",
    "canonicalRevision": "canonical_revision",
    "cluster": "cluster",
    "principal": "principal",
}


def _telemetry(doc: _Doc, spec: Mapping[str, Any]) -> Telemetry:
    """``spec.telemetry``: ``istioMetrics`` (default false), ``reporter`` (``source`` or
    ``destination``), ``workload`` (each field defaults from the sidecar's environment)."""
    raw = doc.mapping(spec, "telemetry", "spec.telemetry", required=False)
    doc.check(raw, "spec.telemetry", schema.TELEMETRY)
    enabled = doc.get(raw, "istioMetrics", "spec.telemetry.istioMetrics")
    if enabled is not None and not isinstance(enabled, bool):
        doc.fail("spec.telemetry.istioMetrics", f"must be true or false, got {enabled!r}")
    reporter = doc.string(raw, "reporter", "spec.telemetry.reporter", required=False)
    if reporter is not None and reporter not in ("source", "destination"):
        doc.fail("spec.telemetry.reporter", f"must be source or destination, got {reporter!r}")
    given = doc.mapping(raw, "workload", "spec.telemetry.workload", required=False)
    doc.check(given, "spec.telemetry.workload", schema.WORKLOAD)
    values: dict[str, Any] = {}
    for key, attr in _WORKLOAD_FIELDS.items():
        value = doc.string(given, key, f"spec.telemetry.workload.{key}", required=False)
        if value is not None:
            values[attr] = value
    labels = None
    if given.get("labels") is not None:
        labels = label_map(doc, given, "labels", "spec.telemetry.workload.labels")
    workload = workload_from_environment(labels=labels)
    where = "spec.telemetry.workload.locality"
    values["locality"] = _locality(doc, given, "locality", where) or locality_of_labels(
        dict(workload.labels)
    )
    return Telemetry(
        istio_metrics=bool(enabled),
        reporter=reporter or "source",
        workload=dataclasses.replace(workload, **values),
    )


def _policy_scope(doc: _Doc | None, telemetry: Telemetry) -> PolicyScope | None:
    """The workload PeerAuthentications and AuthorizationPolicies are selected for: its
    namespace and labels (``spec.telemetry.workload``), ``spec.mesh.rootNamespace``
    (``istio-system``). ``None``: the namespace is not known, and every policy applies."""
    root = "istio-system"
    if doc is not None:
        mesh = doc.mapping(doc.spec(), "mesh", "spec.mesh", required=False)
        doc.check(mesh, "spec.mesh", schema.MESH)
        root = doc.name_string(mesh, "rootNamespace", "spec.mesh.rootNamespace", False) or root
    workload = telemetry.workload
    if workload.namespace == "unknown":
        return None
    if doc is not None:
        for namespace, path in (
            (workload.namespace, "spec.telemetry.workload.namespace"),
            (root, "spec.mesh.rootNamespace"),
        ):
            why = namespace_error(namespace)
            if why is not None:
                more = " (the workload's: this field, else POD_NAMESPACE)" if "work" in path else ""
                doc.fail(path, why + more)
    given = doc.spec().get("telemetry") if doc is not None else None
    error = None
    if not (isinstance(given, dict) and isinstance(given.get("workload"), dict)) or (
        given["workload"].get("labels") is None
    ):
        _, error = environment_labels(os.environ)
    return PolicyScope(workload.namespace, workload.labels, root, error)


#: Request attributes an access log line may carry (``spec.accessLog.attributes``).
MAX_LOGGED_ATTRIBUTES = 64


def _access_log(doc: _Doc, spec: Mapping[str, Any]) -> AccessLogSettings | None:
    """``spec.accessLog`` (``None``: no access log)."""
    log = doc.mapping(spec, "accessLog", "spec.accessLog", required=False)
    doc.check(log, "spec.accessLog", schema.ACCESS_LOG)
    if spec.get("accessLog") is None:
        return None  # (an empty mapping is an access log without its path: refused below)
    otlp = _otlp_logs(doc, log)
    path = doc.string(log, "path", "spec.accessLog.path", required=otlp is None)
    if path == "":
        doc.fail("spec.accessLog.path", "must be a non-empty string (or left out with otlp)")
    where = "spec.accessLog.attributes"
    keys = doc.sequence(log, "attributes", where, required=False)
    if len(keys) > MAX_LOGGED_ATTRIBUTES:
        doc.fail(where, f"{len(keys)} attributes; at most {MAX_LOGGED_ATTRIBUTES} are logged")
    seen: dict[str, str] = {}
    for i, key in enumerate(keys):
        if not isinstance(key, str) or not key or len(key) > MAX_NAME_LENGTH:
            doc.fail(
                f"{where}[{i}]",
                f"must be an attribute's name (1 to {MAX_NAME_LENGTH} characters), "
                f"got {key[:40] if isinstance(key, str) else key!r}",
            )
        if key.lower() in seen:
            doc.fail(
                f"{where}[{i}]",
                f"{key!r} is {seen[key.lower()]!r} again (attributes ignore case)",
            )
        seen[key.lower()] = key
    longest = doc.integer(log, "maxValueLength", "spec.accessLog.maxValueLength", False, 1, 65536)
    where = "spec.accessLog.filter"
    only = doc.mapping(log, "filter", where, required=False)
    doc.check(only, where, schema.ACCESS_LOG_FILTER)
    failures = only.get("failures", False)
    if not isinstance(failures, bool):
        doc.fail(f"{where}.failures", f"must be true or false, got {failures!r}")
    slower = doc.duration(only, "slowerThan", f"{where}.slowerThan")
    if log.get("filter") is not None and not failures and slower is None:
        doc.fail(where, "names no condition: set failures: true, slowerThan, or both")
    return AccessLogSettings(
        path, tuple(keys), 256 if longest is None else longest, failures, slower, otlp
    )


def _otlp_logs(doc: _Doc, log: Mapping[str, Any]) -> OtlpLogs | None:
    """``spec.accessLog.otlp``: ``endpoint`` (``host:port``, required), ``serviceName``,
    ``exportTimeout``; needs OpenTelemetry's protos and gRPC (the tracing extra)."""
    if log.get("otlp") is None:
        return None
    where = "spec.accessLog.otlp"
    raw = doc.mapping(log, "otlp", where)
    doc.check(raw, where, schema.ACCESS_LOG_OTLP)
    endpoint = cast(str, doc.string(raw, "endpoint", f"{where}.endpoint"))
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        doc.fail(f"{where}.endpoint", f"must be host:port (OTLP over gRPC), got {endpoint!r}")
    name = doc.string(raw, "serviceName", f"{where}.serviceName", required=False)
    if name is not None and not 0 < len(name) <= MAX_NAME_LENGTH:
        doc.fail(f"{where}.serviceName", f"must be 1 to {MAX_NAME_LENGTH} characters")
    timeout = doc.duration(raw, "exportTimeout", f"{where}.exportTimeout")
    if timeout is not None and not 0.01 <= timeout <= 600:
        doc.fail(f"{where}.exportTimeout", "must be between 10ms and 10m")
    try:
        import grpc  # noqa: F401
        from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc  # noqa: F401
    except ImportError as exc:
        doc.fail(
            where,
            f"needs OpenTelemetry's protos and gRPC ({exc.name} is not installed): "
            "pip install 'metaprotocol-sdk[tracing]'",
        )
    return OtlpLogs(
        endpoint,
        name or OtlpLogs.service_name,
        OtlpLogs.export_timeout if timeout is None else timeout,
    )


def _admin(doc: _Doc, spec: Mapping[str, Any]) -> Admin | None:
    raw = doc.mapping(spec, "admin", "spec.admin", required=False)
    if not raw:
        return None
    doc.check(raw, "spec.admin", schema.ADMIN)
    bind = _bind(doc, doc.get(raw, "bind", "spec.admin.bind", required=True), "spec.admin.bind")
    allow_remote = doc.get(raw, "allowRemote", "spec.admin.allowRemote")
    if allow_remote is not None and not isinstance(allow_remote, bool):
        doc.fail("spec.admin.allowRemote", f"must be true or false, got {allow_remote!r}")
    if not allow_remote and not is_loopback(bind[0]):
        doc.fail(
            "spec.admin.bind",
            f"{bind[0]} is not a loopback address: the admin endpoint has no authentication and "
            "shows the whole configuration; bind 127.0.0.1 or ::1, or set "
            "admin.allowRemote: true to serve it to other hosts",
        )
    connections = doc.integer(raw, "maxConnections", "spec.admin.maxConnections", False, 1, 1024)
    timeout = doc.duration(raw, "requestTimeout", "spec.admin.requestTimeout")
    return Admin(
        bind=bind,
        allow_remote=bool(allow_remote),
        max_connections=Admin.max_connections if connections is None else connections,
        request_timeout=Admin.request_timeout if timeout is None else timeout,
    )


_LIMIT_FIELDS = {
    # field: (model attribute, lowest accepted value)
    "maxConnections": ("max_connections", 1),
    "maxUpstreamConnections": ("max_upstream_connections", 1),
    "maxPendingRequests": ("max_pending_requests", 1),
    "maxPendingRequestsPerConnection": ("max_pending_requests_per_connection", 1),
    "connectionBufferBytes": ("connection_buffer_bytes", 1024),
    "connectionBufferMaxBytes": ("connection_buffer_max_bytes", 1024),
    # Below this the engine's own per-listener series alone would overflow.
    "maxStatsSeries": ("max_stats_series", 100),
    "maxRateLimitCalls": ("max_rate_limit_calls", 1),
    "maxStreamsPerConnection": ("max_streams_per_connection", 1),
    "maxHashSlots": ("max_hash_slots", 1),
    "maxClusterEndpoints": ("max_cluster_endpoints", 1),
}


def _limits(doc: _Doc, spec: Mapping[str, Any]) -> Limits:
    raw = doc.mapping(spec, "limits", "spec.limits", required=False)
    doc.check(raw, "spec.limits", schema.fields(*_LIMIT_FIELDS))
    values: dict[str, Any] = {}
    for key, (attr, low) in _LIMIT_FIELDS.items():
        value = doc.integer(raw, key, f"spec.limits.{key}", False, low)
        if value is not None:
            values[attr] = value
    limits = Limits(**values)
    if limits.connection_buffer_max_bytes < limits.connection_buffer_bytes:
        doc.fail(
            "spec.limits.connectionBufferMaxBytes",
            f"must be at least connectionBufferBytes ({limits.connection_buffer_bytes})",
        )
    return limits


def _overload(doc: _Doc, spec: Mapping[str, Any]) -> Overload:
    raw = doc.mapping(spec, "overload", "spec.overload", required=False)
    doc.check(raw, "spec.overload", schema.OVERLOAD)
    buffered = doc.integer(
        raw, "maxBufferedBytes", "spec.overload.maxBufferedBytes", False, 1 << 20
    )
    rss = doc.integer(raw, "maxRssBytes", "spec.overload.maxRssBytes", False, 16 << 20)
    return Overload(
        max_buffered_bytes=Overload.max_buffered_bytes if buffered is None else buffered,
        max_rss_bytes=rss,
    )


#: ``spec.timeouts`` fields whose model attribute is not the field's own name.
_TIMEOUT_ATTRIBUTES = {
    "upstreamWrite": "upstream_write",
    "streamIdle": "stream_idle",
    "upstreamDrain": "upstream_drain",
}


def _timeouts(doc: _Doc, spec: Mapping[str, Any]) -> Timeouts:
    raw = doc.mapping(spec, "timeouts", "spec.timeouts", required=False)
    doc.check(raw, "spec.timeouts", schema.TIMEOUTS)
    values: dict[str, float] = {}
    for key in sorted(schema.TIMEOUTS.honoured):
        seconds = doc.duration(raw, key, f"spec.timeouts.{key}")
        if seconds is not None:
            values[_TIMEOUT_ATTRIBUTES.get(key, key)] = seconds
    return Timeouts(**values)


#: Shortest ``watchdog.missTimeout``: the heartbeat and the watchdog's checks run four times
#: per miss timeout, and a shorter one would count the scheduler's own jitter as stalls.
WATCHDOG_MIN = 0.01


def _watchdog(doc: _Doc, spec: Mapping[str, Any]) -> Watchdog:
    """``spec.watchdog``: ``missTimeout``, ``megamissTimeout``, ``killTimeout`` (``0s`` or
    unset: never kill); each at least the one before it."""
    raw = doc.mapping(spec, "watchdog", "spec.watchdog", required=False)
    doc.check(raw, "spec.watchdog", schema.WATCHDOG)
    path = "spec.watchdog"
    miss = doc.duration(raw, "missTimeout", f"{path}.missTimeout") or Watchdog.miss_timeout
    if miss < WATCHDOG_MIN:
        doc.fail(f"{path}.missTimeout", f"must be at least {WATCHDOG_MIN * 1000:g}ms")
    mega = doc.duration(raw, "megamissTimeout", f"{path}.megamissTimeout")
    if mega is None:
        mega = max(Watchdog.megamiss_timeout, miss)
    elif mega < miss:
        doc.fail(f"{path}.megamissTimeout", f"must be at least missTimeout ({miss:g}s)")
    value = doc.get(raw, "killTimeout", f"{path}.killTimeout")
    kill: float | None = None
    if value is not None and not (type(value) is int and value == 0):  # Envoy's 0: never
        try:
            kill = parse_duration(value) or None
        except ValueError as exc:
            doc.fail(f"{path}.killTimeout", str(exc))
        if kill is not None and kill < mega:
            doc.fail(
                f"{path}.killTimeout",
                f"must be at least megamissTimeout ({mega:g}s), or 0s for never",
            )
    return Watchdog(miss, mega, kill)
