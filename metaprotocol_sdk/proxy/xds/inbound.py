"""istiod's inbound listener (LDS ``virtualInbound``) as each engine listener's mutual TLS
mode and authorization policies.

istiod writes a sidecar's PeerAuthentications and AuthorizationPolicies into the filter
chains of its inbound listener: for a TCP port P, chains matching ``destination_port: P``,
one per transport it accepts (``tls`` with a ``DownstreamTlsContext``: mutual TLS;
``raw_buffer``: plain text), each carrying the workload's RBAC network filters (AUDIT, DENY,
ALLOW); ports it knows of no Service for fall to the passthrough chains (no
``destination_port``). The engine picks for each of its listeners (by its ``bind`` port, the
port a sidecar's chains match) the chains Envoy would pick for a client of its codec,
plain or in Istio's mutual TLS, and reads:

* the mode: a mutual TLS chain alone is STRICT, with a plain text one PERMISSIVE, a plain
  text one alone DISABLE (istiod has applied the PeerAuthentications' precedence);
* the TLS settings of the mutual TLS chain (versions, cipher suites, the trust domains a
  client's SPIFFE id must be in), served with the ProxyConfig's ``meshIdentity``;
* the RBAC filters (:mod:`.rbac`).

HTTP chains (an HTTP connection manager, HTTP ALPNs) are not the engine's: its listeners
speak their codec's protocol. Every field set elsewhere in the chains read is honoured,
ignored for a reason, or refused (:class:`~.translate.XdsRefused`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf.message import DecodeError

from metaprotocol_sdk.errors import ConfigError

from ..authorization import INBOUND_PENDING, Authorization
from ..config.loader import awaiting_inbound
from ..config.models import Config, Listener, ListenerTls, PeerMode
from ..tls import TlsSettingError
from .rbac import ALLOW_NOTHING, NETWORK_RBAC_TYPE, chain_policies
from .translate import (
    TLS_VERSIONS,
    XdsRefused,
    check_fields,
    check_tls_fields,
    istio_agent_secrets,
)

#: The RBAC network filter's name and the typed config of the others a chain may hold.
RBAC_FILTER = "envoy.filters.network.rbac"
#: Filters of istiod's TCP chains with nothing for the engine to do, and why.
IGNORED_FILTERS = {
    "istio.metadata_exchange": "Istio's peer metadata exchange, which the engine speaks on "
    "every mesh listener whose client offers it (peer_exchange.py)",
    "istio.stats": "Istio's standard metrics, which the engine writes itself",
    "envoy.filters.network.tcp_proxy": "the sidecar's forwarding to the application: the "
    "engine is the application",
}
#: Why other filters of a chain the engine reads are refused.
REFUSED_FILTERS = {
    "envoy.filters.network.ext_authz": "a CUSTOM AuthorizationPolicy (ext-authz), which this "
    "engine does not call",
    "envoy.filters.network.http_connection_manager": "istiod takes this port for HTTP: name "
    "the Service's port tcp-... (or set appProtocol: tcp) for a MetaProtocol port",
}
#: ALPN values of istiod's mutual TLS chains for TCP; ``istio-http/*`` ones are HTTP's.
MESH_ALPNS = frozenset({"istio", "istio-peer-exchange"})


@dataclass(frozen=True)
class ChainTls:
    """The mutual TLS chain's settings, as a listener's ``ISTIO_MUTUAL`` TLS takes them."""

    min_version: str = "TLSV1_2"
    #: ``None``: the highest the TLS library has.
    max_version: str | None = None
    cipher_suites: tuple[str, ...] = ()
    #: ``spiffe://<trust domain>/`` prefixes, one of which a client's SAN must start with.
    san_prefixes: tuple[str, ...] = ()

    @property
    def server_key(self) -> tuple[str, str | None, tuple[str, ...]]:
        """The settings a server context of the mesh identity is built for."""
        return self.min_version, self.max_version, self.cipher_suites


@dataclass(frozen=True)
class InboundPort:
    """What the inbound listener says for one engine listener."""

    mode: PeerMode
    authorization: Authorization | None
    #: The names of the chains read (``/config_dump``).
    chains: tuple[str, ...]
    #: The mutual TLS chain's settings (``None``: DISABLE).
    tls: ChainTls | None = None


@dataclass
class _Chain:
    """One filter chain, classified."""

    name: str
    port: int | None
    #: ``"mtls"``, ``"plain"``, or ``None`` for a chain the engine's clients never reach.
    kind: str | None
    chain: Any


def _classify(res: str, chain: Any, path: str) -> _Chain:
    """Which of the engine's connections Envoy would give ``chain``."""
    check_fields(
        res,
        chain,
        path,
        "InboundFilterChain",
        {"name", "filter_chain_match", "filters", "transport_socket"},
    )
    match = chain.filter_chain_match
    mpath = f"{path}.filter_chain_match"
    check_fields(
        res,
        match,
        mpath,
        "FilterChainMatch",
        {"destination_port", "transport_protocol", "application_protocols", "prefix_ranges"},
    )
    for i, prefix in enumerate(match.prefix_ranges):
        if prefix.prefix_len.value != 0:  # istiod 1.22's 0.0.0.0/0 and ::/0 only
            raise XdsRefused(
                res,
                f"{mpath}.prefix_ranges[{i}]",
                "not supported by this engine: a chain per "
                "destination address (the engine's listeners are picked by port)",
            )
    port = match.destination_port.value if match.HasField("destination_port") else None
    if port is not None and not 1 <= port <= 65535:
        raise XdsRefused(
            res, f"{mpath}.destination_port", "not a port: 1 to 65535 (Envoy's validation)"
        )
    transport = match.transport_protocol
    alpns = set(match.application_protocols)
    secured = chain.HasField("transport_socket")
    kind: str | None = None
    if transport == "tls" and secured and (not alpns or alpns & MESH_ALPNS):
        kind = "mtls"
    elif transport in ("raw_buffer", "") and not secured and not alpns:
        kind = "plain"
    # Others: the HTTP chains (HTTP ALPNs) and PERMISSIVE's TLS pass-through chain (the
    # client's own TLS, handed to the application, which the engine is): an Istio client
    # of the engine is neither.
    return _Chain(chain.name, port, kind, chain)


def _per_family(chains: list[_Chain]) -> bool:
    """Whether ``chains`` are one chain written once per IP family (istiod 1.22's passthrough
    chains of a dual-stack workload: ``0.0.0.0/0`` and ``::/0``), alike but for that: Envoy
    picks one by the connection's address, and either says the same."""
    families = {
        tuple(r.address_prefix for r in c.chain.filter_chain_match.prefix_ranges) for c in chains
    }
    if len(families) != len(chains):
        return False
    bodies = set()
    for c in chains:
        body = type(c.chain)()
        body.CopyFrom(c.chain)
        body.filter_chain_match.ClearField("prefix_ranges")
        bodies.add(body.SerializeToString(deterministic=True))
    return len(bodies) == 1


def _tls(res: str, socket: Any, path: str) -> ChainTls:
    """The mutual TLS chain's ``DownstreamTlsContext``, as istiod writes it
    (``BuildInboundTLS``): the workload certificate (SDS ``default``) and mesh root
    (``ROOTCA``), client certificates required; its versions, cipher suites and SAN
    prefixes."""
    check_fields(res, socket, path, "TransportSocket", {"name", "typed_config"})
    tpath = f"{path}.typed_config"
    if socket.typed_config.type_url != (
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
    ):
        raise XdsRefused(
            res, tpath, f"not a DownstreamTlsContext: {socket.typed_config.type_url[:100]}"
        )
    ctx = tls_pb2.DownstreamTlsContext()
    try:
        ctx.ParseFromString(socket.typed_config.value)
    except DecodeError as exc:
        raise XdsRefused(res, tpath, f"undecodable: {exc}") from None
    check_tls_fields(
        res,
        ctx,
        tpath,
        "DownstreamTlsContext",
        {"common_tls_context", "require_client_certificate"},
    )
    if not ctx.require_client_certificate.value:
        raise XdsRefused(
            res,
            f"{tpath}.require_client_certificate",
            "must be true: the engine's mesh listeners require the client's certificate "
            "(Istio's mutual TLS)",
        )
    cpath = f"{tpath}.common_tls_context"
    common = ctx.common_tls_context
    check_tls_fields(
        res,
        common,
        cpath,
        "CommonTlsContext",
        {
            "tls_params",
            "tls_certificate_sds_secret_configs",
            "combined_validation_context",
            "alpn_protocols",
        },
    )
    # alpn_protocols: istiod's [istio-peer-exchange, h2, http/1.1]; the engine selects
    # istio-peer-exchange (then istio) whichever the chain lists, and speaks the exchange
    # on every mesh listener (peer_exchange.py).
    vc, vpath = istio_agent_secrets(res, common, cpath)
    check_fields(res, vc, vpath, "CertificateValidationContext", {"match_subject_alt_names"})
    prefixes = []
    for i, m in enumerate(vc.match_subject_alt_names):
        mp = f"{vpath}.match_subject_alt_names[{i}]"
        check_fields(res, m, mp, "StringMatcher", {"prefix"})
        if not m.prefix.startswith("spiffe://"):
            raise XdsRefused(
                res, mp, "only istiod's trust domain prefixes (spiffe://<trust domain>/) are read"
            )
        prefixes.append(str(m.prefix))
    low: str = "TLSV1_2"
    high: str | None = None
    suites: tuple[str, ...] = ()
    if common.HasField("tls_params"):
        ppath = f"{cpath}.tls_params"
        p = common.tls_params
        check_fields(
            res,
            p,
            ppath,
            "TlsParameters",
            {"tls_minimum_protocol_version", "tls_maximum_protocol_version", "cipher_suites"},
        )
        versions = {0: None, 3: "TLSV1_2", 4: "TLSV1_3"}
        for key in ("tls_minimum_protocol_version", "tls_maximum_protocol_version"):
            value = getattr(p, key)
            if value not in versions:
                name = TLS_VERSIONS.get(value, f"unknown TLS version {value}")
                raise XdsRefused(
                    res,
                    f"{ppath}.{key}",
                    f"not supported by this engine: {name} (TLS 1.0 and 1.1 are deprecated, "
                    "RFC 8996)",
                )
        low = versions[p.tls_minimum_protocol_version] or "TLSV1_2"
        high = versions[p.tls_maximum_protocol_version]
        suites = tuple(str(s) for s in p.cipher_suites)
    return ChainTls(low, high, suites, tuple(prefixes))


def _filters(res: str, chain: _Chain, path: str) -> tuple[list[tuple[str, bytes]], bytes]:
    """The chain's RBAC filters (path and config) and a key of them (to compare chains)."""
    rbac: list[tuple[str, bytes]] = []
    for i, f in enumerate(chain.chain.filters):
        fpath = f"{path}.filters[{i}]"
        check_fields(res, f, fpath, "Filter", {"name", "typed_config"})
        if f.name == RBAC_FILTER:
            if f.typed_config.type_url != NETWORK_RBAC_TYPE:
                raise XdsRefused(
                    res, f"{fpath}.typed_config", "not the RBAC network filter's config"
                )
            rbac.append((f"{fpath}.typed_config", f.typed_config.value))
        elif f.name in REFUSED_FILTERS:
            raise XdsRefused(res, fpath, f"not supported by this engine: {REFUSED_FILTERS[f.name]}")
        elif f.name not in IGNORED_FILTERS:
            raise XdsRefused(
                res,
                fpath,
                f"not supported by this engine: network filter {f.name[:100]!r} (the engine "
                "reads istiod's RBAC filters; it ignores "
                + ", ".join(sorted(IGNORED_FILTERS))
                + ")",
            )
    return rbac, b"\0".join(raw for _, raw in rbac)


def inbound_ports(
    message: listener_pb2.Listener, listeners: tuple[Listener, ...]
) -> dict[str, InboundPort]:
    """For each listener (by name), what the inbound listener ``message`` says. Raises
    :class:`XdsRefused` for what the engine cannot honour."""
    res = f"LDS {message.name[:100]}"
    check_fields(res, message, "", "InboundListener", {"name", "filter_chains"})
    chains = [_classify(res, c, f"filter_chains[{i}]") for i, c in enumerate(message.filter_chains)]
    paths = {id(c): f"filter_chains[{i}]" for i, c in enumerate(chains)}
    out: dict[str, InboundPort] = {}
    for listener in listeners:
        port = listener.bind_port
        mine = [c for c in chains if c.port == port]
        if not mine:
            mine = [c for c in chains if c.port is None]  # passthrough: ports of no Service
        mtls = [c for c in mine if c.kind == "mtls"]
        plain = [c for c in mine if c.kind == "plain"]
        for found in (mtls, plain):
            if len(found) > 1 and not _per_family(found):
                raise XdsRefused(
                    res,
                    paths[id(found[1])],
                    f"a second chain for the engine's {found[1].kind} connections to port {port} "
                    f"({paths[id(found[0])]} is one): Envoy would pick by fields the engine "
                    "does not read",
                )
        if not mtls and not plain:
            raise XdsRefused(
                res,
                "filter_chains",
                f"no chain for Istio's mutual TLS or plain text connections to port {port} "
                f"(listener {listener.name}); the engine's listeners bind the ports the "
                "workload's Services target",
            )
        mode: PeerMode = "PERMISSIVE" if mtls and plain else ("STRICT" if mtls else "DISABLE")
        read = [*mtls[:1], *plain[:1]]
        policies = [_filters(res, c, paths[id(c)]) for c in read]
        if len({key for _, key in policies}) > 1:
            raise XdsRefused(
                res,
                paths[id(read[1])],
                f"its RBAC filters differ from {paths[id(read[0])]}'s for port {port}: the "
                "engine judges a listener's connections by one set (istiod writes the same "
                "on every chain)",
            )
        rbac, _ = policies[0]

        def refuse(path: str, reason: str) -> XdsRefused:
            return XdsRefused(res, path, reason)

        authorization = chain_policies(rbac, refuse).authorization()
        tls = None
        if mtls:
            c = mtls[0]
            tls = _tls(res, c.chain.transport_socket, f"{paths[id(c)]}.transport_socket")
        out[listener.name] = InboundPort(mode, authorization, tuple(c.name for c in read), tls)
    return out


def apply_inbound(config: Config, message: listener_pb2.Listener | None) -> Config:
    """``config`` with each listener's mode, TLS and policies from the inbound listener
    (``None``: not received: every listener denies every request)."""
    proxy = config.proxy
    identity = proxy.mesh_identity
    if message is None:
        listeners = tuple(awaiting_inbound(li, identity) for li in proxy.listeners)
        return dataclasses.replace(config, proxy=dataclasses.replace(proxy, listeners=listeners))
    ports = _read(message, proxy.listeners)
    listeners_out = []
    for li in proxy.listeners:
        port = ports[li.name]
        changes: dict[str, Any] = {
            "authorization": port.authorization or NO_POLICIES,
            "inbound_chains": port.chains,
        }
        if li.peer_mode is not None:  # governed by the mesh (no tls of its own)
            changes["peer_mode"] = port.mode
            changes["tls"] = None if port.mode == "DISABLE" else _mesh_tls(li, port, identity)
        listeners_out.append(dataclasses.replace(li, **changes))
    return dataclasses.replace(
        config, proxy=dataclasses.replace(proxy, listeners=tuple(listeners_out))
    )


@dataclass
class _Read:
    """The last inbound listener read, and what it said for which listeners' ports."""

    message: listener_pb2.Listener
    ports: tuple[tuple[str, int], ...]
    read: dict[str, InboundPort]


#: Every xDS update (an EDS push of one cluster's endpoints too) translates the whole
#: configuration; the inbound listener, the same message until LDS sends another, is read
#: again only when it or the listeners' ports change: reading 20 000 of istiod's policies
#: took 1.65 s of a translation thread. One entry: the listener in force.
_last: list[_Read] = []


def _read(
    message: listener_pb2.Listener, listeners: tuple[Listener, ...]
) -> dict[str, InboundPort]:
    """:func:`inbound_ports`, kept for the message held (the client keeps the object it
    decoded until LDS sends another)."""
    ports = tuple((li.name, li.bind_port) for li in listeners)
    if _last and _last[0].message is message and _last[0].ports == ports:
        return _last[0].read
    read = inbound_ports(message, listeners)
    _last[:] = [_Read(message, ports, read)]
    return read


#: A listener's policies when its chains carry no RBAC filter: nothing to judge.
NO_POLICIES = Authorization()


def _mesh_tls(li: Listener, port: InboundPort, identity: Any) -> ListenerTls:
    """The listener's ``ISTIO_MUTUAL`` TLS with the chain's settings."""
    tls, chain = li.tls, port.tls
    if tls is None or identity is None or chain is None:
        raise ConfigError(
            f"listener {li.name}: the inbound listener asks for mutual TLS, which needs "
            "spec.meshIdentity",
            source="xDS LDS",
        )
    served = ChainTls(
        tls.min_protocol_version,
        tls.max_protocol_version,
        tls.cipher_suites,
        tls.subject_alt_name_prefixes,
    )
    if served == chain:
        return tls
    if identity.material is None:
        raise ConfigError(
            f"listener {li.name}: the mesh identity's files are not loaded", source="xDS LDS"
        )
    try:
        context = identity.material.server(chain.server_key)
    except TlsSettingError as exc:  # an unknown cipher suite...
        raise XdsRefused(f"LDS listener {li.name}", "tls_params", str(exc)) from None
    return dataclasses.replace(
        tls,
        min_protocol_version=chain.min_version,
        max_protocol_version=chain.max_version,
        cipher_suites=chain.cipher_suites,
        subject_alt_name_prefixes=chain.san_prefixes,
        context=context,
    )


__all__ = ["ALLOW_NOTHING", "INBOUND_PENDING", "InboundPort", "apply_inbound", "inbound_ports"]
