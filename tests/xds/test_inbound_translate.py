"""istiod's inbound listener read into each listener's mode, TLS and policies
(``spec.xds.inboundListener``): the translation alone, on listeners shaped as istiod writes
them (tests/xds/inbound_snapshots.py)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from envoy.extensions.transport_sockets.tls.v3 import common_pb2
from inbound_snapshots import (
    INBOUND,
    NEVER,
    downstream_tls,
    exact_principal,
    filter_,
    inbound,
    ip_principal,
    namespace_principal,
    passthrough_chains,
    port_chains,
    principal_policy,
    rbac,
    virtual_inbound,
)
from mesh_pki import MeshCa
from snapshots import CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE, hello_snapshots

from metaprotocol_sdk.errors import ConfigError
from metaprotocol_sdk.proxy.authorization import INBOUND_PENDING as PENDING
from metaprotocol_sdk.proxy.authorization import Facts, ListenerAuthorization
from metaprotocol_sdk.proxy.config import loads_config
from metaprotocol_sdk.proxy.config.models import Config, Listener
from metaprotocol_sdk.proxy.identity import MAX_SERVER_CONTEXTS
from metaprotocol_sdk.proxy.stats import Stats
from metaprotocol_sdk.proxy.xds.rbac import StringMatch, chain_policies, subject_of
from metaprotocol_sdk.proxy.xds.translate import Resources, XdsRefused, translate

PORT = 9000  # the listener's bind port: the port istiod's chains match
CLIENT = "spiffe://cluster.local/ns/bar/sa/client"
EVIL = "spiffe://cluster.local/ns/evil/sa/x"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("identity")
    MeshCa().write(directory, "proxy", ns="demo")
    return directory


def base(certs: Path, extra: str = "", listener_tls: str = "") -> Config:
    tls = f", tls: {listener_tls}" if listener_tls else ""
    return loads_config(f"""
kind: ServiceEntry
metadata: {{name: hello, namespace: demo}}
spec:
  hosts: [hello.svc]
  ports: [{{number: 9090, name: tcp-metaprotocol-thrift-hello}}]
  endpoints: [{{address: 127.0.0.9}}]
---
kind: ProxyConfig
metadata: {{name: proxy}}
spec:
  listeners: [{{host: hello.svc, port: 9090, bind: "127.0.0.1:{PORT}"{tls}}}]
  meshIdentity: {{directory: "{certs}"}}
  xds: {{address: "127.0.0.1:15010", inboundListener: {INBOUND}}}
{extra}""")


def resources(listener: Any | None) -> Resources:
    snap = hello_snapshots([("127.0.0.1", 20001)], [("127.0.0.1", 20003)])[0][1]

    def named(items: list[Any]) -> dict[str, Any]:
        return {i.cluster_name if hasattr(i, "cluster_name") else i.name: i for i in items}

    return Resources(
        routes=named(snap.get(ROUTE_TYPE, [])),
        clusters=named(snap.get(CLUSTER_TYPE, [])),
        endpoints=named(snap.get(ENDPOINT_TYPE, [])),
        listeners={} if listener is None else {listener.name: listener},
    )


def listener_of(certs: Path, message: Any | None, **kw: Any) -> Listener:
    config = translate(base(certs, **kw), resources(message))
    (listener,) = config.proxy.listeners
    return listener


def refusal(certs: Path, message: Any) -> str:
    with pytest.raises((XdsRefused, ConfigError)) as info:
        translate(base(certs), resources(message))
    return str(info.value)


def judge(
    listener: Listener,
    uri: str | None = None,
    port: int = PORT,
    ip: str = "10.0.0.1",
    sni: str | None = None,
) -> str | None:
    """The policy denying a connection (``None``: allowed)."""
    assert listener.authorization is not None
    owner = ListenerAuthorization(listener.authorization, Stats(), listener.name)
    cert = None if uri is None else {"subjectAltName": (("URI", uri),)}
    address = ipaddress.ip_address(ip)
    verdict = (
        owner.judge(None)
        if False
        else owner._enforced(
            Facts(
                port=port,
                secure=uri is not None,
                peercert=cert,
                remote_ip=address,
                source_ip=address,
                sni=sni,
            )
        )
    )
    if verdict is None:
        return None
    assert verdict.denied is not None
    return verdict.denied.name


@pytest.mark.parametrize("mode", ["STRICT", "PERMISSIVE", "DISABLE"])
def test_each_mode_is_read_from_the_port_s_chains(certs: Path, mode: str) -> None:
    listener = listener_of(certs, inbound(PORT, mode, workload_mode="PERMISSIVE"))
    assert listener.peer_mode == mode
    assert (listener.tls is None) == (mode == "DISABLE")
    assert listener.inbound_chains == ((f"0.0.0.0_{PORT}",) * (2 if mode == "PERMISSIVE" else 1))
    if listener.tls is not None:
        assert listener.tls.mode == "ISTIO_MUTUAL"
        assert listener.tls.subject_alt_name_prefixes == ("spiffe://cluster.local/",)
    # No RBAC filter: nothing is judged.
    assert listener.authorization is not None and not listener.authorization.names


@pytest.mark.parametrize("mode", ["STRICT", "PERMISSIVE", "DISABLE"])
def test_a_port_no_service_targets_takes_the_passthrough_chains(certs: Path, mode: str) -> None:
    deny = rbac(
        {"ns[demo]-policy[no-evil]-rule[0]": principal_policy([namespace_principal("evil")])},
        "DENY",
    )
    message = virtual_inbound([*passthrough_chains(mode, [deny]), *port_chains(PORT + 1, "STRICT")])
    listener = listener_of(certs, message)
    assert listener.peer_mode == mode
    assert set(listener.inbound_chains) == {"virtualInbound"}
    assert judge(listener, EVIL) == "demo/no-evil"
    assert judge(listener, CLIENT) is None


def test_istiod_1_22_passthrough_chains_per_ip_family_are_read_once(certs: Path) -> None:
    """istiod 1.22 wrote a dual-stack workload's passthrough chains once per IP family
    (``0.0.0.0/0``, ``::/0``): alike but for that, they were refused as a second chain."""
    deny = rbac(
        {"ns[demo]-policy[no-evil]-rule[0]": principal_policy([namespace_principal("evil")])},
        "DENY",
    )
    chains = []
    for family in ("0.0.0.0", "::"):
        for chain in passthrough_chains("PERMISSIVE", [deny])[1:]:
            chain.filter_chain_match.prefix_ranges.add(address_prefix=family, prefix_len={})
            chains.append(chain)
    blackhole = passthrough_chains("PERMISSIVE")[0]
    listener = listener_of(certs, virtual_inbound([blackhole, *chains]))
    assert listener.peer_mode == "PERMISSIVE"
    assert listener.inbound_chains == ("virtualInbound", "virtualInbound")
    assert judge(listener, EVIL) == "demo/no-evil"
    # Per family but saying different things: refused.
    chains[-2].filters.pop(1)
    assert "a second chain" in refusal(certs, virtual_inbound([blackhole, *chains]))


def test_policies_are_grouped_by_authorization_policy_and_judged_as_envoy_does(certs: Path) -> None:
    deny = rbac(
        {
            "ns[demo]-policy[no-evil]-rule[0]": principal_policy([namespace_principal("evil")]),
            "ns[demo]-policy[no-evil]-rule[2]": principal_policy([ip_principal("10.9.0.0", 16)]),
        },
        "DENY",
    )
    allow = rbac(
        {
            "ns[demo]-policy[clients]-rule[0]": principal_policy([exact_principal(CLIENT)], [PORT]),
            "ns[demo]-policy[nobody]-rule[0]": NEVER,
        }
    )
    audit = rbac({"ns[demo]-policy[watch]-rule[0]": principal_policy([{"any": True}])}, "AUDIT")
    listener = listener_of(certs, inbound(PORT, "PERMISSIVE", [audit, deny, allow]))
    authz = listener.authorization
    assert authz is not None
    assert [p.name for p in authz.deny] == ["demo/no-evil"]
    assert [p.name for p in authz.allow] == ["demo/clients", "demo/nobody"]
    assert [p.name for p in authz.audit] == ["demo/watch"]
    assert len(authz.deny[0].rules) == 2
    assert judge(listener, CLIENT) is None
    assert judge(listener, EVIL) == "demo/no-evil"
    assert judge(listener, CLIENT, ip="10.9.3.4") == "demo/no-evil"  # the second rule
    assert judge(listener, CLIENT, port=PORT + 1) == "none"  # no ALLOW rule matches
    assert judge(listener, None) == "none"  # plain text has no principal


def test_an_allow_filter_without_policies_denies_everything(certs: Path) -> None:
    """istiod's ALLOW filter with ``rules: {}`` (every rule of the ALLOW policies dropped for
    TCP, e.g. HTTP methods only): Envoy denies every connection."""
    listener = listener_of(certs, inbound(PORT, "STRICT", [rbac({})]))
    assert judge(listener, CLIENT) == "none"


def test_dry_run_policies_are_shadow_sets_that_never_deny(certs: Path) -> None:
    dry = rbac(
        None, "DENY", shadow={"ns[demo]-policy[all]-rule[0]": principal_policy([{"any": True}])}
    )
    listener = listener_of(certs, inbound(PORT, "STRICT", [dry]))
    authz = listener.authorization
    assert authz is not None and [p.name for p in authz.dry_deny] == ["demo/all"]
    assert not authz.deny and not authz.allow
    assert judge(listener, CLIENT) is None


def test_a_dry_run_deny_set_without_policies_holds_none() -> None:
    """A DENY shadow set without policies denies nothing in dry run: no placeholder (an
    ALLOW policy "allows nothing" listed, counted and shown among the dry-run DENY ones)."""
    dry = rbac(None, "DENY", shadow={})
    read = chain_policies(
        [("f", dry.typed_config.value)], lambda path, why: XdsRefused("LDS", path, why)
    )
    assert read.dry_deny == [] and read.authorization() is None


def test_until_the_inbound_listener_arrives_every_request_is_denied(certs: Path) -> None:
    """As a sidecar refuses inbound connections until its first listeners arrive."""
    listener = listener_of(certs, None)
    assert listener.authorization is not None
    assert [p.name for p in listener.authorization.allow] == [PENDING]
    assert judge(listener, CLIENT) == "none"


def test_istiods_tls_settings_are_served(certs: Path) -> None:
    socket = downstream_tls(
        trust_domains=("cluster.local", "old.example"),
        min_version=common_pb2.TlsParameters.TLSv1_3,
        ciphers=("ECDHE-ECDSA-AES128-GCM-SHA256",),
    )
    listener = listener_of(certs, inbound(PORT, "STRICT", socket=socket))
    tls = listener.tls
    assert tls is not None
    assert tls.min_protocol_version == "TLSV1_3"
    assert tls.max_protocol_version == "TLSV1_3"
    assert tls.cipher_suites == ("ECDHE-ECDSA-AES128-GCM-SHA256",)
    assert tls.subject_alt_name_prefixes == ("spiffe://cluster.local/", "spiffe://old.example/")
    assert tls.context is not None


def test_tls_settings_changed_at_each_update_keep_a_bounded_number_of_contexts(
    certs: Path,
) -> None:
    """Each distinct set of versions and cipher suites is a server context of the identity,
    rebuilt at each rotation: a control plane sending another at each update made the
    engine keep them all (700 updates: 12 MiB, a rotation 0.8 s of the event loop)."""
    config = base(certs)
    material = config.proxy.mesh_identity.material  # type: ignore[union-attr]
    for i in range(3 * MAX_SERVER_CONTEXTS):
        socket = downstream_tls(ciphers=("AES128-GCM-SHA256",) * (i + 1))
        (listener,) = translate(
            config, resources(inbound(PORT, "STRICT", socket=socket))
        ).proxy.listeners
        assert listener.tls is not None and listener.tls.context is not None
    assert len(material.servers) <= MAX_SERVER_CONTEXTS


def test_a_listener_with_its_own_tls_keeps_it_and_takes_the_policies(certs: Path) -> None:
    deny = rbac(
        {"ns[demo]-policy[no-evil]-rule[0]": principal_policy([namespace_principal("evil")])},
        "DENY",
    )
    listener = listener_of(
        certs, inbound(PORT, "DISABLE", [deny]), listener_tls="{mode: ISTIO_MUTUAL}"
    )
    assert listener.peer_mode is None and listener.tls is not None
    assert judge(listener, EVIL) == "demo/no-evil"


def test_an_ip_range_without_a_length_is_every_address_as_in_envoy(certs: Path) -> None:
    """Envoy reads an unset ``prefix_len`` as 0 (its ``CidrRange``: the wrapper's default),
    so such a DENY denies every address of the family; it was read as one address. A length
    above the address's bits is the whole address, as Envoy clamps it."""
    deny = rbac(
        {
            "ns[demo]-policy[v4]-rule[0]": principal_policy(
                [{"remote_ip": {"address_prefix": "10.1.2.3"}}]
            ),
            "ns[demo]-policy[one]-rule[0]": principal_policy([ip_principal("2001:db8::1", 100)]),
        },
        "DENY",
    )
    listener = listener_of(certs, inbound(PORT, "PERMISSIVE", [deny]))
    assert judge(listener, CLIENT, ip="192.168.7.7") == "demo/v4"
    assert judge(listener, CLIENT, ip="2001:db8::2") == "demo/one"  # /100
    assert judge(listener, CLIENT, ip="2001:db9::1") is None
    clamped = rbac({"p": principal_policy([ip_principal("10.0.0.1", 40)])}, "DENY")
    listener = listener_of(certs, inbound(PORT, "PERMISSIVE", [clamped]))
    assert judge(listener, CLIENT, ip="10.0.0.1") == "p"
    assert judge(listener, CLIENT, ip="10.0.0.2") is None


def test_a_subject_is_matched_as_envoy_prints_it() -> None:
    """Envoy matches ``principal_name`` against the subject as OpenSSL's RFC 2253 printer
    writes it: short names (``SN``, ``GN``), each UTF-8 byte above ASCII and each control
    character as ``\\XX``. Spelled as Python decodes it, a DENY written in Envoy's
    spelling never matched."""
    cert = {
        "subject": (
            (("commonName", "\u00e9vil\x01 "),),
            (("surname", "#x"),),
            (("givenName", "a,b"),),
        )
    }
    assert subject_of(cert) == "GN=a\\,b,SN=\\#x,CN=\\C3\\A9vil\\01\\ "
    deny = rbac(
        {"p": principal_policy([exact_principal("GN=a\\,b,SN=\\#x,CN=\\C3\\A9vil\\01\\ ")])},
        "DENY",
    )
    chain = [(f"f{i}", f.typed_config.value) for i, f in enumerate([deny])]
    authorization = chain_policies(
        chain, lambda path, why: XdsRefused("LDS", path, why)
    ).authorization()
    assert authorization is not None
    owner = ListenerAuthorization(authorization, Stats(), "l")
    verdict = owner._enforced(Facts(secure=True, peercert=cert))
    assert verdict is not None and verdict.denied is not None and verdict.denied.name == "p"


def test_ignore_case_folds_ascii_only_as_envoy() -> None:
    """Envoy's ``ignore_case`` compares ASCII letters without case; ``str.lower`` also folds
    the Kelvin sign to ``k``, so an ALLOW for ``.../sa/k`` admitted ``.../sa/\u212a``."""
    match = StringMatch("exact", "spiffe://td/ns/a/sa/K", True)
    assert match.matches("SPIFFE://TD/ns/A/sa/k")
    assert not match.matches("spiffe://td/ns/a/sa/\u212a")
    assert not StringMatch("prefix", "\u212a", True).matches("k")


def _port_range(start: int, end: int) -> Any:
    permission = {"destination_port_range": {"start": start, "end": end}}
    return inbound(
        PORT, "STRICT", [rbac({"p": {"permissions": [permission], "principals": [{"any": True}]}})]
    )


def _with(message: Any, chain: int, mutate: Any) -> Any:
    mutate(message.filter_chains[chain])
    return message


REFUSED = [
    pytest.param(
        lambda: _with(
            inbound(PORT, "STRICT"),
            -1,
            lambda c: c.filters.insert(
                1, filter_("envoy.filters.network.ext_authz", c.filters[0].typed_config)
            ),
        ),
        "ext-authz",
        id="custom-ext-authz",
    ),
    pytest.param(
        lambda: _with(
            inbound(PORT, "STRICT"),
            -1,
            lambda c: c.filters.insert(
                1,
                filter_("envoy.filters.network.http_connection_manager", c.filters[0].typed_config),
            ),
        ),
        "istiod takes this port for HTTP",
        id="http-port",
    ),
    pytest.param(
        lambda: _with(
            inbound(PORT, "STRICT"),
            -1,
            lambda c: c.filters.insert(
                1, filter_("envoy.filters.network.redis_proxy", c.filters[0].typed_config)
            ),
        ),
        "network filter 'envoy.filters.network.redis_proxy'",
        id="unknown-filter",
    ),
    pytest.param(
        lambda: inbound(PORT, "STRICT", [rbac({}), rbac({})]),
        "a second enforcing ALLOW RBAC filter",
        id="two-allow-filters",
    ),
    pytest.param(
        lambda: inbound(
            PORT,
            "STRICT",
            [
                rbac(
                    {
                        "p": {
                            "permissions": [{"header": {"name": "x", "present_match": True}}],
                            "principals": [{"any": True}],
                        }
                    }
                )
            ],
        ),
        "an HTTP header",
        id="header-permission",
    ),
    pytest.param(
        lambda: inbound(
            PORT,
            "STRICT",
            [
                rbac(
                    {
                        "p": {
                            "permissions": [{"any": True}],
                            "principals": [
                                {
                                    "filter_state": {
                                        "key": "io.istio.peer_principal",
                                        "string_match": {"exact": "x"},
                                    }
                                }
                            ],
                        }
                    }
                )
            ],
        ),
        "filter state",
        id="filter-state-principal",
    ),
    pytest.param(
        lambda: inbound(
            PORT, "STRICT", [rbac({f"ns[demo]-policy[{'x' * 1_000_000}]-rule[0]": NEVER}, "DENY")]
        ),
        "a policy name of 1000025 characters, above 512",
        id="huge-policy-name",
    ),
    pytest.param(
        lambda: virtual_inbound([*port_chains(PORT, "STRICT"), *port_chains(0, "DISABLE")]),
        "destination_port: not a port",
        id="chain-port-0",
    ),
    pytest.param(
        lambda: virtual_inbound([*port_chains(PORT, "STRICT"), *port_chains(65536, "DISABLE")]),
        "destination_port: not a port",
        id="chain-port-65536",
    ),
    pytest.param(lambda: _port_range(9000, 9000), "0 <= start < end <= 65536", id="empty-range"),
    pytest.param(lambda: _port_range(-1, 9000), "0 <= start < end <= 65536", id="negative-range"),
    pytest.param(lambda: _port_range(1, 70000), "0 <= start < end <= 65536", id="range-too-far"),
    pytest.param(
        lambda: inbound(
            PORT,
            "STRICT",
            [
                rbac(
                    {
                        "p": principal_policy(
                            [{"authenticated": {"principal_name": {"safe_regex": {"regex": ""}}}}]
                        )
                    }
                )
            ],
        ),
        "safe_regex.regex: must not be empty",
        id="empty-regex",
    ),
    pytest.param(
        lambda: inbound(PORT, "STRICT", [rbac({"p": principal_policy([ip_principal("::", 129)])})]),
        "prefix_len: above 128",
        id="prefix-len-129",
    ),
    pytest.param(
        lambda: _with(inbound(PORT, "PERMISSIVE", [rbac({})]), -1, lambda c: c.filters.pop(1)),
        "its RBAC filters differ",
        id="chains-with-other-policies",
    ),
    pytest.param(
        lambda: inbound(PORT, "STRICT", socket=downstream_tls(require_client_certificate=False)),
        "require_client_certificate",
        id="no-client-certificate",
    ),
    pytest.param(
        lambda: inbound(
            PORT, "STRICT", socket=downstream_tls(min_version=common_pb2.TlsParameters.TLSv1_1)
        ),
        "TLSv1_1",
        id="tls-1.1",
    ),
    pytest.param(
        lambda: _with(
            inbound(PORT, "STRICT"),
            -1,
            lambda c: c.filter_chain_match.source_prefix_ranges.add(address_prefix="10.0.0.0"),
        ),
        "FilterChainMatch.source_prefix_ranges",
        id="chain-per-source",
    ),
    pytest.param(
        lambda: _with(virtual_inbound(port_chains(PORT + 1, "STRICT")), 0, lambda c: None),
        "no chain for Istio's mutual TLS or plain text connections to port 9000",
        id="no-chain",
    ),
]


@pytest.mark.parametrize(("make", "detail"), REFUSED)
def test_what_the_engine_cannot_honour_is_refused(certs: Path, make: Any, detail: str) -> None:
    assert detail in refusal(certs, make())


def test_a_default_filter_chain_is_refused(certs: Path) -> None:
    message = inbound(PORT, "STRICT")
    message.default_filter_chain.CopyFrom(message.filter_chains[-1])
    assert "default_filter_chain" in refusal(certs, message)


def test_files_may_not_hold_the_policies_the_inbound_listener_carries(certs: Path) -> None:
    for kind in ("PeerAuthentication", "AuthorizationPolicy"):
        with pytest.raises(ConfigError, match=f"a {kind} cannot be given in a file"):
            base(
                certs,
                extra=f"---\nkind: {kind}\nmetadata: {{name: x, namespace: demo}}\nspec: {{}}\n",
            )


def test_the_startup_line_says_where_the_policies_come_from(certs: Path) -> None:
    from metaprotocol_sdk.cli.proxy import _policies_summary

    assert "inbound listener 'virtualInbound'" in _policies_summary(base(certs))


def test_the_inbound_listener_needs_the_mesh_identity() -> None:
    with pytest.raises(ConfigError, match=r"needs spec\.meshIdentity"):
        loads_config(f"""
kind: ServiceEntry
metadata: {{name: hello}}
spec:
  hosts: [hello.svc]
  ports: [{{number: 9090, name: tcp-metaprotocol-thrift-hello}}]
---
kind: ProxyConfig
metadata: {{name: proxy}}
spec:
  listeners: [{{host: hello.svc, port: 9090, bind: "127.0.0.1:{PORT}"}}]
  xds: {{address: "127.0.0.1:15010", inboundListener: {INBOUND}}}
""")


def test_a_trust_domain_prefix_matches_the_san_kinds_envoy_reads() -> None:
    """``match_subject_alt_names`` (istiod's ``spiffe://<td>/`` prefixes) is matched by Envoy
    against DNS, URI, email and IP address SANs alike."""
    from metaprotocol_sdk.proxy.tls import san_prefix_mismatch

    prefixes = ("spiffe://cluster.local/",)
    for kind in ("URI", "DNS", "email"):
        cert = {"subjectAltName": ((kind, "spiffe://cluster.local/ns/a/sa/b"),)}
        assert san_prefix_mismatch(cert, prefixes) is None
    other = {"subjectAltName": (("URI", "spiffe://other.example/ns/a/sa/b"),)}
    assert "trust domains" in str(san_prefix_mismatch(other, prefixes))
    assert san_prefix_mismatch({"subjectAltName": (("othername", "x"),)}, prefixes) is not None


def test_the_inbound_listener_held_is_read_once_for_every_update(certs: Path) -> None:
    """Every xDS update translates the whole configuration (an EDS push too): the inbound
    listener the client holds (the same message until LDS sends another) is read again only
    when it changes, not at each push (20 000 policies took 1.65 s to read)."""
    deny = rbac(
        {"ns[demo]-policy[no-evil]-rule[0]": principal_policy([namespace_principal("evil")])},
        "DENY",
    )
    message = inbound(PORT, "STRICT", [deny])
    config = base(certs)
    first = translate(config, resources(message)).proxy.listeners[0].authorization
    again = translate(config, resources(message)).proxy.listeners[0].authorization
    assert first is not None and again is first
    other = inbound(PORT, "STRICT", [deny])  # equal, but another message: LDS sent it again
    assert translate(config, resources(other)).proxy.listeners[0].authorization is not first
